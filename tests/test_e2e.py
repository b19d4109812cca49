"""End to end on real servers: Orthanc (DICOMweb), the FHIR server, `serve` + `worker`.

The EHR side is played over plain FHIR REST: store images in the PACS, create Patient,
ServiceRequest and ImagingStudy; the FHIR server's rest-hook Subscription notifies our
service; we then look for the results in the FHIR server. Nothing is mocked.

The models here are card-compatible *untrained* weights made in a temp dir with
thresholds at 0, so every trained label is positive: these tests are about the plumbing.
Model quality is tested against the committed weights in test_weights.py.

Server-agnostic: with CDS_FHIR_BASE_URL (and CDS_DICOMWEB_URL) set, the same tests run against
that FHIR server (and PACS) instead of the local ones: `hapi-fhir-test/run.sh` does this with
HAPI FHIR. Nothing here relies on a server's id or version formats, search quirks or wording.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from cds_service.demo import start_service
from cds_service.devservers import free_port, make_dataset, upload_dicom
from cds_service.domain import Task
from cds_service.fhir_client import FhirClient
from cds_service.settings import Settings
from cds_service.subscribe import ensure_subscription
from fhir_mappings.imaging_study import build_imaging_study
from hook_client import EhrSigner
from support import make_test_weights

pytestmark = pytest.mark.integration

SECRET = "e2e-secret"
EHR = EhrSigner()
FINISHED = {"done", "failed", "not_applicable", "model_unavailable"}


@dataclass(frozen=True)
class ExternalPacs:
    """A PACS the test did not start (CDS_DICOMWEB_URL): Orthanc REST root and DICOMweb base."""

    url: str
    dicomweb_url: str


@pytest.fixture(scope="module")
def fhir_base_url(request) -> str:
    """The FHIR server under test: CDS_FHIR_BASE_URL (e.g. HAPI), else the local sekmet server."""
    return os.environ.get("CDS_FHIR_BASE_URL") or request.getfixturevalue("fhir_server").url


@pytest.fixture(scope="module")
def pacs(request):
    """The PACS under test: the Orthanc at CDS_DICOMWEB_URL, else the local one."""
    dicomweb = os.environ.get("CDS_DICOMWEB_URL", "").rstrip("/")
    if dicomweb:
        return ExternalPacs(url=dicomweb.removesuffix("/dicom-web"), dicomweb_url=dicomweb)
    return request.getfixturevalue("orthanc")


def wait_until_active(settings: Settings, subscription_id: str, timeout: float = 60) -> None:
    """Servers activate a Subscription on their own time (HAPI asynchronously): wait for `active`."""
    client = FhirClient(settings.fhir_base_url)
    try:
        deadline = time.monotonic() + timeout
        while (status := client.read("Subscription", subscription_id)[0].get("status")) != "active":
            assert status in ("requested", None) and time.monotonic() < deadline, f"Subscription status {status!r}"
            time.sleep(0.5)
    finally:
        client.close()


@pytest.fixture(scope="module")
def service(pacs, fhir_base_url, tmp_path_factory):
    """Our service, subscribed to ImagingStudy on the FHIR server; stopped after the module."""
    root = tmp_path_factory.mktemp("service")
    weights = make_test_weights(root / "weights", Task.HEAD_CT_ICH)
    make_test_weights(weights, Task.BRAIN_MRI)
    port = free_port()
    settings = Settings(
        operator_open_on_loopback=True,  # tests call /jobs directly
        fhir_base_url=fhir_base_url, dicomweb_url=pacs.dicomweb_url, public_url=f"http://127.0.0.1:{port}",
        host="127.0.0.1", port=port, data_dir=root / "data", weights_dir=weights, subscription_secret=SECRET,
        job_retries=2, job_retry_delay_s=0.2, http_timeout_s=10,
        **EHR.hook_settings(root / "ehr-jwks.json"),  # CDS Hooks calls must carry the EHR's signed JWT
    )
    processes = start_service(settings, root / "logs")
    subscription_id, _ = ensure_subscription(settings, f"{settings.public_url}/fhir-notify")
    wait_until_active(settings, subscription_id)
    yield settings
    processes.stop()
    cleanup = FhirClient(settings.fhir_base_url)  # a long-lived server must not keep notifying a stopped service
    try:
        cleanup.delete("Subscription", subscription_id)
    finally:
        cleanup.close()


@pytest.fixture
def fhir(service):
    client = FhirClient(service.fhir_base_url)
    yield client
    client.close()


@pytest.fixture
def api(service):
    with httpx.Client(base_url=service.public_url, timeout=10) as client:
        yield client


def ct_slices(study_uid: str, count: int = 3, *, body_part: str = "HEAD", description: str = "CT HEAD WO") -> list[pydicom.Dataset]:
    rng = np.random.default_rng(0)
    series_uid = pydicom.uid.generate_uid()
    slices = []
    for i in range(count):
        hu = rng.normal(35, 10, (64, 64)).clip(-1000, 2000)
        slices.append(make_dataset((hu + 1024).astype(np.uint16), modality="CT", body_part=body_part,
                                   series_description=description, study_uid=study_uid, series_uid=series_uid,
                                   instance_number=i + 1, rescale_slope=1, rescale_intercept=-1024))
    return slices


def order_study(fhir: FhirClient, datasets, *, priority: str = "routine", store_in_pacs: str | None = None,
                imaging_study: dict | None = None) -> dict[str, str]:
    """Play the EHR: Patient, ServiceRequest, then the ImagingStudy that triggers triage."""
    if store_in_pacs:
        upload_dicom(store_in_pacs, datasets)
    tag = uuid.uuid4().hex[:10]
    ids = {"patient": f"p-{tag}", "order": f"sr-{tag}", "study": f"is-{tag}"}
    fhir.update({"resourceType": "Patient", "id": ids["patient"], "name": [{"family": "Test", "given": [tag]}]}, if_match=None)
    fhir.update({"resourceType": "ServiceRequest", "id": ids["order"], "status": "active", "intent": "order",
                 "priority": priority, "subject": {"reference": f"Patient/{ids['patient']}"},
                 "authoredOn": "2026-11-23T08:00:00Z"}, if_match=None)
    study = imaging_study or build_imaging_study(datasets, patient_id=ids["patient"], service_request_id=ids["order"],
                                                  study_id=ids["study"]).model_dump(mode="json", exclude_none=True)
    study["id"] = ids["study"]
    study.setdefault("subject", {"reference": f"Patient/{ids['patient']}"})  # servers may enforce referential integrity
    fhir.update(study, if_match=None)
    return ids


def wait_for_job(api: httpx.Client, study_id: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    jobs: list = []
    while time.monotonic() < deadline:
        jobs = api.get("/jobs", params={"imagingStudy": study_id}).json()["jobs"]
        if jobs and jobs[0]["status"] in FINISHED:
            return jobs[0]
        time.sleep(0.3)
    raise AssertionError(f"job for ImagingStudy/{study_id} did not finish: {jobs}")


def results_for(fhir: FhirClient, patient_id: str) -> dict[str, list[dict]]:
    subject = {"subject": f"Patient/{patient_id}"}
    return {
        "DiagnosticReport": fhir.search("DiagnosticReport", subject),
        "Observation": fhir.search("Observation", subject),
        "Media": fhir.search("Media", subject),
    }


def test_new_imaging_study_is_triaged_and_written_back(pacs, fhir, api):
    study_uid = pydicom.uid.generate_uid()
    started = time.monotonic()
    ids = order_study(fhir, ct_slices(study_uid, 4), store_in_pacs=pacs.url)
    job = wait_for_job(api, ids["study"])
    elapsed = time.monotonic() - started
    assert job["status"] == "done", job
    assert job["source"] == "subscription"

    written = results_for(fhir, ids["patient"])
    [report] = written["DiagnosticReport"]
    assert report["status"] == "preliminary"
    assert report["basedOn"][0]["reference"] == f"ServiceRequest/{ids['order']}"
    assert report["imagingStudy"][0]["reference"] == f"ImagingStudy/{ids['study']}"
    assert "AI-generated, preliminary" in report["conclusion"]
    assert any(s.get("code") == "AIAST" for s in report["meta"]["security"])
    assert len(report["result"]) == len(written["Observation"]) == 1  # only the trained label 'any'
    [observation] = written["Observation"]
    assert observation["valueQuantity"]["value"] >= 0 and observation["derivedFrom"][0]["reference"] == f"ImagingStudy/{ids['study']}"
    device_id = observation["device"]["reference"].split("/")[-1]
    device, _ = fhir.read("Device", device_id)
    assert device["version"][0]["value"] == "0.0.0-test"
    [media] = written["Media"]
    png = api.get(f"/heatmaps/{media['id']}.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

    order, _ = fhir.read("ServiceRequest", ids["order"])
    assert order["priority"] == "stat"
    assert "raised from routine to stat by AI triage" in order["note"][-1]["text"]
    assert job["result"]["priority"] == {"changed": True, "from": "routine", "to": "stat"}
    assert elapsed < 60, f"triage took {elapsed:.1f}s"


def test_repeated_and_update_notifications_leave_one_set_of_results(pacs, fhir, api, service):
    ids = order_study(fhir, ct_slices(pydicom.uid.generate_uid(), 2), store_in_pacs=pacs.url)
    job = wait_for_job(api, ids["study"])
    assert job["status"] == "done"
    secret = {"X-CDS-Subscription-Secret": SECRET}
    study, _ = fhir.read("ImagingStudy", ids["study"])
    again = [api.put(f"/fhir-notify/ImagingStudy/{ids['study']}", json=study, headers=secret) for _ in range(2)]
    assert all(r.status_code == 200 and r.json()["jobs"][0]["id"] == job["id"] for r in again)
    study["description"] = "updated by the EHR"
    fhir.update(study, if_match=None)  # the Subscription fires on update too
    # An operator re-runs the finished job: the write-back must still create nothing new.
    assert api.post(f"/jobs/{job['id']}/requeue").status_code == 202
    rerun = wait_for_job(api, ids["study"])
    assert rerun["id"] == job["id"] and rerun["status"] == "done" and rerun["attempts"] >= 2
    written = results_for(fhir, ids["patient"])
    assert len(written["DiagnosticReport"]) == 1 and len(written["Observation"]) == 1 and len(written["Media"]) == 1
    assert len(api.get("/jobs", params={"imagingStudy": ids["study"]}).json()["jobs"]) == 1


def test_cds_hook_call_ends_in_the_same_job_and_a_person_set_priority_is_kept(pacs, fhir, api):
    mr = make_dataset(np.random.default_rng(1).integers(0, 800, (64, 64)).astype(np.uint16), modality="MR",
                      body_part="BRAIN", series_description="MR BRAIN T1 POST")
    ids = order_study(fhir, [mr], priority="stat", store_in_pacs=pacs.url)
    hook = {"hook": "imagingstudy-create", "hookInstance": str(uuid.uuid4()), "fhirServer": fhir.base_url,
            "context": {"patientId": ids["patient"], "imagingStudyId": ids["study"], "serviceRequestId": ids["order"]}}
    response = api.post("/cds-services/imagingstudy-create", json=hook,
                        headers=EHR.auth(str(api.base_url).rstrip("/") + "/cds-services/imagingstudy-create"))
    assert response.status_code == 200 and response.json()["cards"][0]["summary"].startswith("AI triage")
    job = wait_for_job(api, ids["study"])
    assert job["status"] == "done"
    assert {f["label"] for f in job["result"]["findings"] if f["positive"]} == {"glioma", "meningioma", "pituitary"}
    order, _ = fhir.read("ServiceRequest", ids["order"])
    assert order["priority"] == "stat"  # urgent finding never lowers a person's stat
    assert job["result"]["priority"]["changed"] is False


def test_a_head_ct_with_an_empty_header_is_routed_by_the_fhir_body_site(pacs, fhir, api):
    """De-identified real-world CT: no BodyPartExamined or descriptions; the EHR's ImagingStudy says Head."""
    slices = ct_slices(pydicom.uid.generate_uid(), 2, body_part="", description="")
    ids = order_study(fhir, slices, store_in_pacs=pacs.url)
    study, _ = fhir.read("ImagingStudy", ids["study"])
    for series in study["series"]:
        series["bodySite"] = {"system": "http://snomed.info/sct", "code": "69536005", "display": "Head structure"}
    fhir.update(study, if_match=None)
    job = wait_for_job(api, ids["study"])
    assert job["status"] == "done" and job["result"]["task"] == "head_ct_ich", job
    assert job["result"]["routedBy"] == "fhir:ImagingStudy.series.bodySite"

    # without the body site, the reason says what was missing
    bare = order_study(fhir, ct_slices(pydicom.uid.generate_uid(), 1, body_part="", description=""), store_in_pacs=pacs.url)
    job = wait_for_job(api, bare["study"])
    assert job["status"] == "not_applicable" and "bodySite" in job["reason"] and "BodyPartExamined" in job["reason"]


def test_study_no_model_applies_to_is_recorded_without_findings(pacs, fhir, api):
    ids = order_study(fhir, ct_slices(pydicom.uid.generate_uid(), 1, body_part="ABDOMEN", description="CT ABDOMEN"),
                      store_in_pacs=pacs.url)
    job = wait_for_job(api, ids["study"])
    assert job["status"] == "not_applicable" and "ABDOMEN" in job["reason"]
    assert results_for(fhir, ids["patient"])["DiagnosticReport"] == []
    order, _ = fhir.read("ServiceRequest", ids["order"])
    assert order["priority"] == "routine"


def test_chest_xray_without_weights_is_model_unavailable(pacs, fhir, api):
    cr = make_dataset(np.random.default_rng(2).integers(0, 4000, (64, 64)).astype(np.uint16), modality="CR",
                      body_part="CHEST", series_description="CHEST PA")
    ids = order_study(fhir, [cr], store_in_pacs=pacs.url)
    job = wait_for_job(api, ids["study"])
    assert job["status"] == "model_unavailable" and "chest_pneumothorax" in job["reason"]
    assert results_for(fhir, ids["patient"])["DiagnosticReport"] == []


def test_imaging_study_without_uid_fails_clearly(fhir, api):
    bare = {"resourceType": "ImagingStudy", "status": "available"}  # subject: the test's Patient
    ids = order_study(fhir, [], imaging_study=bare)
    job = wait_for_job(api, ids["study"])
    assert job["status"] == "failed" and "urn:dicom:uid" in job["reason"]


def test_study_missing_from_the_pacs_is_retried_then_fails(fhir, api):
    datasets = ct_slices(pydicom.uid.generate_uid(), 1)  # never stored in the PACS
    ids = order_study(fhir, datasets)
    job = wait_for_job(api, ids["study"])
    assert job["status"] == "failed" and "not found in the PACS" in job["reason"] and job["attempts"] == 2


def test_pixelless_dicom_fails_clearly(pacs, fhir, api):
    [ds] = ct_slices(pydicom.uid.generate_uid(), 1)
    del ds.PixelData
    ids = order_study(fhir, [ds], store_in_pacs=pacs.url)
    job = wait_for_job(api, ids["study"])
    assert job["status"] == "failed" and "pixel data" in job["reason"]


def test_notification_for_a_missing_or_deleted_study_fails_clearly(fhir, api):
    bare = {"resourceType": "ImagingStudy", "status": "available"}  # subject: the test's Patient
    ids = order_study(fhir, [], imaging_study=bare)
    assert wait_for_job(api, ids["study"])["status"] == "failed"  # no UID yet
    fhir.delete("ImagingStudy", ids["study"])
    for study_id in (ids["study"], "never-existed"):  # a failed job is retried when notified again
        response = api.put(f"/fhir-notify/ImagingStudy/{study_id}", headers={"X-CDS-Subscription-Secret": SECRET})
        assert response.status_code == 200
        time.sleep(0.5)
        job = wait_for_job(api, study_id)
        assert job["status"] == "failed" and ("404" in job["reason"] or "410" in job["reason"]), job


def start_variant(service: Settings, tmp_path: Path, **changes) -> tuple[Settings, object]:
    """Another instance of our service with some settings changed (its own data dir and port)."""
    port = free_port()
    variant = replace(service, port=port, public_url=f"http://127.0.0.1:{port}", data_dir=tmp_path / "data", **changes)
    return variant, start_service(variant, tmp_path / "logs")


def test_fhir_server_down_is_retried_then_failed_and_service_keeps_serving(service, tmp_path):
    dead, processes = start_variant(service, tmp_path, fhir_base_url=f"http://127.0.0.1:{free_port()}/fhir")
    try:
        with httpx.Client(base_url=dead.public_url, timeout=10) as client:
            response = client.put("/fhir-notify/ImagingStudy/abc", headers={"X-CDS-Subscription-Secret": SECRET})
            assert response.status_code == 200
            job = wait_for_job(client, "abc")
            assert job["status"] == "failed" and "FHIR server unreachable" in job["reason"] and job["attempts"] == 2
            assert client.get("/healthz").status_code == 200
    finally:
        processes.stop()


def test_pacs_down_is_retried_then_failed(service, fhir, tmp_path):
    dead, processes = start_variant(service, tmp_path, dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web")
    try:
        ids = order_study(fhir, ct_slices(pydicom.uid.generate_uid(), 1))
        with httpx.Client(base_url=dead.public_url, timeout=10) as client:
            client.put(f"/fhir-notify/ImagingStudy/{ids['study']}", headers={"X-CDS-Subscription-Secret": SECRET})
            job = wait_for_job(client, ids["study"])
            assert job["status"] == "failed" and "PACS unreachable" in job["reason"] and job["attempts"] == 2
    finally:
        processes.stop()


def test_subscribe_is_idempotent(service):
    first = ensure_subscription(service, f"{service.public_url}/fhir-notify")
    second = ensure_subscription(service, f"{service.public_url}/fhir-notify")
    assert first[0] == second[0] and second[1] is False
