"""What a model does on images of another source it never trained on: the card's `external_check`.

A test split drawn from the training source flatters: its scanners, windows and framing are the
training images'. So each card that has one records the model's figures on a labelled set from
elsewhere (`EXTERNAL_SOURCES`), scored by the model itself through the service's preprocessing,
whatever the input check says of the images (their familiarity is reported beside). Nothing here
chooses anything: the threshold is the card's.

    python -m cds_training.training external-check --task head_ct_ich --data ../shared/data
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cds_service.core.domain import TASK_LABELS, Task
from cds_service.core.evaluation import auc_with_ci, operating_point
from cds_service.core.input_profile import image_statistics, load_profile
from cds_service.core.model_cards import card_path
from cds_service.core.models import load_model
from cds_service.core.preprocessing import resize

from .datasets import discover_samples
from .input_check import FIT_NAMES
from .pixels import load_image
from .predictions import predict_samples

# task -> (folder under the shared data, what it is)
EXTERNAL_SOURCES: dict[Task, tuple[str, str]] = {
    Task.HEAD_CT_ICH: ("head_ct_png", "another hospital's head CT (Kitamura, Kaggle 'Head CT - hemorrhage'): single "
                                      "slices, 75 with haemorrhage and 75 without, windowed, cropped and sized by their "
                                      "source; label `any` only"),
}


def external_check(weights_dir: Path, task: Task, data_dir: Path, resamples: int = 2000, note: str = "") -> dict[str, Any]:
    """Score the task's external set with the card's model and record it in the card (`external_check`).
    `note`: how the set was used besides (e.g. it broke a tie between two recipes), said beside its figures."""
    folder, what = EXTERNAL_SOURCES[task]
    samples = discover_samples(task, Path(data_dir) / folder)
    model = load_model(Path(weights_dir), task, runtime="torch")
    card = json.loads(card_path(Path(weights_dir), task).read_text())
    label = TASK_LABELS[task][0]
    j = list(model.card.labels).index(label)
    probs = predict_samples(model, samples)[:, j]
    truth = np.array([s.targets[j] > 0.5 for s in samples])
    threshold = float(model.card.thresholds[label])
    point = operating_point(truth, probs, threshold)
    block: dict[str, Any] = {
        "source": f"../shared/data/{folder}", "what": what, "label": label, "images": len(samples),
        "positives": int(truth.sum()), "negatives": int((~truth).sum()),
        "auc": auc_with_ci(truth, probs, resamples),
        "at_card_threshold": {"threshold": threshold, "sensitivity": point["sensitivity"],
                              "specificity": point["specificity"]},
        "unit": "single slices, each scored alone (the card's series rule needs neighbouring slices)",
        **({"note": note} if note else {}),
    }
    profile = load_profile(Path(weights_dir), task.value, card)
    if profile is not None:
        spec = model.card.preprocessing
        distances = profile.distances(np.stack([image_statistics(resize(load_image(s.path, spec), spec.input_size))
                                                for s in samples]))
        fits = [profile.fit_of(float(d)) for d in distances]
        block["input_check"] = {key: fits.count(fit) for key, fit in FIT_NAMES.items()}
    card["external_check"] = block
    card_path(Path(weights_dir), task).write_text(json.dumps(card, indent=2) + "\n")
    return block

