"""The Grad-CAM Secondary Capture: built with highdicom, stored in the real Orthanc with STOW-RS,
read back with WADO-RS, referenced from our FHIR Media, and checked with dciodvfy when installed."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from PIL import Image

from cds_devtools.devservers import free_port, upload_dicom
from cds_devtools.dicom_data import make_dataset
from cds_service.core.domain import Finding, Heatmap, ModelRef, Series, Task, TriageResult, TriageStatus
from cds_service.adapters.fhir_client import FhirClient
from cds_service.adapters.pacs import Pacs, PacsConfig
from cds_service.core.routing import task_for_series
from cds_service.adapters.secondary_capture import (
             build_heatmap_capture,
             capture_uids,
             heatmap_to_pacs,
             patient_orientation,
             with_capture_reference,
             StoredCapture,
         )

MODEL = ModelRef("test-untrained-head_ct_ich", "0.0.0-test")


def overlay_png(width: int = 48, height: int = 48, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def head_ct(study_uid: str | None = None, count: int = 2) -> list[pydicom.Dataset]:
    study_uid = study_uid or pydicom.uid.generate_uid()
    series_uid = pydicom.uid.generate_uid()
    rng = np.random.default_rng(1)
    return [make_dataset((rng.normal(1060, 20, (64, 80))).astype(np.uint16), modality="CT", body_part="HEAD",
                         series_description="CT HEAD WO", study_description="CT BRAIN", patient_name="Doe^Jane",
                         patient_id="MRN-42", patient_birth_date="19600101", patient_sex="F", accession_number="ACC1",
                         study_uid=study_uid, series_uid=series_uid, instance_number=i + 1, rescale_slope=1,
                         rescale_intercept=-1024) for i in range(count)]


def heatmap_for(source: pydicom.Dataset, label: str = "any") -> Heatmap:
    return Heatmap(png=overlay_png(), label=label, width=48, height=48, slice_index=1,
                   sop_instance_uid=str(source.SOPInstanceUID))


def result_for(datasets: list[pydicom.Dataset]) -> TriageResult:
    return TriageResult(
        study_uid=str(datasets[0].StudyInstanceUID), status=TriageStatus.DONE, task=Task.HEAD_CT_ICH,
        series_uid=str(datasets[0].SeriesInstanceUID),
        findings=(Finding("any", 0.93, True, 0.5),), model=MODEL, heatmap=heatmap_for(datasets[1]), slices_scored=2,
    )


# --- pure -------------------------------------------------------------------------------


def test_capture_is_in_the_same_study_with_copied_patient_tags_and_a_new_ai_series():
    datasets = head_ct()
    source = datasets[1]
    capture = build_heatmap_capture(source, heatmap_for(source), task="head_ct_ich", model_name=MODEL.name,
                                    model_version=MODEL.version)
    assert capture.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert capture.StudyInstanceUID == source.StudyInstanceUID
    assert capture.SeriesInstanceUID != source.SeriesInstanceUID
    assert capture.SOPInstanceUID not in {ds.SOPInstanceUID for ds in datasets}
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                    "StudyID", "StudyDate", "StudyDescription"):
        assert str(capture.get(keyword)) == str(source.get(keyword)), keyword
    assert capture.SeriesDescription.startswith("AI-generated")
    assert "not a diagnosis" in capture.ImageComments
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (capture.Rows, capture.Columns, capture.SamplesPerPixel) == (48, 48, 3)
    assert list(capture.PatientOrientation) == ["L", "P"]
    # 64 x 80 pixels of 0.5 mm squeezed into 48 x 48
    assert [round(float(v), 4) for v in capture.PixelSpacing] == [round(0.5 * 64 / 48, 4), round(0.5 * 80 / 48, 4)]
    expected = np.asarray(Image.open(io.BytesIO(heatmap_for(source).png)).convert("RGB"))
    assert np.array_equal(capture.pixel_array, expected)


def test_capture_uids_are_stable_per_study_task_and_model_version():
    assert capture_uids("1.2.3", "head_ct_ich", "1.0") == capture_uids("1.2.3", "head_ct_ich", "1.0")
    assert capture_uids("1.2.3", "head_ct_ich", "1.0") != capture_uids("1.2.3", "head_ct_ich", "1.1")
    series_uid, sop_uid = capture_uids("1.2.3", "head_ct_ich", "1.0")
    assert series_uid != sop_uid and len(sop_uid) <= 64


def test_the_ai_series_is_never_routed_to_a_model():
    source = head_ct()[0]
    capture = build_heatmap_capture(source, heatmap_for(source), task="head_ct_ich", model_name="m", model_version="1")
    series = Series(uid=capture.SeriesInstanceUID, modality=capture.Modality, body_part=capture.get("BodyPartExamined", ""),
                    description=capture.SeriesDescription)
    assert task_for_series(series) is None
    # even if a PACS rewrote the modality to the source's, the description keeps it out
    assert task_for_series(Series(uid="1.2", modality="CT", body_part="HEAD", description=capture.SeriesDescription)) is None


@pytest.mark.parametrize(("iop", "expected"), [
    (["1", "0", "0", "0", "1", "0"], ("L", "P")),  # axial
    (["0", "1", "0", "0", "0", "-1"], ("P", "F")),  # sagittal
    (["-1", "0", "0", "0", "0", "-1"], ("R", "F")),  # coronal, mirrored
])
def test_patient_orientation_from_image_orientation(iop, expected):
    ds = pydicom.Dataset()
    ds.ImageOrientationPatient = iop
    assert patient_orientation(ds) == expected


def test_patient_orientation_of_a_radiograph_and_when_unknown():
    ds = pydicom.Dataset()
    ds.PatientOrientation = ["L", "F"]
    assert patient_orientation(ds) == ("L", "F")
    ds.PatientOrientation = ""
    assert patient_orientation(ds) is None


def test_media_reference_is_added_once():
    stored = StoredCapture("1.2", "1.2.3", "1.2.3.4")
    media = {"resourceType": "Media", "id": "m1", "identifier": [{"system": "x", "value": "y"}], "status": "completed",
             "content": {"contentType": "image/png"}}
    updated = with_capture_reference(media, stored)
    assert updated is not None and updated["identifier"][0] == {"system": "x", "value": "y"}
    assert updated["identifier"][1]["system"] == "urn:dicom:uid"
    assert updated["identifier"][1]["value"] == "urn:oid:1.2.3.4"
    assert "1.2.3.4" in updated["note"][-1]["text"]
    assert with_capture_reference(updated, stored) is None
    assert media["identifier"] == [{"system": "x", "value": "y"}]  # the input is not changed


# --- against the real Orthanc and FHIR server ------------------------------------------------


@pytest.mark.integration
def test_capture_round_trips_through_orthanc_and_is_referenced_from_media(orthanc, fhir_server, tmp_path):
    datasets = head_ct()
    upload_dicom(orthanc.url, datasets)
    result = result_for(datasets)
    fhir = FhirClient(fhir_server.url)
    media = fhir.create({"resourceType": "Media", "status": "completed", "content": {"contentType": "image/png"},
                         "identifier": [{"system": "urn:test", "value": pydicom.uid.generate_uid()}]})
    pacs = Pacs(PacsConfig(url=orthanc.dicomweb_url))
    try:
        record = heatmap_to_pacs(pacs, fhir, datasets, result, [f"Media/{media['id']}"])
        assert record["stored"] is True and "error" not in record, record
        assert record["studyUid"] == datasets[0].StudyInstanceUID and record["media"] == f"Media/{media['id']}"

        # WADO-RS: the instance the PACS now holds, as a viewer would fetch it
        [retrieved] = pacs.client.retrieve_series(record["studyUid"], record["seriesUid"])
        assert retrieved.SOPInstanceUID == record["sopInstanceUid"]
        assert retrieved.StudyInstanceUID == datasets[0].StudyInstanceUID
        assert retrieved.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in datasets}
        assert retrieved.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert retrieved.PatientID == "MRN-42" and str(retrieved.PatientName) == "Doe^Jane"
        assert "AI-generated" in retrieved.SeriesDescription
        expected = np.asarray(Image.open(io.BytesIO(result.heatmap.png)).convert("RGB"))
        assert np.array_equal(retrieved.pixel_array, expected)
        series = {s["0020000E"]["Value"][0] for s in pacs.client.search_for_series(record["studyUid"])}
        assert series == {datasets[0].SeriesInstanceUID, record["seriesUid"]}

        saved = tmp_path / "capture.dcm"
        retrieved.save_as(saved, enforce_file_format=True)
        assert pydicom.dcmread(saved).SOPInstanceUID == record["sopInstanceUid"]
        if shutil.which("dciodvfy"):
            check = subprocess.run(["dciodvfy", str(saved)], capture_output=True, text=True, timeout=60)
            errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
            assert errors == [], errors

        written, _ = fhir.read("Media", media["id"])
        assert {"system": "urn:dicom:uid", "value": f"urn:oid:{record['sopInstanceUid']}"}.items() <= \
            next(i for i in written["identifier"] if i["system"] == "urn:dicom:uid").items()

        # a re-run stores the same instance again: still one AI instance, one Media identifier
        again = heatmap_to_pacs(pacs, fhir, datasets, result, [f"Media/{media['id']}"])
        assert again["stored"] is True and again["sopInstanceUid"] == record["sopInstanceUid"]
        assert len(pacs.client.search_for_instances(record["studyUid"], record["seriesUid"])) == 1
        written, _ = fhir.read("Media", media["id"])
        assert sum(i["system"] == "urn:dicom:uid" for i in written["identifier"]) == 1
    finally:
        fhir.close()


@pytest.mark.integration
def test_a_pacs_that_is_down_is_recorded_not_raised(fhir_server):
    datasets = head_ct()
    fhir = FhirClient(fhir_server.url)
    try:
        pacs = Pacs(PacsConfig(url=f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=2))
        record = heatmap_to_pacs(pacs, fhir, datasets, result_for(datasets), ["Media/does-not-matter"])
    finally:
        fhir.close()
    assert record["stored"] is False and "unreachable" in record["error"]


@pytest.mark.parametrize("modality", ["CT", "CR"])
def test_capture_passes_dciodvfy(modality, tmp_path):
    """dicom3tools' IOD validator (Debian package dicom3tools) finds no error, with or without orientation."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    pixels = np.random.default_rng(3).integers(0, 4000, (64, 64)).astype(np.uint16)
    source = make_dataset(pixels, modality=modality, body_part="CHEST" if modality == "CR" else "HEAD",
                          patient_name="Doe^Jane", patient_id="MRN-42")
    capture = build_heatmap_capture(source, heatmap_for(source), task="t", model_name="m", model_version="1")
    path = tmp_path / "capture.dcm"
    capture.save_as(path, enforce_file_format=True)
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    output = check.stdout + check.stderr
    assert "SCImage" in output
    assert [line for line in output.splitlines() if line.startswith(("Error", "Warning"))] == []


def test_nothing_to_store_without_a_heatmap():
    datasets = head_ct()
    result = TriageResult(study_uid=str(datasets[0].StudyInstanceUID), status=TriageStatus.DONE, task=Task.HEAD_CT_ICH,
                          findings=(Finding("any", 0.1, False, 0.5),), model=MODEL)
    record = heatmap_to_pacs(None, None, datasets, result, [])  # type: ignore[arg-type]  # no PACS or FHIR call is made
    assert record == {"stored": False, "error": "no heatmap to store"}
