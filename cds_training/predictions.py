"""A model's probabilities on a split, as the card stores and reads them (`Predictions`), and the validation score."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from cds_service.core.evaluation import (
    Predictions,
    binary_auc,
)
from cds_service.core.models import LoadedModel
from cds_service.core.preprocessing import to_batch

from .datasets import (
    Sample,
)
from .pixels import load_image


def network_probs(network: Any, x: np.ndarray, activation: str, device: str, batch_size: int = 128) -> np.ndarray:
    """Probabilities of an in-training network on preprocessed inputs (eval mode)."""
    import torch

    network.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[start : start + batch_size].astype(np.float32)).to(device)
            logits = network(xb.contiguous(memory_format=torch.channels_last)).float()
            out.append((torch.softmax(logits, 1) if activation == "softmax" else torch.sigmoid(logits)).cpu().numpy())
    return np.concatenate(out)


def predict_samples(model: LoadedModel, samples: Sequence[Sample], chunk: int = 32, progress: bool = False) -> np.ndarray:
    """Probabilities of a loaded (service) model on files, through the service's exact path."""
    from tqdm import tqdm

    spec = model.card.preprocessing
    out = []
    for start in tqdm(range(0, len(samples), chunk), desc="predict", disable=not progress, leave=False):
        part = samples[start : start + chunk]
        out.append(model.predict(to_batch([load_image(s.path, spec) for s in part], spec)))
    return np.concatenate(out) if out else np.zeros((0, len(model.card.labels)), np.float32)


# decimals a probability keeps in <task>.split.json; the card's figures are computed from the same rounded values
# (a rare label's tiny probabilities tie when rounded, which moved its AUC by 0.001 against the unrounded ones)
STORED_DECIMALS = 6


def as_predictions(samples: Sequence[Sample], probs: np.ndarray, labels: Sequence[str], activation: str, trained: Sequence[str]) -> Predictions:
    """Truth arrays of the samples beside the probabilities, rounded as the split file stores them, so the
    card's figures follow from that file; untrained labels count as unknown."""
    probs = np.round(np.asarray(probs, np.float64), STORED_DECIMALS)
    trained_mask = np.array([label in trained for label in labels])
    targets = np.array([s.targets for s in samples], dtype=np.float64).reshape(len(samples), len(labels))
    known = np.array([s.known for s in samples], dtype=bool).reshape(len(samples), len(labels)) & trained_mask[None, :]
    return Predictions(tuple(labels), activation, targets, known, probs, tuple(s.rel for s in samples))


MIN_POSITIVES_FOR_SCORE = 5


def validation_score(pred: Predictions) -> float:
    """Early-stopping score: balanced accuracy (softmax) or mean AUC of trained labels (sigmoid)."""
    if pred.activation == "softmax":
        truth, guess = pred.targets.argmax(1), pred.probs.argmax(1)
        return float(np.mean([(guess[truth == j] == j).mean() for j in np.unique(truth)]))
    # labels with fewer than MIN_POSITIVES_FOR_SCORE positives here would make the score jump by chance
    aucs = [binary_auc(pred.targets[pred.known[:, j], j], pred.probs[pred.known[:, j], j]) for j in range(len(pred.labels))
            if pred.targets[pred.known[:, j], j].sum() >= MIN_POSITIVES_FOR_SCORE]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else 0.0


def _prob_loss(pred: Predictions) -> float:
    """Validation loss from probabilities (NLL for softmax, masked BCE for sigmoid)."""
    p = np.clip(pred.probs, 1e-7, 1 - 1e-7)
    if pred.activation == "softmax":
        return float(-np.log(p[np.arange(len(p)), pred.targets.argmax(1)]).mean())
    bce = -(pred.targets * np.log(p) + (1 - pred.targets) * np.log(1 - p))
    return float((bce * pred.known).sum() / max(1, pred.known.sum()))
