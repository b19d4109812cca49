"""`cds-triage train` and `cds-triage evaluate`: fit an EfficientNet-B0 and write its card.

What a training run does, in order, and where each step lives:
1. find the labelled images (`datasets.discover_samples`) and split them reproducibly into
   train, validation and test (`datasets.build_split`: seeded hash, stratified, by patient
   where DICOM gives one, else by groups of near-identical images); the test split chooses nothing;
2. preprocess every image once with the service's own preprocessing (`pixels`: the same card
   spec as inference) and keep the tensors in memory;
3. train (`loop.train`) with class-balanced sampling, augmentation fitting the modality
   (`tasks.TASK_SETUPS`, `--augmentation scanner`), AdamW, a warm-up + cosine learning-rate
   schedule, a weight average and early stopping on the validation score, writing a resumable
   checkpoint after every epoch;
4. save the best epoch as fp16 safetensors, load it back through `models.load_model` (the
   service's path), score validation and test with it, choose the operating points on
   validation (`operating`) and write the card, its split probabilities and plots (`cards`).

Afterwards, without training: `recard`, `rethreshold`, `evaluate` (`recard`), the input check's
profile (`input_check`), the figures on another source (`external`), grouped cross-validation (`crossval`).
The command line is `cli`.

This module is the facade: the names the CLI, the tests and the benches import from
`cds_training.training`, and `python -m cds_training.training`.
"""

from __future__ import annotations

from .cards import (_card, _finish, _metrics_document, _split_rows, _split_unit, _summary_lines, size_only_baseline,
                    stored_predictions, write_evaluation, write_split_file, write_weights_readme)
from .cli import TASK_CHOICES, add_evaluate_arguments, add_train_arguments, config_from_args, main, run_evaluate, run_train
from .config import TrainConfig, TrainResult, cpu_cores, cpu_model, set_threads
from .input_check import (DICOM_CHECKS, OTHER_TASK_SAMPLE, REFUSE_MARGIN, SAME_TASK_OTHER_SOURCES,
                          write_input_profile)
from .loop import (add_stochastic_depth, augment, build_network, lr_factor, masked_loss, train,
                   with_extra_training_data)
from .operating import (GO_LIVE_AUC, PRESENCE_NEGATIVE_BUDGET, SERIES_BAR, go_live_bar, operating_points, priority_labels,
                        series_block, threshold_policy)
from .predictions import (MIN_POSITIVES_FOR_SCORE, STORED_DECIMALS, as_predictions, network_probs, predict_samples,
                          validation_score)
from .recard import evaluate, recard, rethreshold
from .tasks import (CARD_VERSION, DISCLAIMER, PROVENANCE, SCANNER_AUGMENTATION, TASK_SETUPS, Augmentation, TaskSetup,
                    default_spec, model_name, setup_for)

__all__ = [
    "CARD_VERSION", "DICOM_CHECKS", "DISCLAIMER", "GO_LIVE_AUC", "MIN_POSITIVES_FOR_SCORE", "OTHER_TASK_SAMPLE",
    "PRESENCE_NEGATIVE_BUDGET", "PROVENANCE", "REFUSE_MARGIN", "SAME_TASK_OTHER_SOURCES", "SCANNER_AUGMENTATION",
    "SERIES_BAR", "STORED_DECIMALS", "TASK_CHOICES", "TASK_SETUPS", "Augmentation", "TaskSetup", "TrainConfig",
    "TrainResult", "_card", "_finish", "_metrics_document", "_split_rows", "_split_unit", "_summary_lines",
    "add_evaluate_arguments", "add_stochastic_depth", "add_train_arguments", "as_predictions", "augment",
    "build_network", "config_from_args", "cpu_cores", "cpu_model", "default_spec", "evaluate", "go_live_bar",
    "lr_factor", "main", "masked_loss", "model_name", "network_probs", "operating_points", "predict_samples",
    "priority_labels", "recard", "rethreshold", "run_evaluate", "run_train", "series_block", "set_threads",
    "setup_for", "size_only_baseline", "stored_predictions", "threshold_policy", "train", "validation_score",
    "with_extra_training_data", "write_evaluation", "write_input_profile", "write_split_file", "write_weights_readme",
]

if __name__ == "__main__":
    raise SystemExit(main())
