"""A strict HAPI FHIR for the tests: what a hospital's validating server does (hapi-fhir-test/, strict mode).

The same jar as the plain server (tests/hapi_support.py), started with

- `-Dhapi.validate_requests=true`: HAPI's RequestValidatingInterceptor refuses a create, update or
  transaction whose validation finds an error;
- `-Dhapi.validation.packages=`: current HL7 Terminology (`hl7.terminology.r4`, which knows AIAST; the
  copy bundled with HAPI 8.8.0 does not) and our own package, written by `cds-triage fhir-package`
  from the settings, at the front of the server's validation support chain.

HL7 Terminology comes from the npm registry (`npm pack`, its integrity checked), once, into
hapi-fhir-test/target/packages/.

    .venv/bin/python tests/strict_hapi_support.py packages DIR   # both packages into DIR; prints their paths
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as a script: the project root on the path, like pytest's rootdir
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hapi_support

#: HL7 Terminology (THO) for FHIR R4, as published on the npm registry, and its npm integrity (sha512).
TERMINOLOGY_PACKAGE = "hl7.terminology.r4@7.0.1"
TERMINOLOGY_INTEGRITY = "sha512-UamZUcARk/TEaJb7X0hDyANmC7bCv0Jof0u0uGIOB2O9VQX0uV45Vf4EyONHM6Sejv6q7sXEAzKAQsgw1Cld3A=="
PACKAGES_DIR = hapi_support.TARGET / "packages"
FETCH_TIMEOUT_S = 300.0
#: The first validation builds the validator's context (core definitions, snapshots of our profiles): up to
#: minutes on two busy cores, so it is done once before the server is handed out.
WARM_UP_TIMEOUT_S = 600.0


def missing_tools() -> str | None:
    """Why the strict server cannot run here (java, mvn, npm), or None."""
    missing = hapi_support.missing_tools()
    if missing:
        return missing
    if shutil.which("npm") is None:
        return "npm not found: the strict HAPI tests load HL7 Terminology from the npm registry (apt-get install npm)"
    return None


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def terminology_package() -> Path:
    """hl7.terminology.r4's .tgz, fetched once with `npm pack` (a file lock makes concurrent callers wait)."""
    name, _, version = TERMINOLOGY_PACKAGE.rpartition("@")
    path = PACKAGES_DIR / f"{name}-{version}.tgz"
    PACKAGES_DIR.mkdir(parents=True, exist_ok=True)
    with open(PACKAGES_DIR / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file() or _integrity(path) != TERMINOLOGY_INTEGRITY:
            done = subprocess.run(["npm", "pack", "--quiet", TERMINOLOGY_PACKAGE, "--pack-destination", str(PACKAGES_DIR)],
                                  capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
            if done.returncode != 0 or not path.is_file():
                raise hapi_support.HapiBuildError(f"npm pack {TERMINOLOGY_PACKAGE} failed (exit {done.returncode}): "
                                                  f"{(done.stdout + done.stderr).strip()[-2000:]}")
            if _integrity(path) != TERMINOLOGY_INTEGRITY:
                path.unlink()
                raise hapi_support.HapiBuildError(f"{TERMINOLOGY_PACKAGE} from npm does not match its integrity")
    return path


def our_package(folder: Path, env: dict[str, str] | None = None) -> Path:
    """Our FHIR package, written by `cds-triage fhir-package` with the settings in `env` (CDS_*)."""
    path = Path(folder) / "cds-triage.r4.tgz"
    done = subprocess.run([sys.executable, "-m", "cds_service.cli", "fhir-package", "--output", str(path),
                           "--version", "0.0.0-test"], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise hapi_support.HapiBuildError(f"cds-triage fhir-package failed: {done.stdout}{done.stderr}")
    return path


def strict_jvm_args(packages: list[Path]) -> tuple[str, ...]:
    """The system properties of the strict mode (hapi-fhir-test/src/main/java/cdstriage/hapi/StrictValidation.java)."""
    return ("-Dhapi.validate_requests=true", "-Dhapi.validation.packages=" + ",".join(str(p) for p in packages))


def start_strict_hapi(workdir: Path, packages: list[Path], **kwargs) -> hapi_support.HapiProcess:
    """The jar of hapi_support.build(), started in strict mode with `packages` loaded, its validator warmed up."""
    proc = hapi_support.start_hapi(workdir, extra_jvm_args=strict_jvm_args(packages), **kwargs)
    try:
        warm_up(proc.url)
    except BaseException:
        proc.stop(timeout=20)
        raise
    return proc


def warm_up(base_url: str) -> None:
    """One `$validate` against our DiagnosticReport profile: the validator loads core, terminology and our package."""
    report = {"resourceType": "DiagnosticReport", "status": "preliminary", "code": {"text": "warm-up"},
              "meta": {"profile": ["https://cds-triage.org/fhir/StructureDefinition/cds-triage-diagnosticreport"]}}
    response = httpx.post(f"{base_url}/DiagnosticReport/$validate", json=report, timeout=WARM_UP_TIMEOUT_S,
                          headers={"Content-Type": "application/fhir+json"})
    if response.status_code >= 500:
        raise hapi_support.HapiBuildError(f"the strict HAPI's validator did not warm up: {response.status_code} {response.text[:300]}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "packages":
        sys.exit("usage: strict_hapi_support.py packages DIR")
    folder = Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    print(terminology_package())
    print(our_package(folder))
