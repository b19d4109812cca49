"""The sekmet FHIR R4 server (PyPI `sekmet-fhir`, SQLite) run from settings we write."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

from .process import LOOPBACK, ManagedProcess, ServerStartError, deep_merge, free_port, http_ok

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
    return deep_merge(settings, extra_settings)


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
    proc.start_ready(lambda: http_ok(f"{base}/metadata"), timeout=timeout)
    return proc
