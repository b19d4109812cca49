"""End to end on real servers: for each task (head CT, brain MR, chest X-ray) a positive and a negative study
go through `serve` + `worker` with CDS_RESULTS_TO_PACS=sr,sc, and what lands in Orthanc (the DICOM SR and
the Grad-CAM Secondary Capture, fetched back over WADO-RS) agrees with what lands in the FHIR server (the
DiagnosticReport, its Observations and Media): the same coded findings, probabilities, verdicts and image
references. The worklist and a CDS Hooks card link the study to the viewer (CDS_VIEWER_URL).

Positive and negative come from two instances of the service whose untrained test weights have every
threshold at 0 (every trained label positive) or 1 (none): the plumbing is under test, not the models.
Notifications are sent the way the FHIR server's rest-hook sends them, to the instance under test. Runs
against sekmet and HAPI FHIR in turn, or only the server CDS_FHIR_BASE_URL names, like test_e2e.py.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest

from cds_devtools.demo import start_service
from cds_devtools.devservers import free_port
from cds_devtools.dicom_data import make_dataset
from cds_service.adapters.fhir_client import FhirClient
from cds_service.adapters.pacs import Pacs, PacsConfig
from cds_service.core.domain import Task
from cds_service.core.settings import Settings
from fhir_mappings.builders import heatmap_source_instance
from hook_client import EhrSigner, hook_request
from sr_support import dciodvfy_findings, evidence_uids, fhir_findings, group_images, sr_findings
from stack_support import NOTIFY_HEADERS, SECRET, ct_series, order_study, wait_finished
from support import make_test_weights

pytestmark = pytest.mark.integration

EHR = EhrSigner()
VIEWER = "https://viewer.example.org/viewer?StudyInstanceUIDs={study_uid}"
FHIR_SERVERS = ["external"] if os.environ.get("CDS_FHIR_BASE_URL") else ["sekmet", "hapi"]


@pytest.fixture(scope="module", params=FHIR_SERVERS)
def fhir_base_url(request) -> str:
    if request.param == "external":
        return os.environ["CDS_FHIR_BASE_URL"]
    return request.getfixturevalue("hapi_server" if request.param == "hapi" else "fhir_server").url


def images(task: Task, seed: int) -> list[pydicom.Dataset]:
    """A small study of the task: 3 head CT slices, one brain MR slice, one chest radiograph."""
    if task is Task.HEAD_CT_ICH:
        return ct_series(3, seed=seed)
    rng = np.random.default_rng(seed)
    modality, body_part, description = ("MR", "BRAIN", "MR BRAIN T1 POST") if task is Task.BRAIN_MRI else ("CR", "CHEST", "CHEST PA")
    return [make_dataset(rng.integers(0, 4000 if modality == "CR" else 800, (64, 64)).astype(np.uint16), modality=modality,
                         body_part=body_part, series_description=description, patient_name="Doe^Jane", patient_id=f"MRN-{seed}")]


@dataclass(frozen=True)
class Triaged:
    task: Task
    positive: bool
    datasets: list[pydicom.Dataset]
    ids: dict[str, str]
    job: dict
    links: dict[str, Any] = field(default_factory=dict)  # where the viewer link showed (positive head CT)


@pytest.fixture(scope="module")
def triaged(orthanc, fhir_base_url, tmp_path_factory) -> dict[tuple[Task, bool], Triaged]:
    """Six studies (each task, positive and negative), triaged by the instance whose thresholds make them so."""
    root = tmp_path_factory.mktemp("sr-e2e")
    out: dict[tuple[Task, bool], Triaged] = {}
    fhir = FhirClient(fhir_base_url)
    try:
        for positive in (True, False):
            weights = root / f"weights-{positive}"
            for task in Task:
                make_test_weights(weights, task, threshold=0.0 if positive else 1.0)
            port = free_port()
            settings = Settings(
                operator_open_on_loopback=True, fhir_base_url=fhir_base_url, dicomweb_url=orthanc.dicomweb_url,
                public_url=f"http://127.0.0.1:{port}", port=port, data_dir=root / f"data-{positive}", weights_dir=weights,
                subscription_secret=SECRET, job_retries=2, job_retry_delay_s=0.2, http_timeout_s=10,
                results_to_pacs="sr,sc", viewer_url=VIEWER, **EHR.hook_settings(root / "ehr-jwks.json"),
                inference_runtime="torch")  # no ONNX export of six throw-away models: one torch import per worker
            processes = start_service(settings, root / f"logs-{positive}")
            try:
                with httpx.Client(base_url=settings.public_url, timeout=30) as api:
                    ordered = {}
                    for seed, task in enumerate(Task):
                        datasets = images(task, seed)
                        ordered[task] = (datasets, order_study(fhir, datasets, orthanc_url=orthanc.url))
                        assert api.put(f"/fhir-notify/ImagingStudy/{ordered[task][1]['study']}",
                                       headers=NOTIFY_HEADERS).status_code == 200
                    jobs = wait_finished(api, [ids["study"] for _, ids in ordered.values()], timeout=300)
                    for task, (datasets, ids) in ordered.items():
                        out[(task, positive)] = Triaged(task, positive, datasets, ids, jobs[ids["study"]])
                    if positive:  # the worklist and a card, while this instance runs
                        head = out[(Task.HEAD_CT_ICH, True)]
                        out[(Task.HEAD_CT_ICH, True)] = Triaged(**{**head.__dict__, "links": viewer_links(api, settings, head)})
            finally:
                processes.stop()
    finally:
        fhir.close()
    return out


def viewer_links(api: httpx.Client, settings: Settings, study: Triaged) -> dict[str, Any]:
    """Where the study's viewer link shows: its worklist row, its study page, the patient-view card."""
    rows = {row["orderId"]: row for row in api.get("/worklist/rows.json").json()["rows"]}
    page = api.get(f"/worklist/orders/{study.ids['order']}").text
    fhir = FhirClient(settings.fhir_base_url)
    try:
        reports = fhir.search("DiagnosticReport", {"subject": f"Patient/{study.ids['patient']}", "_include": "DiagnosticReport:result"})
    finally:
        fhir.close()
    url = f"{settings.public_url}/cds-services/patient-view"
    body = hook_request("patient-view", {"patientId": study.ids["patient"]},
                        prefetch={"aiReports": {"resourceType": "Bundle", "type": "searchset",
                                                "entry": [{"resource": r} for r in reports]}})
    [card] = api.post("/cds-services/patient-view", json=body, headers=EHR.auth(url)).json()["cards"]
    return {"row": rows[study.ids["order"]].get("viewerUrl"), "page": page, "card": [link["url"] for link in card["links"]]}


TASKS_AND_OUTCOMES = [(task, positive) for task in Task for positive in (True, False)]


@pytest.mark.parametrize(("task", "positive"), TASKS_AND_OUTCOMES, ids=[f"{t.value}-{'pos' if p else 'neg'}" for t, p in TASKS_AND_OUTCOMES])
def test_the_sr_the_capture_and_the_fhir_report_agree(triaged, orthanc, fhir_base_url, task, positive, tmp_path):
    study = triaged[(task, positive)]
    job, study_uid = study.job, str(study.datasets[0].StudyInstanceUID)
    assert job["status"] == "done", job
    result = job["result"]
    assert any(f["positive"] for f in result["findings"]) is positive, result["findings"]
    report_record = result["reportToPacs"]
    assert report_record["stored"] is True and "error" not in report_record, report_record

    fhir = FhirClient(fhir_base_url)
    try:
        [report] = fhir.search("DiagnosticReport", {"subject": f"Patient/{study.ids['patient']}"})
        observations = [fhir.read("Observation", r["reference"].split("/")[-1])[0] for r in report["result"]]
        media = [fhir.read("Media", m["link"]["reference"].split("/")[-1])[0] for m in report.get("media") or []]
    finally:
        fhir.close()

    # the SR, as any DICOMweb client fetches it
    pacs = Pacs(PacsConfig(url=orthanc.dicomweb_url))
    [sr] = pacs.client.retrieve_series(study_uid, report_record["seriesUid"])
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and sr.SOPInstanceUID == report_record["sopInstanceUid"]
    assert sr.PatientID == study.datasets[0].PatientID and sr.StudyInstanceUID == study_uid

    # the same findings: codes, probabilities, present/absent
    assert sr_findings(sr) == fhir_findings(observations)
    # the FHIR report names the SR, and its presentedForm is where the PACS answers with it
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{sr.SOPInstanceUID}"}.items() <= \
        next(i for i in report["identifier"] if i["system"] == "urn:dicom:uid").items()
    [form] = [f for f in report["presentedForm"] if f["contentType"] == "application/dicom"]
    fetched = pacs.session.get(form["url"], headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert fetched.status_code == 200 and str(sr.SOPInstanceUID).encode() in fetched.content

    # the same images: the series as evidence; for a positive, the key slice of our Media and the capture it names
    series_uids = {str(ds.SOPInstanceUID) for ds in study.datasets}
    if positive:
        capture = result["heatmapToPacs"]
        assert capture["stored"] is True, capture
        [heatmap] = media
        assert f"urn:oid:{capture['sopInstanceUid']}" in {i["value"] for i in heatmap["identifier"]}
        with_images = {label: group_images(sr, label) for label in sr_findings(sr)}
        [(top, referenced)] = [(label, found) for label, found in with_images.items() if found]  # one finding: the heatmap's
        positives = {f["label"]: f["probability"] for f in result["findings"] if f["positive"]}
        assert top in positives and positives[top] >= max(positives.values()) - 1e-4, (top, positives, with_images)
        assert heatmap_source_instance(heatmap) in referenced["Source of Measurement"]
        assert set(referenced["Source of Measurement"]) <= series_uids
        assert referenced["Best illustration of finding"] == [capture["sopInstanceUid"]]
        assert evidence_uids(sr) == series_uids | {capture["sopInstanceUid"]}
        [sc] = pacs.client.retrieve_series(study_uid, capture["seriesUid"])
        assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    else:
        assert "heatmapToPacs" not in result and media == []
        assert all(group_images(sr, label) == {} for label in sr_findings(sr))
        assert evidence_uids(sr) == series_uids
    series_in_pacs = {s["0020000E"]["Value"][0] for s in pacs.client.search_for_series(study_uid)}
    assert len(series_in_pacs) == (3 if positive else 2)  # the images, the SR (and the capture)

    if shutil.which("dciodvfy"):
        assert dciodvfy_findings(sr, tmp_path) == ([], [])


def test_the_worklist_and_the_cards_link_the_study_to_the_viewer(triaged):
    study = triaged[(Task.HEAD_CT_ICH, True)]
    expected = VIEWER.format(study_uid=study.datasets[0].StudyInstanceUID)
    links = study.links
    assert links["row"] == expected and expected in links["card"]
    page = links["page"]
    assert f'href="{expected}"' in page and "Open in viewer" in page
    assert "as a DICOM Structured Report" in page  # the study page says where else the findings are
