"""Score a series slice by slice, in batches, and turn probabilities into Findings.

The study's probability per label comes from the slices as the card's `series_pooling` says
(`models.SeriesPooling`: the best run of neighbouring slices for head CT, the maximum for cards
without it), on the slices in anatomical order. The card's thresholds decide positivity; labels
the card says were never trained are reported as untrained and are never positive; a label
outside the card's `priority_labels` is reported with its probability and is never positive.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np

from cds_service.core.domain import NEGATIVE_LABELS, Finding
from cds_service.core.model_cards import ModelCard, SeriesPooling
from cds_service.core.models import LoadedModel
from cds_service.core.preprocessing import to_batch
from cds_service.core.settings import CPU_BATCH_SIZE


@dataclass(frozen=True)
class SeriesScores:
    """Per-slice probabilities (slices x labels), pooled into the study's by `pooling`.

    `features`, when the model gives them, is each slice's last feature map (slices x C x h x w):
    Grad-CAM of the driving slice is then computed from them (no second forward pass).
    """

    per_slice: np.ndarray
    features: np.ndarray | None = None
    pooling: SeriesPooling = SeriesPooling()

    @property
    def study(self) -> np.ndarray:
        """The study-level probability per label (in the slices' current order)."""
        return self.pooling.pool(self.per_slice)

    def driving_slice(self, label_index: int) -> int:
        """The slice that gave the study its score for this label (the top slice of the best run)."""
        return self.pooling.driving_slice(self.per_slice[:, label_index])

    def reordered(self, order: Sequence[int]) -> "SeriesScores":
        """The same scores with the slices in `order` (e.g. arrival order to anatomical order)."""
        index = np.asarray(order, dtype=int)
        return replace(self, per_slice=self.per_slice[index],
                       features=None if self.features is None else self.features[index])


def batch_sizes(count: int, batch_size: int) -> list[int]:
    """Sizes of equal batches for `count` slices: 40 at 16 → [13, 14, 13], not [16, 16, 8].

    A small last batch costs nearly as much per image as a single one.
    """
    if count <= 0:
        return []
    bounds = np.linspace(0, count, -(-count // max(1, batch_size)) + 1).round().astype(int)
    return [int(size) for size in np.diff(bounds)]


def score_images(model: LoadedModel, images: Sequence[np.ndarray], batch_size: int = CPU_BATCH_SIZE) -> SeriesScores:
    """Batched inference over preprocessed images (HxWx3 in [0, 1]); max-aggregated."""
    return score_stream(model, images, len(images), batch_size)


def score_stream(model: LoadedModel, images: Iterable[np.ndarray], expected: int,
                 batch_size: int = CPU_BATCH_SIZE, keep_features: bool = True) -> SeriesScores:
    """`score_images` for images still arriving: each batch is scored in a second thread
    while the next images are fetched and decoded in this one (the model releases the GIL).

    `expected` (the PACS's instance count, 0 if unknown) sets equal batches; more or fewer
    images than expected are all scored all the same. `keep_features=False` drops each batch's
    feature maps (1,280 x 7 x 7 floats a slice at 224 px: 75 MB for 300 slices): the explanation
    then scores its one slice again (`explain.refined_class_activation_map`).
    """
    spec = model.card.preprocessing
    sizes = batch_sizes(expected, batch_size)
    futures: list[Future] = []

    def score(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        probabilities, maps = model.predict_with_features(batch)
        return probabilities, maps if keep_features else None

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="score") as scorer:
        pending: list[np.ndarray] = []
        for image in images:
            pending.append(image)
            if len(pending) >= (sizes[0] if sizes else batch_size):
                futures.append(scorer.submit(score, to_batch(pending, spec)))
                pending, sizes = [], sizes[1:]
        if pending:
            futures.append(scorer.submit(score, to_batch(pending, spec)))
    if not futures:
        raise ValueError("no images to score")
    chunks = [future.result() for future in futures]
    per_slice = np.concatenate([probabilities for probabilities, _ in chunks], axis=0)
    features = None
    if keep_features and all(maps is not None for _, maps in chunks):
        features = np.concatenate([maps for _, maps in chunks], axis=0)
    return SeriesScores(per_slice=per_slice, features=features, pooling=model.card.series_pooling)


def presence(card: ModelCard, study_scores: np.ndarray) -> str | None:
    """For a card with a presence rule: the most probable positive class when 1 - p(negative)
    reaches the card's threshold, else "" (nothing raised). None for cards without the rule."""
    if card.presence_threshold is None:
        return None
    negative = [i for i, label in enumerate(card.labels) if label in NEGATIVE_LABELS]
    if len(negative) != 1:
        raise ValueError("a presence rule needs exactly one negative label")
    if 1.0 - float(study_scores[negative[0]]) < card.presence_threshold:
        return ""
    candidates = [i for i in range(len(card.labels)) if i != negative[0]]
    return card.labels[max(candidates, key=lambda i: study_scores[i])]


def findings_from_scores(card: ModelCard, study_scores: np.ndarray) -> tuple[Finding, ...]:
    """One Finding per label, positive where the card's threshold is reached.

    A label outside the card's priority labels (a subtype short of its bar on the validation split) is
    never positive: its probability is reported, it neither names a finding nor raises a study. In
    a sigmoid card with several labels the first (`any`) is the main one: a subtype is positive only
    beside it.
    """
    findings = []
    present = presence(card, study_scores)
    for index, label in enumerate(card.labels):
        probability = float(np.clip(study_scores[index], 0.0, 1.0))
        trained = label in card.trained_labels
        threshold = card.thresholds.get(label, 1.0)
        trusted = card.may_raise_priority(label)
        if present is None:
            positive = trained and trusted and label not in NEGATIVE_LABELS and probability >= threshold
        else:
            positive = trained and trusted and label == present
        findings.append(Finding(label, probability, positive, threshold, trained, trusted,
                                card.threshold_sources.get(label, "")))
    main = card.trained_labels[0] if card.activation == "sigmoid" and len(card.trained_labels) > 1 else None
    if main is not None and not next(f.positive for f in findings if f.label == main):
        # a subtype names the kind of what the main label found (RSNA: every subtype is also `any`)
        findings = [replace(f, positive=False) if f.positive else f for f in findings]
    return tuple(findings)
