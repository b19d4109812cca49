"""Fault injection on the real stack: nothing lost, nothing duplicated.

Our own Orthanc and FHIR server (so they can be stopped and restarted on the same ports
and data), each behind a `TcpProxy` that the service talks through, our `serve` and a
worker. Each test breaks something — the PACS stops mid-retrieval, the FHIR server stops
before write-back or loses an answer, the worker is SIGKILLed mid-job, everything restarts —
and then requires every study triaged exactly once: one `done` job, one DiagnosticReport.
"""

from __future__ import annotations

import http.server
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cds_devtools import devservers
from cds_devtools.demo import ServiceProcesses, start_service, start_worker
from cds_service.core.domain import Task
from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.settings import Settings
from conftest import require
from stack_support import (SECRET, assert_triaged_once, ct_series, job_of, metric_value, notify, order_study,
                           wait_finished, wait_until)
from support import make_test_weights, seed_onnx_exports
from tcp_proxy import Fault, TcpProxy

pytestmark = pytest.mark.integration

WADO_SERIES = r"^GET /dicom-web/studies/[^/]+/series/[^/]+$"
TRANSACTION = r"^POST /fhir/?$"


@dataclass
class Stack:
    """Orthanc + FHIR server (restartable), their proxies, and our service."""

    root: Path
    orthanc: devservers.OrthancProcess
    fhir_server: devservers.FhirServerProcess
    pacs_proxy: TcpProxy
    fhir_proxy: TcpProxy
    settings: Settings
    service: ServiceProcesses | None = None
    workers_started: int = 0
    extra: list = field(default_factory=list)

    def restart_orthanc(self) -> None:
        self.orthanc.stop()
        self.orthanc = devservers.start_orthanc(self.root / "orthanc", http_port=self.orthanc.http_port)

    def stop_fhir(self) -> None:
        self.fhir_server.stop()

    def start_fhir(self) -> None:
        self.fhir_server = devservers.start_fhir_server(self.root / "fhir", port=self.fhir_server.port)

    def start_service(self) -> None:
        self.service = start_service(self.settings, self.root / "logs")
        self.workers_started += 1

    def kill_worker(self) -> None:
        """SIGKILL: no clean-up, no goodbye; the job in hand keeps its (lapsing) lease."""
        worker = self.service.worker
        os.kill(worker.pid, signal.SIGKILL)
        worker.proc.wait(10)
        worker.stop()

    def new_worker(self) -> None:
        self.service.worker = start_worker(self.settings, self.root / "logs", index=self.workers_started)
        self.workers_started += 1


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require(devservers.find_orthanc() and devservers.find_dicomweb_plugin(), "Orthanc with DICOMweb not installed")
    require(devservers.find_sekmet(), "sekmet FHIR server not installed")
    root = tmp_path_factory.mktemp("faults")
    orthanc = devservers.start_orthanc(root / "orthanc")
    fhir_server = devservers.start_fhir_server(root / "fhir")
    pacs_proxy = TcpProxy(orthanc.http_port).start()
    fhir_proxy = TcpProxy(fhir_server.port).start()
    weights = make_test_weights(root / "weights", Task.HEAD_CT_ICH)
    port = devservers.free_port()
    settings = Settings(
        operator_open_on_loopback=True,  # tests call /jobs directly
        fhir_base_url=fhir_proxy.url("/fhir"), dicomweb_url=pacs_proxy.url("/dicom-web"),
        public_url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port, data_dir=root / "data",
        weights_dir=weights, subscription_secret=SECRET, http_timeout_s=3, job_retries=8, job_retry_delay_s=0.3,
        job_lease_s=2, job_redeliver_s=30,
    )
    stack = Stack(root, orthanc, fhir_server, pacs_proxy, fhir_proxy, seed_onnx_exports(settings))
    stack.start_service()
    yield stack
    if stack.service:
        stack.service.stop()
    pacs_proxy.stop()
    fhir_proxy.stop()
    stack.orthanc.stop()
    stack.fhir_server.stop()


@pytest.fixture
def fhir(stack):
    """The EHR's own line to the FHIR server (no proxy)."""
    client = FhirClient(stack.fhir_server.url)
    yield client
    client.close()


@pytest.fixture
def api(stack):
    with httpx.Client(base_url=stack.settings.public_url, timeout=10) as client:
        yield client


@pytest.fixture(autouse=True)
def no_faults_left(stack):
    yield
    stack.pacs_proxy.fault = stack.fhir_proxy.fault = None


def running(api, study_id: str):
    job = job_of(api, study_id)
    return job if job and job["status"] == "running" else None


def test_proxy_faults_on_a_plain_http_server():
    """The proxy itself: pass-through, error answers, cut answers, timeouts, and a dead upstream."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = b"x" * 10_000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with TcpProxy(server.server_address[1]) as proxy, httpx.Client(base_url=proxy.url(), timeout=1) as client:
        assert client.get("/a").content == b"x" * 10_000
        proxy.fault = Fault("http_error", status=429, retry_after=7, match=r"^GET /b", times=1)
        limited = client.get("/b")
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
        assert client.get("/b").status_code == 200  # `times` used up
        proxy.fault = Fault("cut", after_bytes=500)
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/c")
        proxy.fault = Fault("blackhole")
        with pytest.raises(httpx.ReadTimeout):
            client.get("/d")
        proxy.fault = Fault("delay", seconds=0.3)
        started = time.monotonic()
        assert client.get("/e").status_code == 200 and time.monotonic() - started >= 0.3
        proxy.fault = None
        assert proxy.requests_matching(r"^GET /b") == ["GET /b", "GET /b"]
        server.shutdown()
        server.server_close()
        with pytest.raises(httpx.TransportError):
            httpx.get(proxy.url("/f"), timeout=1)


def test_pacs_stopped_mid_retrieval_is_retried_until_it_is_back(stack, fhir, api):
    ids = order_study(fhir, ct_series(4, size=128), orthanc_url=stack.orthanc.url)
    stack.pacs_proxy.fault = Fault("slow", match=WADO_SERIES, bytes_per_s=20_000)
    notify(api, ids["study"])
    wait_until(lambda: stack.pacs_proxy.requests_matching(WADO_SERIES), 30, "the series retrieval to start")
    time.sleep(0.3)  # some of the series is through
    stack.orthanc.stop()
    stack.pacs_proxy.reset_connections()  # a stopped server's connections go down with it
    stack.pacs_proxy.fault = None
    retrying = wait_until(lambda: (j := job_of(api, ids["study"])) and j["status"] == "retrying" and j, 20,
                          "the job to retry")
    assert "PACS" in retrying["reason"]
    time.sleep(1.0)  # more attempts meet a PACS that is down
    stack.restart_orthanc()
    job = wait_finished(api, [ids["study"]], timeout=90)[ids["study"]]
    assert job["attempts"] >= 2
    assert_triaged_once(fhir, api, ids)


def test_fhir_server_stopped_before_write_back_is_retried_and_writes_once(stack, fhir, api):
    ids = order_study(fhir, ct_series(2), orthanc_url=stack.orthanc.url)
    transactions_before = len(stack.fhir_proxy.requests_matching(TRANSACTION))
    stack.fhir_proxy.fault = Fault("delay", seconds=2.0, match=TRANSACTION, times=1)
    notify(api, ids["study"])
    wait_until(lambda: len(stack.fhir_proxy.requests_matching(TRANSACTION)) > transactions_before, 60,
               "the write-back to start")
    stack.stop_fhir()  # while the transaction is held in the proxy: it never arrives
    time.sleep(2.5)
    assert job_of(api, ids["study"])["status"] in ("retrying", "running")
    stack.start_fhir()
    fhir_again = FhirClient(stack.fhir_server.url)
    try:
        job = wait_finished(api, [ids["study"]], timeout=90)[ids["study"]]
        assert job["attempts"] >= 2
        assert_triaged_once(fhir_again, api, ids)
    finally:
        fhir_again.close()


def test_write_back_whose_answer_is_lost_is_not_duplicated(stack, fhir, api):
    """The FHIR server commits the transaction, the answer never arrives: the retry must create nothing."""
    ids = order_study(fhir, ct_series(2), orthanc_url=stack.orthanc.url)
    stack.fhir_proxy.fault = Fault("cut", after_bytes=0, match=TRANSACTION, times=1)
    notify(api, ids["study"])
    job = wait_finished(api, [ids["study"]], timeout=90)[ids["study"]]
    assert job["attempts"] == 2 and stack.fhir_proxy.fault.applied == 1
    assert_triaged_once(fhir, api, ids)
    order, _ = fhir.read("ServiceRequest", ids["order"])
    assert order["priority"] == "stat" and len(order["note"]) == 1  # raised once, one note


def test_worker_killed_mid_job_is_recovered_by_a_new_worker(stack, fhir, api):
    ids = order_study(fhir, ct_series(4, size=128), orthanc_url=stack.orthanc.url)
    stack.pacs_proxy.fault = Fault("slow", match=WADO_SERIES, bytes_per_s=10_000)
    notify(api, ids["study"])
    first = wait_until(lambda: running(api, ids["study"]), 60, "the job to run")
    stack.kill_worker()
    stack.pacs_proxy.fault = None
    time.sleep(0.5)
    assert job_of(api, ids["study"])["status"] == "running"  # nobody knows yet: the lease has not lapsed
    stack.new_worker()
    job = wait_finished(api, [ids["study"]], timeout=90)[ids["study"]]
    assert job["attempts"] == 2 and job["worker"] != first["worker"]
    assert_triaged_once(fhir, api, ids)


def test_rate_limits_and_timeouts_are_retried(stack, fhir, api):
    ids = order_study(fhir, ct_series(2), orthanc_url=stack.orthanc.url)
    stack.fhir_proxy.fault = Fault("http_error", status=429, retry_after=1, match=r"^GET /fhir/ImagingStudy/", times=1)
    notify(api, ids["study"])
    wait_until(lambda: (j := job_of(api, ids["study"])) and j["status"] == "retrying" and j, 20, "a retry")
    stack.fhir_proxy.fault = Fault("blackhole", match=r"^GET /fhir/ImagingStudy/", times=1)  # the next attempt times out
    job = wait_finished(api, [ids["study"]], timeout=90)[ids["study"]]
    assert job["attempts"] == 3
    assert_triaged_once(fhir, api, ids)
    text = api.get("/metrics").text
    assert metric_value(text, "cds_triage_upstream_errors_total", server="fhir", kind="http_429") >= 1
    assert metric_value(text, "cds_triage_upstream_errors_total", server="fhir", kind="timeout") >= 1
    assert metric_value(text, "cds_triage_job_retries_total", cause="transient") >= 2
    assert metric_value(text, "cds_triage_time_to_triage_seconds_count", outcome="done") >= 1
    assert metric_value(text, "cds_triage_model_latency_seconds_count", task="head_ct_ich") >= 1
    assert metric_value(text, "cds_triage_jobs", state="done") >= 1


def test_everything_restarted_with_jobs_queued_and_running(stack, fhir, api):
    """Worker killed mid-job, more notifications accepted while no worker runs, then every
    server and process stopped and started again: each study still triaged exactly once."""
    in_flight = order_study(fhir, ct_series(4, size=128), orthanc_url=stack.orthanc.url)
    stack.pacs_proxy.fault = Fault("slow", match=WADO_SERIES, bytes_per_s=10_000)
    notify(api, in_flight["study"])
    wait_until(lambda: running(api, in_flight["study"]), 60, "the job to run")
    stack.kill_worker()
    stack.pacs_proxy.fault = None
    waiting = [order_study(fhir, ct_series(2, seed=i), orthanc_url=stack.orthanc.url) for i in range(3)]
    for ids in waiting:
        assert notify(api, ids["study"])["status"] == "queued"  # persisted before the 200
    stack.service.stop()
    stack.stop_fhir()
    stack.restart_orthanc()
    stack.start_fhir()
    stack.start_service()
    fhir_again = FhirClient(stack.fhir_server.url)
    try:
        studies = [in_flight, *waiting]
        with httpx.Client(base_url=stack.settings.public_url, timeout=10) as api_again:
            wait_finished(api_again, [ids["study"] for ids in studies], timeout=120)
            for ids in studies:
                assert_triaged_once(fhir_again, api_again, ids)
            assert job_of(api_again, in_flight["study"])["attempts"] == 2
    finally:
        fhir_again.close()
