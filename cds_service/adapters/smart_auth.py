"""Outbound to the FHIR server: SMART Backend Services, with a static bearer token as fallback.

SMART Backend Services (client-credentials grant, `private_key_jwt`): we sign a short
client assertion with our private key (RS384 or ES384, `kid` = the key registered at the
FHIR server's authorization server), POST it to the token endpoint, and put the access
token we get back on every FHIR request. The token is cached until shortly before it
expires, shared by all threads of the process; when the FHIR server still answers 401
(revoked, server restarted), we fetch a new one once and repeat the request.

`SmartBackendAuth` is an `httpx.Auth`, so `FhirClient(..., auth=...)` uses it unchanged.
Configured with CDS_FHIR_SMART_CLIENT_ID and CDS_FHIR_SMART_PRIVATE_KEY_FILE; without them
CDS_FHIR_BEARER_TOKEN (if set) is sent as it is.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from cds_service.core.errors import PermanentError, UpstreamError, UpstreamRedirectError, is_redirect_status, is_retryable_status
from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.settings import Settings, is_loopback_url

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: SMART: the assertion's exp is no more than five minutes in the future.
ASSERTION_LIFETIME_S = 300
#: Renew the access token this long before it expires (at most half its lifetime).
REFRESH_MARGIN_S = 60

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class SmartAuthError(PermanentError):
    """The authorization server refused us (unknown client, wrong key, scope): a configuration fault."""


# --- keys (pure) ------------------------------------------------------------------------------


def load_private_key(path: str | Path) -> PrivateKey:
    """Our PEM private key (PKCS#8 or traditional, unencrypted): RSA ≥ 2048 bits or EC P-384."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    signing_algorithm(key)  # refuse unusable keys at start-up, not at the first request
    return key  # type: ignore[return-value]


def signing_algorithm(key: Any) -> str:
    """RS384 for an RSA key, ES384 for an EC P-384 key (the two SMART asks servers to support)."""
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
        return "RS384"
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return "ES384"
    raise ValueError("the SMART private key must be RSA (2048 bits or more) or EC on P-384")


def public_jwk(key: PrivateKey, kid: str | None = None) -> dict[str, Any]:
    """The public half as a JWK (with alg, use and kid): what to register at the authorization server."""
    public = key.public_key()
    jwk = json.loads(RSAAlgorithm.to_jwk(public) if isinstance(public, rsa.RSAPublicKey) else ECAlgorithm.to_jwk(public))
    jwk.update({"alg": signing_algorithm(key), "use": "sig"})
    jwk["kid"] = kid or jwk_thumbprint(jwk)
    return jwk


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 thumbprint (SHA-256 over the required members in lexicographic order): a stable default kid."""
    required = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({name: jwk[name] for name in required}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def client_assertion(client_id: str, key: PrivateKey, kid: str, token_url: str, now: float,
                     jti: str | None = None) -> str:
    """The signed JWT that authenticates us at the token endpoint (SMART Backend Services)."""
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "exp": int(now) + ASSERTION_LIFETIME_S,
              "iat": int(now), "jti": jti or secrets.token_urlsafe(24)}
    return jwt.encode(claims, key, algorithm=signing_algorithm(key), headers={"kid": kid, "typ": "JWT"})


@dataclass(frozen=True)
class AccessToken:
    value: str
    issued_at: float
    expires_at: float

    def usable(self, now: float) -> bool:
        """Still good for a while: renewed REFRESH_MARGIN_S (or half its lifetime) before it expires."""
        margin = min(REFRESH_MARGIN_S, (self.expires_at - self.issued_at) / 2)
        return self.expires_at - now > margin


# --- the httpx.Auth ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SmartClientConfig:
    """Everything the client-credentials grant needs (from the CDS_FHIR_SMART_* settings)."""

    client_id: str
    private_key: PrivateKey
    key_id: str
    scope: str
    fhir_base_url: str
    token_url: str = ""  # empty: discovered from {fhir_base_url}/.well-known/smart-configuration
    timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "SmartClientConfig":
        key = load_private_key(settings.fhir_smart_private_key_file)
        return cls(client_id=settings.fhir_smart_client_id, private_key=key,
                   key_id=settings.fhir_smart_key_id or public_jwk(key)["kid"], scope=settings.fhir_smart_scope,
                   fhir_base_url=settings.fhir_base_url.rstrip("/"), token_url=settings.fhir_smart_token_url,
                   timeout_s=settings.http_timeout_s)


def _require_secure(url: str, what: str) -> None:
    """Credentials travel only over https (plain http is allowed on loopback, for tests and the demo)."""
    if not url.startswith("https://") and not (url.startswith("http://") and is_loopback_url(url)):
        raise SmartAuthError(f"{what} must be an https URL, got {url!r}")


class SmartBackendAuth(httpx.Auth):
    """Bearer tokens from the SMART token endpoint, cached per process, renewed before they expire.

    Sync only (our FHIR adapter is sync). Thread-safe: one token request at a time.
    """

    def __init__(self, config: SmartClientConfig, *, clock: Callable[[], float] = time.time,
                 http: httpx.Client | None = None) -> None:
        self.config = config
        self.clock = clock
        self.http = http or httpx.Client(timeout=config.timeout_s)
        self._lock = threading.Lock()
        self._token: AccessToken | None = None
        self._token_url = config.token_url
        self.tokens_issued = 0  # how many tokens we fetched: shows the cache works

    def close(self) -> None:
        """Close the token endpoint's HTTP client (the service keeps one auth for the life of the process)."""
        self.http.close()

    def access_token(self, *, rejected: str | None = None) -> str:
        """A usable token: the cached one, or a new one when it is near expiry or was just rejected."""
        with self._lock:
            now = self.clock()
            stale = self._token is None or not self._token.usable(now) or self._token.value == rejected
            if stale:
                self._token = self._request_token(now)
                self.tokens_issued += 1
            assert self._token is not None
            return self._token.value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.access_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:  # revoked or the server forgot it: one new token, one retry
            request.headers["Authorization"] = f"Bearer {self.access_token(rejected=token)}"
            yield request

    def token_url(self) -> str:
        if not self._token_url:
            url = f"{self.config.fhir_base_url}/.well-known/smart-configuration"
            response = self._post_or_get("GET", url)
            try:
                endpoint = response.json().get("token_endpoint")
            except (ValueError, AttributeError):
                endpoint = None
            if not isinstance(endpoint, str) or not endpoint:
                raise SmartAuthError(f"{url} names no token_endpoint; set CDS_FHIR_SMART_TOKEN_URL", server="auth", url=url)
            self._token_url = endpoint
        _require_secure(self._token_url, "the SMART token endpoint")
        return self._token_url

    def _request_token(self, now: float) -> AccessToken:
        url = self.token_url()
        c = self.config
        form = {
            "grant_type": "client_credentials",
            "scope": c.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion(c.client_id, c.private_key, c.key_id, url, now),
        }
        response = self._post_or_get("POST", url, data=form)
        body = response.json()
        token, expires_in = body.get("access_token"), body.get("expires_in", 300)
        if not isinstance(token, str) or not token or str(body.get("token_type", "")).lower() != "bearer":
            raise SmartAuthError("the SMART token endpoint answered without a bearer access_token")
        return AccessToken(token, now, now + float(expires_in))

    def _post_or_get(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, url, headers={"Accept": "application/json"}, **kwargs)
        except httpx.TransportError as exc:
            raise UpstreamError(f"SMART authorization server unreachable ({url}): {type(exc).__name__}", server="auth",
                                url=url) from exc
        if is_redirect_status(response.status_code):
            raise UpstreamRedirectError(f"SMART authorization server {method} {url}", response.status_code,
                                        response.headers.get("Location", ""), server="auth", url=url)
        if is_retryable_status(response.status_code):
            raise UpstreamError(f"SMART authorization server answered {response.status_code} at {url}", server="auth", url=url)
        if response.status_code >= 400:
            raise SmartAuthError(f"SMART authorization refused ({response.status_code}): {_oauth_error(response)}",
                                 server="auth", url=url)
        return response


def _oauth_error(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return f"{body.get('error', '?')}: {body.get('error_description', '')}".strip()


# --- wiring -----------------------------------------------------------------------------------


def fhir_auth(settings: Settings) -> SmartBackendAuth | None:
    """SMART Backend Services when CDS_FHIR_SMART_CLIENT_ID is set, else None (bearer token or none)."""
    if not settings.fhir_smart_client_id:
        return None
    if not settings.fhir_smart_private_key_file:
        raise ValueError("CDS_FHIR_SMART_CLIENT_ID is set but CDS_FHIR_SMART_PRIVATE_KEY_FILE is not")
    return SmartBackendAuth(SmartClientConfig.from_settings(settings))


def fhir_client(settings: Settings, auth: httpx.Auth | None) -> FhirClient:
    """A FhirClient for our own FHIR server: SMART when configured, else CDS_FHIR_BEARER_TOKEN."""
    return FhirClient(settings.fhir_base_url, timeout_s=settings.http_timeout_s, auth=auth,
                      bearer_token=settings.fhir_bearer_token)
