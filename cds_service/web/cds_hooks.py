# Over 400 lines, to split next (issue #19): the service registry, request parsing, FHIR access, four handlers and routes.
"""CDS Hooks 2.0: discovery, four services and feedback, behind the JWT check of security.py.

| service | hook | answers with |
|---|---|---|
| `imagingstudy-create` | imagingstudy-create | queues triage; an "analysis pending" card at once (never waits for inference), or the result card when the job already finished |
| `patient-view` | patient-view | one card per AI result of this patient from the FHIR server, newest first |
| `order-select`, `order-sign` | order-select / order-sign | a critical card when an imaging order is drafted for a patient with an unread critical AI finding |

Data: prefetched resources when the client sent them; otherwise we read them from the
client's `fhirServer` with its `fhirAuthorization` token (never with our own system
credentials: the clinician's access rules must apply); with neither we answer 412.
Every call is checked (JWT, rate limit, JSON depth) in `guard_hook_call` before a handler runs,
and recorded in the audit log (audit.py) with the cards we returned.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Mapping
from urllib.parse import parse_qsl, quote

from flask import Blueprint, Flask, current_app, g, jsonify, request

from fhir_mappings import codes
from fhir_mappings.builders import is_fhir_id, reference_id, with_priority

from cds_service.web.web_context import ctx, operation_outcome
from cds_service.adapters.audit import AuditLog, Feedback
from cds_service.core.cards import (
                    DISCLAIMER,
                    ai_report_from_job,
                    ai_reports_from_fhir,
                    is_imaging_order,
                    no_result_card,
                    pending_card,
                    priority_action,
                    report_card,
                    severity,
                    unread_critical_card,
                )
from cds_service.core.domain import Priority, TaskMode
from cds_service.core.errors import TriageError, UpstreamRejectedError
from cds_service.adapters.fhir_client import FhirClient
from cds_service.jobs.state import Job, JobState, TriageRequest
from cds_service.logs import hashed
from cds_service.core.priority import parse_priority, raised_priority
from cds_service.adapters.security import (
                        HookAuthError,
                        HookClient,
                        HookRateLimiter,
                        KeysUnavailableError,
                        TokenVerifier,
                        build_verifier,
                        enable_cors,
                        hooks_auth_enabled,
                        is_loopback_url,
                        parse_json_body,
                        split_list,
                    )
from cds_service.core.settings import Settings

log = logging.getLogger(__name__)

cds_hooks = Blueprint("cds_hooks", __name__)

MAX_CARDS = 5
#: Reads from the client's FHIR server must leave the hook time to answer (target: under 500 ms).
HOOK_FHIR_TIMEOUT_S = 3.0
_TOKEN = re.compile(r"\{\{context\.([A-Za-z0-9_]+)\}\}")

AI_REPORTS_KEY = "aiReports"
#: Our AI reports of the patient with their Observations; one page, newest first.
AI_REPORTS_QUERY = (f"DiagnosticReport?patient={{{{context.patientId}}}}&identifier={codes.RESULT_IDENTIFIER_SYSTEM}|"
                    "&_include=DiagnosticReport:result&_sort=-issued&_count=20")


class HookCallError(Exception):
    """A request we cannot serve, with the HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- the services -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HookCall:
    """A validated CDS Hooks request."""

    hook: str
    hook_instance: str
    context: Mapping[str, Any]
    prefetch: Mapping[str, Any] = field(default_factory=dict)
    fhir_server: str | None = None
    fhir_token: str | None = None

    @property
    def patient_id(self) -> str:
        return str(self.context.get("patientId", ""))


@dataclass(frozen=True)
class HookService:
    id: str
    hook: str
    title: str
    description: str
    usage_requirements: str
    prefetch: Mapping[str, str]
    context_types: Mapping[str, type]  # the context fields we require, and their JSON type
    handler: Callable[[HookCall, Settings], tuple[list[dict[str, Any]], list[dict[str, Any]]]]

    def discovery_entry(self) -> dict[str, Any]:
        return {"hook": self.hook, "id": self.id, "title": self.title, "description": self.description,
                "prefetch": dict(self.prefetch), "usageRequirements": self.usage_requirements}


def discovery_document(services: Mapping[str, HookService]) -> dict[str, Any]:
    return {"services": [s.discovery_entry() for s in services.values()]}


# --- parsing a request (pure) -----------------------------------------------------------------


def _fhir_id(value: Any, name: str, resource_type: str) -> str:
    text = value.removeprefix(f"{resource_type}/") if isinstance(value, str) else value
    if not is_fhir_id(text):
        raise HookCallError(400, f"context.{name} must be a FHIR id of a {resource_type}")
    return text


def _check_fhir_server(url: Any) -> str:
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise HookCallError(400, "fhirServer must be an http(s) URL")
    if url.startswith("http://") and not is_loopback_url(url):
        raise HookCallError(400, "fhirServer must use https (CDS Hooks requires it for patient data)")
    return url.rstrip("/")


def allowed_fhir_server(url: str | None, issuer: str, settings: Settings) -> str | None:
    """`url` if this issuer's calls may make us call it (CDS_HOOKS_FHIR_SERVERS), else None.

    A hook's fhirServer is where we send the EHR's token and from where we show data: an
    unlisted one (an internal address, another hospital's server) is never called. Loopback
    needs CDS_HOOKS_ALLOW_LOOPBACK_FHIR as well (development only).
    """
    if url is None:
        return None
    for entry in (part.strip() for part in settings.cds_hooks_fhir_servers.split(",")):
        who, sep, listed = entry.rpartition("|") if "|" in entry else ("", "", entry)
        if listed.rstrip("/") == url and (not sep or who == issuer):
            if is_loopback_url(url) and not settings.cds_hooks_allow_loopback_fhir:
                return None
            return url
    return None


def parse_hook_call(body: Any, service: HookService) -> HookCall:
    """Validate the request envelope and the context this service needs; HookCallError(400) otherwise."""
    if not isinstance(body, dict):
        raise HookCallError(400, "CDS Hooks request body must be a JSON object")
    if body.get("hook") != service.hook:
        raise HookCallError(400, f"service {service.id!r} handles hook {service.hook!r}, got {body.get('hook')!r}")
    try:
        hook_instance = str(uuid.UUID(str(body.get("hookInstance"))))
    except ValueError:
        raise HookCallError(400, "hookInstance must be a UUID") from None
    context = body.get("context")
    if not isinstance(context, dict):
        raise HookCallError(400, "context must be a JSON object")
    for name, kind in service.context_types.items():
        if not isinstance(context.get(name), kind):
            raise HookCallError(400, f"context.{name} is required ({kind.__name__})")
    context = dict(context)
    context["patientId"] = _fhir_id(context.get("patientId"), "patientId", "Patient")
    prefetch = body.get("prefetch", {})
    if not isinstance(prefetch, dict):
        raise HookCallError(400, "prefetch must be a JSON object")
    fhir_server = _check_fhir_server(body["fhirServer"]) if body.get("fhirServer") is not None else None
    token = None
    authorization = body.get("fhirAuthorization")
    if authorization is not None:
        if not isinstance(authorization, dict) or not isinstance(authorization.get("access_token"), str) \
                or not authorization["access_token"] or str(authorization.get("token_type", "")).lower() != "bearer":
            raise HookCallError(400, "fhirAuthorization needs an access_token with token_type Bearer")
        if fhir_server is None:
            raise HookCallError(400, "fhirAuthorization was given without fhirServer")
        token = authorization["access_token"]
    return HookCall(hook=service.hook, hook_instance=hook_instance, context=context, prefetch=prefetch,
                    fhir_server=fhir_server, fhir_token=token)


def render_query(template: str, context: Mapping[str, Any]) -> str:
    """A prefetch template with its {{context.x}} tokens filled in (URL-quoted)."""
    def value(match: re.Match[str]) -> str:
        found = context.get(match.group(1))
        if not isinstance(found, (str, int, float)) or isinstance(found, bool):
            raise HookCallError(400, f"context.{match.group(1)} is needed for this service's data")
        return quote(str(found), safe="")
    return _TOKEN.sub(value, template)


def resources_of(value: Any) -> list[dict[str, Any]]:
    """A prefetched or fetched value as a list of resources (a searchset Bundle or a single resource)."""
    if not isinstance(value, dict):
        return []
    if value.get("resourceType") == "Bundle":
        return [e["resource"] for e in value.get("entry") or [] if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
    return [value]


# --- data: prefetch, else the client's FHIR server, else 412 ---------------------------------


def hook_data(call: HookCall, key: str, query: str) -> tuple[list[dict[str, Any]], str]:
    """The resources for one prefetch key, and where they came from ('prefetch' or 'fhir')."""
    value = call.prefetch.get(key)
    if isinstance(value, dict) and value.get("resourceType") != "OperationOutcome":
        return resources_of(value), "prefetch"
    if not (call.fhir_server and call.fhir_token):
        raise HookCallError(412, f"prefetch {key!r} is missing or null and no fhirServer with fhirAuthorization was given")
    server = allowed_fhir_server(call.fhir_server, g.hook_client.issuer, ctx().settings)
    if server is None:
        raise HookCallError(412, f"prefetch {key!r} is missing or null and this fhirServer is not allow-listed for "
                                 "this client (CDS_HOOKS_FHIR_SERVERS)")
    path, _, params = render_query(query, call.context).partition("?")
    client = FhirClient(server, timeout_s=HOOK_FHIR_TIMEOUT_S, bearer_token=call.fhir_token)
    try:
        if "/" in path:  # a read: Type/id
            resource_type, _, resource_id = path.partition("/")
            return [client.read(resource_type, resource_id)[0]], "fhir"
        return client.search(path, dict(parse_qsl(params)), max_pages=1), "fhir"
    except UpstreamRejectedError as exc:  # its body stays in our log, never in our answer
        log.info("fhirServer refused a hook read", extra={"key": key, "status": exc.status_code, "detail": str(exc)[:300]})
        raise HookCallError(412, f"could not read {key!r} from fhirServer (it answered HTTP {exc.status_code})") from None
    except TriageError as exc:
        log.info("fhirServer unreachable for a hook read", extra={"key": key, "detail": str(exc)[:300]})
        raise HookCallError(412, f"could not read {key!r} from fhirServer ({type(exc).__name__})") from None
    finally:
        client.close()


# --- handlers (each returns cards and systemActions) ------------------------------------------


def imagingstudy_create(call: HookCall, settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Queue triage (the same job a Subscription notification makes) and answer at once."""
    study_id = _fhir_id(call.context.get("imagingStudyId"), "imagingStudyId", "ImagingStudy")
    order = call.context.get("serviceRequestId")
    order_id = _fhir_id(order, "serviceRequestId", "ServiceRequest") if order is not None else None
    try:
        job, _ = ctx().submit(TriageRequest(imaging_study_id=study_id, source="cds-hooks", service_request_id=order_id))
    except ValueError as exc:
        raise HookCallError(400, str(exc)) from None
    if job.state is JobState.DONE:
        if not study_of_patient(call, study_id):
            return [no_result_card("the study's patient could not be confirmed as the patient in context; the "
                                   "result is on the worklist", settings.public_url)], []
        report = ai_report_from_job(job.result, study_id)
        return [report_card(report, settings.priority_rules, settings.public_url)], priority_system_actions(call, job, settings)
    if job.state in (JobState.NOT_APPLICABLE, JobState.MODEL_UNAVAILABLE):
        return [no_result_card(job.reason or job.state.value, settings.public_url)], []
    return [pending_card(job.id, job.state.value, settings.public_url)], []


def study_of_patient(call: HookCall, study_id: str) -> bool:
    """Whether the EHR says this ImagingStudy is the context patient's (prefetch or fhirServer).

    Findings are shown only then: a call with patient A in context and patient B's study id must
    not show B's result. When the EHR gives no way to check, nothing is shown either.
    """
    try:
        found, _ = hook_data(call, "imagingStudy", f"ImagingStudy/{study_id}")
    except HookCallError:
        return False
    study = next((r for r in found if r.get("resourceType") == "ImagingStudy" and r.get("id") == study_id), None)
    subject = (study or {}).get("subject") or {}
    return isinstance(subject, dict) and reference_id(subject.get("reference"), "Patient") == call.patient_id


def priority_system_actions(call: HookCall, job: Job, settings: Settings) -> list[dict[str, Any]]:
    """With CDS_HOOKS_SYSTEM_ACTIONS=on: the order's raised priority as a systemAction (never lowers it)."""
    suggested = parse_priority(job.result.get("suggestedPriority"))
    order_id = job.service_request_id
    if not settings.cds_hooks_system_actions or suggested is None or not order_id:
        return []
    if job.result.get("mode") == TaskMode.SHADOW.value:
        return []  # a task in shadow mode never changes a priority, here neither
    try:
        found, _ = hook_data(call, "serviceRequest", f"ServiceRequest/{order_id}")
    except HookCallError:
        return []  # the card still goes out; the worker raises the priority itself where it may write
    order = next((r for r in found if r.get("resourceType") == "ServiceRequest" and r.get("id") == order_id), None)
    new = raised_priority(parse_priority(order.get("priority")), suggested) if order else None
    if order is None or new is None:
        return []
    updated = with_priority(order, new, note=f"Priority raised to {new.value} by AI triage. {DISCLAIMER}")
    return [priority_action(order, updated, new)]


def patient_view(call: HookCall, settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One card per AI result of this patient, newest first (at most MAX_CARDS)."""
    resources, _ = hook_data(call, AI_REPORTS_KEY, AI_REPORTS_QUERY)
    reports = ai_reports_from_fhir(resources, call.patient_id)[:MAX_CARDS]
    return [report_card(r, settings.priority_rules, settings.public_url) for r in reports], []


def imaging_order_check(call: HookCall, settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """order-select / order-sign: warn when imaging is ordered while a critical AI finding awaits its read."""
    orders = [r for r in resources_of(call.context.get("draftOrders")) if r.get("resourceType") == "ServiceRequest"]
    if call.hook == "order-select":
        selected = {str(s) for s in call.context.get("selections") or []}
        orders = [o for o in orders if f"ServiceRequest/{o.get('id')}" in selected]
    if not any(is_imaging_order(o) for o in orders):
        return [], []
    resources, _ = hook_data(call, AI_REPORTS_KEY, AI_REPORTS_QUERY)
    critical = [r for r in ai_reports_from_fhir(resources, call.patient_id)
                if r.unread and severity(r, settings.priority_rules) is Priority.STAT]
    return [unread_critical_card(r, settings.priority_rules, settings.public_url) for r in critical[:MAX_CARDS]], []


_AI_PREFETCH = {AI_REPORTS_KEY: AI_REPORTS_QUERY}

SERVICES: dict[str, HookService] = {s.id: s for s in (
    HookService(
        id="imagingstudy-create", hook="imagingstudy-create", title="AI radiology triage",
        description="Queues AI triage of a new imaging study (head CT hemorrhage, brain MR tumour, chest X-ray "
                    "pneumothorax) and raises the order's priority for critical findings. Answers at once.",
        usage_requirements="Context: patientId, imagingStudyId, optional serviceRequestId. The study's images must be "
                           "in the configured DICOMweb PACS. " + DISCLAIMER,
        prefetch={"serviceRequest": "ServiceRequest/{{context.serviceRequestId}}",
                  "imagingStudy": "ImagingStudy/{{context.imagingStudyId}}"},
        context_types={"patientId": str, "imagingStudyId": str}, handler=imagingstudy_create),
    HookService(
        id="patient-view", hook="patient-view", title="AI radiology triage findings",
        description="Shows this patient's AI triage findings from the FHIR server, newest first, with the heatmap.",
        usage_requirements="Needs the aiReports prefetch, or fhirServer with fhirAuthorization allowing DiagnosticReport "
                           "and Observation reads. " + DISCLAIMER,
        prefetch=_AI_PREFETCH, context_types={"patientId": str}, handler=patient_view),
    HookService(
        id="order-select", hook="order-select", title="Unread critical AI finding (imaging order)",
        description="When an imaging order is selected, warns if the patient has a critical AI finding no radiologist "
                    "has read yet.",
        usage_requirements="Context: patientId, selections, draftOrders (Bundle of ServiceRequest with an imaging "
                           "category). Same data as patient-view. " + DISCLAIMER,
        prefetch=_AI_PREFETCH, context_types={"patientId": str, "selections": list, "draftOrders": dict},
        handler=imaging_order_check),
    HookService(
        id="order-sign", hook="order-sign", title="Unread critical AI finding (imaging order)",
        description="When an imaging order is signed, warns if the patient has a critical AI finding no radiologist "
                    "has read yet.",
        usage_requirements="Context: patientId, draftOrders (Bundle of ServiceRequest with an imaging category). Same "
                           "data as patient-view. " + DISCLAIMER,
        prefetch=_AI_PREFETCH, context_types={"patientId": str, "draftOrders": dict}, handler=imaging_order_check),
)}


# --- feedback (pure parsing) ------------------------------------------------------------------


def parse_feedback(body: Any) -> list[Feedback]:
    """The `feedback` array of a CDS Hooks 2.0 feedback request; HookCallError(400) when malformed."""
    items = body.get("feedback") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise HookCallError(400, "feedback request needs a non-empty 'feedback' array")
    parsed = []
    for n, item in enumerate(items):
        where = f"feedback[{n}]"
        if not isinstance(item, dict) or not isinstance(item.get("card"), str) or not item["card"]:
            raise HookCallError(400, f"{where}.card (the card uuid) is required")
        outcome = item.get("outcome")
        if outcome not in ("accepted", "overridden"):
            raise HookCallError(400, f"{where}.outcome must be 'accepted' or 'overridden'")
        stamp = item.get("outcomeTimestamp")
        try:
            datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        except ValueError:
            raise HookCallError(400, f"{where}.outcomeTimestamp must be an ISO 8601 timestamp") from None
        accepted = item.get("acceptedSuggestions")
        if outcome == "accepted":
            if not isinstance(accepted, list) or not accepted or not all(isinstance(a, dict) and isinstance(a.get("id"), str) for a in accepted):
                raise HookCallError(400, f"{where}.acceptedSuggestions (objects with id) is required when accepted")
        reason = item.get("overrideReason")
        if reason is not None:
            coding = reason.get("reason") if isinstance(reason, dict) else None
            if not isinstance(reason, dict) or (coding is not None and not (
                    isinstance(coding, dict) and isinstance(coding.get("code"), str) and isinstance(coding.get("system"), str))):
                raise HookCallError(400, f"{where}.overrideReason.reason must be a Coding with system and code")
        parsed.append(Feedback(card=item["card"], outcome=outcome, outcome_timestamp=str(stamp),
                               accepted_suggestions=tuple(a["id"] for a in accepted or [] if outcome == "accepted"),
                               override_reason=reason))
    return parsed


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
    return jsonify(discovery_document(SERVICES))


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
