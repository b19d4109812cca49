"""Our AI results read back: from our FHIR DiagnosticReports and Observations (`ai_reports_from_fhir`),
from a finished job's summary (`ai_report_from_job`), and from the extension a CDS card of ours carries
(`card_result`). Pure: plain data in, `AiReport` / `CardResult` out.

Read by the CDS Hooks cards (web layer), the audit log (an adapter) and `cds-triage trial`; it lives
here, beside the builders that write these resources, so that none of them imports another's layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from cds_service.core.domain import InputFit, TaskMode

from . import codes
from .common import is_shadow, is_unfamiliar
from .conventions import DEFAULT_CONVENTIONS, Conventions
from .reading import parse_fhir_datetime, reference_id

#: DiagnosticReport statuses that no longer stand (shown to nobody).
WITHDRAWN_STATUSES = {"entered-in-error", "cancelled"}


@dataclass(frozen=True)
class ReportedFinding:
    label: str
    probability: float | None
    positive: bool


@dataclass(frozen=True)
class AiReport:
    """One study's AI triage result, as much as a card needs of it."""

    findings: tuple[ReportedFinding, ...]
    status: str = "preliminary"
    model: str | None = None
    issued: datetime | None = None
    report_id: str | None = None
    imaging_study_id: str | None = None
    media_id: str | None = None
    shadow: bool = False  # written by a task in shadow mode: information only, never a severity
    unfamiliar: bool = False  # scored, but the images were unlike the model's training images (input check)
    study_uid: str | None = None  # the DICOM study, where a viewer opens it
    structured_report_uid: str | None = None  # the SOP Instance UID of its DICOM SR in the PACS, if stored

    @property
    def positive_findings(self) -> tuple[ReportedFinding, ...]:
        """Positive findings, most probable first."""
        return tuple(sorted((f for f in self.findings if f.positive), key=lambda f: -(f.probability or 0.0)))

    @property
    def unread(self) -> bool:
        """Still the AI's preliminary word: no radiologist has finalised or amended it."""
        return self.status in ("registered", "partial", "preliminary")


# --- AI reports from FHIR or from a job -------------------------------------------------------


def is_ai_report(resource: Mapping[str, Any], conventions: Conventions = DEFAULT_CONVENTIONS) -> bool:
    """One of our DiagnosticReports: AI-asserted (meta.security AIAST or the site's label) with our result identifier."""
    if resource.get("resourceType") != "DiagnosticReport":
        return False
    return conventions.is_ai_asserted(dict(resource)) and conventions.is_our_result(dict(resource))


def _local_label(concept: Mapping[str, Any] | None, conventions: Conventions) -> str | None:
    for coding in (concept or {}).get("coding") or []:
        if isinstance(coding, dict) and coding.get("system") == conventions.finding_system and coding.get("code"):
            return str(coding["code"])
    return None


def _finding_from_observation(observation: Mapping[str, Any], conventions: Conventions) -> ReportedFinding | None:
    label = _local_label(observation.get("code"), conventions)
    if label is None:
        return None
    value = (observation.get("valueQuantity") or {}).get("value")
    probability = float(value) if isinstance(value, (int, float)) and 0.0 <= value <= 1.0 else None
    positive = any(c.get("code") == codes.INTERPRETATION_POSITIVE
                   for i in observation.get("interpretation") or [] for c in i.get("coding") or [])
    return ReportedFinding(label, probability, positive)


def dicom_uid(identifiers: Any) -> str | None:
    """The UID among FHIR identifiers with system urn:dicom:uid (value urn:oid:<uid>), else None."""
    for identifier in identifiers if isinstance(identifiers, list) else [identifiers]:
        value = identifier.get("value") if isinstance(identifier, dict) else None
        if identifier and identifier.get("system") == codes.DICOM_UID_SYSTEM and isinstance(value, str) and value:
            return value.removeprefix(codes.URN_OID_PREFIX)
    return None


def ai_report_from_fhir(report: Mapping[str, Any], observations: Mapping[str, Mapping[str, Any]],
                        conventions: Conventions = DEFAULT_CONVENTIONS) -> AiReport:
    """An AiReport from our DiagnosticReport and its Observations (`{"Observation/<id>": resource}`).

    Positive findings come from conclusionCode, which is there even when the Observations were not
    sent; their probabilities and the model come from the Observations when they are.
    """
    results = [observations.get(f"Observation/{reference_id(r.get('reference'), 'Observation')}") for r in report.get("result") or []]
    findings = {f.label: f for f in (_finding_from_observation(o, conventions) for o in results if o) if f}
    for label in filter(None, (_local_label(c, conventions) for c in report.get("conclusionCode") or [])):
        known = findings.get(label)
        findings[label] = ReportedFinding(label, known.probability if known else None, True)
    model = next((str(o["device"]["display"]) for o in results if o and (o.get("device") or {}).get("display")), None)
    media = next((reference_id((m.get("link") or {}).get("reference"), "Media") for m in report.get("media") or []), None)
    study = next((reference_id(s.get("reference"), "ImagingStudy") for s in report.get("imagingStudy") or []), None)
    return AiReport(
        findings=tuple(findings.values()), status=str(report.get("status") or "preliminary"), model=model,
        issued=parse_fhir_datetime(report.get("issued")) or parse_fhir_datetime((report.get("meta") or {}).get("lastUpdated")),
        report_id=str(report["id"]) if report.get("id") else None, imaging_study_id=study, media_id=media,
        shadow=is_shadow(dict(report), conventions),
        unfamiliar=is_unfamiliar(dict(report), conventions),
        # the study's UID beside its reference (builders), the SR's as the report's identifier (structured_report)
        study_uid=next(filter(None, (dicom_uid(s.get("identifier")) for s in report.get("imagingStudy") or [])), None),
        structured_report_uid=dicom_uid(report.get("identifier") or []),
    )


def ai_reports_from_fhir(resources: Iterable[Mapping[str, Any]], patient_id: str,
                         conventions: Conventions = DEFAULT_CONVENTIONS) -> list[AiReport]:
    """This patient's standing AI reports among `resources` (a search result), newest first."""
    resources = list(resources)
    observations = {f"Observation/{r['id']}": r for r in resources if r.get("resourceType") == "Observation" and r.get("id")}
    reports = [
        ai_report_from_fhir(r, observations, conventions) for r in resources
        if is_ai_report(r, conventions) and reference_id((r.get("subject") or {}).get("reference"), "Patient") == patient_id
        and r.get("status") not in WITHDRAWN_STATUSES
    ]
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(reports, key=lambda r: r.issued or oldest, reverse=True)


def ai_report_from_job(result: Mapping[str, Any], imaging_study_id: str) -> AiReport:
    """An AiReport from a finished job's result summary (pipeline.result_summary)."""
    findings = tuple(
        ReportedFinding(str(f["label"]), float(f["probability"]), bool(f.get("positive")))
        for f in result.get("findings") or [] if f.get("trained", True)
    )
    model = result.get("model") or {}
    written = result.get("written") or {}
    media = next((reference_id(m, "Media") for m in written.get("Media") or []), None)
    report = next((reference_id(m, "DiagnosticReport") for m in written.get("DiagnosticReport") or []), None)
    stored_report = result.get("reportToPacs") or {}
    return AiReport(findings=findings, model=f"{model['name']} {model['version']}" if model.get("name") else None,
                    report_id=report, imaging_study_id=imaging_study_id, media_id=media,
                    shadow=result.get("mode") == TaskMode.SHADOW.value, study_uid=result.get("studyUid"),
                    unfamiliar=(result.get("inputCheck") or {}).get("fit") == InputFit.UNFAMILIAR.value,
                    structured_report_uid=stored_report.get("sopInstanceUid") if stored_report.get("stored") else None)



#: The key of a card's `extension` (CDS Hooks 2.0 lets a card carry one) that names the AI result the
#: card shows: the audit log keeps it beside the card, so feedback on the card can be tied to its
#: study (`cds-triage trial` reads it back as truth). It holds what the card's detail already shows.
AI_RESULT_EXTENSION = "cds-triage-ai-result"


@dataclass(frozen=True)
class CardResult:
    """What a card showed: the study, the findings it called positive, and whether in shadow mode."""

    imaging_study_id: str
    findings: tuple[str, ...]
    shadow: bool


def ai_result_extension(report: AiReport | None) -> dict[str, Any] | None:
    if report is None or not report.imaging_study_id:
        return None
    return {AI_RESULT_EXTENSION: {"imagingStudy": f"ImagingStudy/{report.imaging_study_id}",
                                  "findings": [f.label for f in report.positive_findings],
                                  "mode": TaskMode.SHADOW.value if report.shadow else TaskMode.ACTIVE.value}}


def card_result(card: Mapping[str, Any]) -> CardResult | None:
    """The AI result a card of ours showed (its `extension`), or None for a card without one."""
    block = (card.get("extension") or {}).get(AI_RESULT_EXTENSION) if isinstance(card.get("extension"), dict) else None
    study = reference_id(block.get("imagingStudy"), "ImagingStudy") if isinstance(block, dict) else None
    if not isinstance(block, dict) or study is None:
        return None
    findings = tuple(str(label) for label in block.get("findings") or [] if isinstance(label, str))
    return CardResult(study, findings, block.get("mode") == TaskMode.SHADOW.value)
