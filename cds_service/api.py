"""HTTP triggers and job status: the Subscription endpoint, the CDS hook, /jobs, /healthz.

Every trigger ends in `ServiceContext.submit`, so a rest-hook notification and a CDS Hooks
call for the same study become the same job.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from flask import Blueprint, jsonify, request

from .app import ctx, operation_outcome
from .errors import TriageError
from .jobs import Job, TriageRequest

log = logging.getLogger(__name__)

api = Blueprint("api", __name__)

SUBSCRIPTION_SECRET_HEADER = "X-CDS-Subscription-Secret"
IMAGINGSTUDY_CREATE = "imagingstudy-create"


# --- FHIR R4 rest-hook Subscription ---------------------------------------------------------


def _secret_ok() -> bool:
    expected = ctx().settings.subscription_secret
    if not expected:
        return True
    given = request.headers.get(SUBSCRIPTION_SECRET_HEADER, "")
    return hmac.compare_digest(given.encode(), expected.encode())


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
        ids = []
        for entry in body.get("entry") or []:
            resource = entry.get("resource") or {}
            if resource.get("resourceType") == "ImagingStudy" and resource.get("id"):
                ids.append(str(resource["id"]))
            elif "ImagingStudy/" in (entry.get("fullUrl") or ""):
                ids.append(entry["fullUrl"].split("ImagingStudy/")[1].split("/")[0])
        return ids
    raise ValueError(f"expected an ImagingStudy notification, got resourceType {kind!r}")


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


@api.route("/fhir-notify", methods=["POST", "PUT"], defaults={"path": ""})
@api.route("/fhir-notify/<path:path>", methods=["POST", "PUT"])
def fhir_notification(path: str) -> Any:
    """The Subscription channel endpoint: persist a job per study, then answer 200."""
    if not _secret_ok():
        return operation_outcome(401, "missing or wrong subscription secret", "login")
    body = request.get_json(silent=True, force=True) if request.get_data() else None
    if request.get_data() and body is None:
        return operation_outcome(400, "notification body is not valid JSON", "invalid")
    try:
        ids = imaging_study_ids(body, path)
        if ids is None:
            ids = recently_changed_studies()
    except ValueError as exc:
        return operation_outcome(400, str(exc), "invalid")
    except TriageError as exc:
        return operation_outcome(503, f"could not look up changed studies: {exc}", "transient")
    jobs = [ctx().submit(TriageRequest(imaging_study_id=i, source="subscription"))[0] for i in ids]
    return jsonify({"jobs": [job.to_json() for job in jobs]}), 200


# --- CDS Hooks (the imagingstudy-create service; discovery lists it) -------------------------


def _card(summary: str, detail: str, indicator: str = "info") -> dict[str, Any]:
    return {
        "uuid": str(uuid.uuid4()),
        "summary": summary[:139],
        "detail": detail,
        "indicator": indicator,
        "source": {"label": "AI radiology triage", "url": ctx().settings.public_url + "/worklist"},
    }


@api.get("/cds-services")
def discovery() -> Any:
    return jsonify({
        "services": [{
            "hook": IMAGINGSTUDY_CREATE,
            "id": IMAGINGSTUDY_CREATE,
            "title": "AI radiology triage",
            "description": "Queues AI triage of a new imaging study; raises the order's priority for critical findings.",
            "prefetch": {"imagingStudy": "ImagingStudy/{{context.imagingStudyId}}"},
            "usageRequirements": "Requires the study's images in the configured DICOMweb PACS.",
        }]
    })


@api.post(f"/cds-services/{IMAGINGSTUDY_CREATE}")
def imagingstudy_create() -> Any:
    """Queue triage and answer at once with an 'analysis pending' card (hooks never wait)."""
    call = request.get_json(silent=True)
    if not isinstance(call, dict):
        return operation_outcome(400, "CDS Hooks request body must be a JSON object", "invalid")
    if call.get("hook") != IMAGINGSTUDY_CREATE:
        return operation_outcome(400, f"this service handles hook {IMAGINGSTUDY_CREATE!r}, got {call.get('hook')!r}", "invalid")
    context = call.get("context")
    if not isinstance(context, dict) or not isinstance(context.get("imagingStudyId"), str) \
            or not isinstance(context.get("patientId"), str):
        return operation_outcome(400, "context needs string patientId and imagingStudyId", "invalid")
    service_request_id = context.get("serviceRequestId")
    try:
        job, _ = ctx().submit(TriageRequest(
            imaging_study_id=context["imagingStudyId"].removeprefix("ImagingStudy/"),
            source="cds-hooks",
            service_request_id=service_request_id.removeprefix("ServiceRequest/") if isinstance(service_request_id, str) else None,
        ))
    except ValueError as exc:
        return operation_outcome(400, str(exc), "invalid")
    card = _card("AI triage: analysis pending",
                 f"The study was queued for AI triage (job `{job.id}`, status {job.state.value}). "
                 "Findings will appear on the worklist. *AI-generated, preliminary.*")
    return jsonify({"cards": [card]})


# --- Jobs and health ----------------------------------------------------------------------------


def _job_or_404(job_id: str) -> Job | None:
    return ctx().store.get(job_id)


@api.get("/jobs")
def list_jobs() -> Any:
    limit = min(int(request.args.get("limit", 100)), 1000)
    jobs = ctx().store.list(imaging_study_id=request.args.get("imagingStudy"), state=request.args.get("status"), limit=limit)
    return jsonify({"jobs": [job.to_json() for job in jobs]})


@api.get("/jobs/<job_id>")
def get_job(job_id: str) -> Any:
    job = _job_or_404(job_id)
    if job is None:
        return operation_outcome(404, f"no job {job_id}", "not-found")
    return jsonify(job.to_json())


@api.post("/jobs/<job_id>/requeue")
def requeue_job(job_id: str) -> Any:
    job = _job_or_404(job_id)
    if job is None:
        return operation_outcome(404, f"no job {job_id}", "not-found")
    job = ctx().store.requeue(job_id)
    ctx().enqueue(job_id)
    return jsonify(job.to_json() if job else {}), 202


@api.get("/healthz")
def healthz() -> Any:
    return jsonify({"status": "ok", "models": ctx().model_set})
