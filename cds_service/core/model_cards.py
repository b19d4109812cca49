"""Model cards and the files beside them: `weights/<task>.json` read into a `ModelCard`, where a task's
card and weights are, which tasks have both, and the version of the whole model set.

The card is the single source of truth for labels, which labels were trained, input
size, preprocessing and operating thresholds. A task without both files is "model
unavailable" — never a randomly initialised network.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cds_service.core.domain import TASK_LABELS, ModelRef, Task, TaskMode
from cds_service.core.errors import ModelUnavailableError
from cds_service.core.preprocessing import PreprocessingSpec

ARCHITECTURE = "efficientnet_b0"
# timm's EfficientNet-B0 in two paddings: PyTorch's symmetric one, and TensorFlow's "SAME" (with BN eps 1e-3),
# which ImageNet weights trained in TensorFlow (EfficientNet-Lite0, imagenet_init) expect.
ARCHITECTURES = ("efficientnet_b0", "tf_efficientnet_b0")
ACTIVATIONS = ("softmax", "sigmoid")


class PoolingMethod(str, enum.Enum):
    """How a series' slice probabilities become the study's probability."""

    MAX = "max"  # any slice: single images, and cards from before series pooling
    ADJACENT_MEAN = "adjacent_mean"  # the best run of `window` neighbouring slices, averaged


@dataclass(frozen=True)
class SeriesPooling:
    """A card's `series_pooling` block. Slices must be in anatomical order for adjacency to mean anything.

    `adjacent_mean` asks neighbouring slices to agree: a bleed spans several 5 mm slices, while a
    single slice's spike (a beam-hardening streak at the skull base, the head rest) does not.
    A series shorter than `window` falls back to its mean (one image: that image's score).

    `slab_mm`: the slice thickness the model was trained on. A thin-slice series is read as slabs of
    about that thickness, each the mean in HU of the slices it covers (`core.slabs`), so that the
    model and the `window` of neighbours see ~5 mm slices as in training. None: slice by slice.
    """

    method: PoolingMethod = PoolingMethod.MAX
    window: int = 1
    slab_mm: float | None = None

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("series_pooling.window must be at least 1")
        if self.slab_mm is not None and not (np.isfinite(self.slab_mm) and self.slab_mm > 0):
            raise ValueError("series_pooling.slab_mm must be a positive number of millimetres (or absent)")

    @classmethod
    def from_card(cls, block: dict[str, Any] | None) -> "SeriesPooling":
        if not block:
            return cls()
        slab = block.get("slab_mm")
        return cls(PoolingMethod(block["method"]), int(block.get("window", 1)), None if slab is None else float(slab))

    def to_card(self) -> dict[str, Any]:
        block: dict[str, Any] = {"method": self.method.value, "window": self.window}
        if self.slab_mm is not None:
            block["slab_mm"] = self.slab_mm
        return block

    def _runs(self, column: np.ndarray) -> np.ndarray | None:
        """The mean of every run of `window` neighbouring slices; None where the maximum rules."""
        if self.method is PoolingMethod.MAX or self.window == 1 or len(column) <= self.window:
            return None
        return np.convolve(column, np.ones(self.window) / self.window, mode="valid")

    def pool(self, per_slice: np.ndarray) -> np.ndarray:
        """slices x labels → labels."""
        per_slice = np.asarray(per_slice)
        if self.method is not PoolingMethod.MAX and self.window > 1 and len(per_slice) <= self.window:
            return per_slice.mean(axis=0)
        runs = [self._runs(per_slice[:, j]) for j in range(per_slice.shape[1])]
        return np.array([per_slice[:, j].max() if r is None else r.max() for j, r in enumerate(runs)])

    def driving_slice(self, column: np.ndarray) -> int:
        """The slice that gave the study its score: the top slice of the best run (or the top slice)."""
        runs = self._runs(np.asarray(column))
        if runs is None:
            return int(np.argmax(column))
        start = int(np.argmax(runs))
        return start + int(np.argmax(column[start : start + self.window]))


@dataclass(frozen=True)
class ModelCard:
    """The parts of a model card that inference depends on, validated; `raw` keeps the rest."""

    task: Task
    name: str
    version: str
    labels: tuple[str, ...]
    trained_labels: tuple[str, ...]
    activation: str
    preprocessing: PreprocessingSpec
    thresholds: dict[str, float]
    architecture: str = ARCHITECTURE
    series_pooling: "SeriesPooling" = field(default_factory=lambda: SeriesPooling())
    # trained labels whose positive finding may raise an order's priority on its own; a label that
    # missed its bar on the card's test split is still reported (with its probability) but is not here
    priority_labels: tuple[str, ...] | None = None
    # softmax with a negative class: raise when 1 - p(negative) reaches this ("is anything there?"),
    # naming the most probable positive class; None: each class against its own threshold
    presence_threshold: float | None = None
    # what a site gets unless CDS_TASK_MODES says otherwise: shadow for a model short of its bar
    default_mode: TaskMode = TaskMode.ACTIVE
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # label -> which site threshold replaced the card's, in words (site_thresholds.py); empty: the card's own
    threshold_sources: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if set(self.labels) != set(TASK_LABELS[self.task]):
            raise ValueError(f"card labels {self.labels} do not match task {self.task.value}")
        if not set(self.trained_labels) <= set(self.labels):
            raise ValueError("trained_labels must be a subset of labels")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}")
        missing = [label for label in self.trained_labels if label not in self.thresholds]
        if missing:
            raise ValueError(f"no operating threshold for trained labels {missing}")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds.values()):
            raise ValueError("thresholds must lie in [0, 1]")
        if self.presence_threshold is not None and (self.activation != "softmax" or not 0.0 <= self.presence_threshold <= 1.0):
            raise ValueError("presence.threshold needs a softmax card and a value in [0, 1]")
        if self.priority_labels is not None and not set(self.priority_labels) <= set(self.trained_labels):
            raise ValueError("priority_labels must be trained labels")

    def may_raise_priority(self, label: str) -> bool:
        return label in (self.trained_labels if self.priority_labels is None else self.priority_labels)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.version)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        try:
            return cls(
                task=Task(data["task"]),
                name=str(data["name"]),
                version=str(data["version"]),
                labels=tuple(data["labels"]),
                trained_labels=tuple(data.get("trained_labels", data["labels"])),
                activation=str(data["activation"]),
                preprocessing=PreprocessingSpec.from_card(data["preprocessing"], data["input_size"]),
                thresholds={str(k): float(v) for k, v in data["thresholds"].items()},
                architecture=str(data.get("architecture", ARCHITECTURE)),
                series_pooling=SeriesPooling.from_card(data.get("series_pooling")),
                priority_labels=tuple(data["priority_labels"]) if "priority_labels" in data else None,
                presence_threshold=float(data["presence"]["threshold"]) if data.get("presence") else None,
                default_mode=TaskMode(data.get("default_mode", "active")),
                raw=data,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelUnavailableError(f"invalid model card: {exc}") from exc

    @classmethod
    def load(cls, path: Path) -> "ModelCard":
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise ModelUnavailableError(f"no model card at {path}") from exc
        except json.JSONDecodeError as exc:
            raise ModelUnavailableError(f"model card {path} is not JSON: {exc}") from exc


def card_path(weights_dir: Path, task: Task) -> Path:
    return weights_dir / f"{task.value}.json"


def weights_path(weights_dir: Path, task: Task) -> Path:
    return weights_dir / f"{task.value}.safetensors"


def available_cards(weights_dir: Path) -> dict[Task, ModelCard]:
    """Cards of the tasks that have both a card and weights (cheap: no torch needed)."""
    cards: dict[Task, ModelCard] = {}
    for task in Task:
        if card_path(weights_dir, task).exists() and weights_path(weights_dir, task).exists():
            try:
                cards[task] = ModelCard.load(card_path(weights_dir, task))
            except ModelUnavailableError:
                continue
    return cards


def task_modes(settings_modes: dict[Task, TaskMode] | Any, weights_dir: Path) -> dict[str, str]:
    """Each task's mode at this site: CDS_TASK_MODES, else its card's default; tasks without weights say so."""
    cards = available_cards(weights_dir)
    out = {}
    for task in Task:
        card = cards.get(task)
        default = card.default_mode if card is not None else TaskMode.ACTIVE
        mode = settings_modes.get(task, default)
        out[task.value] = mode.value if card is not None or mode is TaskMode.OFF else f"{mode.value} (no weights)"
    return out


def model_set_version(weights_dir: Path) -> str:
    """One string naming every loaded model version: part of a job's de-duplication key."""
    cards = available_cards(weights_dir)
    return ";".join(f"{c.name}@{c.version}" for _, c in sorted(cards.items(), key=lambda kv: kv[0].value)) or "none"
