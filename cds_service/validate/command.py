"""`cds-triage validate`: the studies scored as the service scores them, measured, reported; the command."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cds_service.core.domain import TASK_LABELS, Task, TriageStatus
from cds_service.core.errors import TriageError
from cds_service.core.evaluation import SMALL_SAMPLE, auc_with_ci, binary_validation, operating_point, proportion
from cds_service.core.model_cards import ModelCard
from cds_service.core.models import ModelRegistry
from cds_service.core.settings import Settings
from cds_service.core.site_thresholds import (card_threshold, decision_score, familiarity_entry, has_presence_rule, main_label,
                                               threshold_entry, write_site_entry)
from cds_service.local_triage import collect_inputs, result_json, triage_input
from cds_service.validate.arguments import add_measure_arguments
from cds_service.validate.labels import LabelsError, Unit, match_units, read_labels
from cds_service.validate.report import html_report, summary_lines


@dataclass
class Scored:
    unit: Unit
    probabilities: dict[str, float]  # study-level, per trained label
    slices: int
    results: list[dict[str, Any]]  # `triage --json` objects of the unit's inputs


def score_units(units: Sequence[Unit], registry: ModelRegistry, settings: Settings, task: Task,
                progress: bool) -> tuple[list[Scored], list[dict[str, str]], list[float]]:
    """Each unit scored through `triage_input` (no Grad-CAM); pooled as the card says when a unit is
    a folder of images. Units whose inputs cannot be triaged are returned as failures with the reason.
    Also the input check's distance of every input it measured, refused or not (the site's familiarity)."""
    from tqdm import tqdm

    card = registry.get(task).card
    scored: list[Scored] = []
    failed: list[dict[str, str]] = []
    distances: list[float] = []
    bar = tqdm(total=sum(len(u.inputs) for u in units), desc=f"validate {task.value}", unit="input",
               disable=not progress, file=sys.stderr, leave=False)
    try:
        for unit in units:
            outputs, reason = [], ""
            for item in unit.inputs:
                try:
                    result = triage_input(item, registry, settings, task, with_heatmap=False)
                except TriageError as exc:
                    reason = f"{item.name}: {exc}"
                else:
                    if result.input_distance is not None:
                        distances.append(result.input_distance)
                    if result.status is not TriageStatus.DONE:
                        reason = f"{item.name}: {result.status.value} {result.reason}".strip()
                    outputs.append((result, result_json(item.name, result, task)))
                bar.update(1)
            if reason:
                failed.append({"name": unit.name, "line": str(unit.row.line), "reason": reason})
                continue
            findings: list[list[dict[str, Any]]] = [out["findings"] for _, out in outputs]  # type: ignore[misc]
            labels = [f["label"] for f in findings[0]]
            per_input = np.array([[f["probability"] for f in found] for found in findings], dtype=np.float64)
            pooled = per_input[0] if len(outputs) == 1 else card.series_pooling.pool(per_input)
            scored.append(Scored(unit, dict(zip(labels, map(float, pooled))), sum(r.slices_scored for r, _ in outputs),
                                 [out for _, out in outputs]))
    finally:
        bar.close()
    return scored, failed, distances


def unit_kind(scored: Sequence[Scored]) -> str:
    kinds = {"series" if (u.unit.inputs[0].image_path is None or len(u.unit.inputs) > 1) else "image" for u in scored}
    return kinds.pop() if len(kinds) == 1 else "study"


def validation_document(task: Task, card: ModelCard, scored: Sequence[Scored], *, site_threshold: float | None,
                        resamples: int = 2000) -> dict[str, Any]:
    """Every figure of the report, as JSON (pure: from the scores and the truth)."""
    y = np.array([s.unit.row.truth for s in scored], dtype=bool)
    p = np.array([decision_score(task, s.probabilities) for s in scored], dtype=np.float64)
    thresholds = {"model card": card_threshold(card)}
    if site_threshold is not None:
        thresholds["site (CDS_SITE_THRESHOLDS)"] = site_threshold
    kind = unit_kind(scored)
    doc: dict[str, Any] = {
        "task": task.value, "model": {"name": card.name, "version": card.version}, "unit": kind,
        "score": "1 - p(no_tumor): tumour present" if has_presence_rule(task) else f"p({main_label(task)})",
        "metrics": binary_validation(y, p, thresholds, resamples=resamples),
    }
    notes = []
    if task is Task.HEAD_CT_ICH and kind == "image" and card.series_pooling.window > 1:
        notes.append("the card's `any` threshold was chosen for whole series (neighbouring slices pooled); these units "
                     "are single images, so its figures here are per image, and a threshold chosen here is a per-image one")
    if card.default_mode.value != "active":
        notes.append(f"the card ships this model in {card.default_mode.value} mode: {card.raw.get('default_mode_reason', '')}".rstrip(": "))
    doc["notes"] = notes
    subtypes: dict[str, Any] = {}
    for label in TASK_LABELS[task][1:] if not has_presence_rule(task) else ():
        known = [(s.unit.row.subtypes[label], s.probabilities.get(label, math.nan)) for s in scored if label in s.unit.row.subtypes]
        if known:
            ys, ps = np.array([k for k, _ in known], bool), np.array([v for _, v in known])
            subtypes[label] = {"auc": auc_with_ci(ys, ps, resamples), "positives": int(ys.sum()), "negatives": int((~ys).sum()),
                               "at_card_threshold": operating_point(ys, ps, card.thresholds.get(label, 1.0))}
    if subtypes:
        doc["subtypes"] = subtypes
        few = [f"{label} {sub['positives']}" for label, sub in subtypes.items() if sub["positives"] < SMALL_SAMPLE]
        if few:
            notes.append(f"subtypes with fewer than {SMALL_SAMPLE} positives, whose figures are rough: {', '.join(few)}")
    classes = {s.unit.row.cls for s in scored if s.unit.row.cls}
    if classes:
        doc["raised_per_class"] = {
            cls: {name: proportion(int(sum(1 for s, score in zip(scored, p) if s.unit.row.cls == cls and score >= t)),
                                   sum(1 for s in scored if s.unit.row.cls == cls)) for name, t in thresholds.items()}
            for cls in sorted(classes)}
    doc["units"] = [{"name": s.unit.name, "line": s.unit.row.line, "truth": int(bool(s.unit.row.truth)), "score": round(float(score), 6),
                     "slices": s.slices, **({"class": s.unit.row.cls} if s.unit.row.cls else {}),
                     **({"note": s.unit.note} if s.unit.note else {})} for s, score in zip(scored, p)]
    return doc


def site_entry(doc: dict[str, Any], card: ModelCard, target: float, labels: Path, report: Path | None) -> dict[str, Any]:
    """The site threshold file's entry for this task (`threshold_entry`, on these labelled studies)."""
    y = np.array([u["truth"] for u in doc["units"]], dtype=bool)
    p = np.array([u["score"] for u in doc["units"]], dtype=np.float64)
    metrics = doc["metrics"]
    return threshold_entry(y, p, card, target, {"unit": doc["unit"], "labels": str(labels), "auc": metrics["auc"],
                                                **({"report": str(report)} if report else {}),
                                                "warnings": metrics["warnings"]})


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="DICOM files/folders or images, as for `cds-triage triage`")
    parser.add_argument("--task", required=True, choices=[t.value for t in Task])
    parser.add_argument("--labels", required=True, type=Path, help="CSV: file or study, label[, subtypes]")
    parser.add_argument("--report", type=Path, help="the HTML report (default validate-<task>.html here)")
    add_measure_arguments(parser)


def run_validate(args: argparse.Namespace, settings: Settings) -> int:
    """Exit status: 0 done, 1 some labelled inputs could not be scored (the figures leave them out),
    2 unusable labels or inputs."""
    task = Task(args.task)

    def refuse(message: str) -> int:
        print(f"cds-triage validate: {message}", file=sys.stderr)
        return 2

    try:
        rows = read_labels(args.labels, task)
        inputs = collect_inputs(args.paths)
        units, unlabelled, unmatched = match_units(rows, inputs, args.labels.resolve().parent)
    except (LabelsError, TriageError) as exc:
        return refuse(str(exc))
    if not units:
        return refuse(f"no input has a label in {args.labels} ({len(inputs)} inputs, {len(rows)} rows)")
    registry = ModelRegistry(settings.weights_dir, settings.device, settings.inference_runtime, settings.inference_threads)
    try:
        card = registry.get(task).card
        scored, failed, distances = score_units(units, registry, settings, task,
                                                progress=not args.no_progress and sys.stderr.isatty())
    except TriageError as exc:  # no model
        return refuse(str(exc))
    if not scored:
        return refuse("no labelled input could be scored: " + "; ".join(f["reason"] for f in failed[:5]))
    site = settings.site_thresholds.applied(task) if settings.site_thresholds else None
    doc = validation_document(task, card, scored, resamples=args.bootstrap,
                              site_threshold=site.thresholds.get(main_label(task)) if site else None)
    report = args.report or Path(f"validate-{task.value}.html")
    doc.update(labels=str(args.labels.resolve()), created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               failed=failed, unlabelled=unlabelled,
               unmatched_rows=[{"line": r.line, r.kind: r.value} for r in unmatched])
    doc["skipped_warnings"] = [w for w in (
        f"{len(failed)} labelled units could not be scored and are left out" if failed else "",
        f"{len(unlabelled)} inputs have no label and are skipped" if unlabelled else "",
        f"{len(unmatched)} labelled rows match no input and are skipped" if unmatched else "") if w]
    status = 1 if failed else 0
    if args.write_thresholds:
        try:
            entry = site_entry(doc, card, args.target_sensitivity, args.labels.resolve(), report.resolve())
            profile = registry.input_profile(task)  # the card's own: validate reads no site file
            if profile is not None and distances:
                entry["familiarity"] = familiarity_entry(distances, profile)
            write_site_entry(args.write_thresholds, task, entry)
        except ValueError as exc:
            print(f"cds-triage validate: no threshold written: {exc}", file=sys.stderr)
            status = 1
        else:
            doc["site_thresholds"] = {"file": str(args.write_thresholds), "entry": entry}
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(html_report(doc))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(summary_lines(doc, report)))
        if "site_thresholds" in doc:
            print(f"site thresholds: {args.write_thresholds} ({json.dumps(doc['site_thresholds']['entry']['thresholds'])}); "
                  f"set CDS_SITE_THRESHOLDS={args.write_thresholds} for the service to use them")
    return status
