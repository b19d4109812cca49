"""How a model holds up when its own test images look as if another scanner had made them: the
card's `acquisition_shift`.

Where no labelled set from another source exists (brain MR: every labelled image comes from one
public collection), this is the nearest honest estimate we can make of what a site will see: the
test split (which chose nothing) re-made as another hospital's scanner or export might make it —
another display curve (gamma), a coarser matrix, a softer kernel, more noise. Each change is made
to the stored grey image *before* the service's own preprocessing (which percentile-normalises MR,
so a plain brightness or contrast change is undone there and is not tried). At the card's own
operating point it records the share of each class raised, with Wilson 95 % intervals, and what the
input check says (a refused tumour counts as a missed one).

It is a stress test, not an external validation: real images from elsewhere also differ in
sequence, plane mix, contrast agent and patients. Nothing here chooses a threshold or weights.

    python -m cds_training.training shift-check --task brain_mri --data ../shared/data --weights weights
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cds_service.core.domain import InputFit, Task
from cds_service.core.evaluation import proportion
from cds_service.core.input_profile import image_statistics, load_profile
from cds_service.core.model_cards import card_path
from cds_service.core.models import load_model
from cds_service.core.preprocessing import grey_to_image, load_grey, resize, to_batch

from .cards import SHIFT_SENTENCE_START, shift_sentence

Shift = Callable[[np.ndarray], np.ndarray]

#: the tasks this is recorded for, and their data folder under the shared data
SHIFT_TASKS: dict[Task, str] = {Task.BRAIN_MRI: "brain_mri"}


def gamma(power: float) -> Shift:
    return lambda grey: 255.0 * np.power(np.clip(grey, 0.0, 255.0) / 255.0, power)


def coarser(share: float) -> Shift:
    def shift(grey: np.ndarray) -> np.ndarray:
        h, w = grey.shape
        small = cv2.resize(grey, (max(8, round(w * share)), max(8, round(h * share))), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return shift


def blurred(sigma: float) -> Shift:
    return lambda grey: cv2.GaussianBlur(grey, (0, 0), sigma)


def noisy(sd: float) -> Shift:
    def shift(grey: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(int(grey.sum()) % 100_003)  # an image gets the same noise in every run
        return np.clip(grey + rng.normal(0.0, sd, grey.shape), 0.0, 255.0).astype(np.float32)
    return shift


#: name -> change; "as stored" first: it must reproduce the card's own test figures
SHIFTS: dict[str, Shift] = {
    "as stored": lambda grey: grey,
    "gamma 0.6 (brighter mid-greys)": gamma(0.6),
    "gamma 1.6 (darker mid-greys)": gamma(1.6),
    "half the matrix (coarser)": coarser(0.5),
    "blur sigma 1.5 px (softer kernel)": blurred(1.5),
    "noise sd 8 grey levels": noisy(8.0),
}


def shift_figures(weights_dir: Path, task: Task, data_dir: Path, part: str = "test", batch: int = 32) -> dict[str, Any]:
    """The `acquisition_shift` block of the card in `weights_dir`, on one of its own splits (`<task>.split.json`):
    the test split for the card (it chose nothing); the validation split to compare models (a choice)."""
    weights_dir = Path(weights_dir)
    card = json.loads(card_path(weights_dir, task).read_text())
    rows = json.loads((weights_dir / f"{task.value}.split.json").read_text()).get(part) or []
    if not rows:
        raise ValueError(f"{task.value}.split.json has no {part} split to re-make")
    model = load_model(weights_dir, task, runtime="torch")
    profile = load_profile(weights_dir, task.value, card)
    spec, labels = model.card.preprocessing, list(model.card.labels)
    negative = card["presence"]["negative_label"]
    threshold = float(card["presence"]["threshold"])
    truth = np.array([labels[int(np.argmax(row["targets"]))] for row in rows])
    tumours = truth != negative
    greys = [load_grey(Path(data_dir) / row["file"]) for row in rows]
    block: dict[str, Any] = {
        "split": part,
        "what": (f"the {part} split{' (which chose nothing)' if part == 'test' else ''} re-made as another scanner "
                 "might: each change made to the stored grey image before the service's preprocessing; raised by the "
                 "card's presence rule at its threshold"),
        "threshold": threshold, "negative_label": negative, "images": len(rows), "changes": {},
        "limits": "a stress test, not an external validation: real images from elsewhere also differ in sequence, "
                  "plane mix, contrast agent and patients",
    }
    for name, change in SHIFTS.items():
        images = [grey_to_image(change(grey.copy()), spec) for grey in greys]
        probs = np.concatenate([model.predict(to_batch(images[i : i + batch], spec)) for i in range(0, len(images), batch)])
        raised = (1.0 - probs[:, labels.index(negative)]) >= threshold
        refused = np.zeros(len(images), bool)
        entry: dict[str, Any] = {"raised": {label: proportion(int(raised[truth == label].sum()), int((truth == label).sum()))
                                            for label in labels}}
        if profile is not None:
            distances = profile.distances(np.stack([image_statistics(resize(im, spec.input_size)) for im in images]))
            fits = [profile.fit_of(float(d)) for d in distances]
            refused = np.array([fit is InputFit.WRONG_ANATOMY for fit in fits])
            entry["refused"] = proportion(int(refused.sum()), len(images))
            entry["unfamiliar"] = proportion(fits.count(InputFit.UNFAMILIAR), len(images))
        entry["tumours_raised"] = proportion(int((raised & ~refused)[tumours].sum()), int(tumours.sum()))  # refused = missed
        block["changes"][name] = entry
    return block


def shift_check(weights_dir: Path, task: Task, data_dir: Path) -> dict[str, Any]:
    """Measure and record the block in the card (`acquisition_shift`)."""
    block = shift_figures(weights_dir, task, data_dir)
    path = card_path(Path(weights_dir), task)
    card = json.loads(path.read_text())
    card["acquisition_shift"] = block
    card["limitations"] = [line for line in card["limitations"] if not line.startswith(SHIFT_SENTENCE_START)] + [shift_sentence(block)]
    path.write_text(json.dumps(card, indent=2) + "\n")
    return block
