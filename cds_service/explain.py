"""Grad-CAM: a heatmap of where the model looked, on the one slice that drove the finding.

Only the top positive finding is explained, on its driving slice: one backward pass per
study, not per slice, keeps the cost close to plain inference. Where the model's head is
global average pooling + one linear layer (EfficientNet-B0) and the scoring runtime already
returned the last feature map, not even that pass is needed: Grad-CAM's channel weights are
then the classifier's weights (`class_activation_map`, checked against pytorch-grad-cam in
the tests), and the worker needs neither torch nor pytorch-grad-cam.
"""

from __future__ import annotations

import numpy as np

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


def class_activation_map(features: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """Grad-CAM from the forward pass alone, for a global-average-pooling + linear head.

    `features` is the slice's last feature map (C x h x w), `weights` the classifier's row for
    the label (C). The gradient of the label's logit at each position of channel k is
    weights[k] / (h w), so that is Grad-CAM's weight for channel k; the rest follows
    pytorch-grad-cam's GradCAM step by step (ReLU, scale to [0, 1], resize, aggregate).
    """
    channels, height, width = features.shape
    cam = np.maximum(np.tensordot(weights.astype(np.float32) / (height * width), features, axes=1), 0)
    scaled = np.maximum(_scaled_to_unit(cam, size), 0)  # GradCAM: per layer, then over the layers (one)
    return np.clip(_scaled_to_unit(scaled), 0.0, 1.0)


def _scaled_to_unit(cam: np.ndarray, size: int | None = None) -> np.ndarray:
    """pytorch-grad-cam's scale_cam_image for one map: min to 0, max to 1, resized (bilinear).

    Restated because importing pytorch_grad_cam.utils.image imports torch, torchvision and
    matplotlib, which a worker scoring with ONNX Runtime otherwise never loads (tested equal).
    """
    import cv2

    cam = cam - np.min(cam)
    cam = cam / (1e-7 + np.max(cam))
    return np.float32(cv2.resize(np.float32(cam), (size, size)) if size is not None else cam)


def jet_overlay(background: np.ndarray, mask: np.ndarray, image_weight: float) -> np.ndarray:
    """pytorch-grad-cam's show_cam_on_image(use_rgb=True): a jet-coloured mask over an RGB image
    in [0, 1], as uint8 RGB. Restated for the same reason as `_scaled_to_unit` (tested equal)."""
    import cv2

    heatmap = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * mask), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blend = (1 - image_weight) * (np.float32(heatmap) / 255) + image_weight * background
    return np.uint8(255 * (blend / np.max(blend)))


def overlay_size(image: np.ndarray) -> int:
    """Side of the square overlay for an image: its own, up to MAX_OVERLAY_SIZE.

    `display_image(image, overlay_size(image))` has the same overlay as `image` itself.
    """
    return min(max(image.shape[:2]), MAX_OVERLAY_SIZE)


def overlay_png(image: np.ndarray, cam: np.ndarray, opacity: float = 0.4) -> tuple[bytes, int, int]:
    """Blend a jet-coloured heatmap over the display image; PNG bytes and its size."""
    size = overlay_size(image)
    background = display_image(image, size)
    mask = resize(cam[..., None], size)[..., 0]
    rgb = jet_overlay(background, mask, image_weight=1.0 - opacity)
    return png_bytes(rgb), size, size


def png_bytes(rgb: np.ndarray) -> bytes:
    """A lossless PNG of an RGB uint8 image, encoded for speed: one Paeth filter and zlib's
    run-length strategy. A 512-px overlay of a head CT: ~14 ms and ~520 kB, where Pillow's
    PNG writer at its fastest level took ~31 ms for ~546 kB (adaptive filters per row)."""
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [
        cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH,
        cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
        cv2.IMWRITE_PNG_COMPRESSION, 1,
    ])
    if not ok:
        raise ValueError(f"could not encode a PNG of shape {rgb.shape}")
    return encoded.tobytes()


def explain(model: LoadedModel, image: np.ndarray, label: str, slice_index: int = 0, sop_instance_uid: str = "",
            features: np.ndarray | None = None) -> Heatmap:
    """The Heatmap for `label` on `image` (the driving slice).

    With the slice's feature map from scoring and a linear head, Grad-CAM is computed from
    them; otherwise pytorch-grad-cam runs its forward and backward pass on the torch network.
    """
    label_index = model.card.labels.index(label)
    if features is not None and model.cam_weights is not None:
        cam = class_activation_map(features, model.cam_weights[label_index], model.card.preprocessing.input_size)
    else:
        cam = grad_cam(model, image, label_index)
    png, width, height = overlay_png(image, cam)
    return Heatmap(png=png, label=label, width=width, height=height, slice_index=slice_index, sop_instance_uid=sop_instance_uid)
