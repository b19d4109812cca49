"""Operating rules beyond one threshold per label, measured on labelled slices: "anything there?"
for a softmax task with a negative class (brain MRI), a series rule from slice scores (head CT),
and the Youden point for labels that only name what was found."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .metrics import (BOOTSTRAP_RESAMPLES, Predictions, binary_auc, bootstrap_ci, proportion, rounded,
                      sensitivity_specificity, threshold_for_sensitivity, wilson_interval)

# --- "anything there?": the triage decision of a softmax task with a negative class -------------


def presence_scores(pred: Predictions, negative_label: str) -> tuple[np.ndarray, np.ndarray]:
    """(truth, score) of "something is there": truth = not the negative class, score = 1 - p(negative)."""
    j = pred.labels.index(negative_label)
    return pred.targets[:, j] < 0.5, 1.0 - pred.probs[:, j]


def presence_metrics(pred: Predictions, negative_label: str, threshold: float, resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """What triage cares about for brain MRI: tumours raised, tumour-free images raised, per class.

    Proportions with Wilson intervals, AUC with a percentile bootstrap.
    """
    truth, score = presence_scores(pred, negative_label)
    raised = score >= threshold
    auc = binary_auc(truth, score)
    ci = bootstrap_ci(lambda idx: {"auc": binary_auc(truth[idx], score[idx])}, len(truth), resamples)["auc"]

    def share(mask: np.ndarray) -> dict[str, Any]:
        return proportion(int((raised & mask).sum()), int(mask.sum()))

    classes = pred.targets.argmax(1)
    per_class = {label: share(classes == j) for j, label in enumerate(pred.labels) if label != negative_label}
    accuracy_k = int((classes == pred.probs.argmax(1)).sum())
    lo, hi = wilson_interval(accuracy_k, len(classes))
    return {
        "rule": f"raised when 1 - p({negative_label}) >= {threshold}",
        "threshold": threshold,
        "auc": {"value": rounded(auc), "ci95": [rounded(ci[0]), rounded(ci[1])]},
        "raised_with_finding": share(truth),
        "raised_without_finding": share(~truth),
        "raised_per_class": per_class,
        "class_accuracy": {"value": rounded(accuracy_k / len(classes)), "ci95": [rounded(lo), rounded(hi)],
                           "count": [accuracy_k, len(classes)], "interval": "wilson"},
    }


# --- series decisions from slice scores (head CT) --------------------------------------------------


@dataclass(frozen=True)
class SeriesSimulation:
    """How a series-level rule is expected to behave, from slice scores of labelled single slices.

    The labelled data has no whole series, so series are assembled: `slices` slices drawn from the
    negatives, and for a bleeding series a contiguous run of `run_lengths` (uniform) slices drawn
    from the positives placed at random. Scores within a series are drawn independently; real
    neighbours are correlated, so the false-raise estimate is a guide, not a measurement.
    """

    slices: int = 32
    run_lengths: tuple[int, int] = (1, 12)
    trials: int = 4000
    seed: int = 0

    def scores(self, positives: np.ndarray, negatives: np.ndarray, pool: Callable[[np.ndarray], float]) -> tuple[np.ndarray, np.ndarray]:
        """Pooled scores of `trials` bleeding and `trials` normal series."""
        rng = np.random.default_rng(self.seed)
        bleeding, normal = np.empty(self.trials), np.empty(self.trials)
        for i in range(self.trials):
            series = rng.choice(negatives, self.slices)
            normal[i] = pool(series)
            run = int(rng.integers(self.run_lengths[0], self.run_lengths[1] + 1))
            start = int(rng.integers(0, self.slices - run + 1))
            series = series.copy()
            series[start : start + run] = rng.choice(positives, run)
            bleeding[i] = pool(series)
        return bleeding, normal

    def to_card(self) -> dict[str, Any]:
        return {"slices_per_series": self.slices, "bleeding_run_lengths": list(self.run_lengths), "trials": self.trials,
                "seed": self.seed, "assumption": "slice scores drawn independently from the labelled slices of the split; "
                "a bleed is one contiguous run of slices"}


def series_operating_point(positives: np.ndarray, negatives: np.ndarray, pool: Callable[[np.ndarray], float],
                           target: float, simulation: SeriesSimulation = SeriesSimulation()) -> dict[str, Any]:
    """The highest series threshold whose simulated share of bleeding series raised is >= target,
    and what the simulation expects at it (share of normal series raised, series AUC)."""
    bleeding, normal = simulation.scores(positives, negatives, pool)
    threshold = threshold_for_sensitivity(np.ones(len(bleeding), bool), bleeding, target)
    return {"threshold": threshold, **series_rates(bleeding, normal, threshold)}


def series_rates(bleeding: np.ndarray, normal: np.ndarray, threshold: float) -> dict[str, Any]:
    y = np.r_[np.ones(len(bleeding), bool), np.zeros(len(normal), bool)]
    return {"bleeding_series_raised": rounded(float((bleeding >= threshold).mean())),
            "normal_series_raised": rounded(float((normal >= threshold).mean())),
            "series_auc": rounded(binary_auc(y, np.r_[bleeding, normal]))}


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (rounded down to 6 decimals).

    For labels that only name what was found (hemorrhage subtypes beside `any`): a balanced point,
    not the near-zero threshold a high sensitivity target gives a weak label, which would name every
    subtype on every bleed."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return 0.5
    p = np.asarray(p, dtype=np.float64)
    candidates = np.unique(p)
    best, best_j = 0.5, -1.0
    for t in candidates:
        sens, spec = sensitivity_specificity(y, p >= t)
        if sens + spec - 1 > best_j:
            best, best_j = float(t), sens + spec - 1
    return float(math.floor(best * 1e6) / 1e6)
