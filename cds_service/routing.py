"""Which model reads which series: a pure decision from DICOM header fields.

Modality, BodyPartExamined and SeriesDescription are filled inconsistently across
scanners, so each task accepts a few synonyms. Anything else is "not applicable":
recorded, but never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass

from .domain import Series, Study, Task

HEAD_WORDS = ("HEAD", "BRAIN", "SKULL", "CRANIUM", "CEREBR", "NEURO")
CHEST_WORDS = ("CHEST", "THORAX", "LUNG", "PA ", "CXR")
# Series that are not primary diagnostic images of the anatomy (AI output, scouts, reports).
EXCLUDED_WORDS = ("AI-GENERATED", "HEATMAP", "SCOUT", "LOCALIZER", "TOPOGRAM", "DOSE", "REPORT")


@dataclass(frozen=True)
class Route:
    """The chosen series and task for a study."""

    task: Task
    series: Series


def _text(series: Series) -> str:
    return f"{series.body_part} {series.description}".upper() + " "


def task_for_series(series: Series) -> Task | None:
    """The task for one series, or None when no model applies to it."""
    text = _text(series)
    if any(word in text for word in EXCLUDED_WORDS):
        return None
    modality = series.modality.upper()
    if modality == "CT" and any(word in text for word in HEAD_WORDS):
        return Task.HEAD_CT_ICH
    if modality == "MR" and any(word in text for word in HEAD_WORDS):
        return Task.BRAIN_MRI
    if modality in ("CR", "DX") and any(word in text for word in CHEST_WORDS):
        return Task.CHEST_PNEUMOTHORAX
    return None


def route_study(study: Study) -> Route | None:
    """Pick one series to triage: the applicable series with the most images.

    More images means the full volume rather than a partial reconstruction; ties go to
    the first series in PACS order, so the choice is stable across retries.
    """
    candidates = [(s, task) for s in study.series if (task := task_for_series(s)) is not None]
    if not candidates:
        return None
    series, task = max(candidates, key=lambda pair: pair[0].number_of_instances)
    return Route(task=task, series=series)


def describe(study: Study) -> str:
    """A one-line description of a study's series, for 'not applicable' reasons."""
    parts = [f"{s.modality or '?'}/{s.body_part or '?'} '{s.description}'" for s in study.series]
    return "; ".join(parts) or "no series"
