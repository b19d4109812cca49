"""Routing by pixels when the header and the EHR are silent, and refusing what a model was not made for.

Real images: the RSNA head CT DICOMs and NIH chest X-rays in ../shared/data, through the committed
models' input profiles (weights/<task>.input-profile.npz). Trunk CTs are phantoms (no real one here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cds_devtools.dicom_data import make_dataset
from cds_service.core.domain import InputFit, Series, Study, Task, TriageStatus
from cds_service.core.errors import ModelUnavailableError
from cds_service.local_triage import LocalInput, triage_input
from cds_service.core.models import ModelRegistry
from cds_service.core.routing import FhirHints, pixel_candidates, route_by_pixels, task_from_pixels
from cds_service.core.settings import Settings
from test_anatomy import phantom

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RSNA_DICOM = DATA / "head_ct_dicom_unlabelled"
CHEST = DATA / "chest_xray_ptx"
HEAD_PNG = DATA / "head_ct_rsna_png" / "labelled"
pytestmark = [pytest.mark.slow,  # the shipped models on real images
              pytest.mark.skipif(not (RSNA_DICOM.is_dir() and CHEST.is_dir() and HEAD_PNG.is_dir()),
                                 reason="../shared/data is not here")]


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(ROOT / "weights", runtime="torch")


def rsna_series(count: int = 6) -> list[pydicom.Dataset]:
    """Real head CT slices (of different patients) as one de-identified series: no BodyPartExamined, no
    descriptions, new UIDs (RSNA's own are "ID_…" pseudo-UIDs), one patient id."""
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    slices = []
    for number, path in enumerate(sorted(RSNA_DICOM.glob("*.dcm"))[:count], start=1):
        ds = pydicom.dcmread(path)
        for keyword in ("BodyPartExamined", "SeriesDescription", "StudyDescription", "ProtocolName"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, pydicom.uid.generate_uid()
        ds.PatientID, ds.PatientName = "RSNA-SLICES", "RSNA^Slices"  # each slice is another patient's
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        slices.append(ds)
    return slices


def xray(png: Path, modality: str = "DX") -> pydicom.Dataset:
    """A radiograph as a DX instance with nothing in the header about the body part."""
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 16
    return make_dataset(pixels, modality=modality, pixel_spacing=(1.0, 1.0))


def first(folder: Path, pattern: str = "*.png") -> Path:
    return sorted(folder.rglob(pattern))[0]


def test_a_real_head_ct_with_a_silent_header_is_a_head_ct_by_its_pixels(registry: ModelRegistry) -> None:
    slices = rsna_series()
    assert task_from_pixels(slices[3], registry.pixel_models()) is Task.HEAD_CT_ICH
    result = triage_input(LocalInput(name="rsna", datasets=slices), registry, Settings(), None)
    assert result.status is TriageStatus.DONE and result.task is Task.HEAD_CT_ICH


def test_a_real_chest_radiograph_with_a_silent_header_is_a_chest_x_ray_by_its_pixels(registry: ModelRegistry) -> None:
    ds = xray(first(CHEST / "no_pneumothorax"))
    assert task_from_pixels(ds, registry.pixel_models()) is Task.CHEST_PNEUMOTHORAX
    result = triage_input(LocalInput(name="cxr", datasets=[ds]), registry, Settings(), None)
    assert result.status is TriageStatus.DONE and result.task is Task.CHEST_PNEUMOTHORAX


def test_a_head_ct_picture_stored_as_an_x_ray_is_not_taken_for_a_chest(registry: ModelRegistry) -> None:
    ds = xray(first(HEAD_PNG))
    assert task_from_pixels(ds, registry.pixel_models()) is None
    result = triage_input(LocalInput(name="odd", datasets=[ds]), registry, Settings(), None)
    assert result.status is TriageStatus.NOT_APPLICABLE
    assert "one image of the study was looked at" in result.reason and "--task" in result.reason


def test_a_chest_ct_whose_header_says_head_is_refused_with_the_measurement(registry: ModelRegistry) -> None:
    slices = [phantom(340, 240, lungs=True, spacing=0.9) for _ in range(4)]
    for number, ds in enumerate(slices, start=1):
        ds.BodyPartExamined, ds.InstanceNumber = "HEAD", number
    result = triage_input(LocalInput(name="chest-ct", datasets=slices), registry, Settings(), None)
    assert result.status is TriageStatus.NOT_APPLICABLE and result.task is Task.HEAD_CT_ICH
    assert result.reason.startswith("not a head CT") and "mm across" in result.reason and not result.findings


def test_an_image_of_another_kind_forced_onto_a_model_is_refused_by_its_input_profile(registry: ModelRegistry) -> None:
    png = first(HEAD_PNG)
    result = triage_input(LocalInput(name=str(png), image_path=png), registry, Settings(), Task.CHEST_PNEUMOTHORAX)
    assert result.status is TriageStatus.NOT_APPLICABLE
    assert "unlike any image of chest_pneumothorax's anatomy" in result.reason and "distance" in result.reason
    assert result.input_fit is InputFit.WRONG_ANATOMY  # refused: nothing scored
    accepted = triage_input(LocalInput(name="cxr", image_path=first(CHEST)), registry, Settings(), Task.CHEST_PNEUMOTHORAX)
    assert accepted.status is TriageStatus.DONE


def test_a_profile_that_does_not_match_its_card_makes_the_model_unavailable(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("chest_pneumothorax.json", "chest_pneumothorax.input-profile.npz"):
        shutil.copy(ROOT / "weights" / name, weights / name)
    profile = weights / "chest_pneumothorax.input-profile.npz"
    data = bytearray(profile.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of the stored numbers changed
    profile.write_bytes(bytes(data))
    with pytest.raises(ModelUnavailableError, match="does not match its card"):
        ModelRegistry(weights).input_profile(Task.CHEST_PNEUMOTHORAX)


def test_pixels_are_not_asked_when_the_header_or_the_ehr_named_another_body_part() -> None:
    abdomen = Series(uid="1.2.3", modality="CT", body_part="ABDOMEN", number_of_instances=40)
    silent = Series(uid="1.2.4", modality="CT", number_of_instances=30)
    scout = Series(uid="1.2.5", modality="CT", description="SCOUT", number_of_instances=1)
    study = Study(uid="1.2", series=(abdomen, silent, scout))
    assert pixel_candidates(study) == [silent]
    knee_site = FhirHints(codings={"ImagingStudy.series.bodySite": (("http://snomed.info/sct", "72696002"),)})
    assert pixel_candidates(study, knee_site) == []
    route = route_by_pixels(study, {silent.uid: Task.HEAD_CT_ICH})
    assert route is not None and route.series == silent and route.evidence == "pixels"


def test_the_cli_routes_a_silent_real_head_ct_by_its_pixels(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    for index, ds in enumerate(rsna_series(4)):
        ds.save_as(folder / f"{index}.dcm", enforce_file_format=True)
    env = {**os.environ, "CDS_WEIGHTS_DIR": str(ROOT / "weights"), "CDS_DATA_DIR": str(tmp_path / "var")}
    result = subprocess.run([sys.executable, "-m", "cds_service.cli", "triage", str(folder), "--json"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    [line] = [json.loads(text) for text in result.stdout.splitlines()]
    assert line["task"] == "head_ct_ich" and line["status"] == "done", line
