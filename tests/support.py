"""Test helpers owned by the pipeline tests: card-compatible *untrained* weights.

These weights exist only inside a test's temp dir, with a card whose name says so; they
let the pipeline be tested before (and independently of) the trained models in weights/.
"""

from __future__ import annotations

import json
from pathlib import Path

from cds_service.core.domain import TASK_LABELS, Task

PREPROCESSING = {
    Task.HEAD_CT_ICH: {"kind": "ct_windows", "windows": [[40, 80], [80, 200], [600, 2800]]},
    Task.BRAIN_MRI: {"kind": "mr_robust", "percentiles": [0.5, 99.5]},
    Task.CHEST_PNEUMOTHORAX: {"kind": "xray", "percentiles": [0.5, 99.5]},
}


def make_test_weights(weights_dir: Path, task: Task, *, threshold: float = 0.0, input_size: int = 64,
                      version: str = "0.0.0-test", seed: int = 0, preprocessing: dict | None = None) -> Path:
    """Write `<task>.json` + `<task>.safetensors` with random weights; threshold 0 makes every trained label positive.

    `preprocessing` (a card's block) defaults to PREPROCESSING[task]: three different CT windows,
    so tests exercise the per-channel path.
    """
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
    return weights_dir
