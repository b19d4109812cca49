"""CDS Hooks cards from AI triage results. Pure: plain data in, card JSON out.

An AI result reaches a card from one of two places, both turned into an `AiReport` first:
- the FHIR server (`ai_reports_from_fhir`): our DiagnosticReports (meta.security AIAST and an
  identifier in RESULT_IDENTIFIER_SYSTEM) with their Observations, for patient-view and orders;
- the job store (`ai_report_from_job`), when imagingstudy-create finds the job already done.

The indicator follows the same priority policy that raises the order: a positive finding
whose rule says stat → `critical`; urgent or asap → `warning`; anything else → `info`.
Every card carries the AI disclaimer, its source (with topic), links to the heatmap and the
worklist, and coded override reasons. Nothing here emits null or empty values (`prune`).

It lives in the web layer, not in the core: it reads our FHIR resources back with fhir_mappings,
and fhir_mappings sits above the core (it uses core.domain and core.errors; the core never imports it).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from fhir_mappings import codes
from fhir_mappings.builders import SHADOW_SENTENCE, is_shadow, parse_fhir_datetime, reference_id

from cds_service.core.domain import DISCLAIMER, Priority, TaskMode

SUMMARY_LIMIT = 139  # the specification: a summary under 140 characters

#: Our own CodeSystems for card topics and override reasons (example.org placeholders, like codes.LOCAL_BASE).
TOPIC_SYSTEM = f"{codes.LOCAL_BASE}/CodeSystem/cds-card-topic"
OVERRIDE_REASON_SYSTEM = f"{codes.LOCAL_BASE}/CodeSystem/cds-override-reason"
TOPIC = {"system": TOPIC_SYSTEM, "code": "ai-imaging-triage", "display": "AI imaging triage"}
OVERRIDE_REASONS = (
    ("already-read", "Study already read by a radiologist"),
    ("false-positive", "AI finding judged a false positive"),
    ("not-relevant", "Not relevant to the current clinical question"),
    ("image-quality", "Image quality or artefact limits the AI result"),
)

#: SNOMED CT 363679005 "Imaging" (FHIR ValueSet servicerequest-category) and HL7 v2-0074 RAD mark an imaging order.
IMAGING_CATEGORIES = {(codes.SNOMED_SYSTEM, "363679005"), (codes.V2_0074_SYSTEM, codes.V2_0074_RADIOLOGY)}
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

    @property
    def positive_findings(self) -> tuple[ReportedFinding, ...]:
        """Positive findings, most probable first."""
        return tuple(sorted((f for f in self.findings if f.positive), key=lambda f: -(f.probability or 0.0)))

    @property
    def unread(self) -> bool:
        """Still the AI's preliminary word: no radiologist has finalised or amended it."""
        return self.status in ("registered", "partial", "preliminary")


# --- AI reports from FHIR or from a job -------------------------------------------------------


def is_ai_report(resource: Mapping[str, Any]) -> bool:
    """One of our DiagnosticReports: AI-asserted (meta.security AIAST) with our result identifier."""
    if resource.get("resourceType") != "DiagnosticReport":
        return False
    security = (resource.get("meta") or {}).get("security") or []
    ai = any(s.get("system") == codes.SECURITY_OBSERVATION_VALUE_SYSTEM and s.get("code") == codes.SECURITY_AI_ASSERTED
             for s in security if isinstance(s, dict))
    ours = any(i.get("system") == codes.RESULT_IDENTIFIER_SYSTEM for i in resource.get("identifier") or [] if isinstance(i, dict))
    return ai and ours


def _local_label(concept: Mapping[str, Any] | None) -> str | None:
    for coding in (concept or {}).get("coding") or []:
        if isinstance(coding, dict) and coding.get("system") == codes.LOCAL_FINDING_SYSTEM and coding.get("code"):
            return str(coding["code"])
    return None


def _finding_from_observation(observation: Mapping[str, Any]) -> ReportedFinding | None:
    label = _local_label(observation.get("code"))
    if label is None:
        return None
    value = (observation.get("valueQuantity") or {}).get("value")
    probability = float(value) if isinstance(value, (int, float)) and 0.0 <= value <= 1.0 else None
    positive = any(c.get("code") == codes.INTERPRETATION_POSITIVE
                   for i in observation.get("interpretation") or [] for c in i.get("coding") or [])
    return ReportedFinding(label, probability, positive)


def ai_report_from_fhir(report: Mapping[str, Any], observations: Mapping[str, Mapping[str, Any]]) -> AiReport:
    """An AiReport from our DiagnosticReport and its Observations (`{"Observation/<id>": resource}`).

    Positive findings come from conclusionCode, which is there even when the Observations were not
    sent; their probabilities and the model come from the Observations when they are.
    """
    results = [observations.get(f"Observation/{reference_id(r.get('reference'), 'Observation')}") for r in report.get("result") or []]
    findings = {f.label: f for f in (_finding_from_observation(o) for o in results if o) if f}
    for label in filter(None, (_local_label(c) for c in report.get("conclusionCode") or [])):
        known = findings.get(label)
        findings[label] = ReportedFinding(label, known.probability if known else None, True)
    model = next((str(o["device"]["display"]) for o in results if o and (o.get("device") or {}).get("display")), None)
    media = next((reference_id((m.get("link") or {}).get("reference"), "Media") for m in report.get("media") or []), None)
    study = next((reference_id(s.get("reference"), "ImagingStudy") for s in report.get("imagingStudy") or []), None)
    return AiReport(
        findings=tuple(findings.values()), status=str(report.get("status") or "preliminary"), model=model,
        issued=parse_fhir_datetime(report.get("issued")) or parse_fhir_datetime((report.get("meta") or {}).get("lastUpdated")),
        report_id=str(report["id"]) if report.get("id") else None, imaging_study_id=study, media_id=media,
        shadow=is_shadow(report),
    )


def ai_reports_from_fhir(resources: Iterable[Mapping[str, Any]], patient_id: str) -> list[AiReport]:
    """This patient's standing AI reports among `resources` (a search result), newest first."""
    resources = list(resources)
    observations = {f"Observation/{r['id']}": r for r in resources if r.get("resourceType") == "Observation" and r.get("id")}
    reports = [
        ai_report_from_fhir(r, observations) for r in resources
        if is_ai_report(r) and reference_id((r.get("subject") or {}).get("reference"), "Patient") == patient_id
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
    return AiReport(findings=findings, model=f"{model['name']} {model['version']}" if model.get("name") else None,
                    report_id=report, imaging_study_id=imaging_study_id, media_id=media,
                    shadow=result.get("mode") == TaskMode.SHADOW.value)


# --- severity --------------------------------------------------------------------------------


def severity(report: AiReport, rules: Mapping[str, Priority]) -> Priority | None:
    """The priority the policy asks for the report's positive findings (None: nothing positive,
    or a shadow-mode result, which never asks for anything)."""
    if report.shadow:
        return None
    wanted = [rules[f.label] for f in report.positive_findings if f.label in rules]
    return max(wanted, key=lambda p: p.rank, default=None)


def indicator_for(priority: Priority | None) -> str:
    if priority is Priority.STAT:
        return "critical"
    if priority in (Priority.URGENT, Priority.ASAP):
        return "warning"
    return "info"


def is_imaging_order(resource: Mapping[str, Any]) -> bool:
    """A ServiceRequest whose category says imaging (SNOMED CT 363679005 or v2-0074 RAD)."""
    if resource.get("resourceType") != "ServiceRequest":
        return False
    return any((c.get("system"), c.get("code")) in IMAGING_CATEGORIES
               for cat in resource.get("category") or [] for c in cat.get("coding") or [] if isinstance(c, dict))


# --- cards -----------------------------------------------------------------------------------


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|<>#])")


def md(text: str) -> str:
    """Text safe inside Markdown (a model name or label cannot start a table or a link)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def summary_text(text: str) -> str:
    return text if len(text) <= SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 1].rstrip() + "…"


def prune(value: Any) -> Any:
    """Drop null and empty values all the way down (CDS Hooks: never null, never empty)."""
    if isinstance(value, dict):
        pruned = {k: prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        return [v for v in (prune(item) for item in value) if v not in (None, "", [], {})]
    return value


def source(public_url: str) -> dict[str, Any]:
    return {"label": "cds-triage AI radiology triage", "url": f"{public_url}/worklist", "topic": dict(TOPIC)}


def override_reasons() -> list[dict[str, str]]:
    return [{"system": OVERRIDE_REASON_SYSTEM, "code": code, "display": display} for code, display in OVERRIDE_REASONS]


def links(report: AiReport | None, public_url: str) -> list[dict[str, str]]:
    out = []
    if report is not None and report.media_id:
        out.append({"label": "AI heatmap (Grad-CAM): where the model looked", "url": f"{public_url}/heatmaps/{report.media_id}.png",
                    "type": "absolute"})
    out.append({"label": "Radiology triage worklist", "url": f"{public_url}/worklist", "type": "absolute"})
    return out


def _card(summary: str, detail: str, indicator: str, public_url: str, report: AiReport | None,
          *, with_override_reasons: bool) -> dict[str, Any]:
    card = {
        "uuid": str(uuid.uuid4()),
        "summary": summary_text(summary),
        "detail": detail,
        "indicator": indicator,
        "source": source(public_url),
        "links": links(report, public_url),
        "overrideReasons": override_reasons() if with_override_reasons else None,
    }
    return prune(card)


def _findings_table(report: AiReport) -> str:
    rows = [f"| {md(codes.finding_display(f.label))} | {f'{f.probability:.2f}' if f.probability is not None else 'see report'} "
            f"| {'above threshold' if f.positive else 'below threshold'} |"
            for f in sorted(report.findings, key=lambda f: (not f.positive, -(f.probability or 0.0)))]
    return "\n".join(["| Finding | AI probability | Result |", "|---|---|---|", *rows])


def report_detail(report: AiReport, priority: Priority | None) -> str:
    """The card's Markdown: the findings, the model and version, the disclaimer, no patient data."""
    lines = [f"**{DISCLAIMER}**", ""]
    if report.shadow:
        lines += [f"*{SHADOW_SENTENCE}*", ""]
    if report.findings:
        lines += [_findings_table(report), ""]
    else:
        lines += ["No finding above the model's threshold.", ""]
    lines.append(f"Model: {md(report.model) if report.model else 'see the DiagnosticReport'}  ")
    if report.imaging_study_id:
        lines.append(f"Study: ImagingStudy/{md(report.imaging_study_id)}  ")
    if report.issued:
        lines.append(f"Reported: {report.issued.strftime('%Y-%m-%d %H:%M UTC')}  ")
    if priority is not None:
        lines.append(f"Suggested priority: **{priority.value}**  ")
    lines.append(f"Status: {'preliminary, awaiting a radiologist' if report.unread else md(report.status)}")
    return "\n".join(lines)


def report_card(report: AiReport, rules: Mapping[str, Priority], public_url: str) -> dict[str, Any]:
    """The card for one AI result: indicator from its severity, findings in the detail."""
    priority = severity(report, rules)
    top = report.positive_findings[0] if report.positive_findings else None
    if top is None:
        summary = "AI triage: no finding above threshold (preliminary)"
    else:
        probability = f" ({top.probability:.0%})" if top.probability is not None else ""
        more = len(report.positive_findings) - 1
        summary = (f"AI triage: possible {codes.finding_display(top.label)}{probability}"
                   f"{f' and {more} more' if more else ''}, preliminary")
    if report.shadow:
        summary = "[Shadow mode] " + summary
    return _card(summary, report_detail(report, priority), indicator_for(priority), public_url, report,
                 with_override_reasons=top is not None)


def unread_critical_card(report: AiReport, rules: Mapping[str, Priority], public_url: str) -> dict[str, Any]:
    """For order-select/order-sign: this patient has a critical AI finding no radiologist has read yet."""
    top = report.positive_findings[0]
    summary = f"Unread critical AI finding for this patient: {codes.finding_display(top.label)}"
    detail = ("A prior study of this patient has a **critical AI triage finding that no radiologist has read yet**. "
              "Consider reviewing it before placing this imaging order.\n\n" + report_detail(report, severity(report, rules)))
    return _card(summary, detail, "critical", public_url, report, with_override_reasons=True)


def pending_card(job_id: str, state: str, public_url: str) -> dict[str, Any]:
    """What imagingstudy-create answers at once: the hook never waits for inference."""
    detail = (f"The study was queued for AI triage (job `{md(job_id)}`, status {md(state)}). "
              f"Findings will appear on the worklist and in the patient's chart. *{DISCLAIMER}*")
    return _card("AI triage: analysis pending", detail, "info", public_url, None, with_override_reasons=False)


def no_result_card(reason: str, public_url: str) -> dict[str, Any]:
    """The study was not triaged (no model for it): say so, so nobody reads silence as 'normal'."""
    detail = f"AI triage did not analyse this study: {md(reason)}. Read it in the usual order. *{DISCLAIMER}*"
    return _card("AI triage: not performed for this study", detail, "info", public_url, None, with_override_reasons=False)


def priority_action(service_request: Mapping[str, Any], updated: Mapping[str, Any], new: Priority) -> dict[str, Any]:
    """A systemActions entry that raises the order's priority (for EHRs that apply system actions)."""
    return prune({
        "type": "update",
        "description": f"Raise the priority of ServiceRequest/{service_request.get('id')} to {new.value} (AI triage). {DISCLAIMER}",
        "resource": dict(updated),
    })
