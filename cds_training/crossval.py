"""`python -m cds_training.crossval`: what a site should expect from a recipe on patients it never saw.

One test split drawn from the training source flatters a small data set (the chest X-ray card's 24
test positives). Grouped K-fold cross-validation trains the same recipe K times, each fold of
patients (or similarity groups) tested once, the next fold choosing the epoch and threshold: the
spread of the K fold AUCs, and the AUC of all out-of-fold probabilities pooled, estimate what an
unseen patient gets. The folds' weights are thrown away (var/cv/); the shipped model is the card's.

    .venv/bin/python -m cds_training.crossval --task chest_pneumothorax --data ../shared/data/chest_xray_ptx \\
        --folds 5 --epochs 12 --image-size 320 --batch-size 16 --lr 2e-4 --init imagenet-lite0 --threads 1

Every `cds-triage train` option is accepted (`--out` is the folder of the fold runs); the summary
(JSON) is printed and written to <out>/crossval.json. A fold whose run is already in `--out` is not
trained again (one stopped part-way resumes from its `last.pt`), so `--run-folds 3,4` in a second process shares the work on a machine with cores to
spare, and the last process to finish writes the summary of every fold. `--card weights` also records
the summary in the shipped card (`cross_validation`, a line of weights/README.md and a sentence of its
limits); run the same command again once every fold is done to record it without training.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cds_service.core.evaluation import binary_auc, bootstrap_ci, proportion
from cds_service.core.model_cards import card_path
from cds_service.core.domain import Task

from .cards import CV_SENTENCE_START, cv_sentence, stored_predictions
from .cli import add_train_arguments, config_from_args
from .loop import train


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--run-folds", default="", help="train only these folds (comma-separated), e.g. in a second process")
    parser.add_argument("--card", type=Path, default=None, help="a weights folder: record the summary in its card of the task")
    args = parser.parse_args(argv)
    base = config_from_args(args)
    root = Path(args.out) if str(args.out) != "weights" else Path("var") / "cv" / base.task.value
    command = "python -m cds_training.crossval " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    wanted = [int(f) for f in args.run_folds.split(",") if f.strip()] or list(range(args.folds))
    for fold in wanted:
        out = root / f"fold{fold}"
        if (out / f"{base.task.value}.split.json").is_file():
            continue  # trained already (by this process earlier, or another one)
        checkpoint = out / "last.pt"  # a fold stopped part-way goes on from its last epoch
        config = replace(base, out_dir=out, cv_folds=args.folds, cv_fold=fold, test_fraction=0.0, plots=False,
                         checkpoint=checkpoint, resume=checkpoint if checkpoint.is_file() else None, command=command)
        train(config)
    done = [fold for fold in range(args.folds) if (root / f"fold{fold}" / f"{base.task.value}.split.json").is_file()]
    if len(done) < args.folds:
        print(f"folds {done} of {args.folds} are done; the summary waits for the rest", flush=True)
        return 0
    folds: list[dict[str, Any]] = []
    pooled_y: list[np.ndarray] = []
    pooled_p: list[np.ndarray] = []
    found = [0, 0]  # positives raised, positives: each fold at its own threshold (chosen on its validation fold)
    cleared = [0, 0]  # negatives not raised, negatives
    for fold in range(args.folds):
        out = root / f"fold{fold}"
        card = json.loads((out / f"{base.task.value}.json").read_text())
        main_label = card["trained_labels"][0]
        test = stored_predictions(out, card, "test")
        assert test is not None
        j = test.labels.index(main_label)
        known = test.known[:, j].astype(bool)
        y, p = test.targets[known, j] > 0.5, test.probs[known, j]
        pooled_y.append(y)
        pooled_p.append(p)
        metrics = card["test_metrics"]["metrics"]
        for total, key in ((found, "sensitivity_at_threshold"), (cleared, "specificity_at_threshold")):
            total[0] += metrics[f"{main_label}.{key}"]["count"][0]
            total[1] += metrics[f"{main_label}.{key}"]["count"][1]
        folds.append({"fold": fold, "test_images": int(known.sum()), "test_positives": int(y.sum()),
                      "auc": round(binary_auc(y, p), 4), "best_epoch": card["training"]["best_epoch"]})
        print(json.dumps(folds[-1]), flush=True)
    y_all, p_all = np.concatenate(pooled_y), np.concatenate(pooled_p)
    aucs = np.array([f["auc"] for f in folds])
    summary = {
        "task": base.task.value, "folds": folds, "command": command,
        "fold_auc": {"mean": round(float(aucs.mean()), 4), "sd": round(float(aucs.std(ddof=1)), 4),
                     "min": round(float(aucs.min()), 4), "max": round(float(aucs.max()), 4)},
        "pooled_out_of_fold_auc": {"value": round(binary_auc(y_all, p_all), 4),
                                   "ci95": [round(v, 4) for v in bootstrap_ci(
                                       lambda idx: {"auc": binary_auc(y_all[idx], p_all[idx])}, len(y_all))["auc"]],
                                   "images": int(len(y_all)), "positives": int(y_all.sum())},
        "label": main_label,
        "at_fold_thresholds": {"sensitivity": proportion(*found), "specificity": proportion(*cleared),
                               "rule": "each fold's model at the threshold its validation fold chose (the card's recipe)"},
        "method": f"grouped {args.folds}-fold cross-validation by {base.grouping}: each fold tested once, the next fold "
                  "choosing epoch and thresholds, the rest training, the card's recipe otherwise",
    }
    (root / "crossval.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if args.card is not None:
        record_in_card(args.card, base.task, summary)
        print(f"recorded in {card_path(args.card, base.task)}", flush=True)
    return 0


def record_in_card(weights_dir: Path, task: Task, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the summary into the task's card as `cross_validation` and say it in its limits."""
    path = card_path(weights_dir, task)
    card = json.loads(path.read_text())
    label = summary["label"]
    test_auc = card["test_metrics"]["metrics"][f"{label}.auc"]["value"]
    block = {key: summary[key] for key in ("method", "command", "folds", "fold_auc", "pooled_out_of_fold_auc",
                                           "at_fold_thresholds", "label")} | {"card_test_auc": test_auc}
    card["cross_validation"] = block
    card["limitations"] = [line for line in card["limitations"] if not line.startswith(CV_SENTENCE_START)] + [cv_sentence(block)]
    path.write_text(json.dumps(card, indent=2) + "\n")
    return block


if __name__ == "__main__":
    raise SystemExit(main())
