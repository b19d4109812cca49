# Over 400 lines on purpose: one training run's script (data, loop, calibration, card) read top to bottom; training time only.
"""`cds-triage train` and `cds-triage evaluate`: fit an EfficientNet-B0 and write its card.

What a training run does, in order:
1. find the labelled images (`datasets.discover_samples`) and split them reproducibly into
   train and validation (`datasets.split_samples`: seeded hash, stratified, by patient
   where DICOM gives one, else by image). The validation images are never trained on;
2. preprocess every image once with the service's own preprocessing (same card spec as
   inference) and keep the tensors in memory;
3. train with class-balanced sampling, light augmentation fitting the modality, AdamW,
   a warm-up + cosine learning-rate schedule and early stopping on the validation score,
   writing a resumable checkpoint after every epoch;
4. save the best epoch as fp16 safetensors, load it back through `models.load_model`
   (the service's path) and score the validation split with it: operating thresholds
   (sensitivity >= 0.95), metrics with bootstrap 95% CIs and plots go into the card.

Tasks differ only in data (`TASK_SETUPS`): brain MRI is a 4-way softmax; head CT a
6-label sigmoid of which only the labels present in the data are trained (loss masked);
chest X-ray a 1-label sigmoid.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .datasets import (
    SIMILARITY_THRESHOLD,
    Sample,
    build_split,
    class_counts,
    discover_samples,
    find_rsna_csv,
    extra_labelled,
    probable_negatives,
    resolve_data_dir,
)
from .pixels import load_image, original_size_features, preprocess_samples
from cds_service.core import domain
from cds_service.core.domain import NEGATIVE_LABELS, TASK_LABELS, Task
from cds_service.drift import expected_raised_share
from cds_service.core.evaluation import (
         Predictions,
         binary_auc,
         bootstrap_ci,
         choose_thresholds,
         SeriesSimulation,
         presence_metrics,
         presence_scores,
         series_operating_point,
         series_rates,
         threshold_within_budget,
         youden_threshold,
         format_metric,
         weights_readme,
         metrics_with_ci,
         write_plots,
     )
from cds_service.core.model_cards import ARCHITECTURE, ARCHITECTURES, PoolingMethod, SeriesPooling, card_path, weights_path
from cds_service.core.models import LoadedModel, create_network, load_model
from cds_service.core.input_profile import DEFAULT_QUANTILE, STATISTICS, InputProfile, fit_profile, image_statistics, profile_path
from cds_service.core.preprocessing import Framing, PreprocessingSpec, resize, to_batch

CARD_VERSION = "1.0.0"
DISCLAIMER = f"{domain.DISCLAIMER} For worklist prioritisation only; a radiologist reads every study."


# --- what differs between tasks ------------------------------------------------------------


@dataclass(frozen=True)
class Augmentation:
    """Random training-time changes; modest, because anatomy has a fixed orientation.

    Applied to the batch after the service preprocessing (so the un-augmented tensor is
    exactly the inference input). Brightness/contrast act on the [0, 1] image.
    """

    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    hflip: bool = True
    # what differs between hospitals' scanners and exports (0 = off), each drawn per image:
    aspect: float = 0.0  # width and height scaled apart by up to this share (a non-square export squashed)
    gamma: float = 0.0  # grey levels raised to exp(±gamma): another window shape or display curve
    noise: float = 0.0  # Gaussian noise of up to this standard deviation (on [0, 1]): dose, kernel
    blur: float = 0.0  # Gaussian blur of up to this sigma in input pixels, on half the images: a soft kernel
    downscale: float = 1.0  # on half the images, down to this share of the size and back: a coarser matrix or export


# The scanner-robust additions (`--augmentation scanner`), per task: what the outside checks found
# differing between our training images and other hospitals' (framing, window, noise, resolution).
SCANNER_AUGMENTATION: dict[str, dict[str, Any]] = {
    "head_ct_ich": {"scale": (0.85, 1.2), "aspect": 0.1, "gamma": 0.3, "noise": 0.03, "blur": 1.0, "downscale": 0.5},
    "brain_mri": {"scale": (0.8, 1.2), "aspect": 0.1, "gamma": 0.4, "noise": 0.04, "blur": 1.0, "downscale": 0.5},
    "chest_pneumothorax": {"aspect": 0.05, "gamma": 0.3, "noise": 0.02, "blur": 0.8, "downscale": 0.6},
}


@dataclass(frozen=True)
class TaskSetup:
    """The fixed, per-task parts of a model: output activation, preprocessing, augmentation."""

    task: Task
    activation: str
    spec_kind: str
    windows: tuple[tuple[float, float], ...]
    augmentation: Augmentation
    intended_use: str
    preprocessing_note: str
    series_pooling: SeriesPooling = SeriesPooling()
    # the bar a trained label must clear on the validation split before its finding may raise a priority
    priority_bar_min_positives: int = 20
    priority_bar_min_auc_lower95: float = 0.80
    # ((center lo, hi), (width lo, hi)) HU: a DICOM's own window within these is used (PreprocessingSpec.own_window)
    own_window: tuple[tuple[float, float], tuple[float, float]] | None = None
    framing: Framing = Framing.NONE


TASK_SETUPS: dict[Task, TaskSetup] = {
    Task.BRAIN_MRI: TaskSetup(
        Task.BRAIN_MRI,
        "softmax",
        "mr_robust",
        (),
        # stronger than the first models' (rotate 10, scale 0.9-1.1, brightness 0.1, contrast 0.15): scanners
        # and hospitals differ in intensity and framing, and meningiomas were missed on unseen images
        Augmentation(rotate_deg=15, scale=(0.85, 1.15), translate=0.08, brightness=0.15, contrast=0.25, hflip=True),
        "Flag single 2D brain MRI slices that may show a glioma, meningioma or pituitary tumour, "
        "to move the study up a radiologist's worklist.",
        "Grey levels are percentile-normalised per image (0.5th/99.5th percentile to 0/1), since MR "
        "intensities have no absolute scale; 8-bit JPEG/PNG and DICOM go through the same step.",
    ),
    Task.HEAD_CT_ICH: TaskSetup(
        Task.HEAD_CT_ICH,
        "sigmoid",
        "ct_windows",
        ((40.0, 80.0), (40.0, 80.0), (40.0, 80.0)),
        # bleeds occur on either side, so left-right flips are valid; windowed CT keeps brightness small
        # brightness/contrast wide enough to cover the spread of DICOM brain windows the PNGs were made with
        # (30/80 to 40/150 HU); DICOM input gets its own brain window too (own_window below)
        Augmentation(rotate_deg=10, scale=(0.9, 1.1), translate=0.05, brightness=0.12, contrast=0.25, hflip=True),
        "Flag non-contrast head CT series that may show intracranial haemorrhage (any type; the subtype is "
        "named where the model is trusted for it), to move the study up a radiologist's worklist.",
        "The training PNGs were each made with their DICOM's own window (a brain window: centre 30-50 HU, "
        "width 80-150 HU); their grey levels 0..255 map to 0..1 directly. DICOM input is windowed the same way: "
        "with its own first Window Center/Width when that is a brain window (centre 20-60 HU, width 60-160 HU, "
        "own_window), else with 40/80 HU (windows), so it looks like the training PNGs. "
        "Every image is converted to one grey channel and resized to a fixed square size first, "
        "which removes the original image size and RGBA/RGB layout (in this data they differ between sources, "
        "a shortcut the model must not learn).",
        # three neighbouring slices, chosen on validation among the rules measured (max, top-2/top-3 mean, 2nd
        # highest, adjacent mean of 2 or 3): at 90% of simulated bleeding series raised, window 3 raised 36% of
        # normal series against 46% for window 2 (head_ct_ich 2.1.0); max and top-k scored lower still there but
        # ignore adjacency, so a longer series (150-300 slices) gives an isolated spike more chances
        # RSNA slices are ~5 mm (28-44 a head): a thin-slice series is read as 5 mm slabs (core/slabs.py)
        SeriesPooling(PoolingMethod.ADJACENT_MEAN, 3, slab_mm=5.0),
        # the RSNA DICOMs' own windows (30/80, 36/80, 40/80, 40/150, 35/135, 50/100 ...): brain-tissue grey levels of
        # the training PNGs match the DICOMs at their own window (median 121 vs 120), not at 40/80 (103)
        own_window=((20.0, 60.0), (60.0, 160.0)),
    ),
    Task.CHEST_PNEUMOTHORAX: TaskSetup(
        Task.CHEST_PNEUMOTHORAX,
        "sigmoid",
        "xray",
        (),
        # no left-right flip: the heart and mediastinum are not symmetric
        Augmentation(rotate_deg=5, scale=(0.95, 1.05), translate=0.03, brightness=0.1, contrast=0.1, hflip=False),
        "Flag frontal chest radiographs that may show a pneumothorax, to move the study up a "
        "radiologist's worklist.",
        "Modality LUT, VOI LUT or window, MONOCHROME1 inverted, then percentile normalisation.",
    ),
}

PROVENANCE: dict[str, str] = {
    "brain_mri": "Public 'Brain Tumor MRI Dataset' (Kaggle, M. Nickparvar; combines figshare (Cheng et al.), "
    "SARTAJ and Br35H), training split only, de-duplicated; images that duplicate the original test split "
    "were removed. 2D slices, 224x224 JPEG, mixed greyscale/RGB; some 'notumor' images are CT, not MR.",
    "head_ct_png": "Public 'Head CT - hemorrhage' set (Kaggle, F. Kitamura): single axial head CT slices, "
    "already windowed to 8-bit PNG, varying sizes; 75 haemorrhage / 75 normal, labels from the folder.",
    "head_ct_rsna_png": "RSNA 2019 Intracranial Hemorrhage Detection challenge (stage-1 train; Flanders et al., Radiology: AI "
    "2020; non-commercial research and education): 1,222 axial head CT slices converted to 512x512 8-bit PNG, each "
    "windowed with its own DICOM window (a brain window in nearly all), with the challenge's expert slice labels "
    "(any 538; epidural 16, intraparenchymal 180, intraventricular 127, subarachnoid 177, subdural 237). No patient or "
    "series ids survived the conversion. The 1,500 unlabelled slices of the same conversion (256x256, almost all normal) "
    "are not in any split.",
    "chest_xray_ptx": "NIH ChestX-ray14 (Wang et al., CVPR 2017; courtesy of the NIH Clinical Center), its radiologist-"
    "boxed subset: 694 frontal radiographs (PA and AP) of 574 patients, 384x384 grey PNG (from 1024x1024); 126 with "
    "pneumothorax, 568 with other findings only (no image without a finding). Labels mined from reports by NIH (noisy; "
    "a 2019 expert re-read disagreed on about half of a small sample). Split by NIH Patient ID.",
}


def default_spec(task: Task, image_size: int, setup: TaskSetup | None = None) -> PreprocessingSpec:
    setup = setup or TASK_SETUPS[task]
    return PreprocessingSpec(kind=setup.spec_kind, input_size=image_size, windows=setup.windows,
                             own_window=setup.own_window, framing=setup.framing)


def setup_for(task: Task, framing: Framing | None, augmentation: str) -> TaskSetup:
    """The task's setup with a run's choices: its framing (None: the task's) and augmentation
    ("task": the task's own; "scanner": with `SCANNER_AUGMENTATION`)."""
    setup = TASK_SETUPS[task]
    if framing is not None:
        setup = replace(setup, framing=Framing(framing))
    if augmentation == "scanner":
        setup = replace(setup, augmentation=replace(setup.augmentation, **SCANNER_AUGMENTATION[task.value]))
    elif augmentation != "task":
        raise ValueError(f"unknown augmentation {augmentation!r} (task, scanner)")
    return setup


def model_name(task: Task) -> str:
    return "cds-triage-" + task.value.replace("_", "-")


# --- configuration -------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in the checkpoint and (mostly) the card."""

    task: Task
    data_dir: Path
    out_dir: Path = Path("weights")
    epochs: int = 20
    image_size: int = 128
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    drop_rate: float = 0.2
    val_fraction: float = 0.2
    # exponential moving average of the weights, per optimiser step (0 = off): on a few hundred images the
    # weights of one epoch are noisy; the average is what is validated, kept and shipped
    ema_decay: float = 0.0
    # stochastic depth: each residual block skipped with a probability rising to this rate with depth (0 = off)
    drop_path_rate: float = 0.0
    seed: int = 42  # the split's seed, and the training's unless training_seed is given
    # another draw of initial head, sampling order, augmentation and dropout on the same split: the spread
    # between runs that differ only here says how much of a difference between two recipes is chance
    training_seed: int | None = None
    patience: int = 6
    device: str = "cpu"
    init_from: Path | None = None
    init: str | None = None  # "imagenet-lite0": ImageNet EfficientNet-Lite0 mapped into B0 (imagenet_init)
    # timm's B0 with PyTorch padding, or with TensorFlow "SAME" padding (tf_efficientnet_b0), which the
    # TensorFlow-trained Lite0 weights expect: with symmetric padding their features follow the position in
    # the image, not its content (a flipped image's mean feature map correlated 0.00 with the original's
    # flipped back, 0.55 with SAME padding), and Grad-CAM pointed at one spot of every image
    architecture: str = ARCHITECTURE
    test_fraction: float = 0.0  # a test split that chooses nothing (no epoch, no threshold)
    cv_folds: int = 0  # grouped K-fold cross-validation (`crossval.py`): fold `cv_fold` tests, the next validates
    cv_fold: int = 0
    grouping: str = "patient"  # or "similarity": near-identical images grouped before the split
    extra_negatives: Path | None = None  # unlabelled probable negatives, training split only
    extra_negatives_part: str = "all"
    extra_data: Path | None = None  # labelled images of another source, training split only
    target_sensitivity: float = 0.95  # per label, on the validation split: the operating threshold
    framing: Framing | None = None  # None: the task's (TaskSetup.framing)
    augmentation: str = "task"  # "task", or "scanner": the task's plus SCANNER_AUGMENTATION
    threads: int = 0  # torch threads; 0 = every core (two trainings side by side: 1 each)
    command: str = ""  # the command line that ran this training, for the card and weights/README.md
    resume: Path | None = None
    checkpoint: Path | None = None
    max_steps_per_epoch: int | None = None  # tests: a couple of steps, not an epoch
    max_minutes: float | None = None  # stop after the epoch that crosses this wall time
    bootstrap: int = 1000
    version: str = CARD_VERSION
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())  # the day it was trained
    progress: bool = True
    plots: bool = True

    @property
    def setup(self) -> TaskSetup:
        """The task's setup with this run's framing and augmentation."""
        return setup_for(self.task, self.framing, self.augmentation)

    @property
    def draw_seed(self) -> int:
        """The seed of everything random in training except the split."""
        return self.seed if self.training_seed is None else self.training_seed

    def checkpoint_path(self) -> Path:
        return self.checkpoint or Path("var") / "checkpoints" / f"{self.task.value}-last.pt"

    def split_block(self) -> dict[str, Any]:
        """The card's `data.split`: everything `datasets.build_split` needs to rebuild the split."""
        block: dict[str, Any] = {"seed": self.seed, "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
                                 "grouping": self.grouping}
        if self.grouping == "similarity":
            block["similarity_threshold"] = SIMILARITY_THRESHOLD
        if self.cv_folds:
            block |= {"folds": self.cv_folds, "fold": self.cv_fold}
        return block


@dataclass
class TrainResult:
    card_path: Path
    weights_path: Path
    card: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


# --- small torch helpers -------------------------------------------------------------------


def cpu_cores() -> int:
    """Cores this process may use (cgroup/affinity aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's name for the card's hardware line ('AMD EPYC', ...)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def set_threads(threads: int = 0) -> int:
    """torch's intra-op threads: `threads`, or every core this process may use (0)."""
    import torch

    cores = threads or cpu_cores()
    torch.set_num_threads(cores)
    return cores


def augment(x: Any, aug: Augmentation, spec: PreprocessingSpec, generator: Any) -> Any:
    """Random rotation/scale/shift/aspect (+ optional flip), then resolution, blur, gamma,
    brightness/contrast and noise, on a batch.

    `x` is the normalised NCHW batch from `to_batch`; we go back to [0, 1], change it and
    normalise again, filling the borders with black like a scanner's background. Every draw
    comes from `generator`, so a resumed run repeats its epoch.
    """
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    img = x * std + mean

    def uniform(lo: float, hi: float) -> Any:
        return torch.rand(n, generator=generator).mul(hi - lo).add(lo).to(x.device, x.dtype)

    def half() -> Any:
        return torch.rand(n, generator=generator) < 0.5

    angle = uniform(-aug.rotate_deg, aug.rotate_deg) * math.pi / 180.0
    scale = uniform(*aug.scale)
    tx, ty = uniform(-aug.translate, aug.translate) * 2, uniform(-aug.translate, aug.translate) * 2
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device, x.dtype) * 2 - 1 if aug.hflip else torch.ones(n, dtype=x.dtype, device=x.device)
    stretch = torch.exp(uniform(-aug.aspect, aug.aspect)) if aug.aspect else torch.ones(n, dtype=x.dtype, device=x.device)
    sx, sy = scale * stretch.sqrt(), scale / stretch.sqrt()
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos / sx * flip, -sin / sx, tx], 1), torch.stack([sin / sy * flip, cos / sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    size = img.shape[-1]
    if aug.downscale < 1.0:
        factors, chosen = uniform(aug.downscale, 1.0), half()
        for i in torch.nonzero(chosen).flatten().tolist():
            small = max(8, int(round(size * float(factors[i]))))
            coarse = F.interpolate(img[i : i + 1], size=(small, small), mode="area")
            img[i : i + 1] = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    if aug.blur > 0:
        sigmas, chosen = uniform(0.1, aug.blur), half()
        for i in torch.nonzero(chosen).flatten().tolist():
            sigma = float(sigmas[i])
            radius = max(1, int(math.ceil(2 * sigma)))
            taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
            taps = (taps / taps.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
            one = F.conv2d(F.pad(img[i : i + 1], (radius, radius, 0, 0), mode="replicate"), taps, groups=3)
            img[i : i + 1] = F.conv2d(F.pad(one, (0, 0, radius, radius), mode="replicate"), taps.transpose(2, 3), groups=3)
    if aug.gamma > 0:
        img = img.clamp(0.0, 1.0).pow(torch.exp(uniform(-aug.gamma, aug.gamma)).view(n, 1, 1, 1))
    contrast = uniform(1 - aug.contrast, 1 + aug.contrast).view(n, 1, 1, 1)
    brightness = uniform(-aug.brightness, aug.brightness).view(n, 1, 1, 1)
    img = (img - 0.5) * contrast + 0.5 + brightness
    if aug.noise > 0:
        sigma = uniform(0.0, aug.noise).view(n, 1, 1, 1) * half().to(x.device, x.dtype).view(n, 1, 1, 1)
        noise = torch.randn(img.shape[0], 1, img.shape[2], img.shape[3], generator=generator).to(x.device, x.dtype)
        img = img + sigma * noise  # the same on the three channels: they are one grey image
    img = img.clamp(0.0, 1.0)
    return ((img - mean) / std).contiguous(memory_format=torch.channels_last)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero: stable start from scratch, no manual drops."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def masked_loss(logits: Any, targets: Any, mask: Any, activation: str, label_smoothing: float) -> Any:
    """Cross-entropy (softmax) or BCE averaged over known, trained labels only (sigmoid)."""
    import torch.nn.functional as F

    if activation == "softmax":
        return F.cross_entropy(logits, targets.argmax(1), label_smoothing=label_smoothing)
    per = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1.0)


def build_network(num_labels: int, drop_rate: float, init_from: Path | None,
                  architecture: str = ARCHITECTURE) -> tuple[Any, list[str]]:
    """A fresh network, optionally starting from another card's weights (head re-initialised).

    Returns the network and the names of parameters that could not be taken over.
    """
    import torch
    from safetensors.torch import load_file

    network = create_network(num_labels, architecture)
    network.drop_rate = drop_rate  # timm EfficientNet: dropout before the classifier
    skipped: list[str] = []
    if init_from is not None:
        source = load_file(str(init_from))
        own = network.state_dict()
        usable = {}
        for name, tensor in source.items():
            if name in own and own[name].shape == tensor.shape:
                usable[name] = tensor.float()
            else:
                skipped.append(name)
        network.load_state_dict(usable, strict=False)
        skipped += [name for name in own if name not in usable]
    return network.to(memory_format=torch.channels_last), sorted(set(skipped))


def add_stochastic_depth(network: Any, rate: float) -> int:
    """timm's `drop_path_rate`, set on a created network: block i of n is skipped with probability
    rate * i / n during training (an identity in eval, so the service's network needs nothing).
    Returns the number of residual blocks that got it."""
    from timm.layers import DropPath

    if rate <= 0:
        return 0
    blocks = [block for stage in network.blocks for block in stage]
    changed = 0
    for i, block in enumerate(blocks):
        if getattr(block, "has_skip", False) and hasattr(block, "drop_path"):
            block.drop_path = DropPath(rate * i / len(blocks)).train(block.training)
            changed += 1
    return changed


def network_probs(network: Any, x: np.ndarray, activation: str, device: str, batch_size: int = 128) -> np.ndarray:
    """Probabilities of an in-training network on preprocessed inputs (eval mode)."""
    import torch

    network.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[start : start + batch_size].astype(np.float32)).to(device)
            logits = network(xb.contiguous(memory_format=torch.channels_last)).float()
            out.append((torch.softmax(logits, 1) if activation == "softmax" else torch.sigmoid(logits)).cpu().numpy())
    return np.concatenate(out)


def predict_samples(model: LoadedModel, samples: Sequence[Sample], chunk: int = 32, progress: bool = False) -> np.ndarray:
    """Probabilities of a loaded (service) model on files, through the service's exact path."""
    from tqdm import tqdm

    spec = model.card.preprocessing
    out = []
    for start in tqdm(range(0, len(samples), chunk), desc="predict", disable=not progress, leave=False):
        part = samples[start : start + chunk]
        out.append(model.predict(to_batch([load_image(s.path, spec) for s in part], spec)))
    return np.concatenate(out) if out else np.zeros((0, len(model.card.labels)), np.float32)


# decimals a probability keeps in <task>.split.json; the card's figures are computed from the same rounded values
# (a rare label's tiny probabilities tie when rounded, which moved its AUC by 0.001 against the unrounded ones)
STORED_DECIMALS = 6


def as_predictions(samples: Sequence[Sample], probs: np.ndarray, labels: Sequence[str], activation: str, trained: Sequence[str]) -> Predictions:
    """Truth arrays of the samples beside the probabilities, rounded as the split file stores them, so the
    card's figures follow from that file; untrained labels count as unknown."""
    probs = np.round(np.asarray(probs, np.float64), STORED_DECIMALS)
    trained_mask = np.array([label in trained for label in labels])
    targets = np.array([s.targets for s in samples], dtype=np.float64).reshape(len(samples), len(labels))
    known = np.array([s.known for s in samples], dtype=bool).reshape(len(samples), len(labels)) & trained_mask[None, :]
    return Predictions(tuple(labels), activation, targets, known, probs, tuple(s.rel for s in samples))


MIN_POSITIVES_FOR_SCORE = 5


def validation_score(pred: Predictions) -> float:
    """Early-stopping score: balanced accuracy (softmax) or mean AUC of trained labels (sigmoid)."""
    if pred.activation == "softmax":
        truth, guess = pred.targets.argmax(1), pred.probs.argmax(1)
        return float(np.mean([(guess[truth == j] == j).mean() for j in np.unique(truth)]))
    # labels with fewer than MIN_POSITIVES_FOR_SCORE positives here would make the score jump by chance
    aucs = [binary_auc(pred.targets[pred.known[:, j], j], pred.probs[pred.known[:, j], j]) for j in range(len(pred.labels))
            if pred.targets[pred.known[:, j], j].sum() >= MIN_POSITIVES_FOR_SCORE]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else 0.0


def _split_digest(val: Sequence[Sample]) -> str:
    return hashlib.sha256("\n".join(s.rel for s in val).encode()).hexdigest()[:16]


# --- the size-only shortcut check ----------------------------------------------------------------


def size_only_baseline(train: Sequence[Sample], val: Sequence[Sample], label_index: int, bootstrap: int = 1000) -> dict[str, Any]:
    """AUC of a logistic regression that sees only the stored width, height and pixel mode.

    If this comes close to the network, the network may have learnt the image size instead
    of the finding. Fitted on the training split, scored on the validation split, plus a
    5-fold cross-validated AUC over all images for a steadier number.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(samples: Sequence[Sample], modes: list[str]) -> np.ndarray:
        rows = []
        for s in samples:
            w, h, mode = original_size_features(s.path)
            rows.append([w, h, w / h, w * h] + [float(mode == m) for m in modes])
        return np.asarray(rows, dtype=np.float64)

    keep_train = [s for s in train if s.known[label_index]]
    keep_val = [s for s in val if s.known[label_index]]
    modes = sorted({original_size_features(s.path)[2] for s in list(keep_train) + list(keep_val)})
    y_train = np.array([s.targets[label_index] > 0.5 for s in keep_train])
    y_val = np.array([s.targets[label_index] > 0.5 for s in keep_val])
    if len(set(y_train)) < 2:
        return {"note": "only one class in the training split; baseline not computed"}
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(features(keep_train, modes), y_train)
    p_val = model.predict_proba(features(keep_val, modes))[:, 1]
    auc = binary_auc(y_val, p_val)
    ci = bootstrap_ci(lambda idx: {"auc": binary_auc(y_val[idx], p_val[idx])}, len(y_val), bootstrap)["auc"]
    everything = list(keep_train) + list(keep_val)
    y_all = np.concatenate([y_train, y_val])
    folds = min(5, int(y_all.sum()), int((~y_all).sum()))
    cv_auc = None
    if folds >= 2:
        p_cv = cross_val_predict(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
            features(everything, modes),
            y_all,
            cv=StratifiedKFold(folds, shuffle=True, random_state=0),
            method="predict_proba",
        )[:, 1]
        cv_auc = round(binary_auc(y_all, p_cv), 4)
    return {
        "model": "logistic regression on original width, height, aspect, area and PIL mode (one-hot)",
        "validation_auc": {"value": round(auc, 4), "ci95": [round(ci[0], 4), round(ci[1], 4)]},
        f"cv{folds}_auc_all_images": cv_auc,
        "modes_seen": modes,
    }


# --- training ---------------------------------------------------------------------------------


def train(config: TrainConfig) -> TrainResult:
    """Run one training (or resume one) and write `<out>/<task>.safetensors` + `.json`."""
    import torch
    from tqdm import tqdm

    started = time.time()
    cores = set_threads(config.threads)
    task = config.task
    setup = config.setup
    labels = TASK_LABELS[task]
    softmax = setup.activation == "softmax"
    data_dir = resolve_data_dir(task, config.data_dir)
    spec = default_spec(task, config.image_size, setup)
    torch.manual_seed(config.draw_seed)

    train_set, val_set, test_set = build_split(task, data_dir, config.split_block())
    samples = train_set + val_set + test_set
    train_set = with_extra_training_data(config, train_set)
    # a label is trained when the training data says something about it
    trained = tuple(label for j, label in enumerate(labels) if any(s.known[j] for s in train_set))
    trained_mask = np.array([label in trained for label in labels], dtype=np.float32)
    _log(f"{task.value}: {len(train_set)} train / {len(val_set)} validation images from {data_dir}; trained labels {list(trained)}")

    x_train = preprocess_samples(train_set, spec, progress=config.progress)
    x_val = preprocess_samples(val_set, spec, progress=config.progress)
    y_train = torch.tensor([s.targets for s in train_set], dtype=torch.float32)
    m_train = torch.tensor([s.known for s in train_set], dtype=torch.float32) * torch.from_numpy(trained_mask)
    strata = [s.stratum for s in train_set]
    counts = {k: strata.count(k) for k in set(strata)}
    sample_weights = torch.tensor([1.0 / counts[k] for k in strata], dtype=torch.double)  # class-balanced

    network, skipped = build_network(len(labels), config.drop_rate, config.init_from, config.architecture)
    add_stochastic_depth(network, config.drop_path_rate)
    if config.init_from is not None:
        _log(f"initialised from {config.init_from}; re-initialised: {', '.join(skipped) or 'nothing'}")
    imagenet: dict[str, Any] | None = None
    if config.init == "imagenet-lite0":
        from .imagenet_init import load_lite0_into

        imagenet = load_lite0_into(network)
        _log(f"initialised from ImageNet EfficientNet-Lite0: {imagenet['parameter_share_from_imagenet']:.0%} of the parameters")
    elif config.init is not None:
        raise ValueError(f"unknown --init {config.init!r} (known: imagenet-lite0)")
    network.to(config.device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = None
    if config.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(network, decay=config.ema_decay)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup))

    best: dict[str, Any] = {"score": -math.inf, "loss": math.inf, "epoch": 0, "state": None}
    start_epoch, history = 1, []
    stale, elapsed_before, stopped_early = 0, 0.0, False
    if config.resume is not None:
        ckpt = torch.load(str(config.resume), map_location="cpu", weights_only=False)
        if ckpt["task"] != task.value or ckpt["split_digest"] != _split_digest(val_set):
            raise ValueError(f"checkpoint {config.resume} is for another task or another validation split")
        network.load_state_dict(ckpt["network"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history, best, stale = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"], ckpt["stale"]
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema"])
        elapsed_before = ckpt.get("elapsed_s", 0.0)
        _log(f"resumed from {config.resume} after epoch {ckpt['epoch']}")
        if stale >= config.patience:  # that run had already stopped early: only write the outputs
            stopped_early = True

    last_epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs + 1):
        if stopped_early:
            break
        last_epoch = epoch
        network.train()
        torch.manual_seed(config.draw_seed * 1000 + epoch)  # dropout; makes a resumed run repeat this epoch's draws
        gen = torch.Generator().manual_seed(config.draw_seed * 1000 + epoch)
        order = torch.multinomial(sample_weights, steps_per_epoch * config.batch_size, replacement=True, generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", disable=not config.progress, leave=False)
        running = 0.0
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            xb = torch.from_numpy(x_train[idx.numpy()].astype(np.float32)).to(config.device)
            xb = augment(xb, setup.augmentation, spec, gen)
            logits = network(xb)
            loss = masked_loss(logits, y_train[idx].to(config.device), m_train[idx].to(config.device), setup.activation, config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item()
            if ema is not None:
                ema.update(network)
            bar.set_postfix(loss=f"{running / (step + 1):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()

        scored = ema.module if ema is not None else network
        val_probs = network_probs(scored, x_val, setup.activation, config.device)
        val_pred = as_predictions(val_set, val_probs, labels, setup.activation, trained)
        val_loss = _prob_loss(val_pred)
        score = validation_score(val_pred)
        accuracy = float((val_pred.targets.argmax(1) == val_probs.argmax(1)).mean()) if softmax else float("nan")
        row = {"epoch": epoch, "train_loss": round(running / steps_per_epoch, 5), "val_loss": round(val_loss, 5), "val_score": round(score, 5)}
        if softmax:
            row["val_accuracy"] = round(accuracy, 5)
        history.append(row)
        improved = (score, -val_loss) > (best["score"], -best["loss"])
        if improved:
            best = {"score": score, "loss": val_loss, "epoch": epoch, "state": copy.deepcopy(scored.state_dict())}
            stale = 0
        else:
            stale += 1
        score_name = "balanced accuracy" if softmax else "mean AUC"
        _log(
            f"epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {val_loss:.4f}, val {score_name} {score:.4f}"
            + (f", val accuracy {accuracy:.4f}" if softmax else "")
            + (" (best)" if improved else f" (best {best['score']:.4f} at epoch {best['epoch']})")
            + f" [{(time.time() - started + elapsed_before) / 60:.1f} min]"
        )
        _save_checkpoint(config, network, optimizer, scheduler, epoch, history, best, stale, _split_digest(val_set), time.time() - started + elapsed_before,
                         ema.module if ema is not None else None)
        if stale >= config.patience:
            _log(f"early stop: no improvement for {stale} epochs")
            stopped_early = True
            break
        if config.max_minutes and (time.time() - started + elapsed_before) / 60 >= config.max_minutes:
            _log(f"time budget of {config.max_minutes} min reached; stopping after epoch {epoch}")
            stopped_early = True
            break

    if best["state"] is not None:
        network.load_state_dict(best["state"])
    training_seconds = time.time() - started + elapsed_before
    run: dict[str, Any] = {
        "epochs_planned": config.epochs,
        "epochs_run": last_epoch,
        "best_epoch": best["epoch"],
        "stopped_early": stopped_early,
        "steps_per_epoch": steps_per_epoch,
        "seconds": round(training_seconds, 1),
        "torch_threads": cores,
        "history": history,
        "reinitialised_from_init": skipped if config.init_from else [],
        "seconds_per_epoch": round((training_seconds) / max(1, last_epoch - start_epoch + 1), 1) if last_epoch >= start_epoch else None,
    }
    if imagenet is not None:
        run["imagenet_init"] = imagenet
    return _finish(config, network, spec, setup, train_set, val_set, test_set, samples, data_dir, trained, run)


def operating_points(setup: TaskSetup, trained: Sequence[str], val: Predictions, test: Predictions | None,
                     target: float, bootstrap: int) -> dict[str, Any]:
    """Everything the validation split chooses and what the test split then shows, for the card.

    Thresholds: per trained label, the highest with sensitivity >= `target` on validation. A
    softmax task with a negative class (brain MRI) also gets a presence rule: raise when
    1 - p(negative) reaches its threshold, the lowest whose share of negatives raised on validation
    stays within `PRESENCE_NEGATIVE_BUDGET` (and at most the one with sensitivity `target`); its
    tumour classes' thresholds are that threshold. Validation also decides which labels may raise a priority
    (`priority_labels`). The test split (if any) chooses nothing: it reports the same thresholds.
    """
    thresholds = choose_thresholds(val, target)
    out: dict[str, Any] = {}
    if setup.activation == "sigmoid" and len(trained) > 1:  # the labels beside the main one only name: balanced
        for label in trained[1:]:
            j = val.labels.index(label)
            known = val.known[:, j].astype(bool)
            thresholds[label] = youden_threshold(val.targets[known, j], val.probs[known, j])
    negative = [label for label in trained if label in NEGATIVE_LABELS]
    if setup.activation == "softmax" and len(negative) == 1:
        truth, score = presence_scores(val, negative[0])
        cut = threshold_within_budget(truth, score, target, PRESENCE_NEGATIVE_BUDGET)
        thresholds = {label: (cut if label != negative[0] else thresholds[label]) for label in thresholds}
        out["presence"] = {"negative_label": negative[0], "threshold": cut,
                           "validation": presence_metrics(val, negative[0], cut, bootstrap)}
        if test is not None:
            out["presence"]["test"] = presence_metrics(test, negative[0], cut, bootstrap)
    if setup.series_pooling.method is PoolingMethod.ADJACENT_MEAN and "any" in trained:
        out["series_operating_point"] = series_block(setup, val, test, target)
        thresholds["any"] = out["series_operating_point"]["threshold"]
    out["thresholds"] = thresholds
    out["validation_metrics"] = metrics_with_ci(val, thresholds, resamples=bootstrap)
    out["go_live_bar"] = go_live_bar(setup, trained, out)
    if not out["go_live_bar"]["met"]:
        out["default_mode"] = "shadow"
        out["default_mode_reason"] = "short of the go-live bar on validation: " + "; ".join(
            f"{c['what']} is {c['value']} (needs {c['needs']})" for c in out["go_live_bar"]["checks"] if not c["met"])
    # which labels may raise a priority is a choice, so it is made on validation: the test split chooses nothing
    out["priority_labels"], out["priority_bar"] = priority_labels(setup, trained, out["validation_metrics"])
    if test is not None:
        out["test_metrics"] = metrics_with_ci(test, thresholds, resamples=bootstrap)
    band = expected_raised_share({"trained_labels": list(trained), **out})  # the drift alarm's band (drift.py)
    if band is not None:
        out["expected_raised_share"] = band
    return out


# The share of tumour-free images a presence rule may raise on validation, half the go-live bar's 5 %: the
# threshold is set as low as that allows, for images from elsewhere that score a little lower (brain MR 3.1.0:
# 227 of 301 unseen meningiomas raised at the threshold that sat exactly on the validation tumours).
PRESENCE_NEGATIVE_BUDGET = 0.025

# What a head CT model must be expected to do on whole series before it may raise priorities (else: shadow).
SERIES_BAR = {"bleeding_series_raised_at_least": 0.85, "normal_series_raised_at_most": 0.40}


def go_live_bar(setup: TaskSetup, trained: Sequence[str], points: dict[str, Any]) -> dict[str, Any]:
    """Whether a model may raise priorities by default (`active`), judged on validation only.

    A figure counts by the end of its 95% interval that a sceptic would pick where the product's
    aim is stated as a lower bound (AUC): a model whose interval reaches below the aim ships in
    shadow mode, and a site turns it on after its own validation.
    """
    metrics = points["validation_metrics"]["metrics"]
    checks: list[dict[str, Any]] = []

    def check(what: str, value: float | None, at_least: float | None = None, at_most: float | None = None) -> None:
        met = value is not None and (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
        needs = f">= {at_least}" if at_least is not None else f"<= {at_most}"
        checks.append({"what": what, "value": None if value is None else round(float(value), 4), "needs": needs, "met": met})

    if "presence" in points:
        v = points["presence"]["validation"]
        check("share of tumours raised", v["raised_with_finding"]["value"], at_least=0.97)
        check("share of tumour-free images raised", v["raised_without_finding"]["value"], at_most=0.05)
        check("class accuracy", v["class_accuracy"]["value"], at_least=0.97)
    elif setup.activation == "sigmoid" and trained:
        main = trained[0]
        check(f"{main} AUC, lower end of its 95% interval", (metrics.get(f"{main}.auc", {}).get("ci95") or [None])[0],
              at_least=GO_LIVE_AUC.get(setup.task, 0.85))
        if "series_operating_point" in points:
            expected = points["series_operating_point"]["validation"]
            check("bleeding series raised (simulated)", expected["bleeding_series_raised"],
                  at_least=SERIES_BAR["bleeding_series_raised_at_least"])
            check("normal series raised (simulated)", expected["normal_series_raised"],
                  at_most=SERIES_BAR["normal_series_raised_at_most"])
        else:
            check(f"{main} specificity at the threshold (share of images without it left alone)",
                  metrics.get(f"{main}.specificity_at_threshold", {}).get("value"), at_least=0.70)
    return {"checks": checks, "met": bool(checks) and all(c["met"] for c in checks), "judged_on": "validation split"}


# The AUC a task's main label must reach (by the lower end of its 95% interval) to go live by default.
GO_LIVE_AUC = {Task.HEAD_CT_ICH: 0.85, Task.CHEST_PNEUMOTHORAX: 0.80}


def series_block(setup: TaskSetup, val: Predictions, test: Predictions | None, target: float) -> dict[str, Any]:
    """The `any` threshold for whole series: chosen on validation slices assembled into simulated
    series (`evaluation.SeriesSimulation`), the highest whose simulated share of bleeding series
    raised reaches `target`; the test split's slices, assembled the same way, report it."""
    j = val.labels.index("any")
    simulation = SeriesSimulation()

    def pool(series: np.ndarray) -> float:
        return float(setup.series_pooling.pool(series[:, None])[0])

    def scores(pred: Predictions) -> tuple[np.ndarray, np.ndarray]:
        known = pred.known[:, j].astype(bool)
        y, p = pred.targets[known, j] > 0.5, pred.probs[known, j]
        return p[y], p[~y]

    chosen = series_operating_point(*scores(val), pool, target, simulation)
    block: dict[str, Any] = {
        "threshold": chosen.pop("threshold"), "target_bleeding_series_raised": target,
        "pooling": setup.series_pooling.to_card(), "simulation": simulation.to_card(), "validation": chosen,
        "bar": SERIES_BAR,
    }
    if test is not None:
        block["test"] = series_rates(*simulation.scores(*scores(test), pool), block["threshold"])
    return block


def recard(weights_dir: Path, task: Task, data_dir: Path, command: str = "") -> dict[str, Any]:
    """Rewrite a trained model's card with this code's card builder, from the card and its split file.

    For a training that ran on an older revision of this module: the descriptive parts (data
    provenance, limits, policies, counts) are rebuilt; what the run measured (training history,
    probabilities) is kept; the operating points are re-chosen from the stored probabilities as
    `train` would (`rethreshold`). The weights are not touched.
    """
    cpath = card_path(Path(weights_dir), task)
    old = json.loads(cpath.read_text())
    training, split = old["training"], old["data"]["split"]
    config = TrainConfig(
        task=task, data_dir=Path(data_dir), out_dir=Path(weights_dir), epochs=int(training["epochs_planned"]),
        image_size=int(old["input_size"]), batch_size=int(training["batch_size"]),
        val_fraction=float(split["val_fraction"]), test_fraction=float(split.get("test_fraction", 0.0)),
        grouping=str(split.get("grouping", "patient")), seed=int(split.get("seed", 42)),
        init="imagenet-lite0" if training.get("imagenet_init") else None, architecture=str(old.get("architecture", ARCHITECTURE)),
        target_sensitivity=float(old.get("target_sensitivity", 0.95)), version=str(old["version"]), date=str(old["date"]),
        command=command or str(training.get("command") or ""), patience=int(training["early_stopping"]["patience_epochs"]),
    )
    extra_negatives = old["data"].get("extra_training_negatives")
    if extra_negatives:
        config.extra_negatives, config.extra_negatives_part = Path(extra_negatives["dir"]), extra_negatives["part"]
    extra_data = old["data"].get("extra_training_data")
    if extra_data:
        config.extra_data = Path(extra_data["dir"])
    config.framing = Framing(old["preprocessing"].get("framing", Framing.NONE.value))
    setup = config.setup
    resolved = resolve_data_dir(task, Path(data_dir))
    train_set, val_set, test_set = build_split(task, resolved, config.split_block())
    train_set = with_extra_training_data(config, train_set)
    keep = {k: v for k, v in training.items() if k not in ("command",)}
    card = _card(config, default_spec(task, config.image_size, setup), setup, tuple(old["trained_labels"]), old["thresholds"], {},
                 {key: old[key] for key in ("size_only_baseline",) if key in old}, keep, train_set, val_set, test_set, resolved)
    card["training"].update({k: v for k, v in keep.items() if k not in card["training"]})
    for key in ("optimizer", "schedule", "loss", "dropout", "stochastic_depth", "weight_average", "sampling", "augmentation"):
        if key in training or key in card["training"]:  # what the run used, not today's defaults
            card["training"][key] = training.get(key, card["training"].get(key))
    card["weights_sha256"] = old["weights_sha256"]
    if "input_check" in old:  # measured by `input-profile`, not by training
        card["input_check"] = old["input_check"]
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    return rethreshold(weights_dir, task, config.target_sensitivity)


def rethreshold(weights_dir: Path, task: Task, target: float, bootstrap: int = 1000) -> dict[str, Any]:
    """Re-choose a card's operating points from its stored split probabilities (no images needed).

    For a product decision on the sensitivity target after training: the validation split chooses,
    the test split reports, exactly as at the end of `train`.
    """
    cpath = card_path(Path(weights_dir), task)
    card = json.loads(cpath.read_text())
    trained, activation = tuple(card["trained_labels"]), card["activation"]
    val = stored_predictions(weights_dir, card, "validation")
    if val is None:
        raise ValueError(f"{cpath}: no stored validation predictions to choose thresholds from (train it again)")
    test = stored_predictions(weights_dir, card, "test")
    points = operating_points(TASK_SETUPS[task], trained, val, test, target, bootstrap)
    for key in ("presence", "test_metrics", "priority_labels", "priority_bar", "series_operating_point",
                "default_mode", "default_mode_reason", "go_live_bar", "expected_raised_share"):
        card.pop(key, None)
    card.update(points)
    card["target_sensitivity"] = target
    card["threshold_policy"] = threshold_policy(target, activation == "softmax", test is not None, "series_operating_point" in points)
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    write_evaluation(Path(weights_dir), card, val, card["validation_metrics"])
    return card


# Images the service's DICOM path must accept for a task (real DICOM of the training source).
DICOM_CHECKS = {Task.HEAD_CT_ICH: "head_ct_dicom_unlabelled"}
# Other image sets of the same anatomy, measured (never fitted on): how far the familiar region reaches, and
# what no image of the right anatomy is ever beyond (`refuse_beyond`).
SAME_TASK_OTHER_SOURCES = {Task.HEAD_CT_ICH: {"head_ct_rsna_png/unlabelled": "same source (RSNA), unlabelled slices",
                                              "head_ct_png": "another hospital's head CT (Kitamura), windowed and cropped differently"}}
OTHER_TASK_SAMPLE = 300
# Pixels alone refuse an image this many times farther than the farthest right-anatomy image we have, from any source.
REFUSE_MARGIN = 1.25


def write_input_profile(weights_dir: Path, task: Task, data_dir: Path, quantile: float = DEFAULT_QUANTILE) -> dict[str, Any]:
    """Fit the task's input profile (cds_service.core.input_profile) on the card's training split, choose its
    familiarity threshold on the validation split, and set `refuse_beyond` from every right-anatomy image we
    have (all splits, the real DICOM path, other sources of the same anatomy): `REFUSE_MARGIN` times the
    farthest of them. Measure what each source and the other tasks' images get (familiar, unfamiliar,
    refused); write `<task>.input-profile.npz` and the card's block."""
    cpath = card_path(Path(weights_dir), task)
    card = json.loads(cpath.read_text())
    spec = PreprocessingSpec.from_card(card["preprocessing"], card["input_size"])
    data_dir = Path(data_dir)
    card_dir = Path(card["data"]["dir"])
    task_dir = resolve_data_dir(task, card_dir if card_dir.is_dir() else data_dir)
    train_set, val_set, test_set = build_split(task, task_dir, card["data"]["split"])

    def stats(paths: Sequence[Path]) -> np.ndarray:  # of the model input, as the service computes them
        return np.stack([image_statistics(resize(load_image(Path(p), spec), spec.input_size)) for p in paths])

    def sample(paths: list[Path]) -> list[Path]:
        return [paths[i] for i in sorted(np.random.default_rng(0).permutation(len(paths))[:OTHER_TASK_SAMPLE])]

    same: dict[str, np.ndarray] = {"validation": stats([s.path for s in val_set])}
    if test_set:
        same["test"] = stats([s.path for s in test_set])
    if task in DICOM_CHECKS and (folder := data_dir / DICOM_CHECKS[task]).is_dir():
        same[f"{DICOM_CHECKS[task]} (real DICOM, the service's decoding path)"] = stats(sorted(folder.glob("*.dcm")))
    for folder_name, what in SAME_TASK_OTHER_SOURCES.get(task, {}).items():
        if (folder := data_dir / folder_name).is_dir():
            same[f"{folder_name} ({what})"] = stats(sample(sorted(folder.rglob("*.png"))))
    train_stats = stats([s.path for s in train_set])
    fitted = fit_profile(train_stats, same["validation"], quantile)
    farthest = max(float(fitted.distances(x).max()) for x in [train_stats, *same.values()])
    profile = InputProfile(mean=fitted.mean, precision=fitted.precision, threshold=fitted.threshold,
                           refuse_beyond=max(REFUSE_MARGIN * farthest, 1.01 * fitted.threshold))
    blob = profile.to_bytes()
    profile_path(Path(weights_dir), task.value).write_bytes(blob)

    def shares(statistics: np.ndarray) -> dict[str, Any]:
        d = profile.distances(statistics)
        assert profile.refuse_beyond is not None
        counts = {"familiar": int((d <= profile.threshold).sum()), "refused": int((d > profile.refuse_beyond).sum())}
        counts["unfamiliar"] = len(d) - counts["familiar"] - counts["refused"]
        return {key: {"count": n, "of": len(d), "rate": round(n / len(d), 4)} for key, n in counts.items()}

    others = {other.value: shares(stats(sample([s.path for s in discover_samples(other, resolve_data_dir(other, data_dir))])))
              for other in Task if other is not task}
    card["input_check"] = {
        "file": profile_path(Path(weights_dir), task.value).name,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "statistics": STATISTICS,
        "fitted_on": f"the training split ({len(train_set)} images): mean and Ledoit-Wolf shrunk covariance",
        "threshold": round(profile.threshold, 3),
        "threshold_policy": f"familiar up to the {100 * quantile:g}th percentile of the validation split's Mahalanobis distances",
        "refuse_beyond": round(float(profile.refuse_beyond or 0.0), 3),
        "refuse_beyond_policy": f"{REFUSE_MARGIN:g} times the farthest right-anatomy image we have ({farthest:.2f}), "
                                "from the training split and every source below",
        "same_anatomy": {name: shares(x) for name, x in same.items()},
        "other_tasks": others,
        "limits": "Refuses the wrong modality or body part by the DICOM header, a CT that is not head-shaped, and images "
                  "farther from the training images than any image of the right anatomy we have; scores, and marks "
                  "unfamiliar, images of the right anatomy far from the training images (another scanner, protocol or "
                  "export). It does not tell a good image from a poor one of the right kind; a series is judged on the "
                  "median of its middle slices; an image file without a header is judged on its pixels alone, which "
                  "tell a head CT from a brain MR poorly.",
    }
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    return card["input_check"]


def stored_predictions(weights_dir: Path, card: dict[str, Any], part: str) -> Predictions | None:
    """The validation or test split as stored beside the weights (`<task>.split.json`): files, truth
    (unknown or untrained labels masked) and probabilities; None when the file has no such part."""
    rows = json.loads((Path(weights_dir) / f"{card['task']}.split.json").read_text()).get(part)
    if not rows:
        return None
    labels, trained = tuple(card["labels"]), set(card["trained_labels"])
    targets = np.array([[t if t is not None else 0.0 for t in r["targets"]] for r in rows], np.float64)
    known = np.array([[t is not None and label in trained for t, label in zip(r["targets"], labels)] for r in rows])
    return Predictions(labels, card["activation"], targets, known, np.array([r["probs"] for r in rows], np.float64),
                       tuple(r["file"] for r in rows))


def write_evaluation(weights_dir: Path, card: dict[str, Any], pred: Predictions, metrics: dict[str, Any]) -> None:
    """`eval/<task>/`: the plots and metrics.json of the validation split at the card's thresholds."""
    plot_dir = weights_dir / "eval" / card["task"]
    write_plots(pred, card["thresholds"], plot_dir, f"{card['name']} {card['version']}")
    (plot_dir / "metrics.json").write_text(json.dumps(_metrics_document(card, metrics, card["thresholds"]), indent=2) + "\n")


def threshold_policy(target: float, softmax: bool, with_test: bool, series: bool = False) -> str:
    """The card's sentence on how its thresholds were chosen."""
    if series:
        rule = ("For `any` (the label that raises a study), the threshold is the series operating point: the highest "
                f"whose share of bleeding series raised reaches {target} in series assembled from the validation "
                "slices (the card's `series_operating_point`). The subtypes, which only name what was found, use the threshold "
                "that maximises sensitivity + specificity on validation")
    elif softmax:
        rule = (f"Per trained label, the highest threshold with sensitivity >= {target} on the validation split "
                "(one-vs-rest on the softmax probability; no_tumor is never reported as a finding). The presence rule "
                "(1 - p(no_tumor)), which raises a study and whose threshold the tumour classes share, takes the lowest "
                f"threshold that raises at most {PRESENCE_NEGATIVE_BUDGET:.1%} of the tumour-free validation images, "
                f"provided the share of tumours raised reaches {target} there")
    else:
        rule = f"Per trained label, the highest threshold with sensitivity >= {target} on the validation split"
    return (rule + ". The validation split is therefore also the threshold-selection set"
            + ("; the test split chose nothing and reports the same thresholds." if with_test else "."))


def priority_labels(setup: TaskSetup, trained: Sequence[str], validation: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The trained labels whose findings may raise a priority, and why.

    The task's main label (a sigmoid task's first: `any`, `pneumothorax`) and a softmax task's
    positive classes always may: whether the task raises at all is its mode (active / shadow).
    A further label (a hemorrhage subtype) must show enough positives in the validation split and a
    validation AUC whose lower 95% bound clears the task's bar; the others are still reported. (The
    test split, which chooses nothing, shows afterwards how the chosen labels fare.)
    """
    metrics, positives = validation["metrics"], validation["positives_per_label"]
    keep, verdicts = [], {}
    for index, label in enumerate(trained):
        if label in NEGATIVE_LABELS:
            continue
        lower = (metrics.get(f"{label}.auc", {}).get("ci95") or [None])[0]
        n = positives.get(label, 0)
        main = setup.activation == "softmax" or index == 0
        ok = main or (n >= setup.priority_bar_min_positives and lower is not None and lower >= setup.priority_bar_min_auc_lower95)
        verdicts[label] = {"validation_positives": n, "validation_auc_lower95": lower, "raises_priority": ok,
                           **({"why": "the task's main label (the task's mode decides)"} if main else {})}
        if ok:
            keep.append(label)
    bar = {"rule": f"a label beside the main one needs at least {setup.priority_bar_min_positives} positives in the validation "
                   f"split and a validation AUC whose lower 95% bound is at least {setup.priority_bar_min_auc_lower95}",
           "labels": verdicts}
    return keep, bar


def _prob_loss(pred: Predictions) -> float:
    """Validation loss from probabilities (NLL for softmax, masked BCE for sigmoid)."""
    p = np.clip(pred.probs, 1e-7, 1 - 1e-7)
    if pred.activation == "softmax":
        return float(-np.log(p[np.arange(len(p)), pred.targets.argmax(1)]).mean())
    bce = -(pred.targets * np.log(p) + (1 - pred.targets) * np.log(1 - p))
    return float((bce * pred.known).sum() / max(1, pred.known.sum()))


def _save_checkpoint(config: TrainConfig, network: Any, optimizer: Any, scheduler: Any, epoch: int, history: list, best: dict, stale: int, digest: str, elapsed: float,
                     ema_network: Any = None) -> None:
    import torch

    path = config.checkpoint_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "task": config.task.value,
            "epoch": epoch,
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            **({"ema": ema_network.state_dict()} if ema_network is not None else {}),
            "scheduler": scheduler.state_dict(),
            "history": history,
            "best": best,
            "stale": stale,
            "split_digest": digest,
            "elapsed_s": elapsed,
            "config": {k: str(v) for k, v in asdict(config).items()},
        },
        str(tmp),
    )
    tmp.replace(path)  # never leave a half-written checkpoint behind


def _finish(
    config: TrainConfig,
    network: Any,
    spec: PreprocessingSpec,
    setup: TaskSetup,
    train_set: list[Sample],
    val_set: list[Sample],
    test_set: list[Sample],
    samples: list[Sample],
    data_dir: Path,
    trained: tuple[str, ...],
    run: dict[str, Any],
) -> TrainResult:
    """Save fp16 weights, score them through the service's loader, write card + split list."""
    from safetensors.torch import save_file

    task, labels = config.task, TASK_LABELS[config.task]
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").half().contiguous() for k, v in network.state_dict().items()}
    wpath = weights_path(out, task)
    save_file(state, str(wpath), metadata={"task": task.value, "architecture": config.architecture, "dtype": "float16"})

    # a provisional card lets us load exactly as the service does; thresholds follow below
    card = _card(config, spec, setup, trained, {label: 0.5 for label in trained}, {}, {}, run, train_set, val_set, test_set, data_dir)
    cpath = card_path(out, task)
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    model = load_model(out, task, config.device)
    probs = predict_samples(model, val_set, progress=config.progress)
    pred = as_predictions(val_set, probs, labels, setup.activation, trained)
    test_pred = None
    if test_set:  # scored once, with the thresholds the validation split chose: it chooses nothing
        test_probs = predict_samples(model, test_set, progress=config.progress)
        test_pred = as_predictions(test_set, test_probs, labels, setup.activation, trained)
    extra = operating_points(setup, trained, pred, test_pred, config.target_sensitivity, config.bootstrap)
    thresholds, metrics = extra.pop("thresholds"), extra.pop("validation_metrics")
    if setup.activation == "sigmoid" and trained:
        j = labels.index(trained[0])
        extra["size_only_baseline"] = size_only_baseline(train_set, val_set, j, config.bootstrap)
        extra["size_only_baseline"]["model_validation_auc"] = metrics["metrics"].get(f"{trained[0]}.auc")
    card = _card(config, spec, setup, trained, thresholds, metrics, extra, run, train_set, val_set, test_set, data_dir)
    card["weights_sha256"] = hashlib.sha256(wpath.read_bytes()).hexdigest()
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    write_split_file(out, task, config, data_dir, train_set, val_set, pred, test_set, test_pred)
    if config.plots:
        write_evaluation(out, card, pred, metrics)
    load_model(out, task, config.device)  # the final card must load: fail here, not in production
    _log(f"wrote {cpath} and {wpath}")
    for line in _summary_lines(card):
        _log("  " + line)
    return TrainResult(cpath, wpath, card, run["history"])


def _card(
    config: TrainConfig,
    spec: PreprocessingSpec,
    setup: TaskSetup,
    trained: tuple[str, ...],
    thresholds: dict[str, float],
    metrics: dict[str, Any],
    extra: dict[str, Any],
    run: dict[str, Any],
    train_set: list[Sample],
    val_set: list[Sample],
    test_set: list[Sample],
    data_dir: Path,
) -> dict[str, Any]:
    task, labels = config.task, TASK_LABELS[config.task]
    softmax = setup.activation == "softmax"
    untrained = [label for label in labels if label not in trained]
    start = ("Started from general-purpose image-recognition weights (ImageNet) and trained" if config.init else
             "Started from our own earlier weights and trained" if config.init_from else "Trained from scratch")
    limitations = [
        DISCLAIMER,
        f"{start} on a small public research data set ({len(train_set)} training images); expect lower "
        "accuracy on other scanners, protocols and populations. Check it on your own studies first.",
        "The operating threshold was chosen on the validation images"
        + (", and the separate test images (which chose nothing) show what to expect; both are small, so the "
           "ranges given with each figure matter more than the figure itself." if test_set else
           ", which are also the images the figures come from: the figures are optimistic."),
    ]
    if task is Task.BRAIN_MRI:
        limitations += [
            "Four classes only (glioma, meningioma, pituitary tumour, no tumour). Other disease (metastases, "
            "stroke, bleeding, ...) is outside what it was taught and may be called one of the four.",
            "The tumour type it names is secondary: it raises a study when it thinks any tumour is present.",
            "Its heatmap is coarse: on gliomas and meningiomas it usually centres on the tumour, on pituitary "
            "tumours it sits above the sella rather than on the gland; do not read a tumour's exact location from it.",
            "Trained on single 2D slices from one public collection of JPEG images; some of its 'no tumour' images are CT.",
        ]
    if task is Task.HEAD_CT_ICH:
        limitations += [
            "Reads each axial slice of a non-contrast head CT in a brain window (the scan's own, else 40/80 HU), then asks "
            "neighbouring slices to agree before it raises a study. A bleed seen on a single thin slice, "
            "or only in a subdural or bone window, can be missed.",
            "Thin-slice scans (slices 2.5 mm apart or less) are read as 5 mm slabs, each the average of the thin slices it covers, "
            "as the model was trained on 5 mm slices; a bleed smaller than a slab can be diluted.",
            "Trained on single slices (no whole scans): the series decision rests on slice results.",
            "The heatmap is broad: it covers the part of the brain that drove the score and centres on large bleeds, "
            "but does not outline a small one. Look at the whole study, not only where it is red.",
            "A subtype the model cannot yet be trusted on (too few examples, or too weak on the validation images) is shown "
            "as a probability only: never named as a finding, never a reason to raise a study.",
        ]
        if untrained:
            limitations.append(f"Outputs {', '.join(untrained)} were not trained and are never reported as findings.")
    if task is Task.CHEST_PNEUMOTHORAX:
        limitations += [
            "Frontal chest radiographs only. Trained on a few hundred NIH images whose labels were mined from "
            "reports (noisy); every negative image shows some other disease.",
            "Many pneumothorax images show a chest drain: an image with a drain (a treated pneumothorax) may "
            "be flagged because of the drain. It is not a check that a drain is in place, and it does not "
            "grade size or tension. Every test image with a pneumothorax was a follow-up film of its patient. "
            "On bedside (AP) films, which carry most lines and drains, the test AUC was 0.89 (10 with a "
            "pneumothorax, 55 without); on PA films 0.85 (14 and 59): no large drop without the bedside "
            "devices, on too few images to exclude one.",
            "Must not be used to rule out a pneumothorax, on children, or on lateral views. Where the model looks "
            "(its heatmaps on the test images): on the lung fields, mostly the right lung whatever the side; on one "
            "pneumothorax image it centred on a pigtail drain, and the images without pneumothorax it scored highest "
            "carry lines and tubes. Treat its heatmap as a hint, not as the location of the air.",
        ]
    card: dict[str, Any] = {
        "task": task.value,
        "name": model_name(task),
        "version": config.version,
        "date": config.date,
        "architecture": config.architecture,
        "labels": list(labels),
        "trained_labels": list(trained),
        "untrained_labels": untrained,
        "activation": setup.activation,
        "input_size": spec.input_size,
        "preprocessing": spec.to_card(),
        "preprocessing_note": setup.preprocessing_note,
        "thresholds": thresholds,
        "series_pooling": setup.series_pooling.to_card(),
        "target_sensitivity": config.target_sensitivity,
        "threshold_policy": threshold_policy(config.target_sensitivity, softmax, bool(config.test_fraction),
                                             "series_operating_point" in extra),
        "intended_use": setup.intended_use,
        "disclaimer": DISCLAIMER,
        "limitations": limitations,
        "data": {
            "dir": _display_path(data_dir),
            "provenance": PROVENANCE.get(data_dir.name, f"user-supplied data at {_display_path(data_dir)}"),
            "layout": "rsna_csv" if task is Task.HEAD_CT_ICH and find_rsna_csv(data_dir) else "class_folders",
            "split": {
                **config.split_block(),
                "unit": _split_unit(config),
                "stratified_by": "class",
                "method": "sha256(seed:group) rank per class: the lowest ranks to test, the next to validation; "
                          "see cds_training.datasets.split_three",
                "validation_list": f"{task.value}.split.json",
            },
            "counts": {
                "train": class_counts(train_set, labels, softmax),
                "validation": class_counts(val_set, labels, softmax),
                "train_total": len(train_set),
                "validation_total": len(val_set),
                **({"test": class_counts(test_set, labels, softmax), "test_total": len(test_set)} if test_set else {}),
            },
            **({"extra_training_negatives": {
                "dir": _display_path(config.extra_negatives), "part": config.extra_negatives_part,
                "count": sum(1 for s in train_set if s.rel.startswith(config.extra_negatives.name + "/")),
                "use": "training split only, every label taken as 0 (probable negatives); never in validation or test"}}
               if config.extra_negatives else {}),
            **({"extra_training_data": {
                "dir": _display_path(config.extra_data),
                "count": sum(1 for s in train_set if s.rel.startswith(config.extra_data.name + "/")),
                "use": "training split only, with its own labels (labels it does not name are masked); "
                       "never in validation or test"}}
               if config.extra_data else {}),
        },
        "training": {
            "hardware": f"CPU ({cpu_model()}), {run['torch_threads']} cores, no GPU"
            if config.device == "cpu"
            else config.device,
            "device": config.device,
            "image_size": spec.input_size,
            "batch_size": config.batch_size,
            "optimizer": f"AdamW (lr {config.lr}, weight decay {config.weight_decay})",
            "schedule": f"linear warm-up {config.warmup_epochs} epoch(s), then cosine to 0",
            "loss": "cross-entropy, label smoothing " + str(config.label_smoothing)
            if softmax
            else "binary cross-entropy masked to trained labels with known truth",
            "dropout": config.drop_rate,
            "sampling": "class-balanced (inverse class frequency, with replacement)",
            **({"stochastic_depth": f"residual blocks skipped with a probability rising with depth to {config.drop_path_rate}"}
               if config.drop_path_rate > 0 else {}),
            **({"weight_average": f"exponential moving average of the weights, decay {config.ema_decay} per step; the average is validated and shipped"}
               if config.ema_decay > 0 else {}),
            "augmentation": asdict(setup.augmentation),
            "early_stopping": {"patience_epochs": config.patience, "score": "validation balanced accuracy" if softmax else "validation mean AUC"},
            "init_from": _display_path(config.init_from) if config.init_from else (
                "ImageNet EfficientNet-Lite0 mapped into B0" if config.init else "random initialisation (no pre-training)"),
            # the file's hash, because a later training may replace the file at that path
            "init_from_sha256": hashlib.sha256(config.init_from.read_bytes()).hexdigest() if config.init_from else None,
            "seed": config.seed,
            **({"training_seed": config.training_seed} if config.training_seed is not None else {}),
            "torch": _torch_version(),
            "command": config.command,
            **{k: v for k, v in run.items()},
            "time_minutes": round(run["seconds"] / 60.0, 1),
        },
        "weights_file": f"{task.value}.safetensors",
        "weights_dtype": "float16",
    }
    if metrics:
        card["validation_metrics"] = metrics
    card.update(extra)
    return card


def with_extra_training_data(config: TrainConfig, train_set: list[Sample]) -> list[Sample]:
    """The training split with the extra sources the config names (probable negatives, another labelled
    set): one place, so `train` and `recard` count the same images."""
    if config.extra_negatives is not None:
        train_set = train_set + probable_negatives(config.task, config.extra_negatives, config.extra_negatives_part)
    if config.extra_data is not None:
        train_set = train_set + extra_labelled(config.task, config.extra_data)
    return train_set


def _display_path(path: Path | None) -> str:
    """Paths relative to the working directory where possible: cards must not leak home dirs."""
    if path is None:
        return ""
    try:
        return os.path.relpath(Path(path).resolve(), Path.cwd())
    except ValueError:
        return str(path)


def _torch_version() -> str:
    import torch

    return torch.__version__


def _split_unit(config: TrainConfig) -> str:
    if config.grouping == "similarity":
        return (f"group of near-identical images (Pearson correlation of 96x96 grey thumbnails >= {SIMILARITY_THRESHOLD}, "
                "single linkage; stands in for the patient and series ids the data lost); patient where DICOM or metadata gives one")
    return "patient (DICOM PatientID, or the data's metadata.csv Patient ID) where known, else image"


def _split_rows(samples: Sequence[Sample], pred: Predictions, labels: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {
            "file": s.rel,
            "targets": [s.targets[j] if s.known[j] else None for j in range(len(labels))],
            "probs": [round(float(p), STORED_DECIMALS) for p in pred.probs[i]],
        }
        for i, s in enumerate(samples)
    ]


def write_split_file(out: Path, task: Task, config: TrainConfig, data_dir: Path, train_set: Sequence[Sample], val_set: Sequence[Sample],
                     pred: Predictions, test_set: Sequence[Sample] = (), test_pred: Predictions | None = None) -> Path:
    """`<task>.split.json`: the validation files (relative paths) with truth and probabilities.

    Lets anyone check the split (no validation image was trained on) and lets the tests
    re-score a subset and compare with what the card reports.
    """
    labels = TASK_LABELS[task]
    doc = {
        "task": task.value,
        "data_dir": _display_path(data_dir),
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "train_count": len(train_set),
        "validation_count": len(val_set),
        "labels": list(labels),
        "validation": _split_rows(val_set, pred, labels),
    }
    if test_pred is not None:
        doc["test_fraction"] = config.test_fraction
        doc["test_count"] = len(test_set)
        doc["test"] = _split_rows(test_set, test_pred, labels)
    path = out / f"{task.value}.split.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _metrics_document(card: dict[str, Any], metrics: dict[str, Any], thresholds: dict[str, float]) -> dict[str, Any]:
    return {
        "model": card["name"],
        "version": card["version"],
        "task": card["task"],
        "split": "validation",
        "thresholds": thresholds,
        **metrics,
    }


def _summary_lines(card: dict[str, Any]) -> list[str]:
    lines = []
    block = card.get("validation_metrics", {}).get("metrics", {})
    for name in ("accuracy", "balanced_accuracy", "macro_auc"):
        if name in block:
            lines.append(f"{name}: {format_metric(block, name)}")
    for label in card["trained_labels"]:
        parts = [f"{m}={format_metric(block, f'{label}.{m}')}" for m in ("auc", "sensitivity", "specificity")]
        lines.append(f"{label}: threshold {card['thresholds'][label]:.6f}; " + "; ".join(parts))
    if "size_only_baseline" in card:
        b = card["size_only_baseline"]
        if "validation_auc" in b:
            lines.append(f"size-only baseline AUC {b['validation_auc']['value']:.3f} {b['validation_auc']['ci95']}")
    return lines


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


# --- evaluation of a committed model -----------------------------------------------------------


def evaluate(task: Task, data_dir: Path, weights_dir: Path, out_dir: Path | None = None, bootstrap: int = 1000, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Re-score a model on its validation split (rebuilt from the card's seed and fraction).

    Writes `metrics.json` and the PNG plots into `out_dir` (default `<weights>/eval/<task>`).
    """
    set_threads()
    model = load_model(weights_dir, task, device)
    card = model.card.raw
    split = card.get("data", {}).get("split", {})
    train_set, val_set, _ = build_split(task, data_dir, split)
    listed = _listed_validation(weights_dir, task)
    matches = listed is None or listed == [s.rel for s in val_set]
    if not matches:
        _log("warning: the rebuilt validation split differs from the one stored beside the card (other data?)")
    probs = predict_samples(model, val_set, progress=progress)
    pred = as_predictions(val_set, probs, model.card.labels, model.card.activation, model.card.trained_labels)
    metrics = metrics_with_ci(pred, model.card.thresholds, resamples=bootstrap)
    out_dir = Path(out_dir) if out_dir else Path(weights_dir) / "eval" / task.value
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(pred, model.card.thresholds, out_dir, f"{model.card.name} {model.card.version}")
    doc = _metrics_document(card, metrics, model.card.thresholds)
    doc["data_dir"] = _display_path(resolve_data_dir(task, data_dir))
    doc["validation_split_matches_card"] = matches
    doc["plots"] = [p.name for p in plots]
    (out_dir / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _listed_validation(weights_dir: Path, task: Task) -> list[str] | None:
    path = Path(weights_dir) / f"{task.value}.split.json"
    if not path.exists():
        return None
    return [row["file"] for row in json.loads(path.read_text())["validation"]]


# --- CLI glue (wired into `cds-triage` by cli.py) ------------------------------------------------

TASK_CHOICES = [t.value for t in Task]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cds-triage train`."""
    parser.add_argument("--task", required=True, choices=TASK_CHOICES)
    parser.add_argument("--data", required=True, type=Path, help="the task's image folder (class sub-folders or an RSNA ID,Label CSV)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=128, help="square input size in pixels (default 128)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--drop-path", type=float, default=0.0, dest="drop_path_rate",
                        help="stochastic depth: the deepest residual block's skip probability (e.g. 0.2); 0 = off")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--ema", type=float, default=0.0, dest="ema_decay",
                        help="exponential moving average of the weights, decay per step (e.g. 0.97); 0 = off")
    parser.add_argument("--patience", type=int, default=6, help="early stopping: epochs without validation improvement")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=Path("weights"), help="where <task>.safetensors and <task>.json go")
    parser.add_argument("--init-from", type=Path, default=None, help="start from these weights (e.g. weights/brain_mri.safetensors); the classifier head is re-initialised")
    parser.add_argument("--init", choices=["imagenet-lite0"], default=None,
                        help="start from ImageNet EfficientNet-Lite0 weights mapped into B0 (needs the train extra)")
    parser.add_argument("--architecture", choices=list(ARCHITECTURES), default=None,
                        help="timm B0 variant (default: tf_efficientnet_b0 with --init imagenet-lite0, else efficientnet_b0)")
    parser.add_argument("--test-fraction", type=float, default=0.0, help="a test split that chooses nothing, reported beside validation")
    parser.add_argument("--grouping", choices=["patient", "similarity"], default="patient",
                        help="split unit: patient where known, else image; 'similarity' also groups near-identical images")
    parser.add_argument("--extra-negatives", type=Path, default=None, help="folder of unlabelled probable negatives, added to the training split only")
    parser.add_argument("--extra-negatives-part", choices=["all", "even", "odd"], default="all", help="half of --extra-negatives by file-name hash")
    parser.add_argument("--extra-data", type=Path, default=None,
                        help="labelled images of another source in the task's class folders (e.g. head_ct_png), "
                             "added to the training split only")
    parser.add_argument("--framing", choices=[f.value for f in Framing], default=None,
                        help="head CT: crop each image to a square around the head before resizing (body), or not (none); default: the task's")
    parser.add_argument("--augmentation", choices=["task", "scanner"], default="task",
                        help="the task's augmentation, or with the scanner-robust additions (SCANNER_AUGMENTATION)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    parser.add_argument("--target-sensitivity", type=float, default=0.95, help="per-label sensitivity on validation that sets each threshold")
    parser.add_argument("--resume", type=Path, default=None, help="continue from a checkpoint written by an earlier run")
    parser.add_argument("--checkpoint", type=Path, default=None, help="where to write the per-epoch checkpoint (default var/checkpoints/<task>-last.pt)")
    parser.add_argument("--seed", type=int, default=42, help="the split's seed (and the training's, unless --training-seed)")
    parser.add_argument("--training-seed", type=int, default=None,
                        help="another seed for the initial head, sampling, augmentation and dropout on the same split")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after the epoch that crosses this wall time")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--version", dest="model_version", default=CARD_VERSION, help="model version written to the card")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs stay)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        task=Task(args.task),
        data_dir=Path(args.data),
        out_dir=Path(args.out),
        epochs=args.epochs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        val_fraction=args.val_fraction,
        ema_decay=args.ema_decay,
        drop_path_rate=args.drop_path_rate,
        patience=args.patience,
        device=args.device,
        init_from=args.init_from,
        init=args.init,
        architecture=args.architecture or ("tf_efficientnet_b0" if args.init == "imagenet-lite0" else ARCHITECTURE),
        test_fraction=args.test_fraction,
        grouping=args.grouping,
        extra_negatives=args.extra_negatives,
        extra_negatives_part=args.extra_negatives_part,
        extra_data=args.extra_data,
        target_sensitivity=args.target_sensitivity,
        framing=Framing(args.framing) if args.framing else None,
        augmentation=args.augmentation,
        threads=args.threads,
        resume=args.resume,
        checkpoint=args.checkpoint,
        seed=args.seed,
        training_seed=args.training_seed,
        max_minutes=args.max_minutes,
        max_steps_per_epoch=args.max_steps_per_epoch,
        bootstrap=args.bootstrap,
        version=args.model_version,
        progress=not args.no_progress,
    )


def run_train(args: argparse.Namespace) -> int:
    """`cds-triage train`: 0 on success, 2 on bad input (missing data, wrong checkpoint)."""
    try:
        config = config_from_args(args)
        config.command = "cds-triage " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        train(config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cds-triage evaluate`."""
    parser.add_argument("--task", required=True, choices=TASK_CHOICES)
    parser.add_argument("--data", required=True, type=Path, help="the task's image folder, as given to train")
    parser.add_argument("--weights", type=Path, default=Path("weights"), help="folder with <task>.json and <task>.safetensors")
    parser.add_argument("--out", type=Path, default=None, help="where metrics.json and the PNG plots go (default <weights>/eval/<task>)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-progress", action="store_true")


def run_evaluate(args: argparse.Namespace) -> int:
    """`cds-triage evaluate`: prints the headline metrics; 0 on success, 2 on bad input."""
    from cds_service.core.errors import ModelUnavailableError

    try:
        doc = evaluate(Task(args.task), args.data, args.weights, args.out, args.bootstrap, args.device, not args.no_progress)
    except (FileNotFoundError, ValueError, ModelUnavailableError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    for name in doc["metrics"]:
        print(f"{name}: {format_metric(doc['metrics'], name)}")
    print(f"thresholds: {json.dumps(doc['thresholds'])}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cds_training.training train|evaluate ...` until cli.py wires these in."""
    parser = argparse.ArgumentParser(prog="python -m cds_training.training")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(sub.add_parser("train", help="train a task's model and write its card"))
    add_evaluate_arguments(sub.add_parser("evaluate", help="re-score a model on its validation split"))
    readme = sub.add_parser("readme", help="write weights/README.md from the model cards")
    readme.add_argument("--weights", type=Path, default=Path("weights"))
    refresh = sub.add_parser("recard", help="rewrite a card with this code's card builder (keeps what the run measured)")
    refresh.add_argument("--task", required=True, choices=TASK_CHOICES)
    refresh.add_argument("--data", required=True, type=Path)
    refresh.add_argument("--weights", type=Path, default=Path("weights"))
    refresh.add_argument("--command", dest="command_line", default="", help="the command line that trained it, for the card")
    again = sub.add_parser("rethreshold", help="re-choose a card's operating points from its stored probabilities")
    again.add_argument("--task", required=True, choices=TASK_CHOICES)
    again.add_argument("--target", type=float, required=True, help="sensitivity the validation split must keep")
    again.add_argument("--weights", type=Path, default=Path("weights"))
    profile = sub.add_parser("input-profile", help="fit a task's input profile (out-of-distribution check) and record it in the card")
    profile.add_argument("--task", required=True, choices=TASK_CHOICES)
    profile.add_argument("--data", required=True, type=Path)
    profile.add_argument("--weights", type=Path, default=Path("weights"))
    args = parser.parse_args(argv)
    if args.command == "input-profile":
        print(json.dumps(write_input_profile(args.weights, Task(args.task), args.data), indent=2))
        return 0
    if args.command == "readme":
        path = write_weights_readme(args.weights)
        print(f"wrote {path}")
        return 0
    if args.command == "recard":
        recard(args.weights, Task(args.task), args.data, args.command_line)
        print(f"rewrote {card_path(args.weights, Task(args.task))}")
        return 0
    if args.command == "rethreshold":
        rethreshold(args.weights, Task(args.task), args.target)
        print(f"rewrote {card_path(args.weights, Task(args.task))}")
        return 0
    return run_train(args) if args.command == "train" else run_evaluate(args)


def write_weights_readme(weights_dir: Path) -> Path:
    """weights/README.md from every card there, in task order."""
    cards = [json.loads(card_path(weights_dir, task).read_text()) for task in Task if card_path(weights_dir, task).exists()]
    path = Path(weights_dir) / "README.md"
    path.write_text(weights_readme(cards))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
