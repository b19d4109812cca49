"""HTTP triggers and job status: the Subscription endpoint, /jobs, /healthz.

Every trigger ends in `ServiceContext.submit`, so a rest-hook notification and a CDS Hooks
call (cds_hooks/) for the same study become the same job.
"""

from __future__ import annotations

import hmac
import logging

from datetime import datetime, timedelta, timezone
from typing import Any

from flask import Blueprint, jsonify, request

from fhir_mappings.builders import is_fhir_id

from cds_service.web.web_context import ctx, operation_outcome
from cds_service.drift import drift_report
from cds_service.core.errors import TriageError
from cds_service.jobs.state import Job, JobState, TriageRequest
from cds_service.core.errors import QueueUnavailableError
from cds_service.core.model_cards import task_modes
from cds_service.web.ops import operator_refusal
from cds_service.adapters.security import parse_json_body

log = logging.getLogger(__name__)

api = Blueprint("api", __name__)

SUBSCRIPTION_SECRET_HEADER = "X-CDS-Subscription-Secret"


# --- FHIR R4 rest-hook Subscription ---------------------------------------------------------


def _secret_ok() -> bool:
    expected = ctx().settings.subscription_secret
    if not expected:
        return True
    given = request.headers.get(SUBSCRIPTION_SECRET_HEADER, "")
    return hmac.compare_digest(given.encode(), expected.encode())


# One notification normally names one study; a Bundle naming thousands is a mistake or an attack.
MAX_STUDIES_PER_NOTIFICATION = 100


def imaging_study_ids(body: Any, path: str) -> list[str] | None:
    """The ImagingStudy ids a notification names; None for an empty (id-less) notification.

    Servers differ: HAPI PUTs the resource to `<endpoint>/ImagingStudy/<id>`, others POST
    the resource or a Bundle of them, and with an empty payload only the ping arrives.
    """
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "ImagingStudy":
        return [parts[1]]
    if parts:
        raise ValueError(f"notification path names {parts[0]}, not ImagingStudy")
    if body is None:
        return None
    if not isinstance(body, dict):
        raise ValueError("notification body is not a FHIR resource")
    kind = body.get("resourceType")
    if kind == "ImagingStudy":
        if not body.get("id"):
            raise ValueError("notified ImagingStudy has no id")
        return [str(body["id"])]
    if kind == "Bundle":
        entries = body.get("entry") or []
        if not isinstance(entries, list):
            raise ValueError("notification Bundle.entry is not a list")
        ids = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("resource") or {}, dict):
                raise ValueError("notification Bundle.entry holds something that is not an entry with a resource")
            resource = entry.get("resource") or {}
            full_url = entry.get("fullUrl") or ""
            if resource.get("resourceType") == "ImagingStudy" and resource.get("id"):
                ids.append(str(resource["id"]))
            elif isinstance(full_url, str) and "ImagingStudy/" in full_url:
                ids.append(full_url.split("ImagingStudy/")[1].split("/")[0])
        if len(ids) > MAX_STUDIES_PER_NOTIFICATION:
            raise ValueError(f"notification names {len(ids)} ImagingStudies; at most {MAX_STUDIES_PER_NOTIFICATION} "
                             "are taken from one notification (send several)")
        return ids
    raise ValueError(f"expected an ImagingStudy notification, got resourceType {kind!r}")


def checked_ids(ids: list[str] | None) -> list[str] | None:
    """The ids, if each is a valid FHIR id (R4: 1-64 of A-Z a-z 0-9 - .); ValueError otherwise."""
    for resource_id in ids or []:
        if not is_fhir_id(resource_id):
            raise ValueError(f"notified ImagingStudy id is not a valid FHIR id: {resource_id[:80]!r}")
    return ids


def recently_changed_studies() -> list[str]:
    """For an empty notification: the ImagingStudies changed within the look-back window."""
    settings = ctx().settings
    since = datetime.now(timezone.utc) - timedelta(seconds=settings.notification_lookback_s)
    fhir = ctx().fhir()
    try:
        found = fhir.search("ImagingStudy", {"_lastUpdated": f"ge{since.strftime('%Y-%m-%dT%H:%M:%SZ')}", "_count": "100"})
    finally:
        fhir.close()
    return [str(r["id"]) for r in found if r.get("resourceType") == "ImagingStudy" and r.get("id")]


FHIR_MEDIA_TYPES = ("application/fhir+json", "application/json+fhir", "application/fhir+xml", "application/xml+fhir")


def fhir_client_calling() -> bool:
    """Whether the caller asks for FHIR (its Accept names a FHIR media type), as a FHIR server's
    rest-hook client does: HAPI's parses our answer as a FHIR resource and counts anything else as
    a failed delivery, which it retries for a minute."""
    accept = request.headers.get("Accept", "").lower()
    return any(media_type in accept for media_type in FHIR_MEDIA_TYPES)


def notification_answer(jobs: list[Job]) -> Any:
    """200 with the jobs: an OperationOutcome (application/fhir+json) for a FHIR client, one
    information issue per study; `{"jobs": [...]}` (application/json) for anyone else."""
    if not fhir_client_calling():
        return jsonify({"jobs": [job.to_json() for job in jobs]}), 200
    issues = [{"severity": "information", "code": "informational",
               "diagnostics": f"ImagingStudy/{job.imaging_study_id}: triage job {job.id} {job.state.value}"} for job in jobs]
    body = {"resourceType": "OperationOutcome",
            "issue": issues or [{"severity": "information", "code": "informational",
                                 "diagnostics": "no ImagingStudy changed; nothing to triage"}]}
    response = jsonify(body)
    response.mimetype = "application/fhir+json"
    return response, 200


@api.route("/fhir-notify", methods=["POST", "PUT"], defaults={"path": ""})
@api.route("/fhir-notify/<path:path>", methods=["POST", "PUT"])
def fhir_notification(path: str) -> Any:
    """The Subscription channel endpoint: persist a job per study, then answer 200."""
    if not _secret_ok():
        return operation_outcome(401, "missing or wrong subscription secret", "login")
    data = request.get_data()
    try:
        body = parse_json_body(data, ctx().settings.max_json_depth) if data else None
    except ValueError as exc:  # not JSON, not UTF-8, or nested absurdly deep
        return operation_outcome(400, f"notification body: {exc}", "invalid")
    try:
        ids = checked_ids(imaging_study_ids(body, path))
        if ids is None:
            ids = recently_changed_studies()
    except ValueError as exc:
        return operation_outcome(400, str(exc), "invalid")
    except TriageError as exc:
        return operation_outcome(503, f"could not look up changed studies: {exc}", "transient")
    jobs = [ctx().submit(TriageRequest(imaging_study_id=i, source="subscription"))[0] for i in ids]
    return notification_answer(jobs)


@api.delete("/fhir-notify/<path:path>")
def fhir_deletion(path: str) -> Any:
    """A rest-hook's `DELETE {endpoint}/ImagingStudy/<id>` (HAPI sends one for a deleted study when
    the Subscription asks for deletes): acknowledged with an OperationOutcome, nothing to triage.
    A job already queued for the study fails on its own (the study reads as 404/410 Gone)."""
    if not _secret_ok():
        return operation_outcome(401, "missing or wrong subscription secret", "login")
    parts = [p for p in path.split("/") if p]
    if len(parts) != 2 or parts[0] != "ImagingStudy" or not is_fhir_id(parts[1]):
        return operation_outcome(400, "expected DELETE /fhir-notify/ImagingStudy/<id>", "invalid")
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational",
                       "diagnostics": f"ImagingStudy/{parts[1]} deleted: nothing to triage"}]}
    response = jsonify(body)
    response.mimetype = "application/fhir+json"
    return response, 200


# --- Jobs and health ----------------------------------------------------------------------------


@api.get("/jobs")
def list_jobs() -> Any:
    if refused := operator_refusal():
        return refused
    try:
        limit = max(1, min(int(request.args.get("limit", 100)), 1000))
    except ValueError:
        return operation_outcome(400, "limit must be a whole number", "invalid")
    if request.args.get("status") and request.args["status"] not in {s.value for s in JobState}:
        return operation_outcome(400, f"unknown status; one of {', '.join(s.value for s in JobState)}", "invalid")
    jobs = ctx().store.list(imaging_study_id=request.args.get("imagingStudy"), state=request.args.get("status"), limit=limit)
    return jsonify({"jobs": [job.to_json() for job in jobs]})


@api.get("/jobs/<job_id>")
def get_job(job_id: str) -> Any:
    if refused := operator_refusal():
        return refused
    job = ctx().store.get(job_id)
    if job is None:
        return operation_outcome(404, f"no job {job_id}", "not-found")
    return jsonify(job.to_json())


@api.post("/jobs/<job_id>/requeue")
def requeue_job(job_id: str) -> Any:
    """An operator re-runs a job (a failed one with fresh attempts); 409 while a live worker runs it."""
    if refused := operator_refusal():
        return refused
    job = ctx().store.get(job_id)
    if job is None:
        return operation_outcome(404, f"no job {job_id}", "not-found")
    job = ctx().store.requeue(job_id)
    if job is not None and job.state is JobState.RUNNING:
        return operation_outcome(409, "a live worker runs this job; it is re-queued by itself if that worker stops", "conflict")
    ctx().enqueue(job_id)
    return jsonify(job.to_json() if job else {}), 202


@api.get("/healthz")
def healthz() -> Any:
    """The process is up (always 200), the models and modes, and each task's drift window (drift.py)."""
    settings = ctx().settings
    try:
        drift: dict[str, Any] = {task.value: d.to_json() for task, d in drift_report(ctx().store, settings).items()}
    except QueueUnavailableError:
        drift = {"error": "job store unavailable"}
    return jsonify({"status": "ok", "models": ctx().model_set,
                    "modes": task_modes(settings.task_modes, settings.weights_dir), "drift": drift,
                    # CDS_SITE_THRESHOLDS: the site's own thresholds and whether each task uses them
                    "siteThresholds": settings.site_thresholds.to_health() if settings.site_thresholds else None})
