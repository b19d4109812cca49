"""The options `cds-triage validate` and `cds-triage trial` share: how the figures are printed, the
bootstrap, the progress bar and the site threshold file they may write (same meaning, same words)."""

from __future__ import annotations

import argparse
from pathlib import Path


def sensitivity_target(text: str) -> float:
    """argparse type of --target-sensitivity: a share strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {value}")
    return value


def add_measure_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON instead of the summary")
    parser.add_argument("--write-thresholds", type=Path, metavar="FILE",
                        help="write (or update) the site threshold file for CDS_SITE_THRESHOLDS")
    parser.add_argument("--target-sensitivity", type=sensitivity_target, default=0.95,
                        help="sensitivity the written threshold reaches on these studies (default 0.95)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the AUC interval (default 2000)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
