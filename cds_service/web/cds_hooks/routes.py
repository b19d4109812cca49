"""The HTTP shell of the CDS Hooks: the guard every call passes (JWT, rate limit, JSON depth),
discovery, the service and feedback routes, and `register_cds_hooks`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, current_app, g, jsonify, request

from cds_service.adapters.audit import AuditLog
from cds_service.adapters.security import (HookAuthError, HookClient, HookRateLimiter, KeysUnavailableError, TokenVerifier,
                                           build_verifier, enable_cors, hooks_auth_enabled, parse_json_body, split_list)
from cds_service.core.settings import Settings
from cds_service.logs import hashed
from cds_service.web.cds_hooks.calls import HookCallError, discovery_document, parse_feedback, parse_hook_call
from cds_service.web.cds_hooks.services import SERVICES, site_prefetch
from cds_service.web.web_context import access_log, ctx, operation_outcome

log = logging.getLogger(__name__)

cds_hooks = Blueprint("cds_hooks", __name__)


# --- the HTTP shell ---------------------------------------------------------------------------


@dataclass
class HookGuard:
    """Per-process state of the hooks: the JWT verifier (None when CDS_HOOKS_AUTH=off), limits, audit."""

    verifier: TokenVerifier | None
    limiter: HookRateLimiter
    audit: AuditLog
    max_json_depth: int


def guard() -> HookGuard:
    return current_app.extensions["cds_hooks_guard"]


def _audiences() -> list[str]:
    """The `aud` values a token may carry here: this endpoint's URL (feedback: the service URL too)."""
    base = ctx().settings.public_url.rstrip("/")
    path = request.path.rstrip("/")
    audiences = [base + path]
    if path.endswith("/feedback"):
        audiences.append(base + path.removesuffix("/feedback"))
    return audiences


@cds_hooks.before_request
def guard_hook_call() -> Any:
    """JWT, then rate limit per client, then the JSON body with its depth limit; handlers see g.hook_client, g.hook_body."""
    if request.method == "OPTIONS":
        return None  # a CORS preflight carries no credentials; flask-cors answers it
    state = guard()
    if state.verifier is None:
        client = HookClient(issuer="unauthenticated (CDS_HOOKS_AUTH=off)", tenant=None, key_id="")
    else:
        try:
            client = state.verifier.verify(request.headers.get("Authorization"), _audiences())
        except HookAuthError as exc:
            log.warning("cds hook call refused", extra={"status": exc.status, "reason": exc.message, "path": request.path})
            response, status = operation_outcome(exc.status, exc.message, "login" if exc.status == 401 else "forbidden")
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = exc.www_authenticate
            return response, status
        except KeysUnavailableError as exc:
            return operation_outcome(503, str(exc), "transient")
    allowed, retry_after = state.limiter.allow(client.rate_key)
    if not allowed:
        response, status = operation_outcome(429, f"too many CDS Hooks calls from {client.issuer}; retry in {retry_after} s", "throttled")
        response.headers["Retry-After"] = str(retry_after)
        return response, status
    g.hook_client = client
    if request.method == "POST":
        try:
            g.hook_body = parse_json_body(request.get_data(cache=True), state.max_json_depth)
        except ValueError as exc:
            return operation_outcome(400, str(exc), "invalid")
    return None


@cds_hooks.get("/cds-services")
def discovery() -> Any:
    return jsonify(discovery_document(SERVICES, lambda query: site_prefetch(query, ctx().settings)))


@cds_hooks.post("/cds-services/<service_id>")
def call_service(service_id: str) -> Any:
    service = SERVICES.get(service_id)
    if service is None:
        return operation_outcome(404, f"no CDS service {service_id!r}; see GET /cds-services", "not-found")
    started = time.perf_counter()
    try:
        call = parse_hook_call(g.hook_body, service)
        cards, actions = service.handler(call, ctx().settings)
    except HookCallError as exc:
        log.info("cds hook call not served", extra={"service": service_id, "status": exc.status, "reason": exc.message})
        return operation_outcome(exc.status, exc.message, "invalid" if exc.status == 400 else "incomplete")
    body: dict[str, Any] = {"cards": cards}
    if actions:
        body["systemActions"] = actions
    elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
    guard().audit.record_hook_call(service.id, g.hook_client.audit_name, call.hook_instance, hashed(call.patient_id),
                                   cards, {"ms": elapsed_ms, "indicators": [c["indicator"] for c in cards],
                                           "systemActions": len(actions)})
    if cards and call.patient_id:  # the access log of patient data: the EHR user it was shown to, through which client
        user = call.context.get("userId")
        access_log().viewed(g.hook_client.audit_name + (f" for {user}" if isinstance(user, str) and user else ""),
                            f"cds-card:{service.id}", call.patient_id, cards=len(cards), hookInstance=call.hook_instance)
    return jsonify(body)


@cds_hooks.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str) -> Any:
    if service_id not in SERVICES:
        return operation_outcome(404, f"no CDS service {service_id!r}", "not-found")
    try:
        items = parse_feedback(g.hook_body)
    except HookCallError as exc:
        return operation_outcome(exc.status, exc.message, "invalid")
    audit = guard().audit
    unknown = sorted({i.card for i in items} - audit.issued_cards(service_id, [i.card for i in items]))
    if unknown:
        return operation_outcome(400, f"card(s) {', '.join(unknown)} were not issued by service {service_id!r}", "invalid")
    stored = audit.store_feedback(service_id, g.hook_client.audit_name, items)
    return jsonify({"feedback": [{"card": i.card, "outcome": i.outcome, "status": "stored" if new else "already-stored"}
                                 for i, new in zip(items, stored)]})


def register_cds_hooks(app: Flask, settings: Settings) -> None:
    """Mount the hooks with their security; refuses to start with an unsafe CDS_HOOKS_AUTH."""
    audit_db = settings.data_dir / "audit.sqlite3"
    verifier = build_verifier(settings, audit_db) if hooks_auth_enabled(settings) else None
    app.extensions["cds_hooks_guard"] = HookGuard(
        verifier=verifier, limiter=HookRateLimiter(settings.cds_hooks_rate_limit, settings.rate_limit_storage_url),
        audit=AuditLog(audit_db), max_json_depth=settings.max_json_depth)
    enable_cors(app, split_list(settings.cds_hooks_cors_origins))
    app.register_blueprint(cds_hooks)
