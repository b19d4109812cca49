"""The statistics of a triage model, shared by training, `cds-triage validate` and the drift alarm.

- metrics.py: `Predictions`, ROC AUC, Wilson and bootstrap intervals, the card's metric set,
  thresholds for a target sensitivity;
- rules.py: the operating rules measured from labelled slices ("anything there?", series from
  slice scores, the Youden point);
- site_validation.py: one binary decision on a site's own labelled studies (`cds-triage validate`);
- plots.py and reports.py: the PNG plots, metrics as text and weights/README.md.

Everything is importable from here (`from cds_service.core.evaluation import binary_auc`).
"""

from .metrics import (
    BOOTSTRAP_RESAMPLES,
    TARGET_SENSITIVITY,
    Predictions,
    binary_auc,
    bootstrap_ci,
    choose_thresholds,
    confusion,
    decisions,
    metrics_with_ci,
    point_metrics,
    proportion,
    proportion_counts,
    rounded,
    sensitivity_specificity,
    threshold_for_sensitivity,
    threshold_within_budget,
    trained_label_indices,
    wilson_interval,
)
from .plots import write_plots
from .reports import cross_validation_line, external_check_line, format_estimate, format_metric, input_check_line, summarise, weights_readme
from .rules import (
    SeriesSimulation,
    presence_metrics,
    presence_scores,
    series_operating_point,
    series_rates,
    youden_threshold,
)
from .site_validation import (
    SENSITIVITY_TARGETS,
    SMALL_SAMPLE,
    auc_with_ci,
    binary_validation,
    calibration_summary,
    operating_point,
    reliability_bins,
    sensitivity_operating_points,
    small_number_warnings,
)

__all__ = [
    "BOOTSTRAP_RESAMPLES", "SENSITIVITY_TARGETS", "SMALL_SAMPLE", "TARGET_SENSITIVITY", "Predictions", "SeriesSimulation",
    "auc_with_ci", "binary_auc", "binary_validation", "bootstrap_ci", "calibration_summary", "choose_thresholds", "confusion", "cross_validation_line",
    "decisions", "external_check_line", "format_estimate", "input_check_line", "format_metric", "metrics_with_ci", "operating_point", "point_metrics", "presence_metrics",
    "presence_scores", "proportion", "proportion_counts", "reliability_bins", "rounded", "sensitivity_operating_points",
    "sensitivity_specificity", "series_operating_point", "series_rates", "small_number_warnings", "summarise",
    "threshold_for_sensitivity", "threshold_within_budget", "trained_label_indices", "weights_readme", "wilson_interval", "write_plots", "youden_threshold",
]
