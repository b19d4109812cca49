"""One trained label's probability as a preliminary imaging Observation."""

from __future__ import annotations

from datetime import datetime

from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.observation import Observation, ObservationComponent

from cds_service.core.domain import NEGATIVE_LABELS, Finding, OrderContext, TaskMode, TriageResult

from . import codes
from .common import (AI_DISCLAIMER, SHADOW_SENTENCE, ai_asserted_meta, based_on, concept, effective_time, finding_code,
                     imaging_study_ref, model_sentence, narrative, patient_ref, probability_quantity, ref, require_done,
                     task_of)
from .conventions import DEFAULT_CONVENTIONS, Conventions
from .identifiers import result_identifier


def build_observation(
    ctx: OrderContext,
    result: TriageResult,
    finding: Finding,
    *,
    device_reference: str,
    issued: datetime,
    effective: str | None = None,
    conventions: Conventions = DEFAULT_CONVENTIONS,
) -> Observation:
    """One trained label's study-level probability as a preliminary imaging Observation.

    Untrained outputs are refused: the model card says they were never trained, so they
    carry no meaning a clinician could use. `effective` is the study's time (else the
    acquisition's), a FHIR dateTime; `issued` is when the result was made.
    """
    if not finding.trained:
        raise ValueError(f"label {finding.label} was not trained and is not written to FHIR")
    model = require_done(result)
    display = codes.finding_display(finding.label)

    interpretation = None
    source = finding.threshold_source or f"the model card of {model.name} {model.version}"
    estimate = f"AI-estimated probability {finding.probability:.2f} of {display}; operating threshold {finding.threshold:.2f}, from {source}."
    reading = ""
    if finding.label in NEGATIVE_LABELS:
        # POS/NEG on "no tumor" would read as a double negative; report the number only.
        reading = "This label means 'nothing found' and is reported as a probability only."
    elif not finding.raises_priority:
        reading = ("Too few examples to trust this label as a finding (see the model card's priority_bar): "
                   "reported as a probability only.")
    else:
        interpretation = [_interpretation(finding.positive)]
        reading = f"Result: {'positive' if finding.positive else 'negative'} at that threshold."
    note = " ".join(filter(None, [estimate, reading if not interpretation else "", AI_DISCLAIMER]))
    shadow = SHADOW_SENTENCE if result.mode is TaskMode.SHADOW else ""

    return Observation(
        meta=ai_asserted_meta("Observation", result.mode, conventions, result.input_fit),
        text=narrative(shadow, estimate, reading, model_sentence(model), AI_DISCLAIMER),
        identifier=[result_identifier(result.study_uid, task_of(result), model.version,
                                      f"observation-{finding.label}", conventions)],
        basedOn=based_on(ctx),
        status="preliminary",
        category=[concept(codes.OBSERVATION_CATEGORY_SYSTEM, codes.OBSERVATION_CATEGORY_IMAGING,
                          codes.OBSERVATION_CATEGORY_IMAGING_DISPLAY)],
        code=_observation_code(finding.label, conventions),
        subject=patient_ref(ctx),
        effectiveDateTime=effective_time(effective),
        issued=issued,
        valueQuantity=probability_quantity(finding.probability),
        interpretation=interpretation,
        note=[Annotation(text=note)],
        method=_threshold_method(finding, source, conventions),
        device=ref(device_reference, f"{model.name} {model.version}"),
        derivedFrom=[imaging_study_ref(ctx)],
        component=[
            ObservationComponent(
                code=CodeableConcept(
                    coding=[
                        Coding(
                            system=conventions.component_system,
                            code=codes.COMPONENT_OPERATING_THRESHOLD,
                            display=codes.COMPONENT_CODES[codes.COMPONENT_OPERATING_THRESHOLD],
                        )
                    ],
                    text=f"Operating threshold ({'site' if finding.threshold_source else 'model card'})",
                ),
                valueQuantity=probability_quantity(finding.threshold),
            )
        ],
    )


def _threshold_method(finding: Finding, source: str, conventions: Conventions) -> CodeableConcept:
    """Observation.method: which operating threshold decided, the model card's or the site's own."""
    code = codes.METHOD_SITE_THRESHOLD if finding.threshold_source else codes.METHOD_CARD_THRESHOLD
    return CodeableConcept(
        coding=[Coding(system=conventions.method_system, code=code, display=codes.METHOD_CODES[code])],
        text=f"AI probability against the operating threshold {finding.threshold:.4g} from {source}",
    )


def _observation_code(label: str, conventions: Conventions) -> CodeableConcept:
    code = finding_code(label, conventions)
    code.text = f"AI probability: {codes.finding_display(label)}"
    return code


def _interpretation(positive: bool) -> CodeableConcept:
    if positive:
        code, display = codes.INTERPRETATION_POSITIVE, codes.INTERPRETATION_POSITIVE_DISPLAY
    else:
        code, display = codes.INTERPRETATION_NEGATIVE, codes.INTERPRETATION_NEGATIVE_DISPLAY
    return concept(codes.INTERPRETATION_SYSTEM, code, display)
