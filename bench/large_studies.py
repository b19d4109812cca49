#!/usr/bin/env python
"""Large head CT studies: time-to-triage, the pipeline's stages and the worker's peak memory, by size and storage.

For each head CT of 40, 150 and 300 slices (512 x 512, a head phantom: skull, brain, air, noise, so
JPEG-LS compresses it as it would a real slice, ~2.7x), stored uncompressed and JPEG-LS lossless:

1. **time-to-triage** on the real servers: Orthanc, the FHIR server, `cds-triage serve` and one
   `cds-triage worker` process (started afresh per size and storage, one warm-up study first):
   from the FHIR server's answer to the ImagingStudy create until a poll (every 50 ms) sees the
   order's priority raised (the DiagnosticReport is written before it), one study at a time;
2. **the worker's peak memory**: VmHWM of the worker process and of its decoder processes, after
   those studies;
3. **the stages**: `run_triage` in this process with the bench's stage clock (median of a few runs).

Every task uses card-compatible *untrained* weights (threshold 0: every study positive, so every one
gets a Grad-CAM, a write-back and a priority raise, the longest path) with the shipped head CT card's
preprocessing, at `--input-size` (default 128, the size the issue's targets were set at; the shipped
card is 224). Nothing fails on a slow machine: it prints what it measured and writes
bench/results/large_studies.json.

    .venv/bin/python bench/large_studies.py                     # 40/150/300 slices x uncompressed/JPEG-LS, 5 studies each
    .venv/bin/python bench/large_studies.py --sizes 300 --storages jpegls --studies 3
    CDS_DECODE_PROCESSES=2 .venv/bin/python bench/large_studies.py   # two decoder processes (2 cores: none by default)

Another version of the service (e.g. the one before a change) is measured the same way from its own
tree, with `--stage-runs 0` if its pipeline's steps have other names (serve and worker must be of one
version: the queue's task names change with the code):

    git archive <commit> | tar -x -C /tmp/before && cp bench/large_studies.py /tmp/before/bench/
    cd /tmp/before && PYTHONPATH=$PWD /work/main/.venv/bin/python bench/large_studies.py --stage-runs 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

import cv2  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402

from cds_devtools.demo import start_service, start_worker  # noqa: E402
from cds_devtools.devservers import free_port, start_fhir_server, start_orthanc, stopped_like_ctrl_c, upload_dicom  # noqa: E402
from cds_devtools.dicom_data import make_dataset  # noqa: E402
from cds_service.core.domain import Task  # noqa: E402
from cds_service.adapters.fhir_client import FhirClient  # noqa: E402
from cds_service.jobs.state import Job, JobState  # noqa: E402
from cds_service.core.settings import Settings  # noqa: E402
from cds_service.adapters.subscribe import ensure_subscription  # noqa: E402
from cds_service.worker import build_deps  # noqa: E402
from support import make_test_weights  # noqa: E402
from triage_bench import (OVERLAPPED, new_order, STAGES, SUBSCRIPTION_SECRET, Order, StageClock, job_times,  # noqa: E402
                          latency_record, log, peak_memory_mb, priority_raised, production_preprocessing, rounded,
                          summarise_latencies, wait_subscription_active, wait_until)
from cds_service import pipeline  # noqa: E402

SCHEMA = "cds-triage-large-studies/1"
DEFAULT_OUT = REPO / "bench" / "results"
STORAGES = {"uncompressed": "explicit", "jpegls": "jpegls"}
SIZE = 512
SPACING_MM = 0.45
SETTLE_S = 0.5


def head_slice(rng: np.random.Generator, index: int, count: int) -> np.ndarray:
    """Stored values (HU + 1024) of one axial slice of a head phantom: an ellipse of brain (~32 HU)
    in its skull (~1,100 HU), in air, wider in the middle of the series than at its ends."""
    t = index / max(1, count - 1)
    scale = float(np.sqrt(max(0.08, 1.0 - 0.85 * (2 * t - 1) ** 2)))
    hu = rng.normal(-1000, 8, (SIZE, SIZE))
    centre, axes = (SIZE // 2, SIZE // 2), (int(72 / SPACING_MM * scale), int(92 / SPACING_MM * scale))
    inside = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(inside, centre, axes, 0, 0, 360, 1, -1)
    hu[inside == 1] = rng.normal(32, 10, int(inside.sum()))
    skull = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(skull, centre, axes, 0, 0, 360, 1, 14)
    hu[skull == 1] = rng.normal(1100, 150, int(skull.sum()))
    return (hu.clip(-1024, 3071) + 1024).astype(np.uint16)


@dataclass
class StudyTemplate:
    """A series' slices, encoded once; each study takes them with new UIDs."""

    slices: int
    storage: str
    datasets: list[pydicom.Dataset]

    @classmethod
    def build(cls, slices: int, storage: str, pixels: list[np.ndarray]) -> "StudyTemplate":
        datasets = [make_dataset(px, modality="CT", body_part="HEAD", series_description="CT HEAD WO",
                                 patient_id="BENCH-LARGE", instance_number=index + 1, rescale_slope=1,
                                 rescale_intercept=-1024, window_center=40, window_width=80,
                                 pixel_spacing=(SPACING_MM, SPACING_MM), transfer_syntax=STORAGES[storage])
                    for index, px in enumerate(pixels)]
        return cls(slices, storage, datasets)

    def fresh(self) -> list[pydicom.Dataset]:
        """The same slices under new study, series and instance UIDs (uploaded in reverse order)."""
        study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        for ds in self.datasets:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        return self.datasets[::-1]

    @property
    def stored_bytes(self) -> int:
        return sum(len(ds.PixelData) for ds in self.datasets)


def place_order(fhir: FhirClient, orthanc_url: str, template: StudyTemplate) -> tuple[Order, str]:
    """The study in the PACS, Patient + ServiceRequest (routine) in the EHR; the ImagingStudy, which starts
    triage, returned uncreated. Also the Orthanc id of the study (deleted after its run)."""
    datasets = template.fresh()
    ids = upload_dicom(orthanc_url, datasets)
    with httpx.Client(base_url=orthanc_url, timeout=30, trust_env=False) as client:
        orthanc_study = client.get(f"/instances/{ids[0]}/study").json()["ID"]
    order = new_order(fhir, datasets, "l")
    os.sync()  # Orthanc's new files (160 MB for 300 uncompressed slices) written out before the clock starts:
    time.sleep(SETTLE_S)  # their write-back otherwise overlapped the triage (p95 2x the p50 in a first run)
    return order, orthanc_study


def forget(orthanc_url: str, orthanc_study: str) -> None:
    """Delete a finished study from Orthanc: 300 uncompressed slices are 160 MB of its storage."""
    with httpx.Client(base_url=orthanc_url, timeout=60, trust_env=False) as client:
        client.delete(f"/studies/{orthanc_study}")


def descendants(pid: int) -> list[int]:
    """The process ids started by `pid` (the decoder processes, multiprocessing's resource tracker), recursively."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return sorted(set(found))


def memory_of(worker_pid: int) -> dict[str, Any]:
    """VmHWM (peak resident) of the worker process and of each process it started, in MiB."""
    children = {}
    for pid in descendants(worker_pid):
        try:
            children[pid] = peak_memory_mb(pid)
        except (OSError, RuntimeError):
            continue
    worker = peak_memory_mb(worker_pid)
    return {"worker_peak_mb": worker, "children_peak_mb": sorted(children.values(), reverse=True),
            "total_peak_mb": worker + sum(children.values())}


def time_to_triage(settings: Settings, orthanc_url: str, template: StudyTemplate, studies: int,
                   workdir: Path) -> dict[str, Any]:
    """A fresh worker; one warm-up study, then `studies` one at a time; the worker's peak memory."""
    fhir = FhirClient(settings.fhir_base_url)
    api = httpx.Client(base_url=settings.public_url, timeout=10, trust_env=False)
    worker = start_worker(settings, workdir / "logs" / f"worker-{template.slices}-{template.storage}", index=0)
    records = []
    try:
        for attempt in range(studies + 1):
            order, orthanc_study = place_order(fhir, orthanc_url, template)
            fhir.update(order.study_resource, if_match=None)
            accepted = time.time()
            wait_until(lambda order=order: priority_raised(fhir, order), 300, 0.05, f"triage of {template.slices} slices")
            seen = time.time()
            if attempt:  # the first one loads the model and starts the decoders
                records.append(latency_record(accepted, seen, job_times(api, order)))
            forget(orthanc_url, orthanc_study)
        memory = memory_of(worker.pid)
    finally:
        worker.stop()
        api.close()
        fhir.close()
    return {"time_to_triage": summarise_latencies(records), "memory": memory}


def stages(settings: Settings, orthanc_url: str, template: StudyTemplate, runs: int) -> dict[str, Any]:
    """`run_triage` in this process with the stage clock: median seconds per stage over `runs` (after one warm-up)."""
    deps = build_deps(settings)
    fhir = FhirClient(settings.fhir_base_url)
    totals, per_stage = [], []
    try:
        for attempt in range(runs + 1):
            order, orthanc_study = place_order(fhir, orthanc_url, template)
            fhir.update(order.study_resource, if_match=None)
            job = Job(id=str(uuid.uuid4()), imaging_study_id=order.imaging_study,
                      service_request_id=order.service_request, source="bench", model_set="bench",
                      state=JobState.RUNNING)
            model = deps.models.get(Task.HEAD_CT_ICH)
            clock = StageClock()
            with clock.installed(deps, model):
                started = time.perf_counter()
                state, reason, summary = pipeline.run_triage(job, deps)
                total = time.perf_counter() - started
            forget(orthanc_url, orthanc_study)
            if state is not JobState.DONE:
                raise RuntimeError(f"the pipeline did not triage the study: {state.value} {reason}")
            if attempt:
                seconds = {stage: clock.seconds.get(stage, 0.0) for stage in STAGES + OVERLAPPED if stage != "other"}
                seconds["other"] = max(0.0, total - sum(seconds[s] for s in STAGES if s != "other"))
                totals.append(total)
                per_stage.append(seconds)
    finally:
        fhir.close()
        deps.fhir.close()
    return {"per_study_s": statistics.median(totals), "runs_s": totals,
            "stages_s": {s: statistics.median(r[s] for r in per_stage) for s in STAGES},
            "fetch_decode_score_busy_s": {s: statistics.median(r[s] for r in per_stage) for s in OVERLAPPED}}


def bare_model(weights: Path, input_size: int, batch: int, threads: int) -> float:
    """Seconds per image of the model alone (ONNX Runtime, batch `batch`), the floor of any pipeline."""
    from cds_service.core.models import load_model

    model = load_model(weights, Task.HEAD_CT_ICH, runtime="onnxruntime", threads=threads)
    images = np.random.default_rng(0).standard_normal((batch, 3, input_size, input_size)).astype(np.float32)
    for _ in range(3):
        model.predict(images)
    runs = []
    for _ in range(15):
        started = time.perf_counter()
        model.predict(images)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs) / batch


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="cds-large-"))
    load_start = os.getloadavg()
    try:
        weights = workdir / "weights"
        for task in Task:
            make_test_weights(weights, task, input_size=args.input_size, preprocessing=production_preprocessing(task))
        settings = Settings(operator_open_on_loopback=True, weights_dir=weights, data_dir=workdir / "inprocess",
                            workers=1, log_level="WARNING", http_timeout_s=60,
                            **({"decode_processes": int(os.environ["CDS_DECODE_PROCESSES"])}
                               if "CDS_DECODE_PROCESSES" in os.environ else {}))
        bare = bare_model(weights, args.input_size, settings.inference_batch_size, settings.inference_threads)
        log(f"bare model: {bare * 1000:.1f} ms per image at {args.input_size} px")
        rng = np.random.default_rng(21)
        pixels = {size: [head_slice(rng, index, size) for index in range(size)] for size in args.sizes}
        results: dict[str, Any] = {}
        with start_orthanc(workdir / "orthanc") as orthanc, start_fhir_server(workdir / "fhir") as fhir_server:
            settings = replace(settings, fhir_base_url=fhir_server.url, dicomweb_url=orthanc.dicomweb_url)
            port = free_port()
            service_settings = replace(settings, host="127.0.0.1", port=port, public_url=f"http://127.0.0.1:{port}",
                                       data_dir=workdir / "service", subscription_secret=SUBSCRIPTION_SECRET,
                                       log_level="INFO", job_retry_delay_s=0.5)
            service = start_service(service_settings, workdir / "logs")
            service.worker.stop()  # one worker per size and storage, started below
            try:
                fhir = FhirClient(settings.fhir_base_url)
                subscription_id, _ = ensure_subscription(service_settings, f"{service_settings.public_url}/fhir-notify")
                wait_subscription_active(fhir, subscription_id)
                fhir.close()
                for size in args.sizes:
                    for storage in args.storages:
                        template = StudyTemplate.build(size, storage, pixels[size])
                        key = f"{size}_{storage}"
                        log(f"{size} slices, {storage} ({template.stored_bytes / 1e6:.0f} MB stored): time-to-triage")
                        entry = time_to_triage(service_settings, orthanc.url, template, args.studies, workdir)
                        if args.stage_runs:
                            log(f"{size} slices, {storage}: stages, in-process")
                            entry["pipeline"] = stages(settings, orthanc.url, template, args.stage_runs)
                        entry |= {"slices": size, "storage": storage, "stored_mb": template.stored_bytes / 1e6,
                                  "bare_model_s": bare * size}
                        results[key] = entry
                        ttt, memory = entry["time_to_triage"], entry["memory"]
                        log(f"  p50 {ttt['p50_s']:.2f} s (p95 {ttt['p95_s']:.2f}), worker peak "
                            f"{memory['worker_peak_mb']:.0f} MiB + decoders {sum(memory['children_peak_mb']):.0f} MiB")
            finally:
                service.stop()
        return rounded({
            "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "load_avg_start": list(load_start), "load_avg_end": list(os.getloadavg())},
            "config": {"input_size": args.input_size, "studies": args.studies, "stage_runs": args.stage_runs,
                       "batch_size": settings.inference_batch_size, "decode_processes": getattr(settings, "decode_processes", None),
                       "slice": f"{SIZE} x {SIZE}, 16-bit, head phantom"},
            "bare_model_per_image_s": bare, "results": results,
        })
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_report(summary: dict[str, Any]) -> None:
    out = [f"\n{'study':<22}{'stored MB':>10}{'p50 s':>8}{'p95 s':>8}{'bare s':>8}{'worker MiB':>12}{'+decoders':>11}"
           "   in-process stages (median s)"]
    for entry in summary["results"].values():
        memory, ttt = entry["memory"], entry["time_to_triage"]
        stages_text = ""
        if "pipeline" in entry:
            top = sorted(entry["pipeline"]["stages_s"].items(), key=lambda kv: -kv[1])[:4]
            busy = entry["pipeline"]["fetch_decode_score_busy_s"]
            stages_text = (f"{entry['pipeline']['per_study_s']:.2f}: " + ", ".join(f"{k} {v:.2f}" for k, v in top)
                           + " (busy: " + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()) + ")")
        out.append(f"{entry['slices']:>4} slices {entry['storage']:<12}{entry['stored_mb']:>8.0f}{ttt['p50_s']:>10.2f}"
                   f"{ttt['p95_s']:>8.2f}{entry['bare_model_s']:>8.2f}{memory['worker_peak_mb']:>12.0f}"
                   f"{sum(memory['children_peak_mb']):>11.0f}   {stages_text}")

    print("\n".join(out))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 150, 300], help="slices per study")
    parser.add_argument("--storages", nargs="+", choices=sorted(STORAGES), default=["uncompressed", "jpegls"])
    parser.add_argument("--studies", type=int, default=5, help="timed studies per size and storage (default 5)")
    parser.add_argument("--stage-runs", type=int, default=3, help="in-process runs for the stage split (0: none)")
    parser.add_argument("--input-size", type=int, default=128, help="model input size (default 128; the card: 224)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with stopped_like_ctrl_c():
        summary = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "large_studies.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print_report(summary)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
