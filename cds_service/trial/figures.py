"""The trial's figures, from the study records (pure): the same statistics as `cds-triage validate`.

Per task and measured label: `evaluation.binary_validation` on the studies whose truth is known
(AUC with its stratified bootstrap interval, sensitivity / specificity / PPV / NPV / share raised with
Wilson intervals at the model card's and the site's threshold and at the thresholds reaching
sensitivity 0.90 / 0.95 / 0.98, calibration, small-number warnings), plus the decisions as triage
made them (the Observations' interpretation) and the study ids in each cell of each 2x2 table.

Turnaround: hours from the order (or the study's start) to the radiologist's final report, for the
studies triage raised and those it did not, and for the positives it raised and those it missed;
median, interquartile range and count, per mode (in shadow mode, "raised" is what triage would have
raised: nobody saw it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from cds_service.core.domain import Task, TaskMode
from cds_service.core.evaluation import binary_validation, operating_point
from cds_service.core.model_cards import ModelCard
from cds_service.core.site_thresholds import card_threshold, decision_score, has_presence_rule, main_label
from cds_service.trial.studies import StudyRecord
from cds_service.trial.truth import measured_labels

AT_TRIAGE = "as decided at triage"
CARD = "model card"
SITE = "site (CDS_SITE_THRESHOLDS)"


def score_of(record: StudyRecord, label: str) -> float | None:
    """The study's score for a measured label: the decision score for the main one, else p(label)."""
    task = record.ai.task
    try:
        if label == main_label(task):
            return float(decision_score(task, record.ai.probabilities))
        return float(record.ai.probabilities[label])
    except KeyError:
        return None


def thresholds_for(task: Task, label: str, card: ModelCard | None, site_threshold: float | None) -> dict[str, float]:
    """The named thresholds a label is measured at: the card's (of the weights in use) and the site's."""
    named: dict[str, float] = {}
    if card is not None:
        if label == main_label(task):
            if not has_presence_rule(task) or card.presence_threshold is not None:
                named[CARD] = card_threshold(card)
        elif label in card.trained_labels and label in card.thresholds:
            named[CARD] = card.thresholds[label]
    if site_threshold is not None and label == main_label(task):
        named[SITE] = site_threshold
    return named


def cells(ids: Sequence[str], y: np.ndarray, raised: np.ndarray) -> dict[str, list[str]]:
    """The study ids in each cell of the 2x2 table (raised = positive call)."""
    return {"tp": [i for i, t, r in zip(ids, y, raised) if t and r], "fp": [i for i, t, r in zip(ids, y, raised) if not t and r],
            "fn": [i for i, t, r in zip(ids, y, raised) if t and not r], "tn": [i for i, t, r in zip(ids, y, raised) if not t and not r]}


def label_figures(task: Task, label: str, records: Sequence[StudyRecord], thresholds: dict[str, float],
                  resamples: int) -> dict[str, Any] | None:
    """One label's figures on the studies with a known truth and a score; None when there are none."""
    known = [(r, score_of(r, label)) for r in records if r.truth is not None and label in r.truth.labels]
    known = [(r, s) for r, s in known if s is not None and label in r.ai.decided]
    if not known:
        return None
    ids = [r.study_id for r, _ in known]
    y = np.array([r.truth.labels[label] for r, _ in known if r.truth is not None], dtype=bool)
    p = np.array([s for _, s in known], dtype=np.float64)
    decided = np.array([r.ai.decided[label] for r, _ in known], dtype=bool)
    metrics = binary_validation(y, p, thresholds, resamples=resamples)
    recorded_key = None if label == main_label(task) and has_presence_rule(task) else label  # no Observation records presence
    recorded = Counter(r.ai.recorded_thresholds.get(recorded_key) if recorded_key else None for r, _ in known)
    at_triage = operating_point(y, decided.astype(np.float64), 0.5)
    at_triage["threshold"] = next(iter(recorded)) if len(recorded) == 1 and None not in recorded else None
    at_triage["note"] = ("each study's own call, from its Observation's interpretation"
                         + ("" if at_triage["threshold"] is not None else "; the recorded thresholds varied or are missing"))
    return {
        "label": label, "score": score_text(task, label), "metrics": metrics, "at_triage": at_triage,
        "cells": {AT_TRIAGE: cells(ids, y, decided)} | {name: cells(ids, y, p >= t) for name, t in thresholds.items()},
        "studies": [{"study": i, "truth": int(t), "score": round(float(s), 6), "raised": bool(d)}
                    for i, t, s, d in zip(ids, y, p, decided)],
    }


def score_text(task: Task, label: str) -> str:
    if label == main_label(task) and has_presence_rule(task):
        return "1 - p(no_tumor): tumour present"
    return f"p({label})"


def hours_summary(records: Sequence[StudyRecord]) -> dict[str, Any]:
    """Median and interquartile range (numpy's linear percentiles) of the turnaround, in hours, with the count."""
    values = np.array([r.turnaround_h for r in records if r.turnaround_h is not None], dtype=np.float64)
    if not len(values):
        return {"n": 0, "median_h": None, "q1_h": None, "q3_h": None, "studies": []}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"n": int(len(values)), "median_h": round(float(median), 4), "q1_h": round(float(q1), 4), "q3_h": round(float(q3), 4),
            "studies": sorted(r.study_id for r in records if r.turnaround_h is not None)}


def turnaround(records: Sequence[StudyRecord]) -> dict[str, Any]:
    """Per mode: the turnaround of raised vs not raised studies and of positives raised vs missed."""
    out: dict[str, Any] = {}
    for mode in (TaskMode.ACTIVE, TaskMode.SHADOW):
        mine = [r for r in records if r.ai.mode is mode]
        if not mine:
            continue
        main = main_label(mine[0].ai.task)
        positives = [r for r in mine if r.truth is not None and r.truth.labels.get(main) is True]
        out[mode.value] = {
            "studies": len(mine),
            "with_final_report": sum(1 for r in mine if r.final_report is not None),
            "without_start_time": sorted(r.study_id for r in mine if r.final_report is not None and r.started is None),
            "raised": hours_summary([r for r in mine if r.ai.raised]),
            "not_raised": hours_summary([r for r in mine if not r.ai.raised]),
            "positives": len(positives),
            "positives_raised": hours_summary([r for r in positives if r.ai.raised]),
            "positives_missed": hours_summary([r for r in positives if not r.ai.raised]),
            "counts": {"raised": sum(1 for r in mine if r.ai.raised), "not_raised": sum(1 for r in mine if not r.ai.raised),
                       "positives_raised": sum(1 for r in positives if r.ai.raised),
                       "positives_missed": sum(1 for r in positives if not r.ai.raised)},
        }
    return out


def task_document(task: Task, records: Sequence[StudyRecord], card: ModelCard | None, site_threshold: float | None,
                  *, resamples: int = 2000) -> dict[str, Any]:
    """Every figure of one task, as JSON."""
    records = sorted(records, key=lambda r: r.study_id)
    models = Counter(r.ai.model for r in records)
    truth_from = Counter(r.truth.source for r in records if r.truth is not None)
    labels = {}
    for label in measured_labels(task):
        figures = label_figures(task, label, records, thresholds_for(task, label, card, site_threshold), resamples)
        if figures is not None:
            labels[label] = figures
    warnings = []
    if card is None:
        warnings.append(f"no model card for {task.value} in CDS_WEIGHTS_DIR: figures only as decided at triage, "
                        "and no site threshold can be written")
    elif other := {m: n for m, n in models.items() if m != (card.name, card.version)}:
        shown = ", ".join(f"{' '.join(m) if m else 'an unknown model'} ({n})" for m, n in other.items())
        warnings.append(f"studies scored by another model than the weights in use ({card.name} {card.version}): {shown}; "
                        "their scores are measured too, but a threshold is written from the current model's studies only")
    unknown = [{"study": r.study_id, "reason": r.unknown} for r in records if r.truth is None]
    unscored = sorted(r.study_id for r in records if r.truth is not None and score_of(r, main_label(task)) is None)
    if unscored:
        warnings.append(f"{len(unscored)} studies with a known truth have no score (their AI report's Observations were not "
                        f"found) and are left out of the figures: {', '.join(unscored[:20])}")
    if unknown:
        warnings.append(f"{len(unknown)} of {len(records)} studies have no known truth (listed) and are left out of the figures")
    main = labels.get(main_label(task))
    return {
        "task": task.value,
        "models": [{"name": m[0], "version": m[1], "studies": n} if m else {"name": None, "version": None, "studies": n}
                   for m, n in models.items()],
        "card": {"name": card.name, "version": card.version} if card else None,
        "studies": {"triaged": len(records), "shadow": sum(1 for r in records if r.ai.mode is TaskMode.SHADOW),
                    "active": sum(1 for r in records if r.ai.mode is TaskMode.ACTIVE),
                    "with_final_report": sum(1 for r in records if r.final_report is not None),
                    "truth_known": sum(truth_from.values()), "truth_from": dict(truth_from), "truth_unknown": len(unknown)},
        "labels": labels,
        "turnaround": turnaround(records),
        "unknown": unknown,
        "warnings": warnings + (main["metrics"]["warnings"] if main else ["no study has a known truth: nothing to measure"]),
        "study_rows": [study_row(r) for r in records],
    }


def study_row(record: StudyRecord) -> dict[str, Any]:
    """One line of the report's table of studies."""
    main = main_label(record.ai.task)
    score = score_of(record, main)
    final = record.final_report
    return {"study": record.study_id, "order": record.ai.order_id, "mode": record.ai.mode.value,
            "ai_report": record.ai.report_id, "score": None if score is None else round(score, 6), "raised": record.ai.raised,
            "truth": None if record.truth is None else record.truth.labels.get(main),
            "truth_labels": dict(record.truth.labels) if record.truth else {},
            "truth_from": record.truth.source if record.truth else None, "truth_detail": record.truth.detail if record.truth else record.unknown,
            "final_report": f"DiagnosticReport/{final.get('id')}" if final else None,
            "started": record.started.isoformat() if record.started else None, "started_from": record.started_from,
            "reported": record.reported.isoformat() if record.reported else None,
            "turnaround_h": None if record.turnaround_h is None else round(record.turnaround_h, 4)}
