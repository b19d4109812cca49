"""The bad-input corpus as one table: what is sent, where, and the clear failure it must give.

Four doors into the service, four kinds of row:
- `HttpCase`: a request to the running service (gunicorn), answered with an error status and
  an OperationOutcome whose diagnostics contain `says`;
- `EhrCase`: an ImagingStudy in the FHIR server that triage cannot use; its job ends
  `failed` with a reason containing `says`;
- `PacsCase`: a malformed DICOM object that Orthanc stores; the job ends `failed` (`says`);
- `FileCase`: bytes no PACS stores (Orthanc refuses them); `cds-triage triage` on the file
  prints a clear error (`says`) and exits 1.

Every row is distinct. The DICOM objects are made at test time (dicom_cases.py), a few KB each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from . import dicom_cases as dicom

NOTIFY = "/fhir-notify"
HOOK = "/cds-services/imagingstudy-create"
SECRET_HEADER = "X-CDS-Subscription-Secret"


@dataclass(frozen=True)
class HttpCase:
    name: str
    method: str
    path: str
    status: int
    says: str
    body: bytes | None = None
    json_body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    with_secret: bool = True


@dataclass(frozen=True)
class EhrCase:
    name: str
    imaging_study: Callable[[str, str], dict]  # (patient id, study uid) -> ImagingStudy JSON
    says: str


@dataclass(frozen=True)
class PacsCase:
    name: str
    make: Callable[[str], bytes | list[bytes]]  # study uid -> the Part-10 object(s) of one series
    says: str


@dataclass(frozen=True)
class FileCase:
    name: str
    make: Callable[[], bytes]
    says: str


def _hook(**overrides: Any) -> dict:
    call = {"hook": "imagingstudy-create", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"patientId": "p1", "imagingStudyId": "s1"}}
    return {k: v for k, v in (call | overrides).items() if v is not None}


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


HTTP_CASES = [
    HttpCase("notification not JSON", "POST", NOTIFY, 400, "not valid JSON", body=b"{not json"),
    HttpCase("notification XML", "POST", NOTIFY, 400, "not valid JSON", body=b"<ImagingStudy xmlns='http://hl7.org/fhir'/>",
             headers={"Content-Type": "application/fhir+xml"}),
    HttpCase("notification not UTF-8", "POST", NOTIFY, 400, "not valid JSON", body=b'{"resourceType": "\xff\xfe"}'),
    HttpCase("notification nested 100000 deep", "POST", NOTIFY, 400, "nested deeper", body=_deep(100_000)),
    HttpCase("notification JSON array", "POST", NOTIFY, 400, "not a FHIR resource", json_body=[1, 2]),
    HttpCase("notification wrong resourceType", "POST", NOTIFY, 400, "resourceType 'Patient'",
             json_body={"resourceType": "Patient", "id": "p"}),
    HttpCase("notification ImagingStudy without id", "POST", NOTIFY, 400, "has no id",
             json_body={"resourceType": "ImagingStudy", "status": "available"}),
    HttpCase("notification id that is not a FHIR id", "POST", NOTIFY, 400, "not a valid FHIR id",
             json_body={"resourceType": "ImagingStudy", "id": "../../etc/passwd"}),
    HttpCase("notification id of 200 characters", "PUT", f"{NOTIFY}/ImagingStudy/{'x' * 200}", 400, "not a valid FHIR id"),
    HttpCase("notification path names a Patient", "PUT", f"{NOTIFY}/Patient/1", 400, "not ImagingStudy"),
    HttpCase("notification with a wrong secret", "POST", NOTIFY, 401, "subscription secret",
             json_body={"resourceType": "ImagingStudy", "id": "a"}, headers={SECRET_HEADER: "guess"}, with_secret=False),
    HttpCase("notification without a secret", "POST", NOTIFY, 401, "subscription secret",
             json_body={"resourceType": "ImagingStudy", "id": "a"}, with_secret=False),
    HttpCase("notification over the body limit", "POST", NOTIFY, 413, "CDS_MAX_BODY_BYTES",
             body=b'{"x": "' + b"a" * 3_000_000 + b'"}'),
    HttpCase("notification by GET", "GET", NOTIFY, 405, ""),
    HttpCase("hook: unknown hook", "POST", HOOK, 400, "handles hook", json_body=_hook(hook="patient-explode")),
    HttpCase("hook: unknown CDS service", "POST", "/cds-services/no-such-service", 404, "no CDS service",
             json_body=_hook()),
    HttpCase("hook: hookInstance not a UUID", "POST", HOOK, 400, "hookInstance", json_body=_hook(hookInstance="42")),
    HttpCase("hook: context without imagingStudyId", "POST", HOOK, 400, "imagingStudyId",
             json_body=_hook(context={"patientId": "p1"})),
    HttpCase("hook: body not an object", "POST", HOOK, 400, "JSON object", json_body=["imagingstudy-create"]),
    HttpCase("hook: invalid JSON", "POST", HOOK, 400, "not valid JSON", body=b'{"hook": ',
             headers={"Content-Type": "application/json"}),
    HttpCase("jobs: limit not a number", "GET", "/jobs?limit=lots", 400, "whole number"),
    HttpCase("jobs: unknown status", "GET", "/jobs?status=exploded", 400, "unknown status"),
    HttpCase("jobs: unknown job", "GET", "/jobs/no-such-job", 404, "no job"),
    HttpCase("jobs: requeue of an unknown job", "POST", "/jobs/no-such-job/requeue", 404, "no job"),
    HttpCase("audit: limit not a number", "GET", "/audit?limit=-x", 400, "whole number"),
]


def _study(patient_id: str, identifiers: list[dict], **extra: Any) -> dict:
    return {"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": f"Patient/{patient_id}"},
            "identifier": identifiers, **extra}


def _uid(value: str) -> dict:
    return {"system": "urn:dicom:uid", "value": value}


EHR_CASES = [
    EhrCase("ImagingStudy with a malformed Study UID",
            lambda patient, uid: _study(patient, [_uid("urn:oid:1.2.abc")]), "malformed Study Instance UID"),
    EhrCase("ImagingStudy with two Study UIDs",
            lambda patient, uid: _study(patient, [_uid(f"urn:oid:{uid}"), _uid("urn:oid:1.2.3")]), "several Study Instance UIDs"),
    EhrCase("ImagingStudy whose subject is a Group",
            lambda patient, uid: _study(patient, [_uid(f"urn:oid:{uid}")]) | {"subject": {"reference": "Group/g1"}},
            "no Patient subject"),
]

PACS_CASES = [
    PacsCase("header claims 65535 x 65535 pixels", dicom.huge_dimensions, "CDS_MAX_SERIES_BYTES"),
    PacsCase("pixel data shorter than the image", dicom.pixel_data_short, "pixel data"),
    PacsCase("image of 4 x 4 pixels", dicom.tiny_image, "pixel array shape"),
    PacsCase("unsupported transfer syntax (MPEG-2 video)", dicom.unsupported_transfer_syntax, "transfer syntax"),
    PacsCase("Rows with a wrong VR (text)", dicom.wrong_vr_rows, "pixel data"),
    PacsCase("BitsAllocated 12", dicom.bits_allocated_12, "pixel data"),
    PacsCase("Rescale Slope that is not a number", dicom.bad_rescale_slope, "modality LUT"),
    PacsCase("NumberOfFrames without the frames", dicom.frames_missing, "pixel data"),
    PacsCase("RGB header on greyscale pixel data", dicom.colour_header_on_grey_pixels, "pixel data"),
    PacsCase("more slices than CDS_MAX_INSTANCES (5)", lambda uid: dicom.many_slices(uid, 7), "above the limit"),
]

FILE_CASES = [
    FileCase("0-byte file", dicom.zero_bytes, "not a readable DICOM"),
    FileCase("truncated DICOM file", dicom.truncated_file, "pixel data"),
    FileCase("preamble and DICM only", dicom.preamble_only, "no data elements"),
    FileCase("PNG named .dcm", dicom.png_named_dcm, "not a readable DICOM"),
    FileCase("random bytes", dicom.random_bytes, "not a readable DICOM"),
]

ALL_CASES = [*HTTP_CASES, *EHR_CASES, *PACS_CASES, *FILE_CASES]


def http_body(case: HttpCase) -> tuple[bytes | None, dict[str, str]]:
    headers = dict(case.headers)
    if case.json_body is not None:
        headers.setdefault("Content-Type", "application/json")
        return json.dumps(case.json_body).encode(), headers
    return case.body, headers
