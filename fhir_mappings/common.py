"""Pieces every resource builder shares: references, the AI label, the probability quantity, checks.

Pure (no I/O); the resource modules (observation.py, media.py, ...) import from here, never from
each other, so a new resource type (a DICOM SR link, an "unfamiliar input" marking) adds one module.
"""

from __future__ import annotations

import html
import re
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.meta import Meta
from fhir.resources.R4B.narrative import Narrative
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference

from cds_service.core.domain import DISCLAIMER, InputFit, ModelRef, OrderContext, Task, TaskMode, TriageResult, TriageStatus

from . import codes
from .conventions import DEFAULT_CONVENTIONS, Conventions
from .reading import fhir_datetime

#: Last sentence of every conclusion and note: the words a clinician must see.
AI_DISCLAIMER = DISCLAIMER  # the name FHIR builders and their tests use

# FHIR's oid type (without its urn:oid: prefix): what an extension's valueOid accepts.
OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


def ai_asserted_meta(resource_type: str, mode: TaskMode = TaskMode.ACTIVE,
                     conventions: Conventions = DEFAULT_CONVENTIONS, input_fit: InputFit = InputFit.UNCHECKED) -> Meta:
    """Our profile, the AI security label(s) (AIAST, HL7 AI Transparency on FHIR, and/or the site's own,
    CDS_AI_SECURITY_LABEL), the shadow-mode tag when the task runs silently (readers show it as
    information only), and the unfamiliar-input tag when the input check found the images unlike the
    model's training images."""
    tags = ([codes.SHADOW_TAG_CODE] if mode is TaskMode.SHADOW else []) + (
        [codes.UNFAMILIAR_INPUT_TAG_CODE] if input_fit is InputFit.UNFAMILIAR else [])
    return Meta(
        profile=[conventions.profile(resource_type)],
        security=[Coding.model_validate(label.as_dict()) for label in conventions.ai_labels],
        tag=[Coding.model_validate(conventions.tag(code)) for code in tags] or None,
    )


def narrative(*paragraphs: str) -> Narrative:
    """A generated narrative: each paragraph escaped into a <p> of the XHTML div FHIR requires."""
    body = "".join(f"<p>{html.escape(text, quote=False)}</p>" for text in paragraphs if text)
    return Narrative(status="generated", div=f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>')


def model_sentence(model: ModelRef) -> str:
    return f"Model: {model.name} {model.version}."


SHADOW_SENTENCE = ("SHADOW MODE: this task runs silently at this site; the result is recorded for local "
                   "validation and did not change the order's priority.")
UNFAMILIAR_SENTENCE = ("UNFAMILIAR IMAGES: these images are unlike the ones the model learnt from (another scanner, "
                       "protocol or export); they were scored, but the model's measured accuracy may not hold for them.")


def is_shadow(resource: Any, conventions: Conventions = DEFAULT_CONVENTIONS) -> bool:
    """Whether a resource we wrote (a dict from the server) carries the shadow-mode tag."""
    return conventions.has_tag(resource, codes.SHADOW_TAG_CODE)


def is_unfamiliar(resource: Any, conventions: Conventions = DEFAULT_CONVENTIONS) -> bool:
    """Whether a resource we wrote carries the unfamiliar-input tag (scored, images unlike the training images)."""
    return conventions.has_tag(resource, codes.UNFAMILIAR_INPUT_TAG_CODE)


def ref(reference: str, display: str | None = None) -> Reference:
    return Reference(reference=reference, display=display)


def patient_ref(ctx: OrderContext) -> Reference:
    return ref(f"Patient/{ctx.patient_id}")


def imaging_study_ref(ctx: OrderContext, study_uid: str = "") -> Reference:
    """The order's ImagingStudy; with `study_uid` also its DICOM Study Instance UID as the reference's identifier
    (R4 lets a Reference carry both), so whoever reads the report alone can open the study in a viewer."""
    identifier = Identifier(system=codes.DICOM_UID_SYSTEM, value=f"{codes.URN_OID_PREFIX}{study_uid}") if study_uid else None
    return Reference(reference=f"ImagingStudy/{ctx.imaging_study_id}", identifier=identifier)


def based_on(ctx: OrderContext) -> list[Reference] | None:
    """The order the result answers, when the study came with one."""
    if not ctx.service_request_id:
        return None
    return [ref(f"ServiceRequest/{ctx.service_request_id}")]


def probability_quantity(value: float) -> Quantity:
    """A 0-1 probability as a UCUM unity quantity (see codes.UCUM_UNITY for why not %)."""
    return Quantity(
        value=Decimal(str(round(float(value), 4))),  # the decimal pydantic made of the rounded float before
        unit=codes.UCUM_UNITY,
        system=codes.UCUM_SYSTEM,
        code=codes.UCUM_UNITY,
    )


def require_timezone(issued: datetime) -> None:
    # FHIR instants must carry a zone; a naive datetime would be read as server-local time.
    if issued.tzinfo is None or issued.utcoffset() is None:
        raise ValueError("issued must be timezone-aware (e.g. datetime.now(timezone.utc))")


def effective_time(effective: str | None) -> Any:  # Any: the models type dateTime as datetime, yet take any precision
    """The clinically relevant time of a result (the study's, else the acquisition's), as a FHIR dateTime;
    refused when malformed: a wrong time on a finding is worse than none."""
    if effective is None:
        return None
    if fhir_datetime(effective) is None:
        raise ValueError(f"effective time {effective!r} is not a FHIR dateTime")
    return effective


_T = TypeVar("_T")


def first(items: list[_T] | None) -> _T:
    """The first of a list our builders always fill (an identifier, a tag)."""
    if not items:
        raise ValueError("a resource built here lacks the identifier or tag it always gets")
    return items[0]


def task_of(result: TriageResult) -> Task:
    """The task of a result that has FHIR resources (a done triage always names its task)."""
    if result.task is None:
        raise ValueError("a triage result without a task has no FHIR resources")
    return result.task


def task_value(task: Task | str) -> str:
    return task.value if isinstance(task, Task) else str(task)


def concept(system: str, code: str, display: str, text: str | None = None) -> CodeableConcept:
    """A CodeableConcept of one coding (a category, a type, a role)."""
    return CodeableConcept(coding=[Coding(system=system, code=code, display=display)], text=text)


def finding_code(label: str, conventions: Conventions = DEFAULT_CONVENTIONS) -> CodeableConcept:
    """Code of a finding label: verified standard codes first, then always our local code."""
    codings = [
        Coding(system=std.system, code=std.code, display=std.display)
        for std in codes.STANDARD_FINDING_CODES.get(label, ())
    ]
    codings.append(
        Coding(system=conventions.finding_system, code=label, display=codes.finding_display(label))
    )
    return CodeableConcept(coding=codings, text=codes.finding_display(label))


def require_done(result: TriageResult) -> ModelRef:
    """Only a DONE result has findings and a model; anything else must not reach FHIR."""
    if result.status is not TriageStatus.DONE:
        raise ValueError(
            f"only a done triage result is written to FHIR, not {result.status.value} "
            f"(study {result.study_uid})"
        )
    assert result.model is not None and result.task is not None  # guaranteed by TriageResult
    return result.model
