"""The CDS Hooks audit log: every hook call, every card we issued, every piece of feedback.

One SQLite file next to the job store (`<CDS_DATA_DIR>/audit.sqlite3`), shared by all web
worker processes. It answers the questions a safety review asks: which client called which
service when, what did we show (card uuid, indicator, summary), and what did the clinician
do with it (accepted / overridden, with the coded reason). Patient and study ids are stored
hashed (`logs.hashed`), as in the logs; free-text comments from clinicians are kept only here.

Feedback is idempotent: the same card, outcome and outcomeTimestamp sent twice is stored once.
Read it with `sqlite3 var/audit.sqlite3 'SELECT * FROM audit_event ORDER BY at DESC LIMIT 20'`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from fhir_mappings.ai_reports import card_result
from cds_service.adapters import sqlite_files

log = logging.getLogger("cds_service.audit")  # the audit stream's name, kept when the module moved

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_event (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,            -- hook-call | feedback | write-back
    service TEXT NOT NULL,
    client TEXT NOT NULL,          -- the verified JWT issuer (and hashed tenant)
    hook_instance TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',  -- hashed patient id
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS issued_card (
    uuid TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    hook_instance TEXT NOT NULL,
    indicator TEXT NOT NULL,
    summary TEXT NOT NULL,
    issued_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS card_result (
    uuid TEXT PRIMARY KEY,         -- a card that showed an AI result (its extension, ai_reports.card_result)
    study TEXT NOT NULL,           -- hashed ImagingStudy id
    findings TEXT NOT NULL DEFAULT '[]',  -- the labels the card called positive
    mode TEXT NOT NULL DEFAULT 'active'   -- active | shadow
);
CREATE TABLE IF NOT EXISTS feedback (
    service TEXT NOT NULL,
    card TEXT NOT NULL,
    outcome TEXT NOT NULL,
    outcome_timestamp TEXT NOT NULL,
    accepted_suggestions TEXT NOT NULL DEFAULT '[]',
    override_reason TEXT NOT NULL DEFAULT '{}',
    client TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (service, card, outcome, outcome_timestamp)
);
"""


@dataclass(frozen=True)
class Feedback:
    """One validated CDS Hooks 2.0 feedback item."""

    card: str
    outcome: str  # accepted | overridden
    outcome_timestamp: str
    accepted_suggestions: tuple[str, ...] = ()
    override_reason: dict[str, Any] | None = None


class AuditLog:
    """The audit tables. Every method opens its own short connection (safe across threads and processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        sqlite_files.create(path, _SCHEMA)

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A short connection to the audit file (the access log's table lives there too: access_log.py)."""
        with sqlite_files.connection(self.path) as db:
            yield db

    def record_hook_call(self, service: str, client: str, hook_instance: str, subject: str,
                         cards: list[dict[str, Any]], detail: dict[str, Any]) -> None:
        """A served hook call and the cards it returned (so feedback can be matched to them, and, for a
        card that showed an AI result, to its study)."""
        from cds_service.logs import hashed

        now = time.time()
        with self.connection() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO audit_event (at, kind, service, client, hook_instance, subject, detail) "
                       "VALUES (?, 'hook-call', ?, ?, ?, ?, ?)",
                       (now, service, client, hook_instance, subject,
                        json.dumps(detail | {"cards": [c.get("uuid") for c in cards]})))
            db.executemany("INSERT OR IGNORE INTO issued_card VALUES (?, ?, ?, ?, ?, ?)",
                           [(c["uuid"], service, hook_instance, c["indicator"], c["summary"], now) for c in cards if c.get("uuid")])
            shown = [(c["uuid"], result) for c in cards if c.get("uuid") and (result := card_result(c)) is not None]
            db.executemany("INSERT OR IGNORE INTO card_result VALUES (?, ?, ?, ?)",
                           [(uuid, hashed(r.imaging_study_id), json.dumps(list(r.findings)), "shadow" if r.shadow else "active")
                            for uuid, r in shown])
            db.execute("COMMIT")
        log.info("cds hook served", extra={"service": service, "client": client, "subject": subject,
                                            "cards": len(cards), **detail})

    def issued_cards(self, service: str, uuids: list[str]) -> set[str]:
        """Which of these card uuids this service issued."""
        if not uuids:
            return set()
        marks = ",".join("?" * len(uuids))
        with self.connection() as db:
            rows = db.execute(f"SELECT uuid FROM issued_card WHERE service = ? AND uuid IN ({marks})", (service, *uuids))
            return {row["uuid"] for row in rows}

    def store_feedback(self, service: str, client: str, items: list[Feedback]) -> list[bool]:
        """Store each item once; returns per item whether it was new (False: a repeat, ignored)."""
        now = time.time()
        stored = []
        with self.connection() as db:
            db.execute("BEGIN IMMEDIATE")
            for item in items:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (service, item.card, item.outcome, item.outcome_timestamp, json.dumps(list(item.accepted_suggestions)),
                     json.dumps(item.override_reason or {}), client, now))
                stored.append(cursor.rowcount == 1)
                if cursor.rowcount == 1:
                    reason = ((item.override_reason or {}).get("reason") or {}).get("code")
                    db.execute("INSERT INTO audit_event (at, kind, service, client, detail) VALUES (?, 'feedback', ?, ?, ?)",
                               (now, service, client, json.dumps({"card": item.card, "outcome": item.outcome,
                                                                  "overrideReason": reason,
                                                                  "outcomeTimestamp": item.outcome_timestamp})))
            db.execute("COMMIT")
        log.info("cds feedback", extra={"service": service, "client": client, "items": len(items), "new": sum(stored)})
        return stored

    def feedback_for(self, card: str) -> list[dict[str, Any]]:
        with self.connection() as db:
            rows = db.execute("SELECT * FROM feedback WHERE card = ? ORDER BY received_at", (card,)).fetchall()
        return [dict(row) | {"accepted_suggestions": json.loads(row["accepted_suggestions"]),
                             "override_reason": json.loads(row["override_reason"])} for row in rows]

    def feedback_on_studies(self, study_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Every feedback on a card that showed the AI result of one of these ImagingStudy ids (plain
        ids; the log keeps them hashed): card, outcome, outcome_timestamp, override_reason, service,
        and what the card showed (`study`, the plain id; `findings`; `mode`)."""
        from cds_service.logs import hashed

        by_hash = {hashed(study): study for study in study_ids}
        hashes, found = list(by_hash), []
        with self.connection() as db:
            for start in range(0, len(hashes), 500):  # under SQLite's limit of bound parameters
                chunk = hashes[start:start + 500]
                rows = db.execute("SELECT f.*, r.study AS study_hash, r.findings, r.mode FROM feedback f "
                                  f"JOIN card_result r ON r.uuid = f.card WHERE r.study IN ({','.join('?' * len(chunk))}) "
                                  "ORDER BY f.outcome_timestamp, f.received_at", chunk).fetchall()
                found += [{"study": by_hash[row["study_hash"]], "card": row["card"], "service": row["service"],
                           "outcome": row["outcome"], "outcome_timestamp": row["outcome_timestamp"],
                           "override_reason": json.loads(row["override_reason"]), "findings": json.loads(row["findings"]),
                           "mode": row["mode"]} for row in rows]
        return found

    def events(self, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first."""
        query, args = "SELECT * FROM audit_event", []
        if kind:
            query, args = query + " WHERE kind = ?", [kind]
        with self.connection() as db:
            rows = db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [dict(row) | {"detail": json.loads(row["detail"])} for row in rows]


# --- The write-back trail: what triage wrote where, by which model version -----------------------
#
# Appended by the worker after each successful attempt (a re-run appends again: the trail is
# history, never updated). Kind `write-back` rows in `audit_event` of the same SQLite file, or,
# with CDS_QUEUE_URL=redis://…, a Redis list shared by the workers of every machine.
# `subject` is the hashed ImagingStudy id; `detail` holds the job id, model, FHIR server and
# the locations written (DiagnosticReport/…, Observation/…, Media/…, Device/…, Provenance/…).

WRITE_BACK = "write-back"


def write_back_event(job_id: str, imaging_study_id: str, worker: str, fhir_base: str,
                     result: dict[str, Any], at: float | None = None) -> dict[str, Any]:
    """The audit record of one finished triage (pure: from the job's result summary)."""
    from cds_service.logs import hashed

    model = result.get("model") or {}
    return {
        "at": time.time() if at is None else at,
        "kind": WRITE_BACK,
        "service": str(result.get("task") or ""),
        "client": worker,
        "subject": hashed(imaging_study_id),
        "detail": {
            "job": job_id,
            "model": {"name": model.get("name"), "version": model.get("version")} if model else None,
            "fhirServer": fhir_base,
            "written": result.get("written") or {},
            "priority": result.get("priority"),
            **({"pacs": result["heatmapToPacs"]} if result.get("heatmapToPacs") else {}),
        },
    }


class WriteBackTrail:
    """Append-only write-back records in the audit SQLite file (one machine)."""

    def __init__(self, path: Path) -> None:
        self.log = AuditLog(path)

    def append(self, event: dict[str, Any]) -> None:
        with self.log.connection() as db:
            db.execute("INSERT INTO audit_event (at, kind, service, client, subject, detail) VALUES (?, ?, ?, ?, ?, ?)",
                       (event["at"], event["kind"], event["service"], event["client"], event["subject"],
                        json.dumps(event["detail"])))

    def events(self, *, subject: str | None = None, job: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first; `subject` is a hashed ImagingStudy id."""
        query, args = "SELECT * FROM audit_event WHERE kind = ?", [WRITE_BACK]
        if subject:
            query, args = query + " AND subject = ?", args + [subject]
        if job:
            query, args = query + " AND json_extract(detail, '$.job') = ?", args + [job]
        with self.log.connection() as db:
            rows = db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [{k: row[k] for k in ("id", "at", "kind", "service", "client", "subject")} | {"detail": json.loads(row["detail"])}
                for row in rows]


class RedisWriteBackTrail:
    """Append-only write-back records in a Redis list, shared by every machine (RPUSH only)."""

    def __init__(self, url: str, *, key: str = "cds-triage:audit:write-back", timeout_s: float = 10.0) -> None:
        import redis

        self.key = key
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                          decode_responses=True)

    def append(self, event: dict[str, Any]) -> None:
        self.redis.rpush(self.key, json.dumps(event))

    def events(self, *, subject: str | None = None, job: str | None = None, limit: int = 100,
               scan: int = 10_000) -> list[dict[str, Any]]:
        """Newest first, from the last `scan` records."""
        found = []
        start = max(0, self.redis.llen(self.key) - scan)
        for index, raw in reversed(list(enumerate(self.redis.lrange(self.key, start, -1), start=start + 1))):
            event = json.loads(raw)
            if (subject and event["subject"] != subject) or (job and event["detail"].get("job") != job):
                continue
            found.append({"id": index, **event})
            if len(found) >= limit:
                break
        return found


def on_redis(settings: Any) -> bool:
    """Whether the audit records that every machine shares (the write-back trail, the access log of patient data,
    adapters/access_log.py) go to Redis: where the job store is (CDS_QUEUE_URL=redis://…), else SQLite."""
    return str(settings.queue_url).startswith(("redis://", "rediss://", "unix://"))


def open_write_back_trail(settings: Any) -> WriteBackTrail | RedisWriteBackTrail:
    """Redis when the job store is on Redis (so every machine writes one trail), else SQLite."""
    if on_redis(settings):
        return RedisWriteBackTrail(settings.queue_url, timeout_s=settings.http_timeout_s)
    return WriteBackTrail(settings.data_dir / "audit.sqlite3")
