"""CDS Hooks cards from AI triage results. Pure: plain data in, card JSON out.

An AI result reaches a card from one of two places, both turned into an `AiReport` first:
- the FHIR server (`ai_reports_from_fhir`): our DiagnosticReports (meta.security AIAST and an
  identifier in RESULT_IDENTIFIER_SYSTEM) with their Observations, for patient-view and orders;
- the job store (`ai_report_from_job`), when imagingstudy-create finds the job already done.

The indicator follows the same priority policy that raises the order: a positive finding
whose rule says stat → `critical`; urgent or asap → `warning`; anything else → `info`.
Every card carries the AI disclaimer, its source (with topic), links to the heatmap, the
worklist and, with CDS_VIEWER_URL, the study in the site's viewer, and coded override reasons.
Nothing here emits null or empty values (`prune`).

It lives in the web layer, not in the core: it reads our FHIR resources back with fhir_mappings,
and fhir_mappings sits above the core (it uses core.domain and core.errors; the core never imports it).
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Mapping

from fhir_mappings import codes
from fhir_mappings.builders import SHADOW_SENTENCE, UNFAMILIAR_SENTENCE
from fhir_mappings.conventions import DEFAULT_CONVENTIONS, Conventions
from fhir_mappings.ai_reports import (AiReport, ai_result_extension)

from cds_service.core.domain import DISCLAIMER, Priority
from cds_service.core.viewer import viewer_link

SUMMARY_LIMIT = 139  # the specification: a summary under 140 characters

#: Card topics and override reasons: our own CodeSystems (codes.CARD_TOPIC_CODES, OVERRIDE_REASON_CODES),
#: under the canonical base (Conventions.card_topic_system, .override_reason_system).
TOPIC_CODE = "ai-imaging-triage"

#: SNOMED CT 363679005 "Imaging" (FHIR ValueSet servicerequest-category) and HL7 v2-0074 RAD mark an imaging order.
IMAGING_CATEGORIES = {(codes.SNOMED_SYSTEM, "363679005"), (codes.V2_0074_SYSTEM, codes.V2_0074_RADIOLOGY)}
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


def source(public_url: str, conventions: Conventions = DEFAULT_CONVENTIONS) -> dict[str, Any]:
    topic = {"system": conventions.card_topic_system, "code": TOPIC_CODE, "display": codes.CARD_TOPIC_CODES[TOPIC_CODE]}
    return {"label": "cds-triage AI radiology triage", "url": f"{public_url}/worklist", "topic": topic}


def override_reasons(conventions: Conventions = DEFAULT_CONVENTIONS) -> list[dict[str, str]]:
    return [{"system": conventions.override_reason_system, "code": code, "display": display}
            for code, display in codes.OVERRIDE_REASON_CODES.items()]


def links(report: AiReport | None, public_url: str, viewer: str = "") -> list[dict[str, str]]:
    """The heatmap, the study in the site's viewer (`viewer`: CDS_VIEWER_URL's template), the worklist."""
    out = []
    if report is not None and report.media_id:
        out.append({"label": "AI heatmap (Grad-CAM): where the model looked", "url": f"{public_url}/heatmaps/{report.media_id}.png",
                    "type": "absolute"})
    if report is not None and (study := viewer_link(viewer, report.study_uid)):
        out.append({"label": "Open the study in the image viewer", "url": study, "type": "absolute"})
    out.append({"label": "Radiology triage worklist", "url": f"{public_url}/worklist", "type": "absolute"})
    return out


def _card(summary: str, detail: str, indicator: str, public_url: str, report: AiReport | None,
          *, with_override_reasons: bool, conventions: Conventions, viewer: str = "") -> dict[str, Any]:
    card = {
        "uuid": str(uuid.uuid4()),
        "summary": summary_text(summary),
        "detail": detail,
        "indicator": indicator,
        "source": source(public_url, conventions),
        "links": links(report, public_url, viewer),
        "overrideReasons": override_reasons(conventions) if with_override_reasons else None,
        "extension": ai_result_extension(report),
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
    if report.unfamiliar:
        lines += [f"*{UNFAMILIAR_SENTENCE}*", ""]
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


def report_card(report: AiReport, rules: Mapping[str, Priority], public_url: str,
                conventions: Conventions = DEFAULT_CONVENTIONS, viewer: str = "") -> dict[str, Any]:
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
                 with_override_reasons=top is not None, conventions=conventions, viewer=viewer)


def unread_critical_card(report: AiReport, rules: Mapping[str, Priority], public_url: str,
                         conventions: Conventions = DEFAULT_CONVENTIONS, viewer: str = "") -> dict[str, Any]:
    """For order-select/order-sign: this patient has a critical AI finding no radiologist has read yet."""
    top = report.positive_findings[0]
    summary = f"Unread critical AI finding for this patient: {codes.finding_display(top.label)}"
    detail = ("A prior study of this patient has a **critical AI triage finding that no radiologist has read yet**. "
              "Consider reviewing it before placing this imaging order.\n\n" + report_detail(report, severity(report, rules)))
    return _card(summary, detail, "critical", public_url, report, with_override_reasons=True, conventions=conventions,
                 viewer=viewer)


def pending_card(job_id: str, state: str, public_url: str, conventions: Conventions = DEFAULT_CONVENTIONS) -> dict[str, Any]:
    """What imagingstudy-create answers at once: the hook never waits for inference."""
    detail = (f"The study was queued for AI triage (job `{md(job_id)}`, status {md(state)}). "
              f"Findings will appear on the worklist and in the patient's chart. *{DISCLAIMER}*")
    return _card("AI triage: analysis pending", detail, "info", public_url, None, with_override_reasons=False,
                 conventions=conventions)


def no_result_card(reason: str, public_url: str, conventions: Conventions = DEFAULT_CONVENTIONS) -> dict[str, Any]:
    """The study was not triaged (no model for it): say so, so nobody reads silence as 'normal'."""
    detail = f"AI triage did not analyse this study: {md(reason)}. Read it in the usual order. *{DISCLAIMER}*"
    return _card("AI triage: not performed for this study", detail, "info", public_url, None, with_override_reasons=False,
                 conventions=conventions)


def priority_action(service_request: Mapping[str, Any], updated: Mapping[str, Any], new: Priority) -> dict[str, Any]:
    """A systemActions entry that raises the order's priority (for EHRs that apply system actions)."""
    return prune({
        "type": "update",
        "description": f"Raise the priority of ServiceRequest/{service_request.get('id')} to {new.value} (AI triage). {DISCLAIMER}",
        "resource": dict(updated),
    })
