"""A trained model's card again, without training: rebuilt (`recard`), re-thresholded (`rethreshold`), re-scored (`evaluate`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cds_service.core.domain import Task
from cds_service.core.evaluation import (
    metrics_with_ci,
    write_plots,
)
from cds_service.core.model_cards import ARCHITECTURE, card_path
from cds_service.core.models import load_model
from cds_service.core.preprocessing import Framing

from .cards import _card, cv_sentence, shift_sentence, _metrics_document, stored_predictions, write_evaluation
from .config import TrainConfig, _display_path, _log, set_threads
from .datasets import (
    build_split,
    resolve_data_dir,
)
from .loop import with_extra_training_data
from .operating import operating_points, threshold_policy
from .predictions import as_predictions, predict_samples
from .tasks import TASK_SETUPS, default_spec


def recard(weights_dir: Path, task: Task, data_dir: Path, command: str = "") -> dict[str, Any]:
    """Rewrite a trained model's card with this code's card builder, from the card and its split file.

    For a training that ran on an older revision of this module: the descriptive parts (data
    provenance, limits, policies, counts) are rebuilt; what the run measured (training history,
    probabilities) is kept; the operating points are re-chosen from the stored probabilities as
    `train` would (`rethreshold`). The weights are not touched.
    """
    cpath = card_path(Path(weights_dir), task)
    old = json.loads(cpath.read_text())
    training, split = old["training"], old["data"]["split"]
    config = TrainConfig(
        task=task, data_dir=Path(data_dir), out_dir=Path(weights_dir), epochs=int(training["epochs_planned"]),
        image_size=int(old["input_size"]), batch_size=int(training["batch_size"]),
        val_fraction=float(split["val_fraction"]), test_fraction=float(split.get("test_fraction", 0.0)),
        grouping=str(split.get("grouping", "patient")), seed=int(split.get("seed", 42)),
        init="imagenet-lite0" if training.get("imagenet_init") else None, architecture=str(old.get("architecture", ARCHITECTURE)),
        target_sensitivity=float(old.get("target_sensitivity", 0.95)), version=str(old["version"]), date=str(old["date"]),
        command=command or str(training.get("command") or ""), patience=int(training["early_stopping"]["patience_epochs"]),
    )
    extra_negatives = old["data"].get("extra_training_negatives")
    if extra_negatives:
        config.extra_negatives, config.extra_negatives_part = Path(extra_negatives["dir"]), extra_negatives["part"]
    extra_data = old["data"].get("extra_training_data")
    if extra_data:
        config.extra_data = Path(extra_data["dir"])
    config.framing = Framing(old["preprocessing"].get("framing", Framing.NONE.value))
    setup = config.setup
    resolved = resolve_data_dir(task, Path(data_dir))
    train_set, val_set, test_set = build_split(task, resolved, config.split_block())
    train_set = with_extra_training_data(config, train_set)
    keep = {k: v for k, v in training.items() if k not in ("command",)}
    card = _card(config, default_spec(task, config.image_size, setup), setup, tuple(old["trained_labels"]), old["thresholds"], {},
                 {key: old[key] for key in ("size_only_baseline",) if key in old}, keep, train_set, val_set, test_set, resolved)
    card["training"].update({k: v for k, v in keep.items() if k not in card["training"]})
    for key in ("optimizer", "schedule", "loss", "dropout", "stochastic_depth", "weight_average", "sampling", "augmentation"):
        if key in training or key in card["training"]:  # what the run used, not today's defaults
            card["training"][key] = training.get(key, card["training"].get(key))
    card["weights_sha256"] = old["weights_sha256"]
    for key in ("input_check", "external_check", "cross_validation", "acquisition_shift", "onnx"):  # measured by
        if key in old:  # `input-profile`, `external-check`, `crossval --card`, `shift-check` and `export`, not by training
            card[key] = old[key]
    if "cross_validation" in old:
        card["limitations"].append(cv_sentence(old["cross_validation"]))
    if "acquisition_shift" in old:
        card["limitations"].append(shift_sentence(old["acquisition_shift"]))
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    return rethreshold(weights_dir, task, config.target_sensitivity)


def rethreshold(weights_dir: Path, task: Task, target: float, bootstrap: int = 1000) -> dict[str, Any]:
    """Re-choose a card's operating points from its stored split probabilities (no images needed).

    For a product decision on the sensitivity target after training: the validation split chooses,
    the test split reports, exactly as at the end of `train`.
    """
    cpath = card_path(Path(weights_dir), task)
    card = json.loads(cpath.read_text())
    trained, activation = tuple(card["trained_labels"]), card["activation"]
    val = stored_predictions(weights_dir, card, "validation")
    if val is None:
        raise ValueError(f"{cpath}: no stored validation predictions to choose thresholds from (train it again)")
    test = stored_predictions(weights_dir, card, "test")
    points = operating_points(TASK_SETUPS[task], trained, val, test, target, bootstrap)
    for key in ("presence", "test_metrics", "priority_labels", "priority_bar", "series_operating_point",
                "default_mode", "default_mode_reason", "go_live_bar", "expected_raised_share"):
        card.pop(key, None)
    card.update(points)
    card["target_sensitivity"] = target
    card["threshold_policy"] = threshold_policy(target, activation == "softmax", test is not None, "series_operating_point" in points)
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    write_evaluation(Path(weights_dir), card, val, card["validation_metrics"])
    return card


def evaluate(task: Task, data_dir: Path, weights_dir: Path, out_dir: Path | None = None, bootstrap: int = 1000, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Re-score a model on its validation split (rebuilt from the card's seed and fraction).

    Writes `metrics.json` and the PNG plots into `out_dir` (default `<weights>/eval/<task>`).
    """
    set_threads()
    model = load_model(weights_dir, task, device)
    card = model.card.raw
    split = card.get("data", {}).get("split", {})
    train_set, val_set, _ = build_split(task, data_dir, split)
    listed = _listed_validation(weights_dir, task)
    matches = listed is None or listed == [s.rel for s in val_set]
    if not matches:
        _log("warning: the rebuilt validation split differs from the one stored beside the card (other data?)")
    probs = predict_samples(model, val_set, progress=progress)
    pred = as_predictions(val_set, probs, model.card.labels, model.card.activation, model.card.trained_labels)
    metrics = metrics_with_ci(pred, model.card.thresholds, resamples=bootstrap)
    out_dir = Path(out_dir) if out_dir else Path(weights_dir) / "eval" / task.value
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(pred, model.card.thresholds, out_dir, f"{model.card.name} {model.card.version}")
    doc = _metrics_document(card, metrics, model.card.thresholds)
    doc["data_dir"] = _display_path(resolve_data_dir(task, data_dir))
    doc["validation_split_matches_card"] = matches
    doc["plots"] = [p.name for p in plots]
    (out_dir / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _listed_validation(weights_dir: Path, task: Task) -> list[str] | None:
    path = Path(weights_dir) / f"{task.value}.split.json"
    if not path.exists():
        return None
    return [row["file"] for row in json.loads(path.read_text())["validation"]]
