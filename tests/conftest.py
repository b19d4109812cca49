"""Shared fixtures: a real Orthanc, a real sekmet FHIR server and a real HAPI FHIR JPA server on
loopback, once per session.

Each skips (with the reason) when its executable is missing on a developer machine (HAPI: java or
mvn); with the CI environment variable set they fail instead, so CI never passes by skipping.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

import cds_service
import hapi_support
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


@pytest.fixture(scope="session")
def hapi_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hapi_support.HapiProcess]:
    """A started HAPI FHIR JPA server (`.url` is the FHIR base), shared by the whole session.

    hapi-fhir-test/ is built by Maven first when its jar is missing or stale (once: the jar then
    is newer than its sources); a build or start failure fails the tests that use it."""
    require(not hapi_support.missing_tools(), hapi_support.missing_tools() or "")
    workdir = tmp_path_factory.mktemp("hapi")
    try:
        proc = hapi_support.start_hapi(workdir)
    except (hapi_support.HapiBuildError, devservers.ServerStartError) as exc:
        pytest.fail(f"HAPI FHIR test server: {exc}", pytrace=False)
    try:
        yield proc
    finally:
        proc.stop(timeout=20)  # its log (hapi.log) stays in pytest's temp dir, like the tests' own files


@pytest.fixture(scope="session")
def strict_hapi_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hapi_support.HapiProcess]:
    """HAPI FHIR as a hospital's validating server: request validation on, HL7 Terminology and our own
    package (`cds-triage fhir-package`, default settings) loaded (tests/strict_hapi_support.py); shared."""
    import strict_hapi_support

    require(not strict_hapi_support.missing_tools(), strict_hapi_support.missing_tools() or "")
    workdir = tmp_path_factory.mktemp("hapi-strict")
    try:
        packages = [strict_hapi_support.terminology_package(), strict_hapi_support.our_package(workdir)]
        proc = strict_hapi_support.start_strict_hapi(workdir, packages, timeout=600)
    except (hapi_support.HapiBuildError, devservers.ServerStartError) as exc:
        pytest.fail(f"strict HAPI FHIR test server: {exc}", pytrace=False)
    try:
        yield proc
    finally:
        proc.stop(timeout=20)


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
