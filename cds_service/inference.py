"""Score a series slice by slice, in batches, and turn probabilities into Findings.

A study is positive for a label if any slice is (max per label): a bleed on one slice of
forty is a bleed. The card's thresholds decide positivity; labels the card says were
never trained are reported as untrained and are never positive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .domain import NEGATIVE_LABELS, Finding
from .models import LoadedModel, ModelCard
from .preprocessing import to_batch


@dataclass(frozen=True)
class SeriesScores:
    """Per-slice probabilities (slices x labels) and the study-level aggregate.

    `features`, when the model gives them, is each slice's last feature map (slices x C x h x w):
    Grad-CAM of the driving slice is then computed from them (no second forward pass).
    """

    per_slice: np.ndarray
    study: np.ndarray
    features: np.ndarray | None = None

    def driving_slice(self, label_index: int) -> int:
        """The slice whose score gave the study its score for this label."""
        return int(np.argmax(self.per_slice[:, label_index]))


def score_images(model: LoadedModel, images: Sequence[np.ndarray], batch_size: int = 16) -> SeriesScores:
    """Batched inference over preprocessed images (HxWx3 in [0, 1]); max-aggregated.

    Batches are of equal size (40 slices at 16: 13+14+13, not 16+16+8): a small last
    batch costs nearly as much per image as a single one.
    """
    if not images:
        raise ValueError("no images to score")
    spec = model.card.preprocessing
    bounds = np.linspace(0, len(images), -(-len(images) // max(1, batch_size)) + 1).round().astype(int)
    chunks = [model.predict_with_features(to_batch(images[lo:hi], spec)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    per_slice = np.concatenate([probabilities for probabilities, _ in chunks], axis=0)
    features = None
    if all(maps is not None for _, maps in chunks):
        features = np.concatenate([maps for _, maps in chunks], axis=0)
    return SeriesScores(per_slice=per_slice, study=per_slice.max(axis=0), features=features)


def findings_from_scores(card: ModelCard, study_scores: np.ndarray) -> tuple[Finding, ...]:
    """One Finding per label, positive where the card's threshold is reached."""
    findings = []
    for index, label in enumerate(card.labels):
        probability = float(np.clip(study_scores[index], 0.0, 1.0))
        trained = label in card.trained_labels
        threshold = card.thresholds.get(label, 1.0)
        positive = trained and label not in NEGATIVE_LABELS and probability >= threshold
        findings.append(Finding(label, probability, positive, threshold, trained))
    return tuple(findings)
