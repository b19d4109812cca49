"""The committed weights: they load, match their cards, are deterministic, and the card's
validation metrics reproduce on the shared data (a subset, to stay within a minute on 2 cores).

The data lives outside the repo (`../shared/data`, or `CDS_TRAINING_DATA`) and may not be
redistributed, so a clean CI checkout does not have it: the checks that re-read images skip there,
with the reason. The card's metrics are still checked against the stored per-image validation
probabilities (`<task>.split.json`), which need no images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
import math
import os
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from safetensors import safe_open

from cds_training.datasets import build_split
from cds_devtools.dicom_data import dicom_bytes, make_dataset
from cds_service.core.domain import TASK_LABELS, Task
from cds_service.core.evaluation import Predictions, point_metrics
from cds_service.core.models import load_model
from cds_service.core.preprocessing import Framing, dicom_to_image, grey_to_image, load_grey, read_dicom, to_batch
from cds_training.training import as_predictions, predict_samples, stored_predictions

pytestmark = pytest.mark.slow  # the shipped models, on the shared data set

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"
SHIPPED = [Task.BRAIN_MRI, Task.HEAD_CT_ICH, Task.CHEST_PNEUMOTHORAX]
MAX_CHECK_IMAGES = 160  # per task: keeps the whole file well under a minute on 2 cores


def data_root() -> Path:
    return Path(os.environ.get("CDS_TRAINING_DATA") or REPO.parent / "shared" / "data")


def require_data() -> Path:
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"training data not found at {root} (not redistributable; set CDS_TRAINING_DATA)")
    return root


def card(task: Task) -> dict:
    return json.loads((WEIGHTS / f"{task.value}.json").read_text())


@pytest.fixture(scope="module")
def models() -> dict:
    """The service's default: ONNX Runtime on the graph shipped in weights/, no torch network."""
    return {task: load_model(WEIGHTS, task, runtime="auto") for task in SHIPPED}


@pytest.fixture(scope="module")
def torch_models() -> dict:
    """The same weights in torch: the reference the shipped graphs are checked against."""
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    return {task: load_model(WEIGHTS, task, runtime="torch") for task in SHIPPED}


# --- files and cards -----------------------------------------------------------------------


@pytest.mark.parametrize("task", SHIPPED, ids=lambda t: t.value)
def test_weights_match_their_card(task: Task, torch_models: dict) -> None:
    c = card(task)
    model = torch_models[task]
    assert model.card.labels == TASK_LABELS[task]
    assert c["input_size"] == model.card.preprocessing.input_size
    assert model.network.classifier.out_features == len(TASK_LABELS[task])
    assert set(c["thresholds"]) == set(c["trained_labels"])
    assert c["version"] and c["name"].startswith("cds-triage-")
    assert "not a diagnosis" in c["disclaimer"]
    wfile = WEIGHTS / f"{task.value}.safetensors"
    assert hashlib.sha256(wfile.read_bytes()).hexdigest() == c["weights_sha256"]
    with safe_open(str(wfile), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in list(f.keys())[:5]} == {"torch.float16"}
    for name, block in c["validation_metrics"]["metrics"].items():
        if block["value"] is not None:
            lo, hi = block["ci95"]
            assert lo <= block["value"] + 1e-9 and block["value"] <= hi + 1e-9, name


def test_head_ct_card_says_what_was_trained() -> None:
    c = card(Task.HEAD_CT_ICH)
    assert c["trained_labels"] == list(TASK_LABELS[Task.HEAD_CT_ICH])  # any + the five subtypes
    assert c["preprocessing"]["kind"] == "ct_windows"
    assert c["preprocessing"]["windows"] == [[40.0, 80.0]] * 3
    assert c["series_pooling"] == {"method": "adjacent_mean", "window": 3, "slab_mm": 5.0}  # thin slices: 5 mm slabs
    assert "any" in c["priority_labels"]
    for label, verdict in c["priority_bar"]["labels"].items():  # a subtype short of its bar raises nothing alone
        assert verdict["raises_priority"] == (label in c["priority_labels"])
    baseline = c["size_only_baseline"]
    assert "validation_auc" in baseline and "model_validation_auc" in baseline


@pytest.mark.parametrize("task", SHIPPED, ids=lambda t: t.value)
def test_every_card_reports_a_test_split_that_chose_nothing(task: Task) -> None:
    c = card(task)
    split = c["data"]["split"]
    assert split["test_fraction"] > 0 and c["data"]["counts"]["test_total"] > 0
    assert "test_metrics" in c and c["test_metrics"]["n_images"] == c["data"]["counts"]["test_total"]
    for block in (c["validation_metrics"], c["test_metrics"]):
        for name, metric in block["metrics"].items():
            if name.endswith(("sensitivity", "specificity", "sensitivity_at_threshold", "specificity_at_threshold")):
                assert metric["interval"] == "wilson", name  # honest at small n
    assert c["training"]["imagenet_init"]["parameter_share_from_imagenet"] > 0.8


@pytest.mark.parametrize("task", SHIPPED, ids=lambda t: t.value)
def test_identical_input_gives_identical_output(task: Task, models: dict) -> None:
    model = models[task]
    size = model.card.preprocessing.input_size
    rng = np.random.default_rng(0)
    batch = rng.normal(0, 1, (3, 3, size, size)).astype(np.float32)
    first = model.predict(batch)
    assert np.array_equal(first, model.predict(batch.copy()))
    assert first.shape == (3, len(TASK_LABELS[task]))
    assert np.all((first >= 0) & (first <= 1))


@pytest.mark.parametrize("task", SHIPPED, ids=lambda t: t.value)
def test_onnx_runtime_scores_like_torch(task: Task, models: dict, torch_models: dict) -> None:
    """The default CPU runtime is ONNX Runtime on the graph shipped beside the weights, with no torch network."""
    model = models[task]
    assert model.runtime == "onnxruntime" and model.network is None
    size = model.card.preprocessing.input_size
    batch = np.random.default_rng(1).normal(0, 1, (5, 3, size, size)).astype(np.float32)
    np.testing.assert_allclose(model.predict(batch), torch_models[task].predict_torch(batch), atol=1e-4)


@pytest.mark.parametrize("task", SHIPPED, ids=lambda t: t.value)
def test_grad_cam_from_the_forward_pass_equals_pytorch_grad_cam(task: Task, models: dict, torch_models: dict) -> None:
    """The serving path's Grad-CAM (classifier weights x the feature map ONNX Runtime returned)
    is pytorch-grad-cam's GradCAM (forward + backward on the torch network), label by label."""
    from cds_service.core.explain import class_activation_map, grad_cam

    model = models[task]
    assert model.cam_weights is not None and model.cam_weights.shape == (len(model.card.labels), 1280)
    size = model.card.preprocessing.input_size
    rng = np.random.default_rng(2)
    images = [rng.random((size + 40, size + 40, 3), dtype=np.float32) for _ in range(2)]
    _, features = model.predict_with_features(to_batch(images, model.card.preprocessing))
    assert features is not None and features.shape[:2] == (2, 1280)
    for index, image in enumerate(images):
        for label in range(len(model.card.labels)):
            reference = grad_cam(torch_models[task], image, label)
            fast = class_activation_map(features[index], model.cam_weights[label], size)
            assert fast.shape == reference.shape == (size, size)
            np.testing.assert_allclose(fast, reference, atol=1e-4)


def test_torch_runtime_and_fallbacks(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                    tmp_path: Path) -> None:
    import shutil

    import cds_service.core.models as models_module

    assert load_model(WEIGHTS, Task.BRAIN_MRI, runtime="torch").runtime == "torch"
    with pytest.raises(ValueError, match="unknown inference runtime"):
        load_model(WEIGHTS, Task.BRAIN_MRI, runtime="tensorrt")

    # weights without a shipped graph: exported at load time, and torch when that fails
    unshipped = tmp_path / "weights"
    unshipped.mkdir()
    for suffix in (".json", ".safetensors"):
        shutil.copy(WEIGHTS / f"brain_mri{suffix}", unshipped / f"brain_mri{suffix}")

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(models_module, "onnx_session", broken_export)
    model = load_model(unshipped, Task.BRAIN_MRI, runtime="onnxruntime")
    assert model.runtime == "torch"  # triage keeps running, on torch
    assert "exporter exploded" in caplog.text

    class Disagreeing:
        def run(self, outputs, feeds):
            return [np.zeros((len(feeds["image"]), 4), np.float32)]

    monkeypatch.setattr(models_module, "onnx_session", lambda *args, **kwargs: Disagreeing())
    assert load_model(unshipped, Task.BRAIN_MRI, runtime="onnxruntime").runtime == "torch"
    assert "disagrees with torch" in caplog.text


# --- the card's numbers reproduce on the data ---------------------------------------------------


def _stored_predictions(task: Task, model, part: str = "validation") -> tuple[dict, Predictions]:
    """The validation (or test) split as stored beside the weights: files, truth and probabilities."""
    stored = json.loads((WEIGHTS / f"{task.value}.split.json").read_text())
    return stored, stored_predictions(WEIGHTS, card(task), part)


@pytest.mark.parametrize("task", SHIPPED, ids=lambda t: t.value)
def test_card_metrics_follow_from_the_stored_validation_probabilities(task: Task, models: dict) -> None:
    c = card(task)
    stored, pred = _stored_predictions(task, models[task])
    assert len(pred.files) == c["data"]["counts"]["validation_total"] == stored["validation_count"]
    recomputed = point_metrics(pred, models[task].card.thresholds)
    for name, block in c["validation_metrics"]["metrics"].items():
        if block["value"] is not None:
            assert recomputed[name] == pytest.approx(block["value"], abs=2e-4), name
    _, test_pred = _stored_predictions(task, models[task], "test")
    assert len(test_pred.files) == c["data"]["counts"]["test_total"]
    recomputed = point_metrics(test_pred, models[task].card.thresholds)
    for name, block in c["test_metrics"]["metrics"].items():
        if block["value"] is not None:
            assert recomputed[name] == pytest.approx(block["value"], abs=2e-4), name


def card_data_dir(root: Path, c: dict) -> Path:
    """The card's data folder under the shared data root: the root itself for every RSNA source at once."""
    return root if c["data"].get("layout") == "rsna_sources" else root / Path(c["data"]["dir"]).name


@pytest.mark.parametrize("task", SHIPPED, ids=lambda t: t.value)
def test_split_and_probabilities_reproduce_on_the_data(task: Task, models: dict) -> None:
    root = require_data()
    c = card(task)
    model = models[task]
    data_dir = card_data_dir(root, c)
    _, stored_pred = _stored_predictions(task, model)

    # 1. the split rebuilt from the data is the stored one, and the three parts are disjoint
    train_set, val_set, test_set = build_split(task, data_dir, c["data"]["split"])
    stored = json.loads((WEIGHTS / f"{task.value}.split.json").read_text())
    assert [s.rel for s in val_set] == list(stored_pred.files)
    assert [s.rel for s in test_set] == [row["file"] for row in stored.get("test", [])]
    train, val, test = ({s.rel for s in part} for part in (train_set, val_set, test_set))
    assert not train & val and not train & test and not val & test
    # no group (patient, or near-identical images) on two sides
    groups = [{s.group for s in part} for part in (train_set, val_set, test_set)]
    assert not groups[0] & groups[1] and not groups[0] & groups[2] and not groups[1] & groups[2]
    extra = c["data"].get("extra_training_negatives", {}).get("count", 0)
    assert len(train_set) + extra == c["data"]["counts"]["train_total"]
    rebuilt = as_predictions(val_set, stored_pred.probs, model.card.labels, model.card.activation, model.card.trained_labels)
    np.testing.assert_array_equal(rebuilt.targets[rebuilt.known], stored_pred.targets[stored_pred.known])

    # 2. the committed weights still give those probabilities (a spread-out subset)
    step = max(1, math.ceil(len(val_set) / MAX_CHECK_IMAGES))
    index = np.arange(0, len(val_set), step)
    subset = [val_set[i] for i in index]
    probs = predict_samples(model, subset)
    np.testing.assert_allclose(probs, stored_pred.probs[index], atol=2e-3)
    sub_pred = as_predictions(subset, probs, model.card.labels, model.card.activation, model.card.trained_labels)
    sub_acc = point_metrics(sub_pred, model.card.thresholds)["accuracy"]
    card_acc = c["validation_metrics"]["metrics"]["accuracy"]["value"]
    assert abs(sub_acc - card_acc) <= 0.07, (sub_acc, card_acc)


def _ct_dicom_from_brain_window_png(grey: np.ndarray) -> Dataset:
    """What a scanner would store for this brain-window image: HU = grey/255*80, stored = HU+1024."""
    stored = np.round(grey / 255.0 * 80.0 + 1024).astype(np.uint16)
    ds = make_dataset(stored, modality="CT", rescale_slope=1, rescale_intercept=-1024, bits_stored=16)
    return read_dicom(dicom_bytes(ds))


def test_head_ct_dicom_and_png_give_the_same_probabilities(models: dict) -> None:
    """A training PNG and a CT DICOM made from it (its grey levels back to HU) give the same windowed picture
    (before the head is framed: HU rounding only) and, framed as the card says, the same answers."""
    root = require_data()
    model = models[Task.HEAD_CT_ICH]
    spec = model.card.preprocessing
    unframed = replace(spec, framing=Framing.NONE)
    stored = json.loads((WEIGHTS / "head_ct_ich.split.json").read_text())
    pngs = [row["file"] for row in stored["validation"] if row["file"].endswith(".png")]
    files = pngs[:6] + pngs[-6:]  # sorted by source and folder: more than one of each
    data_dir = card_data_dir(root, card(Task.HEAD_CT_ICH))
    png_images, dicom_images = [], []
    for rel in files:
        grey = load_grey(data_dir / rel)
        dicom = _ct_dicom_from_brain_window_png(grey)
        assert np.abs(grey_to_image(grey, unframed) - dicom_to_image(dicom, unframed)).max() <= 0.5 / 80 + 1e-6
        png_images.append(grey_to_image(grey, spec))
        dicom_images.append(dicom_to_image(dicom, spec))
    p_png = model.predict(to_batch(png_images, spec))
    p_dcm = model.predict(to_batch(dicom_images, spec))
    # HU rounding can move the head's crop by a pixel, which moves a probability by up to a few hundredths
    np.testing.assert_allclose(p_dcm, p_png, atol=0.05)
    assert np.median(np.abs(p_dcm - p_png)) < 0.005


def test_an_unknown_runtime_is_refused_when_the_worker_starts() -> None:
    from cds_service.core.models import ModelRegistry

    with pytest.raises(ValueError, match="CDS_INFERENCE_RUNTIME"):
        ModelRegistry(WEIGHTS, runtime="onnx")


def test_the_weights_readme_is_generated_from_the_current_cards() -> None:
    """weights/README.md is never edited by hand: it must equal what the cards generate now."""
    from cds_service.core.evaluation import weights_readme

    cards = [card(task) for task in Task if (WEIGHTS / f"{task.value}.json").exists()]
    assert (WEIGHTS / "README.md").read_text() == weights_readme(cards), \
        "regenerate with: .venv/bin/python -m cds_training.training readme"
