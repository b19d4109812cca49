"""`JobStore`: jobs in one SQLite file (the default for one box)."""

from __future__ import annotations

import builtins
import logging
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


from cds_service.adapters import sqlite_files
from cds_service.core.errors import QueueUnavailableError

from .state import ROW_COLUMNS, BaseJobStore, job_from_row, job_to_row, Job, JobState, UNFINISHED

log = logging.getLogger(__name__)

_TABLES = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    dedup_key TEXT NOT NULL UNIQUE,
    imaging_study_id TEXT NOT NULL,
    service_request_id TEXT,
    source TEXT NOT NULL,
    model_set TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    result TEXT NOT NULL DEFAULT '{}',
    queued_at REAL NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT '',
    lease_until REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, seen_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS flags (name TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL);
"""
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (imaging_study_id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, lease_until);
CREATE INDEX IF NOT EXISTS jobs_done_by_task ON jobs (json_extract(result, '$.task'), updated_at) WHERE state = 'done';
"""

_ADDED_LATER = {"queued_at": "REAL NOT NULL DEFAULT 0", "worker": "TEXT NOT NULL DEFAULT ''",
                "lease_until": "REAL NOT NULL DEFAULT 0"}




class JobStore(BaseJobStore):
    """Jobs in one SQLite file (WAL): the default, for a service and its workers on one box.

    Every method opens its own short connection (safe across threads and processes);
    `BEGIN IMMEDIATE` makes each read-modify-write atomic.
    """

    def __init__(self, path: Path, **options: float) -> None:
        super().__init__(**options)
        self.path = path
        try:
            sqlite_files.create(path, _TABLES)
        except sqlite3.OperationalError as exc:
            raise QueueUnavailableError(f"job store {self.path} unavailable: {exc}") from exc
        with self._db() as db:
            present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, decl in _ADDED_LATER.items():  # a job file from an earlier version
                if column not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
            db.executescript(_INDEXES)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        try:
            with sqlite_files.connection(self.path) as db:
                yield db
        except sqlite3.OperationalError as exc:
            raise QueueUnavailableError(f"job store {self.path} unavailable: {exc}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def _write(db: sqlite3.Connection, job: Job, *, insert: bool = False) -> None:
        row = job_to_row(job)
        if insert:
            db.execute(f"INSERT INTO jobs ({', '.join(ROW_COLUMNS)}) VALUES ({', '.join('?' * len(ROW_COLUMNS))})",
                       [row[c] for c in ROW_COLUMNS])
        else:
            columns = [c for c in ROW_COLUMNS if c != "id"]
            db.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?",
                       [row[c] for c in columns] + [job.id])

    def _submit(self, key: str, create: Callable[[], Job], on_existing: Callable[[Job], Job | None]) -> tuple[Job, bool]:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE dedup_key = ?", (key,)).fetchone()
            if row is None:
                job = create()
                self._write(db, job, insert=True)
                return job, True
            existing = job_from_row(row)
            changed = on_existing(existing)
            if changed is None:
                return existing, False
            self._write(db, changed)
            return changed, True

    def _update(self, job_id: str, change: Callable[[Job], Job | None]) -> tuple[Job | None, Job | None]:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None, None
            before = job_from_row(row)
            after = change(before)
            if after is not None:
                self._write(db, after)
            return before, after

    def get(self, job_id: str) -> Job | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_row(row) if row else None

    def list(self, *, imaging_study_id: str | None = None, state: str | None = None, limit: int = 100) -> builtins.list[Job]:
        query, args = "SELECT * FROM jobs WHERE 1=1", builtins.list[Any]()
        if imaging_study_id:
            query += " AND imaging_study_id = ?"
            args.append(imaging_study_id)
        if state:
            query += " AND state = ?"
            args.append(state)
        query += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        with self._db() as db:
            return [job_from_row(row) for row in db.execute(query, args).fetchall()]

    def counts(self) -> dict[str, int]:
        with self._db() as db:
            found = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {state.value: int(found.get(state.value, 0)) for state in JobState}

    def lapsed(self, now: float, limit: int = 100) -> builtins.list[str]:
        marks = ",".join("?" * len(UNFINISHED))
        with self._db() as db:
            rows = db.execute(f"SELECT id FROM jobs WHERE state IN ({marks}) AND lease_until < ? LIMIT ?",
                              [s.value for s in UNFINISHED] + [now, limit]).fetchall()
        return [row["id"] for row in rows]

    def heartbeat(self, worker: str, now: float) -> None:
        with self._db() as db:
            db.execute("INSERT INTO workers (id, seen_at) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET seen_at = excluded.seen_at",
                       (worker, now))

    def live_workers(self, since: float) -> builtins.list[str]:
        with self._db() as db:
            return [row["id"] for row in db.execute("SELECT id FROM workers WHERE seen_at >= ? ORDER BY id", (since,))]

    def ping(self) -> None:
        with self._db() as db:
            db.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()

    def recent_triages(self, task: str, limit: int) -> Sequence[Job]:
        with self._db() as db:  # the partial index jobs_done_by_task answers this
            rows = db.execute("SELECT * FROM jobs WHERE state = 'done' AND json_extract(result, '$.task') = ? "
                              "ORDER BY updated_at DESC LIMIT ?", (task, limit)).fetchall()
        return [job_from_row(row) for row in rows]

    def swap_flag(self, name: str, value: str) -> str | None:
        with self._transaction() as db:
            row = db.execute("SELECT value FROM flags WHERE name = ?", (name,)).fetchone()
            db.execute("INSERT INTO flags (name, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                       "value = excluded.value, updated_at = excluded.updated_at", (name, value, time.time()))
        return row["value"] if row else None
