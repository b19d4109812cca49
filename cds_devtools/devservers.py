# Over 400 lines, to move out of the runtime package next (issue #19): Orthanc and FHIR launchers and the DICOM test-data factory (development only).
"""Local development servers and DICOM test data, shared by the tests and `cds-triage demo`.

- `start_orthanc()` runs an Orthanc PACS (DICOMweb plugin at `/dicom-web/`) from a config it
  writes into a work directory; `start_fhir_server()` runs the sekmet FHIR R4 server the same way.
  Both return a `ManagedProcess`: `.url`, `.log_path`, `.stop()`, usable as a context manager.
- `upload_dicom()` stores Part-10 files in Orthanc through its REST API.
- `make_dicom()` / `image_to_dicom()` build valid DICOM files in memory from pixels or an
  8-bit picture (PNG/JPEG), which is how the tests and the demo make studies.

Nothing here binds anything but 127.0.0.1, with one exception Orthanc 1.10 forces on us: it
has no bind-address option, so its HTTP server listens on all interfaces. `RemoteAccessAllowed:
false` makes it refuse every client that is not on the loopback interface, and its DICOM (C-STORE)
server stays off unless a `dicom_port` is asked for.
"""

from __future__ import annotations

import atexit
import copy
import io
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
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

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
    "make_dataset",
    "make_dicom",
    "image_to_dicom",
    "load_grey",
    "grey_to_ct",
    "dicom_bytes",
    "encoder_available",
    "SOP_CLASSES",
    "TRANSFER_SYNTAXES",
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


# --------------------------------------------------------------------------------------
# DICOM files
# --------------------------------------------------------------------------------------

SOP_CLASSES = {
    "CT": UID("1.2.840.10008.5.1.4.1.1.2"),  # CT Image Storage
    "MR": UID("1.2.840.10008.5.1.4.1.1.4"),  # MR Image Storage
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),  # Computed Radiography Image Storage
    "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),  # Digital X-Ray Image Storage - For Presentation
}

#: short names accepted by `transfer_syntax=`; pydicom encodes RLE itself, JPEG-LS needs
#: pyjpegls, JPEG 2000 needs pylibjpeg + pylibjpeg-openjpeg. JPEG baseline cannot be encoded.
TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}


def encoder_available(transfer_syntax: str) -> bool:
    """Can pydicom (with the installed plugins) compress to this transfer syntax?"""
    uid = UID(TRANSFER_SYNTAXES.get(transfer_syntax, transfer_syntax))
    if not uid.is_compressed:
        return True
    try:
        from pydicom.pixels import get_encoder

        return bool(get_encoder(uid).is_available)
    except (ValueError, NotImplementedError, ImportError):
        return False


def _ds(value: float) -> str:
    """A DS (decimal string, at most 16 characters) for value."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.9e}"[:16]
    return text


def make_dataset(
    pixels: np.ndarray,
    *,
    modality: str = "CT",
    body_part: str = "",
    series_description: str = "",
    study_description: str = "",
    patient_id: str = "CDS-TEST-0001",
    patient_name: str = "Test^Patient",
    patient_birth_date: str = "",
    patient_sex: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    accession_number: str = "",
    study_id: str = "1",
    study_datetime: datetime | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    photometric: str = "MONOCHROME2",
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
    window_center: float | None = None,
    window_width: float | None = None,
    pixel_spacing: tuple[float, float] = (0.5, 0.5),
    slice_thickness: float | None = 5.0,
    slice_location: float | None = None,
    bits_stored: int | None = None,
    manufacturer: str = "cds-triage devservers",
    institution: str = "",
    referring_physician: str = "",
    transfer_syntax: str = "explicit",
    extra: Mapping[str, Any] | None = None,
) -> Dataset:
    """A single-frame greyscale DICOM image (Part-10 ready, with file meta) from stored pixels.

    `pixels` are the *stored* values (2-D uint8, uint16 or int16); for CT pass
    `rescale_slope`/`rescale_intercept` (defaults 1 / -1024). UIDs are generated when missing.
    `transfer_syntax` is one of TRANSFER_SYNTAXES ("explicit", "rle", "jpegls", "jpeg2000")
    or a UID; compressed ones are encoded losslessly by pydicom. `extra` sets any further
    attributes by keyword, e.g. `{"ViewPosition": "PA"}`.
    """
    modality = modality.upper()
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality {modality!r} not supported; expected one of {sorted(SOP_CLASSES)}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"pixels must be a 2-D greyscale array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        bits_allocated, signed = 8, False
    elif arr.dtype in (np.uint16, np.int16):
        bits_allocated, signed = 16, arr.dtype == np.int16
    else:
        raise ValueError(f"pixels dtype must be uint8, uint16 or int16, got {arr.dtype}")
    if bits_stored is None:
        bits_stored = bits_allocated
        if bits_allocated == 16 and not signed and arr.size and int(arr.max()) < 4096:
            bits_stored = 12  # the usual for CT/MR/CR; keeps JPEG-LS/J2K happy
    arr = np.ascontiguousarray(arr)

    when = study_datetime or datetime.now()
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    sop_instance_uid = sop_instance_uid or generate_uid()
    sop_class = SOP_CLASSES[modality]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CDS_TRIAGE_DEV"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if modality == "CT" else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    if institution:
        ds.InstitutionName = institution
    ds.ReferringPhysicianName = referring_physician
    if study_description:
        ds.StudyDescription = study_description
    if series_description:
        ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex
    if body_part:
        ds.BodyPartExamined = body_part.upper()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study_id
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    if modality in ("CT", "MR"):
        ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid(entropy_srcs=[study_uid, "frame"])
        ds.PositionReferenceIndicator = ""
        z = float(slice_location if slice_location is not None else (instance_number - 1) * (slice_thickness or 5.0))
        ds.ImagePositionPatient = [_ds(-pixel_spacing[1] * arr.shape[1] / 2), _ds(-pixel_spacing[0] * arr.shape[0] / 2), _ds(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _ds(z)
        if slice_thickness is not None:
            ds.SliceThickness = _ds(slice_thickness)
    else:
        ds.PatientOrientation = ""
    if modality == "CT":
        ds.KVP = ""
        ds.AcquisitionNumber = 1
    if modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if modality == "CT" or rescale_slope is not None or rescale_intercept is not None:
        ds.RescaleIntercept = _ds(-1024.0 if rescale_intercept is None else rescale_intercept)
        ds.RescaleSlope = _ds(1.0 if rescale_slope is None else rescale_slope)
        ds.RescaleType = "HU" if modality == "CT" else "US"
    if window_center is not None and window_width is not None:
        ds.WindowCenter = _ds(window_center)
        ds.WindowWidth = _ds(window_width)
    ds.PixelData = arr.tobytes()
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)

    ts = UID(TRANSFER_SYNTAXES.get(transfer_syntax, transfer_syntax))
    if ts.is_compressed:
        if not encoder_available(ts):
            raise RuntimeError(f"pydicom cannot encode {ts.name} here: a plugin is missing")
        ds.compress(ts, arr, generate_instance_uid=False)
    elif ts != ExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ts  # e.g. Implicit VR Little Endian; dcmwrite follows it
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part-10 file (preamble, DICM, file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_dicom(pixels: np.ndarray, **kwargs: Any) -> bytes:
    """`make_dataset(pixels, **kwargs)` as Part-10 bytes (see make_dataset for the options)."""
    return dicom_bytes(make_dataset(pixels, **kwargs))


def load_grey(source: str | Path | bytes | np.ndarray | Any) -> np.ndarray:
    """A picture (PNG/JPEG path or bytes, PIL image, or array) as a 2-D uint8 grey image.
    RGB/RGBA go through PIL's luminance conversion ("L"), as training does."""
    from PIL import Image

    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 3:
            arr = np.asarray(Image.fromarray(arr.astype(np.uint8)).convert("L"))
        if arr.dtype != np.uint8:
            if arr.min() < 0 or arr.max() > 255:
                raise ValueError("array values must be in 0..255 for an 8-bit grey image")
            arr = np.rint(arr).astype(np.uint8)
        return arr
    if isinstance(source, (bytes, bytearray)):
        img = Image.open(io.BytesIO(source))
    elif isinstance(source, (str, Path)):
        img = Image.open(source)
    else:
        img = source  # a PIL image
    return np.asarray(img.convert("L"), dtype=np.uint8)


def grey_to_ct(
    grey: np.ndarray, window: tuple[float, float] = (40.0, 80.0), *, exact: bool = False
) -> tuple[np.ndarray, float, float]:
    """8-bit windowed grey levels back to CT stored values: returns (stored uint16, slope, intercept).

    HU = grey / 255 * width + (center - width / 2); for the brain window 40/80 that is
    HU = grey / 255 * 80. Default: integer HU stored as HU + 1024 with slope 1 / intercept -1024
    (what real scanners write); windowing at the same window then gives the grey image back
    to within 0.5 HU = 0.5 * 255 / width grey levels (1.6 levels for width 80).
    `exact=True` uses slope width/255 instead, so windowing gives the grey levels back exactly
    (unusual for CT but valid DICOM).
    """
    center, width = window
    lo = center - width / 2.0
    g = np.asarray(grey, dtype=np.float64)
    if exact:
        slope = width / 255.0
        offset = int(round((lo + 1024.0) / slope))  # stored value of grey level 0
        intercept = lo - offset * slope
        slope, intercept = float(_ds(slope)), float(_ds(intercept))
        stored = np.rint(g + offset)
    else:
        slope, intercept = 1.0, -1024.0
        stored = np.rint(g / 255.0 * width + lo) + 1024.0
    if stored.min() < 0 or stored.max() > 4095:
        raise ValueError("window maps outside the 12-bit stored range; choose another window")
    return stored.astype(np.uint16), slope, intercept


def image_to_dicom(
    image: str | Path | bytes | np.ndarray | Any,
    *,
    modality: str = "CT",
    window: tuple[float, float] = (40.0, 80.0),
    exact_hu: bool = False,
    **kwargs: Any,
) -> bytes:
    """An 8-bit picture (PNG/JPEG path/bytes, PIL image or uint8 array) as a DICOM file.

    CT: the picture is taken as windowed at `window` (default brain 40/80) and turned back into
    Hounsfield units (see grey_to_ct), with WindowCenter/WindowWidth set to that window.
    MR/CR/DX: the grey levels are stored as they are (8-bit). Other options go to make_dataset.
    """
    grey = load_grey(image)
    if modality.upper() == "CT":
        stored, slope, intercept = grey_to_ct(grey, window, exact=exact_hu)
        kwargs.setdefault("window_center", window[0])
        kwargs.setdefault("window_width", window[1])
        return make_dicom(stored, modality="CT", rescale_slope=slope, rescale_intercept=intercept, **kwargs)
    return make_dicom(grey, modality=modality, **kwargs)
