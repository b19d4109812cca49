"""A site's own validation (`cds-triage validate`): one score per study, the truth beside it;
the operating points, AUC, calibration and small-number warnings of one binary decision."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .metrics import binary_auc, proportion, rounded, threshold_for_sensitivity

# --- a site's own validation: one score per study, the truth beside it (`cds-triage validate`) -------

SENSITIVITY_TARGETS = (0.90, 0.95, 0.98)
SMALL_SAMPLE = 30  # fewer positives or negatives than this: every figure's interval is wide, and the report says so


def operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """What raising every study with p >= threshold does on this set: the 2x2 counts, sensitivity,
    specificity, PPV, NPV and the share raised, each with its Wilson interval."""
    y, raised = np.asarray(y).astype(bool), np.asarray(p, dtype=np.float64) >= threshold
    tp, fp = int((raised & y).sum()), int((raised & ~y).sum())
    fn, tn = int((~raised & y).sum()), int((~raised & ~y).sum())
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "sensitivity": proportion(tp, tp + fn), "specificity": proportion(tn, tn + fp),
            "ppv": proportion(tp, tp + fp), "npv": proportion(tn, tn + fn), "raised": proportion(tp + fp, len(y))}


def sensitivity_operating_points(y: np.ndarray, p: np.ndarray,
                                 targets: Sequence[float] = SENSITIVITY_TARGETS) -> list[dict[str, Any]]:
    """For each target sensitivity, the highest threshold reaching it on this set and what it does.

    Chosen on the same studies it is measured on, so the sensitivity shown is at least the target by
    construction: the specificity beside it is the figure to read."""
    return [{"target_sensitivity": target, **operating_point(y, p, threshold_for_sensitivity(y, p, target))}
            for target in targets]


def auc_with_ci(y: np.ndarray, p: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """ROC AUC with a stratified percentile-bootstrap 95% interval: positives and negatives are
    resampled separately, so every resample keeps this set's counts of each (none lacks a class)."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, dtype=np.float64)
    pos, neg = p[y], p[~y]
    value = binary_auc(y, p)
    if not len(pos) or not len(neg):
        return {"value": None, "ci95": [None, None], "positives": len(pos), "negatives": len(neg),
                "interval": "needs positives and negatives"}
    rng = np.random.default_rng(seed)
    truth = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    draws = [binary_auc(truth, np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(resamples)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    out = {"value": rounded(value), "ci95": [rounded(float(lo)), rounded(float(hi))], "positives": len(pos), "negatives": len(neg),
           "interval": f"stratified percentile bootstrap, {resamples} resamples"}
    if hi - lo < 1e-9:
        out["note"] = (f"every resample gives {value:.3f}: with {len(pos)} positives and {len(neg)} negatives the bootstrap "
                       "cannot show how uncertain this is; read it as a rough figure")
    return out


def reliability_bins(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width probability bins (the last includes 1.0): how many studies, their mean predicted
    probability and the observed share positive (Wilson interval). Empty bins are left out."""
    y, p = np.asarray(y).astype(bool), np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    index = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        if mask.any():
            out.append({"lower": b / bins, "upper": (b + 1) / bins, "n": int(mask.sum()),
                        "mean_predicted": rounded(float(p[mask].mean())), "observed": proportion(int(y[mask].sum()), int(mask.sum()))})
    return out


def calibration_summary(y: np.ndarray, p: np.ndarray, bins: int | None = None) -> dict[str, Any]:
    """Reliability bins, Brier score (beside the Brier score of always saying the prevalence, the
    score a useless but calibrated model gets) and expected calibration error (ECE: the bins' mean
    |observed - predicted|, weighted by their counts)."""
    y, p = np.asarray(y).astype(bool), np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    bins = bins or (10 if len(y) >= 200 else 5)
    table = reliability_bins(y, p, bins)
    prevalence = float(y.mean()) if len(y) else math.nan
    ece = sum(b["n"] * abs((b["observed"]["value"] or 0.0) - (b["mean_predicted"] or 0.0)) for b in table) / max(1, len(y))
    return {"bins": table, "bin_count": bins, "brier": rounded(float(np.mean((p - y) ** 2)) if len(y) else math.nan),
            "brier_at_prevalence": rounded(prevalence * (1 - prevalence)), "ece": rounded(ece),
            "mean_predicted": rounded(float(p.mean()) if len(p) else math.nan), "prevalence": rounded(prevalence)}


def small_number_warnings(positives: int, negatives: int, minimum: int = SMALL_SAMPLE) -> list[str]:
    """Plain-words warnings for a set too small to say much (the intervals say how much)."""
    warnings = []
    for count, what, figures in ((positives, "positives", "sensitivity"), (negatives, "negatives", "specificity")):
        if count == 0:
            warnings.append(f"no {what}: {figures} and AUC cannot be measured on this set")
        elif count < minimum:
            warnings.append(f"only {count} {what} (fewer than {minimum}): {figures} and AUC are uncertain, "
                            f"read the 95% intervals, not the point values")
    return warnings


def binary_validation(y: np.ndarray, p: np.ndarray, thresholds: dict[str, float],
                      targets: Sequence[float] = SENSITIVITY_TARGETS, resamples: int = 2000) -> dict[str, Any]:
    """Every figure of a site validation for one binary decision: AUC (interval), average precision,
    the named thresholds' operating points (e.g. {"model card": 0.66, "site": 0.41}), the thresholds
    for each target sensitivity, calibration and small-number warnings."""
    from sklearn.metrics import average_precision_score

    y, p = np.asarray(y).astype(bool), np.asarray(p, dtype=np.float64)
    positives, negatives = int(y.sum()), int((~y).sum())
    auc = auc_with_ci(y, p, resamples)
    return {
        "n": len(y), "positives": positives, "negatives": negatives,
        "auc": auc,
        "average_precision": rounded(float(average_precision_score(y, p))) if positives and negatives else None,
        "at_thresholds": {name: operating_point(y, p, t) for name, t in thresholds.items()},
        "at_target_sensitivity": sensitivity_operating_points(y, p, targets) if positives else [],
        "calibration": calibration_summary(y, p),
        "warnings": small_number_warnings(positives, negatives) + ([f"AUC: {auc['note']}"] if auc.get("note") else []),
    }
