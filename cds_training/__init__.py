"""Training time only, outside the runtime package: `training` (train, evaluate, rethreshold, the
weights README: `python -m cds_training.training …`, or `cds-triage train|evaluate`), `datasets` (the
grouped train/validation/test split) and `imagenet_init` (the ImageNet EfficientNet-Lite0 start).

The service never imports this package, except `cds_service.cli` when the train or evaluate command runs."""
