"""The radiologist's worklist: imaging orders, most dangerous first, with the AI's evidence.

`build_worklist` is pure (FHIR JSON and job records in, ordered rows out); the blueprint
only fetches and renders. Order: priority (stat > asap > urgent > routine), then the AI
score of the top positive finding, then the longest waiting.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, Iterable

from flask import Blueprint, Response, render_template

from .app import ctx, operation_outcome
from .errors import TriageError
from .jobs import Job
from .pipeline import reference_id
from .priority import parse_priority

worklist = Blueprint("worklist", __name__, template_folder="templates")


@dataclass(frozen=True)
class WorklistRow:
    service_request_id: str
    imaging_study_id: str | None
    patient: str
    patient_details: str
    study: str
    ordered: datetime | None
    priority: str
    previous_priority: str | None
    top_finding: str | None
    probability: float | None
    model: str | None
    status: str
    reason: str | None
    heatmap_media_id: str | None

    @property
    def waiting(self) -> str:
        if not self.ordered:
            return ""
        minutes = int((datetime.now(timezone.utc) - self.ordered).total_seconds() // 60)
        return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _patient_name(patient: dict[str, Any] | None) -> str:
    if not patient:
        return "Unknown patient"
    for name in patient.get("name") or []:
        if name.get("text"):
            return str(name["text"])
        text = " ".join([*(name.get("given") or []), name.get("family", "")]).strip()
        if text:
            return text
    return "Unnamed patient"


def _patient_details(patient: dict[str, Any] | None, today: date) -> str:
    if not patient:
        return ""
    parts = []
    birth = patient.get("birthDate")
    if birth:
        try:
            born = date.fromisoformat(birth[:10])
            parts.append(f"{today.year - born.year - ((today.month, today.day) < (born.month, born.day))} y")
        except ValueError:
            pass
    if patient.get("gender"):
        parts.append(str(patient["gender"]))
    return ", ".join(parts)


def _study_text(study: dict[str, Any] | None) -> str:
    if not study:
        return "(no study yet)"
    modalities = ", ".join(m.get("code", "") for m in study.get("modality") or [])
    return " · ".join(filter(None, [modalities, study.get("description", "")])) or "ImagingStudy"


def build_worklist(
    service_requests: Iterable[dict[str, Any]],
    imaging_studies: Iterable[dict[str, Any]],
    patients: Iterable[dict[str, Any]],
    jobs: Iterable[Job],
    *,
    today: date | None = None,
) -> list[WorklistRow]:
    """Join orders, studies, patients and triage jobs into ordered worklist rows."""
    today = today or date.today()
    patients_by_id = {str(p.get("id")): p for p in patients}
    study_by_order: dict[str, dict[str, Any]] = {}
    for study in imaging_studies:
        for ref in study.get("basedOn") or []:
            order_id = reference_id(ref.get("reference"), "ServiceRequest")
            if order_id:
                study_by_order.setdefault(order_id, study)
    newest_job: dict[str, Job] = {}
    for job in sorted(jobs, key=lambda j: j.created_at):
        newest_job[job.imaging_study_id] = job

    rows = []
    for order in service_requests:
        order_id = str(order.get("id"))
        study = study_by_order.get(order_id)
        study_id = str(study["id"]) if study else None
        job = newest_job.get(study_id) if study_id else None
        result = job.result if job else {}
        positives = [f for f in result.get("findings") or [] if f.get("positive")]
        top = max(positives, key=lambda f: f["probability"], default=None)
        change = result.get("priority") or {}
        media = (result.get("written") or {}).get("Media") or []
        patient = patients_by_id.get(reference_id((order.get("subject") or {}).get("reference"), "Patient") or "")
        model = result.get("model")
        rows.append(WorklistRow(
            service_request_id=order_id,
            imaging_study_id=study_id,
            patient=_patient_name(patient),
            patient_details=_patient_details(patient, today),
            study=_study_text(study),
            ordered=_parse_time(order.get("authoredOn")),
            priority=(parse_priority(order.get("priority")) or parse_priority("routine")).value,  # type: ignore[union-attr]
            previous_priority=change.get("from") or ("routine" if change.get("changed") else None),
            top_finding=top["label"] if top else None,
            probability=top["probability"] if top else None,
            model=f"{model['name']} {model['version']}" if model else None,
            status=job.state.value if job else "no job",
            reason=job.reason if job and job.reason else None,
            heatmap_media_id=media[0].split("/")[-1] if media else None,
        ))
    rank = {"stat": 3, "asap": 2, "urgent": 1, "routine": 0}
    far_future = datetime.max.replace(tzinfo=timezone.utc)
    rows.sort(key=lambda r: (-rank[r.priority], -(r.probability or 0.0), r.ordered or far_future))
    return rows


@worklist.get("/worklist")
def show_worklist() -> Any:
    fhir = ctx().fhir()
    try:
        orders = fhir.search("ServiceRequest", {"_count": "200"})
        studies = fhir.search("ImagingStudy", {"_count": "200"})
        patients = fhir.search("Patient", {"_count": "200"})
    except TriageError as exc:
        return operation_outcome(502, f"worklist unavailable: {exc}", "transient")
    finally:
        fhir.close()
    rows = build_worklist(orders, studies, patients, ctx().store.list(limit=1000))
    return render_template("worklist.html", rows=rows, fhir_base=ctx().settings.fhir_base_url)


@worklist.get("/heatmaps/<media_id>.png")
def heatmap(media_id: str) -> Any:
    """The Grad-CAM overlay stored in a FHIR Media, served as a plain PNG."""
    fhir = ctx().fhir()
    try:
        media, _ = fhir.read("Media", media_id)
    except TriageError as exc:
        return operation_outcome(404, f"heatmap unavailable: {exc}", "not-found")
    finally:
        fhir.close()
    content = media.get("content") or {}
    if content.get("contentType") != "image/png" or not content.get("data"):
        return operation_outcome(404, "Media holds no PNG", "not-found")
    return Response(base64.b64decode(content["data"]), mimetype="image/png")
