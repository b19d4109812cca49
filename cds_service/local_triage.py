"""`cds-triage triage PATH…`: the same preprocessing, model and Grad-CAM on local files.

No servers: useful to check a model on a few studies, and the quickest way to see what
the service would conclude. DICOM folders are grouped by series; PNG/JPEG need --task.

A series is scored like the worker scores one: slice by slice as it is decoded, each batch while the
next slices are decoded (by the decoder processes for a large series), keeping of each slice only its
header; the driving slice and the input check's middle slices are read again from their files.

An input that cannot be triaged (a missing path, an unreadable file, a folder with nothing to read, no
model) is one `failed` (or `model_unavailable`) row naming it, and the batch goes on. Exit status
(`EXIT_STATUSES`): 0 every input was triaged (done or not_applicable), 1 at least one was not, 2 the
command line or a setting is wrong.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pydicom

from cds_service.core.anatomy import dataset_shape, middle_slices
from cds_service.core.decoding import decode_pool, known_position, positions_order, prepare_file, prepare_values_file, slab_decoders
from cds_service.core.domain import Study, Task, TriageResult, TriageStatus
from cds_service.core.errors import BadDicomError, ModelUnavailableError, TriageError
from cds_service.core.inference import score_stream
from cds_service.core.input_profile import image_statistics, series_verdict
from cds_service.core.models import LoadedModel, ModelRegistry
from cds_service.adapters.pacs import series_from_dataset, sort_slices
from cds_service.core.preprocessing import as_model_input, dicom_to_image, dicom_to_model_input, grey_to_image, load_grey, read_dicom, resize
from cds_service.core.routing import not_applicable_reason, pixel_candidates, task_for_series, task_from_pixels
from cds_service.core.settings import Settings
from cds_service.core.slabs import SlabPlan, plan_slabs, slab_image, slab_inputs
from cds_service.core.triage import triage_images, triage_scores

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
# A series at least this long is decoded by the decoder processes (CDS_DECODE_PROCESSES); a shorter
# one by the decoder threads (CDS_DECODE_THREADS) or in this thread: starting the decoder processes
# (about a second) would cost more than they save.
POOL_MIN_SLICES = 32

EXIT_STATUSES = """exit status:
  0  every input was triaged (done, or not_applicable with the reason)
  1  at least one input was not: unreadable, no model for it, or a folder with nothing to read
     (its row says why; the other inputs are still triaged)
  2  bad command line or setting (the message names it)"""

# The modalities each task's model reads: `--task` on another modality warns and marks the row.
TASK_MODALITIES: dict[Task, tuple[str, ...]] = {
    Task.HEAD_CT_ICH: ("CT",),
    Task.BRAIN_MRI: ("MR",),
    Task.CHEST_PNEUMOTHORAX: ("CR", "DX"),
}


@dataclass
class LocalInput:
    """One unit of output: a single image file, or one DICOM series."""

    name: str
    datasets: list[pydicom.Dataset] = field(default_factory=list)
    image_path: Path | None = None
    error: str | None = None  # could not be read (with `unreadable_rows`): a failed row naming it


def looks_like_dicom(file: Path) -> bool:
    """A file meant to be DICOM (its suffix, or the DICM marker after the preamble): unreadable, it is reported."""
    if file.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with file.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def collect_inputs(paths: list[Path], *, unreadable_rows: bool = False) -> list[LocalInput]:
    """Files as given; folders walked, their DICOM files grouped by SeriesInstanceUID.

    By default a missing path or an unreadable file given by name raises TriageError and unreadable
    files in folders are skipped; with `unreadable_rows` (`cds-triage triage`) each is an input with
    `error` set, and so is a folder with nothing to read, so that the batch goes on and says so."""
    inputs: list[LocalInput] = []
    for path in paths:
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            inputs.append(LocalInput(name=str(path), image_path=path))
        elif path.is_file():
            try:
                inputs.append(LocalInput(name=str(path), datasets=[read_dicom(path)]))
            except TriageError as exc:
                if not unreadable_rows:
                    raise
                inputs.append(LocalInput(name=str(path), error=str(exc)))
        elif path.is_dir():
            found: list[LocalInput] = []
            series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
            others = 0
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(LocalInput(name=str(file), image_path=file))
                    continue
                try:
                    ds = headers_of(read_dicom(file))
                except TriageError as exc:
                    if unreadable_rows and looks_like_dicom(file):
                        found.append(LocalInput(name=str(file), error=str(exc)))
                    else:
                        others += 1  # not DICOM: README files, thumbnails
                    continue
                series[str(getattr(ds, "SeriesInstanceUID", file))].append(ds)
            for uid, datasets in series.items():
                found.append(LocalInput(name=f"{path}#{uid}", datasets=sort_slices(datasets)))
            if not found and unreadable_rows:
                what = f"no DICOM, PNG or JPEG file among its {others} files" if others else "empty folder"
                found.append(LocalInput(name=str(path), error=f"nothing to triage: {what}"))
            inputs.extend(found)
        elif unreadable_rows:
            inputs.append(LocalInput(name=str(path), error="no such file or folder"))
        else:
            raise TriageError(f"{path}: no such file or folder")
    return inputs


def headers_of(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A slice read from a file, without its pixel data (read again from `ds.filename` when decoded):
    a folder's series is not held in memory while it waits its turn, nor while it is scored."""
    if "PixelData" in ds and isinstance(getattr(ds, "filename", None), (str, Path)):
        del ds.PixelData
    return ds


def with_pixels(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The slice with its pixel data: itself, or read again from its file (`headers_of`)."""
    if "PixelData" in ds or not isinstance(getattr(ds, "filename", None), (str, Path)):
        return ds
    return read_dicom(ds.filename)


def modality_warning(item: LocalInput, task: Task | None) -> str | None:
    """Why the forced `--task` does not fit this DICOM input's modality (None: it fits, or nothing to compare)."""
    if task is None or not item.datasets:
        return None
    modality = str(getattr(item.datasets[0], "Modality", "") or "").upper()
    expected = TASK_MODALITIES.get(task, ())
    if not modality or not expected or modality in expected:
        return None
    return (f"--task {task.value} reads {' or '.join(expected)} images; this input is {modality}: "
            "the model was not made for it")


def _dicom_image(ds: pydicom.Dataset, model: LoadedModel, model_size: bool = False) -> np.ndarray:
    """One slice as the model's input (`model_size`: at the model's size, as `dicom_to_model_input`
    gives it); a slice that cannot be decoded names its file."""
    try:
        full = with_pixels(ds)
        spec = model.card.preprocessing
        return dicom_to_model_input(full, spec) if model_size else dicom_to_image(full, spec)
    except BadDicomError as exc:
        filename = getattr(ds, "filename", None)
        if isinstance(filename, (str, Path)) and str(filename) not in str(exc):
            raise BadDicomError(f"{filename}: {exc}") from exc
        raise


def triage_input(item: LocalInput, registry: ModelRegistry, settings: Settings, task: Task | None,
                 with_heatmap: bool = True) -> TriageResult:
    """Route (given task, else DICOM header, else pixels), check the input fits the model, score
    (`with_heatmap=False`: the same scores without Grad-CAM, for `cds-triage validate`)."""
    if item.image_path is not None:
        if task is None:
            raise TriageError(f"{item.name}: PNG/JPEG input needs --task")
        model = registry.get(task)
        images = [grey_to_image(load_grey(item.image_path), model.card.preprocessing)]
        return _checked_triage(model, images, registry, settings, study_uid=item.name, with_heatmap=with_heatmap)
    first = item.datasets[0]
    study_uid = str(getattr(first, "StudyInstanceUID", "") or item.name)
    series = series_from_dataset(first, len(item.datasets), fallback_uid=item.name)
    study = Study(uid=study_uid, series=(series,))
    chosen = task or task_for_series(series)
    looked = chosen is None and bool(pixel_candidates(study))
    if looked:
        chosen = task_from_pixels(with_pixels(item.datasets[len(item.datasets) // 2]), registry.pixel_models())
    if chosen is None:
        return TriageResult(study_uid=study_uid, status=TriageStatus.NOT_APPLICABLE, series_uid=series.uid,
                            reason=not_applicable_reason(study, with_fhir=False, pixels_looked_at=looked))
    return _streamed_triage(registry.get(chosen), item.datasets, registry, settings, study_uid=study_uid,
                            series_uid=series.uid, with_heatmap=with_heatmap)


def local_plan(datasets: Sequence[pydicom.Dataset], model: LoadedModel) -> SlabPlan | None:
    """The slab plan of a folder's series (`core.slabs`, from the headers already read), or None where
    each slice is read alone: the card asks for no slabs, the slices are not all in files, their SOP
    Instance UIDs repeat, or the plan has no slab of more than one slice."""
    slab_mm, spec = model.card.series_pooling.slab_mm, model.card.preprocessing
    if slab_mm is None or spec.kind != "ct_windows" or len(datasets) < 2:
        return None
    sops = [str(getattr(ds, "SOPInstanceUID", "") or "") for ds in datasets]
    if not all(isinstance(getattr(ds, "filename", None), (str, Path)) for ds in datasets) or len(set(sops)) != len(sops):
        return None
    plan = plan_slabs([known_position(ds) for ds in datasets], slab_mm)
    return plan if plan.slabbed else None


def _streamed_triage(model: LoadedModel, datasets: Sequence[pydicom.Dataset], registry: ModelRegistry,
                     settings: Settings, *, study_uid: str, series_uid: str, with_heatmap: bool) -> TriageResult:
    """A DICOM series scored as the worker scores one (`pipeline.run_triage`): each slice decoded and
    scored as it comes, its model input then dropped; the input check's middle slices and the driving
    slice decoded again. The same numbers as decoding every slice first (tests/test_large_studies.py).
    A thin-slice series is read as slabs (`core.slabs`, the worker's code): each slice decoded to HU and
    summed into its slab, the driving slab's slices read again and averaged for Grad-CAM."""
    task, spec = model.card.task, model.card.preprocessing
    statistics: list[np.ndarray] = []
    files = [getattr(ds, "filename", None) for ds in datasets]
    plan = local_plan(datasets, model)
    # decoder processes for a long series only; a series read as slabs as the worker reads it
    pool = decode_pool(settings.decode_processes if len(datasets) >= POOL_MIN_SLICES else 0)
    if plan is not None:
        pool = slab_decoders(pool, settings.decode_threads)
    pooled = (pool.workers > 0
              and all("PixelData" not in ds and isinstance(f, (str, Path)) for ds, f in zip(datasets, files)))
    slab_order: list[tuple[float, float]] = []

    def model_inputs() -> Iterator[np.ndarray]:
        if plan is not None:
            decoded = (pool if pooled else decode_pool(0)).map(prepare_values_file, [str(f) for f in files], spec)
            sops = [str(ds.SOPInstanceUID) for ds in datasets]
            for slab in slab_inputs(decoded, plan, sops, spec.input_size, spec.framing):
                statistics.append(slab.statistics)
                slab_order.append((float(slab.index), 0.0))
                yield slab.image
            return
        if pooled:
            for prepared in pool.map(prepare_file, [str(f) for f in files], spec):
                statistics.append(prepared.statistics)
                yield prepared.image
            return
        for ds in datasets:
            image = as_model_input(_dicom_image(ds, model, model_size=True))
            statistics.append(image_statistics(image))
            yield image

    expected = len(plan.groups) if plan is not None else len(datasets)
    scores = score_stream(model, model_inputs(), expected, settings.inference_batch_size, keep_features=False)
    sop_instance_uids = [str(getattr(ds, "SOPInstanceUID", "")) for ds in datasets]
    if plan is not None:  # slabs in anatomical order; each named by its middle slice, drawn as its slices' mean
        order = positions_order(slab_order)
        scores = scores.reordered(order)
        statistics = [statistics[index] for index in order]
        sop_instance_uids = [sop_instance_uids[index] for index in plan.middles()]

    def image_of_slice(index: int) -> np.ndarray:
        """The driving slice read again from its file, or the driving slab's slices read again and averaged."""
        if plan is None:
            return _dicom_image(datasets[index], model)
        return _slab_image([datasets[member] for member in plan.groups[index]], model)

    ct_shapes = None
    if task is Task.HEAD_CT_ICH and str(getattr(datasets[0], "Modality", "")).upper() == "CT":
        ct_shapes = [dataset_shape(with_pixels(datasets[index])) for index in middle_slices(len(datasets))]
    verdict = series_verdict(task, registry.input_profile(task), statistics, datasets[:1], ct_shapes=ct_shapes)
    if verdict.fits is False:
        return TriageResult(study_uid=study_uid, status=TriageStatus.NOT_APPLICABLE, task=task, series_uid=series_uid,
                            reason=verdict.reason, input_fit=verdict.fit, input_distance=verdict.distance)
    result = triage_scores(model, scores, image_of_slice, settings.priority_rules,
                           study_uid=study_uid, series_uid=series_uid, sop_instance_uids=sop_instance_uids,
                           with_heatmap=with_heatmap, slab_plan=plan)
    return replace(result, input_fit=verdict.fit, input_distance=verdict.distance)


def _slab_image(members: Sequence[pydicom.Dataset], model: LoadedModel) -> np.ndarray:
    """`slabs.slab_image` of slices read again from their files; one that cannot be decoded names its file."""
    full = []
    for ds in members:
        try:
            full.append(with_pixels(ds))
        except BadDicomError as exc:
            raise BadDicomError(f"{getattr(ds, 'filename', '')}: {exc}") from exc
    return slab_image(full, model.card.preprocessing)


def _checked_triage(model: LoadedModel, images: list[np.ndarray], registry: ModelRegistry, settings: Settings, *,
                    study_uid: str, series_uid: str = "", datasets: Sequence[pydicom.Dataset] = (),
                    with_heatmap: bool = True) -> TriageResult:
    """The service's input check (`input_profile.series_verdict`), then the triage itself."""
    task = model.card.task
    spec = model.card.preprocessing
    statistics = [image_statistics(resize(image, spec.input_size)) for image in images]
    verdict = series_verdict(task, registry.input_profile(task), statistics, datasets)
    if verdict.fits is False:
        return TriageResult(study_uid=study_uid, status=TriageStatus.NOT_APPLICABLE, task=task, series_uid=series_uid,
                            reason=verdict.reason, input_fit=verdict.fit, input_distance=verdict.distance)
    result = triage_images(model, images, settings.priority_rules, study_uid=study_uid, series_uid=series_uid,
                           sop_instance_uids=[str(getattr(ds, "SOPInstanceUID", "")) for ds in datasets],
                           batch_size=settings.inference_batch_size, with_heatmap=with_heatmap)
    return replace(result, input_fit=verdict.fit, input_distance=verdict.distance)


def result_json(name: str, result: TriageResult, task: Task | None = None) -> dict[str, object]:
    """The documented `--json` schema."""
    return {
        "input": name,
        "task": chosen.value if (chosen := result.task or task) else None,
        "status": result.status.value,
        "findings": [{"label": f.label, "probability": round(f.probability, 6), "positive": f.positive}
                     for f in result.findings if f.trained],
        "priority": result.suggested_priority.value if result.suggested_priority else None,
        "model": {"name": result.model.name, "version": result.model.version} if result.model else None,
        **({"instances": result.instances_read, "modelInputs": result.slices_scored} if result.slices_scored else {}),
        **({"slabMm": result.slab_mm} if result.slab_mm else {}),
        **({"reason": result.reason} if result.reason else {}),
    }


def heatmap_name(name: str, label: str, taken: set[str]) -> str:
    """The overlay's file name, after its input: `ct_001_any.png` for ct_001.dcm, `study_<series uid>_any.png`
    for a series of folder `study`; `-2`, `-3`… when two inputs would share a name."""
    folder, _, series_uid = name.partition("#")
    stem = f"{Path(folder).name}_{series_uid}" if series_uid else Path(folder).stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "input"
    base = f"{stem}_{label}"
    candidate, n = f"{base}.png", 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}.png"
    taken.add(candidate)
    return candidate


def failed_row(name: str, task: Task | None, reason: str, status: str = "failed") -> dict[str, object]:
    return {"input": name, "task": task.value if task else None, "status": status,
            "findings": [], "priority": None, "model": None, "reason": reason}


def triage_paths(paths: list[Path], settings: Settings, *, task: str | None, as_json: bool, heatmaps: Path | None) -> int:
    """Triage each input and print its row (one JSON object per line with `as_json`); the exit status
    as EXIT_STATUSES says."""
    forced = Task(task) if task else None
    registry = ModelRegistry(settings.weights_dir, settings.device, settings.inference_runtime, settings.inference_threads,
                             site_thresholds=settings.site_thresholds)  # what the service would conclude here
    exit_code = 0
    inputs = collect_inputs(paths, unreadable_rows=True)
    written: set[str] = set()
    for item in inputs:
        warning = modality_warning(item, forced)
        if warning:
            print(f"cds-triage triage: warning: {item.name}: {warning}", file=sys.stderr)
        out: dict[str, object]
        if item.error is not None:
            out = failed_row(item.name, forced, item.error)
            exit_code = 1
        else:
            try:
                result = triage_input(item, registry, settings, forced)
            except TriageError as exc:
                status = "model_unavailable" if isinstance(exc, ModelUnavailableError) else "failed"
                out = failed_row(item.name, forced, str(exc), status)
                exit_code = 1
            except Exception as exc:  # noqa: BLE001 - one input that breaks the code must not stop the batch
                out = failed_row(item.name, forced, f"could not be triaged: {type(exc).__name__}: {exc}")
                exit_code = 1
            else:
                out = result_json(item.name, result, forced)
                if heatmaps and result.heatmap:
                    heatmaps.mkdir(parents=True, exist_ok=True)
                    target = heatmaps / heatmap_name(item.name, result.heatmap.label, written)
                    target.write_bytes(result.heatmap.png)
                    out["heatmap"] = str(target)
        if warning:
            out["warning"] = warning
        if as_json:
            print(json.dumps(out), flush=True)
        elif out["status"] in ("failed", "model_unavailable"):
            print(f"{out['input']}: {out['status']}: {out['reason']}" + (f" [warning: {warning}]" if warning else ""),
                  flush=True)
        else:
            top = [f"{f['label']} {f['probability']:.2f}" for f in out["findings"] if f["positive"]]  # type: ignore[attr-defined]
            print(f"{out['input']}: {out['status']} {out['task'] or ''} → {', '.join(top) or 'no finding'}; priority {out['priority'] or 'unchanged'}"
                  + (f" ({out['reason']})" if out.get("reason") else "")
                  + (f" [warning: {warning}]" if warning else "")
                  + (f"; heatmap {out['heatmap']}" if out.get("heatmap") else ""), flush=True)
    return exit_code
