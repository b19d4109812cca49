"""`cds-triage demo`: the whole product on one machine, on loopback.

Starts Orthanc (DICOMweb), the FHIR server, `cds-triage serve` and `cds-triage worker`,
registers our Subscription, then plays the EHR: for each sample study it stores the images
in the PACS and creates Patient, ServiceRequest (routine) and ImagingStudy in the FHIR
server. The Subscription does the rest. It prints what each study became, and the worklist.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pydicom

import cds_service
from fhir_mappings.imaging_study import build_imaging_study

from cds_devtools.devservers import LOOPBACK, ManagedProcess, free_port, http_ok, start_fhir_server, start_orthanc, stopped_like_ctrl_c, upload_dicom
from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.domain import PacsResult
from cds_service.core.settings import Settings
from cds_service.adapters.subscribe import ensure_subscription

SAMPLES_DIR = Path(cds_service.__file__).resolve().parent / "samples"


@dataclass
class ServiceProcesses:
    """`serve` and its worker(s) as child processes, configured through CDS_ variables."""

    serve: ManagedProcess
    worker: ManagedProcess
    more_workers: list[ManagedProcess] = field(default_factory=list)

    @property
    def workers(self) -> list[ManagedProcess]:
        return [self.worker, *self.more_workers]

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.serve.stop()


def start_worker(settings: Settings, logdir: Path, index: int = 0, prepare_models: bool = False) -> ManagedProcess:
    """One `cds-triage worker` process (its log: worker.log, worker-1.log, …)."""
    import os

    name = "worker" if index == 0 else f"worker-{index}"
    command = [sys.executable, "-m", "cds_service.cli", "worker"] + (["--prepare-models"] if prepare_models else [])
    return ManagedProcess(f"cds-{name}", command, url="",
                          log_path=logdir / f"{name}.log", env={**os.environ, **settings.to_env()}).start()


def start_service(settings: Settings, logdir: Path, *, http_workers: int = 1, workers: int = 1) -> ServiceProcesses:
    """Start the web service and `workers` worker processes; returns when /healthz answers."""
    import os

    env = {**os.environ, **settings.to_env()}
    python = sys.executable
    serve = ManagedProcess("cds-serve", [python, "-m", "cds_service.cli", "serve", "--http-workers", str(http_workers)],
                           url=settings.public_url, log_path=logdir / "serve.log", env=env).start()
    started = [start_worker(settings, logdir, index) for index in range(max(1, workers))]
    try:
        serve.wait_ready(lambda: http_ok(f"{settings.public_url}/healthz"), timeout=60)
    except BaseException:
        for worker in started:
            worker.stop()
        serve.stop()
        raise
    return ServiceProcesses(serve=serve, worker=started[0], more_workers=started[1:])


def load_manifest(samples_dir: Path = SAMPLES_DIR, *, demo_only: bool = False) -> list[dict[str, Any]]:
    """The sample studies; `demo_only` leaves out those whose truth is unknown (kept for the tests)."""
    studies = json.loads((samples_dir / "manifest.json").read_text())["studies"]
    return [s for s in studies if s.get("in_demo", True)] if demo_only else studies


def truth_of(sample: dict[str, Any]) -> str:
    """What the source images' labels say, printed beside the AI's result."""
    labels = sample.get("expected_positive_labels")
    if labels is None:
        return sample.get("expected_finding") or "unknown"
    return ", ".join(labels) if labels else (sample.get("expected_finding") or "negative")


def ehr_order(sample: dict[str, Any], index: int, study_files: list[Path]) -> list[dict[str, Any]]:
    """Patient, ServiceRequest and ImagingStudy as an EHR would create them for a sample."""
    first = pydicom.dcmread(str(study_files[0]), stop_before_pixels=True)
    patient_id, order_id = f"demo-patient-{index}", f"demo-order-{index}"
    given, _, family = sample["patient_name"].partition(" ")
    authored = datetime.now(timezone.utc) - timedelta(minutes=10 * (index + 1))
    patient = {
        "resourceType": "Patient", "id": patient_id,
        "identifier": [{"system": "urn:demo:mrn", "value": str(first.PatientID)}],
        "name": [{"family": family or given, "given": [given]}],
        "gender": sample.get("gender", "unknown"), "birthDate": sample.get("birth_date", "1960-01-01"),
    }
    order = {
        "resourceType": "ServiceRequest", "id": order_id, "status": "active", "intent": "order",
        "priority": "routine", "subject": {"reference": f"Patient/{patient_id}"},
        "code": {"text": str(getattr(first, "SeriesDescription", "") or "Imaging")},
        "authoredOn": authored.isoformat(timespec="seconds"),
    }
    study = build_imaging_study([pydicom.dcmread(str(f), stop_before_pixels=True) for f in study_files],
                                patient_id=patient_id, service_request_id=order_id, study_id=f"demo-study-{index}")
    return [patient, order, study.model_dump(mode="json", exclude_none=True)]


def wait_for_jobs(settings: Settings, study_ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Poll /jobs until every study's job has finished (or the time is up)."""
    finished: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=settings.public_url, timeout=10) as client:
        while time.monotonic() < deadline and len(finished) < len(study_ids):
            for study_id in study_ids:
                jobs = client.get("/jobs", params={"imagingStudy": study_id}).json()["jobs"]
                if jobs and jobs[0]["status"] in ("done", "failed", "not_applicable", "model_unavailable"):
                    finished[study_id] = jobs[0]
            time.sleep(0.5)
    return finished


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether `port` can be bound on `host` now (as `serve` checks it: `web.listen.address_problem`)."""
    from cds_service.web.listen import address_problem

    return address_problem(host, port) is None


class PortInUseError(RuntimeError):
    """The port asked for with `demo --port` is taken."""


def demo_port(requested: int | None, default: int) -> int:
    """The service's port: `--port` (0: a free one), else CDS_PORT (8000) when it is free, so the worklist's URL
    is the same from one demo to the next; else a free port, and the demo says so."""
    if requested == 0:
        return free_port()
    if requested is not None:
        if not port_is_free(requested):
            raise PortInUseError(f"port {requested} (--port) is in use on {LOOPBACK}: stop what uses it, "
                                 "or run the demo without --port (or with --port 0 for any free port)")
        return requested
    if not default:  # CDS_PORT=0: any free port
        return free_port()
    if port_is_free(default):
        return default
    chosen = free_port()
    print(f"==> port {default} (CDS_PORT) is in use on {LOOPBACK}: the service takes port {chosen} instead")
    return chosen


def run_demo(settings: Settings, *, workdir: Path | None = None, keep_running: bool = True, port: int | None = None) -> int:
    """The demo in a folder of the caller's (kept) or a temp folder of its own, removed when the
    demo ends well and kept, with the servers' logs, when it does not. The service's port: `demo_port`."""
    try:
        port = demo_port(port, settings.port)
    except PortInUseError as exc:
        print(f"cds-triage demo: {exc}", file=sys.stderr)
        return 2
    own_workdir = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="cds-triage-demo-"))
    with stopped_like_ctrl_c():  # `kill` or a closed terminal stop the demo as Ctrl-C does
        code = 1
        try:
            code = _run_demo(settings, workdir, own_workdir, keep_running, port)
            return code
        finally:
            if own_workdir and code == 0:
                shutil.rmtree(workdir, ignore_errors=True)
            elif own_workdir:
                print(f"==> the servers' logs and data are kept in {workdir}", file=sys.stderr)


def _run_demo(settings: Settings, workdir: Path, own_workdir: bool, keep_running: bool, port: int) -> int:
    processes: list[Any] = []
    try:
        where = f"{workdir}, removed when the demo stops" if own_workdir else str(workdir)
        print(f"==> starting Orthanc and the FHIR server (data in {where})")
        orthanc = start_orthanc(workdir / "orthanc")
        processes.append(orthanc)
        fhir_server = start_fhir_server(workdir / "fhir")
        processes.append(fhir_server)
        settings = replace(
            settings, host="127.0.0.1", port=port, public_url=f"http://127.0.0.1:{port}",
            fhir_base_url=fhir_server.url, dicomweb_url=orthanc.dicomweb_url, data_dir=workdir / "service",
            subscription_secret=settings.subscription_secret or secrets.token_urlsafe(24),
            # The demo stores the DICOM SR and the Grad-CAM Secondary Capture in Orthanc too, unless
            # CDS_RESULTS_TO_PACS (or the older CDS_HEATMAP_TO_PACS) says otherwise.
            results_to_pacs=settings.results_to_pacs if {"CDS_RESULTS_TO_PACS", "CDS_HEATMAP_TO_PACS"} & set(os.environ)
            else frozenset(PacsResult),
            operator_open_on_loopback=True,  # the demo's own loopback servers: /jobs for the table below
        )
        print("==> starting the triage service and a worker")
        service = start_service(settings, workdir / "service")
        processes.append(service)
        subscription_id, _ = ensure_subscription(settings, f"{settings.public_url}/fhir-notify")
        print(f"==> Subscription/{subscription_id} notifies {settings.public_url}/fhir-notify")

        fhir = FhirClient(settings.fhir_base_url)
        study_ids = []
        samples = load_manifest(demo_only=True)
        for index, sample in enumerate(samples):
            files = sorted((SAMPLES_DIR / sample["folder"]).glob("*.dcm"))
            upload_dicom(orthanc.url, files)
            for resource in ehr_order(sample, index, files):
                fhir.update(resource, if_match=None)
            study_ids.append(f"demo-study-{index}")
        print(f"==> {len(samples)} sample studies stored in the PACS and ordered in the EHR; triaging…")
        finished = wait_for_jobs(settings, study_ids, timeout_s=300)
        for index, sample in enumerate(samples):
            job = finished.get(study_ids[index])
            print("   " + describe_outcome(sample, job))
        print(f"\nWorklist:  {settings.public_url}/worklist")
        print(f"FHIR:      {settings.fhir_base_url}    PACS: {orthanc.url}")
        if keep_running:
            print("Press Ctrl-C to stop.")
            while True:
                time.sleep(3600)
        return 0 if len(finished) == len(study_ids) else 1
    except KeyboardInterrupt:
        return 0
    finally:
        for process in reversed(processes):
            process.stop()


def describe_outcome(sample: dict[str, Any], job: dict[str, Any] | None) -> str:
    label = f"{sample['patient_name']:<16} {sample['description']:<34} truth {truth_of(sample):<22}"
    if job is None:
        return f"{label} not finished in time"
    result = job.get("result") or {}
    positives = [f"{f['label']} {f['probability']:.0%}" for f in result.get("findings") or [] if f["positive"]]
    change = result.get("priority") or {}
    priority = f"{change.get('from') or 'routine'} → {change['to']}" if change.get("changed") else "unchanged"
    if result.get("mode") == "shadow":
        priority += " (shadow)"
    detail = ", ".join(positives) or (job.get("reason") or "no finding above threshold")
    return f"{label} {job['status']:<18} priority {priority:<18} {detail}"
