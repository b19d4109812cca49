"""Redirects from the FHIR server or the PACS, and chunked request bodies, on real servers over HTTP.

A 3xx is never a success and is never followed (core/errors.is_redirect_status): the CLI says so in one
line naming the URL it called and the Location it was sent to, a job is retried and then fails with that
reason, and an empty notification is a 503 (the FHIR server sends it again), not `200 {"jobs": []}`.
The redirecting server is what an http→https rule in front of a FHIR server or a PACS is: every
request answered with a 3xx to the same path on https.

Chunked bodies are counted as they stream: past CDS_MAX_BODY_BYTES it is a 413, never a body cut at
the limit and parsed (our `serve`, gunicorn, on 127.0.0.1).
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from cds_devtools.demo import ServiceProcesses, start_service
from cds_devtools.devservers import free_port
from cds_service.adapters.pacs import pacs_from_settings
from cds_service.core.settings import Settings
from stack_support import NOTIFY_HEADERS, SECRET, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


class Redirector:
    """An HTTP server on 127.0.0.1 that answers every request with `status` and `Location:
    https://127.0.0.1:<port><path>` (an http→https rule), with a small JSON body as some fronts send.
    `moved=True` sends to `http://127.0.0.1:<port>/moved<path>` instead: a client that follows shows up."""

    def __init__(self, status: int = 307, *, moved: bool = False) -> None:
        self.seen: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _redirect(self) -> None:
                outer.seen.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = b"{}"
                self.send_response(status)
                self.send_header("Location", f"http://127.0.0.1:{outer.port}/moved{self.path}" if moved
                                 else f"https://127.0.0.1:{outer.port}{self.path}")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _redirect

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def redirector() -> Iterator[Redirector]:
    server = Redirector()
    yield server
    server.close()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cds_service.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=REPO)


def test_subscribe_against_a_redirecting_fhir_server_is_one_line_naming_url_and_location(redirector, tmp_path):
    done = run_cli("subscribe", "--wait", "0", env={"CDS_FHIR_BASE_URL": f"{redirector.url}/fhir",
                                                     "CDS_DATA_DIR": str(tmp_path / "data")})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # no traceback (it was KeyError: 'id')
    line = lines[0]
    assert "Traceback" not in line and "KeyError" not in line
    assert f"GET {redirector.url}/fhir/Subscription answered 307" in line, line
    assert f"redirect to https://127.0.0.1:{redirector.port}/fhir/Subscription" in line, line
    assert "CDS_FHIR_BASE_URL" in line and "redirected" in line, line
    assert redirector.seen and all(not seen.startswith("POST") for seen in redirector.seen)  # nothing created blindly


def test_a_redirecting_pacs_is_an_error_naming_the_url_and_location_never_followed(tmp_path):
    """The PACS adapter (requests would follow a 3xx with our credentials): QIDO-RS, WADO-RS, metadata."""
    from cds_service.core.errors import UpstreamRedirectError

    redirector = Redirector(301, moved=True)
    try:
        settings = Settings(dicomweb_url=f"{redirector.url}/dicom-web", dicomweb_username="cds", dicomweb_password="pw",
                            data_dir=tmp_path)
        pacs = pacs_from_settings(settings)
        with pytest.raises(UpstreamRedirectError) as caught:
            pacs.find_study("1.2.3")
        message = str(caught.value)
        assert f"PACS GET {redirector.url}/dicom-web/studies/1.2.3/series answered 301" in message, message
        assert f"redirect to {redirector.url}/moved/dicom-web/studies/1.2.3/series?" in message, message
        assert caught.value.server == "pacs" and caught.value.url == settings.dicomweb_url
        with pytest.raises(UpstreamRedirectError, match="answered 301 redirect"):
            pacs.retrieve_part("1.2.3", "1.2.3.4", "1.2.3.4.5")
        with pytest.raises(UpstreamRedirectError, match="metadata answered 301 redirect"):
            pacs.study_metadata("1.2.3")
    finally:
        redirector.close()
    assert len(redirector.seen) == 3, redirector.seen  # one request each: not retried in the adapter
    assert not [seen for seen in redirector.seen if "/moved/" in seen], "a redirect was followed"


@pytest.fixture(scope="module")
def service_behind_redirects(tmp_path_factory) -> Iterator[tuple[Settings, Redirector]]:
    """`serve` and a worker whose FHIR server and PACS both sit behind a redirecting front; a small body limit."""
    redirector = Redirector()
    root = tmp_path_factory.mktemp("redirects")
    port = free_port()
    settings = Settings(fhir_base_url=f"{redirector.url}/fhir", dicomweb_url=f"{redirector.url}/dicom-web",
                        public_url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port, data_dir=root / "data",
                        weights_dir=root / "weights", subscription_secret=SECRET, job_retries=2, job_retry_delay_s=0.2,
                        http_timeout_s=5, max_body_bytes=4000, operator_open_on_loopback=True)
    processes: ServiceProcesses = start_service(settings, root / "logs")
    yield settings, redirector
    processes.stop()
    redirector.close()


def test_a_notified_study_behind_a_redirect_is_retried_then_fails_naming_url_and_location(service_behind_redirects):
    settings, redirector = service_behind_redirects
    with httpx.Client(base_url=settings.public_url, timeout=30) as api:
        answer = api.put("/fhir-notify/ImagingStudy/is-redirected", headers=NOTIFY_HEADERS)
        assert answer.status_code == 200, answer.text
        job_id = answer.json()["jobs"][0]["id"]

        def finished() -> dict | None:
            job = api.get(f"/jobs/{job_id}").json()
            return job if job["status"] in ("done", "failed") else None

        job = wait_until(finished, 120, "the redirected job to finish")
    assert job["status"] == "failed", job
    reason = job["reason"]
    assert reason.startswith("gave up after 2 attempts"), reason
    assert f"GET {redirector.url}/fhir/ImagingStudy/is-redirected answered 307" in reason, reason
    assert f"redirect to https://127.0.0.1:{redirector.port}/fhir/ImagingStudy/is-redirected" in reason, reason


def test_an_empty_notification_behind_a_redirect_is_a_503_not_an_empty_success(service_behind_redirects):
    settings, redirector = service_behind_redirects
    with httpx.Client(base_url=settings.public_url, timeout=30) as api:
        answer = api.post("/fhir-notify", headers=NOTIFY_HEADERS)
    assert answer.status_code == 503, answer.text  # it was 200 {"jobs": []}: studies silently dropped
    diagnostics = answer.json()["issue"][0]["diagnostics"]
    assert "answered 307 redirect to https://" in diagnostics and "/fhir/ImagingStudy" in diagnostics, diagnostics


# --- chunked request bodies ------------------------------------------------------------------------------------


def chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
    """A body sent with Transfer-Encoding: chunked (httpx streams an iterator without a length)."""
    for start in range(0, len(body), size):
        yield body[start:start + size]


def test_a_chunked_body_over_the_limit_is_a_413_even_when_its_start_is_valid_json(service_behind_redirects):
    settings, _ = service_behind_redirects
    limit = settings.max_body_bytes
    head = b'{"resourceType": "ImagingStudy", "id": "chunked-1"}'
    body = head + b" " * (limit - len(head)) + b"junk that makes the whole body invalid JSON" * 50
    with httpx.Client(base_url=settings.public_url, timeout=30) as api:
        cut_at_the_limit = api.post("/fhir-notify", content=chunks(body), headers={**NOTIFY_HEADERS,
                                                                                  "Content-Type": "application/fhir+json"})
        assert cut_at_the_limit.status_code == 413, cut_at_the_limit.text  # it was 200: the body cut at the limit, a job made
        assert "CDS_MAX_BODY_BYTES" in cut_at_the_limit.json()["issue"][0]["diagnostics"]
        over = api.post("/fhir-notify", content=chunks(b"[" + b"1," * limit + b"1]"), headers=NOTIFY_HEADERS)
        assert over.status_code == 413, over.text  # it was a misleading 400 "not valid JSON"
        assert api.get("/jobs", params={"imagingStudy": "chunked-1"}).json()["jobs"] == []


def test_a_chunked_body_under_the_limit_is_read_whole(service_behind_redirects):
    settings, redirector = service_behind_redirects
    body = b'{"resourceType": "ImagingStudy", "id": "chunked-2"}' + b" " * 2000
    with httpx.Client(base_url=settings.public_url, timeout=30) as api:
        answer = api.post("/fhir-notify", content=chunks(body, 300), headers=NOTIFY_HEADERS)
        assert answer.status_code == 200, answer.text
        assert answer.json()["jobs"][0]["imagingStudy"] == "ImagingStudy/chunked-2"
        bad = api.post("/fhir-notify", content=chunks(b'{"resourceType": "ImagingStudy", "id": "x"} trailing', 7),
                       headers=NOTIFY_HEADERS)
        assert bad.status_code == 400 and "not valid JSON" in bad.text  # the whole body was read and judged
