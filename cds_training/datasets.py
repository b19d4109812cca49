# Over 400 lines on purpose: the three data sets' layouts and the one grouped split, which must be read together.
"""Training data on disk → labelled samples, a reproducible validation split, model input.

Two layouts are understood:
- class sub-folders: `<data>/<class>/*.{png,jpg,jpeg,dcm}`, the folder name giving the label
  (`brain_mri/notumor` → `no_tumor`; `head_ct_png/hemorrhage|normal` → `any` = 1|0);
- for head CT, the RSNA 2019 CSV: rows `ID,Label` with ID `ID_<image>_<subtype>`, images
  `ID_<image>.dcm` (or .png) in the CSV's folder or below it. Subtypes missing from the CSV
  stay "unknown" and are masked out of the loss;
- for head CT, a wide CSV `file,any,epidural,...` (one row per image, a path relative to the
  CSV's folder, 0/1 per label; `head_ct_rsna_png/labels.csv`);
- for head CT, every labelled RSNA source of the shared data folder at once (`RSNA_SOURCES`, given
  the folder that holds them: `--data ../shared/data`): the labelled PNGs, the 224 px radiologist's
  subset with its near-duplicate groups, and the challenge labels for images of the unlabelled
  folders (PNG and DICOM).

Images without a patient id (PNG conversions) are grouped by image similarity before the
split (`similarity_groups`), so that neighbouring slices of one scan stay on one side.

Pixels are read in `pixels.py`, through the service's own preprocessing only.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pydicom
import pydicom.errors

from cds_service.core.domain import TASK_LABELS, Task

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")

# Folder name (lower case) → the labels it sets to 1; an empty dict means "all known labels 0".
FOLDER_LABELS: dict[Task, dict[str, dict[str, float]]] = {
    Task.BRAIN_MRI: {
        "glioma": {"glioma": 1.0},
        "meningioma": {"meningioma": 1.0},
        "pituitary": {"pituitary": 1.0},
        "notumor": {"no_tumor": 1.0},
        "no_tumor": {"no_tumor": 1.0},
        "no_tumour": {"no_tumor": 1.0},
    },
    Task.HEAD_CT_ICH: {
        "hemorrhage": {"any": 1.0},
        "haemorrhage": {"any": 1.0},
        "ich": {"any": 1.0},
        "normal": {"any": 0.0},
        "no_hemorrhage": {"any": 0.0},
    },
    Task.CHEST_PNEUMOTHORAX: {
        "pneumothorax": {"pneumothorax": 1.0},
        "normal": {"pneumothorax": 0.0},
        "no_pneumothorax": {"pneumothorax": 0.0},
    },
}

# Folder names under the shared data dir, so `--data ../shared/data` also works.
DEFAULT_SUBDIRS: dict[Task, tuple[str, ...]] = {
    Task.BRAIN_MRI: ("brain_mri",),
    Task.HEAD_CT_ICH: ("head_ct_rsna_png", "head_ct_png", "head_ct_rsna"),
    Task.CHEST_PNEUMOTHORAX: ("chest_xray_ptx", "chest_pneumothorax", "chest_xray"),
}


@dataclass(frozen=True)
class Sample:
    """One training image: where it is, its truth per label, and the unit it is split by.

    `rel` is the path relative to the data directory: the key of the split and of the
    stored validation list. `group` is the patient where known, else `rel` itself.
    """

    rel: str
    path: Path
    targets: tuple[float, ...]
    known: tuple[bool, ...]
    group: str

    @property
    def stratum(self) -> str:
        """What the split and the balanced sampler stratify by: the first positive label's index.

        That is the class for softmax tasks, and `any` (label 0) vs negative for head CT, so
        rare subtype combinations in RSNA data do not each become a stratum of their own.
        """
        positive = [i for i, (t, k) in enumerate(zip(self.targets, self.known)) if k and t > 0.5]
        return str(positive[0]) if positive else "neg"


def resolve_data_dir(task: Task, data_dir: Path) -> Path:
    """The task's own folder: `data_dir` itself, or its known sub-folder for this task."""
    data_dir = Path(data_dir)
    if task is Task.HEAD_CT_ICH and is_rsna_sources_root(data_dir):
        return data_dir
    if _looks_like_task_dir(task, data_dir):
        return data_dir
    for name in DEFAULT_SUBDIRS[task]:
        if _looks_like_task_dir(task, data_dir / name):
            return data_dir / name
    raise FileNotFoundError(
        f"{data_dir} has neither class folders ({', '.join(sorted(FOLDER_LABELS[task]))})"
        + (" nor an RSNA ID,Label CSV" if task is Task.HEAD_CT_ICH else "")
    )


def _looks_like_task_dir(task: Task, path: Path) -> bool:
    if not path.is_dir():
        return False
    if task is Task.HEAD_CT_ICH and find_rsna_csv(path) is not None:
        return True
    return any((path / name).is_dir() for name in FOLDER_LABELS[task]) or any(
        p.is_dir() and p.name.lower() in FOLDER_LABELS[task] for p in path.iterdir()
    )


def find_rsna_csv(data_dir: Path) -> Path | None:
    """The first *.csv in `data_dir` in RSNA 2019 layout (`ID,Label`) or the wide `file,any,...` one."""
    for path in sorted(Path(data_dir).glob("*.csv")):
        with path.open(newline="") as f:
            header = [h.strip().lower() for h in next(csv.reader(f), [])]
        if header[:2] == ["id", "label"] or (header[:1] == ["file"] and "any" in header):
            return path
    return None


def discover_samples(task: Task, data_dir: Path) -> list[Sample]:
    """All labelled images of a task, sorted by relative path (the split depends on order)."""
    data_dir = resolve_data_dir(task, data_dir)
    if task is Task.HEAD_CT_ICH and is_rsna_sources_root(data_dir):
        samples = rsna_sources_samples(data_dir)
    elif task is Task.HEAD_CT_ICH and (csv_path := find_rsna_csv(data_dir)) is not None:
        samples = _rsna_samples(data_dir, csv_path)
    else:
        samples = _folder_samples(task, data_dir)
    if not samples:
        raise FileNotFoundError(f"no labelled images for {task.value} under {data_dir}")
    if task is Task.CHEST_PNEUMOTHORAX and (data_dir / "metadata.csv").is_file():
        samples = _with_patient_groups(samples, data_dir / "metadata.csv")
    return sorted(samples, key=lambda s: s.rel)


def _folder_samples(task: Task, data_dir: Path) -> list[Sample]:
    labels = TASK_LABELS[task]
    softmax = task is Task.BRAIN_MRI
    samples = []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        mapping = FOLDER_LABELS[task].get(folder.name.lower())
        if mapping is None:
            continue
        targets = tuple(mapping.get(label, 0.0) for label in labels)
        # softmax: every label is known (one-hot); sigmoid: only the labels the folder names
        known = tuple(softmax or label in mapping for label in labels)
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                rel = path.relative_to(data_dir).as_posix()
                samples.append(Sample(rel, path, targets, known, _group_of(path, rel)))
    return samples


def _rsna_samples(data_dir: Path, csv_path: Path) -> list[Sample]:
    labels = TASK_LABELS[Task.HEAD_CT_ICH]
    with csv_path.open(newline="") as f:
        header = [h.strip().lower() for h in next(csv.reader(f), [])]
    if header[:1] == ["file"]:
        return _wide_csv_samples(data_dir, csv_path)
    truth: dict[str, dict[str, float]] = defaultdict(dict)
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f, skipinitialspace=True):
            key = {k.strip().lower(): v for k, v in row.items() if k}
            image_id, _, subtype = key["id"].strip().rpartition("_")
            if subtype in labels and key.get("label", "").strip() != "":
                truth[image_id][subtype] = float(key["label"])
    files = {p.stem: p for p in sorted(data_dir.rglob("*")) if p.is_file() and p.suffix.lower() in (".dcm", ".png")}
    samples = []
    for image_id, values in sorted(truth.items()):
        path = files.get(image_id)
        if path is None:
            continue  # labelled but not supplied: RSNA CSVs list far more images than a sample set holds
        rel = path.relative_to(data_dir).as_posix()
        targets = tuple(values.get(label, 0.0) for label in labels)
        known = tuple(label in values for label in labels)
        samples.append(Sample(rel, path, targets, known, _group_of(path, rel)))
    return samples


def _wide_csv_samples(data_dir: Path, csv_path: Path, file_column: str = "file", root: Path | None = None) -> list[Sample]:
    """`file,any,epidural,...`: one row per image; a label column missing from the CSV is unknown.

    The file column's paths are relative to `data_dir`; `rel` (the split's key) is relative to `root`
    (default `data_dir`), so images of several sources under one root keep distinct keys."""
    labels = TASK_LABELS[Task.HEAD_CT_ICH]
    root = data_dir if root is None else root
    samples = []
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f, skipinitialspace=True):
            key = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            path = data_dir / key[file_column]
            if not path.is_file():
                raise FileNotFoundError(f"{csv_path} names {key[file_column]}, which is not in {data_dir}")
            targets = tuple(float(key[label]) if key.get(label) else 0.0 for label in labels)
            known = tuple(bool(key.get(label)) for label in labels)
            rel = path.relative_to(root).as_posix()
            samples.append(Sample(rel, path, targets, known, _group_of(path, rel)))
    return samples


# Every labelled RSNA 2019 source under the shared data folder: (what, CSV relative to the root, the CSV's
# file column, the folder its paths are relative to). Each image is an RSNA slice `ID_<sop>`; none is in
# two sources (checked by SOP id in `rsna_sources_samples`).
RSNA_SOURCES: tuple[tuple[str, str, str, str], ...] = (
    ("RSNA PNG conversion, labelled", "head_ct_rsna_png/labels.csv", "file", "head_ct_rsna_png"),
    ("a radiologist's 224 px RSNA subset", "head_ct_rsna_more/png224/labels.csv", "file", "head_ct_rsna_more/png224"),
    ("challenge labels for the unlabelled PNGs and DICOMs", "head_ct_rsna_more/labels_for_shared_unlabelled.csv",
     "shared_file", "."),
)
NEAR_DUPLICATES = ("head_ct_rsna_more/png224/labels.csv", "near_dup_group")


def is_rsna_sources_root(path: Path) -> bool:
    """The shared data folder that holds every RSNA source (`RSNA_SOURCES`)."""
    return all((Path(path) / csv_rel).is_file() for _, csv_rel, _, _ in RSNA_SOURCES)


def rsna_sources_samples(root: Path) -> list[Sample]:
    """Every labelled slice of `RSNA_SOURCES`, keyed by its path under `root`. A SOP id in two sources
    stops the split (the same slice on both sides of it would be leakage)."""
    samples: list[Sample] = []
    for _, csv_rel, column, base in RSNA_SOURCES:
        samples += _wide_csv_samples(root / base, root / csv_rel, column, root)
    seen: dict[str, str] = {}
    for s in samples:
        sop = Path(s.rel).stem
        if sop in seen:
            raise ValueError(f"{sop} is in two sources ({seen[sop]} and {s.rel}): it would be counted twice")
        seen[sop] = s.rel
    return samples


def source_of(rel: str) -> str:
    """Which of `RSNA_SOURCES` (or which folder) an image comes from: the card counts per source."""
    parts = rel.split("/")
    if rel.startswith("head_ct_rsna_more/png224/"):
        return "head_ct_rsna_more/png224"
    if len(parts) > 2 and parts[0] == "head_ct_rsna_png":
        return "/".join(parts[:2])
    return parts[0] if len(parts) > 1 else "."


def near_duplicate_links(root: Path) -> dict[str, str]:
    """rel → the near-duplicate group its source names (the 224 px subset's `near_dup_group`)."""
    csv_rel, column = NEAR_DUPLICATES
    path = Path(root) / csv_rel
    if not path.is_file():
        return {}
    base = path.parent.relative_to(root).as_posix()
    with path.open(newline="") as f:
        return {f"{base}/{row['file'].strip()}": f"{csv_rel}:{row[column].strip()}"
                for row in csv.DictReader(f) if row.get(column, "").strip()}


def _with_patient_groups(samples: list[Sample], metadata: Path) -> list[Sample]:
    """Group chest X-rays by the metadata's `Patient ID` (NIH: one patient, many follow-ups)."""
    with metadata.open(newline="") as f:
        patient = {row["file"].strip(): row["Patient ID"].strip() for row in csv.DictReader(f)}
    out = []
    for s in samples:
        name = Path(s.rel).name
        if name not in patient:
            raise ValueError(f"{metadata} has no Patient ID for {s.rel}: it could not be split by patient")
        out.append(replace(s, group=f"patient:{patient[name]}"))
    return out


# Pearson correlation of 96x96 grey thumbnails above which two images count as the same scan.
# Checked by eye on the RSNA PNGs: pairs above ~0.93 are neighbouring slices of one patient;
# 0.90 also links some look-alikes of different patients, which only makes the split stricter.
SIMILARITY_THUMBNAIL = 96
SIMILARITY_THRESHOLD = 0.90


def similarity_groups(samples: Sequence[Sample], threshold: float = SIMILARITY_THRESHOLD,
                      links: dict[str, str] | None = None) -> list[Sample]:
    """Join images without a patient into groups of near-identical pictures (single linkage).

    For data whose patient and series ids were lost (the RSNA PNG conversion): neighbouring
    slices of one scan look almost alike, and a split by image would put them on both sides.
    Images that already have a patient group keep it. `links` (rel → a key) joins the images
    that share a key as well (a source's own near-duplicate groups). The group is named after
    its first file.
    """
    from PIL import Image

    loose = [i for i, s in enumerate(samples) if s.group == s.rel]
    if len(loose) < 2:
        return list(samples)
    thumbs = np.empty((len(loose), SIMILARITY_THUMBNAIL * SIMILARITY_THUMBNAIL), np.float32)
    for row, i in enumerate(loose):
        if samples[i].path.suffix.lower() == ".dcm":
            return list(samples)  # DICOM without PatientID: nothing comparable here; split by image
        with Image.open(samples[i].path) as img:
            grey = img.convert("L").resize((SIMILARITY_THUMBNAIL, SIMILARITY_THUMBNAIL), Image.Resampling.BILINEAR)
        thumbs[row] = np.asarray(grey, np.float32).ravel()
    thumbs -= thumbs.mean(1, keepdims=True)
    thumbs /= np.linalg.norm(thumbs, axis=1, keepdims=True) + 1e-6
    parent = list(range(len(loose)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(loose), 512):  # blocks keep the similarity matrix small
        block = thumbs[start : start + 512] @ thumbs.T
        for a, b in zip(*np.nonzero(block > threshold)):
            a += start
            if a < b:
                parent[root(a)] = root(b)
    first_linked: dict[str, int] = {}
    for row, i in enumerate(loose):
        key = (links or {}).get(samples[i].rel)
        if key is not None:
            parent[root(row)] = root(first_linked.setdefault(key, row))
    first: dict[int, str] = {}
    for row, i in enumerate(loose):
        first.setdefault(root(row), samples[i].rel)
    out = list(samples)
    for row, i in enumerate(loose):
        out[i] = replace(samples[i], group=f"similar:{first[root(row)]}")
    return out


def _group_of(path: Path, rel: str) -> str:
    """The patient of a DICOM (so no patient is in both splits); the image itself otherwise.

    A DICOM whose header cannot be read stops the split with its name: splitting it on its own
    would put a patient's other images on the other side (leakage between train and validation)."""
    if path.suffix.lower() == ".dcm":
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError) as exc:
            raise ValueError(f"{rel}: cannot read its DICOM header to split by patient ({exc}); "
                             "remove or repair the file") from exc
        patient = str(getattr(ds, "PatientID", "") or "")
        if patient:
            return f"patient:{patient}"
    return rel


# --- the split -------------------------------------------------------------------------


def split_samples(samples: Sequence[Sample], seed: int, val_fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Deterministic, stratified train/validation split by group (patient, else image).

    Each group gets a rank from sha256(seed, group); within each stratum the lowest-ranked
    round(fraction * n) groups go to validation. It depends only on the sorted file list,
    the seed and the fraction (no RNG state, no library version), so training, evaluate
    and the tests all rebuild the same split.
    """
    train, val, _ = split_three(samples, seed, val_fraction, 0.0)
    return train, val


def ranked_groups(samples: Sequence[Sample], seed: int) -> list[list[str]]:
    """Per stratum (in sorted order), its groups ranked by sha256(seed, group): the one order every split deals from."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.rel):
        groups[s.group].append(s)
    strata: dict[str, list[str]] = defaultdict(list)
    for group, members in groups.items():
        strata[members[0].stratum].append(group)
    return [sorted(strata[stratum], key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest()) for stratum in sorted(strata)]


def split_three(samples: Sequence[Sample], seed: int, val_fraction: float,
                test_fraction: float) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """`split_samples` with a third, test split that chooses nothing (no epoch, no threshold).

    Within each stratum the lowest-ranked groups go to test, the next ones to validation;
    with `test_fraction` 0 the validation split is exactly `split_samples`'s.
    """
    if not 0.0 < val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 - val_fraction:
        raise ValueError("val_fraction and test_fraction must leave a training split")
    val_groups: set[str] = set()
    test_groups: set[str] = set()
    for ranked in ranked_groups(samples, seed):
        n_test = int(round(test_fraction * len(ranked)))
        test_groups.update(ranked[:n_test])
        ranked = ranked[n_test:]
        n_val = int(round(val_fraction * len(ranked) / (1.0 - test_fraction)))
        if len(ranked) >= 2:
            n_val = min(max(n_val, 1), len(ranked) - 1)  # both splits see every class
        val_groups.update(ranked[:n_val])
    by_rel = lambda s: s.rel  # noqa: E731
    train = [s for s in samples if s.group not in val_groups | test_groups]
    val = [s for s in samples if s.group in val_groups]
    test = [s for s in samples if s.group in test_groups]
    return sorted(train, key=by_rel), sorted(val, key=by_rel), sorted(test, key=by_rel)


def split_folds(samples: Sequence[Sample], seed: int, folds: int, fold: int) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Grouped, stratified K-fold cross-validation: fold `fold` is the test split, the next fold the
    validation split (early stopping, thresholds), the rest trains. Groups are dealt to folds in
    sha256(seed, group) order within each stratum, so every group is tested exactly once over the K runs."""
    if folds < 3 or not 0 <= fold < folds:
        raise ValueError("cross-validation needs at least 3 folds and a fold index below their number")
    fold_of: dict[str, int] = {}
    for ranked in ranked_groups(samples, seed):
        fold_of.update({group: place % folds for place, group in enumerate(ranked)})
    by_rel = lambda s: s.rel  # noqa: E731
    test = [s for s in samples if fold_of[s.group] == fold]
    val = [s for s in samples if fold_of[s.group] == (fold + 1) % folds]
    train = [s for s in samples if fold_of[s.group] not in (fold, (fold + 1) % folds)]
    return sorted(train, key=by_rel), sorted(val, key=by_rel), sorted(test, key=by_rel)


def probable_negatives(task: Task, folder: Path, part: str = "all") -> list[Sample]:
    """Unlabelled images taken as negatives for every label (training only, never for metrics).

    For the RSNA PNGs' `unlabelled/` folder, which is almost all normal slices (about 2 % may
    bleed): a wider view of normal anatomy (skull base, vertex) than the labelled slices give.
    `part` keeps "even" or "odd" files by sha256 of the name, so one half can train and the other
    check the rate of positives; "all" keeps every file.
    """
    labels = TASK_LABELS[task]
    out = []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        parity = "even" if hashlib.sha256(path.name.encode()).digest()[0] % 2 == 0 else "odd"
        if part in ("all", parity):
            rel = f"{Path(folder).name}/{path.relative_to(folder).as_posix()}"
            out.append(Sample(rel, path, tuple(0.0 for _ in labels), tuple(True for _ in labels), rel))
    if not out:
        raise FileNotFoundError(f"no images in {folder}")
    return out


def extra_labelled(task: Task, folder: Path) -> list[Sample]:
    """Labelled images of another source in the task's folder layout (for head CT: the Kaggle
    `head_ct_png/{hemorrhage,normal}`), for the training split only: the reported metrics stay on the
    main data's validation and test splits. Labels the folder does not name are unknown (masked)."""
    folder = Path(folder)
    out = [Sample(f"{folder.name}/{s.rel}", s.path, s.targets, s.known, f"{folder.name}/{s.group}")
           for s in _folder_samples(task, folder)]
    if not out:
        raise FileNotFoundError(f"no labelled images in {folder} (expected the task's class folders)")
    return out


def build_split(task: Task, data_dir: Path, split: dict) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Train / validation / test exactly as a card's `data.split` block describes them.

    The one place that turns a card (or a training config) into its split, so training,
    `evaluate` and the tests cannot disagree.
    """
    samples = discover_samples(task, data_dir)
    if split.get("grouping") == "similarity":
        samples = similarity_groups(samples, float(split.get("similarity_threshold", SIMILARITY_THRESHOLD)),
                                    near_duplicate_links(resolve_data_dir(task, data_dir)))
    if split.get("folds"):
        return split_folds(samples, int(split.get("seed", 42)), int(split["folds"]), int(split["fold"]))
    return split_three(samples, int(split.get("seed", 42)), float(split.get("val_fraction", 0.2)),
                       float(split.get("test_fraction", 0.0)))


def class_counts(samples: Iterable[Sample], labels: Sequence[str], softmax: bool) -> dict[str, int]:
    """Images per class (softmax) or positives/negatives per known label (sigmoid)."""
    samples = list(samples)
    if softmax:
        counts = Counter(labels[int(np.argmax(s.targets))] for s in samples)
        return {label: counts.get(label, 0) for label in labels}
    out: dict[str, int] = {}
    for j, label in enumerate(labels):
        known = [s for s in samples if s.known[j]]
        if known:
            out[f"{label}=1"] = sum(1 for s in known if s.targets[j] > 0.5)
            out[f"{label}=0"] = sum(1 for s in known if s.targets[j] <= 0.5)
    return out
