"""A model loaded to score: the card's network in torch, or its ONNX graph in ONNX Runtime (checked
against torch when both are there), and the per-process registry that loads each task's model once.
Cards: model_cards.py; the graph files: onnx_graphs.py.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cds_service.core.domain import Task
from cds_service.core.errors import ModelUnavailableError
from cds_service.core.input_profile import InputProfile, load_profile
from cds_service.core.model_cards import ARCHITECTURE, ModelCard, available_cards, card_path, weights_path
from cds_service.core.onnx_graphs import ONNX_MAX_DEVIATION, exported_graph, shipped_graph

if TYPE_CHECKING:
    from cds_service.core.routing import PixelModel

RUNTIMES = ("auto", "onnxruntime", "torch")
log = logging.getLogger(__name__)


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


_shared_arena_lock = threading.Lock()
_shared_arena: bool | None = None  # None: not yet tried; False: this ONNX Runtime cannot share one


def shared_cpu_arena() -> bool:
    """Register one CPU memory arena for every session of this process (once), so the head CT,
    brain and chest models reuse the same activation memory instead of keeping three.

    Measured (bench/onnx_arena.py, bench/README.md): the three models run in turn peak at 485 MiB
    with one shared arena, 747 MiB with one arena each and 393 MiB with none; without an arena
    every batch is slower (head CT 4-53% in four runs), and shared or not is as fast. False if
    this ONNX Runtime cannot register one (each session then keeps its own).
    """
    global _shared_arena
    with _shared_arena_lock:
        if _shared_arena is None:
            import onnxruntime

            try:
                cpu = onnxruntime.OrtMemoryInfo("Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                                onnxruntime.OrtMemType.DEFAULT)
                onnxruntime.create_and_register_allocator(cpu, onnxruntime.OrtArenaCfg(0, -1, -1, -1))
                _shared_arena = True
            except (AttributeError, RuntimeError) as exc:  # older runtimes; a failed registration
                log.warning("ONNX Runtime cannot share one memory arena between models (%s); each keeps its own", exc)
                _shared_arena = False
        return _shared_arena


class Arena(StrEnum):
    """Where a session keeps its activations' memory between batches (bench/onnx_arena.py compares them)."""

    SHARED = "shared"  # one arena for every session of the process: the service's
    OWN = "own"  # one per session, ONNX Runtime's default
    NONE = "none"  # none: every batch allocates afresh (the service before 2026-12-03)


def open_session(graph: bytes, threads: int = 0, arena: Arena = Arena.SHARED) -> Any:
    """An ONNX Runtime CPU session for an exported graph, with this service's thread settings."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (all cores)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep: the
    # worker shares its cores with decoding, the web server and, on small machines, the PACS and FHIR server
    options.log_severity_level = 3
    # An arena keeps the activations' memory between batches. Without one every batch maps and
    # faults in its ~280 MB afresh: on 2 AMD cores a 300-slice study's worker CPU was up to
    # twice as high and bimodal (bench/README.md, "Where a 300-slice study's CPU goes").
    options.enable_cpu_mem_arena = arena is not Arena.NONE
    if arena is Arena.SHARED and shared_cpu_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def onnx_session(network: Any, card: ModelCard, threads: int = 0) -> Any:
    """Export the torch network (in memory) and open it in ONNX Runtime on the CPU.

    Exported from the safetensors weights rather than shipped, so the ONNX graph can never
    drift from the weights the card describes.
    """
    return open_session(export_onnx(network, card), threads)


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
    """What changes a loaded card and input profile (site_thresholds.SiteThresholds: a site's own thresholds
    and familiarity distances). A protocol, so this module need not import site_thresholds, which reads cards
    from here."""

    def apply(self, card: ModelCard) -> ModelCard: ...

    def adjust_profile(self, task: Task, profile: InputProfile | None) -> InputProfile | None: ...


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
                    profile = load_profile(self.weights_dir, task.value, card.raw)
                except (OSError, ValueError) as exc:
                    raise ModelUnavailableError(f"input profile of {task.value}: {exc}") from exc
                if self.site_thresholds is not None:  # CDS_SITE_THRESHOLDS: the site's familiarity distances
                    profile = self.site_thresholds.adjust_profile(task, profile)
                self._profiles[task] = profile
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
