"""Grad-CAM: a heatmap of where the model looked, on the one slice that drove the finding.

Only the top positive finding is explained, on its driving slice: one backward pass per
study, not per slice, keeps the cost close to plain inference.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .domain import Heatmap
from .models import LoadedModel
from .preprocessing import display_image, resize, to_batch

MAX_OVERLAY_SIZE = 512


def grad_cam(model: LoadedModel, image: np.ndarray, label_index: int) -> np.ndarray:
    """A [0, 1] saliency map at the model's input size for one label of one image."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    network = model.network
    target_layer = network.bn2 if hasattr(network, "bn2") else network.conv_head
    batch = torch.from_numpy(to_batch([image], model.card.preprocessing)).to(model.device)
    with model.gradient_lock, GradCAM(model=network, target_layers=[target_layer]) as cam:
        maps = cam(input_tensor=batch, targets=[ClassifierOutputTarget(label_index)])
    return np.clip(maps[0].astype(np.float32), 0.0, 1.0)


def overlay_png(image: np.ndarray, cam: np.ndarray, opacity: float = 0.4) -> tuple[bytes, int, int]:
    """Blend a jet-coloured heatmap over the display image; PNG bytes and its size."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    size = min(max(image.shape[:2]), MAX_OVERLAY_SIZE)
    background = display_image(image, size)
    mask = resize(cam[..., None], size)[..., 0]
    rgb = show_cam_on_image(background, mask, use_rgb=True, image_weight=1.0 - opacity)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=3)  # optimize=True: 8x slower, same size
    return buffer.getvalue(), size, size


def explain(model: LoadedModel, image: np.ndarray, label: str, slice_index: int = 0, sop_instance_uid: str = "") -> Heatmap:
    """The Heatmap for `label` on `image` (the driving slice)."""
    cam = grad_cam(model, image, model.card.labels.index(label))
    png, width, height = overlay_png(image, cam)
    return Heatmap(png=png, label=label, width=width, height=height, slice_index=slice_index, sop_instance_uid=sop_instance_uid)
