"""`cds-triage worker`: the process that runs triage jobs from the queue.

Models load once per worker process, on the first job. On start, jobs left `running` by
a worker that died (SIGKILL, power loss) are put back on the queue.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

from .fhir_client import FhirClient
from .jobs import Job, JobStore, create_queue, register_triage_task
from .models import ModelRegistry
from .pacs import Pacs, PacsConfig
from .pipeline import PipelineDeps, run_triage
from .settings import Settings

log = logging.getLogger(__name__)

STALE_JOB_S = 600.0


def configure_torch(settings: Settings) -> None:
    """Threads that fit the machine: all cores by default, fewer when several workers share it."""
    import torch

    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // max(1, settings.workers))
    torch.set_num_threads(threads)


def build_deps(settings: Settings) -> PipelineDeps:
    """The worker's adapters: one FHIR client, one model registry, one PACS client per URL."""

    @lru_cache(maxsize=8)
    def pacs_for(url: str) -> Pacs:
        return Pacs(PacsConfig(url=url, username=settings.dicomweb_username, password=settings.dicomweb_password,
                               bearer_token=settings.dicomweb_bearer_token, timeout_s=settings.http_timeout_s))

    return PipelineDeps(
        settings=settings,
        fhir=FhirClient(settings.fhir_base_url, timeout_s=settings.http_timeout_s, bearer_token=settings.fhir_bearer_token),
        models=ModelRegistry(settings.weights_dir, settings.device),
        pacs_for=pacs_for,
    )


def run_worker(settings: Settings) -> None:
    """Consume the queue until stopped (SIGINT/SIGTERM finish the job in hand first)."""
    configure_torch(settings)
    store = JobStore(settings.job_db_path)
    huey = create_queue(settings.queue_url, settings.queue_db_path)

    def runner_factory():  # type: ignore[no-untyped-def]
        deps = build_deps(settings)
        return lambda job: run_triage(job, deps)

    task = register_triage_task(huey, store, runner_factory, max_attempts=settings.job_retries,
                                retry_base_s=settings.job_retry_delay_s)
    for job in store.stale_running(STALE_JOB_S):
        recovered: Job | None = store.requeue(job.id)
        if recovered:
            task(recovered.id)
            log.warning("re-queued job %s left %s by a stopped worker", job.id, job.state.value)
    consumer = huey.create_consumer(workers=settings.workers, worker_type="thread", periodic=False,
                                    initial_delay=0.05, max_delay=0.5, backoff=1.15)
    consumer.run()
