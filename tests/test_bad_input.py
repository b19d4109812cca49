"""The bad-input corpus (tests/bad_inputs/corpus.py) against the running service.

Each row must give a clear failure — an error status with an OperationOutcome that says
what is wrong, or a `failed` job with a reason — and never a crash: after the whole corpus
the same `serve` and `worker` processes still answer and still triage a good study.
"""

from __future__ import annotations

import httpx
import pydicom
import pytest

from bad_inputs.corpus import EHR_CASES, FILE_CASES, HTTP_CASES, PACS_CASES, SECRET_HEADER, ALL_CASES, http_body
from cds_devtools.demo import start_service
from cds_devtools.devservers import free_port, upload_dicom
from cds_service.core.domain import Task
from cds_service.adapters.fhir_client import FhirClient
from cds_service.local_triage import triage_paths
from cds_service.core.settings import Settings
from stack_support import SECRET, assert_triaged_once, ct_series, notify, order_study, wait_finished
from support import make_test_weights, seed_onnx_exports

pytestmark = pytest.mark.integration


def test_the_corpus_has_at_least_30_distinct_inputs():
    names = [case.name for case in ALL_CASES]
    assert len(names) >= 30 and len(set(names)) == len(names)


@pytest.fixture(scope="module")
def service(orthanc, fhir_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    port = free_port()
    settings = Settings(
        operator_open_on_loopback=True,  # tests call /jobs directly
        fhir_base_url=fhir_server.url, dicomweb_url=orthanc.dicomweb_url, public_url=f"http://127.0.0.1:{port}",
        host="127.0.0.1", port=port, data_dir=root / "data", weights_dir=make_test_weights(root / "weights", Task.HEAD_CT_ICH),
        subscription_secret=SECRET, job_retries=2, job_retry_delay_s=0.2, http_timeout_s=10,
        max_instances=5, cds_hooks_auth="off",  # hook bodies are checked here; their JWTs in the CDS Hooks tests
    )
    processes = start_service(seed_onnx_exports(settings), root / "logs")
    yield settings, processes
    processes.stop()


@pytest.fixture(scope="module")
def api(service):
    with httpx.Client(base_url=service[0].public_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def fhir(service):
    client = FhirClient(service[0].fhir_base_url)
    yield client
    client.close()


@pytest.mark.parametrize("case", HTTP_CASES, ids=lambda c: c.name)
def test_bad_request_gets_a_clear_error(case, api):
    body, headers = http_body(case)
    if case.with_secret:
        headers[SECRET_HEADER] = SECRET
    response = api.request(case.method, case.path, content=body, headers=headers)
    assert response.status_code == case.status, response.text[:300]
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert case.says in outcome["issue"][0]["diagnostics"], outcome
    assert api.get("/healthz").status_code == 200


@pytest.fixture(scope="module")
def triaged_bad_studies(service, api, fhir, orthanc):
    """Every EHR and PACS row as a study of its own, notified together; their finished jobs by name."""
    study_of = {}
    for case in EHR_CASES:
        ids = order_study(fhir, None, imaging_study=case.imaging_study("placeholder", pydicom.uid.generate_uid()))
        study, _ = fhir.read("ImagingStudy", ids["study"])
        fhir.update(study | {"subject": study["subject"] if "Group" in study["subject"]["reference"]
                             else {"reference": f"Patient/{ids['patient']}"}}, if_match=None)
        study_of[case.name] = ids["study"]
    for case in PACS_CASES:
        study_uid = pydicom.uid.generate_uid()
        objects = case.make(study_uid)
        upload_dicom(orthanc.url, objects if isinstance(objects, list) else [objects])
        datasets = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(o), stop_before_pixels=True, force=True)
                    for o in (objects if isinstance(objects, list) else [objects])]
        imaging_study = {"resourceType": "ImagingStudy", "status": "available",
                         "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{datasets[0].StudyInstanceUID}"}]}
        study_of[case.name] = order_study(fhir, None, imaging_study=imaging_study)["study"]
    for study_id in study_of.values():
        notify(api, study_id)
    finished = wait_finished(api, study_of.values(), timeout=180)
    return {name: finished[study_id] for name, study_id in study_of.items()}


@pytest.mark.parametrize("case", [*EHR_CASES, *PACS_CASES], ids=lambda c: c.name)
def test_unusable_study_fails_its_job_clearly(case, triaged_bad_studies):
    job = triaged_bad_studies[case.name]
    assert job["status"] == "failed" and case.says in job["reason"], job
    assert "internal error" not in job["reason"]
    assert job["attempts"] == 1  # a permanent fault is not retried


@pytest.mark.parametrize("case", FILE_CASES, ids=lambda c: c.name)
def test_unreadable_file_is_refused_by_the_pacs_and_explained_by_the_cli(case, service, orthanc, tmp_path, capsys):
    data = case.make()
    with pytest.raises(RuntimeError, match="HTTP 400"):
        upload_dicom(orthanc.url, [data])
    path = tmp_path / "input.dcm"
    path.write_bytes(data)
    settings = Settings(operator_open_on_loopback=True, weights_dir=service[0].weights_dir, data_dir=tmp_path)
    code = triage_paths([path], settings, task=None, as_json=True, heatmaps=None)
    out = capsys.readouterr()
    assert code == 1 and case.says in out.err + out.out, out
    assert "Traceback" not in out.err


def test_service_still_serves_and_triages_after_the_corpus(service, api, fhir, orthanc, triaged_bad_studies):
    settings, processes = service
    assert processes.serve.running and processes.worker.running  # nothing crashed
    ids = order_study(fhir, ct_series(2), orthanc_url=orthanc.url)
    notify(api, ids["study"])
    wait_finished(api, [ids["study"]], timeout=90)
    assert_triaged_once(fhir, api, ids)
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.json()
    assert "Traceback" not in (settings.data_dir.parent / "logs" / "serve.log").read_text()
