"""Scale-out: queue, job store and audit trail on a real Redis, two workers as two "machines".

The second worker gets a data folder of its own, so nothing can be shared through a local
SQLite file: whatever works here works across machines. The FHIR server's rest-hook
Subscription drives the end-to-end path; a burst of notifications (each study notified by
the Subscription and, at the same moment, twice more by hand) must end with every study
`done` exactly once; and a worker killed mid-job is replaced by the other one.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest

from cds_devtools import devservers
from cds_devtools.demo import start_service, start_worker
from cds_service.core.domain import Task
from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.settings import Settings
from cds_service.adapters.subscribe import ensure_subscription
from conftest import require
from redis_support import start_redis
from stack_support import (SECRET, assert_triaged_once, ct_series, job_of, metric_value, notify, order_study,
                           wait_finished, wait_until)
from support import make_test_weights, seed_onnx_exports
from tcp_proxy import Fault, TcpProxy

pytestmark = pytest.mark.integration

BURST = 20


@pytest.fixture(scope="module")
def cluster(orthanc, tmp_path_factory):
    require(devservers.find_sekmet(), "sekmet FHIR server not installed")
    root = tmp_path_factory.mktemp("scale-out")
    redis = start_redis(root / "redis")
    fhir_server = devservers.start_fhir_server(root / "fhir")
    pacs_proxy = TcpProxy(orthanc.http_port).start()
    port = devservers.free_port()
    settings = Settings(
        operator_open_on_loopback=True,  # tests call /jobs directly
        fhir_base_url=fhir_server.url, dicomweb_url=pacs_proxy.url("/dicom-web"), public_url=f"http://127.0.0.1:{port}",
        host="127.0.0.1", port=port, data_dir=root / "machine-1", queue_url=redis.url,
        weights_dir=make_test_weights(root / "weights", Task.HEAD_CT_ICH), subscription_secret=SECRET,
        job_retries=4, job_retry_delay_s=0.3, http_timeout_s=10, job_lease_s=2, torch_threads=1,
    )
    service = start_service(seed_onnx_exports(settings), root / "logs-1", http_workers=2)
    second = start_worker(seed_onnx_exports(replace(settings, data_dir=root / "machine-2")), root / "logs-2", index=1)
    ensure_subscription(settings, f"{settings.public_url}/fhir-notify")
    # the cluster is up when both workers beat (start_worker returns at once; a worker's start takes seconds)
    with httpx.Client(base_url=settings.public_url, timeout=30) as api:
        wait_until(lambda: api.get("/readyz").json().get("workers") == 2, 60, "both workers' heartbeats")
    yield {"settings": settings, "service": service, "workers": [service.worker, second], "proxy": pacs_proxy,
           "fhir_server": fhir_server, "root": root}
    second.stop()
    service.stop()
    pacs_proxy.stop()
    fhir_server.stop()
    redis.stop()


@pytest.fixture
def fhir(cluster):
    client = FhirClient(cluster["fhir_server"].url)
    yield client
    client.close()


@pytest.fixture
def api(cluster):
    with httpx.Client(base_url=cluster["settings"].public_url, timeout=30) as client:
        yield client


def test_subscription_to_write_back_on_redis_with_an_audit_record(cluster, fhir, api, orthanc):
    ids = order_study(fhir, ct_series(2), orthanc_url=orthanc.url)  # the Subscription notifies us
    job = wait_finished(api, [ids["study"]], timeout=90)[ids["study"]]
    assert job["source"] == "subscription"
    assert_triaged_once(fhir, api, ids)
    [event] = api.get("/audit", params={"imagingStudy": ids["study"]}).json()["events"]
    [report] = event["detail"]["written"]["DiagnosticReport"]
    assert report == job["result"]["written"]["DiagnosticReport"][0]
    assert event["detail"]["model"] == {"name": "test-untrained-head_ct_ich", "version": "0.0.0-test"}
    assert event["detail"]["job"] == job["id"] and event["client"] == job["worker"]
    assert api.get("/audit", params={"job": job["id"]}).json()["events"][0]["id"] == event["id"]
    assert not list((cluster["root"] / "machine-1").glob("jobs.sqlite3"))  # the store is Redis, not a file
    ready = api.get("/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["queue"]["detail"] == "redis" and ready["workers"] == 2


def test_burst_of_notifications_ends_with_every_study_done_once(cluster, fhir, api, orthanc):
    studies = [order_study(fhir, ct_series(1, seed=i), orthanc_url=orthanc.url) for i in range(BURST)]
    # The Subscription notifies each study as it is created; the EHR re-sends on update, and we race both.
    with ThreadPoolExecutor(max_workers=8) as pool:
        jobs = list(pool.map(lambda ids: notify(api, ids["study"])["id"], [s for s in studies for _ in range(2)]))
    assert len(set(jobs)) == BURST  # two notifications per study, one job per study
    finished = wait_finished(api, [s["study"] for s in studies], timeout=180)
    for ids in studies:
        assert_triaged_once(fhir, api, ids)
    assert {job["status"] for job in finished.values()} == {"done"}
    assert len({job["worker"] for job in finished.values()}) == 2, "both workers took jobs"
    text = api.get("/metrics").text
    assert metric_value(text, "cds_triage_jobs", state="done") >= BURST
    assert metric_value(text, "cds_triage_workers_alive") == 2


def test_a_killed_worker_is_replaced_by_the_other_machine(cluster, fhir, api, orthanc):
    ids = order_study(fhir, ct_series(4, size=128), orthanc_url=orthanc.url)
    cluster["proxy"].fault = Fault("slow", match=r"/series/[^/]+$", bytes_per_s=10_000)
    try:
        running = wait_until(lambda: (j := job_of(api, ids["study"])) and j["status"] == "running" and j, 60,
                             "the job to run")
        victim = next(w for w in cluster["workers"] if f":{w.pid}:" in running["worker"])
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.wait(10)
    finally:
        cluster["proxy"].fault = None
    started = time.monotonic()
    job = wait_finished(api, [ids["study"]], timeout=60)[ids["study"]]
    assert job["attempts"] == 2 and job["worker"] != running["worker"]
    assert time.monotonic() - started < 30  # about one lease (2 s) and a retrieval, not minutes
    assert_triaged_once(fhir, api, ids)
