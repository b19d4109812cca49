"""Training/evaluation pipeline on tiny synthetic data: seconds on CPU, no real training.

Each task's path (folder layouts, the RSNA ID,Label CSV with DICOM, chest X-ray for which
no real data exists) must produce a card + fp16 safetensors that the service's
`load_model` accepts; the split must be reproducible and disjoint; resume must continue
where a run stopped; evaluate must write metrics JSON and PNG plots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from safetensors import safe_open

from cds_training.cards import cv_sentence
from cds_training.datasets import discover_samples, split_samples
from cds_devtools.dicom_data import make_dataset
from cds_service.core.domain import TASK_LABELS, Task
from cds_service.core.evaluation import binary_auc, choose_thresholds, sensitivity_specificity, threshold_for_sensitivity
from cds_service.core.models import load_model
from cds_training.training import (
    STORED_DECIMALS,
    TASK_SETUPS,
    TrainConfig,
    _split_rows,
    add_evaluate_arguments,
    as_predictions,
    add_train_arguments,
    augment,
    default_spec,
    run_evaluate,
    run_train,
    train,
)

pytestmark = pytest.mark.slow  # training runs (tiny, still seconds each)

SIZE = 32  # the smallest size EfficientNet-B0 still reduces sensibly; keeps each step ~0.1 s


# --- synthetic data --------------------------------------------------------------------------


def _image(rng: np.random.Generator, bright: bool, mode: str, size: tuple[int, int]) -> Image.Image:
    """A blob on a dark background; 'positive' classes get a bright spot so the task is learnable."""
    w, h = size
    grey = rng.integers(0, 60, (h, w)).astype(np.uint8)
    if bright:
        grey[h // 3 : h // 2, w // 3 : w // 2] = 230
    img = Image.fromarray(grey, "L")
    return img.convert(mode) if mode != "L" else img


def make_folders(root: Path, classes: dict[str, bool], per_class: int = 5, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for k, (name, bright) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            mode = ("L", "RGB", "RGBA")[(i + k) % 3]
            _image(rng, bright, mode, (40 + 4 * i, 36 + 2 * k)).save(root / name / f"img_{i:02d}.png")
    return root


def ct_dicom(hu: np.ndarray, patient: str) -> Dataset:
    """A minimal CT slice: stored = HU + 1024, slope 1, intercept -1024 (as RSNA stores them)."""
    stored = np.clip(np.round(hu + 1024), 0, 65535).astype(np.uint16)
    return make_dataset(stored, modality="CT", patient_id=patient, rescale_slope=1, rescale_intercept=-1024, bits_stored=16)


def make_rsna(root: Path, n_images: int = 12) -> Path:
    """RSNA 2019 layout: ID,Label CSV (ID_<img>_<subtype>) with ID_<img>.dcm beside it.

    Two slices per patient, so the split must keep a patient's slices together.
    """
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    rows = ["ID,Label"]
    subtypes = TASK_LABELS[Task.HEAD_CT_ICH][1:]
    for i in range(n_images):
        image_id = f"ID_{i:09x}"
        positive = i % 2 == 0
        hu = rng.uniform(0, 30, (32, 32))
        if positive:
            hu[10:16, 10:16] = 70  # a bright "bleed" in brain window
        ct_dicom(hu, patient=f"P{i // 2:03d}").save_as(root / f"{image_id}.dcm", enforce_file_format=True)
        rows.append(f"{image_id}_any,{int(positive)}")
        for j, sub in enumerate(subtypes):
            rows.append(f"{image_id}_{sub},{int(positive and (i // 2 + j) % 2 == 0)}")
    rows.append("ID_ffffffff0_any,1")  # labelled but no image supplied: ignored
    (root / "stage_2_train.csv").write_text("\n".join(rows) + "\n")
    return root


BRAIN = {"glioma": True, "meningioma": True, "notumor": False, "pituitary": True}
HEAD = {"hemorrhage": True, "normal": False}
CHEST = {"pneumothorax": True, "normal": False}


def tiny_config(task: Task, data: Path, out: Path, **kw) -> TrainConfig:
    defaults = dict(
        epochs=1,
        image_size=SIZE,
        batch_size=4,
        max_steps_per_epoch=2,
        bootstrap=20,
        progress=False,
        plots=False,
        checkpoint=out / "ckpt" / f"{task.value}.pt",
    )
    defaults.update(kw)
    return TrainConfig(task=task, data_dir=data, out_dir=out, **defaults)


# --- split ---------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_stratified(tmp_path: Path) -> None:
    data = make_folders(tmp_path / "brain", BRAIN, per_class=10)
    samples = discover_samples(Task.BRAIN_MRI, data)
    train1, val1 = split_samples(samples, seed=7, val_fraction=0.2)
    train2, val2 = split_samples(list(reversed(samples)), seed=7, val_fraction=0.2)
    assert [s.rel for s in val1] == [s.rel for s in val2]
    assert [s.rel for s in train1] == [s.rel for s in train2]
    assert not {s.rel for s in train1} & {s.rel for s in val1}
    assert {s.rel for s in train1} | {s.rel for s in val1} == {s.rel for s in samples}
    assert len(val1) == 8  # 2 of 10 per class
    assert {s.rel.split("/")[0] for s in val1} == set(BRAIN)
    _, val_other_seed = split_samples(samples, seed=8, val_fraction=0.2)
    assert [s.rel for s in val_other_seed] != [s.rel for s in val1]


def test_folder_names_map_to_card_labels(tmp_path: Path) -> None:
    samples = discover_samples(Task.BRAIN_MRI, make_folders(tmp_path / "brain", BRAIN, per_class=1))
    labels = TASK_LABELS[Task.BRAIN_MRI]
    by_folder = {s.rel.split("/")[0]: labels[int(np.argmax(s.targets))] for s in samples}
    assert by_folder == {"glioma": "glioma", "meningioma": "meningioma", "notumor": "no_tumor", "pituitary": "pituitary"}
    head = discover_samples(Task.HEAD_CT_ICH, make_folders(tmp_path / "head", HEAD, per_class=1))
    assert {s.rel.split("/")[0]: (s.targets[0], s.known) for s in head} == {
        "hemorrhage": (1.0, (True, False, False, False, False, False)),
        "normal": (0.0, (True, False, False, False, False, False)),
    }


def test_rsna_csv_layout_splits_by_patient(tmp_path: Path) -> None:
    data = make_rsna(tmp_path / "rsna")
    samples = discover_samples(Task.HEAD_CT_ICH, data)
    assert len(samples) == 12  # the CSV row without an image is ignored
    assert all(all(s.known) for s in samples)
    assert samples[0].group == "patient:P000"
    train_set, val_set = split_samples(samples, seed=42, val_fraction=0.3)
    assert not {s.group for s in train_set} & {s.group for s in val_set}
    assert val_set


def test_a_dicom_whose_patient_cannot_be_read_stops_the_split_with_its_name(tmp_path: Path) -> None:
    data = make_rsna(tmp_path / "rsna")
    (data / "ID_000000003.dcm").write_bytes(b"not a DICOM file at all")  # the second slice of patient P001
    with pytest.raises(ValueError, match="ID_000000003.dcm: cannot read its DICOM header"):
        discover_samples(Task.HEAD_CT_ICH, data)


# --- metrics -------------------------------------------------------------------------------------


def test_card_figures_use_the_probabilities_the_split_file_stores(tmp_path: Path) -> None:
    """A rare label's tiny probabilities tie once rounded for the split file; the card's AUC is computed
    from the rounded values, so it follows from that file (2.2.0's epidural AUC moved by 0.001 before)."""
    from cds_training.datasets import Sample

    labels = TASK_LABELS[Task.HEAD_CT_ICH]
    samples = [Sample(f"s{i}.png", tmp_path / f"s{i}.png", tuple(float(i % 2) for _ in labels), (True,) * len(labels), f"s{i}.png")
               for i in range(4)]
    probs = np.array([[3.0000004e-4, 0.3, 0.3, 0.3, 0.3, 0.3], [2.9999996e-4, 0.4, 0.4, 0.4, 0.4, 0.4],
                      [1e-4, 0.1, 0.1, 0.1, 0.1, 0.1], [5e-4, 0.9, 0.9, 0.9, 0.9, 0.9]])
    pred = as_predictions(samples, probs, labels, "sigmoid", labels)
    stored = np.array([row["probs"] for row in _split_rows(samples, pred, labels)])
    assert np.array_equal(pred.probs, stored)
    assert pred.probs[0, 0] == pred.probs[1, 0] == round(3e-4, STORED_DECIMALS)  # tied, as in the file


def test_threshold_reaches_target_sensitivity() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400).astype(bool)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    t = threshold_for_sensitivity(y, p, 0.95)
    sens, spec = sensitivity_specificity(y, p >= t)
    assert sens >= 0.95
    assert sensitivity_specificity(y, p >= t + 0.01)[0] < 0.95 or t >= 0.99  # the highest such threshold
    from sklearn.metrics import roc_auc_score

    assert binary_auc(y, p) == pytest.approx(roc_auc_score(y, p))


# --- training each task ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, layout",
    [
        (Task.BRAIN_MRI, "folders"),
        (Task.HEAD_CT_ICH, "folders"),
        (Task.HEAD_CT_ICH, "rsna_csv"),
        (Task.CHEST_PNEUMOTHORAX, "folders"),
    ],
)
def test_training_writes_a_card_the_service_loads(tmp_path: Path, task: Task, layout: str) -> None:
    if layout == "rsna_csv":
        data = make_rsna(tmp_path / "data")
    else:
        data = make_folders(tmp_path / "data", {Task.BRAIN_MRI: BRAIN, Task.HEAD_CT_ICH: HEAD, Task.CHEST_PNEUMOTHORAX: CHEST}[task])
    out = tmp_path / "weights"
    result = train(tiny_config(task, data, out))

    model = load_model(out, task)
    card = json.loads((out / f"{task.value}.json").read_text())
    labels = TASK_LABELS[task]
    assert model.card.labels == labels
    assert card["activation"] == TASK_SETUPS[task].activation
    assert card["input_size"] == SIZE and card["preprocessing"]["kind"] == TASK_SETUPS[task].spec_kind
    assert "not a diagnosis" in card["disclaimer"]
    if task is Task.HEAD_CT_ICH and layout == "folders":
        assert card["trained_labels"] == ["any"]
        assert card["untrained_labels"] == list(labels[1:])
        assert card["preprocessing"]["windows"] == [[40.0, 80.0]] * 3
        assert "size_only_baseline" in card
    else:
        assert card["trained_labels"] == list(labels)
    assert set(card["thresholds"]) == set(card["trained_labels"])
    assert "accuracy" in card["validation_metrics"]["metrics"]
    assert len(card["validation_metrics"]["metrics"]["accuracy"]["ci95"]) == 2
    with safe_open(str(out / f"{task.value}.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}

    split = json.loads((out / f"{task.value}.split.json").read_text())
    _, val_set = split_samples(discover_samples(task, data), card["data"]["split"]["seed"], card["data"]["split"]["val_fraction"])
    assert [row["file"] for row in split["validation"]] == [s.rel for s in val_set]
    assert result.history and result.history[0]["epoch"] == 1

    batch = np.zeros((2, 3, SIZE, SIZE), np.float32)
    probs = model.predict(batch)
    assert probs.shape == (2, len(labels))
    if card["activation"] == "softmax":
        assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_sigmoid_loss_ignores_untrained_labels() -> None:
    import torch

    from cds_training.training import masked_loss

    logits = torch.zeros(2, 6, requires_grad=True)
    targets = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1.0, 0, 0, 0, 0, 0]] * 2)
    masked_loss(logits, targets, mask, "sigmoid", 0.0).backward()
    assert torch.all(logits.grad[:, 1:] == 0) and torch.all(logits.grad[:, 0] != 0)


def test_init_from_replaces_only_the_classifier(tmp_path: Path) -> None:
    brain_out = tmp_path / "brain_weights"
    train(tiny_config(Task.BRAIN_MRI, make_folders(tmp_path / "brain", BRAIN), brain_out))
    head_out = tmp_path / "head_weights"
    result = train(
        tiny_config(Task.HEAD_CT_ICH, make_folders(tmp_path / "head", HEAD), head_out, init_from=brain_out / "brain_mri.safetensors")
    )
    assert result.card["training"]["reinitialised_from_init"] == ["classifier.bias", "classifier.weight"]
    assert result.card["training"]["init_from"].endswith("brain_mri.safetensors")


def test_resume_continues_from_the_checkpoint(tmp_path: Path) -> None:
    data = make_folders(tmp_path / "data", CHEST)
    ckpt = tmp_path / "ckpt.pt"
    first = train(tiny_config(Task.CHEST_PNEUMOTHORAX, data, tmp_path / "a", epochs=2, checkpoint=ckpt, max_minutes=1e-9))
    assert [row["epoch"] for row in first.history] == [1]  # stopped by the time budget after epoch 1
    resumed = train(tiny_config(Task.CHEST_PNEUMOTHORAX, data, tmp_path / "b", epochs=2, checkpoint=ckpt, resume=ckpt))
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]
    assert resumed.card["training"]["epochs_run"] == 2

    other = make_folders(tmp_path / "other", CHEST, per_class=7, seed=3)
    with pytest.raises(ValueError, match="another validation split"):
        train(tiny_config(Task.CHEST_PNEUMOTHORAX, other, tmp_path / "c", epochs=2, resume=ckpt, checkpoint=tmp_path / "x.pt"))


def test_training_seed_redraws_the_training_but_keeps_the_split(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = make_folders(tmp_path / "data", CHEST)
    runs = {name: train(tiny_config(Task.CHEST_PNEUMOTHORAX, data, tmp_path / name, checkpoint=tmp_path / f"{name}.pt", **kw))
            for name, kw in {"base": {}, "again": {"training_seed": 42}, "other": {"training_seed": 7}}.items()}
    weights = {name: load_file(str(tmp_path / name / "chest_pneumothorax.safetensors"))["classifier.weight"] for name in runs}
    splits = {name: json.loads((tmp_path / name / "chest_pneumothorax.split.json").read_text()) for name in runs}

    assert weights["again"].equal(weights["base"])  # a training seed equal to the split seed changes nothing
    assert not weights["other"].equal(weights["base"])
    assert [r["file"] for r in splits["other"]["validation"]] == [r["file"] for r in splits["base"]["validation"]]
    assert runs["other"].card["training"]["training_seed"] == 7 and runs["other"].card["training"]["seed"] == 42
    assert "training_seed" not in runs["base"].card["training"]


def test_weight_average_is_what_is_validated_and_shipped(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    data = make_folders(tmp_path / "data", CHEST)
    ckpt = tmp_path / "ckpt.pt"
    result = train(tiny_config(Task.CHEST_PNEUMOTHORAX, data, tmp_path / "out", ema_decay=0.5, checkpoint=ckpt, lr=5e-2))
    saved = torch.load(str(ckpt), map_location="cpu", weights_only=False)
    shipped = load_file(str(tmp_path / "out" / "chest_pneumothorax.safetensors"))
    name = "classifier.weight"
    assert torch.allclose(shipped[name].float(), saved["ema"][name].float().half().float())
    assert not torch.allclose(saved["ema"][name], saved["network"][name])  # the average is not the last step
    assert "moving average" in result.card["training"]["weight_average"]

    resumed = train(tiny_config(Task.CHEST_PNEUMOTHORAX, data, tmp_path / "b", epochs=2, ema_decay=0.5, checkpoint=ckpt, resume=ckpt))
    assert [row["epoch"] for row in resumed.history] == [1, 2]


def test_stochastic_depth_only_while_training() -> None:
    import torch
    from cds_service.core.models import create_network
    from cds_training.training import add_stochastic_depth

    network = create_network(2, "tf_efficientnet_b0")
    x = torch.rand(2, 3, SIZE, SIZE)
    network.eval()
    before = network(x)
    assert add_stochastic_depth(network, 0.5) >= 8  # B0 has nine residual blocks with a skip
    assert torch.equal(network(x), before)  # eval: identity
    network.train()
    torch.manual_seed(0)
    first = network(x)
    torch.manual_seed(1)
    assert not torch.allclose(first, network(x))  # training: blocks dropped at random


@pytest.mark.parametrize("ema_decay", [0.0, 0.5])
def test_recard_keeps_what_the_run_used(tmp_path: Path, ema_decay: float) -> None:
    from cds_training.training import recard

    data = make_folders(tmp_path / "data", CHEST)
    out = tmp_path / "out"
    train(tiny_config(Task.CHEST_PNEUMOTHORAX, data, out, ema_decay=ema_decay))
    measured = {"method": "grouped", "command": "python -m cds_training.crossval", "label": "pneumothorax",
                "folds": [{"fold": 0, "auc": 0.7}, {"fold": 1, "auc": 0.8}], "fold_auc": {"min": 0.7, "max": 0.8},
                "pooled_out_of_fold_auc": {"value": 0.75, "images": 20}, "card_test_auc": 0.9,
                "at_fold_thresholds": {"sensitivity": {"count": [4, 5]}, "specificity": {"count": [9, 15]}}}
    cpath = out / "chest_pneumothorax.json"
    cpath.write_text(json.dumps(json.loads(cpath.read_text()) | {"cross_validation": measured}))
    card = recard(out, Task.CHEST_PNEUMOTHORAX, data)
    assert ("weight_average" in card["training"]) == (ema_decay > 0)
    assert "stochastic_depth" not in card["training"]
    assert card["cross_validation"] == measured  # measured apart from the run: kept, and still said in the limits
    assert [line for line in card["limitations"] if line.startswith("On patients it never saw")] == [cv_sentence(measured)]


def test_chest_augmentation_never_flips_left_right() -> None:
    import torch

    from cds_training.training import Augmentation

    assert TASK_SETUPS[Task.CHEST_PNEUMOTHORAX].augmentation.hflip is False
    spec = default_spec(Task.CHEST_PNEUMOTHORAX, SIZE)
    x = torch.zeros(8, 3, SIZE, SIZE)
    x[:, :, :, : SIZE // 4] = 2.0  # bright strip on the left
    still = Augmentation(rotate_deg=0, scale=(1, 1), translate=0, brightness=0, contrast=0, hflip=False)
    y = augment(x, still, spec, torch.Generator().manual_seed(0))
    assert torch.allclose(y, x, atol=1e-5)
    y = augment(x, TASK_SETUPS[Task.CHEST_PNEUMOTHORAX].augmentation, spec, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert (y[:, 0, :, : SIZE // 4].mean(dim=(1, 2)) > y[:, 0, :, -SIZE // 4 :].mean(dim=(1, 2))).all()


# --- CLI glue and evaluate ----------------------------------------------------------------------


def test_cli_train_then_evaluate_writes_metrics_and_plots(tmp_path: Path) -> None:
    data = make_folders(tmp_path / "data", BRAIN)
    out = tmp_path / "weights"
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        ["--task", "brain_mri", "--data", str(data), "--epochs", "1", "--image-size", str(SIZE), "--batch-size", "4",
         "--out", str(out), "--checkpoint", str(tmp_path / "c.pt"), "--max-steps-per-epoch", "1", "--bootstrap", "20",
         "--no-progress"]
    )  # fmt: skip
    assert run_train(args) == 0
    assert (out / "eval" / "brain_mri" / "roc.png").exists()

    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    eval_out = tmp_path / "eval"
    args = parser.parse_args(["--task", "brain_mri", "--data", str(data), "--weights", str(out), "--out", str(eval_out), "--bootstrap", "20", "--no-progress"])
    assert run_evaluate(args) == 0
    doc = json.loads((eval_out / "metrics.json").read_text())
    assert doc["split"] == "validation" and doc["validation_split_matches_card"] is True
    for name in ("balanced_accuracy", "glioma.auc"):  # percentile bootstrap
        assert set(doc["metrics"][name]) == {"value", "ci95"}
    for name in ("accuracy", "glioma.sensitivity", "glioma.specificity"):  # proportions: Wilson, with the count
        assert set(doc["metrics"][name]) == {"value", "ci95", "count", "interval"} and doc["metrics"][name]["interval"] == "wilson"
    for png in ("roc.png", "pr.png", "confusion_matrix.png", "calibration.png"):
        assert (eval_out / png).read_bytes().startswith(b"\x89PNG")
    card = json.loads((out / "brain_mri.json").read_text())
    assert doc["metrics"]["accuracy"] == card["validation_metrics"]["metrics"]["accuracy"]


def test_cli_reports_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--task", "chest_pneumothorax", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path)])
    assert run_train(args) == 2
    assert "chest_pneumothorax" not in {p.stem for p in tmp_path.glob("*.safetensors")}


def test_choose_thresholds_one_vs_rest_for_softmax() -> None:
    from cds_service.core.evaluation import Predictions

    labels = TASK_LABELS[Task.BRAIN_MRI]
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 200)
    logits = rng.normal(0, 1, (200, 4)) + 2.0 * np.eye(4)[truth]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = Predictions(labels, "softmax", np.eye(4)[truth], np.ones((200, 4), bool), probs)
    thresholds = choose_thresholds(pred)
    for j, label in enumerate(labels):
        assert sensitivity_specificity(truth == j, probs[:, j] >= thresholds[label])[0] >= 0.95


def test_extra_labelled_data_trains_but_is_never_validated_or_tested(tmp_path: Path) -> None:
    """`--extra-data` (e.g. the Kaggle head CT PNGs beside the RSNA slices): training split only, its own
    labels (subtypes it does not name masked), counted in the card, and kept by `recard`."""
    from cds_training.training import recard

    data = make_rsna(tmp_path / "rsna")
    extra = make_folders(tmp_path / "head_ct_png", HEAD, per_class=2)
    out = tmp_path / "out"
    train(tiny_config(Task.HEAD_CT_ICH, data, out, extra_data=extra))
    card = json.loads((out / "head_ct_ich.json").read_text())
    assert card["data"]["extra_training_data"]["count"] == 4
    counts = card["data"]["counts"]
    rsna_images = len(discover_samples(Task.HEAD_CT_ICH, data))
    assert counts["train_total"] + counts["validation_total"] + counts.get("test_total", 0) == rsna_images + 4
    assert "head_ct_png/" not in (out / "head_ct_ich.split.json").read_text()  # never validated or tested
    again = recard(out, Task.HEAD_CT_ICH, data)
    assert again["data"]["extra_training_data"]["count"] == 4
    assert again["data"]["counts"]["train_total"] == card["data"]["counts"]["train_total"]


def test_extra_labelled_samples_mask_what_their_folder_does_not_name(tmp_path: Path) -> None:
    from cds_training.datasets import extra_labelled

    samples = extra_labelled(Task.HEAD_CT_ICH, make_folders(tmp_path / "head_ct_png", HEAD, per_class=1))
    assert {(s.rel.split("/")[1], s.targets[0], s.known) for s in samples} == {
        ("hemorrhage", 1.0, (True, False, False, False, False, False)),
        ("normal", 0.0, (True, False, False, False, False, False)),
    }
    assert all(s.rel.startswith("head_ct_png/") for s in samples)
    with pytest.raises(FileNotFoundError, match="no labelled images"):
        extra_labelled(Task.HEAD_CT_ICH, tmp_path)


def test_grouped_folds_test_every_group_once_and_keep_groups_whole() -> None:
    from cds_training.datasets import Sample, split_folds

    samples = [Sample(f"img{i:03d}.png", Path(f"img{i:03d}.png"), (float(i % 4 == 0),), (True,), f"patient:{i // 3}")
               for i in range(120)]
    tested: list[str] = []
    for fold in range(5):
        train_set, val_set, test_set = split_folds(samples, 42, 5, fold)
        parts = [{s.group for s in part} for part in (train_set, val_set, test_set)]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert len(train_set) + len(val_set) + len(test_set) == len(samples)
        assert any(s.targets[0] for s in test_set) and any(not s.targets[0] for s in test_set)  # stratified
        assert {s.rel for s in val_set} == {s.rel for s in split_folds(samples, 42, 5, (fold + 1) % 5)[2]}
        tested += [s.rel for s in test_set]
    assert sorted(tested) == sorted(s.rel for s in samples)  # each image tested exactly once
    with pytest.raises(ValueError, match="at least 3 folds"):
        split_folds(samples, 42, 2, 0)


def test_crossval_tests_every_image_once_and_summarises_when_the_last_fold_is_done(tmp_path: Path) -> None:
    from cds_training import crossval

    data = make_folders(tmp_path / "data", CHEST, per_class=6)
    out = tmp_path / "cv"
    args = ["--task", "chest_pneumothorax", "--data", str(data), "--out", str(out), "--folds", "3", "--epochs", "1",
            "--image-size", str(SIZE), "--batch-size", "4", "--max-steps-per-epoch", "1", "--bootstrap", "20", "--no-progress"]
    assert crossval.main(args + ["--run-folds", "0,2"]) == 0
    assert not (out / "crossval.json").exists()  # fold 1 is not done: no summary yet
    assert crossval.main(args) == 0  # trains fold 1 only (0 and 2 are there) and summarises
    summary = json.loads((out / "crossval.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2]
    assert sum(f["test_images"] for f in summary["folds"]) == summary["pooled_out_of_fold_auc"]["images"] == 12
    tested = [row["file"] for fold in range(3)
              for row in json.loads((out / f"fold{fold}" / "chest_pneumothorax.split.json").read_text())["test"]]
    assert len(tested) == len(set(tested)) == 12  # each image tested by exactly one fold

    shipped = tmp_path / "weights"  # a card to record it in: one fold's card stands in for the shipped model's
    shipped.mkdir()
    (shipped / "chest_pneumothorax.json").write_text((out / "fold0" / "chest_pneumothorax.json").read_text())
    for _ in range(2):  # recorded again once every fold is done: replaced, not added twice
        assert crossval.main(args + ["--card", str(shipped)]) == 0
    card = json.loads((shipped / "chest_pneumothorax.json").read_text())
    block = card["cross_validation"]
    sens = block["at_fold_thresholds"]["sensitivity"]["count"]
    assert sens[1] == summary["pooled_out_of_fold_auc"]["positives"] == 6
    assert sens[0] == sum(json.loads((out / f"fold{f}" / "chest_pneumothorax.json").read_text())["test_metrics"]["metrics"]
                          ["pneumothorax.sensitivity_at_threshold"]["count"][0] for f in range(3))
    said = [line for line in card["limitations"] if line.startswith("On patients it never saw")]
    assert len(said) == 1 and f"{sens[0]} of 6 images with a pneumothorax" in said[0]
    from cds_service.core.evaluation import weights_readme
    assert "**Grouped cross-validation** (3 folds" in weights_readme([card])


def test_crossval_resumes_a_fold_stopped_part_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cds_training import crossval

    out = tmp_path / "cv"
    (out / "fold0").mkdir(parents=True)
    (out / "fold0" / "last.pt").write_bytes(b"a checkpoint")  # fold 0 was stopped after some epoch
    started: list[TrainConfig] = []
    monkeypatch.setattr(crossval, "train", started.append)
    crossval.main(["--task", "chest_pneumothorax", "--data", str(tmp_path), "--out", str(out), "--folds", "2"])
    assert [(c.cv_fold, c.resume) for c in started] == [(0, out / "fold0" / "last.pt"), (1, None)]


def test_shift_check_rescores_the_test_split_as_other_scanners_might_make_it(tmp_path: Path) -> None:
    from cds_service.core.evaluation import weights_readme
    from cds_training.cards import SHIFT_SENTENCE_START, shift_sentence
    from cds_training.shift_check import SHIFTS, shift_check

    data = make_folders(tmp_path / "data", BRAIN, per_class=8)
    out = tmp_path / "out"
    train(tiny_config(Task.BRAIN_MRI, data, out, test_fraction=0.25))
    card_file = out / "brain_mri.json"
    card = json.loads(card_file.read_text())
    rows = json.loads((out / "brain_mri.split.json").read_text())["test"]
    block = shift_check(out, Task.BRAIN_MRI, data)

    assert list(block["changes"]) == list(SHIFTS)
    # "as stored" is the card's own test split at the card's presence threshold: its probabilities are stored
    threshold = card["presence"]["threshold"]
    stored = np.array([row["probs"] for row in rows])
    truth = np.array([int(np.argmax(row["targets"])) for row in rows])
    raised = (1.0 - stored[:, 3]) >= threshold
    as_stored = block["changes"]["as stored"]
    assert as_stored["tumours_raised"]["count"] == [int(raised[truth != 3].sum()), int((truth != 3).sum())]
    assert as_stored["raised"]["no_tumor"]["count"] == [int(raised[truth == 3].sum()), int((truth == 3).sum())]
    for entry in block["changes"].values():
        assert sum(v["count"][1] for v in entry["raised"].values()) == len(rows)
        low, high = entry["tumours_raised"]["ci95"]
        assert low <= entry["tumours_raised"]["value"] <= high

    # each change changes the image; none is a no-op that would make the check cannot-fail
    grey = np.asarray(Image.open(data / rows[0]["file"]).convert("L"), dtype=np.float32)
    for name, change in SHIFTS.items():
        if name != "as stored":
            assert np.abs(change(grey.copy()) - grey).mean() > 0.5, name

    # recorded once in the card, said once in its limits and in weights/README.md, even when run again
    shift_check(out, Task.BRAIN_MRI, data)
    recorded = json.loads(card_file.read_text())
    assert recorded["acquisition_shift"]["changes"].keys() == block["changes"].keys()
    assert [line for line in recorded["limitations"] if line.startswith(SHIFT_SENTENCE_START)] == [shift_sentence(recorded["acquisition_shift"])]
    assert "Test images re-made as other scanners might" in weights_readme([recorded])
