"""Do the head CT heatmaps point at the bleed? Heatmap variants compared on the test split's positives.

    .venv/bin/python bench/heatmap_check.py [--weights weights] [--data ../shared/data] [--limit 40]

No radiologist's masks are here, so a proxy that needs none (issue #33): where the heatmap peaks,
measured from the head's outline on the model input (the largest bright region, `body_box`'s mask):
- extra-axial bleeds (subdural, epidural) lie against the inner table of the skull, so a heatmap
  that points at them peaks within ~15 mm of the inner table: within 27 mm of the outline (scalp ~5
  mm and bone ~7 mm outside the inner table);
- intra-axial bleeds (intraparenchymal, intraventricular) lie inside the brain: the peak should be
  more than 15 mm inside the outline.
Millimetres come from the head's own size (its larger side taken as 180 mm: an adult head), as the
PNGs carry no pixel spacing. Each variant's median time per slice is measured on this machine.

Variants: `cam` (the service's plain class activation map, last stage, 8 x 8 at 256 px), `refined`
(what the service ships: the CAM at twice the resolution from three shifted passes), and, with the
torch network and pytorch-grad-cam, `gradcam_stage5` (Grad-CAM on the 16 x 16 stage before the last
two), `layercam_stage5` (LayerCAM there) and `gradcampp` (Grad-CAM++ on the last stage).
Prints one JSON document; nothing here is used by the service.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cds_service.core.domain import Task  # noqa: E402
from cds_service.core.explain import class_activation_map, refined_class_activation_map  # noqa: E402
from cds_service.core.models import load_model  # noqa: E402
from cds_service.core.preprocessing import FRAME_LEVEL, resize, to_batch  # noqa: E402
from cds_training.pixels import load_image  # noqa: E402

HEAD_MM = 180.0
EXTRA_AXIAL = ("subdural", "epidural")
INTRA_AXIAL = ("intraparenchymal", "intraventricular")
NEAR_OUTLINE_MM = 27.0  # within ~15 mm of the inner table
INSIDE_MM = 15.0


def head_depth_mm(image: np.ndarray) -> np.ndarray:
    """Per pixel of a model input (H x W, windowed to [0, 1]), its distance from the head's outline in mm."""
    import cv2

    mask = np.ascontiguousarray(image > FRAME_LEVEL, dtype=np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return np.zeros(image.shape, np.float32)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    head = (labels == largest).astype(np.uint8)
    contours, _ = cv2.findContours(head, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(head)
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    mm_per_px = HEAD_MM / max(int(stats[largest, cv2.CC_STAT_WIDTH]), int(stats[largest, cv2.CC_STAT_HEIGHT]))
    return cv2.distanceTransform(filled, cv2.DIST_L2, 5) * mm_per_px


def torch_variants(weights: Path) -> dict[str, Callable[[np.ndarray, int], np.ndarray]]:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    import torch

    model = load_model(weights, Task.HEAD_CT_ICH, runtime="torch")
    network, spec = model.network, model.card.preprocessing
    stage5, last = network.blocks[4], network.bn2

    def run(method: Any, layer: Any) -> Callable[[np.ndarray, int], np.ndarray]:
        def cam(image: np.ndarray, label_index: int) -> np.ndarray:
            batch = torch.from_numpy(to_batch([image], spec))
            with method(model=network, target_layers=[layer]) as explainer:
                return explainer(input_tensor=batch, targets=[ClassifierOutputTarget(label_index)])[0]
        return cam

    return {"gradcam_stage5": run(GradCAM, stage5), "layercam_stage5": run(LayerCAM, stage5),
            "gradcampp": run(GradCAMPlusPlus, last)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=REPO / "weights")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--limit", type=int, default=40, help="positives per group (extra-axial, intra-axial)")
    ap.add_argument("--no-torch", action="store_true", help="only the service's own variants")
    args = ap.parse_args()
    onnx = load_model(args.weights, Task.HEAD_CT_ICH, runtime="onnxruntime")
    card, spec = onnx.card, onnx.card.preprocessing
    split = json.loads((args.weights / "head_ct_ich.split.json").read_text())
    data_dir = Path(split["data_dir"]) if Path(split["data_dir"]).is_dir() else args.data
    labels = list(card.labels)

    def members(names: tuple[str, ...], exclude: tuple[str, ...]) -> list[dict[str, Any]]:
        rows = [r for r in split["test"] if any(r["targets"][labels.index(n)] == 1.0 for n in names)
                and not any(r["targets"][labels.index(n)] == 1.0 for n in exclude)]
        return rows[: args.limit]

    groups = {"extra_axial": members(EXTRA_AXIAL, INTRA_AXIAL), "intra_axial": members(INTRA_AXIAL, EXTRA_AXIAL)}
    any_index = labels.index("any")

    def cam(image: np.ndarray, label_index: int) -> np.ndarray:
        _, maps = onnx.predict_with_features(to_batch([image], spec))
        assert maps is not None and onnx.cam_weights is not None
        return class_activation_map(maps[0], onnx.cam_weights[label_index], spec.input_size)

    variants: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
        "cam": cam, "refined": lambda image, j: refined_class_activation_map(onnx, image, j)}
    if not args.no_torch:
        variants |= torch_variants(args.weights)
    out: dict[str, Any] = {"model": f"{card.name} {card.version}", "framing": spec.framing.value,
                           "groups": {k: len(v) for k, v in groups.items()}, "variants": {}}
    for name, variant in variants.items():
        seconds: list[float] = []
        result: dict[str, Any] = {}
        for group, rows in groups.items():
            depths = []
            for row in rows:
                image = resize(load_image(data_dir / row["file"], spec), spec.input_size)
                started = time.perf_counter()
                heat = variant(image, any_index)
                seconds.append(time.perf_counter() - started)
                depth = head_depth_mm(image[..., 0])
                y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
                depths.append(float(depth[y, x]))
            d = np.array(depths)
            good = (d <= NEAR_OUTLINE_MM) & (d > 0) if group == "extra_axial" else d > INSIDE_MM
            result[group] = {"n": len(d), "pointing": int(good.sum()), "share": round(float(good.mean()), 3) if len(d) else None,
                             "median_depth_mm": round(float(np.median(d)), 1) if len(d) else None}
        result["median_ms_per_slice"] = round(1000 * float(np.median(seconds)), 1) if seconds else None
        out["variants"][name] = result
        print(name, json.dumps(result), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
