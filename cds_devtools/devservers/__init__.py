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

In three modules: process.py (`ManagedProcess`, free ports, readiness checks, stopping on any
exit), orthanc.py and fhir_server.py; everything is importable from here.
"""

from .fhir_server import FhirServerProcess, fhir_settings, find_sekmet, start_fhir_server
from .orthanc import OrthancProcess, find_dicomweb_plugin, find_orthanc, orthanc_config, start_orthanc, upload_dicom
from .process import LOOPBACK, ManagedProcess, ServerStartError, free_port, http_ok, port_open, stopped_like_ctrl_c

__all__ = [
    "LOOPBACK",
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
