"""The validation plots of a trained model (ROC, precision-recall, confusion matrix, calibration),
drawn with matplotlib (imported inside, so the metrics never load it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .metrics import Predictions, binary_auc, confusion, sensitivity_specificity, trained_label_indices


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
