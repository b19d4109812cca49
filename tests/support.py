"""Test helpers owned by the pipeline tests: card-compatible *untrained* weights, and their ONNX graphs.

These weights exist only inside a test's temp dir, with a card whose name says so; they
let the pipeline be tested before (and independently of) the trained models in weights/.

Both are paid once per test session (tests/conftest.py points `use_cache_dir` at the session's temp
dir): the same arguments give the same files, so `make_test_weights` builds each network once and
copies it, and `seed_onnx_exports` exports each set of weights once (the product's own export, a
child process that imports torch: seconds of CPU) and puts the graph where a worker keeps its exports.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cds_service.core.domain import TASK_LABELS, Task
from cds_service.core.settings import Settings

_cache_dir: Path | None = None


def use_cache_dir(path: Path) -> None:
    """Where this process keeps the weights and ONNX graphs it made (the session's temp dir)."""
    global _cache_dir
    _cache_dir = Path(path)
    _cache_dir.mkdir(parents=True, exist_ok=True)


def cache_dir() -> Path:
    """The cache folder; outside pytest (a script importing this module) a temp dir removed at exit."""
    if _cache_dir is None:
        use_cache_dir(Path(tempfile.mkdtemp(prefix="cds-test-cache-")))
        atexit.register(shutil.rmtree, str(_cache_dir), True)
    assert _cache_dir is not None
    return _cache_dir


@contextmanager
def _locked(name: str) -> Iterator[Path]:
    """The cache folder, held by this process alone while a file in it is made (threads or processes)."""
    folder = cache_dir()
    with open(folder / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

PREPROCESSING = {
    Task.HEAD_CT_ICH: {"kind": "ct_windows", "windows": [[40, 80], [80, 200], [600, 2800]]},
    Task.BRAIN_MRI: {"kind": "mr_robust", "percentiles": [0.5, 99.5]},
    Task.CHEST_PNEUMOTHORAX: {"kind": "xray", "percentiles": [0.5, 99.5]},
}


def make_test_weights(weights_dir: Path, task: Task, *, threshold: float = 0.0, input_size: int = 64,
                      version: str = "0.0.0-test", seed: int = 0, preprocessing: dict | None = None) -> Path:
    """Write `<task>.json` + `<task>.safetensors` with random weights; threshold 0 makes every trained label positive.

    `preprocessing` (a card's block) defaults to PREPROCESSING[task]: three different CT windows,
    so tests exercise the per-channel path. Made once per session for the same arguments, then copied.
    """
    arguments = json.dumps([task.value, threshold, input_size, version, seed, preprocessing], sort_keys=True)
    key = f"weights-{task.value}-{hashlib.sha256(arguments.encode()).hexdigest()[:16]}"
    with _locked(key) as folder:
        made = folder / key
        if not (made / f"{task.value}.json").exists():
            _write_test_weights(made, task, threshold=threshold, input_size=input_size, version=version, seed=seed,
                                preprocessing=preprocessing)
    weights_dir.mkdir(parents=True, exist_ok=True)
    for name in (f"{task.value}.safetensors", f"{task.value}.json"):
        shutil.copyfile(made / name, weights_dir / name)  # copies: a test may edit its card
    return weights_dir


def _write_test_weights(weights_dir: Path, task: Task, *, threshold: float, input_size: int, version: str, seed: int,
                        preprocessing: dict | None) -> None:
    import torch
    from safetensors.torch import save_file

    from cds_service.core.models import create_network

    labels = list(TASK_LABELS[task])
    trained = ["any"] if task is Task.HEAD_CT_ICH else labels
    card = {
        "task": task.value,
        "name": f"test-untrained-{task.value}",
        "version": version,
        "architecture": "efficientnet_b0",
        "labels": labels,
        "trained_labels": trained,
        "activation": "softmax" if task is Task.BRAIN_MRI else "sigmoid",
        "input_size": input_size,
        "preprocessing": preprocessing or PREPROCESSING[task],
        "thresholds": {label: threshold for label in trained if label != "no_tumor"} | ({"no_tumor": 1.0} if task is Task.BRAIN_MRI else {}),
        "intended_use": "TEST ONLY: untrained random weights",
    }
    weights_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    network = create_network(len(labels))
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights_dir / f"{task.value}.safetensors"))
    (weights_dir / f"{task.value}.json").write_text(json.dumps(card, indent=2))


def exported_graph_of(weights_dir: Path, task: Task) -> Path:
    """The ONNX graph of the task's weights in `weights_dir`, exported once a session by the product's own
    export (`export_in_child`: torch in a child process, checked against torch), named by the weights' digest."""
    from cds_service.core.onnx_graphs import export_in_child, weights_digest

    name = f"{task.value}-{weights_digest(weights_dir, task)}.onnx"
    with _locked(name) as folder:
        graph = folder / name
        if not graph.exists():
            export_in_child(weights_dir, task, graph)
    return graph


def ship_onnx_graphs(weights_dir: Path) -> Path:
    """Ship each test model's graph beside its weights, vouched for by its card, as `cds-triage export`
    does for the committed models: `cds-triage triage` then scores it in ONNX Runtime without exporting
    it in memory first. Returns `weights_dir`."""
    from cds_service.core.model_cards import card_path, weights_path
    from cds_service.core.onnx_graphs import shipped_graph_path, vouch_for_graph

    for task in Task:
        if card_path(weights_dir, task).exists() and weights_path(weights_dir, task).exists():
            shutil.copyfile(exported_graph_of(weights_dir, task), shipped_graph_path(weights_dir, task))
            vouch_for_graph(weights_dir, task)
    return weights_dir


def seed_onnx_exports(settings: Settings) -> Settings:
    """Put the ONNX graph of each model in `settings.weights_dir` where its workers keep their exports
    (CDS_DATA_DIR/onnx, named by the weights' digest), so a worker (or `build_deps`) finds it there
    instead of exporting it. Each graph is exported once per session, by the product's own export
    (`export_in_child`: torch in a child process, checked against torch). Weights with a graph shipped
    in their folder need none. The export itself is tested in test_worker_models.py and
    test_slim_runtime.py, which do not use this. Returns `settings`, to wrap a Settings(...) in."""
    from cds_service.core.model_cards import ModelCard, card_path, weights_path
    from cds_service.core.onnx_graphs import shipped_graph
    from cds_service.worker import onnx_dir

    for task in Task:
        if not (card_path(settings.weights_dir, task).exists() and weights_path(settings.weights_dir, task).exists()):
            continue
        if shipped_graph(settings.weights_dir, task, ModelCard.load(card_path(settings.weights_dir, task))) is not None:
            continue
        graph = exported_graph_of(settings.weights_dir, task)
        target = onnx_dir(settings) / graph.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(graph, target)
    return settings
