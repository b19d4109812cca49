"""Helpers for the robustness tests (faults, bad input, scale-out): play the EHR, read results.

The EHR side is plain FHIR REST straight to the FHIR server (never through a fault proxy):
Patient, ServiceRequest, ImagingStudy; the PACS side is Orthanc's REST upload. Notifications
are sent the way the FHIR server's rest-hook sends them (`PUT /fhir-notify/ImagingStudy/<id>`),
so a test decides exactly when a study reaches our service.
"""

from __future__ import annotations

import time
import uuid
from typing import Iterable

import httpx
import numpy as np
import pydicom

from cds_devtools.devservers import upload_dicom
from cds_devtools.dicom_data import make_dataset
from cds_service.adapters.fhir_client import FhirClient
from fhir_mappings.imaging_study import build_imaging_study

FINISHED = {"done", "failed", "not_applicable", "model_unavailable"}
SECRET = "robustness-secret"
NOTIFY_HEADERS = {"X-CDS-Subscription-Secret": SECRET}


def ct_series(count: int = 2, *, size: int = 64, seed: int = 0, body_part: str = "HEAD",
              description: str = "CT HEAD WO", **extra: object) -> list[pydicom.Dataset]:
    """A head CT series of `count` slices of noise around brain HU, in a new study."""
    rng = np.random.default_rng(seed)
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    return [make_dataset((rng.normal(35, 10, (size, size)).clip(-1000, 2000) + 1024).astype(np.uint16),
                         modality="CT", body_part=body_part, series_description=description, study_uid=study_uid,
                         series_uid=series_uid, instance_number=i + 1, rescale_slope=1, rescale_intercept=-1024,
                         **extra)  # type: ignore[arg-type]
            for i in range(count)]


def order_study(fhir: FhirClient, datasets: list[pydicom.Dataset] | None, *, orthanc_url: str | None = None,
                imaging_study: dict | None = None) -> dict[str, str]:
    """Store the images (if `orthanc_url`), then Patient, ServiceRequest and ImagingStudy in the EHR."""
    if orthanc_url and datasets:
        upload_dicom(orthanc_url, datasets)
    tag = uuid.uuid4().hex[:10]
    ids = {"patient": f"p-{tag}", "order": f"sr-{tag}", "study": f"is-{tag}"}
    fhir.update({"resourceType": "Patient", "id": ids["patient"], "name": [{"family": "Test", "given": [tag]}]},
                if_match=None)
    fhir.update({"resourceType": "ServiceRequest", "id": ids["order"], "status": "active", "intent": "order",
                 "priority": "routine", "subject": {"reference": f"Patient/{ids['patient']}"},
                 "authoredOn": "2026-11-23T08:00:00Z"}, if_match=None)
    if imaging_study is None:
        imaging_study = build_imaging_study(datasets, patient_id=ids["patient"], service_request_id=ids["order"],
                                            study_id=ids["study"]).model_dump(mode="json", exclude_none=True)
    imaging_study = dict(imaging_study, id=ids["study"])
    imaging_study.setdefault("subject", {"reference": f"Patient/{ids['patient']}"})
    fhir.update(imaging_study, if_match=None)
    return ids


def notify(api: httpx.Client, study_id: str) -> dict:
    """What the FHIR server's rest-hook sends for a created/updated ImagingStudy; the job."""
    response = api.put(f"/fhir-notify/ImagingStudy/{study_id}", headers=NOTIFY_HEADERS)
    assert response.status_code == 200, response.text
    return response.json()["jobs"][0]


def job_of(api: httpx.Client, study_id: str) -> dict | None:
    jobs = api.get("/jobs", params={"imagingStudy": study_id}).json()["jobs"]
    assert len(jobs) <= 1, f"more than one job for ImagingStudy/{study_id}: {jobs}"
    return jobs[0] if jobs else None


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll `condition()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_finished(api: httpx.Client, study_ids: Iterable[str], timeout: float = 120) -> dict[str, dict]:
    """Every study's (single) job, once all have finished."""
    study_ids = list(study_ids)
    finished: dict[str, dict] = {}

    def all_done() -> bool:
        for study_id in study_ids:
            if study_id not in finished:
                job = job_of(api, study_id)
                if job and job["status"] in FINISHED:
                    finished[study_id] = job
        return len(finished) == len(study_ids)

    try:
        wait_until(all_done, timeout, "jobs to finish", interval=0.3)
    except AssertionError:
        missing = {s: job_of(api, s) for s in study_ids if s not in finished}
        raise AssertionError(f"{len(missing)} of {len(study_ids)} jobs did not finish: {missing}") from None
    return finished


def reports_for(fhir: FhirClient, patient_id: str) -> list[dict]:
    return fhir.search("DiagnosticReport", {"subject": f"Patient/{patient_id}"})


def assert_triaged_once(fhir: FhirClient, api: httpx.Client, ids: dict[str, str]) -> dict:
    """The study's one job is done and wrote exactly one DiagnosticReport (and one set of results)."""
    job = job_of(api, ids["study"])
    assert job is not None and job["status"] == "done", job
    reports = reports_for(fhir, ids["patient"])
    assert len(reports) == 1, f"{len(reports)} DiagnosticReports for ImagingStudy/{ids['study']}"
    assert len(fhir.search("Observation", {"subject": f"Patient/{ids['patient']}"})) == 1
    return job


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """A sample's value in Prometheus exposition text (None when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None
