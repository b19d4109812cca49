"""One trained label's probability as a preliminary imaging Observation."""

from __future__ import annotations

from datetime import datetime

from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.observation import Observation, ObservationComponent

from cds_service.core.domain import NEGATIVE_LABELS, Finding, OrderContext, TriageResult

from . import codes
from .common import (AI_DISCLAIMER, ai_asserted_meta, based_on, finding_code, imaging_study_ref, patient_ref,
                     probability_quantity, ref, require_done, task_of)
from .identifiers import result_identifier


def build_observation(
    ctx: OrderContext,
    result: TriageResult,
    finding: Finding,
    *,
    device_reference: str,
    issued: datetime,
) -> Observation:
    """One trained label's study-level probability as a preliminary imaging Observation.

    Untrained outputs are refused: the model card says they were never trained, so they
    carry no meaning a clinician could use.
    """
    if not finding.trained:
        raise ValueError(f"label {finding.label} was not trained and is not written to FHIR")
    model = require_done(result)
    display = codes.finding_display(finding.label)

    interpretation = None
    source = finding.threshold_source or f"the model card of {model.name} {model.version}"
    note = f"AI-estimated probability {finding.probability:.2f} of {display}; operating threshold {finding.threshold:.2f}, from {source}. "
    if finding.label in NEGATIVE_LABELS:
        # POS/NEG on "no tumor" would read as a double negative; report the number only.
        note += "This label means 'nothing found' and is reported as a probability only. "
    elif not finding.raises_priority:
        note += ("Too few examples to trust this label as a finding (see the model card's priority_bar): "
                 "reported as a probability only. ")
    else:
        interpretation = [_interpretation(finding.positive)]
    note += AI_DISCLAIMER

    return Observation(
        meta=ai_asserted_meta(result.mode),
        identifier=[result_identifier(result.study_uid, task_of(result), model.version,
                                      f"observation-{finding.label}")],
        basedOn=based_on(ctx),
        status="preliminary",
        category=[
            CodeableConcept(
                coding=[
                    Coding(
                        system=codes.OBSERVATION_CATEGORY_SYSTEM,
                        code=codes.OBSERVATION_CATEGORY_IMAGING,
                        display=codes.OBSERVATION_CATEGORY_IMAGING_DISPLAY,
                    )
                ]
            )
        ],
        code=_observation_code(finding.label),
        subject=patient_ref(ctx),
        issued=issued,
        valueQuantity=probability_quantity(finding.probability),
        interpretation=interpretation,
        note=[Annotation(text=note)],
        method=_threshold_method(finding, source),
        device=ref(device_reference, f"{model.name} {model.version}"),
        derivedFrom=[imaging_study_ref(ctx)],
        component=[
            ObservationComponent(
                code=CodeableConcept(
                    coding=[
                        Coding(
                            system=codes.LOCAL_COMPONENT_SYSTEM,
                            code=codes.COMPONENT_OPERATING_THRESHOLD,
                            display="Operating threshold",
                        )
                    ],
                    text=f"Operating threshold ({'site' if finding.threshold_source else 'model card'})",
                ),
                valueQuantity=probability_quantity(finding.threshold),
            )
        ],
    )


def _threshold_method(finding: Finding, source: str) -> CodeableConcept:
    """Observation.method: which operating threshold decided, the model card's or the site's own."""
    site = bool(finding.threshold_source)
    return CodeableConcept(
        coding=[Coding(system=codes.LOCAL_METHOD_SYSTEM,
                       code=codes.METHOD_SITE_THRESHOLD if site else codes.METHOD_CARD_THRESHOLD,
                       display="Site operating threshold" if site else "Model card operating threshold")],
        text=f"AI probability against the operating threshold {finding.threshold:.4g} from {source}",
    )


def _observation_code(label: str) -> CodeableConcept:
    code = finding_code(label)
    code.text = f"AI probability: {codes.finding_display(label)}"
    return code


def _interpretation(positive: bool) -> CodeableConcept:
    if positive:
        code, display = codes.INTERPRETATION_POSITIVE, codes.INTERPRETATION_POSITIVE_DISPLAY
    else:
        code, display = codes.INTERPRETATION_NEGATIVE, codes.INTERPRETATION_NEGATIVE_DISPLAY
    return CodeableConcept(
        coding=[Coding(system=codes.INTERPRETATION_SYSTEM, code=code, display=display)]
    )
