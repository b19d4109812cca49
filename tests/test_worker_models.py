"""A worker's models: ONNX graphs exported once in a child process, so the worker never imports torch.

torch and timm are most of a worker's resident memory (650 MB of the CUDA build here); the
worker scores with ONNX Runtime and draws Grad-CAM from the graph's feature map. What it
loads must still be exactly the committed weights, and explain exactly as pytorch-grad-cam.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cds_service.core.domain import Task
from cds_service.core.models import ModelRegistry, load_model
from support import make_test_weights

pytestmark = pytest.mark.slow  # ONNX exports in child processes

REPO = Path(__file__).resolve().parents[1]

WORKER_CHILD = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import numpy as np
    from cds_service.core.domain import Priority, Task
    from cds_service.core.models import ModelRegistry
    from cds_service.core.triage import triage_images

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


def broken_export(*args, **kwargs):
    raise RuntimeError("ONNX export failed (1): exporter exploded")


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
    from cds_service.core.domain import Priority
    from cds_service.core.triage import triage_images

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
    [new_graph] = list(onnx_dir.glob("*.onnx"))  # the old version's graph is removed
    assert new_graph != graph and new_graph.name.startswith("head_ct_ich-")
    reference = load_model(weights, Task.HEAD_CT_ICH, runtime="torch")
    np.testing.assert_allclose(retrained.predict(batch), reference.predict(batch), atol=1e-4)
    assert not list(onnx_dir.glob("*.partial"))


def test_pruning_keeps_the_current_graph_and_other_tasks(tmp_path: Path) -> None:
    from cds_service.core.onnx_graphs import ONNX_EXPORT_TIMEOUT_S, prune_exported

    keep = tmp_path / f"head_ct_ich-{'a' * 20}.onnx"
    old = tmp_path / f"head_ct_ich-{'b' * 20}.onnx"
    other_task = tmp_path / f"brain_mri-{'c' * 20}.onnx"
    dead_partial = tmp_path / f"head_ct_ich-{'d' * 20}.onnx.4242.partial"
    live_partial = tmp_path / f"head_ct_ich-{'e' * 20}.onnx.4343.partial"  # another worker exporting now
    unrelated = tmp_path / "head_ct_ich-notes.txt"
    for path in (keep, old, other_task, dead_partial, live_partial, unrelated):
        path.write_bytes(b"graph")
    now = dead_partial.stat().st_mtime + ONNX_EXPORT_TIMEOUT_S / 2
    os.utime(dead_partial, (now - ONNX_EXPORT_TIMEOUT_S - 1,) * 2)

    removed = prune_exported(tmp_path, Task.HEAD_CT_ICH, keep=keep, now=now)
    assert sorted(removed) == sorted([old, dead_partial])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (keep, other_task, live_partial, unrelated))


def test_prepare_models_exports_ahead_so_the_first_study_does_not_wait(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import cds_service.core.onnx_graphs as graphs_module

    weights, data = tmp_path / "weights", tmp_path / "data"
    make_test_weights(weights, Task.HEAD_CT_ICH, input_size=64)  # the other two tasks have no weights here
    env = os.environ | {"CDS_WEIGHTS_DIR": str(weights), "CDS_DATA_DIR": str(data), "CDS_INFERENCE_RUNTIME": "auto"}
    child = subprocess.run([sys.executable, "-m", "cds_service.cli", "prepare-models"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in child.stdout.strip().splitlines())
    [graph] = list((data / "onnx").glob("head_ct_ich-*.onnx"))
    assert lines["head_ct_ich"] == f"ready: {graph}"
    assert lines["brain_mri"].startswith("no weights") and lines["chest_pneumothorax"].startswith("no weights")

    def no_export(*args, **kwargs):
        raise AssertionError("the worker exported again")

    monkeypatch.setattr(graphs_module.subprocess, "run", no_export)
    model = ModelRegistry(weights, runtime="auto", onnx_dir=data / "onnx").get(Task.HEAD_CT_ICH)
    assert model.runtime == "onnxruntime" and model.network is None

    from cds_service.core.settings import Settings
    from cds_service.worker import prepare_models

    torch_only = prepare_models(Settings(weights_dir=weights, data_dir=data, inference_runtime="torch"))
    assert all(ok and what.startswith("nothing to export") for ok, what in torch_only.values())


def test_a_worker_started_with_prepare_models_exports_before_taking_jobs(tmp_path: Path) -> None:
    from cds_devtools.demo import start_worker
    from cds_service.core.settings import Settings

    make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64)
    settings = Settings(weights_dir=tmp_path / "weights", data_dir=tmp_path / "data", log_level="INFO")
    worker = start_worker(settings, tmp_path, prepare_models=True)
    try:
        worker.wait_ready(lambda: "worker started" in (tmp_path / "worker.log").read_text(), timeout=120)
        log_text = (tmp_path / "worker.log").read_text()
    finally:
        worker.stop()
    [graph] = list((tmp_path / "data" / "onnx").glob("head_ct_ich-*.onnx"))
    assert f"model head_ct_ich: ready: {graph}" in log_text
    assert log_text.index("model head_ct_ich: ready") < log_text.index("worker started")


def test_prepare_models_fails_loudly_when_an_export_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    import cds_service.worker as worker_module
    from cds_service.cli import main

    make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64)

    monkeypatch.setattr(worker_module, "exported_graph", broken_export)
    monkeypatch.setenv("CDS_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CDS_INFERENCE_RUNTIME", "auto")
    assert main(["prepare-models"]) == 1
    assert "head_ct_ich: failed: ONNX export failed (1): exporter exploded" in capsys.readouterr().out


def test_a_failed_export_falls_back_to_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    import cds_service.core.models as models_module

    make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64)

    monkeypatch.setattr(models_module, "exported_graph", broken_export)
    with caplog.at_level(logging.WARNING):
        model = load_model(tmp_path / "weights", Task.HEAD_CT_ICH, runtime="auto", onnx_dir=tmp_path / "onnx")
    assert model.network is not None  # triage goes on, in this process, with torch
    assert "exporter exploded" in caplog.text


def test_the_worker_s_overlay_and_scaling_are_pytorch_grad_cam_s() -> None:
    from pytorch_grad_cam.utils.image import scale_cam_image, show_cam_on_image

    from cds_service.core.explain import _scaled_to_unit, jet_overlay

    rng = np.random.default_rng(5)
    cam = rng.random((4, 4), dtype=np.float32) * 3 - 1
    np.testing.assert_array_equal(_scaled_to_unit(cam, 64), scale_cam_image(cam[None], (64, 64))[0])
    np.testing.assert_array_equal(_scaled_to_unit(cam), scale_cam_image(cam[None])[0])
    background = np.broadcast_to(rng.random((64, 64, 1), dtype=np.float32), (64, 64, 3))
    mask = rng.random((64, 64), dtype=np.float32)
    np.testing.assert_array_equal(jet_overlay(background, mask, 0.6),
                                  show_cam_on_image(background, mask, use_rgb=True, image_weight=0.6))
