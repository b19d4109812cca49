# Over 400 lines on purpose: one set of statistics (ROC, Wilson and bootstrap intervals, operating points) and its reports, shared by training, validate and drift.
"""Validation metrics, operating thresholds and plots for a trained triage model.

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
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cds_service.core.domain import DISCLAIMER

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
            metrics[name] = {"value": _r(value), "ci95": [_r(lo), _r(hi)], "count": [k, n], "interval": "wilson"}
        else:
            lo, hi = ci.get(name, (math.nan, math.nan))
            metrics[name] = {"value": _r(value), "ci95": [_r(lo), _r(hi)]}
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


def _r(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)


def choose_thresholds(pred: Predictions, target: float = TARGET_SENSITIVITY) -> dict[str, float]:
    """Per trained label (one-vs-rest for softmax): the threshold reaching `target` sensitivity."""
    out = {}
    for j in trained_label_indices(pred):
        keep = pred.known[:, j].astype(bool)
        out[pred.labels[j]] = threshold_for_sensitivity(pred.targets[keep, j], pred.probs[keep, j], target)
    return out


# --- plots ---------------------------------------------------------------------------------


def write_plots(pred: Predictions, thresholds: dict[str, float], out_dir: Path, title: str) -> list[Path]:
    """ROC, precision-recall, confusion matrix and calibration PNGs; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve, roc_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    idx = trained_label_indices(pred)
    written: list[Path] = []

    def per_label(j: int) -> tuple[np.ndarray, np.ndarray]:
        keep = pred.known[:, j].astype(bool)
        return pred.targets[keep, j].astype(int), pred.probs[keep, j]

    fig, ax = plt.subplots(figsize=(5, 5))
    for j in idx:
        y, p = per_label(j)
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label=f"{pred.labels[j]} (AUC {binary_auc(y, p):.3f})")
            t = thresholds.get(pred.labels[j])
            if t is not None:
                sens, spec = sensitivity_specificity(y, p >= t)
                ax.plot([1 - spec], [sens], "o", color=ax.lines[-1].get_color())
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, validation split\n{title}")
    ax.legend(loc="lower right", fontsize=8)
    written.append(_save(fig, out_dir / "roc.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    for j in idx:
        y, p = per_label(j)
        if 0 < y.sum():
            precision, recall, _ = precision_recall_curve(y, p)
            ax.plot(recall, precision, label=f"{pred.labels[j]} (prevalence {y.mean():.2f})")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=f"Precision-recall, validation split\n{title}")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    written.append(_save(fig, out_dir / "pr.png"))

    matrix, axis = confusion(pred, thresholds)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.imshow(matrix, cmap="Blues")
    for (r, c), v in np.ndenumerate(matrix):
        ax.text(c, r, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(axis)), axis, rotation=30, ha="right")
    ax.set_yticks(range(len(axis)), axis)
    rule = "argmax" if pred.activation == "softmax" else "p >= threshold"
    ax.set(xlabel=f"prediction ({rule})", ylabel="truth", title=f"Confusion matrix\n{title}")
    written.append(_save(fig, out_dir / "confusion_matrix.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    bins = 10 if len(pred.probs) >= 200 else 5
    for j in idx:
        y, p = per_label(j)
        if 0 < y.sum() < len(y):
            frac, mean_p = calibration_curve(y, p, n_bins=bins, strategy="quantile")
            ax.plot(mean_p, frac, "o-", label=pred.labels[j])
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction positive", title=f"Calibration (quantile bins)\n{title}")
    ax.legend(loc="upper left", fontsize=8)
    written.append(_save(fig, out_dir / "calibration.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def format_metric(block: dict[str, Any], name: str) -> str:
    """'0.953 (95% CI 0.94-0.97)' for reports and the README."""
    m = block.get(name)
    if not m or m["value"] is None:
        return "n/a"
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} (95% CI {lo:.3f}-{hi:.3f})"


def summarise(labels: Sequence[str], block: dict[str, Any]) -> list[str]:
    """Human-readable lines of a metrics block, one per metric."""
    return [f"{name}: {format_metric(block['metrics'], name)}" for name in block["metrics"]]


# --- weights/README.md ---------------------------------------------------------------------


def format_estimate(block: dict[str, Any] | None, digits: int = 3, missing: str = "—") -> str:
    """`0.912 (0.871–0.944)`, with the count for proportions: `0.912 (0.871–0.944; 93/102)`."""
    if not block or block.get("value") is None:
        return missing
    lo, hi = block.get("ci95") or [None, None]
    count = f"; {block['count'][0]}/{block['count'][1]}" if block.get("count") else ""
    ci = f" ({lo:.{digits}f}–{hi:.{digits}f}{count})" if lo is not None and hi is not None else ""
    return f"{block['value']:.{digits}f}{ci}"



def _headline(card: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, validation, test) rows a clinician reads first, per task."""
    val, test = card.get("validation_metrics", {}).get("metrics", {}), card.get("test_metrics", {}).get("metrics", {})
    rows: list[tuple[str, str, str]] = []
    if "presence" in card:
        pv, pt = card["presence"].get("validation", {}), card["presence"].get("test", {})
        rows += [("tumour present: AUC", format_estimate(pv.get("auc")), format_estimate(pt.get("auc"))),
                 ("tumours raised (sensitivity)", format_estimate(pv.get("raised_with_finding")), format_estimate(pt.get("raised_with_finding"))),
                 ("tumour-free images raised", format_estimate(pv.get("raised_without_finding")), format_estimate(pt.get("raised_without_finding")))]
        for label in pv.get("raised_per_class", {}):
            rows.append((f"{label} raised", format_estimate(pv["raised_per_class"][label]), format_estimate(pt.get("raised_per_class", {}).get(label))))
        rows.append(("class accuracy (argmax)", format_estimate(pv.get("class_accuracy")), format_estimate(pt.get("class_accuracy"))))
        return rows
    main = card["trained_labels"][0]
    rows += [(f"{main}: AUC per image", format_estimate(val.get(f"{main}.auc")), format_estimate(test.get(f"{main}.auc"))),
             (f"{main}: sensitivity per image at the threshold", format_estimate(val.get(f"{main}.sensitivity_at_threshold")),
              format_estimate(test.get(f"{main}.sensitivity_at_threshold"))),
             (f"{main}: specificity per image at the threshold", format_estimate(val.get(f"{main}.specificity_at_threshold")),
              format_estimate(test.get(f"{main}.specificity_at_threshold")))]
    series = card.get("series_operating_point")
    if series:
        for key, what in (("series_auc", "series AUC (simulated series)"),
                          ("bleeding_series_raised", "bleeding series raised (simulated)"),
                          ("normal_series_raised", "normal series raised (simulated)")):
            rows.append((what, f"{series['validation'][key]:.3f}", f"{series.get('test', {}).get(key, float('nan')):.3f}"))
    for label in card["trained_labels"][1:]:
        rows.append((f"{label}: AUC per image", format_estimate(val.get(f"{label}.auc")), format_estimate(test.get(f"{label}.auc"))))
    return rows


def weights_readme(cards: Sequence[dict[str, Any]]) -> str:
    """weights/README.md from the model cards: regenerated after every training, never edited by hand
    (`python -m cds_training.training readme`; tests/test_weights.py checks it is current)."""
    lines = [
        "# Model weights and model cards",
        "",
        "<!-- generated from the cards by `python -m cds_training.training readme`; do not edit by hand -->",
        "",
        f"**{DISCLAIMER}** These models only move studies up a radiologist's",
        "worklist; a radiologist reads every study, in full.",
        "",
        "Each task has `<task>.safetensors` (EfficientNet-B0, fp16) and its card `<task>.json`: labels,",
        "preprocessing, operating thresholds, data, training, metrics with 95% intervals and limits. The",
        "service reads only those two. `<task>.split.json` lists every validation and test image with its",
        "truth and the model's probabilities, so anyone can recompute the card (the project's tests do).",
        "",
        "How to read the figures: the data is split once, by patient or by groups of near-identical",
        "images, into **train**, **validation** (chose the epoch and the thresholds) and **test** (chose",
        "nothing). The test column is what to expect; both are small, so read the 95% interval in brackets",
        "(Wilson for proportions, with the count; bootstrap for AUC), not only the number.",
        "",
        "## Summary",
        "",
        "| model | flags | default mode | test figure that matters most |",
        "|---|---|---|---|",
    ]
    for card in cards:
        rows = _headline(card)
        lines.append(f"| `{card['task']}` {card['version']} | {card['intended_use']} | {card.get('default_mode', 'active')} "
                     f"| {rows[0][0]}: {rows[0][2]}; {rows[1][0]}: {rows[1][2]} |")
    for card in cards:
        training, data = card.get("training", {}), card.get("data", {})
        counts, split = data.get("counts", {}), data.get("split", {})
        init = training.get("imagenet_init") or {}
        lines += [
            "",
            f"## {card['task']}: {card['name']} {card['version']} ({card.get('date', '')})",
            "",
            f"**Intended use.** {card['intended_use']}",
            "",
            f"**Default mode:** {card.get('default_mode', 'active')}"
            + (f" — {card['default_mode_reason']}." if card.get("default_mode_reason") else ".")
            + " A site sets its own with `CDS_TASK_MODES`.",
            "",
            "| | validation | test |",
            "|---|---|---|",
        ]
        lines += [f"| {what} | {v} | {t} |" for what, v, t in _headline(card)]
        lines += [
            "",
            f"- **Labels**: {', '.join(card['labels'])}; trained: {', '.join(card['trained_labels'])}"
            + (f"; raise a study: {', '.join(card['priority_labels'])}" if card.get("priority_labels") else ""),
            "- **Operating thresholds**: " + ", ".join(f"`{k}` {v}" for k, v in card["thresholds"].items())
            + f". {card.get('threshold_policy', '')}",
            f"- **Input**: {card['input_size']} × {card['input_size']} px; {card.get('preprocessing_note', '')}",
            f"- **Data**: {data.get('provenance', '')}",
            f"- **Split**: {counts.get('train_total')} train / {counts.get('validation_total')} validation / "
            f"{counts.get('test_total', 0)} test images (seed {split.get('seed')}), by {split.get('unit', '')}. "
            f"Train {counts.get('train')}; validation {counts.get('validation')}; test {counts.get('test')}.",
        ]
        if data.get("extra_training_negatives"):
            extra = data["extra_training_negatives"]
            lines.append(f"- **Extra training negatives**: {extra['count']} images from `{extra['dir']}` ({extra['use']}).")
        if card.get("input_check"):
            lines.append(input_check_line(card["input_check"]))
        if card.get("external_check"):
            lines.append(external_check_line(card["external_check"]))
        lines += [
            f"- **Start**: {training.get('init_from', '')}"
            + (f"; {init.get('source')}, file sha256 `{init.get('file_sha256')}`, "
               f"{init.get('parameter_share_from_imagenet', 0):.0%} of the parameters from ImageNet" if init else ""),
            f"- **Training**: {training.get('hardware')}; {training.get('epochs_run')} of {training.get('epochs_planned')} "
            f"epochs, best {training.get('best_epoch')}; {training.get('time_minutes')} min "
            f"({training.get('seconds_per_epoch')} s per epoch); {training.get('optimizer')}, {training.get('schedule')}"
            + "".join(f"; {training[key]}" for key in ("stochastic_depth", "weight_average") if training.get(key)) + ".",
            f"- **Command**: `{training.get('command') or 'see the card'}`",
            "",
            "Limits:",
            "",
        ]
        lines += [f"- {item}" for item in card.get("limitations", [])]
    lines += ["", "Re-score a committed model on its validation split: `cds-triage evaluate --task <task> --data ../shared/data`.",
              "Re-choose its operating points from the stored probabilities (no images needed):",
              "`python -m cds_training.training rethreshold --task <task> --target <sensitivity>`.", ""]
    return "\n".join(lines)


def external_check_line(block: dict[str, Any]) -> str:
    """The model card's line on its external set (weights/README.md)."""
    auc, at = block["auc"], block["at_card_threshold"]
    sens, spec = at["sensitivity"], at["specificity"]
    checked = block.get("input_check")
    check = (f"; the input check found {checked['familiar']} familiar, {checked['unfamiliar']} unfamiliar (scored, marked) "
             f"and refused {checked['refused']}") if checked else ""
    return (f"- **Another source, never trained on** ({block['what']}; {block['images']} images): AUC ({block['label']}) "
            f"{auc['value']} ({auc['ci95'][0]}-{auc['ci95'][1]}); at the card's threshold {at['threshold']} "
            f"{sens['count'][0]}/{sens['count'][1]} positives and {spec['count'][1] - spec['count'][0]}/{spec['count'][1]} "
            f"negatives raised, {block['unit']}{check}." + (f" {block['note']}" if block.get("note") else ""))


def input_check_line(check: dict[str, Any]) -> str:
    """The model card's input-check line: what each source of the right anatomy and the other tasks' images get."""
    if "same_anatomy" not in check:  # a card measured before images were marked unfamiliar rather than refused
        accepted = "; ".join(f"{name} {v['count']}/{v['of']}" for name, v in check.get("accepted", {}).items())
        refused = "; ".join(f"{name} {v['count']}/{v['of']}" for name, v in check.get("refused_other_tasks", {}).items())
        return (f"- **Input check** (`{check['file']}`): {check['statistics']}; refused above {check['threshold']} "
                f"({check['threshold_policy']}). Accepted: {accepted}. Refused, images of other tasks: {refused}.")

    def shares(block: dict[str, Any]) -> str:
        return ", ".join(f"{v['count']}/{v['of']} {key}" for key, v in block.items() if v["count"])

    same = "; ".join(f"{name}: {shares(v)}" for name, v in check["same_anatomy"].items())
    other = "; ".join(f"{name}: {shares(v)}" for name, v in check["other_tasks"].items())
    return (f"- **Input check** (`{check['file']}`): {check['statistics']}; familiar up to {check['threshold']} "
            f"({check['threshold_policy']}), scored and marked unfamiliar above, refused beyond {check['refuse_beyond']} "
            f"({check['refuse_beyond_policy']}); the wrong modality or body part in the DICOM header, and a CT that is not "
            f"head-shaped, are refused too. Right anatomy: {same}. Images of the other tasks (pixels alone): {other}.")


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
        "auc": {"value": _r(auc), "ci95": [_r(ci[0]), _r(ci[1])]},
        "raised_with_finding": share(truth),
        "raised_without_finding": share(~truth),
        "raised_per_class": per_class,
        "class_accuracy": {"value": _r(accuracy_k / len(classes)), "ci95": [_r(lo), _r(hi)],
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
    return {"bleeding_series_raised": _r(float((bleeding >= threshold).mean())),
            "normal_series_raised": _r(float((normal >= threshold).mean())),
            "series_auc": _r(binary_auc(y, np.r_[bleeding, normal]))}


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


# --- a site's own validation: one score per study, the truth beside it (`cds-triage validate`) -------

SENSITIVITY_TARGETS = (0.90, 0.95, 0.98)
SMALL_SAMPLE = 30  # fewer positives or negatives than this: every figure's interval is wide, and the report says so


def proportion(successes: int, n: int) -> dict[str, Any]:
    """A share with its Wilson 95% interval and the count behind it (value None for n = 0)."""
    lo, hi = wilson_interval(successes, n)
    return {"value": _r(successes / n if n else math.nan), "ci95": [_r(lo), _r(hi)], "count": [successes, n],
            "interval": "wilson"}


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
    out = {"value": _r(value), "ci95": [_r(float(lo)), _r(float(hi))], "positives": len(pos), "negatives": len(neg),
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
                        "mean_predicted": _r(float(p[mask].mean())), "observed": proportion(int(y[mask].sum()), int(mask.sum()))})
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
    return {"bins": table, "bin_count": bins, "brier": _r(float(np.mean((p - y) ** 2)) if len(y) else math.nan),
            "brier_at_prevalence": _r(prevalence * (1 - prevalence)), "ece": _r(ece),
            "mean_predicted": _r(float(p.mean()) if len(p) else math.nan), "prevalence": _r(prevalence)}


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
        "average_precision": _r(float(average_precision_score(y, p))) if positives and negatives else None,
        "at_thresholds": {name: operating_point(y, p, t) for name, t in thresholds.items()},
        "at_target_sensitivity": sensitivity_operating_points(y, p, targets) if positives else [],
        "calibration": calibration_summary(y, p),
        "warnings": small_number_warnings(positives, negatives) + ([f"AUC: {auc['note']}"] if auc.get("note") else []),
    }
