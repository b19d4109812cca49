# Over 400 lines on purpose: the process handling both development servers share (start, wait, log, stop on any exit) read with its two users, Orthanc and the FHIR server.
"""Local development servers, shared by the tests and `cds-triage demo`.

- `start_orthanc()` runs an Orthanc PACS (DICOMweb plugin at `/dicom-web/`) from a config it
  writes into a work directory; `start_fhir_server()` runs the sekmet FHIR R4 server the same way.
  Both return a `ManagedProcess`: `.url`, `.log_path`, `.stop()`, usable as a context manager.
- `upload_dicom()` stores Part-10 files in Orthanc through its REST API.

The DICOM test data (`make_dataset`, `make_dicom`, `image_to_dicom`…) is in dicom_data.py.

Nothing here binds anything but 127.0.0.1, with one exception Orthanc 1.10 forces on us: it
has no bind-address option, so its HTTP server listens on all interfaces. `RemoteAccessAllowed:
false` makes it refuse every client that is not on the loopback interface, and its DICOM (C-STORE)
server stays off unless a `dicom_port` is asked for.
"""

from __future__ import annotations

import atexit
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import httpx
from pydicom.dataset import Dataset

from cds_devtools.dicom_data import dicom_bytes

__all__ = [
    "ServerStartError",
    "ManagedProcess",
    "stopped_like_ctrl_c",
    "OrthancProcess",
    "FhirServerProcess",
    "free_port",
    "port_open",
    "http_ok",
    "orthanc_config",
    "fhir_settings",
    "find_orthanc",
    "find_dicomweb_plugin",
    "find_sekmet",
    "start_orthanc",
    "start_fhir_server",
    "upload_dicom",
]

LOOPBACK = "127.0.0.1"

# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------


class ServerStartError(RuntimeError):
    """A dev server exited or did not become ready; the message ends with its log tail."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True if GET url answers 200 (no proxies from the environment: loopback only)."""
    try:
        return httpx.get(url, timeout=timeout, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


_RUNNING: set["ManagedProcess"] = set()
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _stop_leftovers() -> None:  # a crashed test session must not leave servers behind
    with _RUNNING_LOCK:
        leftovers = list(_RUNNING)
    for proc in leftovers:
        proc.stop(timeout=5)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: Any) -> None:
    for stop in STOP_SIGNALS:  # the clean-up this starts is not cut short by a second signal
        signal.signal(stop, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def stopped_like_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP (`kill`, a process manager, a closed terminal) raise KeyboardInterrupt
    in the main thread, as Ctrl-C does, so the `finally` that stops the servers runs: without
    it Python dies at once and Orthanc, the FHIR server and the service outlive the script."""
    previous = {stop: signal.signal(stop, _interrupt) for stop in STOP_SIGNALS}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


class ManagedProcess:
    """A child process with a log file, a URL and a clean `stop()`.

    stdout and stderr go to `log_path`. Use as a context manager, or call `stop()`; processes
    still running when the interpreter exits are stopped too.
    """

    def __init__(
        self,
        name: str,
        cmd: Sequence[str | os.PathLike[str]],
        *,
        url: str,
        log_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.cmd = [str(c) for c in cmd]
        self.url = url
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}" if self.proc else "not started"
        return f"<{type(self).__name__} {self.name} {self.url} pid={self.pid} {state}>"

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> "ManagedProcess":
        if self.proc is not None:
            raise RuntimeError(f"{self.name} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop the child
            )
        except OSError as exc:
            self._log_file.close()
            raise ServerStartError(f"{self.name}: cannot run {self.cmd[0]}: {exc}") from exc
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> "ManagedProcess":
        """Poll `check()` until it returns True. Raises ServerStartError (with the log tail)
        if the process exits first or `timeout` seconds pass; exceptions from `check` count
        as "not ready yet"."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {self.proc.returncode} during start-up "
                    f"(command: {' '.join(self.cmd)}).\n--- last lines of {self.log_path} ---\n{self.log_tail()}"
                )
            try:
                if check():
                    return self
                last_error = None
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last_error = exc
            if time.monotonic() >= deadline:
                why = f" (last check error: {last_error!r})" if last_error else ""
                raise ServerStartError(
                    f"{self.name} did not become ready within {timeout:.0f}s{why}.\n"
                    f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
                )
            time.sleep(interval)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate (SIGTERM), then kill after `timeout` seconds. Returns the exit code.
        Safe to call more than once."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.close()
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        return proc.returncode if proc is not None else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                tail = deque(fh, maxlen=lines)
        except OSError:
            return "(no log)"
        return b"".join(tail).decode("utf-8", errors="replace").rstrip() or "(log is empty)"

    def __enter__(self) -> "ManagedProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------------------

_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")


def find_orthanc() -> Path | None:
    """The Orthanc executable: $ORTHANC_BIN, `Orthanc` on PATH, or /usr/sbin/Orthanc (Debian)."""
    env = os.environ.get("ORTHANC_BIN")
    if env:
        return Path(env) if Path(env).exists() else None
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin:/usr/local/bin")
    return Path(found) if found else None


def find_dicomweb_plugin() -> Path | None:
    """libOrthancDicomWeb.so: $ORTHANC_DICOMWEB_PLUGIN or the Debian/Ubuntu plugin folders."""
    env = os.environ.get("ORTHANC_DICOMWEB_PLUGIN")
    if env:
        return Path(env) if Path(env).exists() else None
    for folder in _PLUGIN_DIRS:
        candidate = Path(folder) / "libOrthancDicomWeb.so"
        if candidate.exists():
            return candidate
    return None


class OrthancProcess(ManagedProcess):
    """A running Orthanc: `.url` (REST root), `.dicomweb_url`, `.config_path`."""

    def __init__(self, *args: Any, http_port: int, dicom_port: int | None, config_path: Path, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.http_port = http_port
        self.dicom_port = dicom_port  # None: the DICOM server is disabled
        self.config_path = config_path

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"


def orthanc_config(
    workdir: Path,
    *,
    http_port: int,
    dicom_port: int | None = None,
    lua_scripts: Iterable[Path] = (),
    extra_config: Mapping[str, Any] | None = None,
    plugin: Path | None = None,
) -> dict[str, Any]:
    """The JSON config `start_orthanc` writes (exposed so the demo can print or tweak it)."""
    plugin = plugin or find_dicomweb_plugin()
    config: dict[str, Any] = {
        "Name": "cds-triage-dev",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "TemporaryDirectory": str(workdir / "tmp"),
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        # Orthanc 1.10 has no HttpBindAddress: it listens on all interfaces, and this makes it
        # answer only clients on the loopback interface.
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpDescribeErrors": True,
        "HttpCompressionEnabled": True,
        "HttpTimeout": 30,
        "KeepAlive": True,
        "OrthancExplorerEnabled": True,
        "WebDavEnabled": False,
        "ExecuteLuaEnabled": False,
        "DicomServerEnabled": dicom_port is not None,
        "DicomPort": dicom_port if dicom_port is not None else 4242,
        "DicomAet": "CDSDEV",
        "DicomCheckCalledAet": False,
        "DicomModalities": {},
        "OrthancPeers": {},
        "ConcurrentJobs": 2,
        "SaveJobs": False,
        "StableAge": 60,
        "LuaScripts": [str(Path(p).resolve()) for p in lua_scripts],
        "Plugins": [str(plugin)] if plugin else [],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Ssl": False,
        },
    }
    config = _deep_merge(config, extra_config)
    if "Host" not in config["DicomWeb"]:
        # Without it the plugin 1.7 writes RetrieveURL (0008,1190) in QIDO answers without the port.
        config["DicomWeb"]["Host"] = f"{LOOPBACK}:{config['HttpPort']}"
    return config


def start_orthanc(
    workdir: Path,
    *,
    http_port: int | None = None,
    dicom_port: int | None = None,
    lua_scripts: Iterable[Path] = (),
    extra_config: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
) -> OrthancProcess:
    """Start Orthanc with storage in `workdir`; returns once `GET /system` answers.

    `http_port` defaults to a free port. The DICOM server is off unless `dicom_port` is given
    (it would listen on all interfaces). `extra_config` is merged over the generated config,
    e.g. `{"StableAge": 2}`.
    """
    binary = find_orthanc()
    if binary is None:
        raise ServerStartError("Orthanc executable not found (install the `orthanc` package or set ORTHANC_BIN)")
    plugin = find_dicomweb_plugin()
    if plugin is None:
        raise ServerStartError(
            "Orthanc DICOMweb plugin libOrthancDicomWeb.so not found (install `orthanc-dicomweb` "
            "or set ORTHANC_DICOMWEB_PLUGIN)"
        )
    workdir = Path(workdir).resolve()
    (workdir / "storage").mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    http_port = http_port or free_port()
    config = orthanc_config(
        workdir,
        http_port=http_port,
        dicom_port=dicom_port,
        lua_scripts=lua_scripts,
        extra_config=extra_config,
        plugin=plugin,
    )
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    url = f"http://{LOOPBACK}:{config['HttpPort']}"
    proc = OrthancProcess(
        "orthanc",
        [binary, config_path],
        url=url,
        log_path=workdir / "orthanc.log",
        cwd=workdir,
        http_port=int(config["HttpPort"]),
        dicom_port=dicom_port,
        config_path=config_path,
    )
    proc.start()
    try:
        proc.wait_ready(lambda: http_ok(f"{url}/system"), timeout=timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


def upload_dicom(orthanc_url: str, files: Iterable[Path | str | bytes | Dataset], *, timeout: float = 60.0) -> list[str]:
    """Store DICOM files in Orthanc (`POST /instances`); returns the Orthanc instance ids.

    Accepts paths, Part-10 bytes or pydicom Datasets. Raises RuntimeError if Orthanc refuses
    a file; an instance that is already stored counts as success.
    """
    ids: list[str] = []
    with httpx.Client(base_url=orthanc_url.rstrip("/"), timeout=timeout, trust_env=False) as client:
        for item in files:
            if isinstance(item, Dataset):
                data, label = dicom_bytes(item), f"dataset {item.get('SOPInstanceUID', '?')}"
            elif isinstance(item, (bytes, bytearray)):
                data, label = bytes(item), f"{len(item)} bytes"
            else:
                data, label = Path(item).read_bytes(), str(item)
            try:
                r = client.post("/instances", content=data, headers={"Content-Type": "application/dicom"})
            except httpx.HTTPError as exc:
                raise RuntimeError(f"upload of {label} to {orthanc_url} failed: {exc!r}") from exc
            if r.status_code != 200:
                raise RuntimeError(f"Orthanc refused {label}: HTTP {r.status_code} {r.text[:500]}")
            body = r.json()
            if isinstance(body, list):  # a ZIP upload answers with a list; we send single files
                body = body[0] if body else {}
            if body.get("Status") not in ("Success", "AlreadyStored"):
                raise RuntimeError(f"Orthanc did not store {label}: {body}")
            ids.append(body["ID"])
    return ids


# --------------------------------------------------------------------------------------
# sekmet FHIR server
# --------------------------------------------------------------------------------------


def find_sekmet() -> Path | None:
    """The `sekmet` executable next to the running Python (same virtualenv), or on PATH."""
    candidate = Path(sys.executable).parent / "sekmet"
    if candidate.exists():
        return candidate
    found = shutil.which("sekmet")
    return Path(found) if found else None


class FhirServerProcess(ManagedProcess):
    """A running sekmet: `.url` is the FHIR base (…/fhir), `.root_url` the server root
    (SMART token endpoint at `{root_url}/auth/token`)."""

    def __init__(self, *args: Any, port: int, settings_path: Path, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.port = port
        self.settings_path = settings_path

    @property
    def root_url(self) -> str:
        return self.url.removesuffix("/fhir")


# Environment variables sekmet reads over settings.yaml; a stray one would point the server elsewhere.
_SEKMET_ENV = ("SEKMET_CONFIG", "SEKMET_BASE_URL", "SEKMET_DB", "SEKMET_PUBLIC_URL", "SEKMET_PORT")


def fhir_settings(workdir: Path, *, port: int, extra_settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The sekmet settings `start_fhir_server` writes. sekmet always serves FHIR at /fhir."""
    settings: dict[str, Any] = {
        "base_url": f"http://{LOOPBACK}:{port}/fhir",
        "host": LOOPBACK,
        "port": port,
        "data_dir": str(workdir / "data"),
        "own_private_key_path": str(workdir / "keys" / "sekmet_private.pem"),
        "simulator": {"enabled": False},  # no fake lab/RIS reacting to our writes
        "log_inbound": False,  # no per-request traffic log in SQLite (faster, smaller)
        "validation": {"inbound": "strict"},  # 400 + OperationOutcome on structurally invalid resources
        "subscriptions": {"notify_method": "put-resource", "retries": 3},
        "server_auth": {"types": ["none"]},
    }
    return _deep_merge(settings, extra_settings)


def start_fhir_server(
    workdir: Path,
    *,
    port: int | None = None,
    extra_settings: Mapping[str, Any] | None = None,
    timeout: float = 60.0,
) -> FhirServerProcess:
    """Start sekmet (`sekmet serve -c settings.yaml`) with its SQLite data in `workdir`;
    returns once `GET {base}/metadata` answers 200. `extra_settings` is merged over the
    generated settings (e.g. `{"server_auth": {"types": ["smart"], "smart_clients": [...]}}`)."""
    import yaml  # pyyaml comes with sekmet and the project

    binary = find_sekmet()
    if binary is None:
        raise ServerStartError(
            f"sekmet executable not found next to {sys.executable} (pip install sekmet-fhir==0.1.1)"
        )
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    settings = fhir_settings(workdir, port=port, extra_settings=extra_settings)
    settings_path = workdir / "settings.yaml"
    settings_path.write_text(yaml.safe_dump(settings, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in _SEKMET_ENV}
    base = settings["base_url"].rstrip("/")
    proc = FhirServerProcess(
        "sekmet",
        [binary, "serve", "-c", settings_path],
        url=base,
        log_path=workdir / "sekmet.log",
        cwd=workdir,
        env=env,
        port=int(settings["port"]),
        settings_path=settings_path,
    )
    proc.start()
    try:
        proc.wait_ready(lambda: http_ok(f"{base}/metadata"), timeout=timeout)
    except BaseException:
        proc.stop()
        raise
    return proc
