"""`python -m cds_service.onnx_export WEIGHTS_DIR TASK OUT`: export one model's ONNX graph in its own process.

A worker scores with ONNX Runtime and explains from the graph's feature map, so it needs no
torch, whose import alone is most of a worker's memory. The graph still comes from the
committed safetensors weights (it is never shipped on its own): this process loads them in
torch, exports, checks the graph against torch on a test batch, writes OUT and exits.
Exit status 1, with the reason on stderr, if the graph disagrees with torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from cds_service.core.domain import Task
from cds_service.core.models import export_onnx, load_model, onnx_deviation, open_session
from cds_service.core.onnx_graphs import ONNX_MAX_DEVIATION


def main(argv: Sequence[str] | None = None) -> int:
    weights_dir, task, out = (argv if argv is not None else sys.argv[1:])
    model = load_model(Path(weights_dir), Task(task), runtime="torch")
    graph = export_onnx(model.network, model.card)
    deviation = onnx_deviation(model, open_session(graph))
    if deviation > ONNX_MAX_DEVIATION:
        print(f"ONNX graph disagrees with torch by {deviation:.2g} (limit {ONNX_MAX_DEVIATION})", file=sys.stderr)
        return 1
    target = Path(out)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    partial.write_bytes(graph)
    os.replace(partial, target)  # whole or absent, also with two workers exporting at once
    return 0


if __name__ == "__main__":
    sys.exit(main())
