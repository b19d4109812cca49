"""The metrics of a trained triage model on a labelled set, each with its 95% interval.

Pure numpy/scikit-learn functions over (targets, probabilities) arrays, so that training
(which writes the card), `cds-triage evaluate` and the tests all compute a metric the
same way. Every headline metric comes with a 95% confidence interval: Wilson score
intervals for proportions (accuracy, sensitivity, specificity: they stay honest at small n,
where a percentile bootstrap reports 1.000 [1.000, 1.000] from 15 positives), a percentile
bootstrap for AUC and balanced accuracy. With a few dozen to a few hundred images the
interval says more than the point estimate.

Decision rules, matching `cds_service.core.inference`:
- softmax (brain MRI): the predicted class is the most probable label; accuracy and the
  confusion matrix use that. Each label's operating threshold (one-vs-rest, p >= t) is
  reported beside it.
- sigmoid (head CT, chest): a label is positive when p >= its card threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

TARGET_SENSITIVITY = 0.95
BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class Predictions:
    """What the model said on a set of images, with the truth beside it.

    `targets` and `known` are N x labels: 0/1 truth and whether that truth is known (a
    folder layout for head CT only knows `any`). For softmax tasks `targets` is one-hot.
    """

    labels: tuple[str, ...]
    activation: str
    targets: np.ndarray
    known: np.ndarray
    probs: np.ndarray
    files: tuple[str, ...] = ()

    def subset(self, index: np.ndarray) -> "Predictions":
        return Predictions(
            self.labels,
            self.activation,
            self.targets[index],
            self.known[index],
            self.probs[index],
            tuple(self.files[i] for i in index) if self.files else (),
        )


# --- elementary metrics ----------------------------------------------------------------


def binary_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count half); NaN when only one class is present."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.asarray(p, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion; (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion_counts(pred: "Predictions", thresholds: dict[str, float]) -> dict[str, tuple[int, int]]:
    """(successes, n) behind each proportion metric of `point_metrics`, for Wilson intervals."""
    out: dict[str, tuple[int, int]] = {}
    dec = decisions(pred, thresholds)
    if pred.activation == "softmax":
        truth, guess = pred.targets.argmax(1), pred.probs.argmax(1)
        out["accuracy"] = (int((truth == guess).sum()), len(truth))
    else:
        j = _first_trained(pred)
        keep = pred.known[:, j].astype(bool)
        out["accuracy"] = (int((pred.targets[keep, j].astype(bool) == dec[keep, j]).sum()), int(keep.sum()))
    for j in trained_label_indices(pred):
        label = pred.labels[j]
        keep = pred.known[:, j].astype(bool)
        y = pred.targets[keep, j].astype(bool)
        rules = {"": dec[keep, j]}
        if label in thresholds:
            rules["_at_threshold"] = pred.probs[keep, j] >= thresholds[label]
        for suffix, d in rules.items():
            out[f"{label}.sensitivity{suffix}"] = (int((d & y).sum()), int(y.sum()))
            out[f"{label}.specificity{suffix}"] = (int((~d & ~y).sum()), int((~y).sum()))
    return out


def sensitivity_specificity(y: np.ndarray, decision: np.ndarray) -> tuple[float, float]:
    """(TP/(TP+FN), TN/(TN+FP)); NaN where a class is absent."""
    y = np.asarray(y).astype(bool)
    d = np.asarray(decision).astype(bool)
    sens = float((d & y).sum() / y.sum()) if y.any() else float("nan")
    spec = float((~d & ~y).sum() / (~y).sum()) if (~y).any() else float("nan")
    return sens, spec


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float = TARGET_SENSITIVITY) -> float:
    """The highest threshold t with sensitivity (p >= t among positives) of at least `target`.

    Rounded down to 6 decimals so that the JSON value still lets the same positives pass.
    A triage model should rather over-call than miss, hence a sensitivity target and not
    the 0.5 default.
    """
    y = np.asarray(y).astype(bool)
    if not y.any():
        return 0.5
    pos = np.sort(np.asarray(p, dtype=np.float64)[y])[::-1]
    k = max(1, math.ceil(target * len(pos) - 1e-9))
    return float(math.floor(pos[k - 1] * 1e6) / 1e6)


def threshold_within_budget(y: np.ndarray, p: np.ndarray, target: float, negatives_raised_at_most: float) -> float:
    """The lowest threshold whose share of negatives raised (p >= t) stays within the budget, if its
    sensitivity reaches `target`; else `threshold_for_sensitivity(y, p, target)`.

    For a triage rule with room on the negative side: `threshold_for_sensitivity` sits exactly on the
    validation positives, so images from elsewhere, scored a little lower, fall below it; spending the
    negative budget on a lower threshold keeps that margin instead. Rounded down to 6 decimals like it."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    tightest = threshold_for_sensitivity(y, p, target)
    negatives = np.sort(p[~y])[::-1]
    if not len(negatives) or not y.any():
        return tightest
    allowed = int(math.floor(negatives_raised_at_most * len(negatives) + 1e-9))  # negatives that may be raised
    if allowed >= len(negatives):
        return float(math.floor(float(p.min()) * 1e6) / 1e6)
    # just above the (allowed + 1)-th highest negative: that one and every lower one stay below
    cut = float(math.floor(negatives[allowed] * 1e6) / 1e6) + 1e-6
    return round(min(cut, tightest), 6) if cut <= tightest else tightest


def decisions(pred: Predictions, thresholds: dict[str, float]) -> np.ndarray:
    """N x labels 0/1 decisions: argmax for softmax, p >= threshold for sigmoid."""
    if pred.activation == "softmax":
        return np.eye(len(pred.labels), dtype=bool)[pred.probs.argmax(1)]
    t = np.array([thresholds.get(label, 1.0) for label in pred.labels])
    return pred.probs >= t[None, :]


def confusion(pred: Predictions, thresholds: dict[str, float]) -> tuple[np.ndarray, list[str]]:
    """Confusion matrix (rows truth, columns prediction) and its axis names."""
    if pred.activation == "softmax":
        truth = pred.targets.argmax(1)
        guess = pred.probs.argmax(1)
        n = len(pred.labels)
        m = np.zeros((n, n), dtype=int)
        np.add.at(m, (truth, guess), 1)
        return m, list(pred.labels)
    # sigmoid: a 2x2 table for the first trained label (the triage-driving one)
    j = _first_trained(pred)
    keep = pred.known[:, j].astype(bool)
    y = pred.targets[keep, j].astype(bool)
    d = decisions(pred, thresholds)[keep, j]
    m = np.array([[int((~y & ~d).sum()), int((~y & d).sum())], [int((y & ~d).sum()), int((y & d).sum())]])
    return m, [f"no {pred.labels[j]}", pred.labels[j]]


def _first_trained(pred: Predictions) -> int:
    for j in range(len(pred.labels)):
        if pred.known[:, j].any():
            return j
    return 0


def trained_label_indices(pred: Predictions) -> list[int]:
    """Labels with known truth on this set (untrained head-CT subtypes drop out)."""
    return [j for j in range(len(pred.labels)) if pred.known[:, j].any()]


# --- the metric set, with bootstrap intervals ---------------------------------------------


def point_metrics(pred: Predictions, thresholds: dict[str, float]) -> dict[str, float]:
    """Flat name -> value: accuracy, balanced accuracy, per-label sensitivity/specificity/AUC."""
    out: dict[str, float] = {}
    dec = decisions(pred, thresholds)
    idx = trained_label_indices(pred)
    if pred.activation == "softmax":
        truth = pred.targets.argmax(1)
        guess = pred.probs.argmax(1)
        out["accuracy"] = float((truth == guess).mean())
        recalls = [float((guess[truth == j] == j).mean()) for j in idx if (truth == j).any()]
        out["balanced_accuracy"] = float(np.mean(recalls)) if recalls else float("nan")
    else:
        j = _first_trained(pred)
        keep = pred.known[:, j].astype(bool)
        y = pred.targets[keep, j].astype(bool)
        d = dec[keep, j]
        out["accuracy"] = float((y == d).mean()) if keep.any() else float("nan")
        sens, spec = sensitivity_specificity(y, d)
        out["balanced_accuracy"] = float(np.nanmean([sens, spec]))
    aucs = []
    for j in idx:
        label = pred.labels[j]
        keep = pred.known[:, j].astype(bool)
        y = pred.targets[keep, j]
        p = pred.probs[keep, j]
        sens, spec = sensitivity_specificity(y, dec[keep, j])
        out[f"{label}.sensitivity"] = sens
        out[f"{label}.specificity"] = spec
        t = thresholds.get(label)
        if t is not None:
            sens_t, spec_t = sensitivity_specificity(y, p >= t)
            out[f"{label}.sensitivity_at_threshold"] = sens_t
            out[f"{label}.specificity_at_threshold"] = spec_t
        auc = binary_auc(y, p)
        out[f"{label}.auc"] = auc
        aucs.append(auc)
    if len(aucs) > 1:
        valid = [a for a in aucs if not math.isnan(a)]
        out["macro_auc"] = float(np.mean(valid)) if valid else float("nan")
    return out


def bootstrap_ci(
    statistic: Callable[[np.ndarray], dict[str, float]],
    n: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile 95% interval of every statistic, resampling the n images with replacement."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        for name, value in statistic(rng.integers(0, n, n)).items():
            draws.setdefault(name, []).append(value)
    out = {}
    for name, values in draws.items():
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[~np.isnan(arr)]
        out[name] = (float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))) if len(arr) else (math.nan, math.nan)
    return out


def metrics_with_ci(
    pred: Predictions, thresholds: dict[str, float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict[str, Any]:
    """Card/JSON-ready metrics: {name: {"value", "ci95": [lo, hi]}} plus counts and matrix.

    Thresholds stay fixed inside the bootstrap, so intervals do not include the
    uncertainty of choosing the threshold on this same set.
    """
    point = point_metrics(pred, thresholds)
    ci = bootstrap_ci(lambda idx: point_metrics(pred.subset(idx), thresholds), len(pred.probs), resamples, seed)
    counts = proportion_counts(pred, thresholds)
    metrics: dict[str, Any] = {}
    for name, value in point.items():
        if name in counts:
            k, n = counts[name]
            lo, hi = wilson_interval(k, n)
            metrics[name] = {"value": rounded(value), "ci95": [rounded(lo), rounded(hi)], "count": [k, n], "interval": "wilson"}
        else:
            lo, hi = ci.get(name, (math.nan, math.nan))
            metrics[name] = {"value": rounded(value), "ci95": [rounded(lo), rounded(hi)]}
    matrix, axis = confusion(pred, thresholds)
    positives = {pred.labels[j]: int(pred.targets[pred.known[:, j].astype(bool), j].sum()) for j in trained_label_indices(pred)}
    return {
        "n_images": int(len(pred.probs)),
        "positives_per_label": positives,
        "decision_rule": "argmax" if pred.activation == "softmax" else "p >= threshold",
        "metrics": metrics,
        "confusion_matrix": {"rows_truth_cols_prediction": axis, "counts": matrix.tolist()},
        "bootstrap": {"resamples": resamples, "seed": seed, "interval": "percentile 2.5-97.5",
                      "used_for": "AUC and balanced accuracy; proportions use Wilson score intervals"},
    }


def rounded(value: float | None) -> float | None:
    """A figure as cards and reports store it: 4 decimals, None for NaN."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)


def choose_thresholds(pred: Predictions, target: float = TARGET_SENSITIVITY) -> dict[str, float]:
    """Per trained label (one-vs-rest for softmax): the threshold reaching `target` sensitivity."""
    out = {}
    for j in trained_label_indices(pred):
        keep = pred.known[:, j].astype(bool)
        out[pred.labels[j]] = threshold_for_sensitivity(pred.targets[keep, j], pred.probs[keep, j], target)
    return out


def proportion(successes: int, n: int) -> dict[str, Any]:
    """A share with its Wilson 95% interval and the count behind it (value None for n = 0)."""
    lo, hi = wilson_interval(successes, n)
    return {"value": rounded(successes / n if n else math.nan), "ci95": [rounded(lo), rounded(hi)], "count": [successes, n],
            "interval": "wilson"}
