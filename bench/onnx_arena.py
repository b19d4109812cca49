"""ONNX Runtime's CPU memory arena: speed and memory of the three shipped models, run in turn.

    .venv/bin/python bench/onnx_arena.py [--weights weights] [--batches 6]

Each mode runs in its own fresh process (an arena, once grown, is not given back), all in one
run so the figures compare as ratios:
- `none`: no arena; every batch allocates and frees its activations (what the service did
  before 2026-12-03);
- `own`: one arena per session, ONNX Runtime's default;
- `shared`: the service's: one arena for the whole process (`shared_cpu_arena`).
All three are the service's `open_session` with its thread settings, only `arena` differs.
Per mode it prints, as JSON, each model's median batch time (the first batch is not counted),
the process's peak resident memory and its page faults and system CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cds_service.core.models import Arena, open_session  # noqa: E402

MODES = tuple(arena.value for arena in (Arena.NONE, Arena.OWN, Arena.SHARED))
# (task, batch): a head CT is scored in batches of the worker's CPU batch size, an X-ray study has 1-2 images
WORKLOAD = (("head_ct_ich", 6), ("brain_mri", 6), ("chest_pneumothorax", 2))


def run_mode(mode: str, weights: Path, batches: int) -> dict:
    """One mode, in this process: load the three models, then score `batches` batches with each in turn."""
    from cds_service.core.domain import Task
    from cds_service.core.model_cards import ModelCard, card_path

    loaded = []
    for name, batch in WORKLOAD:
        task = Task(name)
        size = ModelCard.load(card_path(weights, task)).preprocessing.input_size
        loaded.append((name, batch, size, open_session((weights / f"{name}.onnx").read_bytes(), arena=Arena(mode))))
    before = resource.getrusage(resource.RUSAGE_SELF)
    models = {}
    for name, batch, size, scorer in loaded:
        image = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
        times = []
        for _ in range(batches):
            start = time.perf_counter()
            scorer.run(None, {"image": image})
            times.append(time.perf_counter() - start)
        models[name] = {"input_px": size, "batch": batch, "batch_median_ms": round(float(np.median(times[1:])) * 1000, 1)}
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"models": models, "peak_rss_mb": round(after.ru_maxrss / 1024), "page_faults": after.ru_minflt - before.ru_minflt,
            "system_cpu_s": round(after.ru_stime - before.ru_stime, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--batches", type=int, default=6, help="batches per model (default 6; the first is not counted)")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the child process's one mode
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.weights, args.batches)))
        return
    results = {}
    for mode in MODES:
        child = subprocess.run([sys.executable, __file__, "--mode", mode, "--weights", str(args.weights),
                                "--batches", str(args.batches)], capture_output=True, text=True, check=True)
        results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps({"schema": "cds-triage-onnx-arena/1", "results": results}, indent=1))


if __name__ == "__main__":
    main()
