"""Per-user sign-in with OpenID Connect (CDS_WORKLIST_AUTH=oidc): the authorization code flow with PKCE
at the site's identity provider, done by Authlib.

- `GET /auth/login?next=/worklist/…`: to the provider's authorization endpoint (found by discovery at
  CDS_OIDC_ISSUER/.well-known/openid-configuration, whose `issuer` must be CDS_OIDC_ISSUER), with a fresh
  `state`, `nonce` and PKCE `code_challenge` (S256). Their values stay on our side (session_store.py);
- `GET /auth/callback`: the state must be one we issued and not used yet (else 400), the code is exchanged,
  and the ID token must be signed by a key of the provider's JWKS, issued by CDS_OIDC_ISSUER for our
  client, with our nonce, not expired (30 s of clock skew) — else 401. A user without
  CDS_OIDC_REQUIRED_GROUP in the CDS_OIDC_GROUPS_CLAIM claim is refused (403). Then a new session:
  a random id in the cookie, the record on our side for CDS_OIDC_SESSION_LIFETIME_S, ended sooner after
  CDS_OIDC_IDLE_TIMEOUT_S without a page opened (the worklist's automatic refresh is not activity: an open
  worklist on an unattended screen still signs out);
- `POST /auth/logout`: the session record is deleted (a copied cookie stops working), then the provider's
  end-session endpoint (RP-initiated logout) when it has one, back to `/auth/signed-out`.

The cookie is HttpOnly, SameSite=Lax (the provider's redirect back is a top-level GET from another site) and
Secure with the `__Host-` prefix: CDS_PUBLIC_URL must be https, except on 127.0.0.1/localhost (development
and the tests), where the cookie cannot be Secure. Sign-ins, refusals and sign-outs go to the access log.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from datetime import timedelta
from typing import Any, Mapping

import requests
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.base_client import MismatchingStateError, OAuthError
from authlib.integrations.flask_client import OAuth
from flask import Blueprint, Flask, current_app, redirect, render_template, request, session, url_for
from joserfc.errors import JoseError

from cds_service.adapters.session_store import SessionStore, open_session_store
from cds_service.core.domain import DISCLAIMER, WorklistAuth
from cds_service.core.settings import Settings, is_loopback_url
from cds_service.web.web_context import access_log

log = logging.getLogger(__name__)

sign_in = Blueprint("sign_in", __name__)

CLOCK_SKEW_S = 30
SESSION_KEY = "sid"
#: How stale a session's last-activity time may get before a request writes it again.
IDLE_WRITE_EVERY_S = 60.0
NEXT_KEY = "cds_next"


class SignInError(Exception):
    """A sign-in that did not succeed: `status` and a message safe to show the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path on this service, never another site (`//host`, `https://…`, `/\\…`)."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")) or any(c < " " for c in value):
        return "/worklist"
    return value


def claim(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by a dotted path into nested objects (Keycloak: `realm_access.roles`)."""
    value: Any = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def groups_of(claims: Mapping[str, Any], path: str) -> set[str]:
    """The groups or roles a claim lists (a JSON list, or a space-separated string)."""
    value = claim(claims, path)
    if isinstance(value, str):
        return set(value.split())
    return {str(item) for item in value} if isinstance(value, list) else set()


class SignIn:
    """The provider (an Authlib client registered on the app) and our session records."""

    def __init__(self, settings: Settings, store: SessionStore, client: Any) -> None:
        self.settings = settings
        self.store = store
        self.client = client

    # --- sessions ---------------------------------------------------------------------------

    def current_user(self, active: bool = True) -> str | None:
        """The signed-in user of this request's session cookie; None when there is none, or it ended
        (its lifetime, or CDS_OIDC_IDLE_TIMEOUT_S since the last request that was `active`: a person's)."""
        record = self._record(active)
        return str(record["user"]) if record else None

    def _record(self, active: bool = False) -> dict[str, Any] | None:
        sid = session.get(SESSION_KEY)
        key = f"session:{sid}"
        raw = self.store.get(key) if isinstance(sid, str) else None
        record = json.loads(raw) if raw else None
        now = time.time()
        if not record or float(record.get("expires_at", 0)) <= now:
            return None
        idle = self.settings.oidc_idle_timeout_s
        last = float(record.get("active_at", record.get("signed_in_at", 0)))
        if idle and now - last > idle:
            self.store.delete(key)  # idle too long: gone here too, so the cookie cannot come back to it
            return None
        if active and idle and now - last >= min(IDLE_WRITE_EVERY_S, idle / 4):  # not one write per request
            record["active_at"] = now
            self.store.set(key, json.dumps(record), float(record["expires_at"]) - now)
        return record

    def start_session(self, user: str, claims: Mapping[str, Any], id_token: str) -> None:
        """A new session id for a new sign-in (never one the browser brought along)."""
        now = time.time()
        sid = secrets.token_urlsafe(32)
        lifetime = self.settings.oidc_session_lifetime_s
        record = {"user": user, "sub": claims.get("sub"), "signed_in_at": now, "active_at": now, "expires_at": now + lifetime,
                  "id_token": id_token}
        self.store.set(f"session:{sid}", json.dumps(record), lifetime)
        session.clear()
        session[SESSION_KEY] = sid
        session.permanent = True

    def end_session(self) -> dict[str, Any] | None:
        """Forget this browser's session here; the record it had (None when there was none)."""
        record = self._record()
        sid = session.get(SESSION_KEY)
        if isinstance(sid, str):
            self.store.delete(f"session:{sid}")
        session.clear()
        return record

    # --- the provider -----------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """The provider's discovery document, checked: its issuer is CDS_OIDC_ISSUER, its endpoints https (or loopback)."""
        try:
            metadata = self.client.load_server_metadata()
        except (requests.RequestException, ValueError) as exc:
            raise SignInError(502, f"the identity provider at {self.settings.oidc_issuer} could not be reached "
                                   f"({type(exc).__name__})") from None
        issuer = str(metadata.get("issuer", ""))
        if issuer.rstrip("/") != self.settings.oidc_issuer.rstrip("/"):
            self.client.server_metadata.pop("_loaded_at", None)  # asked again next time (the site may fix it)
            log.error("identity provider issuer mismatch", extra={"configured": self.settings.oidc_issuer, "metadata": issuer})
            raise SignInError(502, f"the identity provider says its issuer is {issuer!r}, not CDS_OIDC_ISSUER="
                                   f"{self.settings.oidc_issuer!r}: sign-in is off until they agree")
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            url = str(metadata.get(name, ""))
            if not url.startswith("https://") and not is_loopback_url(url):
                raise SignInError(502, f"the identity provider's {name} is not https: {url!r}")
        return metadata

    def user_of(self, token: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Who the verified ID token (plus the userinfo endpoint, for claims it leaves out) names, and the claims."""
        claims = dict(token.get("userinfo") or {})
        settings = self.settings
        wanted = [settings.oidc_user_claim] + ([settings.oidc_groups_claim] if settings.oidc_required_group else [])
        if any(claim(claims, name) is None for name in wanted) and self.metadata().get("userinfo_endpoint"):
            extra = dict(self.client.userinfo(token=token))
            if extra.get("sub") != claims.get("sub"):
                raise SignInError(401, "the identity provider's userinfo names another user than its ID token")
            claims = extra | claims
        user = claim(claims, settings.oidc_user_claim) or claims.get("email") or claims.get("sub")
        if not isinstance(user, str) or not user:
            raise SignInError(401, "the identity provider's ID token names no user")
        return user, claims


def sign_in_state() -> SignIn:
    return current_app.extensions["cds_sign_in"]


def init_sign_in(app: Flask, settings: Settings) -> None:
    """Mount the sign-in routes and configure the session cookie (CDS_WORKLIST_AUTH=oidc only)."""
    if settings.worklist_auth is not WorklistAuth.OIDC:
        return
    secure = settings.public_url.startswith("https://")
    app.secret_key = settings.oidc_session_secret
    app.config.update(
        SESSION_COOKIE_NAME="__Host-cds-triage" if secure else "cds-triage-session",  # __Host-: Secure, Path=/, no Domain
        SESSION_COOKIE_SECURE=secure, SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_PATH="/", PERMANENT_SESSION_LIFETIME=timedelta(seconds=settings.oidc_session_lifetime_s),
    )
    store = open_session_store(settings)
    oauth = OAuth(app, cache=store)
    client = oauth.register(
        "idp", client_id=settings.oidc_client_id, client_secret=settings.oidc_client_secret or None,
        server_metadata_url=f"{settings.oidc_issuer.rstrip('/')}/.well-known/openid-configuration",
        client_kwargs={"scope": settings.oidc_scopes, "code_challenge_method": "S256",
                       "default_timeout": settings.http_timeout_s,
                       **({} if settings.oidc_client_secret else {"token_endpoint_auth_method": "none"})})
    app.extensions["cds_sign_in"] = SignIn(settings, store, client)
    app.register_blueprint(sign_in)


def failed(exc: SignInError) -> Any:
    return render_template("sign_in.html", title="Sign-in failed", message=exc.message, sign_in_again=True,
                           disclaimer=DISCLAIMER), exc.status


@sign_in.after_request
def no_store(response: Any) -> Any:
    """As the worklist's pages: our own assets only, never cached, no referrer (the callback URL carries the code)."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Content-Security-Policy"] = "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'self'"
    return response


@sign_in.get("/auth/login")
def login() -> Any:
    state = sign_in_state()
    try:
        state.metadata()
        session[NEXT_KEY] = safe_next(request.args.get("next"))
        return state.client.authorize_redirect(state.settings.public_url.rstrip("/") + url_for("sign_in.callback"))
    except SignInError as exc:
        return failed(exc)


@sign_in.get("/auth/callback")
def callback() -> Any:
    state = sign_in_state()
    settings = state.settings
    try:
        metadata = state.metadata()
        try:
            token = state.client.authorize_access_token(
                leeway=CLOCK_SKEW_S, claims_options={"iss": {"essential": True, "values": [metadata["issuer"]]}})
        except MismatchingStateError:
            raise SignInError(400, "this sign-in link was already used, or is not one we started: sign in again") from None
        except OAuthError as exc:  # the provider said no (access_denied…) or refused the code
            raise SignInError(401, f"the identity provider did not sign you in: {exc.error or exc.description}") from None
        except (JoseError, AuthlibBaseError) as exc:
            raise SignInError(401, f"the identity provider's ID token was refused: {exc}") from None
        except requests.RequestException as exc:
            raise SignInError(502, f"the identity provider could not be reached ({type(exc).__name__})") from None
        if not token.get("userinfo"):
            raise SignInError(401, "the identity provider sent no ID token")
        user, claims = state.user_of(token)
        if settings.oidc_required_group and settings.oidc_required_group not in groups_of(claims, settings.oidc_groups_claim):
            access_log().viewed(user, "sign-in-refused", None, auth="oidc", address=request.remote_addr,
                                reason=f"not in {settings.oidc_required_group}")
            raise SignInError(403, f"{user} is signed in at the identity provider, but the worklist needs the group or "
                                   f"role {settings.oidc_required_group!r} in the claim {settings.oidc_groups_claim!r} "
                                   "(CDS_OIDC_REQUIRED_GROUP)")
    except SignInError as exc:
        log.warning("sign-in refused", extra={"status": exc.status, "reason": exc.message})
        return failed(exc)
    destination = safe_next(session.get(NEXT_KEY))
    state.start_session(user, claims, str(token.get("id_token", "")))
    access_log().viewed(user, "sign-in", None, auth="oidc", address=request.remote_addr)
    log.info("signed in", extra={"auth": "oidc"})
    return redirect(destination)


@sign_in.post("/auth/logout")
def logout() -> Any:
    state = sign_in_state()
    record = state.end_session()
    if record:
        access_log().viewed(str(record["user"]), "sign-out", None, auth="oidc", address=request.remote_addr)
    signed_out = state.settings.public_url.rstrip("/") + url_for("sign_in.signed_out")
    try:
        end_session = state.metadata().get("end_session_endpoint")
    except SignInError:
        end_session = None
    if not end_session:
        return redirect(signed_out, 303)
    result = state.client.create_logout_url(post_logout_redirect_uri=signed_out, client_id=state.settings.oidc_client_id,
                                            id_token_hint=(record or {}).get("id_token") or None)
    return redirect(result["url"], 303)


@sign_in.get("/auth/signed-out")
def signed_out() -> Any:
    return render_template("sign_in.html", title="Signed out", message="You are signed out of the worklist.",
                           sign_in_again=True, disclaimer=DISCLAIMER)
