# Over 400 lines, to split next (issue #19): model cards, loading in torch and ONNX Runtime, export and the registry.
"""Model cards and weights: load `weights/<task>.json` + `<task>.safetensors` into a network.

The card is the single source of truth for labels, which labels were trained, input
size, preprocessing and operating thresholds. A task without both files is "model
unavailable" — never a randomly initialised network.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cds_service.core.domain import ModelRef, Task, TaskMode, TASK_LABELS
from cds_service.core.errors import ModelUnavailableError
from cds_service.core.input_profile import InputProfile, load_profile
from cds_service.core.preprocessing import PreprocessingSpec

if TYPE_CHECKING:
    from cds_service.core.routing import PixelModel

ARCHITECTURE = "efficientnet_b0"
# timm's EfficientNet-B0 in two paddings: PyTorch's symmetric one, and TensorFlow's "SAME" (with BN eps 1e-3),
# which ImageNet weights trained in TensorFlow (EfficientNet-Lite0, imagenet_init) expect.
ARCHITECTURES = ("efficientnet_b0", "tf_efficientnet_b0")
ACTIVATIONS = ("softmax", "sigmoid")
RUNTIMES = ("auto", "onnxruntime", "torch")
log = logging.getLogger(__name__)
ONNX_MAX_DEVIATION = 1e-3  # largest probability difference from torch accepted at load time
ONNX_EXPORT_FORMAT = "cds-triage-onnx/1"  # change when export_onnx changes: kept graphs are then re-exported
ONNX_EXPORT_TIMEOUT_S = 600


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
    """

    method: PoolingMethod = PoolingMethod.MAX
    window: int = 1

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("series_pooling.window must be at least 1")

    @classmethod
    def from_card(cls, block: dict[str, Any] | None) -> "SeriesPooling":
        if not block:
            return cls()
        return cls(PoolingMethod(block["method"]), int(block.get("window", 1)))

    def to_card(self) -> dict[str, Any]:
        return {"method": self.method.value, "window": self.window}

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
    Grad-CAM needs no backward pass (see `explain.class_activation_map`). A worker's models
    have only those (`network` is None: see `load_exported`).
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


def uses_onnx_runtime(runtime: str, device: str) -> bool:
    """Whether models score in ONNX Runtime: asked for, or "auto" on a CPU."""
    return runtime == "onnxruntime" or (runtime == "auto" and device == "cpu")


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


def export_onnx(network: Any, card: ModelCard) -> bytes:
    """The torch network as an ONNX graph (bytes): probabilities, and for a linear head also the
    last feature map, from which Grad-CAM follows without a backward pass."""
    import io
    import warnings

    import torch

    size = card.preprocessing.input_size
    with_features = linear_head_weights(network) is not None
    module = scoring_module(network, card.activation) if with_features else with_activation(network, card.activation)
    outputs = ["probabilities", "features"] if with_features else ["probabilities"]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        # a file-like object is documented for `f`; torch's annotation names paths only
        torch.onnx.export(module.eval().cpu(), (torch.zeros(1, 3, size, size),), buffer,  # type: ignore[arg-type]
                          input_names=["image"], output_names=outputs, opset_version=17, dynamo=False,
                          dynamic_axes={name: {0: "batch"} for name in ["image", *outputs]})
    return buffer.getvalue()


def open_session(graph: bytes, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session for an exported graph, with this service's thread settings."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (all cores)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep: the
    # worker shares its cores with decoding, the web server and, on small machines, the PACS and FHIR server
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # measured: 100 MB less worker memory for about 8% slower batches
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def onnx_session(network: Any, card: ModelCard, threads: int = 0) -> Any:
    """Export the torch network (in memory) and open it in ONNX Runtime on the CPU.

    Exported from the safetensors weights rather than shipped, so the ONNX graph can never
    drift from the weights the card describes.
    """
    return open_session(export_onnx(network, card), threads)


def weights_digest(weights_dir: Path, task: Task) -> str:
    """Names one exported graph: the weights' and card's bytes and the export format."""
    digest = hashlib.sha256(ONNX_EXPORT_FORMAT.encode())
    digest.update(card_path(weights_dir, task).read_bytes())
    with weights_path(weights_dir, task).open("rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


def shipped_graph_path(weights_dir: Path, task: Task) -> Path:
    return Path(weights_dir) / f"{task.value}.onnx"


def shipped_graph(weights_dir: Path, task: Task, card: ModelCard) -> Path | None:
    """The ONNX graph committed beside the weights (`cds-triage export`), when the card vouches for
    it: the graph's sha256, the weights it was exported from and the export format all match.
    None otherwise; a graph present but not vouched for is logged, never used."""
    block = card.raw.get("onnx") or {}
    path = shipped_graph_path(weights_dir, task)
    if not block or not path.exists():
        return None
    problem = ""
    if block.get("export_format") != ONNX_EXPORT_FORMAT:
        problem = f"exported as {block.get('export_format')}, this code reads {ONNX_EXPORT_FORMAT}"
    elif block.get("weights_sha256") != card.raw.get("weights_sha256"):
        problem = "exported from other weights than the card's"
    elif hashlib.sha256(path.read_bytes()).hexdigest() != block.get("sha256"):
        problem = "its sha256 differs from the card's"
    if problem:
        log.warning("ignoring %s: %s (run cds-triage export)", path, problem)
        return None
    return path


def write_shipped_graph(weights_dir: Path, task: Task) -> dict[str, Any]:
    """`cds-triage export`: export the task's graph from its safetensors (in a child process that
    checks it against torch) to weights/<task>.onnx, and record it in the card's `onnx` block."""
    cpath = card_path(weights_dir, task)
    target = shipped_graph_path(weights_dir, task)
    export_in_child(weights_dir, task, target)
    card = json.loads(cpath.read_text())
    card["onnx"] = {"file": target.name, "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
                    "export_format": ONNX_EXPORT_FORMAT, "weights_sha256": card.get("weights_sha256"),
                    "checked": f"probabilities and feature map within {ONNX_MAX_DEVIATION} of torch on a test batch",
                    "opset": 17}
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    return card["onnx"]


def export_in_child(weights_dir: Path, task: Task, target: Path) -> None:
    """`python -m cds_service.onnx_export`: imports torch, exports, checks the graph against torch,
    writes `target` whole and exits, so the process that scores never imports torch."""
    package_root = str(Path(__file__).resolve().parents[2])  # the folder that holds cds_service
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-m", "cds_service.onnx_export", str(weights_dir), task.value, str(target)],
                           capture_output=True, text=True, env=env, timeout=ONNX_EXPORT_TIMEOUT_S)
    if child.returncode != 0 or not target.exists():
        raise RuntimeError(f"ONNX export failed ({child.returncode}): {child.stderr.strip()[-500:]}")


def exported_graph(weights_dir: Path, task: Task, onnx_dir: Path | None) -> Path:
    """The ONNX graph of these exact weights: the one shipped in weights/ when its card vouches for
    it, else exported once in a child process (which needs torch) and kept in `onnx_dir`.

    Measured here, torch and timm are 650 MB of a worker's resident memory; with a shipped graph
    a worker (and `cds-triage triage`) never imports them, and a runtime install needs no torch.
    """
    shipped = shipped_graph(weights_dir, task, ModelCard.load(card_path(weights_dir, task)))
    if shipped is not None:
        return shipped
    if onnx_dir is None:
        raise RuntimeError(f"no ONNX graph shipped for {task.value} (cds-triage export) and nowhere to export one")
    target = onnx_dir / f"{task.value}-{weights_digest(weights_dir, task)}.onnx"
    if target.exists():
        return target
    onnx_dir.mkdir(parents=True, exist_ok=True)
    export_in_child(weights_dir, task, target)
    prune_exported(onnx_dir, task, keep=target)
    return target


def prune_exported(onnx_dir: Path, task: Task, keep: Path, now: float | None = None) -> list[Path]:
    """Remove the task's graphs of other weights versions, and exports a dead process left half
    written, so CDS_DATA_DIR does not grow by ~20 MB with every retraining. A worker still
    running older weights has its graph in memory; if it restarts, it exports it again."""
    now = time.time() if now is None else now
    removed = []
    for path in onnx_dir.glob(f"{task.value}-*"):
        graph = re.fullmatch(rf"{re.escape(task.value)}-[0-9a-f]{{20}}\.onnx", path.name)
        partial = re.fullmatch(rf"{re.escape(task.value)}-[0-9a-f]{{20}}\.onnx\.\d+\.partial", path.name)
        try:
            if (graph and path != keep) or (partial and now - path.stat().st_mtime > ONNX_EXPORT_TIMEOUT_S):
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # another worker pruned it first
            continue
    return removed


def load_exported(weights_dir: Path, task: Task, card: ModelCard, onnx_dir: Path | None, threads: int) -> LoadedModel | None:
    """A torch-free model: the exported graph scores and gives Grad-CAM's feature map, and the
    classifier weights come straight from the safetensors. None (load with torch) if the export
    fails or the head needs a backward pass for Grad-CAM."""
    from safetensors import safe_open

    try:
        session = open_session(exported_graph(weights_dir, task, onnx_dir).read_bytes(), threads)
    except Exception as exc:  # noqa: BLE001 - exporter, child process and runtime raise many kinds
        log.warning("ONNX Runtime unavailable for %s (%s); scoring with torch", card.name, exc)
        return None
    with safe_open(str(weights_path(weights_dir, task)), framework="np") as weights:  # reads only this tensor
        classifier = weights.get_tensor("classifier.weight") if "classifier.weight" in weights.keys() else None
    if [output.name for output in session.get_outputs()] != ["probabilities", "features"] or classifier is None:
        return None
    return LoadedModel(card=card, network=None, session=session, cam_weights=classifier.astype(np.float32))


def load_model(weights_dir: Path, task: Task, device: str = "cpu", runtime: str = "torch",
               threads: int = 0, onnx_dir: Path | None = None) -> LoadedModel:
    """Read card and safetensors; ModelUnavailableError if either is missing or mismatched.

    runtime "onnxruntime" (or "auto" on a CPU) also opens an ONNX Runtime session for
    scoring, after checking on a test batch that it agrees with torch. With the graph shipped
    in weights/ (`cds-triage export`, vouched for by the card), or with `onnx_dir` (the
    worker's: the graph is exported in a child process and kept there), this process does not
    import torch at all (`load_exported`).
    """
    check_runtime(runtime)
    card = ModelCard.load(card_path(weights_dir, task))
    wpath = weights_path(weights_dir, task)
    if not wpath.exists():
        raise ModelUnavailableError(f"model unavailable: no trained weights for {task.value} at {wpath}")
    wants_onnx = uses_onnx_runtime(runtime, device)
    if wants_onnx and (onnx_dir is not None or shipped_graph(weights_dir, task, card) is not None):
        exported = load_exported(weights_dir, task, card, onnx_dir, threads)
        if exported is not None:
            return exported

    try:
        import torch
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ModelUnavailableError(
            f"model unavailable: {task.value} needs torch (CDS_INFERENCE_RUNTIME={runtime}, or no ONNX graph shipped "
            f"for these weights): install the torch extra (pip install '.[torch]') or run cds-triage export") from exc

    if threads:
        torch.set_num_threads(threads)  # process-wide: fewer when several workers share the cores
    network = create_network(len(card.labels), card.architecture)
    try:
        state = load_file(str(wpath))
        network.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as exc:
        raise ModelUnavailableError(f"weights {wpath} do not fit card {card.name}: {exc}") from exc
    network.eval().to(device).to(memory_format=torch.channels_last)
    model = LoadedModel(card=card, network=network, device=device)
    if wants_onnx:
        model.session = checked_onnx_session(model, threads)
        if model.session is not None and len(model.session.get_outputs()) > 1:
            model.cam_weights = linear_head_weights(network)
    return model


def checked_onnx_session(model: LoadedModel, threads: int) -> Any:
    """An ONNX Runtime session that agrees with torch on a test batch, else None (torch scores).

    Both outputs are checked: the probabilities, and the feature map Grad-CAM is computed from.
    Falling back keeps triage running on a machine where the export or the runtime fails.
    """
    try:
        session = onnx_session(model.network, model.card, threads)
        deviation = onnx_deviation(model, session)
    except Exception as exc:  # exporter and runtime raise many kinds
        log.warning("ONNX Runtime unavailable for %s (%s); scoring with torch", model.card.name, exc)
        return None
    if deviation > ONNX_MAX_DEVIATION:
        log.warning("ONNX Runtime disagrees with torch for %s by %.2g; scoring with torch", model.card.name, deviation)
        return None
    return session


def onnx_deviation(model: LoadedModel, session: Any) -> float:
    """Largest difference between the session and the torch network on a test batch: in the
    probabilities, and in the feature map (relative to its scale) where the graph returns it."""
    import torch

    size = model.card.preprocessing.input_size
    check = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    outputs = session.run(None, {"image": check})
    deviation = float(np.abs(outputs[0] - model.predict_torch(check)).max())
    if len(outputs) > 1:
        with torch.inference_mode():
            features = model.network.forward_features(torch.from_numpy(check).to(model.device)).float().cpu().numpy()
        scale = max(1.0, float(np.abs(features).max()))
        deviation = max(deviation, float(np.abs(outputs[1] - features).max()) / scale)
    return deviation


class CardAdjustment(Protocol):
    """What changes a loaded card (site_thresholds.SiteThresholds: a site's own thresholds). A protocol, so
    this module need not import site_thresholds, which reads cards from here."""

    def apply(self, card: ModelCard) -> ModelCard: ...


class ModelRegistry:
    """Loads each task's model once per process, on first use, and keeps it.

    `onnx_dir` (a worker's): where exported graphs are kept, so the process need not import torch.
    """

    def __init__(self, weights_dir: Path, device: str = "cpu", runtime: str = "torch", threads: int = 0,
                 onnx_dir: Path | None = None, site_thresholds: "CardAdjustment | None" = None) -> None:
        check_runtime(runtime)  # at start-up, not at the first study
        self.weights_dir = weights_dir
        self.site_thresholds = site_thresholds  # CDS_SITE_THRESHOLDS: a site's own thresholds replace the card's
        self.device = device
        self.runtime = runtime
        self.threads = threads
        self.onnx_dir = onnx_dir
        self._models: dict[Task, LoadedModel] = {}
        self._profiles: dict[Task, InputProfile | None] = {}
        self._lock = threading.Lock()

    def input_profile(self, task: Task) -> "InputProfile | None":
        """The task's input profile (out-of-distribution check), if its card names one; loaded once.
        ModelUnavailableError when the card names a profile that is missing or does not match it."""
        with self._lock:
            if task not in self._profiles:
                card = ModelCard.load(card_path(self.weights_dir, task))
                try:
                    self._profiles[task] = load_profile(self.weights_dir, task.value, card.raw)
                except (OSError, ValueError) as exc:
                    raise ModelUnavailableError(f"input profile of {task.value}: {exc}") from exc
            return self._profiles[task]

    def pixel_models(self) -> "dict[Task, PixelModel]":
        """What routing by pixels needs of every task with a card here (no network is loaded)."""
        from cds_service.core.routing import PixelModel

        found = {}
        for task, card in available_cards(self.weights_dir).items():
            try:
                found[task] = PixelModel(spec=card.preprocessing, profile=self.input_profile(task))
            except ModelUnavailableError:
                continue  # the task's own triage will report it
        return found

    def get(self, task: Task) -> LoadedModel:
        with self._lock:  # worker threads asking at once load (and export) once
            if task not in self._models:
                model = load_model(self.weights_dir, task, self.device, self.runtime, self.threads, self.onnx_dir)
                if self.site_thresholds is not None:
                    model.card = self.site_thresholds.apply(model.card)
                self._models[task] = model
            return self._models[task]
