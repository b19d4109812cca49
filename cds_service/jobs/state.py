"""A job's life as pure functions over a small `Job` dataclass, and the store's interface (`BaseJobStore`).

The rules for what may happen to a job live here, once; the stores apply them atomically."""

from __future__ import annotations

import builtins
import enum
import json
import logging
import random
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence


from cds_service.core.settings import DRIFT_WINDOW_MAX


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
    def list(self, *, imaging_study_id: str | None = None, state: str | None = None, limit: int = 100) -> builtins.list[Job]:
        """Newest first."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Number of jobs in each state (every state present)."""

    @abstractmethod
    def lapsed(self, now: float, limit: int = 100) -> builtins.list[str]:
        """Ids of unfinished jobs whose lease is over."""

    @abstractmethod
    def heartbeat(self, worker: str, now: float) -> None: ...

    @abstractmethod
    def live_workers(self, since: float) -> builtins.list[str]: ...

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

    def recover(self, max_attempts: int, now: float | None = None) -> builtins.list[Job]:
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


#: A Job as a flat row (SQLite columns, Redis hash fields): the stores share this mapping.
ROW_COLUMNS = ("id", "dedup_key", "imaging_study_id", "service_request_id", "source", "model_set", "state", "reason",
            "attempts", "created_at", "updated_at", "result", "queued_at", "worker", "lease_until")


def job_from_row(row: Any) -> Job:
    return Job(id=row["id"], imaging_study_id=row["imaging_study_id"], service_request_id=row["service_request_id"] or None,
               source=row["source"], model_set=row["model_set"], state=JobState(row["state"]), reason=row["reason"],
               attempts=int(row["attempts"]), created_at=float(row["created_at"]), updated_at=float(row["updated_at"]),
               result=json.loads(row["result"] or "{}"), queued_at=float(row["queued_at"] or 0),
               worker=row["worker"] or "", lease_until=float(row["lease_until"] or 0))


def job_to_row(job: Job) -> dict[str, Any]:
    row = asdict(job) | {"state": job.state.value, "result": json.dumps(job.result), "dedup_key": job.dedup_key}
    row["service_request_id"] = job.service_request_id or ""
    return {k: row[k] for k in ROW_COLUMNS}
