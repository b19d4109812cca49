"""The huey queue carrying job ids to the workers, the store the settings name, leases and the triage task."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from huey import Huey, RedisHuey, SqliteHuey
from huey.exceptions import RetryTask

from cds_service.adapters import metrics
from cds_service.core.errors import TransientError, TriageError
from ..logs import hashed, log_context

from .state import BaseJobStore, Job, JobState, REDIS_SCHEMES, backoff_delay
from .sqlite_store import JobStore
from .redis_store import RedisJobStore

log = logging.getLogger(__name__)

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
