"""Which model reads which series: a pure decision on all the evidence, in a stated order.

1. DICOM: Modality with AnatomicRegionSequence (SNOMED CT codes), BodyPartExamined,
   SeriesDescription, ProtocolName, StudyDescription and RequestedProcedureDescription (filled
   inconsistently across scanners, and emptied by many de-identifiers, so each task accepts a few
   synonyms);
2. FHIR, where the EHR's ImagingStudy and order say more: ImagingStudy.series.bodySite,
   ImagingStudy.procedureCode, the ServiceRequest's code (SNOMED CT body sites, LOINC and RadLex
   Playbook procedure codes, or their text);
3. pixels: a cheap look at one image from the middle of each candidate series
   (`task_from_pixels`): a CT whose body is head-sized with no lung in it (`anatomy`), an MR or
   X-ray whose input fits the brain or chest model's input profile (`input_profile`);
4. nothing decides: "not applicable", with what was missing, never a guess.

Series that are AI output, scouts or reports are never read. The job records which evidence
decided (`Route.evidence`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import pydicom

from cds_service.core.anatomy import ct_series_verdict
from cds_service.core.body_parts import anatomy_of_words
from cds_service.core.domain import TASK_MODALITIES, Series, Study, Task
from cds_service.core.input_profile import InputProfile, image_statistics
from cds_service.core.preprocessing import PreprocessingSpec, dicom_to_image, resize

# Series that are not primary diagnostic images of the anatomy (AI output, scouts, reports).
EXCLUDED_WORDS = ("AI-GENERATED", "HEATMAP", "SCOUT", "LOCALIZER", "TOPOGRAM", "DOSE", "REPORT")

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RADLEX = "http://www.radlex.org"
# Body sites (SNOMED CT) and procedures (LOINC, RadLex Playbook) that say "head" or "chest".
HEAD_CODES = {(SNOMED, "69536005"), (SNOMED, "12738006"), (SNOMED, "774007"), (SNOMED, "118690002"),
              (LOINC, "30799-1"), (LOINC, "24725-4"), (LOINC, "24726-2"), (LOINC, "24727-0"), (LOINC, "24590-2"),
              (LOINC, "24591-0"), (LOINC, "24592-8"), (LOINC, "30655-7"), (RADLEX, "RPID16"), (RADLEX, "RPID22"),
              (RADLEX, "RPID1637")}
CHEST_CODES = {(SNOMED, "51185008"), (SNOMED, "43799004"), (SNOMED, "39607008"),
               (LOINC, "36643-5"), (LOINC, "24648-8"), (LOINC, "30745-4"), (LOINC, "36554-4"), (LOINC, "36687-2"),
               (RADLEX, "RPID2503"), (RADLEX, "RPID2484")}


@dataclass(frozen=True)
class Route:
    """The chosen series and task for a study, and the evidence that decided."""

    task: Task
    series: Series
    evidence: str = "dicom"


@dataclass(frozen=True)
class FhirHints:
    """What the EHR says about the study's anatomy: codings and free text, per source."""

    codings: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    texts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def header_text(series: Series) -> str:
    """Every header field of a series that may name its anatomy, as one text."""
    return (f"{series.anatomic_region_text} {series.body_part} {series.description} {series.protocol} "
            f"{series.study_description} {series.requested_procedure}").upper() + " "


def excluded(series: Series) -> bool:
    return any(word in header_text(series) for word in EXCLUDED_WORDS)


def task_for(modality: str, anatomy: str | None) -> Task | None:
    """The task for a modality and an anatomy ("head", "chest")."""
    modality = modality.upper()
    for task in (Task.HEAD_CT_ICH, Task.BRAIN_MRI) if anatomy == "head" else (Task.CHEST_PNEUMOTHORAX,) if anatomy == "chest" else ():
        if modality in TASK_MODALITIES[task]:
            return task
    return None


def anatomy_of_codes(codings: Iterable[tuple[str, str]]) -> str | None:
    found = set(codings)
    if found & HEAD_CODES:
        return "head"
    if found & CHEST_CODES:
        return "chest"
    return None


def task_for_series(series: Series) -> Task | None:
    """The task for one series from its DICOM header alone, or None."""
    if excluded(series):
        return None
    return task_for(series.modality, anatomy_of_codes(series.anatomic_region) or anatomy_of_words(header_text(series)))


def fhir_hints(imaging_study: Mapping[str, Any] | None, service_request: Mapping[str, Any] | None = None) -> FhirHints:
    """The anatomy evidence of an ImagingStudy (series.bodySite, procedureCode) and its order (code)."""
    def codings(concepts: Iterable[Any]) -> tuple[tuple[str, str], ...]:
        out = []
        for concept in concepts:
            if isinstance(concept, dict):
                items = concept.get("coding") if "coding" in concept else [concept]  # CodeableConcept or Coding
                out += [(str(c.get("system", "")), str(c.get("code", ""))) for c in items or [] if isinstance(c, dict)]
        return tuple(out)

    def texts(concepts: Iterable[Any]) -> tuple[str, ...]:
        out = []
        for concept in concepts:
            if isinstance(concept, dict):
                out += [str(concept.get("text") or "")] + [str(c.get("display") or "") for c in concept.get("coding") or []
                                                            if isinstance(c, dict)] + [str(concept.get("display") or "")]
        return tuple(t for t in out if t)

    study = imaging_study or {}
    sites = [s.get("bodySite") for s in study.get("series") or [] if isinstance(s, dict) and s.get("bodySite")]
    sources = {
        "ImagingStudy.series.bodySite": sites,
        "ImagingStudy.procedureCode": list(study.get("procedureCode") or []),
        "ServiceRequest.code": [service_request.get("code")] if service_request and service_request.get("code") else [],
    }
    return FhirHints(codings={k: codings(v) for k, v in sources.items()}, texts={k: texts(v) for k, v in sources.items()})


def anatomy_from_fhir(hints: FhirHints) -> tuple[str, str] | None:
    """(anatomy, source) from the first FHIR source that names one: codes first, then their text."""
    for source, found in hints.codings.items():
        if any(c in HEAD_CODES for c in found):
            return "head", source
        if any(c in CHEST_CODES for c in found):
            return "chest", source
    for source, words in hints.texts.items():
        anatomy = anatomy_of_words(" ".join(words))
        if anatomy:
            return anatomy, source
    return None


def route_study(study: Study, hints: FhirHints | None = None) -> Route | None:
    """Pick one series to triage, on the DICOM header first, then on the EHR's FHIR resources.

    Among applicable series the one with the most images wins (the full volume rather than a
    partial reconstruction); ties go to the first in PACS order, so retries choose alike.
    """
    readable = [s for s in study.series if not excluded(s)]
    candidates = [(s, task) for s in readable if (task := task_for_series(s)) is not None]
    evidence = "dicom"
    if not candidates and hints is not None and (found := anatomy_from_fhir(hints)) is not None:
        anatomy, source = found
        candidates = [(s, task) for s in readable if (task := task_for(s.modality, anatomy)) is not None]
        evidence = f"fhir:{source}"
    if not candidates:
        return None
    series, task = max(candidates, key=lambda pair: pair[0].number_of_instances)
    return Route(task=task, series=series, evidence=evidence)


PIXEL_MODALITIES = ("CT", "MR", "CR", "DX")
PIXEL_LOOKS = 3  # at most this many series are looked at: one instance each


@dataclass(frozen=True)
class PixelModel:
    """What a look at the pixels needs of a task's card: its preprocessing and its input profile."""

    spec: PreprocessingSpec
    profile: InputProfile | None


def names_other_anatomy(series: Series) -> bool:
    """The header names a body part (BodyPartExamined, AnatomicRegionSequence) that no model reads:
    then it has spoken, and the pixels are not asked to overrule it."""
    return bool(series.body_part.strip() or series.anatomic_region) and task_for_series(series) is None


def pixel_candidates(study: Study, hints: FhirHints | None = None) -> list[Series]:
    """The series worth a look at the pixels: readable, of a modality a model reads, whose header
    names no other body part, largest first; none when the EHR's bodySite names another body part."""
    if hints is not None and (hints.codings.get("ImagingStudy.series.bodySite") or hints.texts.get("ImagingStudy.series.bodySite")):
        return []  # the EHR named the body part, and it was not one a model reads
    readable = [s for s in study.series if not excluded(s) and not names_other_anatomy(s)
                and s.modality.upper() in PIXEL_MODALITIES]
    return sorted(readable, key=lambda s: -s.number_of_instances)[:PIXEL_LOOKS]


def task_from_pixels(ds: pydicom.Dataset, models: Mapping[Task, PixelModel]) -> Task | None:
    """The task one image shows, from its pixels: a head-sized CT slice with no lung (and, where the
    head CT card has one, within its input profile); an MR or X-ray within the brain or chest model's
    input profile. None when the pixels do not decide (no profile: no guess)."""
    modality = str(getattr(ds, "Modality", "") or "").upper()
    task = {"CT": Task.HEAD_CT_ICH, "MR": Task.BRAIN_MRI, "CR": Task.CHEST_PNEUMOTHORAX,
            "DX": Task.CHEST_PNEUMOTHORAX}.get(modality)
    if task is None or task not in models:
        return None
    if task is Task.HEAD_CT_ICH and not ct_series_verdict([ds]).is_head:
        return None
    model = models[task]
    if model.profile is None:
        return task if task is Task.HEAD_CT_ICH else None  # the CT's physical look decided; nothing else may
    statistics = image_statistics(resize(dicom_to_image(ds, model.spec), model.spec.input_size))
    return task if float(model.profile.distances(statistics[np.newaxis])[0]) <= model.profile.threshold else None


def route_by_pixels(study: Study, looks: Mapping[str, Task | None], hints: FhirHints | None = None) -> Route | None:
    """The route a look at the pixels found (series UID -> task), largest series first."""
    for series in pixel_candidates(study, hints):
        task = looks.get(series.uid)
        if task is not None:
            return Route(task=task, series=series, evidence="pixels")
    return None


def describe(study: Study) -> str:
    """A one-line description of a study's series, for 'not applicable' reasons."""
    parts = [f"{s.modality or '?'}/{s.body_part or '?'} '{s.description}'" for s in study.series]
    return "; ".join(parts) or "no series"


def not_applicable_reason(study: Study, with_fhir: bool, pixels_looked_at: bool = False) -> str:
    """What a user can act on when nothing decided."""
    dicom = ("AnatomicRegionSequence, BodyPartExamined, SeriesDescription, ProtocolName, StudyDescription or "
             "RequestedProcedureDescription in DICOM")
    where = (f"{dicom}, or ImagingStudy.series.bodySite, ImagingStudy.procedureCode or the order's code in FHIR"
             if with_fhir else f"{dicom} (or give --task)")
    return (f"no triage model applies to this study ({describe(study)}): head CT, brain MR and chest X-ray are read; "
            f"the anatomy must be named by {where}"
            + ("; one image of the study was looked at, and it did not look like any of them" if pixels_looked_at else ""))
