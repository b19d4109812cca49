"""`cds-triage train` / `evaluate` and `python -m cds_training.training` (readme, recard, rethreshold, input-profile,
external-check, shift-check)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

from cds_service.core.domain import Task
from cds_service.core.evaluation import (
    format_metric,
)
from cds_service.core.model_cards import ARCHITECTURE, ARCHITECTURES, card_path
from cds_service.core.preprocessing import Framing

from .cards import write_weights_readme
from .config import TrainConfig
from .external import EXTERNAL_SOURCES, external_check
from .input_check import write_input_profile
from .loop import train
from .recard import evaluate, recard, rethreshold
from .shift_check import SHIFT_TASKS, shift_check
from .tasks import CARD_VERSION

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
    external = sub.add_parser("external-check", help="score a task's labelled set from another source (never trained on) into its card")
    external.add_argument("--task", required=True, choices=[t.value for t in EXTERNAL_SOURCES])
    external.add_argument("--data", required=True, type=Path, help="the shared data folder (the source's folder is below it)")
    external.add_argument("--weights", type=Path, default=Path("weights"))
    external.add_argument("--note", default="", help="how the set was used besides, said beside its figures in the card")
    shifted = sub.add_parser("shift-check", help="re-score a task's test split re-made as other scanners might make it, into its card")
    shifted.add_argument("--task", required=True, choices=[t.value for t in SHIFT_TASKS])
    shifted.add_argument("--data", required=True, type=Path, help="the shared data folder (the task's folder is below it)")
    shifted.add_argument("--weights", type=Path, default=Path("weights"))
    args = parser.parse_args(argv)
    if args.command == "shift-check":
        task = Task(args.task)
        print(json.dumps(shift_check(args.weights, task, args.data / SHIFT_TASKS[task]), indent=2))
        return 0
    if args.command == "external-check":
        print(json.dumps(external_check(args.weights, Task(args.task), args.data, note=args.note), indent=2))
        return 0
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
