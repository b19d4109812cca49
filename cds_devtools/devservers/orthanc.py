"""Orthanc (the Debian package and its DICOMweb plugin) run from a config we write, and `upload_dicom`
(Part-10 files stored through its REST API).

Orthanc 1.10 has no bind-address option, so its HTTP server listens on all interfaces:
`RemoteAccessAllowed: false` makes it refuse every client that is not on the loopback interface,
and its DICOM (C-STORE) server stays off unless a `dicom_port` is asked for.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import httpx
from pydicom.dataset import Dataset

from cds_devtools.dicom_data import dicom_bytes

from .process import LOOPBACK, ManagedProcess, ServerStartError, deep_merge, free_port, http_ok

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
    config = deep_merge(config, extra_config)
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
    proc.start_ready(lambda: http_ok(f"{url}/system"), timeout=timeout)
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
