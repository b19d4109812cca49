"""The Grad-CAM heatmap as a Media resource (inline PNG), and reading back which slice it explains."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.attachment import Attachment
from fhir.resources.R4B.extension import Extension
from fhir.resources.R4B.media import Media

from cds_service.core.domain import OrderContext, TaskMode, TriageResult

from . import codes
from .common import (AI_DISCLAIMER, OID, SHADOW_SENTENCE, ai_asserted_meta, based_on, concept, model_sentence, narrative,
                     patient_ref, ref, require_done, task_of)
from .conventions import DEFAULT_CONVENTIONS, Conventions
from .identifiers import result_identifier


def build_media(
    ctx: OrderContext,
    result: TriageResult,
    *,
    device_reference: str,
    issued: datetime,
    conventions: Conventions = DEFAULT_CONVENTIONS,
) -> Media:
    """The Grad-CAM overlay PNG, inline (base64), so the EHR can show why the model fired."""
    heatmap = result.heatmap
    if heatmap is None:
        raise ValueError("result has no heatmap")
    model = require_done(result)
    display = codes.finding_display(heatmap.label)

    where = heatmap.location
    if heatmap.sop_instance_uid:
        where += f" (SOP Instance UID {heatmap.sop_instance_uid}{', its middle slice' if heatmap.averaged_slices > 1 else ''})"
    note = (
        f"Grad-CAM heatmap for {display} (label '{heatmap.label}'), {where}. "
        "Explanation overlay, not a diagnostic image. " + AI_DISCLAIMER
    )
    finding = next((f for f in result.findings if f.label == heatmap.label), None)
    probability = f" (AI-estimated probability {finding.probability:.2f})" if finding else ""
    return Media(
        meta=ai_asserted_meta("Media", result.mode, conventions, result.input_fit),
        text=narrative(SHADOW_SENTENCE if result.mode is TaskMode.SHADOW else "",
                       f"Grad-CAM heatmap: where the model looked for {display}{probability}, {where}.",
                       "Explanation overlay, not a diagnostic image.", model_sentence(model), AI_DISCLAIMER),
        identifier=[result_identifier(result.study_uid, task_of(result), model.version, "media", conventions)],
        basedOn=based_on(ctx),
        status="completed",
        type=concept(codes.MEDIA_TYPE_SYSTEM, codes.MEDIA_TYPE_IMAGE, codes.MEDIA_TYPE_IMAGE_DISPLAY),
        subject=patient_ref(ctx),
        issued=issued,
        device=ref(device_reference, f"{model.name} {model.version}"),
        extension=_heatmap_source_extension(heatmap.sop_instance_uid, conventions),
        # positiveInt: leave out a size the heatmap did not know rather than write 0.
        width=heatmap.width if heatmap.width > 0 else None,
        height=heatmap.height if heatmap.height > 0 else None,
        content=Attachment(
            contentType="image/png",
            data=base64.b64encode(heatmap.png),
            size=len(heatmap.png),
            title=f"Grad-CAM heatmap: {display}, {where}",
        ),
        note=[Annotation(text=note)],
    )


def _heatmap_source_extension(sop_instance_uid: str | None, conventions: Conventions) -> list[Extension] | None:
    """The explained slice's SOP Instance UID as an extension, when it is a UID FHIR's oid type takes."""
    if not sop_instance_uid or not OID.fullmatch(sop_instance_uid):
        return None
    return [Extension(url=conventions.heatmap_source_extension, valueOid=f"{codes.URN_OID_PREFIX}{sop_instance_uid}")]


def heatmap_source_instance(media: Any, conventions: Conventions = DEFAULT_CONVENTIONS) -> str | None:
    """The SOP Instance UID of the slice our heatmap Media explains (its extension), else None."""
    extensions = media.get("extension") if isinstance(media, dict) else None
    for extension in extensions or []:
        if isinstance(extension, dict) and extension.get("url") == conventions.heatmap_source_extension:
            value = extension.get("valueOid")
            uid = value.removeprefix(codes.URN_OID_PREFIX) if isinstance(value, str) else ""
            return uid if OID.fullmatch(uid) else None
    return None
