"""Is the chest X-ray model reading the view (AP, the bedside film with tubes and drains) instead of the lung?

    .venv/bin/python bench/chest_views.py [--cv var/cv/chest_pneumothorax] [--data ../shared/data/chest_xray_ptx]

Reads the out-of-fold probabilities of a grouped cross-validation (`python -m cds_training.crossval`,
every image scored once by a model that never saw its patient) and NIH's metadata: the AUC within
PA films and within AP films (a model that had learnt "AP film, so drain, so pneumothorax" ranks well
overall and poorly within each view), the share of positives per view, and a view-only baseline (the
AUC of "is it AP?" alone). The metadata names no tubes, so the view is the proxy the data allows.
Prints JSON; nothing here chooses anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cds_service.core.evaluation import auc_with_ci  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cv", type=Path, default=REPO / "var" / "cv" / "chest_pneumothorax")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "chest_xray_ptx")
    args = ap.parse_args()
    with (args.data / "metadata.csv").open(newline="") as f:
        view = {row["file"].strip(): row["View Position"].strip() for row in csv.DictReader(f)}
    rows = []
    for fold in sorted(args.cv.glob("fold*/chest_pneumothorax.split.json")):
        rows += json.loads(fold.read_text())["test"]
    if not rows:
        raise SystemExit(f"no fold results under {args.cv}")
    y = np.array([r["targets"][0] > 0.5 for r in rows])
    p = np.array([r["probs"][0] for r in rows])
    v = np.array([view[Path(r["file"]).name] for r in rows])
    out = {"images": len(rows), "all": auc_with_ci(y, p), "view_only_baseline": auc_with_ci(y, (v == "AP").astype(float))}
    for name in ("PA", "AP"):
        keep = v == name
        out[name] = {"images": int(keep.sum()), "positives": int(y[keep].sum()), "auc": auc_with_ci(y[keep], p[keep])}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
