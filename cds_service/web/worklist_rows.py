"""The worklist's pure core: FHIR JSON and job records in, ordered rows out (no Flask, no network).

`build_worklist` takes what one FHIR search returned (ServiceRequests with their Patient, the
ImagingStudy based on each, our DiagnosticReport with its Observations and heatmap Media) and the
local job records, and gives the rows in reading order: priority, then AI score, then waiting time.
`web/worklist.py` fetches, authorises and renders them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, Iterable, Mapping

from fhir_mappings.ai_reports import WITHDRAWN_STATUSES, AiReport, ai_report_from_fhir, is_ai_report
from cds_service.web.cds_hooks.cards import is_imaging_order
from cds_service.core.domain import NEGATIVE_LABELS
from cds_service.core.errors import InvalidResourceError
from cds_service.jobs.state import Job, JobState
from fhir_mappings import codes
from fhir_mappings.builders import (
    ai_priority_change,
    heatmap_source_instance,
    parse_fhir_datetime,
    reference_id,
    study_uid_from_imaging_study,
)
from fhir_mappings.conventions import DEFAULT_CONVENTIONS, Conventions

PRIORITY_RANK = {"stat": 3, "asap": 2, "urgent": 1, "routine": 0}


@dataclass(frozen=True)
class RowFinding:
    """One trained label's AI probability, as our Observation states it (None: only the report's
    conclusionCode names it, its Observation was not returned)."""

    label: str
    display: str
    probability: float | None
    positive: bool


@dataclass(frozen=True)
class WorklistRow:
    """One imaging order as the radiologist sees it."""

    order_id: str
    imaging_study_id: str | None
    study_uid: str | None
    patient: str
    patient_details: str
    modality: str
    body_part: str
    study: str
    ordered: datetime | None
    priority: str
    ai_raised_from: str | None
    findings: tuple[RowFinding, ...]
    model: str | None
    status: str
    reason: str | None
    heatmap_media_id: str | None
    heatmap_size: tuple[int, int] | None
    key_instance_uid: str | None
    heatmap_in_pacs: bool  # our Media names a Secondary Capture in the PACS (identifier urn:dicom:uid)
    shadow: bool = False  # the AI result came from a task in shadow mode: shown, never used to order rows
    unfamiliar: bool = False  # scored, but the images were unlike the model's training images: shown
    report_in_pacs: bool = False  # our report names its DICOM Structured Report in the PACS (identifier urn:dicom:uid)
    patient_id: str | None = None  # the order's Patient id: what the access log records (hashed), never shown

    @property
    def top_finding(self) -> RowFinding | None:
        return next((f for f in self.findings if f.positive), None)

    @property
    def score(self) -> float:
        """The AI score used to order rows of equal priority (none for a shadow-mode result)."""
        top = self.top_finding
        return (top.probability or 0.0) if top and not self.shadow else 0.0

    def waiting_minutes(self, now: datetime) -> int | None:
        return max(0, int((now - self.ordered).total_seconds() // 60)) if self.ordered else None

    def to_json(self, now: datetime) -> dict[str, Any]:
        """What the page script renders (display-ready; no identifiers beyond FHIR ids)."""
        top = self.top_finding
        waiting = self.waiting_minutes(now)
        return {
            "orderId": self.order_id,
            "patient": self.patient,
            "patientDetails": self.patient_details,
            "modality": self.modality,
            "bodyPart": self.body_part,
            "study": self.study,
            "ordered": self.ordered.isoformat() if self.ordered else None,
            "waitingMinutes": waiting,
            "waiting": format_waiting(waiting),
            "priority": self.priority,
            "aiRaisedFrom": self.ai_raised_from,
            "topFinding": {"label": top.label, "display": top.display, "probability": top.probability} if top else None,
            "findings": [f.__dict__ for f in self.findings],
            "model": self.model,
            "status": self.status,
            "reason": self.reason,
            "heatmap": f"/heatmaps/{self.heatmap_media_id}.png" if self.heatmap_media_id else None,
            "url": f"/worklist/orders/{self.order_id}",
            "shadow": self.shadow,
            "unfamiliar": self.unfamiliar,
        }


def format_waiting(minutes: int | None) -> str:
    if minutes is None:
        return ""
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 48 * 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{minutes // (24 * 60)} d"


def patient_name(patient: Mapping[str, Any] | None) -> str:
    """The name as the EHR wrote it (official first when there are several)."""
    if not patient:
        return "Unknown patient"
    names = sorted(patient.get("name") or [], key=lambda n: n.get("use") != "official")
    for name in names:
        if name.get("text"):
            return str(name["text"])
        text = " ".join([*(name.get("given") or []), name.get("family", "")]).strip()
        if text:
            return text
    return "Unnamed patient"


def patient_details(patient: Mapping[str, Any] | None, today: date) -> str:
    """Age and administrative gender, e.g. "67 y, female"."""
    if not patient:
        return ""
    parts = []
    birth = patient.get("birthDate")
    if birth:
        try:
            born = date.fromisoformat(str(birth)[:10]) if len(str(birth)) >= 10 else date(int(str(birth)[:4]), 7, 1)
            parts.append(f"{today.year - born.year - ((today.month, today.day) < (born.month, born.day))} y")
        except ValueError:
            pass
    if patient.get("gender"):
        parts.append(str(patient["gender"]))
    return ", ".join(parts)


def _codes(concepts: Iterable[Mapping[str, Any]] | Mapping[str, Any] | None) -> set[tuple[str, str]]:
    if isinstance(concepts, Mapping):
        concepts = [concepts]
    return {(c.get("system", ""), c.get("code", "")) for concept in concepts or [] for c in concept.get("coding") or []}


def is_ours(resource: Mapping[str, Any], conventions: Conventions = DEFAULT_CONVENTIONS) -> bool:
    """Written by this service: it carries our deterministic result identifier."""
    return conventions.is_our_result(dict(resource))


def study_uid_of(study: Mapping[str, Any] | None) -> str | None:
    """The study's UID as the worker reads it (builders.study_uid_from_imaging_study); None when it has no usable one."""
    if study is None:
        return None
    try:
        return study_uid_from_imaging_study(dict(study))
    except InvalidResourceError:
        return None


def row_findings(report: AiReport | None) -> tuple[RowFinding, ...]:
    """The report's findings for display: positive first, then by probability."""
    findings = (RowFinding(label=f.label, display=codes.finding_display(f.label), probability=f.probability,
                           positive=f.positive and f.label not in NEGATIVE_LABELS)
                for f in (report.findings if report else ()))
    return tuple(sorted(findings, key=lambda f: (not f.positive, -(f.probability or 0.0))))


def ai_raised_from(order: Mapping[str, Any], conventions: Conventions = DEFAULT_CONVENTIONS) -> str | None:
    """The priority before the AI raised it, while the AI's value still stands (else None).

    From the change the pipeline records on the order (the note's ai-priority-change extension),
    so every service instance reads the same; if a person changed the priority since, the
    marker no longer applies.
    """
    change = ai_priority_change(dict(order), conventions)
    if change is None:
        return None
    before, to = change
    return (before or "unset") if to == (order.get("priority") or "routine") else None


def in_pacs(media: Mapping[str, Any] | None) -> bool:
    """Our Media names the Secondary Capture stored in the PACS (secondary_capture.with_capture_reference)."""
    return any(i.get("system") == codes.DICOM_UID_SYSTEM and i.get("value") for i in (media or {}).get("identifier") or [])


def ai_status(report: AiReport | None, job: Job | None, has_study: bool) -> tuple[str, str | None]:
    """(status, reason): `done` when the FHIR server holds our result; otherwise the job's progress
    (queued, running, retrying, failed, not_applicable, model_unavailable, with its reason), when
    this service's job store knows the study; otherwise `not triaged` (`no study yet`).

    A job done here whose result is no longer in FHIR (withdrawn) adds nothing: the list is
    the same on every instance."""
    if report is not None:
        return "done", None
    if job is not None and job.state is not JobState.DONE:
        return job.state.value, job.reason or None
    return ("not triaged" if has_study else "no study yet"), None


def belongs_on_worklist(order: Mapping[str, Any], has_study: bool) -> bool:
    """An order belongs on the worklist if it has an ImagingStudy or is an imaging order (cards.is_imaging_order)."""
    return has_study or is_imaging_order(order)


def ai_reports_by_order(by_type: Mapping[str, Mapping[str, Mapping[str, Any]]],
                        conventions: Conventions = DEFAULT_CONVENTIONS) -> dict[str, AiReport]:
    """Order id -> the newest standing AI report based on it (ai_reports.ai_report_from_fhir reads it)."""
    observations = {f"Observation/{i}": o for i, o in by_type.get("Observation", {}).items()}
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    reports = [(report, ai_report_from_fhir(report, observations, conventions))
               for report in by_type.get("DiagnosticReport", {}).values()
               if is_ai_report(report, conventions) and report.get("status") not in WITHDRAWN_STATUSES]
    newest: dict[str, AiReport] = {}
    for report, ai in sorted(reports, key=lambda pair: (pair[1].issued or oldest, pair[1].report_id or "")):
        for ref in report.get("basedOn") or []:
            order_id = reference_id(ref.get("reference"), "ServiceRequest")
            if order_id:
                newest[order_id] = ai  # the newest wins
    return newest


def build_worklist(resources: Iterable[Mapping[str, Any]], jobs: Iterable[Job], *, now: datetime,
                   conventions: Conventions = DEFAULT_CONVENTIONS) -> list[WorklistRow]:
    """Join one search's resources (orders, patients, studies, our reports…) and our jobs into rows;
    ours are recognised by `conventions` (CDS_FHIR_CANONICAL_BASE, CDS_AI_SECURITY_LABEL)."""
    by_type: dict[str, dict[str, Mapping[str, Any]]] = {}
    for resource in resources:
        if resource.get("resourceType") and resource.get("id"):
            by_type.setdefault(str(resource["resourceType"]), {})[str(resource["id"])] = resource
    get = lambda kind, ref: by_type.get(kind, {}).get(reference_id(ref, kind) or "")  # noqa: E731

    study_by_order: dict[str, Mapping[str, Any]] = {}
    for imaging_study in by_type.get("ImagingStudy", {}).values():
        for ref in imaging_study.get("basedOn") or []:
            order_id = reference_id(ref.get("reference"), "ServiceRequest")
            if order_id:
                study_by_order.setdefault(order_id, imaging_study)
    report_by_order = ai_reports_by_order(by_type, conventions)
    newest_job: dict[str, Job] = {}
    for each_job in sorted(jobs, key=lambda j: j.created_at):
        newest_job[each_job.imaging_study_id] = each_job

    rows = []
    for order_id, order in by_type.get("ServiceRequest", {}).items():
        study = study_by_order.get(order_id)
        if not belongs_on_worklist(order, study is not None):
            continue
        report = report_by_order.get(order_id)
        media = by_type.get("Media", {}).get(report.media_id) if report and report.media_id else None
        job = newest_job.get(str(study["id"])) if study else None
        status, reason = ai_status(report, job, study is not None)
        series = (study or {}).get("series") or []
        patient = get("Patient", (order.get("subject") or {}).get("reference"))
        rows.append(WorklistRow(
            order_id=order_id,
            imaging_study_id=str(study["id"]) if study else None,
            study_uid=study_uid_of(study),
            patient=patient_name(patient),
            patient_details=patient_details(patient, now.date()),
            modality=", ".join(sorted({m.get("code", "") for m in (study or {}).get("modality") or []} - {""})),
            body_part=", ".join(sorted({(s.get("bodySite") or {}).get("display") or (s.get("bodySite") or {}).get("code") or ""
                                        for s in series} - {""})),
            study=(study or {}).get("description") or (order.get("code") or {}).get("text") or "",
            ordered=parse_fhir_datetime(order.get("authoredOn")),
            priority=str(order.get("priority")) if order.get("priority") in PRIORITY_RANK else "routine",
            ai_raised_from=ai_raised_from(order, conventions),
            findings=row_findings(report),
            model=report.model if report else None,
            status=status,
            reason=reason,
            heatmap_media_id=str(media["id"]) if media else None,
            heatmap_size=(int(media["width"]), int(media["height"])) if media and media.get("width") and media.get("height") else None,
            key_instance_uid=heatmap_source_instance(dict(media), conventions) if media else None,
            heatmap_in_pacs=in_pacs(media),
            shadow=report.shadow if report else False,
            unfamiliar=report.unfamiliar if report else False,
            report_in_pacs=bool(report and report.structured_report_uid),
            patient_id=reference_id((order.get("subject") or {}).get("reference"), "Patient"),
        ))
    return sorted(rows, key=order_key(now))


def order_key(now: datetime) -> Any:
    """Sort key: priority, then AI score, then waiting time (longest first), then id (stable)."""
    far_future = datetime.max.replace(tzinfo=timezone.utc)
    return lambda r: (-PRIORITY_RANK[r.priority], -r.score, r.ordered or far_future, r.order_id)
