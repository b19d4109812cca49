"""Model cards and weights: load `weights/<task>.json` + `<task>.safetensors` into a network.

The card is the single source of truth for labels, which labels were trained, input
size, preprocessing and operating thresholds. A task without both files is "model
unavailable" — never a randomly initialised network.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .domain import ModelRef, Task, TASK_LABELS
from .errors import ModelUnavailableError
from .preprocessing import PreprocessingSpec

ARCHITECTURE = "efficientnet_b0"
ACTIVATIONS = ("softmax", "sigmoid")
RUNTIMES = ("auto", "onnxruntime", "torch")
log = logging.getLogger(__name__)
ONNX_MAX_DEVIATION = 1e-3  # largest probability difference from torch accepted at load time


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
    """A card and its network in eval mode, ready for batched inference.

    `session`, when set, is an ONNX Runtime session holding the same weights: it scores
    batches about twice as fast as eager torch on a CPU. The torch network stays for
    Grad-CAM when the session cannot give it (see `cam_weights`).

    `cam_weights` (labels x channels), when set, are the classifier weights of a global
    average pooling + linear head, and the session also returns the last feature map: then
    Grad-CAM needs no backward pass (see `explain.class_activation_map`).
    """

    card: ModelCard
    network: Any
    device: str = "cpu"
    session: Any = None
    cam_weights: np.ndarray | None = None
    # Grad-CAM's backward pass writes the network's parameter gradients, which zero_grad() frees:
    # two worker threads doing it at once on the shared network corrupted the heap (measured:
    # an abort within a few hundred concurrent explanations). One at a time per model.
    gradient_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self.session is not None else "torch"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """NCHW float32 batch → N x labels probabilities (softmax or sigmoid per the card)."""
        return self.predict_with_features(batch)[0]

    def predict_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and, where `cam_weights` is set, the last feature map (N x C x h x w)."""
        if self.session is None:
            return self.predict_torch(batch), None
        outputs = self.session.run(None, {"image": np.ascontiguousarray(batch, dtype=np.float32)})
        return outputs[0], (outputs[1] if self.cam_weights is not None and len(outputs) > 1 else None)

    def predict_torch(self, batch: np.ndarray) -> np.ndarray:
        """The same, always with the torch network (the reference for the ONNX session)."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device).contiguous(memory_format=torch.channels_last)
            probs = with_activation(self.network, self.card.activation)(x).float()
        return probs.cpu().numpy()


def check_runtime(runtime: str) -> None:
    """ValueError for an inference runtime this service does not know."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown inference runtime {runtime!r} (CDS_INFERENCE_RUNTIME); one of {', '.join(RUNTIMES)}")


def with_activation(network: Any, activation: str) -> Any:
    """Network + the card's activation as one module: it outputs probabilities."""
    import torch

    return torch.nn.Sequential(network, torch.nn.Softmax(dim=1) if activation == "softmax" else torch.nn.Sigmoid())


def linear_head_weights(network: Any) -> np.ndarray | None:
    """Classifier weights (labels x channels) if the head is global average pooling + one Linear.

    For such a head the gradient of label c's logit with respect to the last feature map is
    W[c, k] / (h w) at every position of channel k, so Grad-CAM's channel weights are known
    without a backward pass. timm's EfficientNet-B0 has this head; anything else gets None.
    """
    import torch

    pool, classifier = getattr(network, "global_pool", None), getattr(network, "classifier", None)
    if (getattr(pool, "pool_type", None) != "avg" or not isinstance(classifier, torch.nn.Linear)
            or not all(hasattr(network, name) for name in ("forward_features", "forward_head"))):
        return None
    return classifier.weight.detach().float().cpu().numpy().copy()


def scoring_module(network: Any, activation: str) -> Any:
    """What is exported to ONNX: probabilities and the last feature map (the Grad-CAM layer)."""
    import torch

    class ScoresAndFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network
            self.activation = torch.nn.Softmax(dim=1) if activation == "softmax" else torch.nn.Sigmoid()

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.network.forward_features(image)
            return self.activation(self.network.forward_head(features)), features

    return ScoresAndFeatures()


def onnx_session(network: Any, card: ModelCard, threads: int = 0) -> Any:
    """Export the torch network (in memory) and open it in ONNX Runtime on the CPU.

    Exported at load time rather than shipped, so the ONNX graph can never drift from the
    safetensors weights the card describes. For a linear head it also outputs the last
    feature map, from which Grad-CAM follows without a backward pass.
    """
    import io
    import warnings

    import onnxruntime
    import torch

    size = card.preprocessing.input_size
    with_features = linear_head_weights(network) is not None
    module = scoring_module(network, card.activation) if with_features else with_activation(network, card.activation)
    outputs = ["probabilities", "features"] if with_features else ["probabilities"]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(module.eval(), (torch.zeros(1, 3, size, size),), buffer,
                          input_names=["image"], output_names=outputs, opset_version=17, dynamo=False,
                          dynamic_axes={name: {0: "batch"} for name in ["image", *outputs]})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (all cores)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep: the
    # worker shares its cores with Grad-CAM, the web server and, on small machines, the PACS and FHIR server
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # measured: 100 MB less worker memory for about 8% slower batches
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def load_model(weights_dir: Path, task: Task, device: str = "cpu", runtime: str = "torch",
               threads: int = 0) -> LoadedModel:
    """Read card and safetensors; ModelUnavailableError if either is missing or mismatched.

    runtime "onnxruntime" (or "auto" on a CPU) also opens an ONNX Runtime session for
    scoring, after checking on a test batch that it agrees with torch.
    """
    import torch
    from safetensors.torch import load_file

    check_runtime(runtime)
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
    model = LoadedModel(card=card, network=network, device=device)
    if runtime == "onnxruntime" or (runtime == "auto" and device == "cpu"):
        model.session = checked_onnx_session(model, threads)
        if model.session is not None and len(model.session.get_outputs()) > 1:
            model.cam_weights = linear_head_weights(network)
    return model


def checked_onnx_session(model: LoadedModel, threads: int) -> Any:
    """An ONNX Runtime session that agrees with torch on a test batch, else None (torch scores).

    Both outputs are checked: the probabilities, and the feature map Grad-CAM is computed from.
    Falling back keeps triage running on a machine where the export or the runtime fails.
    """
    import torch

    size = model.card.preprocessing.input_size
    check = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    try:
        session = onnx_session(model.network, model.card, threads)
        outputs = session.run(None, {"image": check})
        deviation = float(np.abs(outputs[0] - model.predict_torch(check)).max())
        if len(outputs) > 1:
            with torch.inference_mode():
                features = model.network.forward_features(torch.from_numpy(check).to(model.device)).float().cpu().numpy()
            scale = max(1.0, float(np.abs(features).max()))
            deviation = max(deviation, float(np.abs(outputs[1] - features).max()) / scale)
    except Exception as exc:  # exporter and runtime raise many kinds
        log.warning("ONNX Runtime unavailable for %s (%s); scoring with torch", model.card.name, exc)
        return None
    if deviation > ONNX_MAX_DEVIATION:
        log.warning("ONNX Runtime disagrees with torch for %s by %.2g; scoring with torch", model.card.name, deviation)
        return None
    return session


class ModelRegistry:
    """Loads each task's model once per process, on first use, and keeps it."""

    def __init__(self, weights_dir: Path, device: str = "cpu", runtime: str = "torch", threads: int = 0) -> None:
        check_runtime(runtime)  # at start-up, not at the first study
        self.weights_dir = weights_dir
        self.device = device
        self.runtime = runtime
        self.threads = threads
        self._models: dict[Task, LoadedModel] = {}

    def get(self, task: Task) -> LoadedModel:
        if task not in self._models:
            self._models[task] = load_model(self.weights_dir, task, self.device, self.runtime, self.threads)
        return self._models[task]
