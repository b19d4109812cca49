"""The input check's profile of a trained model (`input-profile`): fitted on its training split, measured on every source."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cds_service.core.domain import InputFit, Task
from cds_service.core.input_profile import DEFAULT_QUANTILE, STATISTICS, InputProfile, fit_profile, image_statistics, profile_path
from cds_service.core.model_cards import card_path
from cds_service.core.preprocessing import PreprocessingSpec, resize

from .datasets import (
    build_split,
    discover_samples,
    resolve_data_dir,
)
from .pixels import load_image

#: the card's names for what the input check says of an image (`InputProfile.fit_of`), in the card's order
FIT_NAMES = {"familiar": InputFit.FAMILIAR, "refused": InputFit.WRONG_ANATOMY, "unfamiliar": InputFit.UNFAMILIAR}

# Images the service's DICOM path must accept for a task (real DICOM of the training source).
DICOM_CHECKS = {Task.HEAD_CT_ICH: "head_ct_dicom_unlabelled"}


# Other image sets of the same anatomy, measured (never fitted on): how far the familiar region reaches, and
# what no image of the right anatomy is ever beyond (`refuse_beyond`).
SAME_TASK_OTHER_SOURCES = {Task.HEAD_CT_ICH: {"head_ct_rsna_png/unlabelled": "same source (RSNA), unlabelled slices",
                                              "head_ct_png": "another hospital's head CT (Kitamura), windowed and cropped differently"}}


OTHER_TASK_SAMPLE = 300


# Pixels alone refuse an image this many times farther than the farthest right-anatomy image we have, from any source.
REFUSE_MARGIN = 1.25


def write_input_profile(weights_dir: Path, task: Task, data_dir: Path, quantile: float = DEFAULT_QUANTILE) -> dict[str, Any]:
    """Fit the task's input profile (cds_service.core.input_profile) on the card's training split, choose its
    familiarity threshold on the validation split, and set `refuse_beyond` from every right-anatomy image we
    have (all splits, the real DICOM path, other sources of the same anatomy): `REFUSE_MARGIN` times the
    farthest of them. Measure what each source and the other tasks' images get (familiar, unfamiliar,
    refused); write `<task>.input-profile.npz` and the card's block."""
    cpath = card_path(Path(weights_dir), task)
    card = json.loads(cpath.read_text())
    spec = PreprocessingSpec.from_card(card["preprocessing"], card["input_size"])
    data_dir = Path(data_dir)
    card_dir = Path(card["data"]["dir"])
    task_dir = resolve_data_dir(task, card_dir if card_dir.is_dir() else data_dir)
    train_set, val_set, test_set = build_split(task, task_dir, card["data"]["split"])

    def stats(paths: Sequence[Path]) -> np.ndarray:  # of the model input, as the service computes them
        return np.stack([image_statistics(resize(load_image(Path(p), spec), spec.input_size)) for p in paths])

    def sample(paths: list[Path]) -> list[Path]:
        return [paths[i] for i in sorted(np.random.default_rng(0).permutation(len(paths))[:OTHER_TASK_SAMPLE])]

    same: dict[str, np.ndarray] = {"validation": stats([s.path for s in val_set])}
    if test_set:
        same["test"] = stats([s.path for s in test_set])
    if task in DICOM_CHECKS and (folder := data_dir / DICOM_CHECKS[task]).is_dir():
        same[f"{DICOM_CHECKS[task]} (real DICOM, the service's decoding path)"] = stats(sorted(folder.glob("*.dcm")))
    for folder_name, what in SAME_TASK_OTHER_SOURCES.get(task, {}).items():
        if (folder := data_dir / folder_name).is_dir():
            same[f"{folder_name} ({what})"] = stats(sample(sorted(folder.rglob("*.png"))))
    train_stats = stats([s.path for s in train_set])
    fitted = fit_profile(train_stats, same["validation"], quantile)
    farthest = max(float(fitted.distances(x).max()) for x in [train_stats, *same.values()])
    profile = InputProfile(mean=fitted.mean, precision=fitted.precision, threshold=fitted.threshold,
                           refuse_beyond=max(REFUSE_MARGIN * farthest, 1.01 * fitted.threshold))
    blob = profile.to_bytes()
    profile_path(Path(weights_dir), task.value).write_bytes(blob)

    def shares(statistics: np.ndarray) -> dict[str, Any]:
        d = profile.distances(statistics)
        fits = [profile.fit_of(float(x)) for x in d]
        counts = {key: fits.count(fit) for key, fit in FIT_NAMES.items()}
        return {key: {"count": n, "of": len(d), "rate": round(n / len(d), 4)} for key, n in counts.items()}

    others = {other.value: shares(stats(sample([s.path for s in discover_samples(other, resolve_data_dir(other, data_dir))])))
              for other in Task if other is not task}
    card["input_check"] = {
        "file": profile_path(Path(weights_dir), task.value).name,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "statistics": STATISTICS,
        "fitted_on": f"the training split ({len(train_set)} images): mean and Ledoit-Wolf shrunk covariance",
        "threshold": round(profile.threshold, 3),
        "threshold_policy": f"familiar up to the {100 * quantile:g}th percentile of the validation split's Mahalanobis distances",
        "refuse_beyond": round(float(profile.refuse_beyond or 0.0), 3),
        "refuse_beyond_policy": f"{REFUSE_MARGIN:g} times the farthest right-anatomy image we have ({farthest:.2f}), "
                                "from the training split and every source below",
        "same_anatomy": {name: shares(x) for name, x in same.items()},
        "other_tasks": others,
        "limits": "Refuses the wrong modality or body part by the DICOM header, a CT that is not head-shaped, and images "
                  "farther from the training images than any image of the right anatomy we have; scores, and marks "
                  "unfamiliar, images of the right anatomy far from the training images (another scanner, protocol or "
                  "export). It does not tell a good image from a poor one of the right kind; a series is judged on the "
                  "median of its middle slices; an image file without a header is judged on its pixels alone, which "
                  "tell a head CT from a brain MR poorly.",
    }
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    return card["input_check"]
