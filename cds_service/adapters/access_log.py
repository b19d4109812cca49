"""The access log of patient data: who saw which patient's data, how, and when.

Every view of patient data is recorded: the worklist (its page and each refresh of its rows), a study page,
a key image, a heatmap, and the cards a CDS Hooks call showed; and every sign-in and sign-out. `who` is the
signed-in user (CDS_WORKLIST_AUTH=oidc), the user the trusted proxy named (proxy-header), "bearer-token
client", or the CDS client (its JWT issuer) with the EHR's `userId`; `patient` is the Patient id hashed
as in the logs and the hooks' audit (`logs.hashed`), never the id or a name.

Kept in the audit store: the `phi_view` table of `<CDS_DATA_DIR>/audit.sqlite3`, or, where the job store is
on Redis (CDS_QUEUE_URL=redis://…), a sorted set shared by every machine. Rows older than
CDS_ACCESS_LOG_RETENTION_DAYS are pruned (at most once an hour per process). `cds-triage audit` lists them
by user or patient.

The worklist's list refreshes every few seconds: a patient on the list is recorded once per viewer every
LIST_VIEW_INTERVAL_S (per process), every other view every time.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

from cds_service.adapters.audit import AuditLog, on_redis
from cds_service.core.errors import QueueUnavailableError
from cds_service.core.settings import Settings
from cds_service.logs import hashed

#: a patient on the worklist is recorded again for the same viewer after this long (while the list refreshes)
LIST_VIEW_INTERVAL_S = 15 * 60
PRUNE_EVERY_S = 3600
DAY_S = 86400

_SCHEMA = """
CREATE TABLE IF NOT EXISTS phi_view (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    who TEXT NOT NULL,
    view TEXT NOT NULL,            -- worklist | study | key-image | heatmap | cds-card:<service> | sign-in | sign-out
    patient TEXT NOT NULL DEFAULT '',  -- hashed Patient id ('' for sign-in and sign-out)
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS phi_view_at ON phi_view (at);
CREATE INDEX IF NOT EXISTS phi_view_who ON phi_view (who, at);
CREATE INDEX IF NOT EXISTS phi_view_patient ON phi_view (patient, at);
"""


@dataclass(frozen=True)
class PhiView:
    """One recorded view."""

    who: str
    view: str
    patient: str = ""  # hashed
    detail: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def patient_key(patient_id: str) -> str:
    """How a Patient id is recorded and looked up: hashed, from `123` or `Patient/123` alike."""
    return hashed(patient_id.strip().removeprefix("Patient/"))


class AccessLogStore(Protocol):
    def record(self, views: Iterable[PhiView]) -> None: ...

    def views(self, *, who: str | None = None, patient: str | None = None, since: float | None = None,
              limit: int = 100) -> list[PhiView]: ...

    def prune(self, before: float) -> int: ...


class SqliteAccessLog:
    """The `phi_view` table of the audit SQLite file (one machine)."""

    def __init__(self, path: Path) -> None:
        self.audit = AuditLog(path)
        with self.audit.connection() as db:
            db.executescript(_SCHEMA)

    def record(self, views: Iterable[PhiView]) -> None:
        rows = [(v.at, v.who, v.view, v.patient, json.dumps(v.detail)) for v in views]
        if rows:
            with self.audit.connection() as db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT INTO phi_view (at, who, view, patient, detail) VALUES (?, ?, ?, ?, ?)", rows)
                db.execute("COMMIT")

    def views(self, *, who: str | None = None, patient: str | None = None, since: float | None = None,
              limit: int = 100) -> list[PhiView]:
        """Newest first."""
        where: list[str] = ["at >= ?"]
        args: list[object] = [since or 0.0]
        for column, value in (("who", who), ("patient", patient)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        with self.audit.connection() as db:
            rows = db.execute(f"SELECT * FROM phi_view WHERE {' AND '.join(where)} ORDER BY at DESC, id DESC LIMIT ?",
                              (*args, limit)).fetchall()
        return [PhiView(row["who"], row["view"], row["patient"], json.loads(row["detail"]), row["at"]) for row in rows]

    def prune(self, before: float) -> int:
        with self.audit.connection() as db:
            return db.execute("DELETE FROM phi_view WHERE at < ?", (before,)).rowcount


class RedisAccessLog:
    """A sorted set by time in Redis, shared by every machine (CDS_QUEUE_URL=redis://…)."""

    def __init__(self, url: str, *, key: str = "cds-triage:audit:phi-view", timeout_s: float = 10.0) -> None:
        import redis

        self.key = key
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                          decode_responses=True)

    def record(self, views: Iterable[PhiView]) -> None:
        # each member unique (two equal views in the same instant are two views)
        members = {json.dumps(v.to_json() | {"id": uuid.uuid4().hex}): v.at for v in views}
        if members:
            self.redis.zadd(self.key, members)

    def views(self, *, who: str | None = None, patient: str | None = None, since: float | None = None,
              limit: int = 100, scan: int = 100_000) -> list[PhiView]:
        """Newest first, from the newest `scan` records since `since`."""
        found = []
        for raw in self.redis.zrevrangebyscore(self.key, "+inf", since or 0.0, start=0, num=scan):
            item = json.loads(str(raw))
            item.pop("id", None)
            view = PhiView(**item)
            if (who is None or view.who == who) and (patient is None or view.patient == patient):
                found.append(view)
                if len(found) >= limit:
                    break
        return found

    def prune(self, before: float) -> int:
        return int(self.redis.zremrangebyscore(self.key, "-inf", f"({before}"))


def open_access_log(settings: Settings) -> SqliteAccessLog | RedisAccessLog:
    """Redis when the job store is on Redis (every machine writes one log), else the audit SQLite file."""
    if on_redis(settings):
        return RedisAccessLog(settings.queue_url, timeout_s=settings.http_timeout_s)
    return SqliteAccessLog(settings.audit_db_path)


class AccessRecorder:
    """What the web process records through: the retention pruning and the list views' interval."""

    def __init__(self, store: AccessLogStore, retention_days: int, *, clock: Any = time.time) -> None:
        self.store = store
        self.retention_s = retention_days * DAY_S
        self.clock = clock
        self._lock = threading.Lock()
        self._listed: dict[tuple[str, str], float] = {}
        self._pruned_at = 0.0

    def viewed(self, who: str, view: str, patient_id: str | None, **detail: Any) -> None:
        """One view of one patient's data (`patient_id` as the EHR names it; recorded hashed)."""
        self._write([PhiView(who, view, patient_key(patient_id) if patient_id else "", detail, self.clock())])

    def listed(self, who: str, patient_ids: Iterable[str], **detail: Any) -> None:
        """The worklist showed these patients: each recorded unless this viewer was shown them within the interval."""
        now = self.clock()
        with self._lock:
            fresh = [patient for patient in dict.fromkeys(patient_key(p) for p in patient_ids if p)
                     if now - self._listed.get((who, patient), -LIST_VIEW_INTERVAL_S) >= LIST_VIEW_INTERVAL_S]
        self._write([PhiView(who, "worklist", patient, detail, now) for patient in fresh])
        with self._lock:  # marked once recorded: a failed write is tried again at the next refresh
            self._listed.update({(who, patient): now for patient in fresh})
            if len(self._listed) > 100_000:  # forget the old ones: they are recorded again, never lost
                self._listed = {k: t for k, t in self._listed.items() if now - t < LIST_VIEW_INTERVAL_S}

    def _write(self, views: list[PhiView]) -> None:
        """Record (and, once an hour, prune). No patient data is shown without its record: a store that cannot be
        written is a QueueUnavailableError (503, try again)."""
        now = self.clock()
        try:
            self.store.record(views)
            if now - self._pruned_at >= PRUNE_EVERY_S:
                self.store.prune(now - self.retention_s)
                self._pruned_at = now
        except Exception as exc:  # noqa: BLE001 - SQLite locked or unwritable, Redis down
            raise QueueUnavailableError(f"access log unavailable: {type(exc).__name__}") from exc
