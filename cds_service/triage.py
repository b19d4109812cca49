"""The triage of one series' images: score, decide, explain. No I/O.

Shared by the service's pipeline and the `cds-triage triage` command, so a study gets the
same answer whether it came from the PACS or from local files.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .domain import Priority, TriageResult, TriageStatus
from .explain import explain
from .inference import findings_from_scores, score_images
from .models import LoadedModel
from .priority import suggest_priority


def triage_images(
    model: LoadedModel,
    images: Sequence[np.ndarray],
    rules: Mapping[str, Priority],
    *,
    study_uid: str,
    series_uid: str = "",
    sop_instance_uids: Sequence[str] = (),
    batch_size: int = 16,
    with_heatmap: bool = True,
) -> TriageResult:
    """Score every image, aggregate to the study, and explain the top positive finding."""
    scores = score_images(model, images, batch_size)
    findings = findings_from_scores(model.card, scores.study)
    result_top = max((f for f in findings if f.positive), key=lambda f: f.probability, default=None)
    heatmap = None
    if result_top is not None and with_heatmap:
        index = scores.driving_slice(model.card.labels.index(result_top.label))
        sop = sop_instance_uids[index] if index < len(sop_instance_uids) else ""
        features = scores.features[index] if scores.features is not None else None
        heatmap = explain(model, images[index], result_top.label, slice_index=index, sop_instance_uid=sop,
                          features=features)
    return TriageResult(
        study_uid=study_uid,
        status=TriageStatus.DONE,
        task=model.card.task,
        series_uid=series_uid,
        findings=findings,
        suggested_priority=suggest_priority(findings, rules),
        model=model.card.ref,
        heatmap=heatmap,
        slices_scored=len(images),
    )
