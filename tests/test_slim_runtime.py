"""The runtime without torch: the ONNX graphs shipped in weights/ are vouched for by their cards,
agree with torch, and let `cds-triage triage` and `prepare-models` run where torch cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from cds_service.core.domain import Task
from cds_service.core.errors import ModelUnavailableError
from cds_service.core.model_cards import ModelCard, card_path
from cds_service.core.models import load_model, onnx_deviation
from cds_service.core.onnx_graphs import ONNX_MAX_DEVIATION, shipped_graph

pytestmark = pytest.mark.slow  # the shipped models in child processes without torch

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"
RSNA_DICOM = ROOT.parent / "shared" / "data" / "head_ct_dicom_unlabelled"
TORCH_PACKAGES = {"torch", "torchvision", "timm", "grad-cam", "pytorch-grad-cam"}

BLOCKER = '''
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "timm", "pytorch_grad_cam"}:
            raise ImportError(f"{name} is not installed here (runtime without torch)")
        return None
sys.meta_path.insert(0, _NoTorch())
'''


@pytest.fixture()
def no_torch_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import torch, timm, torchvision or pytorch_grad_cam."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "CDS_DATA_DIR": str(tmp_path / "var")}


def test_the_runtime_dependencies_hold_no_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for dep in project["dependencies"]}
    assert not names & TORCH_PACKAGES
    assert any(dep.startswith("torch==") for dep in project["optional-dependencies"]["torch"])


@pytest.mark.parametrize("task", list(Task))
def test_each_shipped_graph_is_vouched_for_by_its_card_and_agrees_with_torch(task: Task) -> None:
    card = ModelCard.load(card_path(WEIGHTS, task))
    assert shipped_graph(WEIGHTS, task, card) == WEIGHTS / f"{task.value}.onnx"
    torch_model = load_model(WEIGHTS, task, runtime="torch")
    from cds_service.core.models import open_session

    assert onnx_deviation(torch_model, open_session((WEIGHTS / f"{task.value}.onnx").read_bytes())) <= ONNX_MAX_DEVIATION


def test_the_models_share_one_memory_arena_without_mixing_their_results() -> None:
    """The three sessions reuse one arena's memory (bench/onnx_arena.py measures why): scores
    from models run in turn on it, batch sizes changing, equal those of sessions without one."""
    from cds_service.core.models import Arena, open_session, shared_cpu_arena

    assert shared_cpu_arena()
    rng = np.random.default_rng(3)
    runs = []
    for task, batch in [(Task.HEAD_CT_ICH, 6), (Task.BRAIN_MRI, 3), (Task.CHEST_PNEUMOTHORAX, 2), (Task.HEAD_CT_ICH, 2)]:
        graph = (WEIGHTS / f"{task.value}.onnx").read_bytes()
        size = ModelCard.load(card_path(WEIGHTS, task)).preprocessing.input_size
        shared = open_session(graph)
        assert shared.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
        alone = open_session(graph, arena=Arena.NONE)
        assert alone.get_session_options().enable_cpu_mem_arena is False
        runs.append((shared, alone, rng.random((batch, 3, size, size), dtype=np.float32)))
    for _ in range(2):
        for shared, alone, image in runs:
            expected = alone.run(["probabilities"], {"image": image})[0]
            assert np.allclose(shared.run(["probabilities"], {"image": image})[0], expected, atol=1e-5)


def test_a_graph_its_card_does_not_vouch_for_is_never_used(tmp_path: Path, no_torch_env: dict[str, str]) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    for suffix in (".json", ".safetensors", ".onnx"):
        shutil.copy(WEIGHTS / f"chest_pneumothorax{suffix}", weights / f"chest_pneumothorax{suffix}")
    card_file = weights / "chest_pneumothorax.json"
    card = json.loads(card_file.read_text())
    card["onnx"]["sha256"] = "0" * 64
    card_file.write_text(json.dumps(card))
    assert shipped_graph(weights, Task.CHEST_PNEUMOTHORAX, ModelCard.load(card_file)) is None
    script = ("from pathlib import Path; from cds_service.core.models import load_model; from cds_service.core.domain import Task\n"
              f"load_model(Path({str(weights)!r}), Task.CHEST_PNEUMOTHORAX, runtime='auto')")
    child = subprocess.run([sys.executable, "-c", script], env=no_torch_env, capture_output=True, text=True, timeout=120)
    assert child.returncode != 0 and ModelUnavailableError.__name__ in child.stderr
    assert "pip install '.[torch]'" in child.stderr and "cds-triage export" in child.stderr


@pytest.mark.skipif(not RSNA_DICOM.is_dir(), reason="../shared/data is not here")
def test_triage_and_prepare_models_run_where_torch_cannot_be_imported(no_torch_env: dict[str, str]) -> None:
    files = [str(path) for path in sorted(RSNA_DICOM.glob("*.dcm"))[:3]]
    env = no_torch_env | {"CDS_WEIGHTS_DIR": str(WEIGHTS)}
    run = subprocess.run([sys.executable, "-m", "cds_service.cli", "triage", "--task", "head_ct_ich", "--json", *files],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [row["status"] for row in rows] == ["done"] * 3

    with_torch = subprocess.run([sys.executable, "-m", "cds_service.cli", "triage", "--task", "head_ct_ich", "--json",
                                 *files], env={**os.environ, "CDS_WEIGHTS_DIR": str(WEIGHTS),
                                               "CDS_INFERENCE_RUNTIME": "torch", "CDS_DATA_DIR": env["CDS_DATA_DIR"]},
                                capture_output=True, text=True, timeout=300)
    assert with_torch.returncode == 0, with_torch.stderr
    reference = [json.loads(line) for line in with_torch.stdout.splitlines()]
    for row, ref in zip(rows, reference):
        assert np.allclose([f["probability"] for f in row["findings"]], [f["probability"] for f in ref["findings"]],
                           atol=ONNX_MAX_DEVIATION)

    prepared = subprocess.run([sys.executable, "-m", "cds_service.cli", "prepare-models"], env=env,
                              capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.count(f"ready: {WEIGHTS}") == len(Task)
