"""The training loop: augmentation, the network, AdamW with warm-up + cosine, EMA, early stopping, resumable checkpoints."""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cds_service.core.domain import TASK_LABELS
from cds_service.core.model_cards import ARCHITECTURE
from cds_service.core.models import create_network
from cds_service.core.preprocessing import PreprocessingSpec

from .cards import _finish
from .config import TrainConfig, TrainResult, _log, set_threads
from .datasets import (
    Sample,
    build_split,
    extra_labelled,
    probable_negatives,
    resolve_data_dir,
)
from .pixels import preprocess_samples
from .predictions import _prob_loss, as_predictions, network_probs, validation_score
from .tasks import Augmentation, default_spec


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


def _split_digest(val: Sequence[Sample]) -> str:
    return hashlib.sha256("\n".join(s.rel for s in val).encode()).hexdigest()[:16]


def with_extra_training_data(config: TrainConfig, train_set: list[Sample]) -> list[Sample]:
    """The training split with the extra sources the config names (probable negatives, another labelled
    set): one place, so `train` and `recard` count the same images."""
    if config.extra_negatives is not None:
        train_set = train_set + probable_negatives(config.task, config.extra_negatives, config.extra_negatives_part)
    if config.extra_data is not None:
        train_set = train_set + extra_labelled(config.task, config.extra_data)
    return train_set


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
