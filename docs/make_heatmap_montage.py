"""The heatmaps of a head CT model on its test split's extra-axial and intra-axial bleeds, as one picture.

    .venv/bin/python docs/make_heatmap_montage.py [--weights weights] [--out docs/images/head_ct_heatmaps.png]

Looking at what the model looks at before a model ships: the service's own Grad-CAM (`core/explain.explain`,
the overlay the worklist and the PACS show) on up to 8 subdural/epidural and 4 intraparenchymal/
intraventricular test positives, and 4 test negatives, each captioned with its labels and `any`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cds_service.core.domain import Task  # noqa: E402
from cds_service.core.explain import explain  # noqa: E402
from cds_service.core.models import load_model  # noqa: E402
from cds_training.pixels import load_image  # noqa: E402

TILE = 256


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=REPO / "weights")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "head_ct_heatmaps.png")
    args = ap.parse_args()
    model = load_model(args.weights, Task.HEAD_CT_ICH, runtime="onnxruntime")
    labels = list(model.card.labels)
    split = json.loads((args.weights / "head_ct_ich.split.json").read_text())
    data_dir = Path(split["data_dir"]) if Path(split["data_dir"]).is_dir() else args.data

    def has(row: dict, names: tuple[str, ...]) -> bool:
        return any(row["targets"][labels.index(n)] == 1.0 for n in names)

    extra = [r for r in split["test"] if has(r, ("subdural", "epidural"))][:8]
    intra = [r for r in split["test"] if has(r, ("intraparenchymal", "intraventricular")) and not has(r, ("subdural", "epidural"))][:4]
    normal = [r for r in split["test"] if r["targets"][0] == 0.0][:4]
    tiles = []
    for row in extra + intra + normal:
        image = load_image(data_dir / row["file"], model.card.preprocessing)
        heat = explain(model, image, "any")
        tile = Image.open(io.BytesIO(heat.png)).convert("RGB").resize((TILE, TILE))
        named = [n for n in labels[1:] if row["targets"][labels.index(n)] == 1.0] or ["no bleed"]
        draw = ImageDraw.Draw(tile)
        draw.rectangle((0, 0, TILE, 14), fill=(0, 0, 0))
        draw.text((3, 1), f"{'+'.join(named)}  any {row['probs'][0]:.2f}", fill=(255, 255, 255))
        tiles.append(np.asarray(tile))
    while len(tiles) % 4:
        tiles.append(np.zeros((TILE, TILE, 3), np.uint8))
    rows = [np.concatenate(tiles[i:i + 4], 1) for i in range(0, len(tiles), 4)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).save(args.out, optimize=True)
    print(f"wrote {args.out} ({len(extra)} extra-axial, {len(intra)} intra-axial, {len(normal)} without a bleed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
