"""What the validation split chooses for a card: thresholds, the presence and series rules, the go-live bar, priority labels."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cds_service.core.domain import NEGATIVE_LABELS, Task
from cds_service.core.evaluation import (
    Predictions,
    SeriesSimulation,
    choose_thresholds,
    metrics_with_ci,
    presence_metrics,
    presence_scores,
    series_operating_point,
    series_rates,
    threshold_within_budget,
    youden_threshold,
)
from cds_service.core.model_cards import PoolingMethod
from cds_service.drift import expected_raised_share

from .tasks import TaskSetup


def operating_points(setup: TaskSetup, trained: Sequence[str], val: Predictions, test: Predictions | None,
                     target: float, bootstrap: int) -> dict[str, Any]:
    """Everything the validation split chooses and what the test split then shows, for the card.

    Thresholds: per trained label, the highest with sensitivity >= `target` on validation. A
    softmax task with a negative class (brain MRI) also gets a presence rule: raise when
    1 - p(negative) reaches its threshold, the lowest whose share of negatives raised on validation
    stays within `PRESENCE_NEGATIVE_BUDGET` (and at most the one with sensitivity `target`); its
    tumour classes' thresholds are that threshold. Validation also decides which labels may raise a priority
    (`priority_labels`). The test split (if any) chooses nothing: it reports the same thresholds.
    """
    thresholds = choose_thresholds(val, target)
    out: dict[str, Any] = {}
    if setup.activation == "sigmoid" and len(trained) > 1:  # the labels beside the main one only name: balanced
        for label in trained[1:]:
            j = val.labels.index(label)
            known = val.known[:, j].astype(bool)
            thresholds[label] = youden_threshold(val.targets[known, j], val.probs[known, j])
    negative = [label for label in trained if label in NEGATIVE_LABELS]
    if setup.activation == "softmax" and len(negative) == 1:
        truth, score = presence_scores(val, negative[0])
        cut = threshold_within_budget(truth, score, target, PRESENCE_NEGATIVE_BUDGET)
        thresholds = {label: (cut if label != negative[0] else thresholds[label]) for label in thresholds}
        out["presence"] = {"negative_label": negative[0], "threshold": cut,
                           "validation": presence_metrics(val, negative[0], cut, bootstrap)}
        if test is not None:
            out["presence"]["test"] = presence_metrics(test, negative[0], cut, bootstrap)
    if setup.series_pooling.method is PoolingMethod.ADJACENT_MEAN and "any" in trained:
        out["series_operating_point"] = series_block(setup, val, test, target)
        thresholds["any"] = out["series_operating_point"]["threshold"]
    out["thresholds"] = thresholds
    out["validation_metrics"] = metrics_with_ci(val, thresholds, resamples=bootstrap)
    out["go_live_bar"] = go_live_bar(setup, trained, out)
    if not out["go_live_bar"]["met"]:
        out["default_mode"] = "shadow"
        out["default_mode_reason"] = "short of the go-live bar on validation: " + "; ".join(
            f"{c['what']} is {c['value']} (needs {c['needs']})" for c in out["go_live_bar"]["checks"] if not c["met"])
    # which labels may raise a priority is a choice, so it is made on validation: the test split chooses nothing
    out["priority_labels"], out["priority_bar"] = priority_labels(setup, trained, out["validation_metrics"])
    if test is not None:
        out["test_metrics"] = metrics_with_ci(test, thresholds, resamples=bootstrap)
    band = expected_raised_share({"trained_labels": list(trained), **out})  # the drift alarm's band (drift.py)
    if band is not None:
        out["expected_raised_share"] = band
    return out


# The share of tumour-free images a presence rule may raise on validation, half the go-live bar's 5 %: the
# threshold is set as low as that allows, for images from elsewhere that score a little lower (brain MR 3.1.0:
# 227 of 301 unseen meningiomas raised at the threshold that sat exactly on the validation tumours).
PRESENCE_NEGATIVE_BUDGET = 0.025


# What a head CT model must be expected to do on whole series before it may raise priorities (else: shadow).
SERIES_BAR = {"bleeding_series_raised_at_least": 0.85, "normal_series_raised_at_most": 0.40}


def go_live_bar(setup: TaskSetup, trained: Sequence[str], points: dict[str, Any]) -> dict[str, Any]:
    """Whether a model may raise priorities by default (`active`), judged on validation only.

    A figure counts by the end of its 95% interval that a sceptic would pick where the product's
    aim is stated as a lower bound (AUC): a model whose interval reaches below the aim ships in
    shadow mode, and a site turns it on after its own validation.
    """
    metrics = points["validation_metrics"]["metrics"]
    checks: list[dict[str, Any]] = []

    def check(what: str, value: float | None, at_least: float | None = None, at_most: float | None = None) -> None:
        met = value is not None and (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
        needs = f">= {at_least}" if at_least is not None else f"<= {at_most}"
        checks.append({"what": what, "value": None if value is None else round(float(value), 4), "needs": needs, "met": met})

    if "presence" in points:
        v = points["presence"]["validation"]
        check("share of tumours raised", v["raised_with_finding"]["value"], at_least=0.97)
        check("share of tumour-free images raised", v["raised_without_finding"]["value"], at_most=0.05)
        check("class accuracy", v["class_accuracy"]["value"], at_least=0.97)
    elif setup.activation == "sigmoid" and trained:
        main = trained[0]
        check(f"{main} AUC, lower end of its 95% interval", (metrics.get(f"{main}.auc", {}).get("ci95") or [None])[0],
              at_least=GO_LIVE_AUC.get(setup.task, 0.85))
        if "series_operating_point" in points:
            expected = points["series_operating_point"]["validation"]
            check("bleeding series raised (simulated)", expected["bleeding_series_raised"],
                  at_least=SERIES_BAR["bleeding_series_raised_at_least"])
            check("normal series raised (simulated)", expected["normal_series_raised"],
                  at_most=SERIES_BAR["normal_series_raised_at_most"])
        else:
            check(f"{main} specificity at the threshold (share of images without it left alone)",
                  metrics.get(f"{main}.specificity_at_threshold", {}).get("value"), at_least=0.70)
    return {"checks": checks, "met": bool(checks) and all(c["met"] for c in checks), "judged_on": "validation split"}


# The AUC a task's main label must reach (by the lower end of its 95% interval) to go live by default.
GO_LIVE_AUC = {Task.HEAD_CT_ICH: 0.85, Task.CHEST_PNEUMOTHORAX: 0.80}


def series_block(setup: TaskSetup, val: Predictions, test: Predictions | None, target: float) -> dict[str, Any]:
    """The `any` threshold for whole series: chosen on validation slices assembled into simulated
    series (`evaluation.SeriesSimulation`), the highest whose simulated share of bleeding series
    raised reaches `target`; the test split's slices, assembled the same way, report it."""
    j = val.labels.index("any")
    simulation = SeriesSimulation()

    def pool(series: np.ndarray) -> float:
        return float(setup.series_pooling.pool(series[:, None])[0])

    def scores(pred: Predictions) -> tuple[np.ndarray, np.ndarray]:
        known = pred.known[:, j].astype(bool)
        y, p = pred.targets[known, j] > 0.5, pred.probs[known, j]
        return p[y], p[~y]

    chosen = series_operating_point(*scores(val), pool, target, simulation)
    block: dict[str, Any] = {
        "threshold": chosen.pop("threshold"), "target_bleeding_series_raised": target,
        "pooling": setup.series_pooling.to_card(), "simulation": simulation.to_card(), "validation": chosen,
        "bar": SERIES_BAR,
    }
    if test is not None:
        block["test"] = series_rates(*simulation.scores(*scores(test), pool), block["threshold"])
    return block


def threshold_policy(target: float, softmax: bool, with_test: bool, series: bool = False) -> str:
    """The card's sentence on how its thresholds were chosen."""
    if series:
        rule = ("For `any` (the label that raises a study), the threshold is the series operating point: the highest "
                f"whose share of bleeding series raised reaches {target} in series assembled from the validation "
                "slices (the card's `series_operating_point`). The subtypes, which only name what was found, use the threshold "
                "that maximises sensitivity + specificity on validation")
    elif softmax:
        rule = (f"Per trained label, the highest threshold with sensitivity >= {target} on the validation split "
                "(one-vs-rest on the softmax probability; no_tumor is never reported as a finding). The presence rule "
                "(1 - p(no_tumor)), which raises a study and whose threshold the tumour classes share, takes the lowest "
                f"threshold that raises at most {PRESENCE_NEGATIVE_BUDGET:.1%} of the tumour-free validation images, "
                f"provided the share of tumours raised reaches {target} there")
    else:
        rule = f"Per trained label, the highest threshold with sensitivity >= {target} on the validation split"
    return (rule + ". The validation split is therefore also the threshold-selection set"
            + ("; the test split chose nothing and reports the same thresholds." if with_test else "."))


def priority_labels(setup: TaskSetup, trained: Sequence[str], validation: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The trained labels whose findings may raise a priority, and why.

    The task's main label (a sigmoid task's first: `any`, `pneumothorax`) and a softmax task's
    positive classes always may: whether the task raises at all is its mode (active / shadow).
    A further label (a hemorrhage subtype) must show enough positives in the validation split and a
    validation AUC whose lower 95% bound clears the task's bar; the others are still reported. (The
    test split, which chooses nothing, shows afterwards how the chosen labels fare.)
    """
    metrics, positives = validation["metrics"], validation["positives_per_label"]
    keep, verdicts = [], {}
    for index, label in enumerate(trained):
        if label in NEGATIVE_LABELS:
            continue
        lower = (metrics.get(f"{label}.auc", {}).get("ci95") or [None])[0]
        n = positives.get(label, 0)
        main = setup.activation == "softmax" or index == 0
        ok = main or (n >= setup.priority_bar_min_positives and lower is not None and lower >= setup.priority_bar_min_auc_lower95)
        verdicts[label] = {"validation_positives": n, "validation_auc_lower95": lower, "raises_priority": ok,
                           **({"why": "the task's main label (the task's mode decides)"} if main else {})}
        if ok:
            keep.append(label)
    bar = {"rule": f"a label beside the main one needs at least {setup.priority_bar_min_positives} positives in the validation "
                   f"split and a validation AUC whose lower 95% bound is at least {setup.priority_bar_min_auc_lower95}",
           "labels": verdicts}
    return keep, bar
