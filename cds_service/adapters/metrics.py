"""Prometheus metrics for operators (`GET /metrics`).

The service is several processes (gunicorn workers, one or more `cds-triage worker`s, maybe
on several machines), so the numbers come from two places:

- **state**, read from the job store when Prometheus scrapes (`JobStoreCollector`): jobs by
  state and live workers, and each task's drift window (`DriftCollector`, see drift.py). The
  store is the truth and is shared (by every machine, on Redis), so every `serve` reports the
  same totals: aggregate these with `max`, not `sum`.
- **events**, counted where they happen (time-to-triage, model latency, retries, FHIR/PACS
  errors) with prometheus_client's multiprocess mode: each process writes its counters to
  files in `CDS_DATA_DIR/metrics`, and `/metrics` adds up the files of every process on
  this machine. A machine that runs only workers serves them on `CDS_WORKER_METRICS_PORT`.

Without `configure()` (library use, unit tests) the events are kept in this process only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

if TYPE_CHECKING:
    from cds_service.core.domain import Task
    from cds_service.drift import TaskDrift
    from cds_service.jobs.state import BaseJobStore

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TIME_TO_TRIAGE_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200)
MODEL_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


def configure(metrics_dir: Path) -> None:
    """Turn on multiprocess mode for this process (and the processes it forks).

    Must run before the first metric is used; `serve` and `worker` call it at start-up.
    """
    metrics_dir = Path(metrics_dir).resolve()
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(metrics_dir)
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # in case prometheus_client was imported before


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


@dataclass(frozen=True)
class Instruments:
    registry: Any
    time_to_triage: Any
    model_latency: Any
    retries: Any
    upstream_errors: Any
    finished: Any


@lru_cache(maxsize=1)
def instruments() -> Instruments:
    """The event metrics, made on first use (after `configure`, which decides where they live)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    return Instruments(
        registry=registry,
        time_to_triage=Histogram(
            "cds_triage_time_to_triage_seconds", "From a job being queued to its outcome, by outcome",
            ["outcome"], buckets=TIME_TO_TRIAGE_BUCKETS, registry=registry),
        model_latency=Histogram(
            "cds_triage_model_latency_seconds",
            "Retrieval, decoding and inference (overlapped) and Grad-CAM of one study, by task",
            ["task"], buckets=MODEL_LATENCY_BUCKETS, registry=registry),
        retries=Counter("cds_triage_job_retries", "Job attempts that will be retried, by cause",
                        ["cause"], registry=registry),
        upstream_errors=Counter("cds_triage_upstream_errors", "Failed calls to the FHIR server or the PACS",
                                ["server", "kind"], registry=registry),
        finished=Counter("cds_triage_jobs_finished", "Jobs that reached an outcome, by outcome",
                         ["outcome"], registry=registry),
    )


# --- what the code calls where things happen -----------------------------------------------------


def observe_finished(outcome: str, seconds: float) -> None:
    m = instruments()
    m.finished.labels(outcome=outcome).inc()
    m.time_to_triage.labels(outcome=outcome).observe(max(0.0, seconds))


def observe_model_latency(task: str, seconds: float) -> None:
    instruments().model_latency.labels(task=task).observe(seconds)


def count_retry(cause: str) -> None:
    instruments().retries.labels(cause=cause).inc()


def count_upstream_error(server: str, kind: str) -> None:
    """`server`: fhir or pacs; `kind`: timeout, unreachable, or http_<status>."""
    instruments().upstream_errors.labels(server=server, kind=kind).inc()


# --- scraping ------------------------------------------------------------------------------------


class JobStoreCollector:
    """Jobs by state and live workers, read from the shared job store at scrape time."""

    def __init__(self, store: "BaseJobStore", live_within_s: float) -> None:
        self.store = store
        self.live_within_s = live_within_s

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from cds_service.core.errors import QueueUnavailableError

        up = GaugeMetricFamily("cds_triage_job_store_up", "1 if the job store answered this scrape")
        try:
            counts = self.store.counts()
            workers = self.store.live_workers(time.time() - self.live_within_s)
        except QueueUnavailableError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("cds_triage_jobs", "Jobs in the job store, by state", labels=["state"])
        for state, count in counts.items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("cds_triage_workers_alive", "Workers that renewed their heartbeat recently",
                                value=len(workers))


class DriftCollector:
    """Per task, the drift window (drift.py) read from the job store at scrape time: the share raised,
    how many studies it holds, the band, whether the alarm is on, and quantiles of the study scores."""

    def __init__(self, report: "Callable[[], Mapping[Task, TaskDrift]]") -> None:
        self.report = report

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from cds_service.core.errors import QueueUnavailableError

        try:
            drifts = self.report()
        except QueueUnavailableError:
            return  # cds_triage_job_store_up says so
        share = GaugeMetricFamily("cds_triage_drift_raised_share",
                                  "Share of the task's last studies (done triages, shadow included) raised", labels=["task"])
        studies = GaugeMetricFamily("cds_triage_drift_window_studies",
                                    "Done triages in the task's drift window (at most CDS_DRIFT_WINDOW)", labels=["task"])
        band = GaugeMetricFamily("cds_triage_drift_expected_share",
                                 "The band of shares raised the task's card (or CDS_DRIFT_BANDS) expects", labels=["task", "bound"])
        alarm = GaugeMetricFamily("cds_triage_drift_alarm",
                                  "1 while the share raised over the window lies beyond chance outside the band",
                                  labels=["task"])
        score = GaugeMetricFamily("cds_triage_drift_score",
                                  "Quantiles of the study scores (deciding probability) in the task's drift window",
                                  labels=["task", "quantile"])
        for task, drift in drifts.items():
            studies.add_metric([task.value], drift.studies)
            alarm.add_metric([task.value], 1 if drift.alarm else 0)
            if drift.share is not None:
                share.add_metric([task.value], drift.share)
            if drift.band is not None:
                band.add_metric([task.value, "low"], drift.band.low)
                band.add_metric([task.value, "high"], drift.band.high)
            for q, value in drift.score_quantiles().items():
                score.add_metric([task.value, f"{q:g}"], value)
        yield from (share, studies, band, alarm, score)


def _event_registry() -> Any:
    """This machine's event metrics: every process's files in multiprocess mode, else this process."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    if not multiprocess():
        return instruments().registry
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


def render(store: "BaseJobStore | None", live_within_s: float = 90.0,
           drift: "Callable[[], Mapping[Task, TaskDrift]] | None" = None) -> bytes:
    """The text exposition for `/metrics`: job-store state (if given), drift windows (if given) and event metrics."""
    from prometheus_client import CollectorRegistry, generate_latest

    instruments()  # so every metric family appears, with zero counts, from the first scrape
    state = b""
    if store is not None:
        registry = CollectorRegistry()
        registry.register(JobStoreCollector(store, live_within_s))
        if drift is not None:
            registry.register(DriftCollector(drift))
        state = generate_latest(registry)
    return state + generate_latest(_event_registry())


def serve_worker_metrics(port: int, host: str) -> None:
    """For a machine without `serve`: this machine's event metrics on http://host:port/metrics."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=_event_registry())
