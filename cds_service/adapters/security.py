"""Who may call our CDS Hooks, and how often: the inbound half of the service's security.

CDS Hooks 2.0 ("Trusting CDS Clients") has the CDS client sign a short-lived JWT for every
call, discovery and feedback included, sent as `Authorization: Bearer <jwt>`. We accept it
only when all of this holds, checked in this order:

1. the header is there and holds a JWS;                                          else 401
2. `alg` is ES384 or RS384 (never `none`, never an HMAC), `typ` is JWT, `kid` is set; else 401
3. a `jku` header, when present, is on our allow-list (we never fetch other URLs);  else 403
4. the `kid` names a trusted public key (configured JWKS file, or the allow-listed
   JWKS URLs, cached and re-fetched when an unseen `kid` appears: key rotation);  else 401
5. the signature verifies and `iss`, `aud`, `exp`, `iat`, `jti` are present, the token
   has not expired, was not issued in the future and lives at most 10 minutes;     else 401
6. `iss` is on our allow-list;                                                     else 403
7. `aud` is the exact URL of the endpoint being called;                            else 403
8. the `jti` was not seen before (shared by all worker processes, in SQLite).      else 401

401 means "we cannot tell who you are", 403 "we can, and this token is not for us".
The other limits (rate per client, JSON depth, CORS origins) live here too.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import PyJWK, PyJWKClient, PyJWKSet
from jwt.exceptions import PyJWKClientConnectionError, PyJWKClientError
from limits import parse as parse_rate
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from cds_service.adapters import sqlite_files
from cds_service.logs import hashed
from cds_service.core.domain import HooksAuth
from cds_service.core.settings import Settings, is_loopback_url

log = logging.getLogger(__name__)

ACCEPTED_ALGORITHMS = ("ES384", "RS384")
REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "jti")
CLOCK_SKEW_S = 30
#: Tokens meant to live longer are refused: a stolen one is useless soon, and the jti cache stays small.
MAX_TOKEN_LIFETIME_S = 600
JWKS_FETCH_TIMEOUT_S = 5.0
#: At most one forced JWKS re-fetch per URL in this many seconds (unknown kids cannot make us hammer the EHR).
JWKS_REFETCH_COOLDOWN_S = 30.0


class HookAuthError(Exception):
    """A refused CDS Hooks call: `status` is 401 or 403, the message says why (safe to show)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def www_authenticate(self) -> str:
        """The RFC 6750 challenge for a 401 (clients learn what to fix without reading the body)."""
        error = "invalid_request" if "Authorization" in self.message else "invalid_token"
        description = self.message.replace('"', "'").replace("\\", "")
        return f'Bearer realm="cds-hooks", error="{error}", error_description="{description}"'


class KeysUnavailableError(Exception):
    """A trusted JWKS URL could not be fetched: the caller may retry (503)."""


@dataclass(frozen=True)
class HookClient:
    """The CDS client a verified token speaks for."""

    issuer: str
    tenant: str | None
    key_id: str

    @property
    def rate_key(self) -> str:
        """Rate limits apply per client and tenant (one EHR may serve several hospitals)."""
        return f"{self.issuer}|{self.tenant or ''}"

    @property
    def audit_name(self) -> str:
        return self.issuer if not self.tenant else f"{self.issuer} (tenant {hashed(self.tenant)})"


def split_list(text: str) -> list[str]:
    """`a, b ,c` → ['a', 'b', 'c'] (the format of every list-valued setting)."""
    return [item.strip() for item in text.split(",") if item.strip()]


# --- keys -------------------------------------------------------------------------------------


def key_fits_algorithm(key: PyJWK, alg: str) -> bool:
    """RS384 needs an RSA key (2048 bits or more), ES384 an EC key on P-384; nothing else is used."""
    public = key.key
    if alg == "RS384":
        return isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048
    if alg == "ES384":
        return isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    return False


class KeyRing:
    """Public keys of the trusted CDS clients.

    Two sources, as the specification allows: a JWKS file exchanged out of band (re-read
    when the file changes), and JWKS URLs on the allow-list, fetched by PyJWKClient, cached
    for `cache_s` and re-fetched (at most every 30 s) when a token names an unseen `kid`:
    that is how a client's key rotation reaches us without a restart.
    """

    def __init__(self, jwks_file: str, jku_urls: Iterable[str], cache_s: int) -> None:
        self.jwks_file = Path(jwks_file) if jwks_file else None
        self._file_state: tuple[float, dict[str, PyJWK]] = (-1.0, {})
        self.clients = {
            url: PyJWKClient(url, cache_jwk_set=True, lifespan=max(1, cache_s), timeout=JWKS_FETCH_TIMEOUT_S,
                             cooldown_duration=JWKS_REFETCH_COOLDOWN_S)
            for url in jku_urls
        }
        self._file_keys()  # a broken JWKS file stops the start-up, not the first hook call

    def _file_keys(self) -> dict[str, PyJWK]:
        if self.jwks_file is None:
            return {}
        mtime = self.jwks_file.stat().st_mtime
        if mtime != self._file_state[0]:
            jwks = PyJWKSet.from_dict(json.loads(self.jwks_file.read_text()))
            self._file_state = (mtime, {k.key_id: k for k in jwks.keys if k.key_id})
        return self._file_state[1]

    def key_for(self, kid: str, jku: str | None) -> PyJWK | None:
        """The key named `kid`: from `jku` when the token names one, else from any trusted source."""
        if jku is None:
            found = self._file_keys().get(kid)
            if found is not None:
                return found
        urls = [jku] if jku is not None else list(self.clients)
        for url in urls:
            try:
                return self.clients[url].get_signing_key(kid)
            except PyJWKClientConnectionError as exc:
                log.warning("could not fetch a trusted JWKS", extra={"jwks_url": url, "error": str(exc)})
                if jku is not None:
                    raise KeysUnavailableError(f"the JWKS at {url} could not be fetched") from exc
            except PyJWKClientError:
                continue  # not in this set
        return None


# --- replay -----------------------------------------------------------------------------------


#: A hook call waits at most this long for the replay cache (it must answer quickly).
REPLAY_BUSY_TIMEOUT_S = 10.0


class ReplayCache:
    """The `jti` of every accepted token until it expires, in SQLite: shared by all worker processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        sqlite_files.create(path, "CREATE TABLE IF NOT EXISTS seen_jti (issuer TEXT NOT NULL, jti TEXT NOT NULL, "
                                  "expires_at REAL NOT NULL, PRIMARY KEY (issuer, jti));", timeout=REPLAY_BUSY_TIMEOUT_S)

    def first_use(self, issuer: str, jti: str, expires_at: float, now: float) -> bool:
        """Record the token; False when the same issuer already used this jti (a replay)."""
        with sqlite_files.connection(self.path, REPLAY_BUSY_TIMEOUT_S) as db:
            db.execute("DELETE FROM seen_jti WHERE expires_at < ?", (now - CLOCK_SKEW_S,))
            inserted = db.execute("INSERT OR IGNORE INTO seen_jti VALUES (?, ?, ?)", (issuer, jti, expires_at))
            return inserted.rowcount == 1


# --- the verifier -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustPolicy:
    """Who we trust: the allow-listed issuers and JWKS URLs (CDS_HOOKS_ISSUERS, CDS_HOOKS_JKU_ALLOWLIST)."""

    issuers: frozenset[str]
    jku_allowlist: frozenset[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> "TrustPolicy":
        return cls(frozenset(split_list(settings.cds_hooks_issuers)), frozenset(split_list(settings.cds_hooks_jku_allowlist)))


class TokenVerifier:
    """Checks the CDS client's JWT on one request (see the module docstring for the order)."""

    def __init__(self, policy: TrustPolicy, keys: KeyRing, replay: ReplayCache,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.keys = keys
        self.replay = replay
        self.clock = clock

    def verify(self, authorization: str | None, audiences: Sequence[str]) -> HookClient:
        """The client behind a valid token for one of `audiences`; raises HookAuthError otherwise."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HookAuthError(401, "missing Authorization: Bearer <JWT> header (CDS Hooks requires a signed JWT on every call)")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise HookAuthError(401, "the bearer token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in ACCEPTED_ALGORITHMS:
            raise HookAuthError(401, f"JWT alg {alg!r} is not accepted; sign with ES384 or RS384")
        if str(header.get("typ", "")).upper() != "JWT":
            raise HookAuthError(401, "JWT header typ must be 'JWT'")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise HookAuthError(401, "JWT header has no kid")
        jku = header.get("jku")
        if jku is not None and jku not in self.policy.jku_allowlist:
            raise HookAuthError(403, "JWT jku is not on this service's allow-list of JWKS URLs")

        key = self.keys.key_for(kid, jku)
        if key is None:
            raise HookAuthError(401, f"unknown signing key: no trusted JWKS has kid {kid!r}")
        if not key_fits_algorithm(key, alg):
            raise HookAuthError(401, f"key {kid!r} cannot verify {alg} signatures")

        now = self.clock()
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[alg], leeway=CLOCK_SKEW_S,
                options={"require": list(REQUIRED_CLAIMS), "verify_aud": False, "verify_iss": False},
            )
        except jwt.ExpiredSignatureError:
            raise HookAuthError(401, "JWT has expired (exp)") from None
        except jwt.ImmatureSignatureError:
            raise HookAuthError(401, "JWT was issued in the future (iat)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise HookAuthError(401, f"JWT lacks the required claim {exc.claim!r}") from None
        except jwt.InvalidSignatureError:
            raise HookAuthError(401, "JWT signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise HookAuthError(401, f"JWT rejected: {exc}") from None
        if float(claims["exp"]) > now + MAX_TOKEN_LIFETIME_S + CLOCK_SKEW_S:
            raise HookAuthError(401, f"JWT lifetime too long: exp must be within {MAX_TOKEN_LIFETIME_S} s")

        issuer = claims["iss"]
        if not isinstance(issuer, str):
            raise HookAuthError(401, "JWT iss must be a string")
        if issuer not in self.policy.issuers:
            raise HookAuthError(403, f"issuer {issuer!r} is not a trusted CDS client")
        aud = claims["aud"]
        token_audiences = [aud] if isinstance(aud, str) else list(aud) if isinstance(aud, list) else []
        if not all(isinstance(a, str) for a in token_audiences):
            raise HookAuthError(401, "JWT aud must be a string or a list of strings")
        if not set(token_audiences) & set(audiences):
            raise HookAuthError(403, f"JWT aud must be this endpoint's URL {audiences[0]!r}")
        if not isinstance(claims["jti"], str) or not claims["jti"]:
            raise HookAuthError(401, "JWT jti must be a non-empty string")
        if not self.replay.first_use(issuer, claims["jti"], float(claims["exp"]), now):
            raise HookAuthError(401, "JWT jti was already used (replayed token)")
        tenant = claims.get("tenant")
        return HookClient(issuer=issuer, tenant=str(tenant) if tenant else None, key_id=kid)


def build_verifier(settings: Settings, replay_db: Path) -> TokenVerifier:
    policy = TrustPolicy.from_settings(settings)
    keys = KeyRing(settings.cds_hooks_jwks_file, sorted(policy.jku_allowlist), settings.cds_hooks_jwks_cache_s)
    return TokenVerifier(policy, keys, ReplayCache(replay_db))


def hooks_auth_enabled(settings: Settings) -> bool:
    """JWT checks are on unless CDS_HOOKS_AUTH=off, which is only allowed on loopback (local development).

    Raises ValueError for an unknown mode or for `off` on a public URL: a service reachable
    from the network never runs its hooks unauthenticated by mistake.
    """
    mode = settings.cds_hooks_auth  # checked at start-up (Settings)
    if mode is HooksAuth.JWT:
        if not split_list(settings.cds_hooks_issuers):
            log.warning("CDS_HOOKS_ISSUERS is empty: every CDS Hooks call will be refused until a trusted issuer is configured")
        return True
    if mode is HooksAuth.OFF:
        if not is_loopback_url(settings.public_url):
            raise ValueError("CDS_HOOKS_AUTH=off is only allowed when CDS_PUBLIC_URL is a loopback address")
        log.warning("!!! CDS_HOOKS_AUTH=off: CDS Hooks calls are NOT authenticated. Local development only. !!!")
        return False
    raise ValueError(f"CDS_HOOKS_AUTH must be 'jwt' or 'off', not {settings.cds_hooks_auth!r}")


# --- rate limit, JSON depth, CORS -------------------------------------------------------------


class HookRateLimiter:
    """A moving-window limit per client (`limits`; in memory per process, or shared via redis://)."""

    def __init__(self, rate: str, storage_url: str) -> None:
        self.item = parse_rate(rate)
        self.limiter = MovingWindowRateLimiter(storage_from_string(storage_url))

    def allow(self, key: str) -> tuple[bool, int]:
        """Whether this call may go ahead, and otherwise the seconds until it may."""
        if self.limiter.hit(self.item, key):
            return True, 0
        reset_at, _ = self.limiter.get_window_stats(self.item, key)
        return False, max(1, int(reset_at - time.time()) + 1)


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, `{}` or `[]` is 1), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
            deepest = max(deepest, depth + 1)
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
            deepest = max(deepest, depth + 1)
    return deepest


def parse_json_body(data: bytes, max_depth: int) -> Any:
    """The request body as JSON, refusing bodies nested deeper than `max_depth` (ValueError)."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"request body is not valid JSON: {exc}") from None
    if json_depth(value) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return value


def enable_cors(app: Any, origins: Sequence[str]) -> None:
    """CORS for browser-based CDS clients, on /cds-services only, for the configured origins only."""
    if not origins:
        return
    from flask_cors import CORS

    CORS(app, resources={r"/cds-services(/.*)?$": {"origins": list(origins)}},
         allow_headers=["Authorization", "Content-Type"], methods=["GET", "POST", "OPTIONS"],
         supports_credentials=False, max_age=600)
