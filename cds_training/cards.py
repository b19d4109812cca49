# Over 400 lines on purpose: the card is one document, written and read in one place (its limits are the wording a clinician reads).
"""The model card and its files: weights, split probabilities, evaluation plots, the size-only baseline, weights/README.md."""

from __future__ import annotations

import hashlib
from collections import Counter
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cds_service.core.domain import TASK_LABELS, Task
from cds_service.core.evaluation import (
    Predictions,
    binary_auc,
    bootstrap_ci,
    format_metric,
    weights_readme,
    write_plots,
)
from cds_service.core.model_cards import card_path, weights_path
from cds_service.core.models import load_model
from cds_service.core.preprocessing import Framing, PreprocessingSpec

from .config import TrainConfig, TrainResult, _display_path, _log, _torch_version, cpu_model
from .datasets import (
    SIMILARITY_THRESHOLD,
    Sample,
    class_counts,
    find_rsna_csv,
    is_rsna_sources_root,
    source_of,
)
from .operating import operating_points, threshold_policy
from .pixels import original_size_features
from .predictions import STORED_DECIMALS, as_predictions, predict_samples
from .tasks import DISCLAIMER, PROVENANCE, TaskSetup, model_name


def size_only_baseline(train: Sequence[Sample], val: Sequence[Sample], label_index: int, bootstrap: int = 1000) -> dict[str, Any]:
    """AUC of a logistic regression that sees only the stored width, height and pixel mode.

    If this comes close to the network, the network may have learnt the image size instead
    of the finding. Fitted on the training split, scored on the validation split, plus a
    5-fold cross-validated AUC over all images for a steadier number.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(samples: Sequence[Sample], modes: list[str]) -> np.ndarray:
        rows = []
        for s in samples:
            w, h, mode = original_size_features(s.path)
            rows.append([w, h, w / h, w * h] + [float(mode == m) for m in modes])
        return np.asarray(rows, dtype=np.float64)

    keep_train = [s for s in train if s.known[label_index]]
    keep_val = [s for s in val if s.known[label_index]]
    modes = sorted({original_size_features(s.path)[2] for s in list(keep_train) + list(keep_val)})
    y_train = np.array([s.targets[label_index] > 0.5 for s in keep_train])
    y_val = np.array([s.targets[label_index] > 0.5 for s in keep_val])
    if len(set(y_train)) < 2:
        return {"note": "only one class in the training split; baseline not computed"}
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(features(keep_train, modes), y_train)
    p_val = model.predict_proba(features(keep_val, modes))[:, 1]
    auc = binary_auc(y_val, p_val)
    ci = bootstrap_ci(lambda idx: {"auc": binary_auc(y_val[idx], p_val[idx])}, len(y_val), bootstrap)["auc"]
    everything = list(keep_train) + list(keep_val)
    y_all = np.concatenate([y_train, y_val])
    folds = min(5, int(y_all.sum()), int((~y_all).sum()))
    cv_auc = None
    if folds >= 2:
        p_cv = cross_val_predict(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
            features(everything, modes),
            y_all,
            cv=StratifiedKFold(folds, shuffle=True, random_state=0),
            method="predict_proba",
        )[:, 1]
        cv_auc = round(binary_auc(y_all, p_cv), 4)
    return {
        "model": "logistic regression on original width, height, aspect, area and PIL mode (one-hot)",
        "validation_auc": {"value": round(auc, 4), "ci95": [round(ci[0], 4), round(ci[1], 4)]},
        f"cv{folds}_auc_all_images": cv_auc,
        "modes_seen": modes,
    }


def _finish(
    config: TrainConfig,
    network: Any,
    spec: PreprocessingSpec,
    setup: TaskSetup,
    train_set: list[Sample],
    val_set: list[Sample],
    test_set: list[Sample],
    samples: list[Sample],
    data_dir: Path,
    trained: tuple[str, ...],
    run: dict[str, Any],
) -> TrainResult:
    """Save fp16 weights, score them through the service's loader, write card + split list."""
    from safetensors.torch import save_file

    task, labels = config.task, TASK_LABELS[config.task]
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").half().contiguous() for k, v in network.state_dict().items()}
    wpath = weights_path(out, task)
    save_file(state, str(wpath), metadata={"task": task.value, "architecture": config.architecture, "dtype": "float16"})

    # a provisional card lets us load exactly as the service does; thresholds follow below
    card = _card(config, spec, setup, trained, {label: 0.5 for label in trained}, {}, {}, run, train_set, val_set, test_set, data_dir)
    cpath = card_path(out, task)
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    model = load_model(out, task, config.device)
    probs = predict_samples(model, val_set, progress=config.progress)
    pred = as_predictions(val_set, probs, labels, setup.activation, trained)
    test_pred = None
    if test_set:  # scored once, with the thresholds the validation split chose: it chooses nothing
        test_probs = predict_samples(model, test_set, progress=config.progress)
        test_pred = as_predictions(test_set, test_probs, labels, setup.activation, trained)
    extra = operating_points(setup, trained, pred, test_pred, config.target_sensitivity, config.bootstrap)
    thresholds, metrics = extra.pop("thresholds"), extra.pop("validation_metrics")
    if setup.activation == "sigmoid" and trained:
        j = labels.index(trained[0])
        extra["size_only_baseline"] = size_only_baseline(train_set, val_set, j, config.bootstrap)
        extra["size_only_baseline"]["model_validation_auc"] = metrics["metrics"].get(f"{trained[0]}.auc")
    card = _card(config, spec, setup, trained, thresholds, metrics, extra, run, train_set, val_set, test_set, data_dir)
    card["weights_sha256"] = hashlib.sha256(wpath.read_bytes()).hexdigest()
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    write_split_file(out, task, config, data_dir, train_set, val_set, pred, test_set, test_pred)
    if config.plots:
        write_evaluation(out, card, pred, metrics)
    load_model(out, task, config.device)  # the final card must load: fail here, not in production
    _log(f"wrote {cpath} and {wpath}")
    for line in _summary_lines(card):
        _log("  " + line)
    return TrainResult(cpath, wpath, card, run["history"])


def _card(
    config: TrainConfig,
    spec: PreprocessingSpec,
    setup: TaskSetup,
    trained: tuple[str, ...],
    thresholds: dict[str, float],
    metrics: dict[str, Any],
    extra: dict[str, Any],
    run: dict[str, Any],
    train_set: list[Sample],
    val_set: list[Sample],
    test_set: list[Sample],
    data_dir: Path,
) -> dict[str, Any]:
    task, labels = config.task, TASK_LABELS[config.task]
    softmax = setup.activation == "softmax"
    untrained = [label for label in labels if label not in trained]
    start = ("Started from general-purpose image-recognition weights (ImageNet) and trained" if config.init else
             "Started from our own earlier weights and trained" if config.init_from else "Trained from scratch")
    limitations = [
        DISCLAIMER,
        f"{start} on a small public research data set ({len(train_set)} training images); expect lower "
        "accuracy on other scanners, protocols and populations. Check it on your own studies first.",
        "The operating threshold was chosen on the validation images"
        + (", and the separate test images (which chose nothing) show what to expect; both are small, so the "
           "ranges given with each figure matter more than the figure itself." if test_set else
           ", which are also the images the figures come from: the figures are optimistic."),
    ]
    if task is Task.BRAIN_MRI:
        limitations += [
            "Four classes only (glioma, meningioma, pituitary tumour, no tumour). Other disease (metastases, "
            "stroke, bleeding, ...) is outside what it was taught and may be called one of the four.",
            "The tumour type it names is secondary: it raises a study when it thinks any tumour is present.",
            "Its heatmap is coarse: on gliomas and meningiomas it usually centres on the tumour, on pituitary "
            "tumours on the sella region but spreading over the brainstem behind it; do not read a tumour's exact "
            "location from it.",
            "Trained on single 2D slices from one public collection of JPEG images; some of its 'no tumour' images are CT.",
            "In that collection most tumour images are contrast-enhanced T1 and many tumour-free images are T2: a "
            "tumour shown on a sequence without contrast can be called tumour-free (its one missed test tumour is a "
            "large meningioma on a non-contrast image). Expect fewer tumours flagged where a site's sequences differ.",
        ]
    if task is Task.HEAD_CT_ICH:
        limitations += [
            "Reads each axial slice of a non-contrast head CT in a brain window (the scan's own, else 40/80 HU), then asks "
            "neighbouring slices to agree before it raises a study. A bleed seen on a single thin slice, "
            "or only in a subdural or bone window, can be missed.",
            "Thin-slice scans (slices 2.5 mm apart or less) are read as 5 mm slabs, each the average of the thin slices it covers, "
            "as the model was trained on 5 mm slices; a bleed smaller than a slab can be diluted.",
            "Trained on single slices (no whole scans): the series decision rests on slice results.",
            "The heatmap is broad: it covers the part of the brain that drove the score and centres on large bleeds, "
            "but does not outline a small one. Look at the whole study, not only where it is red.",
        ]
        if setup.framing is Framing.BODY:
            limitations += [
                "Each slice is cropped to a square around the head before it is read (the head fills the picture "
                "whatever the scanner's field of view and the export's framing), and the heatmap is drawn on that crop.",
                "Where it looks (measured for 3.0.0 on the test slices): on "
                "intraparenchymal and intraventricular bleeds its heatmap peaks inside the brain on 38 of 40; on subdural "
                "and epidural bleeds, which lie against the skull, it peaks near the skull on only 8 of 40 and mostly over "
                "the middle of the brain. For a thin rim of blood at the skull, the red area does not show where the blood is.",
            ]
        limitations += [
            "A subtype the model cannot yet be trusted on (too few examples, or too weak on the validation images) is shown "
            "as a probability only: never named as a finding, never a reason to raise a study.",
        ]
        if untrained:
            limitations.append(f"Outputs {', '.join(untrained)} were not trained and are never reported as findings.")
    if task is Task.CHEST_PNEUMOTHORAX:
        limitations += [
            "Frontal chest radiographs only. Trained on a few hundred NIH images whose labels were mined from "
            "reports (noisy); every negative image shows some other disease.",
            "Many pneumothorax images show a chest drain: an image with a drain (a treated pneumothorax) may "
            "be flagged because of the drain. It is not a check that a drain is in place, and it does not "
            "grade size or tension. Every test image with a pneumothorax was a follow-up film of its patient. "
            "On bedside (AP) films, which carry most lines and drains, the test AUC was 0.89 (10 with a "
            "pneumothorax, 55 without); on PA films 0.85 (14 and 59): no large drop without the bedside "
            "devices, on too few images to exclude one.",
            "Must not be used to rule out a pneumothorax, on children, or on lateral views. Where the model looks "
            "(its heatmaps on the test images): on the lung fields, mostly the right lung whatever the side; on one "
            "pneumothorax image it centred on a pigtail drain, and the images without pneumothorax it scored highest "
            "carry lines and tubes. Treat its heatmap as a hint, not as the location of the air.",
        ]
    layout = ("rsna_sources" if task is Task.HEAD_CT_ICH and is_rsna_sources_root(data_dir)
              else "rsna_csv" if task is Task.HEAD_CT_ICH and find_rsna_csv(data_dir) else "class_folders")
    card: dict[str, Any] = {
        "task": task.value,
        "name": model_name(task),
        "version": config.version,
        "date": config.date,
        "architecture": config.architecture,
        "labels": list(labels),
        "trained_labels": list(trained),
        "untrained_labels": untrained,
        "activation": setup.activation,
        "input_size": spec.input_size,
        "preprocessing": spec.to_card(),
        "preprocessing_note": setup.preprocessing_note,
        "thresholds": thresholds,
        "series_pooling": setup.series_pooling.to_card(),
        "target_sensitivity": config.target_sensitivity,
        "threshold_policy": threshold_policy(config.target_sensitivity, softmax, bool(config.test_fraction),
                                             "series_operating_point" in extra),
        "intended_use": setup.intended_use,
        "disclaimer": DISCLAIMER,
        "limitations": limitations,
        "data": {
            "dir": _display_path(data_dir),
            "provenance": PROVENANCE.get("rsna_sources" if layout == "rsna_sources" else data_dir.name,
                                         f"user-supplied data at {_display_path(data_dir)}"),
            "layout": layout,
            "split": {
                **config.split_block(),
                "unit": _split_unit(config),
                "stratified_by": "class",
                "method": "sha256(seed:group) rank per class: the lowest ranks to test, the next to validation; "
                          "see cds_training.datasets.split_three",
                "validation_list": f"{task.value}.split.json",
            },
            "counts": {
                "train": class_counts(train_set, labels, softmax),
                "validation": class_counts(val_set, labels, softmax),
                "train_total": len(train_set),
                "validation_total": len(val_set),
                **({"test": class_counts(test_set, labels, softmax), "test_total": len(test_set)} if test_set else {}),
                **({"per_source": {part: dict(sorted(Counter(source_of(s.rel) for s in split).items()))
                                   for part, split in (("train", train_set), ("validation", val_set), ("test", test_set))}}
                   if layout == "rsna_sources" else {}),
            },
            **({"extra_training_negatives": {
                "dir": _display_path(config.extra_negatives), "part": config.extra_negatives_part,
                "count": sum(1 for s in train_set if s.rel.startswith(config.extra_negatives.name + "/")),
                "use": "training split only, every label taken as 0 (probable negatives); never in validation or test"}}
               if config.extra_negatives else {}),
            **({"extra_training_data": {
                "dir": _display_path(config.extra_data),
                "count": sum(1 for s in train_set if s.rel.startswith(config.extra_data.name + "/")),
                "use": "training split only, with its own labels (labels it does not name are masked); "
                       "never in validation or test"}}
               if config.extra_data else {}),
        },
        "training": {
            "hardware": f"CPU ({cpu_model()}), {run['torch_threads']} cores, no GPU"
            if config.device == "cpu"
            else config.device,
            "device": config.device,
            "image_size": spec.input_size,
            "batch_size": config.batch_size,
            "optimizer": f"AdamW (lr {config.lr}, weight decay {config.weight_decay})",
            "schedule": f"linear warm-up {config.warmup_epochs} epoch(s), then cosine to 0",
            "loss": "cross-entropy, label smoothing " + str(config.label_smoothing)
            if softmax
            else "binary cross-entropy masked to trained labels with known truth",
            "dropout": config.drop_rate,
            "sampling": "class-balanced (inverse class frequency, with replacement)",
            **({"stochastic_depth": f"residual blocks skipped with a probability rising with depth to {config.drop_path_rate}"}
               if config.drop_path_rate > 0 else {}),
            **({"weight_average": f"exponential moving average of the weights, decay {config.ema_decay} per step; the average is validated and shipped"}
               if config.ema_decay > 0 else {}),
            "augmentation": asdict(setup.augmentation),
            "early_stopping": {"patience_epochs": config.patience, "score": "validation balanced accuracy" if softmax else "validation mean AUC"},
            "init_from": _display_path(config.init_from) if config.init_from else (
                "ImageNet EfficientNet-Lite0 mapped into B0" if config.init else "random initialisation (no pre-training)"),
            # the file's hash, because a later training may replace the file at that path
            "init_from_sha256": hashlib.sha256(config.init_from.read_bytes()).hexdigest() if config.init_from else None,
            "seed": config.seed,
            **({"training_seed": config.training_seed} if config.training_seed is not None else {}),
            "torch": _torch_version(),
            "command": config.command,
            **{k: v for k, v in run.items()},
            "time_minutes": round(run["seconds"] / 60.0, 1),
        },
        "weights_file": f"{task.value}.safetensors",
        "weights_dtype": "float16",
    }
    if metrics:
        card["validation_metrics"] = metrics
    card.update(extra)
    return card


def _split_unit(config: TrainConfig) -> str:
    if config.grouping == "similarity":
        return (f"group of near-identical images (Pearson correlation of 96x96 grey thumbnails >= {SIMILARITY_THRESHOLD}, "
                "single linkage; stands in for the patient and series ids the data lost); patient where DICOM or metadata gives one")
    return "patient (DICOM PatientID, or the data's metadata.csv Patient ID) where known, else image"


def _split_rows(samples: Sequence[Sample], pred: Predictions, labels: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {
            "file": s.rel,
            "targets": [s.targets[j] if s.known[j] else None for j in range(len(labels))],
            "probs": [round(float(p), STORED_DECIMALS) for p in pred.probs[i]],
        }
        for i, s in enumerate(samples)
    ]


def write_split_file(out: Path, task: Task, config: TrainConfig, data_dir: Path, train_set: Sequence[Sample], val_set: Sequence[Sample],
                     pred: Predictions, test_set: Sequence[Sample] = (), test_pred: Predictions | None = None) -> Path:
    """`<task>.split.json`: the validation files (relative paths) with truth and probabilities.

    Lets anyone check the split (no validation image was trained on) and lets the tests
    re-score a subset and compare with what the card reports.
    """
    labels = TASK_LABELS[task]
    doc = {
        "task": task.value,
        "data_dir": _display_path(data_dir),
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "train_count": len(train_set),
        "validation_count": len(val_set),
        "labels": list(labels),
        "validation": _split_rows(val_set, pred, labels),
    }
    if test_pred is not None:
        doc["test_fraction"] = config.test_fraction
        doc["test_count"] = len(test_set)
        doc["test"] = _split_rows(test_set, test_pred, labels)
    path = out / f"{task.value}.split.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _metrics_document(card: dict[str, Any], metrics: dict[str, Any], thresholds: dict[str, float]) -> dict[str, Any]:
    return {
        "model": card["name"],
        "version": card["version"],
        "task": card["task"],
        "split": "validation",
        "thresholds": thresholds,
        **metrics,
    }


def _summary_lines(card: dict[str, Any]) -> list[str]:
    lines = []
    block = card.get("validation_metrics", {}).get("metrics", {})
    for name in ("accuracy", "balanced_accuracy", "macro_auc"):
        if name in block:
            lines.append(f"{name}: {format_metric(block, name)}")
    for label in card["trained_labels"]:
        parts = [f"{m}={format_metric(block, f'{label}.{m}')}" for m in ("auc", "sensitivity", "specificity")]
        lines.append(f"{label}: threshold {card['thresholds'][label]:.6f}; " + "; ".join(parts))
    if "size_only_baseline" in card:
        b = card["size_only_baseline"]
        if "validation_auc" in b:
            lines.append(f"size-only baseline AUC {b['validation_auc']['value']:.3f} {b['validation_auc']['ci95']}")
    return lines


def stored_predictions(weights_dir: Path, card: dict[str, Any], part: str) -> Predictions | None:
    """The validation or test split as stored beside the weights (`<task>.split.json`): files, truth
    (unknown or untrained labels masked) and probabilities; None when the file has no such part."""
    rows = json.loads((Path(weights_dir) / f"{card['task']}.split.json").read_text()).get(part)
    if not rows:
        return None
    labels, trained = tuple(card["labels"]), set(card["trained_labels"])
    targets = np.array([[t if t is not None else 0.0 for t in r["targets"]] for r in rows], np.float64)
    known = np.array([[t is not None and label in trained for t, label in zip(r["targets"], labels)] for r in rows])
    return Predictions(labels, card["activation"], targets, known, np.array([r["probs"] for r in rows], np.float64),
                       tuple(r["file"] for r in rows))


def write_evaluation(weights_dir: Path, card: dict[str, Any], pred: Predictions, metrics: dict[str, Any]) -> None:
    """`eval/<task>/`: the plots and metrics.json of the validation split at the card's thresholds."""
    plot_dir = weights_dir / "eval" / card["task"]
    write_plots(pred, card["thresholds"], plot_dir, f"{card['name']} {card['version']}")
    (plot_dir / "metrics.json").write_text(json.dumps(_metrics_document(card, metrics, card["thresholds"]), indent=2) + "\n")


def write_weights_readme(weights_dir: Path) -> Path:
    """weights/README.md from every card there, in task order."""
    cards = [json.loads(card_path(weights_dir, task).read_text()) for task in Task if card_path(weights_dir, task).exists()]
    path = Path(weights_dir) / "README.md"
    path.write_text(weights_readme(cards))
    return path


#: The start of the card's limit that says what the cross-validation found (replaced when recorded again).
CV_SENTENCE_START = "On patients it never saw"


def cv_sentence(block: dict[str, Any]) -> str:
    """The cross-validation in a clinician's words, for the card's limits."""
    auc, sens, spec = block["fold_auc"], block["at_fold_thresholds"]["sensitivity"], block["at_fold_thresholds"]["specificity"]
    pooled = block["pooled_out_of_fold_auc"]
    return (f"{CV_SENTENCE_START} (our data split {len(block['folds'])} ways by patient, the same training repeated "
            f"on each part), how well it ranked images (AUC) ranged from {auc['min']:.2f} to {auc['max']:.2f}, "
            f"{pooled['value']:.2f} over all {pooled['images']} images, against {block['card_test_auc']:.2f} on this "
            f"model's own test images; at the threshold it flagged {sens['count'][0]} of {sens['count'][1]} images with "
            f"a {block['label']} and {spec['count'][1] - spec['count'][0]} of {spec['count'][1]} without. "
            "Expect figures like these, or lower, at another hospital.")


SHIFT_SENTENCE_START = "When its own test images were re-made as another scanner might make them"


def shift_sentence(block: dict[str, Any]) -> str:
    """The acquisition-shift check in a clinician's words, for the card's limits: the fewest tumours flagged
    under any change (and per class), the most tumour-free images flagged, the most images refused."""
    changes, negative = block["changes"], block["negative_label"]
    stored = changes["as stored"]["tumours_raised"]["count"]
    fewest = min(entry["tumours_raised"]["count"][0] for entry in changes.values())
    classes = [label for label in changes["as stored"]["raised"] if label != negative]
    per_class = ", ".join(f"{label} {min(e['raised'][label]['count'][0] for e in changes.values())} of "
                          f"{changes['as stored']['raised'][label]['count'][1]}" for label in classes)
    free = changes["as stored"]["raised"][negative]["count"][1]
    most_free = max(entry["raised"][negative]["count"][0] for entry in changes.values())
    refused = max(entry.get("refused", {}).get("count", [0])[0] for entry in changes.values())
    return (f"{SHIFT_SENTENCE_START} (brighter or darker grey curves, a coarser matrix, a softer kernel, more noise), "
            f"it flagged {stored[0]} of {stored[1]} tumours as stored and at least {fewest} under every change "
            f"(at least: {per_class}); it flagged up to {most_free} of {free} tumour-free images, and the input "
            f"check refused {f'up to {refused}' if refused else 'none'} of the {block['images']} re-made images. "
            "Real images from another hospital differ in more ways (sequence, contrast agent, patients): "
            "check it on your own studies.")
