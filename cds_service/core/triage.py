"""The triage of one series' images: score, decide, explain. No I/O.

Shared by the service's pipeline (which scores slices as they arrive, then calls
`triage_scores`) and the `cds-triage triage` command (`triage_images`), so a study gets the
same answer whether it came from the PACS or from local files.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from cds_service.core.domain import Priority, TriageResult, TriageStatus
from cds_service.core.explain import explain
from cds_service.core.inference import SeriesScores, findings_from_scores, score_images
from cds_service.core.models import LoadedModel
from cds_service.core.priority import suggest_priority
from cds_service.core.settings import CPU_BATCH_SIZE

if TYPE_CHECKING:
    from cds_service.core.slabs import SlabPlan


def triage_images(
    model: LoadedModel,
    images: Sequence[np.ndarray],
    rules: Mapping[str, Priority],
    *,
    study_uid: str,
    series_uid: str = "",
    sop_instance_uids: Sequence[str] = (),
    batch_size: int = CPU_BATCH_SIZE,
    with_heatmap: bool = True,
) -> TriageResult:
    """Score every image, aggregate to the study, and explain the top positive finding."""
    scores = score_images(model, images, batch_size)
    return triage_scores(model, scores, images.__getitem__, rules, study_uid=study_uid, series_uid=series_uid,
                         sop_instance_uids=sop_instance_uids, with_heatmap=with_heatmap)


def triage_scores(
    model: LoadedModel,
    scores: SeriesScores,
    image_of_slice: Callable[[int], np.ndarray],
    rules: Mapping[str, Priority],
    *,
    study_uid: str,
    series_uid: str = "",
    sop_instance_uids: Sequence[str] = (),
    with_heatmap: bool = True,
    slab_plan: "SlabPlan | None" = None,
) -> TriageResult:
    """Findings and priority from a series' scores, and the top positive finding explained.

    `image_of_slice` gives a slice's image (HxWx3 in [0, 1], as preprocessed for the model); only
    the driving slice's is asked for: the explanation scores it again (shifted, for a finer map, or
    through pytorch-grad-cam) and draws the overlay on it. With a `slab_plan` that averaged thin slices,
    the scores are the slabs' and the heatmap says which slab, of how many slices, it was drawn on.
    """
    findings = findings_from_scores(model.card, scores.study)
    slabs = slab_plan if slab_plan is not None and slab_plan.slabbed else None
    result_top = max((f for f in findings if f.positive), key=lambda f: f.probability, default=None)
    heatmap = None
    if result_top is not None and with_heatmap:
        index = scores.driving_slice(model.card.labels.index(result_top.label))
        sop = sop_instance_uids[index] if index < len(sop_instance_uids) else ""
        features = scores.features[index] if scores.features is not None else None
        heatmap = explain(model, image_of_slice(index), result_top.label, slice_index=index, sop_instance_uid=sop,
                          features=features)
        if slabs is not None and index < len(slabs.groups):
            heatmap = replace(heatmap, averaged_slices=len(slabs.groups[index]), slab_mm=slabs.thickness_mm)
    return TriageResult(
        study_uid=study_uid,
        status=TriageStatus.DONE,
        task=model.card.task,
        series_uid=series_uid,
        findings=findings,
        suggested_priority=suggest_priority(findings, rules),
        model=model.card.ref,
        heatmap=heatmap,
        slices_scored=len(scores.per_slice),
        instances_read=slabs.instances if slabs is not None else len(scores.per_slice),
        slab_mm=slabs.thickness_mm if slabs is not None else None,
    )
