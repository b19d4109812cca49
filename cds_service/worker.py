"""`cds-triage worker`: the process that runs triage jobs from the queue.

Models load once per worker process, on the first job. Beside the queue consumer runs one
*keeper* thread, every third of CDS_JOB_LEASE_S:
- it renews the lease of each job this worker runs (up to CDS_JOB_TIMEOUT_S per attempt),
  and says this worker is alive;
- it recovers jobs whose lease lapsed — their worker was killed (SIGKILL, power loss, OOM),
  on this machine or another — and puts them back on the queue. A restarted or a second
  worker therefore picks up a killed worker's job within about one lease.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from cds_service.adapters import metrics
from cds_service.adapters.audit import open_write_back_trail, write_back_event
from .drift import alarm_hook
from cds_service.core.decoding import decode_pool
from .jobs.state import BaseJobStore, Job, JobState
from .jobs.queue import Leases, consumer_delays, create_queue, open_job_store, register_triage_task
from cds_service.core.errors import QueueUnavailableError
from cds_service.core.domain import Task
from cds_service.core.model_cards import available_cards
from cds_service.core.models import ModelRegistry, uses_onnx_runtime
from cds_service.core.onnx_graphs import exported_graph
from cds_service.adapters.pacs import Pacs, pacs_from_settings
from .pipeline import PipelineDeps, run_triage
from cds_service.core.settings import Settings
from cds_service.adapters.smart_auth import fhir_auth, fhir_client

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on musl and macOS
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the operating system, after each job.

    glibc keeps what a job freed (a 2048² X-ray's float copies, ONNX Runtime's activations) in
    per-thread arenas, so a worker's resident memory ratchets up towards the sum of every
    thread's worst job. Measured with two worker threads: peak 1.60 GB without, 1.43 GB with.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def onnx_dir(settings: Settings) -> Path:
    """Where workers keep exported ONNX graphs (shared by the workers of one data folder)."""
    return settings.data_dir / "onnx"


def prepare_models(settings: Settings) -> dict[Task, tuple[bool, str]]:
    """Export each available model's ONNX graph ahead of the first study (`cds-triage
    prepare-models`, e.g. before the workers start after new weights), so that study does not
    wait for the export (about 8 s a model on two cores). Each task's outcome: whether it
    went well (False: the export failed), and what happened, in words."""
    if not uses_onnx_runtime(settings.inference_runtime, settings.device):
        return {task: (True, f"nothing to export: models run in torch (CDS_INFERENCE_RUNTIME="
                             f"{settings.inference_runtime}, CDS_DEVICE={settings.device})") for task in Task}
    cards = available_cards(settings.weights_dir)
    outcome: dict[Task, tuple[bool, str]] = {}
    for task in Task:
        if task not in cards:
            outcome[task] = (True, f"no weights in {settings.weights_dir}: nothing to export")
            continue
        try:
            outcome[task] = (True, f"ready: {exported_graph(settings.weights_dir, task, onnx_dir(settings))}")
        except Exception as exc:  # noqa: BLE001 - reported per task; workers fall back to torch
            outcome[task] = (False, f"failed: {exc}")
    return outcome


def build_deps(settings: Settings) -> PipelineDeps:
    """The worker's adapters: one FHIR client, one model registry, one PACS client per URL."""

    @lru_cache(maxsize=8)
    def pacs_for(url: str) -> Pacs:
        return pacs_from_settings(settings, url)

    return PipelineDeps(
        settings=settings,
        fhir=fhir_client(settings, fhir_auth(settings)),  # SMART Backend Services when configured
        models=ModelRegistry(settings.weights_dir, settings.device, settings.inference_runtime, settings.inference_threads,
                             onnx_dir=onnx_dir(settings), site_thresholds=settings.site_thresholds),
        pacs_for=pacs_for,
    )


def keep_leases(store: BaseJobStore, leases: Leases, enqueue: Callable[[str], Any], settings: Settings,
                now: float | None = None) -> list[Job]:
    """One round of the keeper: heartbeat, renew held leases, recover lapsed jobs (returned)."""
    now = time.time() if now is None else now
    store.heartbeat(leases.worker, now)
    for job_id, running_s in leases.held().items():
        if running_s > settings.job_timeout_s:
            log.warning("attempt exceeds CDS_JOB_TIMEOUT_S; its lease is left to lapse", extra={"job": job_id})
            continue
        if not store.renew(job_id, leases.worker):
            log.warning("lost the lease of a running job (recovered elsewhere)", extra={"job": job_id})
    recovered = store.recover(settings.job_retries, now)
    for job in recovered:
        metrics.count_retry("lease_expired" if job.reason.startswith("re-queued") else "redelivered")
        enqueue(job.id)
        log.warning("job put back on the queue", extra={"job": job.id, "state": job.state.value,
                                                        "attempts": job.attempts})
    return recovered


def start_keeper(store: BaseJobStore, leases: Leases, enqueue: Callable[[str], Any], settings: Settings) -> threading.Thread:
    """The keeper thread (a daemon: it dies with the worker, which is what lets leases lapse)."""
    interval = max(0.2, settings.job_lease_s / 3)

    def loop() -> None:
        while True:
            try:
                keep_leases(store, leases, enqueue, settings)
            except QueueUnavailableError as exc:
                log.warning("job store unavailable; leases not renewed this round", extra={"error": str(exc)})
            except Exception:  # noqa: BLE001 - the keeper must outlive any single failure
                log.exception("lease keeper round failed")
            time.sleep(interval)

    thread = threading.Thread(target=loop, name="lease-keeper", daemon=True)
    thread.start()
    return thread


def audit_hook(settings: Settings, worker: str) -> Callable[[Job, JobState, dict[str, Any]], None]:
    """Append what a finished triage wrote, and where, to the audit trail (before the job is marked done)."""
    trail = open_write_back_trail(settings)

    def record(job: Job, state: JobState, result: dict[str, Any]) -> None:
        if state is not JobState.DONE or not result.get("written"):
            return
        try:
            trail.append(write_back_event(job.id, job.imaging_study_id, worker, settings.fhir_base_url, result))
        except Exception as exc:  # noqa: BLE001 - no write without its audit record: retry the job
            raise QueueUnavailableError(f"audit trail unavailable: {type(exc).__name__}: {exc}") from exc

    return record


def run_worker(settings: Settings, prepare: bool = False) -> None:
    """Consume the queue until stopped. A job cut short by the stop is recovered by its lease.

    `prepare` (`cds-triage worker --prepare-models`): export the models' graphs before the first
    job rather than during it; a failed export is logged and that model falls back to torch.
    """
    if prepare:
        for task, (ok, what) in prepare_models(settings).items():
            (log.info if ok else log.warning)(f"model {task.value}: {what}")
    metrics.configure(settings.metrics_dir)
    if settings.worker_metrics_port:
        metrics.serve_worker_metrics(settings.worker_metrics_port, settings.host)
    store = open_job_store(settings)
    huey = create_queue(settings.queue_url, settings.queue_db_path, timeout_s=settings.http_timeout_s)
    leases = Leases()

    def runner_factory():  # type: ignore[no-untyped-def]
        deps = build_deps(settings)

        def run(job: Job) -> tuple[JobState, str, dict[str, Any]]:
            try:
                return run_triage(job, deps)
            finally:
                release_free_memory()

        return run

    triage_job = register_triage_task(huey, store, runner_factory, max_attempts=settings.job_retries,
                                retry_base_s=settings.job_retry_delay_s, leases=leases,
                                on_finished=audit_hook(settings, leases.worker), on_recorded=alarm_hook(store, settings))
    # Studies announced by the PACS (POST /pacs/studies) are resolved here, then queued as triage jobs.
    from cds_service.web.context import ServiceContext
    from cds_service.core.model_cards import model_set_version
    from cds_service.web.pacs_trigger import register_arrival_task

    register_arrival_task(huey, ServiceContext(settings=settings, store=store, enqueue=triage_job,
                                               model_set=model_set_version(settings.weights_dir)))
    log.info("worker started", extra={"worker": leases.worker, "threads": settings.workers})
    start_keeper(store, leases, triage_job, settings)
    # the decoder processes start beside the consumer, so the first study does not wait for them
    threading.Thread(target=warm_decoders, args=(settings,), name="decoders", daemon=True).start()
    consumer = huey.create_consumer(workers=settings.workers, worker_type="thread", periodic=False,
                                    **consumer_delays(huey))
    consumer.run()


def warm_decoders(settings: Settings) -> None:
    try:
        decode_pool(settings.decode_processes).warm()
    except Exception:  # noqa: BLE001 - the first study starts them, or says why it cannot
        log.exception("decoder processes did not start")
