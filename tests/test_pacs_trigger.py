"""The PACS-side trigger: Orthanc's Lua script announces a stable study, we create its ImagingStudy and triage it.

Real servers on loopback: Orthanc from Debian running `docker/orthanc/cds-triage.lua` with a
short StableAge, the sekmet FHIR server, and our `serve` + `worker` processes. The pure
parts (UID validation, patient choice, DICOM JSON filtering) are unit-tested at the end.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from cds_devtools import devservers, dicom_data
from cds_service.web.app import create_app
from cds_devtools.demo import start_service
from cds_service.core.domain import Task
from cds_service.core.errors import StudyNotFoundError
from cds_service.adapters.fhir_client import FhirClient
from cds_service.web.pacs_trigger import (
        PACS_SECRET_HEADER,
        PatientMatchError,
        UnknownPatientPolicy,
        choose_order,
        choose_patient,
        datasets_from_metadata,
        resolve_arrival,
        study_identifier_token,
        study_uid_from_body,
    )
from cds_service.core.settings import Settings
from conftest import _require_orthanc
from fhir_mappings.imaging_study import build_imaging_study
from support import make_test_weights, seed_onnx_exports

LUA_SCRIPT = Path(__file__).resolve().parent.parent / "docker" / "orthanc" / "cds-triage.lua"
SECRET = "pacs-secret"
MRN_SYSTEM = "urn:test:mrn"
FINISHED = {"done", "failed", "not_applicable", "model_unavailable"}


# --- fixtures: Orthanc with the Lua script, and our service reading from it ---------------------


@pytest.fixture(scope="module")
def service_port() -> int:
    return devservers.free_port()


@pytest.fixture(scope="module")
def lua_orthanc(service_port, tmp_path_factory):
    """Orthanc running our Lua script, configured (CdsTriage section) to call our service."""
    _require_orthanc()
    workdir = tmp_path_factory.mktemp("lua-orthanc")
    proc = devservers.start_orthanc(workdir, lua_scripts=[LUA_SCRIPT], extra_config={
        "StableAge": 2,
        "CdsTriage": {"Url": f"http://127.0.0.1:{service_port}/pacs/studies", "Secret": SECRET},
    })
    yield proc
    proc.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def service(lua_orthanc, fhir_server, service_port, tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs-service")
    weights = make_test_weights(root / "weights", Task.HEAD_CT_ICH)
    make_test_weights(weights, Task.BRAIN_MRI)
    settings = Settings(
        operator_open_on_loopback=True,  # tests call /jobs directly
        fhir_base_url=fhir_server.url, dicomweb_url=lua_orthanc.dicomweb_url, public_url=f"http://127.0.0.1:{service_port}",
        host="127.0.0.1", port=service_port, data_dir=root / "data", weights_dir=weights,
        job_retries=2, job_retry_delay_s=0.2, http_timeout_s=10,
        pacs_trigger_secret=SECRET, patient_identifier_system=MRN_SYSTEM, pacs_unknown_patient="create",
    )
    processes = start_service(seed_onnx_exports(settings), root / "logs")
    yield settings
    processes.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fhir(fhir_server):
    client = FhirClient(fhir_server.url)
    yield client
    client.close()


@pytest.fixture
def api(service):
    with httpx.Client(base_url=service.public_url, timeout=10, headers={PACS_SECRET_HEADER: SECRET}) as client:
        yield client


def ct_head(patient_id: str, accession: str = "", count: int = 2, **kwargs) -> list[pydicom.Dataset]:
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    rng = np.random.default_rng(0)
    return [dicom_data.make_dataset((rng.normal(35, 10, (64, 64)) + 1024).astype(np.uint16), modality="CT",
                                    body_part="HEAD", series_description="CT HEAD WO", patient_id=patient_id,
                                    accession_number=accession, study_uid=study_uid, series_uid=series_uid,
                                    instance_number=i + 1, **kwargs)
            for i in range(count)]


def wait_for_arrival(api: httpx.Client, study_uid: str, timeout: float = 60) -> dict:
    """Poll GET /pacs/studies/<uid> until the announcement is resolved (done or failed)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = api.get(f"/pacs/studies/{study_uid}")
        if last.status_code == 200 and last.json()["status"] in ("done", "failed"):
            return last.json()
        time.sleep(0.3)
    raise AssertionError(f"study {study_uid} was not resolved: {last.status_code if last else None} {last.text if last else ''}")


def wait_for_job(api: httpx.Client, study_id: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    jobs: list = []
    while time.monotonic() < deadline:
        jobs = api.get("/jobs", params={"imagingStudy": study_id}).json()["jobs"]
        if jobs and jobs[0]["status"] in FINISHED:
            return jobs[0]
        time.sleep(0.3)
    raise AssertionError(f"job for ImagingStudy/{study_id} did not finish: {jobs}")


def imaging_studies_for(fhir: FhirClient, study_uid: str) -> list[dict]:
    return fhir.search("ImagingStudy", {"identifier": study_identifier_token(study_uid)})


def ehr_patient_and_order(fhir: FhirClient, mrn: str, accession: str) -> tuple[str, str]:
    """What the EHR already has before the images arrive: the Patient (by MRN) and the order (by accession)."""
    tag = uuid.uuid4().hex[:8]
    patient_id, order_id = f"pt-{tag}", f"sr-{tag}"
    fhir.update({"resourceType": "Patient", "id": patient_id, "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
                 "name": [{"family": "Known", "given": [tag]}]}, if_match=None)
    fhir.update({"resourceType": "ServiceRequest", "id": order_id, "status": "active", "intent": "order",
                 "priority": "routine", "subject": {"reference": f"Patient/{patient_id}"},
                 "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                                 "value": accession}]}, if_match=None)
    return patient_id, order_id


# --- through Orthanc's Lua script --------------------------------------------------------------


def test_stable_study_gets_an_imaging_study_for_the_known_patient_and_order_and_is_triaged(lua_orthanc, fhir, api):
    mrn, accession = f"MRN-{uuid.uuid4().hex[:8]}", f"ACC-{uuid.uuid4().hex[:8]}"
    patient_id, order_id = ehr_patient_and_order(fhir, mrn, accession)
    slices = ct_head(mrn, accession, count=3)
    study_uid = str(slices[0].StudyInstanceUID)
    assert imaging_studies_for(fhir, study_uid) == []

    devservers.upload_dicom(lua_orthanc.url, slices)  # nothing else: the Lua script announces it once stable
    arrival = wait_for_arrival(api, study_uid)
    assert arrival["status"] == "done", arrival
    assert arrival["created"] is True and arrival["patientCreated"] is False

    [study] = imaging_studies_for(fhir, study_uid)
    assert arrival["imagingStudies"] == [f"ImagingStudy/{study['id']}"]
    assert study["subject"]["reference"] == f"Patient/{patient_id}"
    assert study["basedOn"][0]["reference"] == f"ServiceRequest/{order_id}"
    assert study["numberOfInstances"] == 3 and study["series"][0]["modality"]["code"] == "CT"
    assert any(i["value"] == accession and i["type"]["coding"][0]["code"] == "ACSN" for i in study["identifier"] if "type" in i)
    assert len(fhir.search("Patient", {"identifier": f"{MRN_SYSTEM}|{mrn}"})) == 1  # matched, not duplicated

    job = wait_for_job(api, study["id"])
    assert job["status"] == "done" and job["source"] == "pacs" and job["id"] in arrival["jobs"]
    order, _ = fhir.read("ServiceRequest", order_id)
    assert order["priority"] == "stat"  # untrained test weights at threshold 0: every label positive
    assert "announced" in lua_orthanc.log_tail(200)


def test_unknown_patient_is_created_from_the_dicom_headers_when_the_policy_says_so(lua_orthanc, fhir, api):
    mrn = f"NEW-{uuid.uuid4().hex[:8]}"
    mr = dicom_data.make_dataset(np.random.default_rng(1).integers(0, 800, (64, 64)).astype(np.uint16), modality="MR",
                                 body_part="BRAIN", series_description="MR BRAIN T1 POST", patient_id=mrn,
                                 patient_name="Doe^Jane", patient_birth_date="19700102", patient_sex="F")
    devservers.upload_dicom(lua_orthanc.url, [mr])
    arrival = wait_for_arrival(api, str(mr.StudyInstanceUID))
    assert arrival["status"] == "done" and arrival["patientCreated"] is True, arrival

    [patient] = fhir.search("Patient", {"identifier": f"{MRN_SYSTEM}|{mrn}"})
    assert patient["name"][0] == {"family": "Doe", "given": ["Jane"]}
    assert patient["birthDate"] == "1970-01-02" and patient["gender"] == "female"
    assert any(t["code"] == "patient-from-dicom" for t in patient["meta"]["tag"])
    [study] = imaging_studies_for(fhir, str(mr.StudyInstanceUID))
    assert study["subject"]["reference"] == f"Patient/{patient['id']}" and "basedOn" not in study
    job = wait_for_job(api, study["id"])
    assert job["status"] == "done", job
    assert job["result"]["priority"]["changed"] is False  # no order to raise


def test_imaging_study_the_ehr_already_created_is_reused(lua_orthanc, fhir, api):
    mrn = f"MRN-{uuid.uuid4().hex[:8]}"
    patient_id, _ = ehr_patient_and_order(fhir, mrn, "unused")
    slices = ct_head(mrn)
    ehr_study = build_imaging_study(slices, patient_id=patient_id, study_id=f"is-{uuid.uuid4().hex[:8]}")
    fhir.update(ehr_study.model_dump(mode="json", exclude_none=True), if_match=None)

    devservers.upload_dicom(lua_orthanc.url, slices)
    arrival = wait_for_arrival(api, str(slices[0].StudyInstanceUID))
    assert arrival["status"] == "done" and arrival["created"] is False
    assert arrival["imagingStudies"] == [f"ImagingStudy/{ehr_study.id}"]
    assert len(imaging_studies_for(fhir, str(slices[0].StudyInstanceUID))) == 1
    assert wait_for_job(api, ehr_study.id)["status"] == "done"


def test_orthanc_with_a_wrong_secret_is_refused_and_nothing_is_created(service, fhir, api, tmp_path, monkeypatch):
    """The Lua script also reads its settings from the environment (as in docker/): here a wrong secret."""
    monkeypatch.setenv("CDS_TRIAGE_PACS_URL", f"{service.public_url}/pacs/studies")
    monkeypatch.setenv("CDS_PACS_TRIGGER_SECRET", "not-the-secret")
    with devservers.start_orthanc(tmp_path / "orthanc", lua_scripts=[LUA_SCRIPT], extra_config={"StableAge": 1}) as other:
        slices = ct_head("MRN-x")
        devservers.upload_dicom(other.url, slices)
        deadline = time.monotonic() + 30
        while "failed" not in other.log_tail(200) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "failed: refused" in other.log_tail(200)
    study_uid = str(slices[0].StudyInstanceUID)
    assert api.get(f"/pacs/studies/{study_uid}").status_code == 404  # never accepted
    assert imaging_studies_for(fhir, study_uid) == []


# --- straight to the endpoint -----------------------------------------------------------------


def test_wrong_or_missing_secret_gets_401(service):
    body = {"StudyInstanceUID": "1.2.3.4"}
    with httpx.Client(base_url=service.public_url, timeout=10) as client:
        for headers in ({}, {PACS_SECRET_HEADER: "wrong"}, {PACS_SECRET_HEADER: SECRET + "x"}):
            response = client.post("/pacs/studies", json=body, headers=headers)
            assert response.status_code == 401
            assert response.json()["resourceType"] == "OperationOutcome"
            assert response.json()["issue"][0]["code"] == "login"
            assert client.get("/pacs/studies/1.2.3.4", headers=headers).status_code == 401


def test_unknown_study_is_accepted_then_fails_clearly(fhir, api):
    study_uid = pydicom.uid.generate_uid()  # never stored in the PACS
    response = api.post("/pacs/studies", json={"StudyInstanceUID": study_uid})
    assert response.status_code == 202 and response.json()["status"] == "accepted"
    assert response.json()["statusUrl"].endswith(f"/pacs/studies/{study_uid}")
    arrival = wait_for_arrival(api, study_uid)
    assert arrival["status"] == "failed" and "not found in the PACS" in arrival["reason"], arrival
    assert arrival["attempts"] == 1  # permanent: not retried
    assert imaging_studies_for(fhir, study_uid) == []
    assert api.get("/healthz").status_code == 200


@pytest.mark.parametrize("body", [{"StudyInstanceUID": "1.2.abc"}, {"StudyInstanceUID": "01.2"}, {"uid": "1.2.3"},
                                  {"StudyInstanceUID": "1." + "2" * 70}, ["1.2.3"]])
def test_bad_body_gets_400(api, body):
    response = api.post("/pacs/studies", json=body)
    assert response.status_code == 400 and response.json()["issue"][0]["code"] == "invalid"


def test_status_of_a_study_never_announced_is_404(api):
    response = api.get(f"/pacs/studies/{pydicom.uid.generate_uid()}")
    assert response.status_code == 404 and response.json()["resourceType"] == "OperationOutcome"


# --- in-process, against the real FHIR server and a plain Orthanc ------------------------------------


def test_trigger_is_off_without_a_secret(tmp_path):
    app = create_app(Settings(operator_open_on_loopback=True, data_dir=tmp_path / "data", pacs_trigger_secret=""))
    response = app.test_client().post("/pacs/studies", json={"StudyInstanceUID": "1.2.3"}, headers={PACS_SECRET_HEADER: ""})
    assert response.status_code == 403 and "CDS_PACS_TRIGGER_SECRET" in response.get_json()["issue"][0]["diagnostics"]


def test_misspelt_unknown_patient_policy_fails_at_start(tmp_path):
    with pytest.raises(ValueError, match="CDS_PACS_UNKNOWN_PATIENT"):
        create_app(Settings(operator_open_on_loopback=True, data_dir=tmp_path / "data", pacs_unknown_patient="maybe"))


def test_reject_policy_and_ambiguous_patient_create_nothing(orthanc, fhir_server, fhir, tmp_path):
    settings = Settings(operator_open_on_loopback=True, fhir_base_url=fhir_server.url, dicomweb_url=orthanc.dicomweb_url, data_dir=tmp_path,
                        patient_identifier_system=MRN_SYSTEM, pacs_unknown_patient="reject", http_timeout_s=10)
    mrn = f"MRN-{uuid.uuid4().hex[:8]}"
    slices = ct_head(mrn)
    study_uid = str(slices[0].StudyInstanceUID)
    devservers.upload_dicom(orthanc.url, slices)

    with pytest.raises(PatientMatchError, match="no Patient") as unknown:
        resolve_arrival(study_uid, settings, fhir)
    assert mrn not in str(unknown.value)  # no patient data in reasons and logs
    for _ in range(2):
        fhir.create({"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": mrn}]})
    with pytest.raises(PatientMatchError, match="2 Patients"):
        resolve_arrival(study_uid, replace(settings, pacs_unknown_patient="create"), fhir)
    assert imaging_studies_for(fhir, study_uid) == []
    with pytest.raises(StudyNotFoundError, match="not found in the PACS"):
        resolve_arrival(pydicom.uid.generate_uid(), settings, fhir)


# --- the pure core ------------------------------------------------------------------------------------


def test_study_uid_from_body():
    assert study_uid_from_body({"StudyInstanceUID": " 1.2.840.10008.1 "}) == "1.2.840.10008.1"
    for bad in (None, "1.2.3", {}, {"StudyInstanceUID": 123}, {"StudyInstanceUID": "1..2"}, {"StudyInstanceUID": "1.02"},
                {"StudyInstanceUID": "1"}, {"StudyInstanceUID": "1.2.3; DROP"}):
        with pytest.raises(ValueError):
            study_uid_from_body(bad)


def test_choose_patient_and_order():
    one = [{"resourceType": "Patient", "id": "a"}, {"resourceType": "OperationOutcome"}]
    assert choose_patient(one, UnknownPatientPolicy.REJECT, "urn:x") == "a"
    assert choose_patient([], UnknownPatientPolicy.CREATE, "urn:x") is None
    with pytest.raises(PatientMatchError, match="CDS_PACS_UNKNOWN_PATIENT=reject"):
        choose_patient([], UnknownPatientPolicy.REJECT, "urn:x")
    with pytest.raises(PatientMatchError, match="2 Patients"):
        choose_patient(one + [{"resourceType": "Patient", "id": "b"}], UnknownPatientPolicy.CREATE, "urn:x")
    assert choose_order([{"resourceType": "ServiceRequest", "id": "o"}]) == "o"
    assert choose_order([{"resourceType": "ServiceRequest", "id": "o"}, {"resourceType": "ServiceRequest", "id": "p"}]) is None
    assert choose_order([]) is None


def test_datasets_from_metadata_keeps_only_the_header_fields():
    item = {
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
        "00080060": {"vr": "CS", "Value": ["CT"]},
        "7FE00010": {"vr": "OW", "BulkDataURI": "http://pacs/bulk/1"},
        "00091001": {"vr": "LO", "Value": ["private"]},
    }
    [ds] = datasets_from_metadata([item])
    assert ds.StudyInstanceUID == "1.2.3" and str(ds.PatientName) == "Doe^Jane" and ds.Modality == "CT"
    assert "PixelData" not in ds and len(ds) == 3
