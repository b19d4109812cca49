"""Who is asking for patient data: the one check in front of every page that shows it (the worklist and its
rows, study pages, key images, heatmaps), and the start-up check that keeps them off the network without it.

CDS_WORKLIST_AUTH decides (closed by default):

- `none`: no sign-in, for the loopback demo. Patient data goes only to direct calls from this machine (a
  loopback peer, no proxy header), and `serve` refuses to listen on any other address (`exposure_problem`),
  unless CDS_WORKLIST_OPEN_TO_NETWORK (development only, logged loudly at every start);
- `proxy-header`: an authenticating reverse proxy (oauth2-proxy, nginx with auth_request…) names the user in
  CDS_WORKLIST_AUTH_HEADER. Believed only when the direct peer (the socket's address, never X-Forwarded-For)
  is in CDS_TRUSTED_PROXIES and, when CDS_PROXY_SECRET is set, the request carries it in CDS_PROXY_SECRET_HEADER;
- `bearer`: `Authorization: Bearer <CDS_WORKLIST_BEARER_TOKEN>` (scripts, EHR embedding; one shared identity);
- `oidc`: the user signed in at the site's identity provider (sign_in.py keeps the session).

Every allowed request gets a `Viewer`: who the access log (adapters/access_log.py) records.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any, Iterable

from flask import current_app, request

from cds_service.core.domain import WorklistAuth
from cds_service.core.settings import Settings, is_loopback_url

log = logging.getLogger(__name__)

#: Requests a page makes by itself (the worklist's refresh): not a person's activity, so they do not keep a
#: signed-in session from its idle timeout (CDS_OIDC_IDLE_TIMEOUT_S), nor are they sent to sign in.
AUTOMATIC_ENDPOINTS = frozenset({"worklist.worklist_rows"})
# Headers a reverse proxy may add; any of them (even empty) means the caller is not this machine.
PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Forwarded-Host", "X-Forwarded-Proto")


@dataclass(frozen=True)
class Viewer:
    """Who may see this request's patient data: `name` is what the access log records."""

    name: str
    auth: WorklistAuth
    can_sign_out: bool = False


class AccessRefused(Exception):
    """Why a request may not see patient data: 401 (we do not know who you are) or 403 (we do, and you may not).
    `sign_in` says a browser should be sent to sign in (CDS_WORKLIST_AUTH=oidc)."""

    def __init__(self, status: int, message: str, *, sign_in: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.sign_in = sign_in


def peer_address(remote_addr: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The direct peer of the connection (an IPv4 address mapped into IPv6 as IPv4); None when it is not an IP."""
    try:
        address = ipaddress.ip_address(remote_addr or "")
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def from_this_machine() -> bool:
    """A direct call over loopback; one relayed by a reverse proxy (any proxy header, even empty) is not."""
    if any(name in request.headers for name in PROXY_HEADERS):
        return False
    address = peer_address(request.remote_addr)
    return address is not None and address.is_loopback


def is_loopback_host(host: str) -> bool:
    """Whether listening on `host` keeps the service on this machine: a loopback address or name (every address it
    resolves to is loopback), or a Unix socket. `0.0.0.0`, `::` and a machine's own addresses are not."""
    host = host.strip().strip("[]")
    if host.startswith("unix:") or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        resolved = [peer_address(str(info[4][0])) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
    except OSError:
        return False
    return bool(resolved) and all(address is not None and address.is_loopback for address in resolved)


def exposure_problem(settings: Settings, hosts: Iterable[str]) -> str | None:
    """Why the service must not start listening on `hosts` (None: it may). Asked by `cds-triage serve` and by
    gunicorn's start-up (docker/gunicorn.conf.py) before they bind, and by the app factory. A CDS_PUBLIC_URL
    that is not loopback counts too: the service is meant to be reached from other machines (through a proxy).

    With CDS_WORKLIST_AUTH=none, patient names, study pages, heatmaps and key images would go to anyone who
    reaches the port. CDS_WORKLIST_OPEN_TO_NETWORK lets it start anyway (development), with a loud warning."""
    if settings.worklist_auth is not WorklistAuth.NONE:
        return None
    exposed = sorted({host for host in hosts if not is_loopback_host(host)})
    if not is_loopback_url(settings.public_url):  # reached from elsewhere (a reverse proxy) even when it listens on loopback
        exposed.append(f"CDS_PUBLIC_URL={settings.public_url}")
    if not exposed:
        return None
    if settings.worklist_open_to_network:
        log.warning("!!! CDS_WORKLIST_OPEN_TO_NETWORK=true with CDS_WORKLIST_AUTH=none: patient data is served WITHOUT "
                    "sign-in to anyone who reaches %s. Development only. !!!", ", ".join(exposed))
        return None
    return (f"CDS_WORKLIST_AUTH=none would serve patient data without sign-in on {', '.join(exposed)}: set "
            "CDS_WORKLIST_AUTH to oidc, proxy-header or bearer (docs/security.md), or listen on 127.0.0.1")


def _proxy_user(settings: Settings) -> str:
    """The user an authenticating proxy names; AccessRefused unless the request came straight from that proxy."""
    peer = peer_address(request.remote_addr)
    if peer is None or not any(peer in network for network in settings.trusted_proxy_networks):
        log.warning("patient data asked for, bypassing the trusted proxy", extra={"peer": request.remote_addr})
        raise AccessRefused(401, "not signed in: this request did not come through the site's sign-in proxy")
    if settings.proxy_secret:
        given = request.headers.get(settings.proxy_secret_header, "")
        if not hmac.compare_digest(given.encode(), settings.proxy_secret.encode()):
            log.warning("a trusted proxy's request lacks the proxy secret", extra={"peer": request.remote_addr})
            raise AccessRefused(401, "not signed in: the sign-in proxy's shared secret is missing or wrong")
    user = request.headers.get(settings.worklist_auth_header, "").strip()
    if not user:
        raise AccessRefused(401, f"not signed in (no {settings.worklist_auth_header} header from the reverse proxy)")
    return user


def identify(settings: Settings) -> Viewer:
    """Who this request is, per CDS_WORKLIST_AUTH; AccessRefused when it may not see patient data."""
    mode = settings.worklist_auth
    if mode is WorklistAuth.NONE:
        if settings.worklist_open_to_network or from_this_machine():
            return Viewer(f"local ({request.remote_addr}, no sign-in)", mode)
        raise AccessRefused(401, "not signed in: without CDS_WORKLIST_AUTH, patient data is shown only to direct calls "
                                 "from this machine")
    if mode is WorklistAuth.PROXY_HEADER:
        return Viewer(_proxy_user(settings), mode)
    if mode is WorklistAuth.BEARER:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        expected = settings.worklist_bearer_token
        if expected and scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode()):
            return Viewer("bearer-token client", mode)
        raise AccessRefused(401, "missing or wrong bearer token")
    sign_in: Any = current_app.extensions["cds_sign_in"]  # mode is OIDC: sign_in.SignIn
    user = sign_in.current_user(active=request.endpoint not in AUTOMATIC_ENDPOINTS)
    if user is None:
        raise AccessRefused(401, "not signed in: sign in at /auth/login", sign_in=True)
    return Viewer(user, mode, can_sign_out=True)
