"""The four CDS services: where their data comes from (prefetch, else the client's FHIR server,
else 412), their handlers (each returns cards and systemActions) and the registry SERVICES."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

from flask import g

from fhir_mappings.builders import reference_id, with_priority
from fhir_mappings.conventions import Conventions

from cds_service.adapters.fhir_client import FhirClient
from fhir_mappings.ai_reports import ai_report_from_job, ai_reports_from_fhir
from cds_service.web.cds_hooks.cards import DISCLAIMER, is_imaging_order, no_result_card, pending_card, priority_action, report_card, severity, unread_critical_card
from cds_service.core.domain import Priority, TaskMode
from cds_service.core.errors import TriageError, UpstreamRejectedError
from cds_service.core.priority import parse_priority, raised_priority
from cds_service.core.settings import Settings
from cds_service.jobs.state import Job, JobState, TriageRequest
from cds_service.web.cds_hooks.calls import (HookCall, HookCallError, HookService, allowed_fhir_server, context_fhir_id, render_query,
                                             resources_of)
from cds_service.web.web_context import ctx

log = logging.getLogger(__name__)

MAX_CARDS = 5
#: Reads from the client's FHIR server must leave the hook time to answer (target: under 500 ms).
HOOK_FHIR_TIMEOUT_S = 3.0

AI_REPORTS_KEY = "aiReports"
#: Where a prefetch template names our result identifier system (under CDS_FHIR_CANONICAL_BASE): filled in by
#: `site_prefetch` for discovery and for our own reads.
RESULT_SYSTEM_SLOT = "{resultIdentifierSystem}"
#: Our AI reports of the patient with their Observations; one page, newest first.
AI_REPORTS_QUERY = (f"DiagnosticReport?patient={{{{context.patientId}}}}&identifier={RESULT_SYSTEM_SLOT}|"
                    "&_include=DiagnosticReport:result&_sort=-issued&_count=20")


def site_prefetch(template: str, settings: Settings) -> str:
    """A prefetch template with this site's result identifier system filled in."""
    return template.replace(RESULT_SYSTEM_SLOT, Conventions.from_settings(settings).result_identifier_system)


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
    study_id = context_fhir_id(call.context.get("imagingStudyId"), "imagingStudyId", "ImagingStudy")
    order = call.context.get("serviceRequestId")
    order_id = context_fhir_id(order, "serviceRequestId", "ServiceRequest") if order is not None else None
    try:
        job, _ = ctx().submit(TriageRequest(imaging_study_id=study_id, source="cds-hooks", service_request_id=order_id))
    except ValueError as exc:
        raise HookCallError(400, str(exc)) from None
    if job.state is JobState.DONE:
        if not study_of_patient(call, study_id):
            return [no_result_card("the study's patient could not be confirmed as the patient in context; the "
                                   "result is on the worklist", settings.public_url)], []
        report = ai_report_from_job(job.result, study_id)
        return ([report_card(report, settings.priority_rules, settings.public_url, Conventions.from_settings(settings),
                             settings.viewer_url)],
                priority_system_actions(call, job, settings))
    if job.state in (JobState.NOT_APPLICABLE, JobState.MODEL_UNAVAILABLE):
        return [no_result_card(job.reason or job.state.value, settings.public_url, Conventions.from_settings(settings))], []
    return [pending_card(job.id, job.state.value, settings.public_url, Conventions.from_settings(settings))], []


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
    updated = with_priority(order, new, note=f"Priority raised to {new.value} by AI triage. {DISCLAIMER}",
                            conventions=Conventions.from_settings(settings))
    return [priority_action(order, updated, new)]


def patient_view(call: HookCall, settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One card per AI result of this patient, newest first (at most MAX_CARDS)."""
    conventions = Conventions.from_settings(settings)
    resources, _ = hook_data(call, AI_REPORTS_KEY, site_prefetch(AI_REPORTS_QUERY, settings))
    reports = ai_reports_from_fhir(resources, call.patient_id, conventions)[:MAX_CARDS]
    return [report_card(r, settings.priority_rules, settings.public_url, conventions, settings.viewer_url) for r in reports], []


def imaging_order_check(call: HookCall, settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """order-select / order-sign: warn when imaging is ordered while a critical AI finding awaits its read."""
    orders = [r for r in resources_of(call.context.get("draftOrders")) if r.get("resourceType") == "ServiceRequest"]
    if call.hook == "order-select":
        selected = {str(s) for s in call.context.get("selections") or []}
        orders = [o for o in orders if f"ServiceRequest/{o.get('id')}" in selected]
    if not any(is_imaging_order(o) for o in orders):
        return [], []
    conventions = Conventions.from_settings(settings)
    resources, _ = hook_data(call, AI_REPORTS_KEY, site_prefetch(AI_REPORTS_QUERY, settings))
    critical = [r for r in ai_reports_from_fhir(resources, call.patient_id, conventions)
                if r.unread and severity(r, settings.priority_rules) is Priority.STAT]
    return [unread_critical_card(r, settings.priority_rules, settings.public_url, conventions, settings.viewer_url)
            for r in critical[:MAX_CARDS]], []


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
