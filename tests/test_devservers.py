"""cds_devtools.devservers: real Orthanc + sekmet on loopback, DICOM building, the demo samples."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from cds_devtools import devservers, dicom_data
from cds_devtools.devservers import ServerStartError, upload_dicom
from cds_devtools.dicom_data import image_to_dicom, make_dicom

from conftest import require

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def _read(blob: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(blob))


def _window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Brain-window the way the model input does: [center - width/2, center + width/2] -> [0, 1]."""
    return np.clip((hu - (center - width / 2)) / width, 0.0, 1.0)


def _grey_ramp(h: int = 48, w: int = 64) -> np.ndarray:
    """Every grey level 0..255 at least once, plus a gradient."""
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


# --------------------------------------------------------------------------------------
# DICOM building (no servers)
# --------------------------------------------------------------------------------------


def test_free_port_is_bindable_on_loopback():
    import socket

    port = devservers.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("modality", ["CT", "MR", "CR", "DX"])
def test_make_dicom_is_a_valid_part10_file(modality):
    pixels = (np.arange(32 * 40).reshape(32, 40) % 4000).astype(np.uint16)
    blob = make_dicom(
        pixels,
        modality=modality,
        body_part="head",
        series_description="TEST SERIES",
        patient_id="P123",
        patient_name="Test^Anna",
        study_uid="1.2.826.0.1.3680043.8.498.1",
        instance_number=7,
        window_center=40,
        window_width=80,
    )
    assert blob[128:132] == b"DICM"
    ds = _read(blob)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == dicom_data.SOP_CLASSES[modality]
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert (ds.Modality, ds.BodyPartExamined, ds.SeriesDescription) == (modality, "HEAD", "TEST SERIES")
    assert (ds.PatientID, str(ds.PatientName), ds.InstanceNumber) == ("P123", "Test^Anna", 7)
    assert ds.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.1"
    assert pydicom.uid.UID(ds.SeriesInstanceUID).is_valid
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 80.0)
    assert ds.BitsStored == 12 and ds.PixelRepresentation == 0
    np.testing.assert_array_equal(ds.pixel_array, pixels)
    if modality == "CT":
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    else:
        assert "RescaleSlope" not in ds


def test_make_dicom_generates_distinct_uids_and_keeps_monochrome1():
    a = _read(make_dicom(np.zeros((16, 16), np.uint8), modality="CR", photometric="MONOCHROME1"))
    b = _read(make_dicom(np.zeros((16, 16), np.uint8), modality="CR"))
    assert a.PhotometricInterpretation == "MONOCHROME1"
    assert len({a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID, b.StudyInstanceUID}) == 4
    assert a.BitsAllocated == 8


def test_make_dicom_rejects_bad_input():
    with pytest.raises(ValueError):
        make_dicom(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError):
        make_dicom(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError):
        make_dicom(np.zeros((4, 4), np.uint8), modality="US")


@pytest.mark.parametrize("syntax", ["rle", "jpegls", "jpeg2000"])
def test_compressed_transfer_syntaxes_round_trip_losslessly(syntax):
    if syntax == "jpegls":
        # pyjpegls is installed in the dev venv but not a declared dependency of the project
        if not dicom_data.encoder_available(syntax):
            pytest.skip("no JPEG-LS encoder (pip install pyjpegls)")
    else:
        require(dicom_data.encoder_available(syntax), f"no {syntax} encoder (pylibjpeg plugins missing)")
    pixels = ((np.arange(60 * 50).reshape(60, 50) * 7) % 4096).astype(np.uint16)
    ds = _read(make_dicom(pixels, modality="CT", transfer_syntax=syntax, sop_instance_uid="1.2.3.4"))
    assert ds.file_meta.TransferSyntaxUID == dicom_data.TRANSFER_SYNTAXES[syntax]
    assert ds.SOPInstanceUID == "1.2.3.4"  # compression must not invent a new instance UID
    np.testing.assert_array_equal(ds.pixel_array, pixels)


def test_ct_from_brain_window_png_round_trips_to_the_grey_image():
    """Default (as scanners write it): integer HU = round(grey/255*80), stored = HU + 1024,
    slope 1, intercept -1024. Windowing at 40/80 gives the grey image back to within
    0.5 HU, i.e. 0.5*255/80 = 1.6 grey levels (integer HU cannot do better: 81 HU values
    for 256 grey levels)."""
    grey = _grey_ramp()
    ds = _read(image_to_dicom(grey, modality="CT"))
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 80.0)
    np.testing.assert_array_equal(ds.pixel_array, np.rint(grey / 255 * 80).astype(np.uint16) + 1024)
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert hu.min() == 0 and hu.max() == 80
    back = _window(hu, 40, 80)
    assert np.abs(back - grey / 255.0).max() <= 0.5 / 80 + 1e-9


def test_ct_exact_hu_round_trips_within_one_grey_level():
    grey = _grey_ramp()
    ds = _read(image_to_dicom(grey, modality="CT", exact_hu=True))
    hu = apply_modality_lut(ds.pixel_array, ds)
    back = _window(hu, float(ds.WindowCenter), float(ds.WindowWidth))
    assert np.abs(back - grey / 255.0).max() < 1 / 255
    np.testing.assert_array_equal(np.rint(back * 255).astype(np.uint8), grey)


def test_image_to_dicom_reads_png_rgb_and_rgba(tmp_path):
    from PIL import Image

    grey = _grey_ramp()
    for mode in ("RGB", "RGBA", "L"):
        path = tmp_path / f"img_{mode}.png"
        Image.fromarray(grey).convert(mode).save(path)
        ds = _read(image_to_dicom(path, modality="MR", body_part="BRAIN"))
        assert ds.BitsAllocated == 8 and ds.Modality == "MR"
        np.testing.assert_array_equal(ds.pixel_array, grey)


# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------


def test_process_that_dies_during_start_reports_its_log(tmp_path):
    proc = devservers.ManagedProcess(
        "boom",
        [sys.executable, "-c", "import sys; print('config is broken: port 99999'); sys.exit(3)"],
        url="http://127.0.0.1:1",
        log_path=tmp_path / "boom.log",
    ).start()
    with pytest.raises(ServerStartError, match="(?s)exited with code 3.*config is broken"):
        proc.wait_ready(lambda: False, timeout=10)
    proc.stop()


def test_process_not_ready_in_time_is_an_error(tmp_path):
    with devservers.ManagedProcess(
        "sleeper",
        [sys.executable, "-c", "import time; print('starting', flush=True); time.sleep(60)"],
        url="http://127.0.0.1:1",
        log_path=tmp_path / "sleeper.log",
    ).start() as proc:
        with pytest.raises(ServerStartError, match="(?s)not become ready.*starting"):
            proc.wait_ready(lambda: False, timeout=1)
    assert not proc.running


# --------------------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_orthanc_starts_with_dicomweb(orthanc):
    system = httpx.get(f"{orthanc.url}/system", trust_env=False).json()
    assert system["Version"].startswith("1.")
    assert orthanc.dicomweb_url == f"{orthanc.url}/dicom-web"
    assert orthanc.url.startswith("http://127.0.0.1:")
    plugins = httpx.get(f"{orthanc.url}/plugins", trust_env=False).json()
    assert "dicom-web" in plugins
    config = json.loads(orthanc.config_path.read_text())
    assert config["RemoteAccessAllowed"] is False and config["AuthenticationEnabled"] is False
    assert config["DicomServerEnabled"] is False


@pytest.mark.integration
def test_dicom_uploads_and_is_found_with_qido_and_wado(orthanc):
    from dicomweb_client import DICOMwebClient

    study_uid = pydicom.uid.generate_uid()
    series_uid = pydicom.uid.generate_uid()
    grey = _grey_ramp(64, 64)
    files = [
        image_to_dicom(
            np.roll(grey, i, axis=1),
            modality="CT",
            body_part="HEAD",
            series_description="CT HEAD WO CONTRAST",
            patient_id="DEVSRV1",
            patient_name="Devservers^Test",
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=i + 1,
        )
        for i in range(2)
    ]
    ids = upload_dicom(orthanc.url, files)
    assert len(ids) == 2 and len(set(ids)) == 2
    assert upload_dicom(orthanc.url, files[:1]) == ids[:1]  # already stored is fine

    client = DICOMwebClient(url=orthanc.dicomweb_url)
    series = client.search_for_series(study_uid)
    assert len(series) == 1
    found = pydicom.Dataset.from_json(series[0])
    assert found.SeriesInstanceUID == series_uid
    assert found.Modality == "CT"
    assert int(found.NumberOfSeriesRelatedInstances) == 2
    # RetrieveURL must carry the port, or a client following it goes to port 80
    assert series[0]["00081190"]["Value"][0].startswith(f"{orthanc.dicomweb_url}/studies/{study_uid}")

    instances = client.retrieve_series(study_uid, series_uid)
    assert sorted(int(ds.InstanceNumber) for ds in instances) == [1, 2]
    for ds in instances:
        assert ds.SeriesDescription == "CT HEAD WO CONTRAST" and ds.BodyPartExamined == "HEAD"
        sent = _read(files[int(ds.InstanceNumber) - 1])
        np.testing.assert_array_equal(ds.pixel_array, sent.pixel_array)


@pytest.mark.integration
def test_compressed_instances_come_back_as_stored_when_asked_for_any_syntax(orthanc):
    """Orthanc 1.10 transcodes RLE/JPEG-LS to Explicit VR LE for a default WADO-RS request but
    cannot transcode JPEG 2000 (no GDCM plugin): such instances are silently left out unless the
    client accepts transfer-syntax=*."""
    from dicomweb_client import DICOMwebClient

    syntaxes = [s for s in ("explicit", "rle", "jpeg2000") if dicom_data.encoder_available(s)]
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    pixels = ((np.arange(32 * 32).reshape(32, 32) * 3) % 4096).astype(np.uint16)
    upload_dicom(
        orthanc.url,
        [
            make_dicom(pixels, study_uid=study_uid, series_uid=series_uid, instance_number=i + 1, transfer_syntax=s)
            for i, s in enumerate(syntaxes)
        ],
    )
    client = DICOMwebClient(url=orthanc.dicomweb_url)
    as_stored = client.retrieve_series(study_uid, series_uid, media_types=(("application/dicom", "*"),))
    assert sorted(str(ds.file_meta.TransferSyntaxUID) for ds in as_stored) == sorted(
        str(dicom_data.TRANSFER_SYNTAXES[s]) for s in syntaxes
    )
    for ds in as_stored:
        np.testing.assert_array_equal(ds.pixel_array, pixels)
    default = client.retrieve_series(study_uid, series_uid)
    expected = len(syntaxes) - ("jpeg2000" in syntaxes)
    assert len(default) == expected
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in default} == {pydicom.uid.ExplicitVRLittleEndian}


@pytest.mark.integration
def test_upload_of_something_that_is_not_dicom_fails(orthanc):
    with pytest.raises(RuntimeError, match="Orthanc refused"):
        upload_dicom(orthanc.url, [b"this is not a DICOM file"])


@pytest.mark.integration
def test_orthanc_extra_config_and_lua(orthanc_factory, tmp_path):
    lua = tmp_path / "hello.lua"
    lua.write_text('print("hello from lua")\n')
    proc = orthanc_factory(extra_config={"StableAge": 2, "Name": "custom"}, lua_scripts=[lua])
    config = json.loads(proc.config_path.read_text())
    assert config["StableAge"] == 2 and config["DicomWeb"]["Enable"] is True
    assert httpx.get(f"{proc.url}/system", trust_env=False).json()["Name"] == "custom"
    assert "hello from lua" in proc.log_path.read_text()


# --------------------------------------------------------------------------------------
# sekmet FHIR server
# --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_fhir_server_accepts_a_patient_and_reads_it_back(fhir_server):
    assert fhir_server.url.endswith("/fhir") and fhir_server.url.startswith("http://127.0.0.1:")
    with httpx.Client(base_url=fhir_server.url, trust_env=False, headers={"Accept": "application/fhir+json"}) as c:
        meta = c.get("/metadata")
        assert meta.status_code == 200 and meta.json()["fhirVersion"] == "4.0.1"
        patient = {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:oid:1.2.3.4.5.1", "value": "DEVSRV-PAT-1"}],
            "name": [{"family": "Devservers", "given": ["Test"]}],
        }
        created = c.post("/Patient", json=patient, headers={"Content-Type": "application/fhir+json"})
        assert created.status_code == 201, created.text
        pid = created.json()["id"]
        assert created.headers["ETag"] == 'W/"1"'
        assert created.headers["Location"].startswith(f"{fhir_server.url}/Patient/{pid}/_history/1")
        read = c.get(f"/Patient/{pid}")
        assert read.status_code == 200
        assert read.json()["name"][0]["family"] == "Devservers"
        assert read.json()["meta"]["versionId"] == "1"
        found = c.get("/Patient", params={"identifier": "urn:oid:1.2.3.4.5.1|DEVSRV-PAT-1"}).json()
        assert [e["resource"]["id"] for e in found["entry"]] == [pid]


@pytest.mark.integration
def test_fhir_server_rejects_an_invalid_resource_with_an_operation_outcome(fhir_server):
    r = httpx.post(
        f"{fhir_server.url}/Patient",
        json={"resourceType": "Patient", "birthDate": "not-a-date"},
        headers={"Content-Type": "application/fhir+json"},
        trust_env=False,
    )
    assert r.status_code == 400
    assert r.json()["resourceType"] == "OperationOutcome"


# --------------------------------------------------------------------------------------
# stop() really stops
# --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_stop_closes_the_ports(orthanc_factory, fhir_server_factory):
    orth = orthanc_factory()
    fhir = fhir_server_factory()
    assert devservers.port_open(orth.http_port) and devservers.port_open(fhir.port)
    orth.stop()
    fhir.stop()
    assert not orth.running and not fhir.running
    assert orth.returncode is not None and fhir.returncode is not None
    assert not devservers.port_open(orth.http_port)
    assert not devservers.port_open(fhir.port)
    orth.stop()  # idempotent


# --------------------------------------------------------------------------------------
# demo samples
# --------------------------------------------------------------------------------------


def _manifest(samples_dir: Path) -> dict:
    return json.loads((samples_dir / "manifest.json").read_text())


def test_samples_match_their_manifest(samples_dir):
    manifest = _manifest(samples_dir)
    total = 0
    assert [s["folder"] for s in manifest["studies"]] == sorted({s["folder"] for s in manifest["studies"]})
    for study in manifest["studies"]:
        name = study["folder"]
        files = [samples_dir / name / f for f in study["files"]]
        given, family = study["patient_name"].split(" ")
        assert study["gender"] in ("male", "female", "other", "unknown") and len(study["birth_date"]) == 10
        assert files, name
        if study["kind"] != "synthetic":
            assert len(files) == len(study["source_files"]), name
        for i, path in enumerate(files, start=1):
            total += path.stat().st_size
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == study["study_instance_uid"]
            assert ds.SeriesInstanceUID == study["series_instance_uid"]
            assert pydicom.uid.UID(ds.SOPInstanceUID).is_valid
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert (ds.PatientID, str(ds.PatientName)) == (study["patient_id"], f"{family}^{given}")
            assert ds.PatientBirthDate == study["birth_date"].replace("-", "")
            assert (ds.Modality, ds.BodyPartExamined) == (study["modality"], study["body_part"])
            assert ds.SeriesDescription == study["series_description"]
            assert ds.InstanceNumber == i
            assert ds.pixel_array.ndim == 2
            # the label lives in the manifest only
            label = study.get("expected_finding")
            if label:
                for keyword in ("SeriesDescription", "StudyDescription", "PatientName", "PatientID"):
                    assert label.lower() not in str(ds.get(keyword, "")).lower()
                assert label.lower() not in path.name.lower()
    assert total < 4.5e6


def test_rsna_sample_pixel_data_is_untouched(samples_dir):
    [study] = [s for s in _manifest(samples_dir)["studies"] if s["kind"] == "rsna_ct"]
    source_dir = DATA_DIR
    if not (source_dir / study["source_files"][0]).exists():
        pytest.skip(f"shared data not available at {source_dir}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the RSNA files carry invalid "ID_..." UIDs
        for rel, name in zip(study["source_files"], study["files"]):
            original = pydicom.dcmread(source_dir / rel)
            sample = pydicom.dcmread(samples_dir / study["folder"] / name)
            assert sample.PixelData == original.PixelData
            assert sample.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
            for keyword in ("RescaleSlope", "RescaleIntercept", "PixelRepresentation", "BitsStored"):
                assert sample.get(keyword) == original.get(keyword)


@pytest.mark.integration
def test_samples_upload_and_each_study_is_one_series(orthanc, samples_dir):
    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(url=orthanc.dicomweb_url)
    for study in _manifest(samples_dir)["studies"]:
        upload_dicom(orthanc.url, [samples_dir / study["folder"] / f for f in study["files"]])
        series = client.search_for_series(study["study_instance_uid"])
        assert len(series) == 1, study["folder"]
        assert int(pydicom.Dataset.from_json(series[0]).NumberOfSeriesRelatedInstances) == len(study["files"])


def test_sigterm_and_sighup_stop_a_script_as_ctrl_c_does():
    """The demo and the benchmarks run their clean-up (stop every server) when killed."""
    from cds_devtools.devservers import stopped_like_ctrl_c

    before = {stop: signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGHUP)}
    for stop in (signal.SIGTERM, signal.SIGHUP):
        cleaned_up_with = None
        with pytest.raises(KeyboardInterrupt, match=signal.Signals(stop).name):
            with stopped_like_ctrl_c():
                try:
                    os.kill(os.getpid(), stop)
                    time.sleep(5)  # the signal arrives before this ends
                finally:
                    cleaned_up_with = signal.getsignal(signal.SIGTERM)  # a second signal is ignored meanwhile
        assert cleaned_up_with is signal.SIG_IGN
        assert {s: signal.getsignal(s) for s in before} == before  # and the old handlers are back
