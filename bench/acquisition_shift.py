"""Compare models on their test split re-made as other scanners might make it (`cds_training.shift_check`).

    .venv/bin/python bench/acquisition_shift.py --weights weights --weights var/brain32 [--split validation] [--json out.json]

Each weights folder holds a card, its safetensors, its `<task>.split.json` and input profile; models
trained on the same split (same seed) see the same test images. Prints one row per model and change:
tumours raised (a refused tumour counts as missed) and per class, tumour-free raised, refused,
unfamiliar, with Wilson 95 % intervals. Nothing is written to a card (`shift-check` does that). To
*choose* between models, compare them on `--split validation`: the test split must choose nothing.
About a minute per model on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cds_service.core.domain import Task  # noqa: E402
from cds_training.shift_check import shift_figures  # noqa: E402


def cell(block: dict) -> str:
    hits, n = block["count"]
    return f"{hits}/{n} ({block['ci95'][0]:.3f}–{block['ci95'][1]:.3f})"


def table(results: dict[str, dict]) -> str:
    lines = ["| model | change | tumours raised | glioma | meningioma | pituitary | tumour-free raised | refused | unfamiliar |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, block in results.items():
        negative = block["negative_label"]
        for name, row in block["changes"].items():
            classes = [cell(v) for label, v in row["raised"].items() if label != negative]
            lines.append("| " + " | ".join([model, name, cell(row["tumours_raised"]), *classes, cell(row["raised"][negative]),
                                            str(row.get("refused", {}).get("count", ["–"])[0]),
                                            str(row.get("unfamiliar", {}).get("count", ["–"])[0])]) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="brain_mri", choices=["brain_mri"])
    ap.add_argument("--weights", type=Path, action="append", help="a weights folder; repeat to compare")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "brain_mri")
    ap.add_argument("--split", default="validation", choices=["validation", "test"],
                    help="validation to choose between models (default); test only to report")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    results = {}
    for weights in args.weights or [REPO / "weights"]:
        card = json.loads((weights / f"{args.task}.json").read_text())
        results[f"{card['version']} ({weights})"] = shift_figures(weights, Task(args.task), args.data, args.split)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
