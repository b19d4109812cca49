"""Jobs: a durable record of every triage request, and the queue that runs them.

Three parts:
- the job's life as pure functions over a small `Job` dataclass (`claimed`, `finished`,
  `recovered`, …): the rules for what may happen to a job live here, once;
- a store that applies them atomically: `JobStore` (one SQLite file, the default for one
  box) or `RedisJobStore` (shared by every machine, chosen with CDS_QUEUE_URL=redis://…).
  It is what `/jobs/<id>` shows and what de-duplicates: one job per (ImagingStudy, model set);
- `create_queue` / `register_triage_task`: a `huey` queue carrying job ids to the workers.

Delivery is at-least-once, effects exactly once:
- a job is *claimed* atomically (queued → running) before it runs, so a job id delivered
  twice (a re-sent notification, a recovered worker) runs once at a time;
- a running job holds a *lease* that its worker renews; when a worker dies (SIGKILL, power
  loss) the lease lapses and any worker puts the job back on the queue (`recovered`). The
  killed attempt counts, so a study that kills workers ends `failed` instead of looping;
- a queued job that nobody claims within CDS_JOB_REDELIVER_S is queued again (a queue
  message lost with a crashed process); a duplicate message finds the job claimed and stops;
- the FHIR write-back is idempotent (conditional creates, If-Match), so running twice writes once.

`failed` is the dead-letter state: a permanent error, or transient ones for every attempt
allowed. Its `reason` says which; an operator re-queues it (CLI or HTTP) with fresh attempts.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from huey import Huey, RedisHuey, SqliteHuey
from huey.exceptions import RetryTask

from . import metrics
from .errors import TransientError, TriageError
from .logs import hashed, log_context
from .settings import DRIFT_WINDOW_MAX

log = logging.getLogger(__name__)

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
RECENT_TRIAGES_KEPT = DRIFT_WINDOW_MAX  # per task, in Redis's index of done triages (the drift alarm's window)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    DONE = "done"
    NOT_APPLICABLE = "not_applicable"
    MODEL_UNAVAILABLE = "model_unavailable"
    FAILED = "failed"  # the dead-letter state: needs a person (see `reason`)

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.NOT_APPLICABLE, JobState.MODEL_UNAVAILABLE, JobState.FAILED)


UNFINISHED = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING)


class QueueUnavailableError(TransientError):
    """The job store or queue cannot be reached: nothing was accepted, the caller should retry."""


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
    """One triage job. `lease_until`: the time by which something must happen to it
    (its worker renews it while running); past it, `recovered` decides what to do."""

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
    queued_at: float = 0.0
    worker: str = ""
    lease_until: float = 0.0

    @property
    def dedup_key(self) -> str:
        return dedup_key(self.imaging_study_id, self.model_set)

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
            "queuedAt": self.queued_at,
            "updatedAt": self.updated_at,
            "worker": self.worker or None,
            "leaseUntil": self.lease_until or None,
            "result": self.result or None,
        }


def dedup_key(imaging_study_id: str, model_set: str) -> str:
    """One job per study and model set: a new model version triages the study again."""
    return f"{imaging_study_id}|{model_set}"


# --- the job's life, as pure functions (None: this transition does not apply) -----------------


def new_job(request: TriageRequest, model_set: str, now: float, redeliver_s: float) -> Job:
    return Job(id=str(uuid.uuid4()), imaging_study_id=request.imaging_study_id,
               service_request_id=request.service_request_id, source=request.source, model_set=model_set,
               state=JobState.QUEUED, created_at=now, updated_at=now, queued_at=now, lease_until=now + redeliver_s)


def resubmitted(job: Job, request: TriageRequest, now: float, redeliver_s: float) -> Job | None:
    """A trigger fired again for a failed job (e.g. the study was corrected): try again.

    A finished or in-flight job stays as it is: the same study is never triaged twice by
    the same models.
    """
    if job.state is not JobState.FAILED:
        return None
    return replace(job, state=JobState.QUEUED, reason="", attempts=0, updated_at=now, queued_at=now,
                   service_request_id=request.service_request_id or job.service_request_id,
                   worker="", lease_until=now + redeliver_s)


def claimed(job: Job, worker: str, now: float, lease_s: float) -> Job | None:
    """queued/retrying → running, holding a lease; None if it is running or finished."""
    if job.state not in (JobState.QUEUED, JobState.RETRYING):
        return None
    return replace(job, state=JobState.RUNNING, attempts=job.attempts + 1, worker=worker,
                   lease_until=now + lease_s, updated_at=now)


def holds(job: Job, worker: str | None) -> bool:
    """Does `worker` still hold this running job? (None: an operator, who always may.)"""
    return worker is None or (job.state is JobState.RUNNING and job.worker == worker)


def renewed(job: Job, worker: str, now: float, lease_s: float) -> Job | None:
    if not holds(job, worker):
        return None
    return replace(job, lease_until=now + lease_s)


def finished(job: Job, state: JobState, reason: str, result: dict[str, Any] | None, now: float,
             worker: str | None = None) -> Job | None:
    """The outcome of an attempt; refused when the worker lost its lease meanwhile."""
    if not holds(job, worker):
        return None
    return replace(job, state=state, reason=reason, result=result or {}, updated_at=now, lease_until=0.0)


def retry_scheduled(job: Job, worker: str | None, reason: str, delay_s: float, now: float,
                    redeliver_s: float) -> Job | None:
    """running → retrying after a transient fault; redelivered if the scheduled retry is lost."""
    if not holds(job, worker):
        return None
    return replace(job, state=JobState.RETRYING, reason=reason, updated_at=now,
                   lease_until=now + delay_s + redeliver_s)


def requeued(job: Job, now: float, redeliver_s: float) -> Job | None:
    """An operator re-runs a job. A failed (dead-letter) job gets a fresh set of attempts.

    None while a live worker runs it: its lease tells when it would be recovered anyway.
    """
    if job.state is JobState.RUNNING and job.lease_until > now:
        return None
    attempts = 0 if job.state is JobState.FAILED else job.attempts
    return replace(job, state=JobState.QUEUED, reason="", attempts=attempts, updated_at=now, queued_at=now,
                   worker="", lease_until=now + redeliver_s)


def recovered(job: Job, now: float, max_attempts: int, redeliver_s: float) -> Job | None:
    """What to do with an unfinished job whose lease lapsed; None if it has not.

    running: its worker stopped renewing (killed, hung past CDS_JOB_TIMEOUT_S) → queued
    again, or failed when that was the last attempt. queued/retrying: no worker took it
    in time (a lost queue message) → delivered again, same state.
    """
    if job.state.finished or job.lease_until > now:
        return None
    if job.state is JobState.RUNNING:
        why = f"worker {job.worker or '?'} stopped during attempt {job.attempts} (lease expired)"
        if job.attempts >= max_attempts:
            return replace(job, state=JobState.FAILED, reason=f"gave up after {job.attempts} attempts: {why}",
                           updated_at=now, lease_until=0.0)
        return replace(job, state=JobState.QUEUED, reason=f"re-queued: {why}", updated_at=now,
                       lease_until=now + redeliver_s)
    return replace(job, lease_until=now + redeliver_s)


def backoff_delay(attempt: int, base_s: float, cap_s: float = 300.0) -> float:
    """Exponential backoff with jitter, so retries of many jobs do not arrive together."""
    return random.uniform(0.5, 1.0) * min(cap_s, base_s * 2 ** max(0, attempt - 1))


# --- stores -------------------------------------------------------------------------------------


class BaseJobStore(ABC):
    """The job store's operations, built on two atomic primitives each backend provides:
    `_submit` (insert-or-get by de-duplication key) and `_update` (read-modify-write one job)."""

    def __init__(self, *, redeliver_s: float = 300.0, lease_s: float = 30.0) -> None:
        self.redeliver_s = redeliver_s
        self.lease_s = lease_s

    # -- backend primitives --

    @abstractmethod
    def _submit(self, key: str, create: Callable[[], Job], on_existing: Callable[[Job], Job | None]) -> tuple[Job, bool]:
        """Atomically: the job with this key, created or transformed; and whether it changed."""

    @abstractmethod
    def _update(self, job_id: str, change: Callable[[Job], Job | None]) -> tuple[Job | None, Job | None]:
        """Atomically: (job before, job after) — after is None when `change` declined."""

    @abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    def list(self, *, imaging_study_id: str | None = None, state: str | None = None, limit: int = 100) -> list[Job]:
        """Newest first."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Number of jobs in each state (every state present)."""

    @abstractmethod
    def lapsed(self, now: float, limit: int = 100) -> list[str]:
        """Ids of unfinished jobs whose lease is over."""

    @abstractmethod
    def heartbeat(self, worker: str, now: float) -> None: ...

    @abstractmethod
    def live_workers(self, since: float) -> list[str]: ...

    @abstractmethod
    def ping(self) -> None:
        """Raise QueueUnavailableError unless the store answers."""

    @abstractmethod
    def recent_triages(self, task: str, limit: int) -> Sequence[Job]:
        """The task's last `limit` done jobs (their result names the task), the latest finished first."""

    @abstractmethod
    def swap_flag(self, name: str, value: str) -> str | None:
        """Set a small flag shared by every process (a drift alarm's state); its value before, atomically."""

    # -- operations --

    def submit(self, request: TriageRequest, model_set: str) -> tuple[Job, bool]:
        """The job for this study and model set, and whether it needs (re)queueing."""
        now = time.time()
        return self._submit(dedup_key(request.imaging_study_id, model_set),
                            lambda: new_job(request, model_set, now, self.redeliver_s),
                            lambda job: resubmitted(job, request, now, self.redeliver_s))

    def claim(self, job_id: str, worker: str = "", lease_s: float | None = None) -> Job | None:
        """queued/retrying → running, atomically; None if someone else has it or it is finished."""
        return self._update(job_id, lambda job: claimed(job, worker, time.time(), lease_s or self.lease_s))[1]

    def renew(self, job_id: str, worker: str, lease_s: float | None = None) -> bool:
        """Extend the lease of a job this worker runs; False if it lost it."""
        return self._update(job_id, lambda job: renewed(job, worker, time.time(), lease_s or self.lease_s))[1] is not None

    def finish(self, job_id: str, state: JobState, reason: str = "", result: dict[str, Any] | None = None,
               worker: str | None = None) -> bool:
        """Record an attempt's outcome; with `worker`, only while it still holds the job."""
        return self._update(job_id, lambda job: finished(job, state, reason, result, time.time(), worker))[1] is not None

    def schedule_retry(self, job_id: str, reason: str, delay_s: float, worker: str | None = None) -> bool:
        return self._update(job_id, lambda job: retry_scheduled(job, worker, reason, delay_s, time.time(),
                                                                self.redeliver_s))[1] is not None

    def requeue(self, job_id: str) -> Job | None:
        """An operator's re-run: the job as it is now (still `running` if a live worker has it)."""
        before, after = self._update(job_id, lambda job: requeued(job, time.time(), self.redeliver_s))
        return after or before

    def recover(self, max_attempts: int, now: float | None = None) -> list[Job]:
        """Jobs whose lease lapsed, put back on their way; returns those to enqueue again."""
        now = time.time() if now is None else now
        to_enqueue = []
        for job_id in self.lapsed(now):
            _, after = self._update(job_id, lambda job: recovered(job, now, max_attempts, self.redeliver_s))
            if after is not None and not after.state.finished:
                to_enqueue.append(after)
            elif after is not None:
                log.warning("job dead-lettered: %s", after.reason, extra={"job": after.id})
        return to_enqueue


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

_COLUMNS = ("id", "dedup_key", "imaging_study_id", "service_request_id", "source", "model_set", "state", "reason",
            "attempts", "created_at", "updated_at", "result", "queued_at", "worker", "lease_until")
_ADDED_LATER = {"queued_at": "REAL NOT NULL DEFAULT 0", "worker": "TEXT NOT NULL DEFAULT ''",
                "lease_until": "REAL NOT NULL DEFAULT 0"}


def _job_from_row(row: Any) -> Job:
    return Job(id=row["id"], imaging_study_id=row["imaging_study_id"], service_request_id=row["service_request_id"] or None,
               source=row["source"], model_set=row["model_set"], state=JobState(row["state"]), reason=row["reason"],
               attempts=int(row["attempts"]), created_at=float(row["created_at"]), updated_at=float(row["updated_at"]),
               result=json.loads(row["result"] or "{}"), queued_at=float(row["queued_at"] or 0),
               worker=row["worker"] or "", lease_until=float(row["lease_until"] or 0))


def _job_to_row(job: Job) -> dict[str, Any]:
    row = asdict(job) | {"state": job.state.value, "result": json.dumps(job.result), "dedup_key": job.dedup_key}
    row["service_request_id"] = job.service_request_id or ""
    return {k: row[k] for k in _COLUMNS}


class JobStore(BaseJobStore):
    """Jobs in one SQLite file (WAL): the default, for a service and its workers on one box.

    Every method opens its own short connection (safe across threads and processes);
    `BEGIN IMMEDIATE` makes each read-modify-write atomic.
    """

    def __init__(self, path: Path, **options: float) -> None:
        super().__init__(**options)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_TABLES)
            present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, decl in _ADDED_LATER.items():  # a job file from an earlier version
                if column not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
            db.executescript(_INDEXES)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        try:
            with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
                db.row_factory = sqlite3.Row
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
        row = _job_to_row(job)
        if insert:
            db.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                       [row[c] for c in _COLUMNS])
        else:
            columns = [c for c in _COLUMNS if c != "id"]
            db.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?",
                       [row[c] for c in columns] + [job.id])

    def _submit(self, key: str, create: Callable[[], Job], on_existing: Callable[[Job], Job | None]) -> tuple[Job, bool]:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE dedup_key = ?", (key,)).fetchone()
            if row is None:
                job = create()
                self._write(db, job, insert=True)
                return job, True
            existing = _job_from_row(row)
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
            before = _job_from_row(row)
            after = change(before)
            if after is not None:
                self._write(db, after)
            return before, after

    def get(self, job_id: str) -> Job | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job_from_row(row) if row else None

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
            return [_job_from_row(row) for row in db.execute(query, args).fetchall()]

    def counts(self) -> dict[str, int]:
        with self._db() as db:
            found = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {state.value: int(found.get(state.value, 0)) for state in JobState}

    def lapsed(self, now: float, limit: int = 100) -> list[str]:
        marks = ",".join("?" * len(UNFINISHED))
        with self._db() as db:
            rows = db.execute(f"SELECT id FROM jobs WHERE state IN ({marks}) AND lease_until < ? LIMIT ?",
                              [s.value for s in UNFINISHED] + [now, limit]).fetchall()
        return [row["id"] for row in rows]

    def heartbeat(self, worker: str, now: float) -> None:
        with self._db() as db:
            db.execute("INSERT INTO workers (id, seen_at) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET seen_at = excluded.seen_at",
                       (worker, now))

    def live_workers(self, since: float) -> list[str]:
        with self._db() as db:
            return [row["id"] for row in db.execute("SELECT id FROM workers WHERE seen_at >= ? ORDER BY id", (since,))]

    def ping(self) -> None:
        with self._db() as db:
            db.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()

    def recent_triages(self, task: str, limit: int) -> Sequence[Job]:
        with self._db() as db:  # the partial index jobs_done_by_task answers this
            rows = db.execute("SELECT * FROM jobs WHERE state = 'done' AND json_extract(result, '$.task') = ? "
                              "ORDER BY updated_at DESC LIMIT ?", (task, limit)).fetchall()
        return [_job_from_row(row) for row in rows]

    def swap_flag(self, name: str, value: str) -> str | None:
        with self._transaction() as db:
            row = db.execute("SELECT value FROM flags WHERE name = ?", (name,)).fetchone()
            db.execute("INSERT INTO flags (name, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                       "value = excluded.value, updated_at = excluded.updated_at", (name, value, time.time()))
        return row["value"] if row else None


class RedisJobStore(BaseJobStore):
    """Jobs in Redis, shared by the web services and workers of several machines.

    A job is a hash; sorted sets index it by creation time (all, per state), by lease
    (unfinished jobs), a done job by finishing time per task (the latest RECENT_TRIAGES_KEPT)
    and a set by ImagingStudy. Each change is an optimistic transaction
    (WATCH the job's key, compute with the pure functions above, MULTI/EXEC; retried when
    another client changed it in between), so two workers never both claim a job.
    """

    def __init__(self, url: str, *, prefix: str = "cds-triage:", timeout_s: float = 10.0, **options: float) -> None:
        import redis

        super().__init__(**options)
        self.url = url
        self.prefix = prefix
        self._errors = (redis.RedisError,)
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                          decode_responses=True, health_check_interval=30)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            raise QueueUnavailableError(f"job store at Redis unavailable: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _decode(raw: dict[str, str]) -> Job | None:
        return _job_from_row(raw) if raw else None

    def _write(self, pipe: Any, before: Job | None, after: Job) -> None:
        """Queue (inside MULTI) the writes that store `after` and keep the indexes right."""
        pipe.hset(self._key("job", after.id), mapping={k: ("" if v is None else v) for k, v in _job_to_row(after).items()})
        if before is None:
            pipe.zadd(self._key("jobs"), {after.id: after.created_at})
            pipe.sadd(self._key("study", after.imaging_study_id), after.id)
        if before is None or before.state is not after.state:
            if before is not None:
                pipe.zrem(self._key("state", before.state.value), after.id)
            pipe.zadd(self._key("state", after.state.value), {after.id: after.created_at})
        if after.state.finished:
            pipe.zrem(self._key("leases"), after.id)
        else:
            pipe.zadd(self._key("leases"), {after.id: after.lease_until})
        task = after.result.get("task") if after.state is JobState.DONE else None
        was = before.result.get("task") if before is not None and before.state is JobState.DONE else None
        if was and was != task:
            pipe.zrem(self._key("triaged", str(was)), after.id)
        if task:
            pipe.zadd(self._key("triaged", str(task)), {after.id: after.updated_at})
            pipe.zremrangebyrank(self._key("triaged", str(task)), 0, -RECENT_TRIAGES_KEPT - 1)

    def _submit(self, key: str, create: Callable[[], Job], on_existing: Callable[[Job], Job | None]) -> tuple[Job, bool]:
        dedup = self._key("dedup", key)

        def attempt(pipe: Any) -> tuple[Job, bool]:
            existing_id = pipe.get(dedup)
            if existing_id is None:
                job = create()
                pipe.multi()
                pipe.set(dedup, job.id)
                self._write(pipe, None, job)
                return job, True
            pipe.watch(self._key("job", existing_id))
            existing = self._decode(pipe.hgetall(self._key("job", existing_id)))
            if existing is None:
                raise QueueUnavailableError(f"job store inconsistent: {dedup} names a missing job")
            changed = on_existing(existing)
            pipe.multi()
            if changed is None:
                return existing, False
            self._write(pipe, existing, changed)
            return changed, True

        with self._guard():
            return self.redis.transaction(attempt, dedup, value_from_callable=True)

    def _update(self, job_id: str, change: Callable[[Job], Job | None]) -> tuple[Job | None, Job | None]:
        key = self._key("job", job_id)

        def attempt(pipe: Any) -> tuple[Job | None, Job | None]:
            before = self._decode(pipe.hgetall(key))
            after = change(before) if before is not None else None
            pipe.multi()
            if after is not None:
                self._write(pipe, before, after)
            return before, after

        with self._guard():
            return self.redis.transaction(attempt, key, value_from_callable=True)

    def _many(self, ids: list[str]) -> list[Job]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._key("job", job_id))
        return [job for job in map(self._decode, pipe.execute()) if job is not None]

    def get(self, job_id: str) -> Job | None:
        with self._guard():
            return self._decode(self.redis.hgetall(self._key("job", job_id)))

    def list(self, *, imaging_study_id: str | None = None, state: str | None = None, limit: int = 100) -> list[Job]:
        with self._guard():
            if imaging_study_id:
                jobs = self._many(sorted(self.redis.smembers(self._key("study", imaging_study_id))))
                jobs = [j for j in jobs if not state or j.state.value == state]
                return sorted(jobs, key=lambda j: j.created_at, reverse=True)[:limit]
            index = self._key("state", state) if state else self._key("jobs")
            return self._many(self.redis.zrevrange(index, 0, limit - 1))

    def counts(self) -> dict[str, int]:
        with self._guard():
            pipe = self.redis.pipeline(transaction=False)
            for state in JobState:
                pipe.zcard(self._key("state", state.value))
            return {state.value: int(n) for state, n in zip(JobState, pipe.execute())}

    def lapsed(self, now: float, limit: int = 100) -> list[str]:
        with self._guard():
            return list(self.redis.zrangebyscore(self._key("leases"), "-inf", f"({now}", start=0, num=limit))

    def heartbeat(self, worker: str, now: float) -> None:
        with self._guard():
            self.redis.zadd(self._key("workers"), {worker: now})

    def live_workers(self, since: float) -> list[str]:
        with self._guard():
            return sorted(self.redis.zrangebyscore(self._key("workers"), since, "+inf"))

    def ping(self) -> None:
        with self._guard():
            self.redis.ping()

    def recent_triages(self, task: str, limit: int) -> Sequence[Job]:
        with self._guard():
            jobs = self._many([str(i) for i in self.redis.zrevrange(self._key("triaged", task), 0, limit - 1)])
        return [job for job in jobs if job.state is JobState.DONE]

    def swap_flag(self, name: str, value: str) -> str | None:
        with self._guard():
            before = self.redis.getset(self._key("flag", name), value)
        return None if before is None else str(before)


def is_redis_url(url: str) -> bool:
    return url.startswith(REDIS_SCHEMES)


def open_job_store(settings: Any) -> BaseJobStore:
    """The store the settings name: Redis (shared by machines) with CDS_QUEUE_URL=redis://…,
    else the SQLite file in CDS_DATA_DIR."""
    options = {"redeliver_s": settings.job_redeliver_s, "lease_s": settings.job_lease_s}
    if is_redis_url(settings.queue_url):
        return RedisJobStore(settings.queue_url, timeout_s=settings.http_timeout_s, **options)
    return JobStore(settings.job_db_path, **options)


# --- the queue and the task ------------------------------------------------------------------------


def create_queue(queue_url: str, queue_db_path: Path, name: str = "cds-triage", timeout_s: float = 10.0) -> Huey:
    """The huey instance: Redis when CDS_QUEUE_URL says redis://, else a SQLite file.

    Results are not kept (the job store holds them). Redis calls time out after
    `timeout_s` (longer than huey's 1 s blocking read).
    """
    if is_redis_url(queue_url):
        from redis import ConnectionPool

        pool = ConnectionPool.from_url(queue_url, socket_timeout=max(timeout_s, 5.0),
                                       socket_connect_timeout=max(timeout_s, 5.0), health_check_interval=30)
        return RedisHuey(name, connection_pool=pool, results=False)
    queue_db_path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(name, filename=str(queue_db_path), results=False, timeout=30)


# How an idle worker waits for work. Redis answers a blocking pop (BRPOP) the moment a job is queued,
# so the consumer never sleeps; these delays only space out its retries after a read error. SQLite
# cannot block, so an idle worker asks it every SQLITE_POLL_S (one index lookup, ~30 µs), where it
# used to back off to every 0.5 s: a study queued to an idle worker waited 0.25 s on average.
SQLITE_POLL_S = 0.02
REDIS_ERROR_DELAYS = {"initial_delay": 0.05, "max_delay": 0.5, "backoff": 1.15}


def consumer_delays(huey: Huey) -> dict[str, float]:
    """`Huey.create_consumer`'s polling delays for this queue's storage (see SQLITE_POLL_S)."""
    if getattr(huey.storage, "blocking", False):
        return dict(REDIS_ERROR_DELAYS)
    return {"initial_delay": SQLITE_POLL_S, "max_delay": SQLITE_POLL_S, "backoff": 1.0}


def worker_name() -> str:
    """How this worker process is named in job records and logs: host, pid and a nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class Leases:
    """The jobs this worker process runs now, and since when (the keeper renews their leases)."""

    worker: str = field(default_factory=worker_name)
    _held: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def holding(self, job_id: str) -> Iterator[None]:
        with self._lock:
            self._held[job_id] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(job_id, None)

    def held(self) -> dict[str, float]:
        """Job id → seconds it has been running here."""
        now = time.monotonic()
        with self._lock:
            return {job_id: now - since for job_id, since in self._held.items()}


JobRunner = Callable[[Job], tuple[JobState, str, dict[str, Any]]]
JobHook = Callable[[Job, JobState, dict[str, Any]], None]


def register_triage_task(huey: Huey, store: BaseJobStore, runner_factory: Callable[[], JobRunner], *,
                         max_attempts: int, retry_base_s: float, leases: Leases | None = None,
                         on_finished: JobHook | None = None, on_recorded: JobHook | None = None) -> Callable[[str], Any]:
    """Register the one task the queue carries: run job `job_id` once, retrying transient faults.

    `runner_factory` is called on first use in the worker process, so models load once
    per worker and never in the web process. `on_finished(job, state, result)` runs after
    a successful attempt, before the outcome is recorded (the audit trail); `on_recorded`
    after any outcome is recorded (the drift alarm), and its failure is only logged.
    """
    runner: list[JobRunner] = []
    leases = leases or Leases()
    runner_lock = threading.Lock()

    def get_runner() -> JobRunner:
        with runner_lock:
            if not runner:
                runner.append(runner_factory())
            return runner[0]

    @huey.task(name="triage_job")
    def triage_job(job_id: str) -> None:
        job = store.claim(job_id, leases.worker)
        if job is None:
            return  # finished, or another worker is on it
        with log_context(job=job.id, study=hashed(job.imaging_study_id)), leases.holding(job.id):
            log.info("job started", extra={"attempt": job.attempts, "source": job.source})
            try:
                state, reason, result = get_runner()(job)
                if on_finished is not None:
                    on_finished(job, state, result)
            except TransientError as exc:
                metrics.count_retry("transient")
                if job.attempts >= max_attempts:
                    _record(job, JobState.FAILED, f"gave up after {job.attempts} attempts: {exc}", {}, exc)
                    return
                delay = exc.retry_after or backoff_delay(job.attempts, retry_base_s)
                if store.schedule_retry(job.id, f"attempt {job.attempts} failed, retrying in {delay:.1f}s: {exc}",
                                        delay, worker=leases.worker):
                    log.info("job will be retried", extra={"attempt": job.attempts, "delay_s": round(delay, 2),
                                                           "error": type(exc).__name__})
                    raise RetryTask(delay=delay) from exc
                log.warning("job lost its lease during a failed attempt; its new holder decides")
                return
            except TriageError as exc:
                _record(job, JobState.FAILED, str(exc), {}, exc)
                return
            except Exception as exc:  # a bug must not leave the job 'running' forever
                _record(job, JobState.FAILED, f"internal error: {type(exc).__name__}: {exc}", {}, exc)
                raise
            _record(job, state, reason, result)

    def _record(job: Job, state: JobState, reason: str, result: dict[str, Any], error: Exception | None = None) -> None:
        """Store the outcome; logs carry the error's kind, never its text (it may name resources)."""
        if not store.finish(job.id, state, reason, result, worker=leases.worker):
            log.warning("job lost its lease before finishing; outcome not recorded", extra={"outcome": state.value})
            return
        metrics.observe_finished(state.value, time.time() - (job.queued_at or job.created_at))
        log.info("job finished", extra={"outcome": state.value, "attempt": job.attempts,
                                        **({"error": type(error).__name__} if error else {})})
        if on_recorded is not None:
            try:
                on_recorded(job, state, result)
            except Exception:  # noqa: BLE001 - the outcome is recorded; a monitor's failure must not touch it
                log.exception("after-outcome hook failed")

    triage_job.leases = leases  # type: ignore[attr-defined]
    return triage_job
