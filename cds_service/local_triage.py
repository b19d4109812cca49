"""`cds-triage triage PATH…`: the same preprocessing, model and Grad-CAM on local files.

No servers: useful to check a model on a few studies, and the quickest way to see what
the service would conclude. DICOM folders are grouped by series; PNG/JPEG need --task.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom

from .domain import Series, Study, Task, TriageResult, TriageStatus
from .errors import ModelUnavailableError, TriageError
from .input_profile import image_statistics, series_verdict
from .models import LoadedModel, ModelRegistry
from .pacs import series_from_dataset, sort_slices
from .preprocessing import dicom_to_image, grey_to_image, load_grey, read_dicom, resize
from .routing import not_applicable_reason, pixel_candidates, task_for_series, task_from_pixels
from .settings import Settings
from .triage import triage_images

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class LocalInput:
    """One unit of output: a single image file, or one DICOM series."""

    name: str
    datasets: list[pydicom.Dataset] = field(default_factory=list)
    image_path: Path | None = None


def collect_inputs(paths: list[Path]) -> list[LocalInput]:
    """Files as given; folders walked, their DICOM files grouped by SeriesInstanceUID."""
    inputs: list[LocalInput] = []
    for path in paths:
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            inputs.append(LocalInput(name=str(path), image_path=path))
        elif path.is_file():
            inputs.append(LocalInput(name=str(path), datasets=[read_dicom(path)]))
        elif path.is_dir():
            series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    inputs.append(LocalInput(name=str(file), image_path=file))
                    continue
                try:
                    ds = read_dicom(file)
                except TriageError:
                    continue  # not DICOM: README files, thumbnails
                series[str(getattr(ds, "SeriesInstanceUID", file))].append(ds)
            for uid, datasets in series.items():
                inputs.append(LocalInput(name=f"{path}#{uid}", datasets=sort_slices(datasets)))
        else:
            raise TriageError(f"{path}: no such file or folder")
    return inputs


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
        chosen = task_from_pixels(item.datasets[len(item.datasets) // 2], registry.pixel_models())
    if chosen is None:
        return TriageResult(study_uid=study_uid, status=TriageStatus.NOT_APPLICABLE, series_uid=series.uid,
                            reason=not_applicable_reason(study, with_fhir=False, pixels_looked_at=looked))
    model = registry.get(chosen)
    images = [dicom_to_image(ds, model.card.preprocessing) for ds in item.datasets]
    return _checked_triage(model, images, registry, settings, study_uid=study_uid, series_uid=series.uid,
                           datasets=item.datasets, with_heatmap=with_heatmap)


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
                            reason=verdict.reason)
    return triage_images(model, images, settings.priority_rules, study_uid=study_uid, series_uid=series_uid,
                         sop_instance_uids=[str(getattr(ds, "SOPInstanceUID", "")) for ds in datasets],
                         batch_size=settings.inference_batch_size, with_heatmap=with_heatmap)


def result_json(name: str, result: TriageResult, task: Task | None = None) -> dict[str, object]:
    """The documented `--json` schema."""
    return {
        "input": name,
        "task": (result.task or task).value if (result.task or task) else None,
        "status": result.status.value,
        "findings": [{"label": f.label, "probability": round(f.probability, 6), "positive": f.positive}
                     for f in result.findings if f.trained],
        "priority": result.suggested_priority.value if result.suggested_priority else None,
        "model": {"name": result.model.name, "version": result.model.version} if result.model else None,
        **({"reason": result.reason} if result.reason else {}),
    }


def triage_paths(paths: list[Path], settings: Settings, *, task: str | None, as_json: bool, heatmaps: Path | None) -> int:
    forced = Task(task) if task else None
    registry = ModelRegistry(settings.weights_dir, settings.device, settings.inference_runtime, settings.inference_threads,
                             site_thresholds=settings.site_thresholds)  # what the service would conclude here
    exit_code = 0
    try:
        inputs = collect_inputs(paths)
    except TriageError as exc:
        print(f"cds-triage triage: {exc}", file=sys.stderr)
        return 1
    for index, item in enumerate(inputs):
        try:
            result = triage_input(item, registry, settings, forced)
        except TriageError as exc:
            status = "model_unavailable" if isinstance(exc, ModelUnavailableError) else "failed"
            out = {"input": item.name, "task": forced.value if forced else None, "status": status,
                   "findings": [], "priority": None, "model": None, "reason": str(exc)}
            exit_code = 1
        else:
            out = result_json(item.name, result, forced)
            if heatmaps and result.heatmap:
                heatmaps.mkdir(parents=True, exist_ok=True)
                (heatmaps / f"{index:03d}_{result.heatmap.label}.png").write_bytes(result.heatmap.png)
        if as_json:
            print(json.dumps(out))
        else:
            top = [f"{f['label']} {f['probability']:.2f}" for f in out["findings"] if f["positive"]]  # type: ignore[index]
            print(f"{out['input']}: {out['status']} {out['task'] or ''} → {', '.join(top) or 'no finding'}; priority {out['priority'] or 'unchanged'}"
                  + (f" ({out['reason']})" if out.get("reason") else ""))
    return exit_code
