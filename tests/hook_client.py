"""A CDS client (the EHR side of CDS Hooks) for tests: its own keys, made at test time, and signed JWTs.

`EhrSigner` holds one ES384 and one RS384 key pair, publishes their public halves as a JWKS
(a file for CDS_HOOKS_JWKS_FILE, or a dict to serve), and signs the JWT CDS Hooks 2.0 asks
for on every call. `hook_settings()` gives the Settings fields that make our service trust it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISSUER = "https://ehr.test.example/cds-client"


def _public_jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    public = key.public_key()
    to_jwk = RSAAlgorithm.to_jwk if alg.startswith("RS") else ECAlgorithm.to_jwk
    return json.loads(to_jwk(public)) | {"kid": kid, "alg": alg, "use": "sig"}


@dataclass
class EhrSigner:
    """An EHR's signing keys (ES384 + RS384) and the tokens it sends."""

    issuer: str = ISSUER
    keys: dict[str, Any] = field(default_factory=lambda: {
        "ES384": ec.generate_private_key(ec.SECP384R1()),
        "RS384": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    })

    def kid(self, alg: str) -> str:
        return f"ehr-{alg.lower()}"

    def jwks(self) -> dict[str, Any]:
        return {"keys": [_public_jwk(key, self.kid(alg), alg) for alg, key in self.keys.items()]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def token(self, aud: str | list[str], *, alg: str = "ES384", claims: dict[str, Any] | None = None,
              headers: dict[str, Any] | None = None, lifetime_s: int = 300, drop: tuple[str, ...] = ()) -> str:
        now = int(time.time())
        payload = {"iss": self.issuer, "aud": aud, "exp": now + lifetime_s, "iat": now, "jti": str(uuid.uuid4()),
                   "tenant": "test-hospital"} | (claims or {})
        for name in drop:
            payload.pop(name, None)
        return jwt.encode(payload, self.keys[alg], algorithm=alg,
                          headers={"kid": self.kid(alg), "typ": "JWT"} | (headers or {}))

    def auth(self, aud: str | list[str], **kwargs: Any) -> dict[str, str]:
        """The Authorization header for one call to `aud` (a fresh jti each time)."""
        return {"Authorization": f"Bearer {self.token(aud, **kwargs)}"}

    def hook_settings(self, jwks_path: Path) -> dict[str, Any]:
        """Settings fields that make the service trust this EHR (through a JWKS file)."""
        return {"cds_hooks_issuers": self.issuer, "cds_hooks_jwks_file": str(self.write_jwks(jwks_path))}


def hook_request(hook: str, context: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A CDS Hooks request body with a fresh hookInstance."""
    return {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context} | extra


# --- JSON Schemas written from the CDS Hooks 2.0 specification (tests/schemas) -------------------

SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
SCHEMA_BASE = "https://cds-triage.example.org/schemas/"


def _registry() -> Any:
    from referencing import Registry, Resource

    resources = [(SCHEMA_BASE + p.name, Resource.from_contents(json.loads(p.read_text()))) for p in SCHEMAS_DIR.glob("*.json")]
    return Registry().with_resources(resources)


def schema_errors(name: str, instance: Any) -> list[str]:
    """Every violation of schemas/<name> by `instance` (empty: valid)."""
    from jsonschema import Draft202012Validator

    schema = json.loads((SCHEMAS_DIR / name).read_text())
    validator = Draft202012Validator(schema, registry=_registry())
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(instance)]


def assert_valid(name: str, instance: Any) -> None:
    errors = schema_errors(name, instance)
    assert not errors, f"{name}: " + "; ".join(errors)
