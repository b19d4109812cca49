"""Model cards and weights: load `weights/<task>.json` + `<task>.safetensors` into a network.

The card is the single source of truth for labels, which labels were trained, input
size, preprocessing and operating thresholds. A task without both files is "model
unavailable" — never a randomly initialised network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .domain import ModelRef, Task, TASK_LABELS
from .errors import ModelUnavailableError
from .preprocessing import PreprocessingSpec

ARCHITECTURE = "efficientnet_b0"
ACTIVATIONS = ("softmax", "sigmoid")


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
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if set(self.labels) != set(TASK_LABELS[self.task]):
            raise ValueError(f"card labels {self.labels} do not match task {self.task.value}")
        if not set(self.trained_labels) <= set(self.labels):
            raise ValueError("trained_labels must be a subset of labels")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}")
        missing = [label for label in self.trained_labels if label not in self.thresholds]
        if missing:
            raise ValueError(f"no operating threshold for trained labels {missing}")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds.values()):
            raise ValueError("thresholds must lie in [0, 1]")

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


def model_set_version(weights_dir: Path) -> str:
    """One string naming every loaded model version: part of a job's de-duplication key."""
    cards = available_cards(weights_dir)
    return ";".join(f"{c.name}@{c.version}" for _, c in sorted(cards.items(), key=lambda kv: kv[0].value)) or "none"


def create_network(num_classes: int, architecture: str = ARCHITECTURE) -> Any:
    """An untrained timm network of the card's architecture (weights are loaded after)."""
    import timm

    return timm.create_model(architecture, pretrained=False, num_classes=num_classes, in_chans=3)


@dataclass
class LoadedModel:
    """A card and its network in eval mode, ready for batched inference."""

    card: ModelCard
    network: Any
    device: str = "cpu"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """NCHW float32 batch → N x labels probabilities (softmax or sigmoid per the card)."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device).contiguous(memory_format=torch.channels_last)
            logits = self.network(x).float()
            probs = torch.softmax(logits, 1) if self.card.activation == "softmax" else torch.sigmoid(logits)
        return probs.cpu().numpy()


def load_model(weights_dir: Path, task: Task, device: str = "cpu") -> LoadedModel:
    """Read card and safetensors; ModelUnavailableError if either is missing or mismatched."""
    import torch
    from safetensors.torch import load_file

    card = ModelCard.load(card_path(weights_dir, task))
    wpath = weights_path(weights_dir, task)
    if not wpath.exists():
        raise ModelUnavailableError(f"model unavailable: no trained weights for {task.value} at {wpath}")
    network = create_network(len(card.labels), card.architecture)
    try:
        state = load_file(str(wpath))
        network.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as exc:
        raise ModelUnavailableError(f"weights {wpath} do not fit card {card.name}: {exc}") from exc
    network.eval().to(device).to(memory_format=torch.channels_last)
    return LoadedModel(card=card, network=network, device=device)


class ModelRegistry:
    """Loads each task's model once per process, on first use, and keeps it."""

    def __init__(self, weights_dir: Path, device: str = "cpu") -> None:
        self.weights_dir = weights_dir
        self.device = device
        self._models: dict[Task, LoadedModel] = {}

    def get(self, task: Task) -> LoadedModel:
        if task not in self._models:
            self._models[task] = load_model(self.weights_dir, task, self.device)
        return self._models[task]
