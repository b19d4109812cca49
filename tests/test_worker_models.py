"""A worker's models: ONNX graphs exported once in a child process, so the worker never imports torch.

torch and timm are most of a worker's resident memory (650 MB of the CUDA build here); the
worker scores with ONNX Runtime and draws Grad-CAM from the graph's feature map. What it
loads must still be exactly the committed weights, and explain exactly as pytorch-grad-cam.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cds_service.domain import Task
from cds_service.models import ModelRegistry, load_model
from support import make_test_weights

REPO = Path(__file__).resolve().parents[1]

WORKER_CHILD = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import numpy as np
    from cds_service.domain import Priority, Task
    from cds_service.models import ModelRegistry
    from cds_service.triage import triage_images

    registry = ModelRegistry(Path(sys.argv[1]), runtime="auto", threads=1, onnx_dir=Path(sys.argv[2]))
    model = registry.get(Task.HEAD_CT_ICH)
    rng = np.random.default_rng(0)
    images = [np.broadcast_to(rng.random((90, 90, 1), dtype=np.float32), (90, 90, 3)) for _ in range(5)]
    result = triage_images(model, images, {"any": Priority.STAT}, study_uid="1.2.3")
    print(json.dumps({
        "runtime": model.runtime, "network": model.network is not None,
        "probabilities": [f.probability for f in result.findings],
        "heatmap": result.heatmap is not None and result.heatmap.png[:4] == b"\\x89PNG",
        "imported": sorted(m for m in ("torch", "timm", "pytorch_grad_cam", "torchvision", "matplotlib") if m in sys.modules),
    }))
''')


def run_worker_child(weights: Path, onnx_dir: Path) -> dict:
    child = subprocess.run([sys.executable, "-c", WORKER_CHILD, str(weights), str(onnx_dir)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_a_worker_scores_and_explains_without_importing_torch(tmp_path: Path) -> None:
    make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64)
    seen = run_worker_child(tmp_path / "weights", tmp_path / "onnx")
    assert seen["runtime"] == "onnxruntime" and seen["network"] is False and seen["heatmap"] is True
    assert seen["imported"] == []

    # the same findings as the in-process model (torch network + ONNX session from the same weights)
    from cds_service.domain import Priority
    from cds_service.triage import triage_images

    reference = load_model(tmp_path / "weights", Task.HEAD_CT_ICH, runtime="auto")
    rng = np.random.default_rng(0)
    images = [np.broadcast_to(rng.random((90, 90, 1), dtype=np.float32), (90, 90, 3)) for _ in range(5)]
    expected = triage_images(reference, images, {"any": Priority.STAT}, study_uid="1.2.3")
    np.testing.assert_allclose(seen["probabilities"], [f.probability for f in expected.findings], atol=1e-5)


def test_the_exported_graph_is_kept_and_follows_the_weights(tmp_path: Path) -> None:
    weights, onnx_dir = tmp_path / "weights", tmp_path / "onnx"
    make_test_weights(weights, Task.HEAD_CT_ICH, input_size=64, seed=1)
    first = ModelRegistry(weights, runtime="auto", onnx_dir=onnx_dir).get(Task.HEAD_CT_ICH)
    [graph] = list(onnx_dir.glob("*.onnx"))
    stamp = graph.stat().st_mtime_ns
    again = ModelRegistry(weights, runtime="auto", onnx_dir=onnx_dir).get(Task.HEAD_CT_ICH)
    assert list(onnx_dir.glob("*.onnx")) == [graph] and graph.stat().st_mtime_ns == stamp  # kept, not re-exported
    batch = np.random.default_rng(2).normal(0, 1, (2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(first.predict(batch), again.predict(batch))

    make_test_weights(weights, Task.HEAD_CT_ICH, input_size=64, seed=2)  # retrained: new weights, same card
    retrained = ModelRegistry(weights, runtime="auto", onnx_dir=onnx_dir).get(Task.HEAD_CT_ICH)
    assert len(list(onnx_dir.glob("*.onnx"))) == 2
    reference = load_model(weights, Task.HEAD_CT_ICH, runtime="torch")
    np.testing.assert_allclose(retrained.predict(batch), reference.predict(batch), atol=1e-4)
    assert not list(onnx_dir.glob("*.partial"))


def test_a_failed_export_falls_back_to_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    import cds_service.models as models_module

    make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64)

    def broken(*args, **kwargs):
        raise RuntimeError("ONNX export failed (1): exporter exploded")

    monkeypatch.setattr(models_module, "exported_graph", broken)
    with caplog.at_level(logging.WARNING):
        model = load_model(tmp_path / "weights", Task.HEAD_CT_ICH, runtime="auto", onnx_dir=tmp_path / "onnx")
    assert model.network is not None  # triage goes on, in this process, with torch
    assert "exporter exploded" in caplog.text


def test_the_worker_s_overlay_and_scaling_are_pytorch_grad_cam_s() -> None:
    from pytorch_grad_cam.utils.image import scale_cam_image, show_cam_on_image

    from cds_service.explain import _scaled_to_unit, jet_overlay

    rng = np.random.default_rng(5)
    cam = rng.random((4, 4), dtype=np.float32) * 3 - 1
    np.testing.assert_array_equal(_scaled_to_unit(cam, 64), scale_cam_image(cam[None], (64, 64))[0])
    np.testing.assert_array_equal(_scaled_to_unit(cam), scale_cam_image(cam[None])[0])
    background = np.broadcast_to(rng.random((64, 64, 1), dtype=np.float32), (64, 64, 3))
    mask = rng.random((64, 64), dtype=np.float32)
    np.testing.assert_array_equal(jet_overlay(background, mask, 0.6),
                                  show_cam_on_image(background, mask, use_rgb=True, image_weight=0.6))
