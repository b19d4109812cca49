"""PACS-side trigger: the PACS says "this study is complete"; we make sure the EHR knows it, then triage.

For sites where images reach the PACS before (or without) the EHR creating an ImagingStudy.
Orthanc's Lua script `docker/orthanc/cds-triage.lua` calls it from `OnStableStudy`.

    POST /pacs/studies           {"StudyInstanceUID": "1.2.3..."}    header X-CDS-PACS-Secret: <secret>
      → 202 {"studyInstanceUid", "status": "accepted", "statusUrl"}
    GET  /pacs/studies/<uid>     (same header) → what became of it: accepted, retrying, done, failed

The POST only checks the secret and the UID, records the arrival and queues it: Orthanc holds
its Lua lock while its script waits for our answer, and every HTTP request to Orthanc waits
for that lock, so reading the PACS before answering would deadlock. The worker then, in
`resolve_arrival`:

1. searches `ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>` in the FHIR server;
2. if there is none, reads the study's DICOM headers over WADO-RS (metadata), finds the
   Patient by `CDS_PATIENT_IDENTIFIER_SYSTEM|PatientID` (one match, or create one when
   CDS_PACS_UNKNOWN_PATIENT=create), links the order when exactly one ServiceRequest of that
   patient carries the study's AccessionNumber, and creates the ImagingStudy with
   `If-None-Exist` (two triggers for one study make one ImagingStudy);
3. queues triage of each ImagingStudy with that UID: the same job a Subscription notification
   makes, so with both triggers on, a study is still triaged once.

Transient trouble (PACS or FHIR server down) is retried like a triage job; a study the PACS
does not have, or a patient that cannot be matched, ends `failed` with the reason.
"""

from __future__ import annotations

import enum
import hmac
import json
import logging
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pydicom
from flask import Blueprint, Flask, current_app, jsonify, request
from huey.exceptions import RetryTask

from fhir_mappings import codes
from fhir_mappings.conventions import Conventions
from fhir_mappings.imaging_study import build_imaging_study, build_patient_from_dicom

from cds_service.adapters import sqlite_files
from cds_service.web.context import ServiceContext
from cds_service.web.web_context import ctx, operation_outcome
from cds_service.core.errors import PermanentError, TransientError, TriageError, UpstreamError, UpstreamRejectedError
from cds_service.adapters.fhir_client import FhirClient
from cds_service.jobs.state import TriageRequest, backoff_delay
from cds_service.jobs.queue import create_queue
from cds_service.adapters.pacs import pacs_from_settings
from cds_service.core.domain import UnknownPatientPolicy
from cds_service.core.settings import Settings

log = logging.getLogger(__name__)

pacs_trigger = Blueprint("pacs_trigger", __name__)

PACS_SECRET_HEADER = "X-CDS-PACS-Secret"
ARRIVAL_TASK = "pacs_study_arrived"

#: A DICOM UID (PS3.5 §9): dot-separated numbers without leading zeros, at most 64 characters.
_DICOM_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")

#: The header fields read from WADO-RS metadata: what the ImagingStudy and the Patient need.
HEADER_KEYWORDS = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality", "SeriesNumber",
    "InstanceNumber", "SeriesDescription", "StudyDescription", "BodyPartExamined", "AccessionNumber",
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
)
_HEADER_TAGS = {f"{pydicom.datadict.tag_for_keyword(k):08X}" for k in HEADER_KEYWORDS}


class PatientMatchError(PermanentError):
    """The study's patient cannot be matched to exactly one Patient (and none may be created)."""


class ArrivalState(str, enum.Enum):
    ACCEPTED = "accepted"
    RETRYING = "retrying"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class ArrivalOutcome:
    """What became of one study's arrival: the ImagingStudies it has and whether we created one."""

    imaging_study_ids: tuple[str, ...]
    created: bool
    patient_created: bool = False


# --- the pure core ------------------------------------------------------------------------------


def study_uid_from_body(body: Any) -> str:
    """The Study Instance UID of a trigger body `{"StudyInstanceUID": "..."}`; ValueError if not valid."""
    if not isinstance(body, dict):
        raise ValueError('body must be a JSON object {"StudyInstanceUID": "..."}')
    uid = body.get("StudyInstanceUID")
    if not isinstance(uid, str) or not uid.strip():
        raise ValueError("StudyInstanceUID is missing or not a string")
    uid = uid.strip()
    if len(uid) > 64 or not _DICOM_UID.match(uid):
        raise ValueError("StudyInstanceUID is not a valid DICOM UID")
    return uid


def study_identifier_token(study_uid: str) -> str:
    """The token that finds an ImagingStudy by Study Instance UID (R4: urn:dicom:uid|urn:oid:<uid>)."""
    return f"{codes.DICOM_UID_SYSTEM}|{codes.URN_OID_PREFIX}{study_uid}"


def datasets_from_metadata(items: list[dict[str, Any]]) -> list[pydicom.Dataset]:
    """WADO-RS metadata (DICOM JSON, one object per instance) as header-only pydicom datasets.

    Only HEADER_KEYWORDS are kept, so bulk data references and private tags never matter.
    """
    return [pydicom.Dataset.from_json({tag: value for tag, value in item.items() if tag.upper() in _HEADER_TAGS})
            for item in items]


def choose_patient(matches: list[dict[str, Any]], policy: UnknownPatientPolicy, system: str) -> str | None:
    """The one matching Patient's id; None when one is to be created; PatientMatchError otherwise.

    Messages name the identifier system, never the PatientID (no patient data in logs).
    """
    ids = sorted({str(m["id"]) for m in matches if m.get("resourceType") == "Patient" and m.get("id")})
    if len(ids) == 1:
        return ids[0]
    if ids:
        raise PatientMatchError(f"{len(ids)} Patients carry this study's PatientID in {system}; "
                                "cannot tell which one is meant")
    if policy is UnknownPatientPolicy.CREATE:
        return None
    raise PatientMatchError(f"no Patient carries this study's PatientID in {system} "
                            "(CDS_PACS_UNKNOWN_PATIENT=reject; check CDS_PATIENT_IDENTIFIER_SYSTEM)")


def choose_order(matches: list[dict[str, Any]]) -> str | None:
    """The ServiceRequest to link when exactly one matches the accession number, else none."""
    ids = sorted({str(m["id"]) for m in matches if m.get("resourceType") == "ServiceRequest" and m.get("id")})
    return ids[0] if len(ids) == 1 else None


# --- adapters: the PACS, the FHIR server, the arrivals table ---------------------------------------


def read_study_headers(settings: Settings, study_uid: str) -> list[pydicom.Dataset]:
    """The study's instances' headers over WADO-RS metadata; StudyNotFoundError if the PACS lacks it."""
    items = pacs_from_settings(settings).study_metadata(study_uid)
    return datasets_from_metadata(items)


def find_imaging_studies(fhir: FhirClient, study_uid: str) -> list[str]:
    found = fhir.search("ImagingStudy", {"identifier": study_identifier_token(study_uid)})
    return sorted({str(r["id"]) for r in found if r.get("resourceType") == "ImagingStudy" and r.get("id")})


def match_patient(fhir: FhirClient, header: pydicom.Dataset, settings: Settings) -> tuple[str, bool]:
    """The Patient id for the study's PatientID, and whether we created that Patient just now."""
    patient_id = str(getattr(header, "PatientID", "") or "").strip()
    if not patient_id:
        raise PatientMatchError("the study has no PatientID, so no Patient can be matched")
    token = f"{settings.patient_identifier_system}|{patient_id}"
    matches = fhir.search("Patient", {"identifier": token})
    chosen = choose_patient(matches, settings.pacs_unknown_patient, settings.patient_identifier_system)
    if chosen:
        return chosen, False
    patient = build_patient_from_dicom(header, identifier_system=settings.patient_identifier_system,
                                       conventions=Conventions.from_settings(settings))
    created = fhir.create(patient.model_dump(mode="json", exclude_none=True), if_none_exist=f"identifier={token}")
    if created.get("id"):
        return str(created["id"]), True
    return str(choose_patient(fhir.search("Patient", {"identifier": token}), UnknownPatientPolicy.REJECT,
                              settings.patient_identifier_system)), True


def match_order(fhir: FhirClient, header: pydicom.Dataset, patient_id: str) -> str | None:
    """The patient's ServiceRequest carrying the study's AccessionNumber, if exactly one does.

    Optional: a server that cannot search this way leaves the study without an order (the
    report is still written; only the priority cannot be raised).
    """
    accession = str(getattr(header, "AccessionNumber", "") or "").strip()
    if not accession:
        return None
    try:
        return choose_order(fhir.search("ServiceRequest", {"subject": f"Patient/{patient_id}", "identifier": accession}))
    except UpstreamRejectedError as exc:
        log.warning("cannot search ServiceRequest by accession number: %s", exc)
        return None


def resolve_arrival(study_uid: str, settings: Settings, fhir: FhirClient) -> ArrivalOutcome:
    """The ImagingStudies for a study the PACS announced, creating one from its DICOM headers if none."""
    existing = find_imaging_studies(fhir, study_uid)
    if existing:
        return ArrivalOutcome(tuple(existing), created=False)
    headers = read_study_headers(settings, study_uid)
    patient_id, patient_created = match_patient(fhir, headers[0], settings)
    study = build_imaging_study(headers, patient_id=patient_id, service_request_id=match_order(fhir, headers[0], patient_id))
    created = fhir.create(study.model_dump(mode="json", exclude_none=True),
                          if_none_exist=f"identifier={study_identifier_token(study_uid)}")
    ids = (str(created["id"]),) if created.get("id") else tuple(find_imaging_studies(fhir, study_uid))
    if not ids:
        raise UpstreamError("the FHIR server accepted the ImagingStudy but returned no id")
    return ArrivalOutcome(ids, created=True, patient_created=patient_created)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS arrivals (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '{}',
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""


@dataclass
class ArrivalLog:
    """One row per announced study (SQLite next to the job store): what `GET /pacs/studies/<uid>` shows."""

    path: Path
    _ready: bool = field(default=False, init=False)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        if not self._ready:
            sqlite_files.create(self.path, _SCHEMA)
            self._ready = True
        with sqlite_files.connection(self.path) as db:
            yield db

    def accept(self, study_uid: str) -> None:
        """A (re-)announcement starts the study's record afresh: a re-sent study is worked again."""
        now = time.time()
        with self._db() as db:
            db.execute("INSERT INTO arrivals (study_uid, state, received_at, updated_at) VALUES (?, ?, ?, ?)"
                       " ON CONFLICT(study_uid) DO UPDATE SET state = excluded.state, reason = '', attempts = 0,"
                       " detail = '{}', received_at = excluded.received_at, updated_at = excluded.updated_at",
                       (study_uid, ArrivalState.ACCEPTED.value, now, now))

    def attempt(self, study_uid: str) -> int:
        """Count one more attempt; returns the count."""
        with self._db() as db:
            db.execute("UPDATE arrivals SET attempts = attempts + 1, updated_at = ? WHERE study_uid = ?", (time.time(), study_uid))
            row = db.execute("SELECT attempts FROM arrivals WHERE study_uid = ?", (study_uid,)).fetchone()
        return int(row["attempts"]) if row else 1

    def record(self, study_uid: str, state: ArrivalState, reason: str = "", detail: dict[str, Any] | None = None) -> None:
        with self._db() as db:
            db.execute("UPDATE arrivals SET state = ?, reason = ?, detail = ?, updated_at = ? WHERE study_uid = ?",
                       (state.value, reason, json.dumps(detail or {}), time.time(), study_uid))

    def get(self, study_uid: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM arrivals WHERE study_uid = ?", (study_uid,)).fetchone()
        if row is None:
            return None
        return {"studyInstanceUid": row["study_uid"], "status": row["state"], "reason": row["reason"] or None,
                "attempts": row["attempts"], "receivedAt": row["received_at"], "updatedAt": row["updated_at"]
                } | json.loads(row["detail"])


def arrival_log(settings: Settings) -> ArrivalLog:
    return ArrivalLog(settings.data_dir / "pacs_arrivals.sqlite3")


# --- the queue task (runs in `cds-triage worker`) -----------------------------------------------


def register_arrival_task(huey: Any, service: ServiceContext) -> Callable[[str], Any]:
    """Register the task that resolves an announced study and queues its triage job(s).

    The web process registers it only to enqueue; `cds-triage worker` runs it with
    `service.submit` bound to the worker's own triage task.
    """
    settings = service.settings
    arrivals = arrival_log(settings)

    @huey.task(name=ARRIVAL_TASK)
    def pacs_study_arrived(study_uid: str) -> None:
        attempts = arrivals.attempt(study_uid)
        fhir = service.fhir()
        try:
            outcome = resolve_arrival(study_uid, settings, fhir)
            jobs = [service.submit(TriageRequest(imaging_study_id=i, source="pacs"))[0] for i in outcome.imaging_study_ids]
        except TransientError as exc:
            if attempts >= settings.job_retries:
                arrivals.record(study_uid, ArrivalState.FAILED, f"gave up after {attempts} attempts: {exc}")
                return
            delay = exc.retry_after or backoff_delay(attempts, settings.job_retry_delay_s)
            arrivals.record(study_uid, ArrivalState.RETRYING, f"attempt {attempts} failed, retrying in {delay:.1f}s: {exc}")
            raise RetryTask(delay=delay) from exc
        except (TriageError, ValueError) as exc:
            log.warning("PACS-announced study not queued: %s", exc)
            arrivals.record(study_uid, ArrivalState.FAILED, str(exc))
            return
        finally:
            fhir.close()
        arrivals.record(study_uid, ArrivalState.DONE, detail={
            "imagingStudies": [f"ImagingStudy/{i}" for i in outcome.imaging_study_ids],
            "created": outcome.created, "patientCreated": outcome.patient_created,
            "jobs": [job.id for job in jobs],
        })
        log.info("PACS-announced study queued", extra={"jobs": [job.id for job in jobs], "created": outcome.created})

    return pacs_study_arrived


# --- HTTP (runs in `cds-triage serve`) ------------------------------------------------------------


def _enqueue_arrival(app: Flask) -> Callable[[str], Any]:
    """The web process's handle on the arrival task (made on first use: no queue file before)."""
    if "cds_pacs_trigger" not in app.extensions:
        service: ServiceContext = app.extensions["cds_triage"]
        huey = create_queue(service.settings.queue_url, service.settings.queue_db_path)
        app.extensions["cds_pacs_trigger"] = register_arrival_task(huey, service)
    return app.extensions["cds_pacs_trigger"]


def _refusal() -> tuple[Any, int] | None:
    """401/403 unless the request carries the configured secret (compared in constant time)."""
    expected = ctx().settings.pacs_trigger_secret
    if not expected:
        return operation_outcome(403, "the PACS trigger is off: set CDS_PACS_TRIGGER_SECRET", "forbidden")
    given = request.headers.get(PACS_SECRET_HEADER, "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return operation_outcome(401, f"missing or wrong {PACS_SECRET_HEADER}", "login")
    return None


@pacs_trigger.post("/pacs/studies")
def study_arrived() -> Any:
    """A PACS announces a complete study: record it, queue it, answer at once (202)."""
    refused = _refusal()
    if refused:
        return refused
    try:
        study_uid = study_uid_from_body(request.get_json(silent=True))
    except ValueError as exc:
        return operation_outcome(400, str(exc), "invalid")
    arrival_log(ctx().settings).accept(study_uid)
    _enqueue_arrival(current_app)(study_uid)
    return jsonify({"studyInstanceUid": study_uid, "status": ArrivalState.ACCEPTED.value,
                    "statusUrl": f"{ctx().settings.public_url.rstrip('/')}/pacs/studies/{study_uid}"}), 202


@pacs_trigger.get("/pacs/studies/<study_uid>")
def arrival_status(study_uid: str) -> Any:
    """What became of an announced study: its ImagingStudy and job, or why it failed."""
    refused = _refusal()
    if refused:
        return refused
    found = arrival_log(ctx().settings).get(study_uid)
    if found is None:
        return operation_outcome(404, "no PACS announcement for this Study Instance UID", "not-found")
    return jsonify(found)
