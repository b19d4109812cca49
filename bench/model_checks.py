"""Checks of a trained model beyond its card: rates on unlabelled data and the DICOM path.

    .venv/bin/python bench/model_checks.py --task head_ct_ich [--weights weights] [--data ../shared/data]

What it prints (JSON), for the shipped operating point of the card:
- `probable_negatives`: the share of the RSNA `unlabelled/` PNG slices (the half never trained on,
  by file-name hash) above the `any` threshold. Those slices are almost all normal (about 2 % may
  bleed), so this is a check of the false-positive rate per slice, not a reported metric;
- `dicom_path`: the same share for the real RSNA DICOM slices of `head_ct_dicom_unlabelled`
  through the service's DICOM preprocessing (HU, the card's window, resize). Unlabelled too: if it
  were far above the PNG rate, DICOM input would not look like the training PNGs;
Nothing here chooses a threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cds_training.datasets import IMAGE_SUFFIXES, probable_negatives  # noqa: E402
from cds_training.pixels import load_image  # noqa: E402
from cds_service.core.domain import Task  # noqa: E402
from cds_service.core.models import load_model  # noqa: E402
from cds_service.core.preprocessing import dicom_to_image, read_dicom, to_batch  # noqa: E402


def scores(model, images: list[np.ndarray], label: str) -> np.ndarray:
    spec, j = model.card.preprocessing, model.card.labels.index(label)
    out = [model.predict(to_batch(images[i : i + 32], spec))[:, j] for i in range(0, len(images), 32)]
    return np.concatenate(out) if out else np.zeros(0)


def rate(values: np.ndarray, threshold: float) -> dict:
    above = int((values >= threshold).sum())
    return {"n": int(len(values)), "above_threshold": above, "share": round(above / max(1, len(values)), 4),
            "median_score": round(float(np.median(values)), 4) if len(values) else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="head_ct_ich", choices=["head_ct_ich"])
    ap.add_argument("--weights", type=Path, default=REPO / "weights")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--part", default="odd", choices=["odd", "even", "all"], help="half of unlabelled/ to use")
    args = ap.parse_args()
    model = load_model(args.weights, Task(args.task), runtime="onnxruntime")
    spec, threshold = model.card.preprocessing, model.card.thresholds["any"]
    negatives = probable_negatives(Task.HEAD_CT_ICH, args.data / "head_ct_rsna_png" / "unlabelled", args.part)
    png = scores(model, [load_image(s.path, spec) for s in negatives], "any")
    dicoms = sorted(p for p in (args.data / "head_ct_dicom_unlabelled").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    dcm = scores(model, [dicom_to_image(read_dicom(p), spec) for p in dicoms], "any")
    print(json.dumps({
        "model": f"{model.card.name} {model.card.version}", "threshold_any": threshold,
        "series_pooling": model.card.series_pooling.to_card(),
        "probable_negatives": rate(png, threshold) | {"part": args.part},
        "dicom_path": rate(dcm, threshold),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
