"""The preliminary AI DiagnosticReport: groups the Observations and the heatmap, with the conclusion."""

from __future__ import annotations

from datetime import datetime

from fhir.resources.R4B.attachment import Attachment
from fhir.resources.R4B.diagnosticreport import DiagnosticReport, DiagnosticReportMedia

from cds_service.core.domain import InputFit, OrderContext, TaskMode, TriageResult

from . import codes
from .common import (AI_DISCLAIMER, SHADOW_SENTENCE, UNFAMILIAR_SENTENCE, ai_asserted_meta, based_on, concept, effective_time, finding_code,
                     imaging_study_ref, model_sentence, narrative, patient_ref, ref, require_done, task_of)
from .conventions import DEFAULT_CONVENTIONS, Conventions
from .identifiers import result_identifier


def build_conclusion(result: TriageResult) -> str:
    """The human-readable summary a radiologist reads first in the report."""
    return " ".join(conclusion_sentences(result))


def conclusion_sentences(result: TriageResult) -> list[str]:
    """The conclusion, sentence by sentence (the report's narrative shows one per paragraph)."""
    model = require_done(result)
    sentences: list[str] = []
    positives = result.positive_findings
    if positives:
        top = positives[0]
        sentences.append(
            f"AI triage suggests {codes.finding_display(top.label)} "
            f"(probability {top.probability:.2f}, threshold {top.threshold:.2f})."
        )
        if len(positives) > 1:
            others = ", ".join(
                f"{codes.finding_display(f.label)} ({f.probability:.2f})" for f in positives[1:]
            )
            sentences.append(f"Also above threshold: {others}.")
    else:
        sentences.append("AI triage: no finding above threshold.")
    if result.input_fit is InputFit.UNFAMILIAR:
        sentences.insert(0, UNFAMILIAR_SENTENCE)
    if result.mode is TaskMode.SHADOW:
        sentences.insert(0, SHADOW_SENTENCE)
    if result.suggested_priority is not None:
        verb = "Would have suggested priority" if result.mode is TaskMode.SHADOW else "Suggested priority"
        sentences.append(f"{verb}: {result.suggested_priority.value}.")
    untrained = [f.label for f in result.findings if not f.trained]
    if untrained:
        sentences.append(
            f"Untrained subtype outputs ({', '.join(untrained)}) are not reported."
        )
    sentences.append(model_sentence(model))
    sentences.append(AI_DISCLAIMER)
    return sentences


def build_diagnostic_report(
    ctx: OrderContext,
    result: TriageResult,
    *,
    observation_references: list[str],
    media_reference: str | None,
    issued: datetime,
    worklist_url: str | None = None,
    effective: str | None = None,
    conventions: Conventions = DEFAULT_CONVENTIONS,
) -> DiagnosticReport:
    """The preliminary AI report that groups the Observations and the heatmap for the EHR.

    `effective` is the study's time (else the acquisition's), a FHIR dateTime; `issued` is when the
    result was made. The narrative is the conclusion, a sentence per paragraph."""
    model = require_done(result)
    media = None
    if media_reference is not None and result.heatmap is not None:
        media = [
            DiagnosticReportMedia(
                comment=(
                    f"Grad-CAM heatmap for {codes.finding_display(result.heatmap.label)}, "
                    f"{result.heatmap.location}. {AI_DISCLAIMER}"
                ),
                link=ref(media_reference),
            )
        ]
    presented_form = None
    if worklist_url:
        # A link to the worklist page (result, heatmap, feedback) for EHRs that show it.
        presented_form = [
            Attachment(
                contentType="text/html",
                url=worklist_url,
                title="CDS triage worklist entry (AI result and heatmap)",
            )
        ]
    sentences = conclusion_sentences(result)
    return DiagnosticReport(
        meta=ai_asserted_meta("DiagnosticReport", result.mode, conventions, result.input_fit),
        text=narrative(*sentences),
        identifier=[result_identifier(result.study_uid, task_of(result), model.version, "report", conventions)],
        basedOn=based_on(ctx),
        status="preliminary",
        category=[concept(codes.V2_0074_SYSTEM, codes.V2_0074_RADIOLOGY, codes.V2_0074_RADIOLOGY_DISPLAY)],
        code=concept(codes.LOINC_SYSTEM, codes.LOINC_DIAGNOSTIC_IMAGING_STUDY, codes.LOINC_DIAGNOSTIC_IMAGING_STUDY_DISPLAY,
                     "AI triage result (preliminary)"),
        subject=patient_ref(ctx),
        effectiveDateTime=effective_time(effective),
        issued=issued,
        imagingStudy=[imaging_study_ref(ctx, result.study_uid)],
        result=[ref(r) for r in observation_references] or None,
        media=media,
        conclusion=" ".join(sentences),
        conclusionCode=[finding_code(f.label, conventions) for f in result.positive_findings] or None,
        presentedForm=presented_form,
    )
