"""A real HAPI FHIR JPA server for the tests, without Docker: hapi-fhir-test/ built once, run on loopback.

`build()` runs Maven on hapi-fhir-test/pom.xml (`mvn -B -q package`, Maven's ~/.m2 cache) unless
target/hapi-fhir-test.jar is newer than the POM and every source file; a file lock makes concurrent
callers (two pytest processes, run.sh and a test) build it once. `start_hapi()` starts
`java -Xmx768m -jar target/hapi-fhir-test.jar PORT` on a free 127.0.0.1 port and returns when
`GET /fhir/metadata` answers 200 (about 40 s on two cores).

    .venv/bin/python tests/hapi_support.py build            # build if stale; prints the jar's path
    .venv/bin/python tests/hapi_support.py run -- CMD ...   # HAPI (and Orthanc) around CMD

`run` starts HAPI unless CDS_FHIR_BASE_URL is set and Orthanc unless CDS_DICOMWEB_URL is set, runs
CMD with both set to the servers (and CDS_TEST_HAPI_LOG to HAPI's log), then stops what it started
(hapi-fhir-test/run.sh --no-docker).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # run as a script: the project root on the path, like pytest's rootdir
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cds_devtools.devservers import ManagedProcess, ServerStartError, free_port, http_ok, stopped_like_ctrl_c

ROOT = Path(__file__).resolve().parents[1]
HAPI_DIR = ROOT / "hapi-fhir-test"
POM = HAPI_DIR / "pom.xml"
TARGET = HAPI_DIR / "target"
JAR = TARGET / "hapi-fhir-test.jar"
#: The JVM's heap cap: the server's resident memory stays under about 1 GiB (hapi-fhir-test/README.md).
HEAP = os.environ.get("CDS_HAPI_HEAP", "768m")
BUILD_TIMEOUT_S = 1800.0  # a cold ~/.m2 downloads about 300 MB
START_TIMEOUT_S = 300.0
#: What HAPI logs when a rest-hook delivery fails (it then retries for a minute).
DELIVERY_FAILURE = "Failure handling subscription payload"


class HapiBuildError(RuntimeError):
    """Maven could not build hapi-fhir-test/; the message ends with Maven's output."""


def hapi_version() -> str:
    """The HAPI FHIR version hapi-fhir-test/pom.xml builds (`<hapi.version>`)."""
    found = re.search(r"<hapi\.version>([^<]+)</hapi\.version>", POM.read_text())
    if not found:
        raise ValueError(f"no <hapi.version> in {POM}")
    return found.group(1).strip()


def find_java() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home) / "bin" / "java", os.X_OK):
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


def find_maven() -> str | None:
    return shutil.which("mvn")


def missing_tools() -> str | None:
    """Why the server cannot be built or run here (None when java and mvn are both found)."""
    missing = [name for name, found in (("java", find_java()), ("mvn", find_maven())) if not found]
    if not missing:
        return None
    return (f"{' and '.join(missing)} not found: the HAPI FHIR tests need a JDK 17+ and Maven 3.8+ "
            "(apt-get install openjdk-17-jdk-headless maven)")


def _sources() -> list[Path]:
    return [POM, *(p for p in (HAPI_DIR / "src").rglob("*") if p.is_file())]


def jar_is_fresh() -> bool:
    """Whether the built jar (and its lib/) is newer than the POM and every source file."""
    if not JAR.is_file() or not (TARGET / "lib").is_dir():
        return False
    built = JAR.stat().st_mtime
    return all(source.stat().st_mtime <= built for source in _sources())


@contextmanager
def _build_lock() -> Iterator[None]:
    TARGET.mkdir(exist_ok=True)
    with open(TARGET / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(*, force: bool = False, log=None) -> Path:
    """The jar, built by Maven first when it is missing or older than its sources (or `force`)."""
    maven = find_maven()
    if maven is None:
        raise HapiBuildError(missing_tools())
    with _build_lock():
        if not force and jar_is_fresh():
            return JAR
        started = time.monotonic()
        print(f"==> building {JAR.relative_to(ROOT)} (HAPI FHIR {hapi_version()}, mvn package)", file=log or sys.stderr)
        env = dict(os.environ)
        java = find_java()
        if java and "JAVA_HOME" not in env:
            env["JAVA_HOME"] = str(Path(os.path.realpath(java)).parents[1])
        try:
            done = subprocess.run([maven, "-B", "-q", "-f", str(POM), "package"], cwd=HAPI_DIR, env=env,
                                  capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise HapiBuildError(f"mvn package did not finish within {BUILD_TIMEOUT_S:.0f} s") from exc
        if done.returncode != 0 or not JAR.is_file():
            output = (done.stdout + done.stderr).strip().splitlines()
            raise HapiBuildError(f"mvn package failed (exit {done.returncode}) in {HAPI_DIR}:\n" + "\n".join(output[-60:]))
        os.utime(JAR)  # newer than every source, even one touched while Maven ran
        print(f"==> built in {time.monotonic() - started:.0f} s", file=log or sys.stderr)
    return JAR


class HapiLogReader:
    """What HAPI's log (`log_path`) says about rest-hook deliveries."""

    log_path: Path

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def delivery_failures(self) -> list[str]:
        """The log lines where a rest-hook delivery failed (HAPI then retries it)."""
        return [line for line in self.log_text().splitlines() if DELIVERY_FAILURE in line]

    def deliveries(self, resource: str) -> list[str]:
        """The log lines of successful rest-hook deliveries of `resource` (e.g. ImagingStudy/is-1)."""
        pattern = re.compile(rf"Delivered \w+ rest-hook payload {re.escape(resource)}(/_history/\d+)? ")
        return [line for line in self.log_text().splitlines() if pattern.search(line)]


class HapiLog(HapiLogReader):
    """The log of a HAPI test server started elsewhere (`run` names it in CDS_TEST_HAPI_LOG)."""

    def __init__(self, path: str | Path) -> None:
        self.log_path = Path(path)


class HapiProcess(HapiLogReader, ManagedProcess):
    """A running HAPI FHIR JPA server; `.url` is its FHIR base (http://127.0.0.1:PORT/fhir)."""

    def __init__(self, *args, port: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.port = port


def start_hapi(workdir: Path, *, port: int | None = None, timeout: float = START_TIMEOUT_S,
               extra_jvm_args: tuple[str, ...] = ()) -> HapiProcess:
    """Build if needed, start the server on 127.0.0.1 and wait for /fhir/metadata; stop() ends it."""
    java = find_java()
    if java is None:
        raise ServerStartError(missing_tools())
    jar = build()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    proc = HapiProcess("hapi-fhir", [java, f"-Xmx{HEAP}", "-XX:+UseSerialGC", "-Djava.io.tmpdir=" + str(workdir),
                                     *extra_jvm_args, "-jar", jar, str(port)],
                       url=base, log_path=workdir / "hapi.log", cwd=workdir, port=port)
    proc.start_ready(lambda: http_ok(f"{base}/metadata", timeout=10), timeout=timeout, interval=1.0, stop_timeout=20)
    return proc


def resident_memory_mib(pid: int) -> float | None:
    """A process's resident memory (VmRSS) in MiB, on Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# --- command line (hapi-fhir-test/run.sh --no-docker) ------------------------------------------------------


def _run(command: list[str]) -> int:
    env = dict(os.environ)
    workdir = Path(tempfile.mkdtemp(prefix="cds-hapi-"))
    with stopped_like_ctrl_c(), ExitStack() as servers:  # `kill` stops the servers too
        if not env.get("CDS_FHIR_BASE_URL"):
            started = time.monotonic()
            hapi = servers.enter_context(start_hapi(workdir / "hapi"))
            print(f"==> HAPI FHIR {hapi_version()} at {hapi.url} (started in {time.monotonic() - started:.0f} s, "
                  f"{resident_memory_mib(hapi.pid) or 0:.0f} MiB resident; log {hapi.log_path})", file=sys.stderr)
            env["CDS_FHIR_BASE_URL"] = hapi.url
            env["CDS_TEST_HAPI_LOG"] = str(hapi.log_path)  # tests/test_e2e.py reads the deliveries from it
        if not env.get("CDS_DICOMWEB_URL"):
            from cds_devtools.devservers import start_orthanc

            orthanc = servers.enter_context(start_orthanc(workdir / "orthanc"))
            print(f"==> Orthanc at {orthanc.dicomweb_url}", file=sys.stderr)
            env["CDS_DICOMWEB_URL"] = orthanc.dicomweb_url
        started = time.monotonic()
        done = subprocess.run(command, env=env)
        if "CDS_TEST_HAPI_LOG" in env:
            print(f"==> HAPI FHIR after {time.monotonic() - started:.0f} s of {command[0]}: "
                  f"{resident_memory_mib(hapi.pid) or 0:.0f} MiB resident", file=sys.stderr)
    if done.returncode == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build and run the HAPI FHIR test server (hapi-fhir-test/).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build target/hapi-fhir-test.jar unless it is newer than its sources")
    p.add_argument("--force", action="store_true", help="build even if the jar is up to date")
    p = sub.add_parser("run", help="start HAPI (and Orthanc) unless CDS_FHIR_BASE_URL (CDS_DICOMWEB_URL) is set, "
                                   "run the command with both set, then stop them")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build(force=args.force))
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run needs a command after --")
        return _run(cmd)
    except (HapiBuildError, ServerStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
