"""A model's ONNX graph as a file: the one shipped in weights/ when its card vouches for it
(`cds-triage export` writes it), else exported once from the safetensors in a child process and kept
in the worker's folder (with the stale ones pruned), so a scoring process never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cds_service.core.domain import Task
from cds_service.core.model_cards import ModelCard, card_path, weights_path

log = logging.getLogger(__name__)


ONNX_MAX_DEVIATION = 1e-3  # largest probability difference from torch accepted at load time
ONNX_EXPORT_FORMAT = "cds-triage-onnx/1"  # change when export_onnx changes: kept graphs are then re-exported
ONNX_EXPORT_TIMEOUT_S = 600


def weights_digest(weights_dir: Path, task: Task) -> str:
    """Names one exported graph: the weights' and card's bytes and the export format."""
    digest = hashlib.sha256(ONNX_EXPORT_FORMAT.encode())
    digest.update(card_path(weights_dir, task).read_bytes())
    with weights_path(weights_dir, task).open("rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


def shipped_graph_path(weights_dir: Path, task: Task) -> Path:
    return Path(weights_dir) / f"{task.value}.onnx"


def shipped_graph(weights_dir: Path, task: Task, card: ModelCard) -> Path | None:
    """The ONNX graph committed beside the weights (`cds-triage export`), when the card vouches for
    it: the graph's sha256, the weights it was exported from and the export format all match.
    None otherwise; a graph present but not vouched for is logged, never used."""
    block = card.raw.get("onnx") or {}
    path = shipped_graph_path(weights_dir, task)
    if not block or not path.exists():
        return None
    problem = ""
    if block.get("export_format") != ONNX_EXPORT_FORMAT:
        problem = f"exported as {block.get('export_format')}, this code reads {ONNX_EXPORT_FORMAT}"
    elif block.get("weights_sha256") != card.raw.get("weights_sha256"):
        problem = "exported from other weights than the card's"
    elif hashlib.sha256(path.read_bytes()).hexdigest() != block.get("sha256"):
        problem = "its sha256 differs from the card's"
    if problem:
        log.warning("ignoring %s: %s (run cds-triage export)", path, problem)
        return None
    return path


def write_shipped_graph(weights_dir: Path, task: Task) -> dict[str, Any]:
    """`cds-triage export`: export the task's graph from its safetensors (in a child process that
    checks it against torch) to weights/<task>.onnx, and record it in the card's `onnx` block."""
    export_in_child(weights_dir, task, shipped_graph_path(weights_dir, task))
    return vouch_for_graph(weights_dir, task)


def vouch_for_graph(weights_dir: Path, task: Task) -> dict[str, Any]:
    """Record the graph at weights/<task>.onnx, exported from these weights by `export_in_child`, in the
    card's `onnx` block (its sha256, the weights' and the export format), so `shipped_graph` uses it."""
    cpath = card_path(weights_dir, task)
    target = shipped_graph_path(weights_dir, task)
    card = json.loads(cpath.read_text())
    card["onnx"] = {"file": target.name, "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
                    "export_format": ONNX_EXPORT_FORMAT, "weights_sha256": card.get("weights_sha256"),
                    "checked": f"probabilities and feature map within {ONNX_MAX_DEVIATION} of torch on a test batch",
                    "opset": 17}
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    return card["onnx"]


def export_in_child(weights_dir: Path, task: Task, target: Path) -> None:
    """`python -m cds_service.onnx_export`: imports torch, exports, checks the graph against torch,
    writes `target` whole and exits, so the process that scores never imports torch."""
    package_root = str(Path(__file__).resolve().parents[2])  # the folder that holds cds_service
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-m", "cds_service.onnx_export", str(weights_dir), task.value, str(target)],
                           capture_output=True, text=True, env=env, timeout=ONNX_EXPORT_TIMEOUT_S)
    if child.returncode != 0 or not target.exists():
        raise RuntimeError(f"ONNX export failed ({child.returncode}): {child.stderr.strip()[-500:]}")


def exported_graph(weights_dir: Path, task: Task, onnx_dir: Path | None) -> Path:
    """The ONNX graph of these exact weights: the one shipped in weights/ when its card vouches for
    it, else exported once in a child process (which needs torch) and kept in `onnx_dir`.

    Measured here, torch and timm are 650 MB of a worker's resident memory; with a shipped graph
    a worker (and `cds-triage triage`) never imports them, and a runtime install needs no torch.
    """
    shipped = shipped_graph(weights_dir, task, ModelCard.load(card_path(weights_dir, task)))
    if shipped is not None:
        return shipped
    if onnx_dir is None:
        raise RuntimeError(f"no ONNX graph shipped for {task.value} (cds-triage export) and nowhere to export one")
    target = onnx_dir / f"{task.value}-{weights_digest(weights_dir, task)}.onnx"
    if target.exists():
        return target
    onnx_dir.mkdir(parents=True, exist_ok=True)
    export_in_child(weights_dir, task, target)
    prune_exported(onnx_dir, task, keep=target)
    return target


def prune_exported(onnx_dir: Path, task: Task, keep: Path, now: float | None = None) -> list[Path]:
    """Remove the task's graphs of other weights versions, and exports a dead process left half
    written, so CDS_DATA_DIR does not grow by ~20 MB with every retraining. A worker still
    running older weights has its graph in memory; if it restarts, it exports it again."""
    now = time.time() if now is None else now
    removed = []
    for path in onnx_dir.glob(f"{task.value}-*"):
        graph = re.fullmatch(rf"{re.escape(task.value)}-[0-9a-f]{{20}}\.onnx", path.name)
        partial = re.fullmatch(rf"{re.escape(task.value)}-[0-9a-f]{{20}}\.onnx\.\d+\.partial", path.name)
        try:
            if (graph and path != keep) or (partial and now - path.stat().st_mtime > ONNX_EXPORT_TIMEOUT_S):
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # another worker pruned it first
            continue
    return removed
