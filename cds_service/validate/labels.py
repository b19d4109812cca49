"""The labels CSV of `cds-triage validate`, read and matched with the inputs (which rows name which studies)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cds_service.core.domain import NEGATIVE_LABELS, TASK_LABELS, Task
from cds_service.core.site_thresholds import has_presence_rule
from cds_service.local_triage import LocalInput

CLASS_ALIASES = {"notumor": "no_tumor", "no tumor": "no_tumor", "no_tumour": "no_tumor", "no tumour": "no_tumor"}
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
