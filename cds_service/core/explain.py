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

from cds_service.core.domain import Heatmap
from cds_service.core.models import LoadedModel
from cds_service.core.preprocessing import display_image, resize, to_batch

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
    cam = raw_cam(features, weights)
    scaled = np.maximum(_scaled_to_unit(cam, size), 0)  # GradCAM: per layer, then over the layers (one)
    return np.clip(_scaled_to_unit(scaled), 0.0, 1.0)


FEATURE_STRIDE = 32  # EfficientNet-B0's last feature map: one cell per 32 x 32 input pixels


def raw_cam(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Grad-CAM at the feature map's own resolution (h x w), before ReLU scaling and resize."""
    _, height, width = features.shape
    return np.maximum(np.tensordot(weights.astype(np.float32) / (height * width), features, axes=1), 0)


def refined_class_activation_map(model: LoadedModel, image: np.ndarray, label_index: int,
                                 features: np.ndarray | None = None) -> np.ndarray:
    """Grad-CAM at twice the feature map's resolution, from three more forward passes of one slice.

    The last feature map has one cell per 32 px (5 x 5 at 160 px: one blob over half a head).
    The slice is also scored shifted by half a cell to the left, up, and both; each shifted map's
    cells sit half-way between the unshifted ones, so the four interleave into a 2h x 2w map with
    a cell every 16 px. The same classifier weights give each map (`class_activation_map`), so
    it stays exact Grad-CAM at every sampled position. Costs one batch of 3 on the driving slice,
    or of 4 when the scoring pass's `features` were not kept (the slice itself is scored again with the
    shifted copies: ONNX Runtime gives a slice the same feature map in any batch, checked in
    tests/test_large_studies.py).
    """
    spec = model.card.preprocessing
    size = spec.input_size
    half = FEATURE_STRIDE // 2
    base = resize(image, size)
    shifted = [np.pad(base, ((0, dy), (0, dx), (0, 0)), mode="edge")[dy:, dx:]
               for dy, dx in ((0, half), (half, 0), (half, half))]
    if features is None:
        scored = _feature_maps(model, to_batch([base, *shifted], spec))
        features, more = scored[0], scored[1:]
    else:
        more = _feature_maps(model, to_batch(shifted, spec))
    if model.cam_weights is None:
        raise ValueError(f"{model.card.task.value}: no classifier weights for Grad-CAM from feature maps")
    weights = model.cam_weights[label_index]
    maps = [raw_cam(features, weights)] + [raw_cam(m, weights) for m in more]
    height, width = maps[0].shape
    fine = np.empty((2 * height, 2 * width), np.float32)
    fine[0::2, 0::2], fine[0::2, 1::2], fine[1::2, 0::2], fine[1::2, 1::2] = maps
    # the fine grid's cells are centred at 16 px * (k + 1): offset by a quarter cell from a plain
    # resize's, so shift the upsampled map by 8 px to put each value over the pixels it describes
    scaled = np.maximum(_scaled_to_unit(fine, size), 0)
    offset = FEATURE_STRIDE // 4
    scaled = np.pad(scaled, ((offset, 0), (offset, 0)), mode="edge")[:size, :size]
    return np.clip(_scaled_to_unit(scaled), 0.0, 1.0)


def _feature_maps(model: LoadedModel, batch: np.ndarray) -> np.ndarray:
    """The last feature maps of a batch (N x C x h x w): a model that gives none cannot refine a map."""
    _, maps = model.predict_with_features(batch)
    if maps is None:
        raise ValueError(f"{model.card.task.value}: no feature maps from this model, so no refined Grad-CAM")
    return maps


def _scaled_to_unit(cam: np.ndarray, size: int | None = None) -> np.ndarray:
    """pytorch-grad-cam's scale_cam_image for one map: min to 0, max to 1, resized (bilinear).

    Restated because importing pytorch_grad_cam.utils.image imports torch, torchvision and
    matplotlib, which a worker scoring with ONNX Runtime otherwise never loads (tested equal).
    """
    import cv2

    cam = cam - np.min(cam)
    cam = cam / (1e-7 + np.max(cam))
    unit = cam.astype(np.float32)
    return np.asarray(cv2.resize(unit, (size, size)), dtype=np.float32) if size is not None else unit


def jet_overlay(background: np.ndarray, mask: np.ndarray, image_weight: float) -> np.ndarray:
    """pytorch-grad-cam's show_cam_on_image(use_rgb=True): a jet-coloured mask over an RGB image
    in [0, 1], as uint8 RGB. Restated for the same reason as `_scaled_to_unit` (tested equal)."""
    import cv2

    heatmap = cv2.cvtColor(cv2.applyColorMap((255 * mask).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blend = (1 - image_weight) * (np.float32(heatmap) / 255) + image_weight * background
    return (255 * (blend / np.max(blend))).astype(np.uint8)


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

    With a linear head whose runtime gives the feature map (`cam_weights`), Grad-CAM is computed from
    the slice's feature map (from scoring, or scored again when not kept), at twice the feature map's
    resolution (`refined_class_activation_map`); otherwise pytorch-grad-cam runs its forward and
    backward pass on the torch network.
    """
    label_index = model.card.labels.index(label)
    if model.cam_weights is not None:
        cam = refined_class_activation_map(model, image, label_index, features)
    else:
        cam = grad_cam(model, image, label_index)
    png, width, height = overlay_png(image, cam)
    return Heatmap(png=png, label=label, width=width, height=height, slice_index=slice_index, sop_instance_uid=sop_instance_uid)
