"""Provenance: who made the results (the model Device) from what (the ImagingStudy), and when."""

from __future__ import annotations

from datetime import datetime

from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.meta import Meta
from fhir.resources.R4B.provenance import Provenance, ProvenanceAgent, ProvenanceEntity

from cds_service.core.domain import OrderContext, TriageResult

from . import codes
from .common import concept, imaging_study_ref, model_sentence, narrative, ref, require_done, task_of
from .conventions import DEFAULT_CONVENTIONS, Conventions
from .identifiers import result_identifier


def build_provenance(
    ctx: OrderContext,
    result: TriageResult,
    *,
    target_references: list[str],
    device_reference: str,
    issued: datetime,
    conventions: Conventions = DEFAULT_CONVENTIONS,
) -> Provenance:
    """Who made the results (the model Device) from what (the ImagingStudy), and when.

    No AIAST label here: this record is written by our software about the AI, it is not
    itself an AI assertion. R4 Provenance has no identifier, so idempotency uses a
    meta.tag carrying the deterministic UUID (searched with `_tag` in ifNoneExist).
    """
    if not target_references:
        raise ValueError("a Provenance needs at least one target")
    model = require_done(result)
    uuid = result_identifier(result.study_uid, task_of(result), model.version, "provenance", conventions).value
    return Provenance(
        meta=Meta(profile=[conventions.profile("Provenance")],
                  tag=[Coding(system=codes.URI_SYSTEM, code=f"urn:uuid:{uuid}")]),
        text=narrative(f"Made by the AI triage model from ImagingStudy/{ctx.imaging_study_id}: "
                       f"{len(target_references)} result resource(s).", model_sentence(model)),
        target=[ref(r) for r in target_references],
        recorded=issued,
        agent=[
            ProvenanceAgent(
                type=concept(codes.PROVENANCE_PARTICIPANT_SYSTEM, codes.PROVENANCE_PARTICIPANT_PERFORMER,
                             codes.PROVENANCE_PARTICIPANT_PERFORMER_DISPLAY),
                who=ref(device_reference, f"{model.name} {model.version}"),
            )
        ],
        entity=[
            ProvenanceEntity(
                role=codes.PROVENANCE_ENTITY_ROLE_DERIVATION,
                what=imaging_study_ref(ctx),
            )
        ],
    )
