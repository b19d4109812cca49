"""The job store's de-duplication and claiming, and the HTTP triggers (Flask test client).

The queue is replaced by a list here: these tests are about what the web layer persists
and answers; the integration tests run the real queue and worker.
"""

import json
import threading

import pytest

from cds_service.web.api import imaging_study_ids
from cds_service.web.app import create_app
from cds_service.web.context import ServiceContext
from cds_service.jobs.state import JobState, TriageRequest, backoff_delay
from cds_service.jobs.sqlite_store import JobStore
from cds_service.core.settings import Settings
from hook_client import EhrSigner


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path / "jobs.sqlite3")


def test_same_study_and_models_is_one_job(store):
    first, queue_first = store.submit(TriageRequest("s1", "subscription"), "m@1")
    again, queue_again = store.submit(TriageRequest("s1", "cds-hooks"), "m@1")
    assert queue_first and not queue_again and first.id == again.id
    other_models, queue_other = store.submit(TriageRequest("s1", "subscription"), "m@2")
    assert queue_other and other_models.id != first.id


def test_concurrent_submissions_create_one_job(store):
    results = []
    def submit():
        results.append(store.submit(TriageRequest("race", "subscription"), "m@1"))
    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({job.id for job, _ in results}) == 1
    assert sum(queued for _, queued in results) == 1


def test_claim_is_exclusive_and_failed_jobs_can_be_resubmitted(store):
    job, _ = store.submit(TriageRequest("s2", "subscription"), "m@1")
    claimed = store.claim(job.id)
    assert claimed.state is JobState.RUNNING and claimed.attempts == 1
    assert store.claim(job.id) is None
    store.finish(job.id, JobState.FAILED, "PACS down")
    assert store.get(job.id).reason == "PACS down"
    again, needs_queue = store.submit(TriageRequest("s2", "subscription"), "m@1")
    assert needs_queue and again.id == job.id and again.state is JobState.QUEUED
    store.finish(job.id, JobState.DONE, "", {"task": "head_ct_ich"})
    done, needs_queue = store.submit(TriageRequest("s2", "subscription"), "m@1")
    assert not needs_queue and done.result == {"task": "head_ct_ich"}


def test_backoff_grows_with_jitter():
    delays = [backoff_delay(n, 1.0) for n in (1, 2, 3, 4)]
    assert 0.5 <= delays[0] <= 1.0 and 4.0 <= delays[3] <= 8.0
    assert backoff_delay(50, 1.0, cap_s=10) <= 10


@pytest.mark.parametrize("body, path, expected", [
    ({"resourceType": "ImagingStudy", "id": "a"}, "", ["a"]),
    (None, "ImagingStudy/b", ["b"]),
    ({"resourceType": "ImagingStudy", "id": "ignored"}, "ImagingStudy/c/_history/2", ["c"]),
    ({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "ImagingStudy", "id": "d"}},
                                           {"fullUrl": "http://x/fhir/ImagingStudy/e"}]}, "", ["d", "e"]),
    (None, "", None),
])
def test_notification_shapes(body, path, expected):
    assert imaging_study_ids(body, path) == expected


@pytest.mark.parametrize("body, path", [
    ({"resourceType": "Patient", "id": "p"}, ""),
    ({"resourceType": "ImagingStudy"}, ""),
    ([1, 2], ""),
    (None, "Patient/1"),
])
def test_bad_notifications_are_rejected(body, path):
    with pytest.raises(ValueError):
        imaging_study_ids(body, path)


@pytest.fixture
def client(tmp_path):
    settings = Settings(operator_open_on_loopback=True, data_dir=tmp_path, weights_dir=tmp_path / "weights", subscription_secret="s3cret",
                        **EHR.hook_settings(tmp_path / "ehr-jwks.json"))  # CDS Hooks calls carry EHR's signed JWT
    queued: list[str] = []
    context = ServiceContext(settings=settings, store=JobStore(settings.job_db_path), enqueue=queued.append, model_set="m@1")
    app = create_app(settings, context)
    client = app.test_client()
    client.queued = queued
    return client


SECRET = {"X-CDS-Subscription-Secret": "s3cret"}
EHR = EhrSigner()
HOOK_URL = "http://127.0.0.1:8000/cds-services/imagingstudy-create"  # the default CDS_PUBLIC_URL + the service path


def test_subscription_endpoint_persists_one_job_per_study(client):
    body = {"resourceType": "ImagingStudy", "id": "42"}
    first = client.post("/fhir-notify", json=body, headers=SECRET)
    second = client.put("/fhir-notify/ImagingStudy/42", json=body, headers=SECRET)
    assert first.status_code == 200 and second.status_code == 200
    assert first.json["jobs"][0]["id"] == second.json["jobs"][0]["id"]
    assert client.queued == [first.json["jobs"][0]["id"]]
    job = client.get(f"/jobs/{client.queued[0]}")
    assert job.json["status"] == "queued" and job.json["imagingStudy"] == "ImagingStudy/42"


def test_subscription_endpoint_checks_the_secret(client):
    response = client.post("/fhir-notify", json={"resourceType": "ImagingStudy", "id": "1"}, headers={"X-CDS-Subscription-Secret": "nope"})
    assert response.status_code == 401 and response.json["resourceType"] == "OperationOutcome"
    assert client.queued == []


@pytest.mark.parametrize("data, status", [("{not json", 400), (json.dumps({"resourceType": "Patient", "id": "1"}), 400)])
def test_bad_notification_gets_operation_outcome(client, data, status):
    response = client.post("/fhir-notify", data=data, headers=SECRET | {"Content-Type": "application/fhir+json"})
    assert response.status_code == status
    assert response.json["resourceType"] == "OperationOutcome" and response.json["issue"][0]["diagnostics"]


def test_oversized_body_is_refused(client):
    response = client.post("/fhir-notify", data="x" * 3_000_000, headers=SECRET)
    assert response.status_code == 413 and response.json["resourceType"] == "OperationOutcome"


def test_cds_hook_queues_the_same_job_as_the_subscription(client):
    hook = {"hook": "imagingstudy-create", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"patientId": "p1", "imagingStudyId": "42", "serviceRequestId": "sr1"}}
    response = client.post("/cds-services/imagingstudy-create", json=hook, headers=EHR.auth(HOOK_URL))
    assert response.status_code == 200
    card = response.json["cards"][0]
    assert card["indicator"] == "info" and len(card["summary"]) < 140 and card["source"]["label"]
    notified = client.post("/fhir-notify", json={"resourceType": "ImagingStudy", "id": "42"}, headers=SECRET)
    assert len(client.queued) == 1 and notified.json["jobs"][0]["serviceRequest"] == "ServiceRequest/sr1"


@pytest.mark.parametrize("hook", [
    {"hook": "patient-view", "context": {"patientId": "p", "imagingStudyId": "s"}},
    {"hook": "imagingstudy-create", "context": {"patientId": "p"}},
    {"hook": "imagingstudy-create"},
    ["not", "an", "object"],
])
def test_malformed_hook_calls_are_rejected(client, hook):
    response = client.post("/cds-services/imagingstudy-create", json=hook, headers=EHR.auth(HOOK_URL))
    assert response.status_code == 400 and response.json["resourceType"] == "OperationOutcome"
    assert client.queued == []


def test_discovery_lists_the_service(client):
    services = client.get("/cds-services", headers=EHR.auth("http://127.0.0.1:8000/cds-services")).json["services"]
    assert services[0]["id"] == "imagingstudy-create" and services[0]["hook"] == "imagingstudy-create"


def test_unknown_job_is_404(client):
    assert client.get("/jobs/nope").status_code == 404


@pytest.mark.parametrize("remote, headers, status", [
    ("127.0.0.1", {}, 200),                                   # an operator on this machine
    ("::1", {}, 200),
    ("10.1.2.3", {}, 403),                                     # anyone on the network
    ("127.0.0.1", {"X-Forwarded-For": "10.1.2.3"}, 403),       # relayed by a reverse proxy on this machine
    ("127.0.0.1", {"Forwarded": "for=10.1.2.3"}, 403),
    ("127.0.0.1", {"X-Real-IP": "10.1.2.3"}, 403),             # a proxy that adds only X-Real-IP
    ("127.0.0.1", {"X-Forwarded-For": ""}, 403),               # or an empty X-Forwarded-For
])
def test_operator_endpoints_without_a_token_are_open_to_this_machine_only_when_asked(client, remote, headers, status):
    """With CDS_OPERATOR_OPEN_ON_LOOPBACK (development) and no token: direct loopback calls only."""
    for path in ("/jobs", "/audit", "/metrics"):
        response = client.get(path, headers=headers, environ_base={"REMOTE_ADDR": remote})
        assert response.status_code == status, path
        if status == 403:
            assert "CDS_OPERATOR_TOKEN" in response.json["issue"][0]["diagnostics"]


def test_operator_endpoints_are_closed_by_default(tmp_path):
    """No token and no development switch: nobody, not even a direct loopback call (a proxy on this
    host that adds no header at all looks exactly like one). /readyz keeps its status, not its details."""
    settings = Settings(data_dir=tmp_path, weights_dir=tmp_path / "weights")
    context = ServiceContext(settings=settings, store=JobStore(settings.job_db_path), enqueue=lambda job_id: None, model_set="m@1")
    client = create_app(settings, context).test_client()
    for path in ("/jobs", "/audit", "/metrics"):
        response = client.get(path)
        assert response.status_code == 403 and "CDS_OPERATOR_TOKEN" in response.json["issue"][0]["diagnostics"], path
    ready = client.get("/readyz")
    assert set(ready.json) == {"status"}


def test_operator_endpoints_with_a_token_need_it_from_everywhere(tmp_path):
    settings = Settings(operator_open_on_loopback=True, data_dir=tmp_path, weights_dir=tmp_path / "weights", operator_token="op-token")
    context = ServiceContext(settings=settings, store=JobStore(settings.job_db_path), enqueue=lambda job_id: None, model_set="m@1")
    client = create_app(settings, context).test_client()
    assert client.get("/jobs").status_code == 401  # loopback alone is not enough once a token is set
    assert client.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/jobs", headers={"Authorization": "Bearer op-token"}, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert ok.status_code == 200 and ok.json == {"jobs": []}


# --- what an attack run found (issue: bad ids, bad shapes, floods, sniffing) -----------------------


@pytest.mark.parametrize("body, path", [
    ({"resourceType": "Bundle", "entry": ["x"]}, ""),
    ({"resourceType": "Bundle", "entry": [{"resource": "x"}]}, ""),
    ({"resourceType": "Bundle", "entry": "x"}, ""),
    ({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "ImagingStudy", "id": str(i)}} for i in range(2000)]}, ""),
])
def test_malformed_or_flooding_notifications_are_a_4xx_not_a_500(client, body, path):
    response = client.post("/fhir-notify", json=body, headers=SECRET)
    assert response.status_code == 400 and response.json["resourceType"] == "OperationOutcome"
    assert client.queued == []


@pytest.mark.parametrize("study", [".", ".."])
def test_dot_ids_are_refused_where_an_id_meets_a_url(client, study):
    assert client.put(f"/fhir-notify/ImagingStudy/{study}", json={}, headers=SECRET).status_code == 400
    assert client.post("/fhir-notify", json={"resourceType": "ImagingStudy", "id": study}, headers=SECRET).status_code == 400
    assert client.get(f"/heatmaps/{study}.png").status_code == 404
    assert client.queued == []


def test_every_answer_says_nosniff(client):
    for path in ("/healthz", "/jobs/none", "/no-such-page", "/cds-services"):
        assert client.get(path).headers.get("X-Content-Type-Options") == "nosniff", path
