"""End to end on real servers: Orthanc (DICOMweb), the FHIR server, `serve` + `worker`.

The EHR side is played over plain FHIR REST: store images in the PACS, create Patient,
ServiceRequest and ImagingStudy; the FHIR server's rest-hook Subscription notifies our
service; we then look for the results in the FHIR server. Nothing is mocked.

The models here are card-compatible *untrained* weights made in a temp dir with
thresholds at 0, so every trained label is positive: these tests are about the plumbing.
Model quality is tested against the committed weights in test_weights.py.

Every test runs against three FHIR servers, `[sekmet]` (the local Python server, SQLite), `[hapi]`
(HAPI FHIR's JPA server from hapi-fhir-test/, built once by Maven and started by the `hapi_server`
fixture) and `[hapi-strict]` (the same HAPI as a hospital's validating server: request validation on,
current HL7 Terminology and our `cds-triage fhir-package` loaded; a write with a validation error is
refused, tests/strict_hapi_support.py); with CDS_FHIR_BASE_URL (and CDS_DICOMWEB_URL) set, only against that server (and PACS),
as `[external]`: `hapi-fhir-test/run.sh` does this with HAPI in Docker. Nothing here relies on a
server's id or version formats, search quirks or wording; where the servers differ (409 or 412 for
a stale If-Match) the test says which answer each gives. The HAPI log is read to check each
notification was delivered once and none failed (HAPI retries a failed delivery for a minute).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

import hapi_support
from cds_service.web.cds_hooks.calls import render_query
from cds_devtools.demo import start_service
from cds_devtools.devservers import free_port, upload_dicom
from cds_devtools.dicom_data import make_dataset
from cds_service.core.domain import Finding, ModelRef, Priority, Task, TriageResult, TriageStatus
from cds_service.adapters.fhir_client import FhirClient, VersionConflictError
from cds_service.pipeline import raise_order_priority
from cds_service.core.settings import Settings
from cds_service.adapters.subscribe import ensure_subscription
from fhir_mappings.imaging_study import build_imaging_study
from hook_client import EhrSigner
from support import make_test_weights, seed_onnx_exports

pytestmark = pytest.mark.integration

SECRET = "e2e-secret"
EHR = EhrSigner()
FINISHED = {"done", "failed", "not_applicable", "model_unavailable"}


@dataclass(frozen=True)
class ExternalPacs:
    """A PACS the test did not start (CDS_DICOMWEB_URL): Orthanc REST root and DICOMweb base."""

    url: str
    dicomweb_url: str


#: Every test here runs against each FHIR server: sekmet (SQLite, Python), HAPI FHIR's JPA server
#: (hapi-fhir-test/, built by Maven and started by the `hapi_server` fixture) and the same HAPI validating
#: every write (`strict_hapi_server`), or only against the one CDS_FHIR_BASE_URL names.
FHIR_SERVERS = (["external"] if os.environ.get("CDS_FHIR_BASE_URL")
                else ["sekmet", pytest.param("hapi", marks=pytest.mark.hapi), pytest.param("hapi-strict", marks=pytest.mark.hapi_strict)])


@dataclass(frozen=True)
class FhirUnderTest:
    name: str  # "sekmet", "hapi", "hapi-strict" or "external" (CDS_FHIR_BASE_URL)
    url: str
    hapi: hapi_support.HapiLogReader | None = None  # HAPI's log, when we started HAPI ourselves


@pytest.fixture(scope="module", params=FHIR_SERVERS)
def fhir_under_test(request) -> FhirUnderTest:
    """The FHIR server under test: sekmet and HAPI in turn, or the one at CDS_FHIR_BASE_URL."""
    if request.param == "external":  # with the log of the HAPI that hapi-fhir-test/run.sh --no-docker started
        log = os.environ.get("CDS_TEST_HAPI_LOG")
        return FhirUnderTest("external", os.environ["CDS_FHIR_BASE_URL"], hapi_support.HapiLog(log) if log else None)
    if request.param in ("hapi", "hapi-strict"):
        hapi = request.getfixturevalue("hapi_server" if request.param == "hapi" else "strict_hapi_server")
        return FhirUnderTest(request.param, hapi.url, hapi)
    return FhirUnderTest("sekmet", request.getfixturevalue("fhir_server").url)


@pytest.fixture(scope="module")
def fhir_base_url(fhir_under_test) -> str:
    return fhir_under_test.url


@pytest.fixture(scope="module")
def pacs(request):
    """The PACS under test: the Orthanc at CDS_DICOMWEB_URL, else the local one."""
    dicomweb = os.environ.get("CDS_DICOMWEB_URL", "").rstrip("/")
    if dicomweb:
        return ExternalPacs(url=dicomweb.removesuffix("/dicom-web"), dicomweb_url=dicomweb)
    return request.getfixturevalue("orthanc")


@dataclass(frozen=True)
class Subscribed:
    subscription_id: str
    stdout: str  # what `cds-triage subscribe` said


def run_subscribe(settings: Settings) -> Subscribed:
    """`cds-triage subscribe`, as an operator runs it: creates the Subscription and waits until it is active."""
    done = subprocess.run([sys.executable, "-m", "cds_service.cli", "subscribe", "--wait", "120"],
                          env={**os.environ, **settings.to_env()}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"Subscription/([A-Za-z0-9\-.]{1,64})", done.stdout)
    assert found, done.stdout
    return Subscribed(found.group(1), done.stdout)


@pytest.fixture(scope="module")
def subscribed(service_and_subscription) -> Subscribed:
    return service_and_subscription[1]


@pytest.fixture(scope="module")
def service(service_and_subscription) -> Settings:
    return service_and_subscription[0]


@pytest.fixture(scope="module")
def service_and_subscription(pacs, fhir_base_url, tmp_path_factory):
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
    processes = start_service(seed_onnx_exports(settings), root / "logs")
    try:
        subscribed = run_subscribe(settings)
    except BaseException:
        processes.stop()
        raise
    yield settings, subscribed
    processes.stop()
    cleanup = FhirClient(settings.fhir_base_url)  # a long-lived server must not keep notifying a stopped service
    try:
        cleanup.delete("Subscription", subscribed.subscription_id)
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


def test_new_imaging_study_is_triaged_and_written_back(pacs, fhir, api, fhir_under_test):
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
    if fhir_under_test.hapi:  # HAPI took our OperationOutcome answer: one delivery, no retry
        assert len(fhir_under_test.hapi.deliveries(f"ImagingStudy/{ids['study']}")) == 1
        assert fhir_under_test.hapi.delivery_failures() == []


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
    return variant, start_service(seed_onnx_exports(variant), tmp_path / "logs")


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


#: What `cds-triage subscribe` and /readyz say about AIAST on each server: HAPI 8.8.0's bundled HL7 terminology
#: (2018) lacks it, the validating HAPI has current HL7 Terminology loaded, sekmet has no CodeSystem/$validate-code.
AIAST_KNOWN = {"sekmet": None, "hapi": False, "hapi-strict": True}
AIAST_SAID = {None: "could not check", False: "NOT known to the FHIR server's terminology",
              True: "known to the FHIR server's terminology"}


def test_subscribe_command_waited_until_the_server_activated_it(service, subscribed, fhir, api, fhir_under_test):
    """HAPI stores a new Subscription as `requested` and activates it asynchronously; sekmet after a handshake.
    On the way it says whether the server's terminology knows our AI security label (so does /readyz)."""
    lines = subscribed.stdout.splitlines()
    assert lines[0] == f"created: Subscription/{subscribed.subscription_id} → {service.public_url}/fhir-notify"
    assert lines[-1].startswith(f"active: Subscription/{subscribed.subscription_id} (after ")
    [label] = [line for line in lines if line.startswith("AI security label ")]
    assert label.startswith("AI security label http://terminology.hl7.org/CodeSystem/v3-ObservationValue|AIAST: ")
    readyz = api.get("/readyz").json()
    [check] = readyz["aiSecurityLabels"]
    assert check["code"] == "AIAST"
    if fhir_under_test.name in AIAST_KNOWN:
        known = AIAST_KNOWN[fhir_under_test.name]
        assert AIAST_SAID[known] in label and (known or "NOT" in label or "could not" in label), label
        assert check["known"] is known, check
    subscription, _ = fhir.read("Subscription", subscribed.subscription_id)
    assert subscription["status"] == "active" and subscription["channel"]["type"] == "rest-hook"
    assert subscription["channel"]["header"] == [f"X-CDS-Subscription-Secret: {SECRET}"]
    again = run_subscribe(service)  # a second run finds it, already active
    assert again.subscription_id == subscribed.subscription_id and again.stdout.startswith("already present:")


def test_a_stale_if_match_is_a_conflict_and_the_priority_raise_re_reads(fhir, fhir_under_test):
    """If-Match with an old version: 412 from sekmet, 409 (HAPI-0989) from HAPI; both are a version
    conflict, and raising the priority re-reads the order and keeps what a person wrote meanwhile."""
    ids = order_study(fhir, [], imaging_study={"resourceType": "ImagingStudy", "status": "registered"})
    order, version = fhir.read("ServiceRequest", ids["order"])
    fhir.update(dict(order, note=[{"text": "patient is anxious"}]), if_match=version)
    with pytest.raises(VersionConflictError) as conflict:
        fhir.update(dict(order, priority="asap"), if_match=version)
    expected = {"sekmet": 412, "hapi": 409, "hapi-strict": 409}.get(fhir_under_test.name, conflict.value.status_code)  # external: either
    assert conflict.value.status_code == expected and expected in (409, 412)

    person = FhirClient(fhir.base_url)
    racing = PersonEditsBetweenOurReadAndWrite(fhir.base_url, person)
    result = TriageResult("1.2.3", TriageStatus.DONE, Task.HEAD_CT_ICH, findings=(Finding("any", 0.97, True, 0.5),),
                          suggested_priority=Priority.STAT, model=ModelRef("test-model", "0.0.0-test"))
    try:
        outcome = raise_order_priority(racing, ids["order"], Priority.STAT, result)
    finally:
        racing.close()
        person.close()
    assert racing.conflicts == [expected]  # one conflict, then the re-read and a second write succeeded
    assert outcome == {"changed": True, "from": "urgent", "to": "stat"}
    final, _ = fhir.read("ServiceRequest", ids["order"])
    assert final["priority"] == "stat"
    notes = [n["text"] for n in final["note"]]
    assert "called in by the ward: urgent" in notes and "raised from urgent to stat by AI triage" in notes[-1]


class PersonEditsBetweenOurReadAndWrite(FhirClient):
    """A FhirClient during whose first read of the order a person raises it to urgent (so our If-Match is stale)."""

    def __init__(self, base_url: str, person: FhirClient) -> None:
        super().__init__(base_url)
        self.person = person
        self.raced = False
        self.conflicts: list[int] = []

    def read(self, resource_type: str, resource_id: str):
        resource, version = super().read(resource_type, resource_id)
        if resource_type == "ServiceRequest" and not self.raced:
            self.raced = True
            notes = [*resource.get("note", []), {"text": "called in by the ward: urgent"}]
            self.person.update(dict(resource, priority="urgent", note=notes), if_match=version)
        return resource, version

    def update(self, resource, *, if_match):
        try:
            return super().update(resource, if_match=if_match)
        except VersionConflictError as exc:
            self.conflicts.append(exc.status_code)
            raise


def test_searches_follow_the_servers_paging_links(fhir):
    """HAPI pages with `?_getpages=…` links on its own base, sekmet with its own: both are followed."""
    family = f"Paging{uuid.uuid4().hex[:8]}"
    for i in range(5):
        fhir.update({"resourceType": "Patient", "id": f"p-{family.lower()}-{i}", "name": [{"family": family}]}, if_match=None)
    found = fhir.search("Patient", {"family": family, "_count": "2"})
    assert sorted(p["id"] for p in found) == [f"p-{family.lower()}-{i}" for i in range(5)]
    assert len(fhir.search("Patient", {"family": family, "_count": "2"}, max_pages=2)) == 4


def ehr_prefetch(fhir: FhirClient, templates: dict[str, str], context: dict[str, str]) -> dict[str, dict]:
    """What the EHR sends as `prefetch`: each of the service's templates run against its own FHIR server."""
    prefetch = {}
    for key, template in templates.items():
        response = fhir.http.get(render_query(template, context))
        assert response.status_code == 200, f"{key}: {template} answered {response.status_code}: {response.text[:300]}"
        prefetch[key] = response.json()
    return prefetch


def test_worklist_and_cds_hooks_with_prefetch_show_the_result(pacs, fhir, api):
    """After triage: the worklist (one search with _include/_revinclude/_include:iterate) shows the
    raised order; the EHR runs our prefetch templates on its FHIR server and the hooks show the result."""
    ids = order_study(fhir, ct_slices(pydicom.uid.generate_uid(), 3), store_in_pacs=pacs.url)
    job = wait_for_job(api, ids["study"])
    assert job["status"] == "done", job

    rows = {row["orderId"]: row for row in api.get("/worklist/rows.json").json()["rows"]}
    row = rows[ids["order"]]
    assert row["priority"] == "stat" and row["aiRaisedFrom"] == "routine" and row["status"] == "done"
    assert row["topFinding"]["label"] == "any" and row["patient"] and row["study"]
    assert api.get(row["heatmap"]).content.startswith(b"\x89PNG")
    page = api.get(row["url"])
    assert page.status_code == 200 and "AI-generated" in page.text

    discovery_url = str(api.base_url).rstrip("/") + "/cds-services"
    services = {s["id"]: s for s in api.get("/cds-services", headers=EHR.auth(discovery_url)).json()["services"]}
    context = {"patientId": ids["patient"], "imagingStudyId": ids["study"], "serviceRequestId": ids["order"]}

    def call(service_id: str, hook_context: dict) -> dict:
        body = {"hook": services[service_id]["hook"], "hookInstance": str(uuid.uuid4()), "context": hook_context,
                "fhirServer": fhir.base_url, "prefetch": ehr_prefetch(fhir, services[service_id]["prefetch"], context)}
        url = str(api.base_url).rstrip("/") + f"/cds-services/{service_id}"
        response = api.post(f"/cds-services/{service_id}", json=body, headers=EHR.auth(url))
        assert response.status_code == 200, response.text
        return response.json()

    [card] = call("imagingstudy-create", context)["cards"]
    assert card["indicator"] == "critical" and any("/heatmaps/" in link["url"] for link in card["links"])
    [card] = call("patient-view", {"patientId": ids["patient"]})["cards"]  # aiReports: _include, _sort, identifier=system|
    assert card["indicator"] == "critical" and "Intracranial hemorrhage" in card["summary"]


def test_a_deleted_study_is_notified_as_a_delete_and_acknowledged(fhir, api, service, fhir_under_test):
    """HAPI sends `DELETE {endpoint}/ImagingStudy/<id>` when a Subscription asks for deletes (its own
    extension); /fhir-notify acknowledges it with an OperationOutcome and HAPI counts it delivered."""
    if fhir_under_test.hapi is None:
        pytest.skip("HAPI only: asks for delete notifications with HAPI's own Subscription extension and reads "
                    "HAPI's log to see the DELETE delivered")
    tag = uuid.uuid4().hex
    ids = order_study(fhir, [], imaging_study={"resourceType": "ImagingStudy", "status": "registered",
                                               "identifier": [{"system": "urn:cds-triage:test", "value": tag}]})
    assert wait_for_job(api, ids["study"])["status"] == "failed"  # no Study UID: nothing written that refers to it
    subscription = fhir.create({
        "resourceType": "Subscription", "status": "requested", "reason": "test: deletes",
        "criteria": f"ImagingStudy?identifier=urn:cds-triage:test|{tag}",
        "channel": {"type": "rest-hook", "endpoint": f"{service.public_url}/fhir-notify", "payload": "application/fhir+json",
                    "header": [f"X-CDS-Subscription-Secret: {SECRET}"],
                    "extension": [{"url": "http://hapifhir.io/fhir/StructureDefinition/subscription-send-delete-messages",
                                   "valueBoolean": True}]}})
    try:
        deadline = time.monotonic() + 60
        while fhir.read("Subscription", subscription["id"])[0]["status"] != "active":
            assert time.monotonic() < deadline, "the delete Subscription was not activated"
            time.sleep(0.5)
        fhir.delete("ImagingStudy", ids["study"])
        hapi = fhir_under_test.hapi
        deadline = time.monotonic() + 30
        while not any("Delivered DELETE" in line for line in hapi.deliveries(f"ImagingStudy/{ids['study']}")):
            assert time.monotonic() < deadline, "HAPI delivered no DELETE"
            time.sleep(0.5)
        assert hapi.delivery_failures() == []
    finally:
        fhir.delete("Subscription", subscription["id"])


SITE_BASE = "https://fhir.hospital.test/ai"
SITE_LABEL = {"system": "https://fhir.hospital.test/CodeSystem/security", "code": "AI", "display": "AI asserted"}


def put_package(fhir: FhirClient, settings: Settings, folder: Path) -> None:
    """Our definitions for these settings (`cds-triage fhir-package`) PUT resource by resource (docs/fhir.md)."""
    done = subprocess.run([sys.executable, "-m", "cds_service.cli", "fhir-package", "--output", str(folder), "--version",
                           "0.0.0-test"], env={**os.environ, **settings.to_env()}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted((folder / "package").glob("*-*.json"),
                   key=lambda p: ["CodeSystem", "ValueSet", "StructureDefinition"].index(p.name.split("-")[0]))
    for path in files:
        fhir.update(json.loads(path.read_text()), if_match=None)


def test_a_site_canonical_base_and_label_are_written_and_read_back(fhir, service, fhir_under_test, orthanc_factory,
                                                                  tmp_path):
    """CDS_FHIR_CANONICAL_BASE and CDS_AI_SECURITY_LABEL end to end: every URL we mint follows the site's base, the
    site's label stands beside AIAST, and the worklist and CDS Hooks read the results back by them. On the validating
    HAPI the site's package is PUT first (docs/fhir.md), else its writes would be refused. The study is in a PACS only
    this instance knows, so the module's service (the project's base) writes nothing for it."""
    own_pacs = orthanc_factory()
    site, processes = start_variant(service, tmp_path, fhir_canonical_base=SITE_BASE, dicomweb_url=own_pacs.dicomweb_url,
                                    ai_security_label="|".join(SITE_LABEL.values()))
    try:
        if fhir_under_test.name == "hapi-strict":
            put_package(fhir, site, tmp_path / "package")
        ids = order_study(fhir, ct_slices(pydicom.uid.generate_uid(), 2), store_in_pacs=own_pacs.url)
        with httpx.Client(base_url=site.public_url, timeout=10) as client:
            assert client.put(f"/fhir-notify/ImagingStudy/{ids['study']}", headers={"X-CDS-Subscription-Secret": SECRET}).status_code == 200
            job = wait_for_job(client, ids["study"])
            assert job["status"] == "done", job
            written = results_for(fhir, ids["patient"])
            text = json.dumps(written)
            assert "cds-triage.org" not in text
            [report] = [r for r in written["DiagnosticReport"] if r["identifier"][0]["system"] == f"{SITE_BASE}/sid/triage-result"]
            assert SITE_LABEL in report["meta"]["security"] and any(s["code"] == "AIAST" for s in report["meta"]["security"])
            assert report["meta"]["profile"] == [f"{SITE_BASE}/StructureDefinition/cds-triage-diagnosticreport"]
            [observation] = written["Observation"]
            assert f"{SITE_BASE}/CodeSystem/triage-finding" in {c["system"] for c in observation["code"]["coding"]}
            order, _ = fhir.read("ServiceRequest", ids["order"])
            assert order["note"][-1]["extension"][0]["url"] == f"{SITE_BASE}/StructureDefinition/ai-priority-change"

            row = {r["orderId"]: r for r in client.get("/worklist/rows.json").json()["rows"]}[ids["order"]]
            assert row["status"] == "done" and row["aiRaisedFrom"] == "routine" and row["topFinding"]["label"] == "any"
            discovery_url = f"{site.public_url}/cds-services"
            services = {s["id"]: s for s in client.get("/cds-services", headers=EHR.auth(discovery_url)).json()["services"]}
            assert f"identifier={SITE_BASE}/sid/triage-result|" in services["patient-view"]["prefetch"]["aiReports"]
            context = {"patientId": ids["patient"]}
            body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": context, "fhirServer": fhir.base_url,
                    "prefetch": ehr_prefetch(fhir, services["patient-view"]["prefetch"], context)}
            cards = client.post("/cds-services/patient-view", json=body, headers=EHR.auth(f"{discovery_url}/patient-view"))
            [card] = cards.json()["cards"]
            assert "Intracranial hemorrhage" in card["summary"] and card["source"]["topic"]["system"].startswith(SITE_BASE)
        with httpx.Client(base_url=service.public_url, timeout=10) as ours:  # the project's base: not its result
            row = {r["orderId"]: r for r in ours.get("/worklist/rows.json").json()["rows"]}.get(ids["order"])
            assert row is None or row["status"] != "done"
    finally:
        processes.stop()


def test_every_notification_was_delivered_without_failure(fhir, subscribed, fhir_under_test):
    """Last in the module: the FHIR server never counted a notification as failed. sekmet would set the
    Subscription to `error`; HAPI logs the failure (and retries for a minute), so its log is read too."""
    time.sleep(2)  # a failure of the last delivery would be logged by now
    subscription, _ = fhir.read("Subscription", subscribed.subscription_id)
    assert subscription["status"] == "active" and not subscription.get("error")
    if fhir_under_test.hapi:
        assert fhir_under_test.hapi.delivery_failures() == []
