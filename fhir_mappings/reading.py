"""Reading what the EHR sends: FHIR ids and references, dateTimes, an ImagingStudy's Study Instance UID.

The one rule for each: every place an id meets a URL uses `is_fhir_id`; every reader of a study UID
uses `study_uid_from_imaging_study`.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from cds_service.core.errors import InvalidResourceError

from . import codes

# A DICOM UID: dot-separated numbers without leading zeros, at most 64 characters (PS3.5 9.1).
_DICOM_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def is_fhir_id(text: object) -> bool:
    """A FHIR R4 id (1-64 of A-Z a-z 0-9 - .) that is also safe as a URL path segment.

    "." and ".." match the FHIR pattern but are path segments: `ImagingStudy/..` reads the
    server's base. The one rule for every place an id meets a URL.
    """
    return isinstance(text, str) and bool(_FHIR_ID.fullmatch(text)) and text not in (".", "..")


def reference_id(reference: str | None, resource_type: str) -> str | None:
    """`ServiceRequest/123` (or a full URL ending so, with or without `/_history/n`) → `123`;
    anything else → None."""
    if not reference:
        return None
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == resource_type and is_fhir_id(parts[-1]):
        return parts[-1]
    return None


def parse_fhir_datetime(value: Any) -> datetime | None:
    """A FHIR dateTime/instant as an aware datetime (UTC when it has no offset); None if absent or malformed."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


#: A FHIR dateTime: a year, a month, a day, or a time with seconds and a zone (FHIR R4 datatypes).
_FHIR_DATETIME = re.compile(r"[0-9]{4}(-[0-9]{2}(-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2}))?)?)?")


def fhir_datetime(value: Any) -> str | None:
    """`value` when it is a FHIR dateTime (any precision), else None: a time passed on as the EHR wrote it."""
    return value if isinstance(value, str) and _FHIR_DATETIME.fullmatch(value) else None


def study_uid_from_imaging_study(resource: dict[str, Any]) -> str:
    """The DICOM Study Instance UID of an ImagingStudy (JSON dict).

    R4 keeps it in identifier[system=urn:dicom:uid], value "urn:oid:<uid>". A bare UID
    without the "urn:oid:" prefix is accepted too (some bridges write it that way); any
    other shape raises InvalidResourceError, because without the UID we cannot find the
    pixels in the PACS.
    """
    if not isinstance(resource, dict) or resource.get("resourceType") != "ImagingStudy":
        kind = resource.get("resourceType") if isinstance(resource, dict) else type(resource).__name__
        raise InvalidResourceError(f"expected an ImagingStudy resource, got {kind!r}")
    identifiers = resource.get("identifier") or []
    if not isinstance(identifiers, list):
        raise InvalidResourceError("ImagingStudy.identifier must be a list")
    values = {
        str(ident.get("value", ""))
        for ident in identifiers
        if isinstance(ident, dict) and ident.get("system") == codes.DICOM_UID_SYSTEM
    }
    where = f"ImagingStudy/{resource.get('id', '?')}"
    if not values:
        raise InvalidResourceError(
            f"{where} has no identifier with system {codes.DICOM_UID_SYSTEM} (Study Instance UID)"
        )
    if len(values) > 1:
        raise InvalidResourceError(f"{where} has several Study Instance UIDs: {sorted(values)}")
    value = values.pop().strip()
    uid = value[len(codes.URN_OID_PREFIX):] if value.startswith(codes.URN_OID_PREFIX) else value
    if len(uid) > 64 or not _DICOM_UID.match(uid):
        raise InvalidResourceError(f"{where} has a malformed Study Instance UID: {value!r}")
    return uid
