"""A training run's configuration (everything it depends on, stored in the checkpoint and the card) and the machine it ran on."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cds_service.core.domain import Task
from cds_service.core.model_cards import ARCHITECTURE
from cds_service.core.preprocessing import Framing

from .datasets import (
    SIMILARITY_THRESHOLD,
)
from .tasks import CARD_VERSION, TaskSetup, setup_for


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


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
