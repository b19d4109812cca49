"""Shared fixtures: a real Orthanc, a real sekmet FHIR server and a real HAPI FHIR JPA server on
loopback, once per session.

Each skips (with the reason) when its executable is missing on a developer machine (HAPI: java or
mvn); with the CI environment variable set they fail instead, so CI never passes by skipping.

What costs a minute of CPU and is needed late (HAPI's start, mypy) begins in the background when the
session's first test starts (`background_starts`), on the core the tests leave idle. A test that uses
a real server is marked `integration` here (`./run.sh test --quick` leaves those and the `slow` ones out;
docs/testing.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

import cds_service
import hapi_support
import strict_hapi_support
import support
from cds_devtools import devservers

SAMPLES_DIR = Path(cds_service.__file__).resolve().parent / "samples"


def require(condition: object, reason: str) -> None:
    """Skip the test when `condition` is falsy, or fail when running in CI."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def _require_orthanc() -> None:
    require(devservers.find_orthanc(), "Orthanc executable not found (apt-get install orthanc, or set ORTHANC_BIN)")
    require(
        devservers.find_dicomweb_plugin(),
        "Orthanc DICOMweb plugin not found (apt-get install orthanc-dicomweb, or set ORTHANC_DICOMWEB_PLUGIN)",
    )


def _require_sekmet() -> None:
    require(devservers.find_sekmet(), "sekmet executable not found in this virtualenv (pip install sekmet-fhir==0.1.1)")


@pytest.fixture(scope="session", autouse=True)
def test_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tests/support.py keeps the test weights and ONNX graphs it made once this session."""
    folder = tmp_path_factory.mktemp("test-models")
    support.use_cache_dir(folder)
    return folder


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devservers.OrthancProcess]:
    """A started Orthanc (DICOMweb at `.dicomweb_url`), shared by the whole session."""
    _require_orthanc()
    workdir = tmp_path_factory.mktemp("orthanc")
    proc = devservers.start_orthanc(workdir)
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devservers.FhirServerProcess]:
    """A started sekmet FHIR R4 server (`.url` is the FHIR base), shared by the whole session."""
    _require_sekmet()
    workdir = tmp_path_factory.mktemp("fhir")
    proc = devservers.start_fhir_server(workdir)
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


MYPY_TEST = "tests/test_checkers.py::test_mypy_finds_nothing_new"


def needs_hapi(item: pytest.Item) -> bool:
    """The test uses the HAPI FHIR server: the `hapi_server` fixture, or the `hapi` mark (test_e2e's [hapi])."""
    return "hapi_server" in getattr(item, "fixturenames", ()) or item.get_closest_marker("hapi") is not None


def needs_strict_hapi(item: pytest.Item) -> bool:
    """The test uses the validating HAPI: the `strict_hapi_server` fixture, or the `hapi_strict` mark."""
    return "strict_hapi_server" in getattr(item, "fixturenames", ()) or item.get_closest_marker("hapi_strict") is not None


def start_strict_hapi(workdir: Path) -> hapi_support.HapiProcess:
    """HAPI FHIR as a hospital's validating server: request validation on, HL7 Terminology and our own
    package (`cds-triage fhir-package`, default settings) loaded (tests/strict_hapi_support.py)."""
    packages = [strict_hapi_support.terminology_package(), strict_hapi_support.our_package(workdir)]
    return strict_hapi_support.start_strict_hapi(workdir, packages, timeout=600)


@pytest.fixture(scope="session", autouse=True)
def background_starts(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    """HAPI (built by Maven first if needed) and the validating HAPI, each when a selected test needs it, and
    mypy, when its test is selected, started in threads at the session's first test: their minute of CPU each then runs beside
    the tests before them instead of on the critical path. Not in a pytest-xdist worker (each would start
    its own): there the fixtures below start them when first asked."""
    started: dict[str, Future] = {}
    pool = ThreadPoolExecutor(3, thread_name_prefix="background-start")
    items = request.session.items
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        if any(needs_hapi(item) for item in items) and not hapi_support.missing_tools():
            started["hapi"] = pool.submit(hapi_support.start_hapi, tmp_path_factory.mktemp("hapi"))
        if any(needs_strict_hapi(item) for item in items) and not strict_hapi_support.missing_tools():
            started["hapi-strict"] = pool.submit(start_strict_hapi, tmp_path_factory.mktemp("hapi-strict"))
        if any(item.nodeid == MYPY_TEST for item in items):
            from test_checkers import run_mypy

            started["mypy"] = pool.submit(run_mypy)
    yield started
    pool.shutdown(wait=True)
    for name in ("hapi", "hapi-strict"):
        hapi = started.get(name)
        if hapi is not None and hapi.exception() is None:
            hapi.result().stop(timeout=20)  # when no test asked for it (a -x run that ended first)


@pytest.fixture(scope="session")
def hapi_server(background_starts: dict[str, Future],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[hapi_support.HapiProcess]:
    """A started HAPI FHIR JPA server (`.url` is the FHIR base), shared by the whole session.

    hapi-fhir-test/ is built by Maven first when its jar is missing or stale (once: the jar then
    is newer than its sources); a build or start failure fails the tests that use it."""
    require(not hapi_support.missing_tools(), hapi_support.missing_tools() or "")
    started = background_starts.get("hapi")
    try:
        proc = started.result() if started else hapi_support.start_hapi(tmp_path_factory.mktemp("hapi"))
    except (hapi_support.HapiBuildError, devservers.ServerStartError) as exc:
        pytest.fail(f"HAPI FHIR test server: {exc}", pytrace=False)
    try:
        yield proc
    finally:
        proc.stop(timeout=20)  # its log (hapi.log) stays in pytest's temp dir, like the tests' own files


@pytest.fixture(scope="session")
def strict_hapi_server(background_starts: dict[str, Future],
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[hapi_support.HapiProcess]:
    """HAPI FHIR as a hospital's validating server (`start_strict_hapi`), shared by the whole session;
    started in the background at the session's first test when a selected test needs it."""
    require(not strict_hapi_support.missing_tools(), strict_hapi_support.missing_tools() or "")
    started = background_starts.get("hapi-strict")
    try:
        proc = started.result() if started else start_strict_hapi(tmp_path_factory.mktemp("hapi-strict"))
    except (hapi_support.HapiBuildError, devservers.ServerStartError) as exc:
        pytest.fail(f"strict HAPI FHIR test server: {exc}", pytrace=False)
    try:
        yield proc
    finally:
        proc.stop(timeout=20)


@pytest.fixture(scope="session")
def mypy_run(background_starts: dict[str, Future]) -> subprocess.CompletedProcess[str]:
    """mypy's run over the packages (tests/test_checkers.py), from the background when it was started there."""
    from test_checkers import run_mypy

    started = background_starts.get("mypy")
    return started.result() if started else run_mypy()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator:
    """Start extra Orthancs (own config/ports) inside one test; all are stopped afterwards."""
    _require_orthanc()
    started: list[devservers.ManagedProcess] = []

    def start(**kwargs) -> devservers.OrthancProcess:
        proc = devservers.start_orthanc(tmp_path / f"orthanc{len(started)}", **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def fhir_server_factory(tmp_path: Path) -> Iterator:
    """Start extra sekmet servers (e.g. with SMART settings) inside one test; stopped afterwards."""
    _require_sekmet()
    started: list[devservers.ManagedProcess] = []

    def start(**kwargs) -> devservers.FhirServerProcess:
        proc = devservers.start_fhir_server(tmp_path / f"fhir{len(started)}", **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """cds_service/samples (DICOM studies + manifest.json)."""
    return SAMPLES_DIR


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of this module's own on loopback (tests/redis_support.py)."""
    from redis_support import start_redis

    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield proc.url
    proc.stop()


#: the fixtures that start real servers: a test using one (directly or through its own fixtures) is `integration`
SERVER_FIXTURES = {"orthanc", "fhir_server", "hapi_server", "strict_hapi_server", "orthanc_factory", "fhir_server_factory", "redis_url"}
SHARED_SCOPES = {"module", "class", "package"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `integration` every test that uses a real server fixture, so `-m "not integration"` (the quick
    loop) leaves it out without each test saying so. Under pytest-xdist (`-n 2 --dist loadgroup`), the tests
    of a module that share a module-scoped fixture (a service, a browser, models loaded once) go to one
    worker, so that fixture starts once; every other test goes wherever a worker is free."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) or needs_hapi(item) or needs_strict_hapi(item):
            item.add_marker(pytest.mark.integration)
        definitions = getattr(item, "_fixtureinfo", None)
        if definitions is not None and any(defs and defs[-1].scope in SHARED_SCOPES
                                           for defs in definitions.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__ if item.module else item.nodeid))
