"""Raising ServiceRequest.priority on the EHR's own resource, and reading back what the AI changed."""

from __future__ import annotations

import copy
from typing import Any

from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import ValidationError

from cds_service.core.domain import Priority
from cds_service.core.errors import InvalidResourceError

from . import codes
from .conventions import DEFAULT_CONVENTIONS, Conventions


def with_priority(service_request: dict[str, Any], priority: Priority, *, note: str | None = None,
                  conventions: Conventions = DEFAULT_CONVENTIONS) -> dict[str, Any]:
    """A copy of a ServiceRequest (JSON dict) with `priority` set, checked against R4B.

    Works on the dict, not on a re-serialised model, so everything else the EHR stored
    (extensions, meta.versionId for If-Match) goes back unchanged. `note` is appended to
    ServiceRequest.note, so whoever opens the order sees that the AI raised it and from what;
    the note carries the change itself as data too (conventions.priority_change_extension: from, to), which
    is what readers use (`ai_priority_change`), never the note's words.
    """
    if not isinstance(service_request, dict) or service_request.get("resourceType") != "ServiceRequest":
        raise InvalidResourceError("expected a ServiceRequest resource")
    updated = copy.deepcopy(service_request)
    updated["priority"] = Priority(priority).value
    if note:
        change = [{"url": codes.PRIORITY_CHANGE_TO, "valueCode": updated["priority"]}]
        before = service_request.get("priority")
        if isinstance(before, str) and before:
            change.insert(0, {"url": codes.PRIORITY_CHANGE_FROM, "valueCode": before})
        updated["note"] = [*(updated.get("note") or []), {
            "extension": [{"url": conventions.priority_change_extension, "extension": change}], "text": note}]
    try:
        ServiceRequest.model_validate(updated)
    except ValidationError as exc:
        raise InvalidResourceError(
            f"ServiceRequest/{service_request.get('id', '?')} is not valid R4B: {exc}"
        ) from exc
    return updated


def ai_priority_change(service_request: Any, conventions: Conventions = DEFAULT_CONVENTIONS) -> tuple[str | None, str] | None:
    """The newest priority change the AI recorded on this order, as (from, to); from is None when
    the order had no priority. None when the AI never raised it. Read from the note's extension."""
    notes = service_request.get("note") if isinstance(service_request, dict) else None
    for note in reversed(notes or []):
        for extension in (note.get("extension") or []) if isinstance(note, dict) else []:
            if not isinstance(extension, dict) or extension.get("url") != conventions.priority_change_extension:
                continue
            parts = {part.get("url"): part.get("valueCode") for part in extension.get("extension") or []
                     if isinstance(part, dict)}
            to = parts.get(codes.PRIORITY_CHANGE_TO)
            if isinstance(to, str) and to:
                before = parts.get(codes.PRIORITY_CHANGE_FROM)
                return (before if isinstance(before, str) and before else None), to
    return None
