# Over 400 lines, to split next (issue #19): the validate command's inputs, metrics and HTML report.
"""`cds-triage validate --task T --labels L.csv PATHS…`: a site measures a model on its own labelled studies.

The studies are scored exactly as `cds-triage triage` scores them (`local_triage.collect_inputs` and
`triage_input`: the same preprocessing, the same model and the same series pooling as the service), so
the numbers are the service's numbers. One decision per study is measured: `any` for head CT,
`pneumothorax` for chest X-ray, tumour present (1 - p(no_tumor)) for brain MRI. The report gives the AUC
with its interval, sensitivity / specificity / PPV at the card's threshold (and at the site threshold in
use, if any) and at the thresholds that reach sensitivity 0.90 / 0.95 / 0.98 on this set, calibration,
head CT subtypes where the labels have them, and says when the set is too small to say much.
`--write-thresholds FILE` writes the site threshold file the service then uses (site_thresholds.py).

Labels CSV: a `file` column (an image or DICOM file, relative to the CSV's folder) or a `study` column
(a folder relative to the CSV's folder, a folder name, or a Study/Series Instance UID), and a `label`
column (0/1; brain MRI also takes the class name; the task's main label, `any` or `pneumothorax`, may
stand for `label`); head CT subtype columns (`epidural`, …) are optional. A folder of images named by
`study` is one series: its slices are scored one by one and pooled in file-name order as the card says.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cds_service.core.domain import NEGATIVE_LABELS, TASK_LABELS, Task, TriageStatus
from cds_service.core.errors import TriageError
from cds_service.core.evaluation import (
                    SMALL_SAMPLE,
                    auc_with_ci,
                    binary_validation,
                    format_estimate,
                    operating_point,
                    proportion,
                    threshold_for_sensitivity,
                )
from .local_triage import LocalInput, collect_inputs, result_json, triage_input
from cds_service.core.models import ModelCard, ModelRegistry
from cds_service.core.settings import Settings
from cds_service.core.site_thresholds import PRESENCE, has_presence_rule, write_site_entry

CLASS_ALIASES = {"notumor": "no_tumor", "no tumor": "no_tumor", "no_tumour": "no_tumor", "no tumour": "no_tumor"}
LISTED = 200  # skipped inputs and rows the report lists by name
TRUE_WORDS, FALSE_WORDS = {"1", "1.0", "true", "yes", "positive"}, {"0", "0.0", "false", "no", "negative"}


class LabelsError(ValueError):
    """A labels file (or its match with the inputs) that cannot be used: the message names the row."""


@dataclass(frozen=True)
class LabelRow:
    line: int  # line of the CSV (the header is line 1)
    kind: str  # "file" or "study"
    value: str
    truth: bool | None  # None: no label given (the input is reported and skipped)
    cls: str | None = None  # brain MRI: the class, where the label names it
    subtypes: dict[str, bool] = field(default_factory=dict)  # head CT subtype columns that have a value


@dataclass
class Unit:
    """One labelled study as the service would see it: a DICOM series, an image, or a folder of images."""

    name: str
    row: LabelRow
    inputs: list[LocalInput]
    note: str = ""


def main_label(task: Task) -> str:
    """The label of the decision measured: the first label for sigmoid tasks, `presence` for brain MRI."""
    return PRESENCE if has_presence_rule(task) else TASK_LABELS[task][0]


def _flag(text: str, where: str) -> bool | None:
    value = text.strip().lower()
    if not value:
        return None
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise LabelsError(f"{where}: {text!r} is not 0 or 1")


def read_labels(path: Path, task: Task) -> list[LabelRow]:
    """The rows of a labels CSV (LabelsError naming the file and line for anything unusable)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            records = [(reader.line_num, {(k or "").strip(): (v or "") for k, v in record.items()}) for record in reader]
    except FileNotFoundError:
        raise LabelsError(f"{path}: no such labels file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"{path}: cannot be read as CSV: {exc}") from None
    if "file" not in columns and "study" not in columns:
        raise LabelsError(f"{path}: needs a 'file' or a 'study' column (has: {', '.join(columns) or 'none'})")
    brain = has_presence_rule(task)
    label_column = "label" if "label" in columns else (TASK_LABELS[task][0] if not brain and TASK_LABELS[task][0] in columns else None)
    if label_column is None:
        raise LabelsError(f"{path}: needs a 'label' column (has: {', '.join(columns)})")
    subtypes = [c for c in TASK_LABELS[task][1:] if c in columns] if not brain else []
    classes = {label for label in TASK_LABELS[task]}
    rows: list[LabelRow] = []
    seen: dict[tuple[str, str], int] = {}
    for line, record in records:
        where = f"{path}, line {line}"
        kind = "file" if record.get("file", "").strip() else "study" if record.get("study", "").strip() else ""
        if not kind:
            raise LabelsError(f"{where}: neither 'file' nor 'study' is given")
        value = record[kind].strip()
        if (kind, value) in seen:
            raise LabelsError(f"{where}: {kind} {value!r} is labelled again (first on line {seen[kind, value]})")
        seen[kind, value] = line
        raw = record.get(label_column, "").strip()
        cls = None
        if brain and raw and raw.lower() not in TRUE_WORDS | FALSE_WORDS:
            cls = CLASS_ALIASES.get(raw.lower(), raw.lower())
            if cls not in classes:
                raise LabelsError(f"{where}: label {raw!r} is not 0, 1 or one of {', '.join(TASK_LABELS[task])}")
            truth: bool | None = cls not in NEGATIVE_LABELS
        else:
            truth = _flag(raw, f"{where}, column {label_column}")
        known = {s: flag for s in subtypes if (flag := _flag(record.get(s, ""), f"{where}, column {s}")) is not None}
        if truth is False and any(known.values()):
            raise LabelsError(f"{where}: subtype {next(s for s, v in known.items() if v)} is 1 but {label_column} is 0 "
                              f"(every subtype is also {TASK_LABELS[task][0]})")
        rows.append(LabelRow(line, kind, value, truth, cls, known))
    if not rows:
        raise LabelsError(f"{path}: no rows")
    return rows


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def match_units(rows: Sequence[LabelRow], inputs: Sequence[LocalInput], labels_dir: Path) -> tuple[list[Unit], list[str], list[LabelRow]]:
    """Labelled units, the inputs without a label (skipped), and the `study` rows that match no input.

    A `file` row names an image, or a DICOM file whose series is then the unit; a `study` row names a
    folder (relative to the CSV, or by its name) or a Study/Series Instance UID. A study with several
    series is read as the service reads it: its series with the most images.
    """
    images = {item.image_path.resolve(): item for item in inputs if item.image_path is not None}
    series = [item for item in inputs if item.image_path is None]
    files = {id(item): {Path(str(ds.filename)).resolve() for ds in item.datasets if getattr(ds, "filename", None)}
             for item in series}
    uids = {id(item): {str(getattr(ds, attr, "")) for ds in item.datasets[:1] for attr in ("StudyInstanceUID", "SeriesInstanceUID")}
            for item in series}
    owner: dict[int, LabelRow] = {}  # id(input) -> the row that labels it
    beside: set[str] = set()

    def names_beside_labels() -> set[str]:
        """File names anywhere under the CSV's folder (read once): a bare name found there is a labelled
        file that is not among the inputs, not an unknown one."""
        if not beside:
            beside.update(path.name for path in labels_dir.rglob("*") if path.is_file())
            beside.add("")  # read
        return beside
    units: list[Unit] = []
    unmatched: list[LabelRow] = []

    def claim(row: LabelRow, items: list[LocalInput], same_series: bool = False) -> bool:
        """Record which row labels these inputs; False: a file of a series another row already labels alike."""
        for item in items:
            other = owner.get(id(item))
            if other is not None and other.line != row.line:
                if same_series and other.truth == row.truth and other.cls == row.cls:
                    return False
                raise LabelsError(f"line {row.line} and line {other.line} both label {item.name}")
        for item in items:
            owner[id(item)] = row
        return True

    for row in rows:
        if row.truth is None:
            continue
        target = Path(row.value) if Path(row.value).is_absolute() else labels_dir / row.value
        target = target.resolve()
        if row.kind == "file":
            found: list[LocalInput] = []
            if target in images:
                found = [images[target]]
            else:
                found = [item for item in series if target in files[id(item)]][:1]
            if not found and not target.exists():  # a bare file name (e.g. NIH metadata.csv): unique among the inputs?
                named = [item for path, item in images.items() if path.name == Path(row.value).name]
                if len(named) > 1:
                    raise LabelsError(f"line {row.line}: file {row.value!r} names {len(named)} inputs; give its path "
                                      f"relative to the CSV's folder")
                found = named
                if not found and not (Path(row.value).name == row.value and row.value in names_beside_labels()):
                    raise LabelsError(f"line {row.line}: file {row.value!r} not found (relative to {labels_dir}) "
                                      f"and no input has that name")
            if not found:
                unmatched.append(row)  # labelled, exists, but not among the inputs
                continue
            if claim(row, found, same_series=found[0].image_path is None):
                units.append(Unit(found[0].name, row, found))
            continue
        by_path = target.is_dir()
        dicom = [item for item in series if row.value in uids[id(item)]
                 or (by_path and any(_under(f, target) for f in files[id(item)]))
                 or (not by_path and any(f.parent.name == row.value for f in files[id(item)]))]
        slices = sorted((item for path, item in images.items()
                         if (by_path and _under(path, target)) or (not by_path and path.parent.name == row.value)),
                        key=lambda item: str(item.image_path))
        if dicom and slices:
            raise LabelsError(f"line {row.line}: study {row.value!r} holds both DICOM and image files")
        if dicom:
            chosen = max(dicom, key=lambda item: len(item.datasets))  # the service reads the largest series
            claim(row, dicom)
            note = f"{len(dicom) - 1} other series not read (the service reads the largest)" if len(dicom) > 1 else ""
            units.append(Unit(row.value, row, [chosen], note))
        elif slices:
            claim(row, slices)
            note = f"{len(slices)} images pooled as one series in file-name order" if len(slices) > 1 else ""
            units.append(Unit(row.value, row, slices, note))
        else:
            unmatched.append(row)
    unlabelled = [item.name for item in inputs if id(item) not in owner]
    return units, unlabelled, unmatched


@dataclass
class Scored:
    unit: Unit
    probabilities: dict[str, float]  # study-level, per trained label
    slices: int
    results: list[dict[str, Any]]  # `triage --json` objects of the unit's inputs


def score_units(units: Sequence[Unit], registry: ModelRegistry, settings: Settings, task: Task,
                progress: bool) -> tuple[list[Scored], list[dict[str, str]]]:
    """Each unit scored through `triage_input` (no Grad-CAM); pooled as the card says when a unit is
    a folder of images. Units whose inputs cannot be triaged are returned as failures with the reason."""
    from tqdm import tqdm

    card = registry.get(task).card
    scored: list[Scored] = []
    failed: list[dict[str, str]] = []
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
    return scored, failed


def decision_score(task: Task, probabilities: dict[str, float]) -> float:
    """The score the measured decision compares with its threshold."""
    if has_presence_rule(task):
        negative = next(label for label in TASK_LABELS[task] if label in NEGATIVE_LABELS)
        return 1.0 - probabilities[negative]
    return probabilities[TASK_LABELS[task][0]]


def card_threshold(card: ModelCard) -> float:
    return card.presence_threshold if has_presence_rule(card.task) and card.presence_threshold is not None \
        else card.thresholds[main_label(card.task)]


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
    """The site threshold file's entry for this task: the highest threshold reaching `target`
    sensitivity on these studies, and what it did here."""
    y = np.array([u["truth"] for u in doc["units"]], dtype=bool)
    p = np.array([u["score"] for u in doc["units"]], dtype=np.float64)
    if not y.any():
        raise ValueError("no positive study: a threshold for a sensitivity cannot be chosen")
    threshold = min(threshold_for_sensitivity(y, p, target), 0.999999)
    if threshold <= 0.0:
        raise ValueError(f"sensitivity {target} needs a threshold of 0 here (a positive scored 0): it would raise every study")
    point = operating_point(y, p, threshold)
    metrics = doc["metrics"]
    return {
        "model": card.name, "card_version": card.version, "thresholds": {main_label(card.task): threshold},
        "target_sensitivity": target, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "chosen_on": {"unit": doc["unit"], "n": metrics["n"], "positives": metrics["positives"],
                      "negatives": metrics["negatives"], "labels": str(labels), "auc": metrics["auc"],
                      "sensitivity": point["sensitivity"], "specificity": point["specificity"], "ppv": point["ppv"],
                      **({"report": str(report)} if report else {}), "warnings": metrics["warnings"]},
    }


# --- the report ------------------------------------------------------------------------------------------


def _ci(block: dict[str, Any] | None, digits: int = 3) -> str:
    """'0.912 (0.871–0.944; 93/102)', or 'n/a'."""
    return format_estimate(block, digits, missing="n/a")


def operating_rows(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    metrics = doc["metrics"]
    rows = [(name, point) for name, point in metrics["at_thresholds"].items()]
    rows += [(f"sensitivity ≥ {point['target_sensitivity']:.2f} here", point) for point in metrics["at_target_sensitivity"]]
    return rows


def summary_lines(doc: dict[str, Any], report: Path | None) -> list[str]:
    """What the terminal shows."""
    m = doc["metrics"]
    lines = [f"{doc['task']}: {doc['model']['name']} {doc['model']['version']} on {m['n']} {doc['unit']} units "
             f"({m['positives']} positive, {m['negatives']} negative); score {doc['score']}",
             f"AUC {_ci(m['auc'])} [{m['auc']['interval']}]"]
    for name, point in operating_rows(doc):
        lines.append(f"  {name:<28} t={point['threshold']:.4f}  sensitivity {_ci(point['sensitivity'], 2)}  "
                     f"specificity {_ci(point['specificity'], 2)}  PPV {_ci(point['ppv'], 2)}")
    cal = m["calibration"]
    lines.append(f"calibration: Brier {cal['brier']} (always saying the prevalence: {cal['brier_at_prevalence']}), "
                 f"ECE {cal['ece']} over {cal['bin_count']} bins")
    for label, sub in doc.get("subtypes", {}).items():
        lines.append(f"  {label}: AUC {_ci(sub['auc'])}, {sub['positives']} positive")
    lines += [f"warning: {w}" for w in m["warnings"] + doc.get("skipped_warnings", [])]
    lines += [f"note: {n}" for n in doc.get("notes", [])]
    if report:
        lines.append(f"report: {report}")
    return lines


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.tight_layout()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def plots(doc: dict[str, Any]) -> dict[str, str]:
    """ROC, precision-recall and calibration plots as inline SVG (matplotlib, which the project depends on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = np.array([u["truth"] for u in doc["units"]], dtype=bool)
    p = np.array([u["score"] for u in doc["units"]], dtype=np.float64)
    m = doc["metrics"]
    out: dict[str, str] = {}
    marks = operating_rows(doc)
    if y.any() and (~y).any():
        fig, ax = plt.subplots(figsize=(4.6, 4.4))
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"AUC {_ci(m['auc'])}")
        for name, point in marks:
            ax.plot(1 - point["specificity"]["value"], point["sensitivity"]["value"], "o", label=f"{name} ({point['threshold']:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC ({m['positives']} positive, {m['negatives']} negative)")
        ax.legend(loc="lower right", fontsize=7)
        out["roc"] = _svg(fig)
        fig, ax = plt.subplots(figsize=(4.6, 4.4))
        precision, recall, _ = precision_recall_curve(y, p)
        ax.plot(recall, precision, drawstyle="steps-post", label=f"average precision {m['average_precision']}")
        ax.axhline(y.mean(), color="k", ls=":", lw=0.8, label=f"prevalence {y.mean():.2f}")
        for name, point in marks:
            if point["ppv"]["value"] is not None:
                ax.plot(point["sensitivity"]["value"], point["ppv"]["value"], "o", label=name)
        ax.set(xlabel="sensitivity (recall)", ylabel="PPV (precision)", title="Precision-recall", ylim=(0, 1.02))
        ax.legend(loc="lower left", fontsize=7)
        out["pr"] = _svg(fig)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    bins = m["calibration"]["bins"]
    if bins:
        x = [b["mean_predicted"] for b in bins]
        obs = [b["observed"]["value"] for b in bins]
        err = [[o - b["observed"]["ci95"][0] for o, b in zip(obs, bins)], [b["observed"]["ci95"][1] - o for o, b in zip(obs, bins)]]
        ax.errorbar(x, obs, yerr=err, fmt="o-", capsize=3, label="observed share positive (Wilson 95%)")
        for xi, oi, b in zip(x, obs, bins):
            ax.annotate(f"n={b['n']}", (xi, oi), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    ax.set(xlabel="mean predicted score", ylabel="observed share positive", xlim=(0, 1), ylim=(-0.02, 1.02),
           title=f"Calibration: Brier {m['calibration']['brier']}, ECE {m['calibration']['ece']}")
    ax.legend(loc="lower right", fontsize=7)
    out["calibration"] = _svg(fig)
    return out


def html_report(doc: dict[str, Any]) -> str:
    """One self-contained HTML page: figures, warnings, plots (inline SVG), every study's score."""
    e = html.escape
    m = doc["metrics"]
    svgs = plots(doc)
    warnings = m["warnings"] + doc.get("skipped_warnings", [])
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Local validation: {e(doc['task'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:72rem;margin:1rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}"
        ".warning{background:#fff3cd;border:1px solid #e0c36b;padding:.5rem 1rem}.plots{display:flex;flex-wrap:wrap;gap:1rem}"
        "figure{margin:0}</style></head><body>",
        f"<h1>Local validation of {e(doc['model']['name'])} {e(doc['model']['version'])} ({e(doc['task'])})</h1>",
        f"<p>{m['n']} labelled {e(doc['unit'])} units ({m['positives']} positive, {m['negatives']} negative) from "
        f"<code>{e(str(doc.get('labels', '')))}</code>, scored {e(str(doc.get('created', '')))} exactly as "
        f"<code>cds-triage triage</code> and the service score them. Score: {e(doc['score'])}.</p>",
        "<p><strong>AI-generated triage, preliminary, not a diagnosis.</strong> Every figure comes with its 95% interval: "
        "Wilson score intervals for proportions (with the count), a stratified bootstrap for the AUC. Thresholds chosen "
        "for a sensitivity on this same set reach it by construction: read the specificity beside them.</p>",
    ]
    if warnings or doc.get("notes"):
        parts.append("<div class='warning' id='warnings'><strong>Read this first</strong><ul>"
                     + "".join(f"<li>{e(w)}</li>" for w in warnings + doc.get("notes", [])) + "</ul></div>")
    parts += [f"<h2>Discrimination</h2><p>AUC {e(_ci(m['auc']))} ({e(m['auc']['interval'])}); average precision "
              f"{e(str(m['average_precision']))}.</p>",
              "<h2>Operating points</h2><table><tr><th>threshold</th><th>value</th><th>sensitivity</th><th>specificity</th>"
              "<th>PPV</th><th>NPV</th><th>raised</th><th>TP / FP / FN / TN</th></tr>"]
    for name, point in operating_rows(doc):
        parts.append(f"<tr><td>{e(name)}</td><td>{point['threshold']:.4f}</td>"
                     + "".join(f"<td>{e(_ci(point[k]))}</td>" for k in ("sensitivity", "specificity", "ppv", "npv", "raised"))
                     + f"<td>{point['tp']} / {point['fp']} / {point['fn']} / {point['tn']}</td></tr>")
    parts.append("</table>")
    if doc.get("subtypes"):
        parts.append("<h2>Subtypes</h2><table><tr><th>subtype</th><th>positive / negative</th><th>AUC</th>"
                     "<th>sensitivity at the card's threshold</th><th>specificity</th></tr>")
        for label, sub in doc["subtypes"].items():
            point = sub["at_card_threshold"]
            parts.append(f"<tr><td>{e(label)}</td><td>{sub['positives']} / {sub['negatives']}</td><td>{e(_ci(sub['auc']))}</td>"
                         f"<td>{e(_ci(point['sensitivity']))}</td><td>{e(_ci(point['specificity']))}</td></tr>")
        parts.append("</table>")
    if doc.get("raised_per_class"):
        names = list(next(iter(doc["raised_per_class"].values())))
        parts.append("<h2>Raised per class</h2><table><tr><th>class</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        for cls, shares in doc["raised_per_class"].items():
            parts.append(f"<tr><td>{e(cls)}</td>" + "".join(f"<td>{e(_ci(shares[n]))}</td>" for n in names) + "</tr>")
        parts.append("</table>")
    cal = m["calibration"]
    parts.append(f"<h2>Calibration</h2><p>Brier score {cal['brier']} (always saying the prevalence scores "
                 f"{cal['brier_at_prevalence']}); expected calibration error {cal['ece']} over {cal['bin_count']} "
                 f"equal-width bins; mean score {cal['mean_predicted']} against a prevalence of {cal['prevalence']}.</p>"
                 "<table><tr><th>bin</th><th>studies</th><th>mean score</th><th>observed share positive</th></tr>"
                 + "".join(f"<tr><td>{b['lower']:.1f}–{b['upper']:.1f}</td><td>{b['n']}</td><td>{b['mean_predicted']}</td>"
                           f"<td>{e(_ci(b['observed']))}</td></tr>" for b in cal["bins"]) + "</table>")
    parts.append("<h2>Plots</h2><div class='plots'>")
    for key, caption in (("roc", "ROC"), ("pr", "Precision-recall"), ("calibration", "Calibration (reliability)")):
        if key in svgs:
            parts.append(f"<figure id='{key}-plot'>{svgs[key]}<figcaption>{caption}</figcaption></figure>")
    parts.append("</div>")
    if doc.get("site_thresholds"):
        written = doc["site_thresholds"]
        parts.append(f"<h2>Site threshold written</h2><p><code>{e(written['file'])}</code>: "
                     f"{e(json.dumps(written['entry']['thresholds']))} for sensitivity {written['entry']['target_sensitivity']} "
                     f"(set <code>CDS_SITE_THRESHOLDS={e(written['file'])}</code> for the service to use it).</p>")
    parts.append("<h2>Studies</h2><details><summary>every labelled unit with its score</summary><table>"
                 "<tr><th>line</th><th>unit</th><th>truth</th><th>score</th><th>slices</th><th>note</th></tr>"
                 + "".join(f"<tr><td>{u['line']}</td><td>{e(u['name'])}</td><td>{u['truth']}{' ' + e(u['class']) if u.get('class') else ''}"
                           f"</td><td>{u['score']:.4f}</td><td>{u['slices']}</td><td>{e(u.get('note', ''))}</td></tr>"
                           for u in doc["units"]) + "</table></details>")
    for key, title in (("failed", "Could not be scored"), ("unlabelled", "Inputs without a label (skipped)"),
                       ("unmatched_rows", "Labels that match no input (skipped)")):
        if doc.get(key):
            listed = doc[key][:LISTED]
            more = f"<li>… and {len(doc[key]) - LISTED} more (all in --json)</li>" if len(doc[key]) > LISTED else ""
            parts.append(f"<h2>{title} ({len(doc[key])})</h2><ul>"
                         + "".join(f"<li>{e(json.dumps(x) if isinstance(x, dict) else str(x))}</li>" for x in listed)
                         + more + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --- the command -------------------------------------------------------------------------------------------


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="DICOM files/folders or images, as for `cds-triage triage`")
    parser.add_argument("--task", required=True, choices=[t.value for t in Task])
    parser.add_argument("--labels", required=True, type=Path, help="CSV: file or study, label[, subtypes]")
    parser.add_argument("--report", type=Path, help="the HTML report (default validate-<task>.html here)")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON instead of the summary")
    parser.add_argument("--write-thresholds", type=Path, metavar="FILE",
                        help="write (or update) the site threshold file for CDS_SITE_THRESHOLDS")
    parser.add_argument("--target-sensitivity", type=float, default=0.95,
                        help="sensitivity the written threshold reaches on these studies (default 0.95)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the AUC interval (default 2000)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")


def run_validate(args: argparse.Namespace, settings: Settings) -> int:
    """Exit status: 0 done, 1 some labelled inputs could not be scored (the figures leave them out),
    2 unusable labels or inputs."""
    task = Task(args.task)

    def refuse(message: str) -> int:
        print(f"cds-triage validate: {message}", file=sys.stderr)
        return 2

    if not 0.0 < args.target_sensitivity < 1.0:
        return refuse(f"--target-sensitivity must be between 0 and 1, not {args.target_sensitivity}")
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
        scored, failed = score_units(units, registry, settings, task, progress=not args.no_progress and sys.stderr.isatty())
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
