"""Reading our DICOM Structured Report back with highdicom, and our FHIR Observations, into the same shape,
so a test can say "the SR says what FHIR says" in one comparison."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes as dicom_codes

from cds_service.adapters.structured_report import LOCAL_SCHEME, STANDARD_SCHEMES
from fhir_mappings import codes
from fhir_mappings.conventions import DEFAULT_CONVENTIONS

SYSTEMS = {scheme: system for system, scheme in STANDARD_SCHEMES.items()}


@dataclass(frozen=True)
class ReadFinding:
    """One label as a report states it: its codes as (FHIR system, code), probability, verdict (None: none)."""

    label: str
    codes: frozenset[tuple[str, str]]
    probability: float
    present: bool | None


def _system(scheme: str) -> str:
    return DEFAULT_CONVENTIONS.finding_system if scheme == LOCAL_SCHEME else SYSTEMS[scheme]


def _codes(concept: pydicom.Dataset) -> frozenset[tuple[str, str]]:
    found = {(_system(concept.CodingSchemeDesignator), str(concept.CodeValue))}
    found |= {(_system(item.CodingSchemeDesignator), str(item.CodeValue)) for item in concept.get("EquivalentCodeSequence", [])}
    return frozenset(found)


def _label(found: Iterable[tuple[str, str]]) -> str:
    return next(code for system, code in found if system == DEFAULT_CONVENTIONS.finding_system)


def sr_findings(dataset: pydicom.Dataset) -> dict[str, ReadFinding]:
    """The findings of our SR, read by highdicom (it parses the TID 1500 / 1501 tree)."""
    report = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    found = {}
    for group in report.content.get_image_measurement_groups():
        concept_codes = _codes(group.finding_type)
        [measurement] = group.get_measurements(name=dicom_codes.DCM.CertaintyOfFinding)
        assert measurement.unit == hd.sr.CodedConcept("{probability}", "UCUM", "probability")
        evaluations = group.get_qualitative_evaluations()
        present = None
        if evaluations:
            [evaluation] = evaluations
            assert _codes(evaluation.name) == concept_codes
            assert evaluation.value in (dicom_codes.SCT.Present, dicom_codes.SCT.Absent)
            present = evaluation.value == dicom_codes.SCT.Present
        label = _label(concept_codes)
        found[label] = ReadFinding(label, concept_codes, float(measurement.value), present)
    return found


def fhir_findings(observations: Iterable[dict[str, Any]]) -> dict[str, ReadFinding]:
    """The same from our FHIR Observations: code.coding, valueQuantity, interpretation POS/NEG."""
    found = {}
    for observation in observations:
        concept_codes = frozenset((c["system"], c["code"]) for c in observation["code"]["coding"])
        verdicts = [c["code"] for i in observation.get("interpretation") or [] for c in i["coding"]]
        present = None if not verdicts else verdicts == [codes.INTERPRETATION_POSITIVE]
        label = _label(concept_codes)
        found[label] = ReadFinding(label, concept_codes, float(observation["valueQuantity"]["value"]), present)
    return found


def group_images(dataset: pydicom.Dataset, label: str) -> dict[str, list[str]]:
    """The images the group of `label` references, by purpose ("Source of Measurement", "Best illustration
    of finding"), as SOP Instance UIDs."""
    images: dict[str, list[str]] = {}
    for group in hd.sr.Comprehensive3DSR.from_dataset(dataset).content.get_image_measurement_groups():
        if _label(_codes(group.finding_type)) != label:
            continue
        for item in group[0].ContentSequence:
            if item.ValueType == "IMAGE":
                images.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(
                    str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    return images


def comments(dataset: pydicom.Dataset) -> list[str]:
    """The texts of the report-level Qualitative Evaluations container (the mode, the disclaimer)."""
    [container] = [item for item in dataset.ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"]
    return [str(item.TextValue) for item in container.ContentSequence]


def evidence_uids(dataset: pydicom.Dataset) -> set[str]:
    """Every SOP Instance UID in the Current Requested Procedure Evidence Sequence."""
    return {str(sop.ReferencedSOPInstanceUID) for study in dataset.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}


def dciodvfy_findings(dataset: pydicom.Dataset, folder: Path) -> tuple[list[str], list[str]]:
    """dicom3tools' IOD validator on the object: (errors, warnings other than our private coding scheme, which
    it cannot know)."""
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    check = subprocess.run([shutil.which("dciodvfy") or "dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (check.stdout + check.stderr).splitlines()
    assert "Comprehensive3DSR" in lines, lines
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning") and f"<{LOCAL_SCHEME}>" not in line]
    return errors, warnings
