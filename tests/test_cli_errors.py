"""`cds-triage` explains: a bad setting or a server it cannot use is one line naming the setting (exit 2),
never a traceback; --version; `serve --port 0`; `jobs list`; the demo's port."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from cds_service.cli import build_parser, main
from cds_devtools.demo import PortInUseError, demo_port
from cds_devtools.devservers import free_port
from cds_service.core.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parent.parent


def cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("CDS_")}
    return subprocess.run([sys.executable, "-m", "cds_service.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**clean, "CDS_DATA_DIR": str(tmp_path / "var"), **env})


def assert_one_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit 2, nothing but one line on stderr, with each expected text in it."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# --- settings, checked at load, named in the message ------------------------------------------------


@pytest.mark.parametrize("variable, value, says", [
    ("CDS_PORT", "abc", "is not a whole number"),
    ("CDS_PORT", "70000", "is not a port"),
    ("CDS_FHIR_BASE_URL", "not-a-url", "is not an http(s) URL"),
    ("CDS_DICOMWEB_URL", "ftp://pacs/dicom-web", "is not an http(s) URL"),
    ("CDS_PUBLIC_URL", "http://host:port", "is not a URL"),
    ("CDS_QUEUE_URL", "localhost:6379", "is not a Redis URL"),
    ("CDS_HTTP_TIMEOUT_S", "soon", "is not a number"),
    ("CDS_HEATMAP_TO_PACS", "maybe", "is not on or off"),
    ("CDS_LOG_LEVEL", "LOUD", "is not a log level"),
    ("CDS_PRIORITY_RULES", "glioma=soonish", "CDS_PRIORITY_RULES"),
    ("CDS_FHIR_BEARER_TOKEN_FILE", "/no/such/secret", "cannot be read"),
])
def test_a_bad_setting_is_named_when_the_settings_are_read(variable, value, says):
    with pytest.raises(SettingsError) as error:
        Settings.from_env({variable: value})
    assert str(error.value).startswith(variable) and says in str(error.value)


@pytest.mark.slow  # `cds-triage` in a child process
def test_every_command_says_which_setting_is_wrong_in_one_line(tmp_path):
    for args in (["subscribe"], ["jobs", "list"], ["triage", str(tmp_path)], ["serve"]):
        result = cli(args, tmp_path, CDS_PORT="abc")
        assert_one_line(result, "bad setting", "CDS_PORT='abc'", "whole number")
    result = cli(["subscribe"], tmp_path, CDS_FHIR_BASE_URL="not-a-url")
    assert_one_line(result, "CDS_FHIR_BASE_URL='not-a-url'", "http(s) URL")


def test_good_settings_still_load_and_round_trip():
    settings = Settings.from_env({"CDS_PORT": " 8081 ", "CDS_HEATMAP_TO_PACS": "off", "CDS_QUEUE_URL": "redis://r:6379/0",
                                  "CDS_FHIR_BASE_URL": "https://ehr.example.org/fhir/R4", "CDS_LOG_LEVEL": "debug"})
    assert settings.port == 8081 and settings.heatmap_to_pacs is False
    assert Settings.from_env(settings.to_env()) == settings


# --- a server named by a setting that cannot be used ---------------------------------------------------


@pytest.mark.slow  # `cds-triage` in a child process
def test_subscribe_to_an_unreachable_fhir_server_names_the_setting_and_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/fhir"  # nothing listens there
    line = assert_one_line(cli(["subscribe"], tmp_path, CDS_FHIR_BASE_URL=url), "CDS_FHIR_BASE_URL", url)
    assert line.startswith("cds-triage subscribe: ")


@contextlib.contextmanager
def answering(status: int, body: bytes = b"", **headers: str) -> Iterator[str]:
    """A web server on loopback that gives every GET the same answer; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


NOT_FOUND_PAGE = b"<!DOCTYPE html>\n<html><head><title>Not found</title></head>\n<body><h1>404</h1>\n<p>Nothing here</p></body></html>"


@pytest.mark.slow  # `cds-triage` in a child process
def test_subscribe_to_a_url_that_is_not_a_fhir_server_names_the_setting(tmp_path):
    with answering(404, NOT_FOUND_PAGE, **{"Content-Type": "text/html"}) as base:  # a web server, not a FHIR server
        url = base + "/"
        line = assert_one_line(cli(["subscribe"], tmp_path, CDS_FHIR_BASE_URL=url),
                               "CDS_FHIR_BASE_URL", url, "404")
        assert "<" not in line  # the HTML page is not pasted into the message


@pytest.mark.slow  # `cds-triage` in a child process
def test_subscribe_refused_for_credentials_names_the_credential_settings(tmp_path):
    with answering(401, **{"WWW-Authenticate": 'Bearer realm="fhir"'}) as base:  # wants credentials we did not send
        line = assert_one_line(cli(["subscribe"], tmp_path, CDS_FHIR_BASE_URL=base + "/fhir"), "401", "CDS_FHIR_BEARER_TOKEN")
        assert "refused our credentials" in line and "is the server up" not in line
        assert "401:" not in line  # no empty detail after the status


@pytest.mark.slow  # `cds-triage` in a child process
def test_jobs_with_an_unreachable_redis_names_the_queue_setting(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert_one_line(cli(["jobs", "list"], tmp_path, CDS_QUEUE_URL=url, CDS_HTTP_TIMEOUT_S="2"), f"CDS_QUEUE_URL={url}")


def test_an_error_not_about_a_setting_is_one_line_and_exit_1(monkeypatch, capsys):
    from cds_service.adapters import subscribe
    from cds_service.core.errors import UpstreamRejectedError

    def refused(settings, endpoint):
        raise UpstreamRejectedError("the server refused the Subscription: HAPI-1234 rest-hook channels are disabled", 422)

    monkeypatch.setattr(subscribe, "ensure_subscription", refused)
    for key in [k for k in os.environ if k.startswith("CDS_")]:
        monkeypatch.delenv(key)
    assert main(["subscribe"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "cds-triage subscribe: the server refused the Subscription: HAPI-1234 rest-hook channels are disabled"


# --- --version, help, jobs list -------------------------------------------------------------------------


@pytest.mark.slow  # `cds-triage` in a child process
def test_version_and_the_exit_statuses_in_the_help(tmp_path):
    version = cli(["--version"], tmp_path)
    assert version.returncode == 0 and re.fullmatch(r"cds-triage \d+\.\d+\.\d+\S*\n", version.stdout), version
    help_text = build_parser().format_help()
    assert "exit status:" in help_text and "2  bad command line, a bad setting" in help_text


@pytest.mark.slow  # `cds-triage` in a child process
def test_jobs_list_has_a_header_and_refuses_an_unknown_status(tmp_path):
    from cds_service.jobs.sqlite_store import JobStore
    from cds_service.jobs.state import TriageRequest

    store = JobStore(tmp_path / "var" / "jobs.sqlite3")
    store.submit(TriageRequest(imaging_study_id="study-1", source="test"), model_set="m@1")
    listed = cli(["jobs", "list"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["JOB", "STATE", "TRIES", "STUDY", "REASON"]
    assert "queued" in row and "ImagingStudy/study-1" in row
    empty = cli(["jobs", "list", "--status", "failed"], tmp_path)
    assert empty.returncode == 0 and empty.stdout.split() == header.split() and "no failed jobs" in empty.stderr
    unknown = cli(["jobs", "list", "--status", "finished"], tmp_path)
    assert unknown.returncode == 2 and "invalid choice: 'finished'" in unknown.stderr
    assert "not_applicable" in unknown.stderr  # the states it takes are listed


# --- serve --port 0, the demo's port ----------------------------------------------------------------------


@pytest.mark.slow  # `cds-triage` in a child process
def test_serve_on_port_0_picks_a_free_port_and_prints_its_url(tmp_path):
    clean = {key: value for key, value in os.environ.items() if not key.startswith("CDS_")}
    env = {**clean, "CDS_DATA_DIR": str(tmp_path / "var"), "CDS_HOST": "127.0.0.1"}
    serve = subprocess.Popen([sys.executable, "-m", "cds_service.cli", "serve", "--port", "0", "--http-workers", "1"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and "listening on" not in line:
            line = serve.stdout.readline()  # type: ignore[union-attr]
            if not line and serve.poll() is not None:
                break
        match = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line)
        assert match, line
        assert int(match.group(2)) > 0
        assert httpx.get(f"{match.group(1)}/healthz", timeout=10).status_code == 200
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(10)
        serve.stdout.close()  # type: ignore[union-attr]


@pytest.mark.slow  # `cds-triage` in a child process
def test_serve_refuses_a_port_that_is_not_one(tmp_path):
    result = cli(["serve", "--port", "99999"], tmp_path)
    assert result.returncode == 2 and "is not a port" in result.stderr


@pytest.mark.slow  # `cds-triage` in a child process
def test_serve_on_a_busy_port_says_so_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        by_flag = cli(["serve", "--host", "127.0.0.1", "--port", str(port)], tmp_path)
        by_setting = cli(["serve"], tmp_path, CDS_HOST="127.0.0.1", CDS_PORT=str(port))
    for result, source in ((by_flag, "--port/--host"), (by_setting, "CDS_PORT/CDS_HOST")):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port} ({source})" in lines[0], result.stderr
        assert "in use" in lines[0].lower()


def test_the_demo_takes_its_stable_port_when_free_and_says_when_it_cannot(capsys):
    port = free_port()
    assert demo_port(None, port) == port  # CDS_PORT (8000 by default): the same URL every time
    assert capsys.readouterr().out == ""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        chosen = demo_port(None, port)
        out = capsys.readouterr().out
        assert chosen != port and f"port {port} (CDS_PORT) is in use" in out and f"takes port {chosen} instead" in out
        with pytest.raises(PortInUseError, match=f"port {port} \\(--port\\) is in use"):
            demo_port(port, 8000)  # a port asked for by name is not swapped silently
    assert demo_port(0, 8000) > 0  # 0: any free port
    assert demo_port(None, 0) > 0  # CDS_PORT=0 likewise, without a word
    assert capsys.readouterr().out == ""


def test_the_command_reference_documents_exit_statuses_version_and_port_0():
    section = (REPO / "docs" / "cli.md").read_text()
    assert "cds-triage --version" in section and "--port 0" in section
    assert "Exit status" in section and "**2** a bad command line or setting" in section


def test_the_setting_is_named_from_the_error_fields_not_its_message():
    from cds_service.cli import setting_named_by
    from cds_service.core.errors import UpstreamError

    settings = Settings.from_env({"CDS_FHIR_BASE_URL": "https://ehr.example.org/fhir", "CDS_DICOMWEB_URL": "https://pacs.example.org/dicom-web"})
    assert setting_named_by(UpstreamError("timed out", server="pacs", url="https://pacs.example.org/dicom-web"), settings) == \
        ("CDS_DICOMWEB_URL", "https://pacs.example.org/dicom-web")
    assert setting_named_by(UpstreamError("PACS down"), settings) is None  # prose is not read back
    smart = UpstreamError("unreachable", server="auth", url="https://ehr.example.org/fhir/.well-known/smart-configuration")
    assert setting_named_by(smart, settings) == ("CDS_FHIR_BASE_URL", "https://ehr.example.org/fhir")
    assert setting_named_by(UpstreamError("404", server="fhir"), settings) == ("CDS_FHIR_BASE_URL", "https://ehr.example.org/fhir")


def test_the_training_commands_import_cds_training_only_when_they_run(tmp_path):
    """A half-edited training module must not break `triage` or `serve`: building the parser (every command)
    imports nothing of cds_training; `train` and `evaluate` still take their own arguments and help."""
    probe = ("import sys; from cds_service.cli import build_parser; build_parser(); "
             "print(sorted(m for m in sys.modules if m.startswith('cds_training')))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", (loaded.stdout, loaded.stderr)
    helped = cli(["train", "--help"], tmp_path)
    assert helped.returncode == 0 and "--target-sensitivity" in helped.stdout and "cds-triage train" in helped.stdout
    missing = cli(["evaluate", "--task", "brain_mri"], tmp_path)
    assert missing.returncode == 2 and "--data" in missing.stderr
    unknown = cli(["jobs", "list", "--no-such-option"], tmp_path)
    assert unknown.returncode == 2 and "unrecognized arguments: --no-such-option" in unknown.stderr
