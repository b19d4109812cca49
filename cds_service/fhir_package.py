"""`cds-triage fhir-package`: our FHIR definitions as an NPM-style FHIR package a validating server loads.

The package (fhir_mappings/definitions.py) holds the CodeSystems, ValueSets, extensions and profiles
of what the service writes, under the settings' canonical base (CDS_FHIR_CANONICAL_BASE) and AI
security label (CDS_AI_SECURITY_LABEL): a site that changes either writes its own package. Written as
a `.tgz` (what HAPI's `implementationguides` setting and the IG tools load) or, for a path that does
not end in .tgz, as a folder holding `package/` (to PUT each resource; docs/fhir.md says how).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from fhir_mappings.conventions import Conventions
from fhir_mappings.definitions import PACKAGE_NAME, package_files

from cds_service.core.settings import Settings


def default_package_path(version: str) -> Path:
    return Path(f"{PACKAGE_NAME}-{version}.tgz")


def write_fhir_package(settings: Settings, output: Path, version: str) -> tuple[Path, int]:
    """Write the package to `output` (.tgz, else a folder); the path and the number of resources."""
    files = package_files(Conventions.from_settings(settings), version)
    output = Path(output)
    if output.name.endswith(".tgz"):
        output.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(output, "w:gz") as archive:
            for name, content in files.items():
                data = json.dumps(content, indent=2, ensure_ascii=False).encode()
                info = tarfile.TarInfo(f"package/{name}")
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
    else:
        folder = output / "package"
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return output, len(files) - 2  # less package.json and .index.json
