"""The deterministic identifiers of what we write, which make a repeated job create nothing.

Every result resource gets a business identifier (`result_identifier`) and is created with
`request.ifNoneExist`, so a second transaction for the same study, task and model version
creates nothing. The Device identifier depends on model name and version only, so all
studies share one Device per model version.
"""

from __future__ import annotations

import json
import uuid

from fhir.resources.R4B.identifier import Identifier

from cds_service.core.domain import ModelRef, Task

from .common import task_value
from .conventions import DEFAULT_CONVENTIONS, Conventions

# uuid5 namespaces, fixed forever: changing them would make every repeat job look new. (The URLs
# they were made from are the identifier systems of the first releases; they no longer follow the
# canonical base, which only names the identifier system.)
_RESULT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://cds-triage.example.org/fhir/sid/triage-result")
_DEVICE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://cds-triage.example.org/fhir/sid/triage-model")


def result_identifier(study_uid: str, task: Task | str, model_version: str, kind: str,
                      conventions: Conventions = DEFAULT_CONVENTIONS) -> Identifier:
    """The deterministic business identifier of one result resource.

    Same study, task, model version and kind give the same identifier in every run, which
    is what lets `ifNoneExist` turn a repeated job into a no-op. `kind` is "report",
    "media", "provenance" or "observation-<label>". The value is a UUID (uuid5), also
    used as the entry's `urn:uuid:` fullUrl.
    """
    parts = [study_uid, task_value(task), model_version, kind]
    if not all(parts):
        raise ValueError(f"result_identifier needs study UID, task, model version and kind: {parts}")
    # json.dumps of the list: unambiguous even if a part contains a separator character.
    value = uuid.uuid5(_RESULT_NAMESPACE, json.dumps(parts))
    return Identifier(system=conventions.result_identifier_system, value=str(value))


def device_identifier(model: ModelRef, conventions: Conventions = DEFAULT_CONVENTIONS) -> Identifier:
    """The Device identifier: model name and version only, so all studies share one Device."""
    value = uuid.uuid5(_DEVICE_NAMESPACE, json.dumps([model.name, model.version]))
    return Identifier(system=conventions.device_identifier_system, value=str(value))


def full_url(identifier: Identifier) -> str:
    """The bundle fullUrl of a resource whose identifier value is one of our UUIDs."""
    return f"urn:uuid:{identifier.value}"


def identifier_query(identifier: Identifier) -> str:
    """Search string that finds a resource by identifier (for ifNoneExist or a GET)."""
    return f"identifier={identifier.system}|{identifier.value}"
