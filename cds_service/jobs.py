"""Jobs: a durable record of every triage request, and the queue that runs them.

Two parts, each small:
- `JobStore`: one SQLite table with each job's state, reason and result summary. It is
  what `/jobs/<id>` shows and what de-duplicates: one job per (ImagingStudy, model set).
- `create_queue`: a `huey` queue (SQLite file by default, Redis with CDS_QUEUE_URL)
  carrying job ids to `cds-triage worker`.

A job is *claimed* atomically (queued → running) before it runs, so a job id delivered
twice (a re-sent notification, a recovered worker) runs once.
"""

from __future__ import annotations

import enum
import json
import random
import sqlite3
import time
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from huey import Huey, RedisHuey, SqliteHuey
from huey.exceptions import RetryTask

from .errors import TransientError, TriageError


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    DONE = "done"
    NOT_APPLICABLE = "not_applicable"
    MODEL_UNAVAILABLE = "model_unavailable"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.NOT_APPLICABLE, JobState.MODEL_UNAVAILABLE, JobState.FAILED)


@dataclass(frozen=True)
class TriageRequest:
    """What a trigger (subscription notification or CDS hook) asks for."""

    imaging_study_id: str
    source: str
    service_request_id: str | None = None

    def __post_init__(self) -> None:
        if not self.imaging_study_id or "/" in self.imaging_study_id:
            raise ValueError("a TriageRequest needs a bare ImagingStudy id")


@dataclass(frozen=True)
class Job:
    id: str
    imaging_study_id: str
    service_request_id: str | None
    source: str
    model_set: str
    state: JobState
    reason: str = ""
    attempts: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "imagingStudy": f"ImagingStudy/{self.imaging_study_id}",
            "serviceRequest": f"ServiceRequest/{self.service_request_id}" if self.service_request_id else None,
            "source": self.source,
            "models": self.model_set,
            "status": self.state.value,
            "reason": self.reason or None,
            "attempts": self.attempts,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "result": self.result or None,
        }


_SCHEMA = """
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
    result TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (imaging_study_id);
"""


class JobStore:
    """The jobs table. Every method opens its own short connection (safe across threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            db.row_factory = sqlite3.Row
            yield db

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        return Job(
            id=row["id"],
            imaging_study_id=row["imaging_study_id"],
            service_request_id=row["service_request_id"],
            source=row["source"],
            model_set=row["model_set"],
            state=JobState(row["state"]),
            reason=row["reason"],
            attempts=row["attempts"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            result=json.loads(row["result"]),
        )

    def submit(self, request: TriageRequest, model_set: str) -> tuple[Job, bool]:
        """The job for this study and model set, and whether it needs (re)queueing.

        A finished or in-flight job is returned as is: the same study is never triaged
        twice by the same models. A failed one is reset to queued, since the trigger
        firing again (e.g. the study was corrected) is a reason to try again.
        """
        key = f"{request.imaging_study_id}|{model_set}"
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT * FROM jobs WHERE dedup_key = ?", (key,)).fetchone()
            if row is None:
                job_id = str(uuid.uuid4())
                db.execute(
                    "INSERT INTO jobs (id, dedup_key, imaging_study_id, service_request_id, source, model_set,"
                    " state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, key, request.imaging_study_id, request.service_request_id, request.source,
                     model_set, JobState.QUEUED.value, now, now),
                )
                enqueue = True
            elif row["state"] == JobState.FAILED.value:
                job_id = row["id"]
                db.execute(
                    "UPDATE jobs SET state = ?, reason = '', attempts = 0, updated_at = ?,"
                    " service_request_id = COALESCE(?, service_request_id) WHERE id = ?",
                    (JobState.QUEUED.value, now, request.service_request_id, job_id),
                )
                enqueue = True
            else:
                job_id, enqueue = row["id"], False
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            db.execute("COMMIT")
        return self._job(row), enqueue

    def get(self, job_id: str) -> Job | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def list(self, *, imaging_study_id: str | None = None, state: str | None = None, limit: int = 100) -> list[Job]:
        query, args = "SELECT * FROM jobs WHERE 1=1", []
        if imaging_study_id:
            query += " AND imaging_study_id = ?"
            args.append(imaging_study_id)
        if state:
            query += " AND state = ?"
            args.append(state)
        query += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        with self._db() as db:
            return [self._job(row) for row in db.execute(query, args).fetchall()]

    def claim(self, job_id: str) -> Job | None:
        """queued/retrying → running, atomically; None if someone else has it or it is finished."""
        with self._db() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, updated_at = ? WHERE id = ? AND state IN (?, ?)",
                (JobState.RUNNING.value, time.time(), job_id, JobState.QUEUED.value, JobState.RETRYING.value),
            )
        return self.get(job_id) if cursor.rowcount == 1 else None

    def finish(self, job_id: str, state: JobState, reason: str = "", result: dict[str, Any] | None = None) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE jobs SET state = ?, reason = ?, result = ?, updated_at = ? WHERE id = ?",
                (state.value, reason, json.dumps(result or {}), time.time(), job_id),
            )

    def requeue(self, job_id: str) -> Job | None:
        """An operator's or a recovering worker's reset of a job to queued."""
        with self._db() as db:
            db.execute("UPDATE jobs SET state = ?, reason = '', updated_at = ? WHERE id = ?",
                       (JobState.QUEUED.value, time.time(), job_id))
        return self.get(job_id)

    def stale_running(self, older_than_s: float) -> list[Job]:
        """Jobs left `running` by a worker that died (nothing updated them for a while)."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state IN (?, ?) AND updated_at < ?",
                              (JobState.RUNNING.value, JobState.QUEUED.value, time.time() - older_than_s)).fetchall()
        return [self._job(row) for row in rows]


def backoff_delay(attempt: int, base_s: float, cap_s: float = 300.0) -> float:
    """Exponential backoff with full jitter, so retries of many jobs do not arrive together."""
    return random.uniform(0.5, 1.0) * min(cap_s, base_s * 2 ** max(0, attempt - 1))


JobRunner = Callable[[Job], tuple[JobState, str, dict[str, Any]]]


def create_queue(queue_url: str, queue_db_path: Path, name: str = "cds-triage") -> Huey:
    """The huey instance: Redis when CDS_QUEUE_URL says redis://, else a SQLite file."""
    if queue_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisHuey(name, url=queue_url)
    queue_db_path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(name, filename=str(queue_db_path))


def register_triage_task(huey: Huey, store: JobStore, runner_factory: Callable[[], JobRunner], *,
                         max_attempts: int, retry_base_s: float) -> Callable[[str], Any]:
    """Register the one task the queue carries: run job `job_id` once, retrying transient faults.

    `runner_factory` is called on first use in the worker process, so models load once
    per worker and never in the web process.
    """
    runner: list[JobRunner] = []

    @huey.task(name="triage_job")
    def triage_job(job_id: str) -> None:
        job = store.claim(job_id)
        if job is None:
            return  # finished, or another worker is on it
        if not runner:
            runner.append(runner_factory())
        try:
            state, reason, result = runner[0](job)
        except TransientError as exc:
            if job.attempts >= max_attempts:
                store.finish(job.id, JobState.FAILED, f"gave up after {job.attempts} attempts: {exc}")
                return
            delay = exc.retry_after or backoff_delay(job.attempts, retry_base_s)
            store.finish(job.id, JobState.RETRYING, f"attempt {job.attempts} failed, retrying in {delay:.1f}s: {exc}")
            raise RetryTask(delay=delay) from exc
        except TriageError as exc:
            store.finish(job.id, JobState.FAILED, str(exc))
            return
        except Exception as exc:  # a bug must not leave the job 'running' forever
            store.finish(job.id, JobState.FAILED, f"internal error: {type(exc).__name__}: {exc}")
            raise
        store.finish(job.id, state, reason, result)

    return triage_job
