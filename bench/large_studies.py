#!/usr/bin/env python
"""Large head CT studies: time-to-triage, the pipeline's stages and the worker's peak memory, by size and storage.

For each head CT of 40, 150 and 300 slices (512 x 512, a head phantom: skull, brain, air, noise, so
JPEG-LS compresses it as it would a real slice), stored uncompressed and JPEG-LS lossless, as real
scans of those sizes are: 40 slices 5 mm apart, 150 at 1.0 mm and 300 at 0.5 mm (thin-slice
reconstructions of one head, ~150 mm). A thin series is built from the 5 mm phantom: each thin slice is
its 5 mm slice plus noise that sums to zero over the thin slices of that 5 mm (so their 5 mm averages
are the phantom's slices, to the rounding of the stored integers, and each thin slice is sqrt(k) times
noisier, as a thinner reconstruction is). The card's `series_pooling` (with `slab_mm`) is the shipped
head CT card's, so the thin series are read as 5 mm slabs (core/slabs.py):

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
    CDS_DECODE_THREADS=0 .venv/bin/python bench/large_studies.py     # no decoder threads (2 cores: two by default)

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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence
from unittest import mock

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
THICK_MM = 5.0  # the 40-slice study's spacing, and the slab the thin ones are built from
SLICE_MM = {40: 5.0, 150: 1.0, 300: 0.5}  # spacing by series length, as real head CTs are reconstructed
HEAD_MM = 150.0  # what a thin series not in SLICE_MM covers
# busy inside fetch_decode_score: also slab_sum (slices summed per slab, each slab or lone slice windowed and
# resized, in the worker's thread) and positions (the series' positions asked of the PACS, in a thread beside)
BUSY = OVERLAPPED + ("slab_sum", "positions")


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


def slice_mm(slices: int) -> float:
    """The spacing of a series of `slices` (SLICE_MM, else what covers HEAD_MM, at most THICK_MM)."""
    return SLICE_MM.get(slices, min(THICK_MM, HEAD_MM / slices))


def head_series(rng: np.random.Generator, slices: int) -> list[np.ndarray]:
    """Stored values of a head of `slices` slices at `slice_mm(slices)`: the 5 mm phantom, each 5 mm slice
    split into k = 5 mm / spacing thin slices whose extra noise (sd 10 HU x sqrt(k)) sums to zero over the
    k: the thin slices' mean is the 5 mm slice (to the stored integers' rounding)."""
    k = max(1, round(THICK_MM / slice_mm(slices)))
    thick = -(-slices // k)
    out: list[np.ndarray] = []
    for index in range(thick):
        base = head_slice(rng, index, thick).astype(np.float64)
        noise = rng.normal(0.0, 10.0 * np.sqrt(k), (k, SIZE, SIZE)) if k > 1 else np.zeros((1, SIZE, SIZE))
        noise -= noise.mean(axis=0)
        out += [np.rint(base + n).clip(0, 4095).astype(np.uint16) for n in noise]
    return out[:slices]


@dataclass
class StudyTemplate:
    """A series' slices, encoded once; each study takes them with new UIDs."""

    slices: int
    storage: str
    datasets: list[pydicom.Dataset]

    @classmethod
    def build(cls, slices: int, storage: str, pixels: list[np.ndarray]) -> "StudyTemplate":
        spacing = slice_mm(slices)
        datasets = [make_dataset(px, modality="CT", body_part="HEAD", series_description="CT HEAD WO",
                                 patient_id="BENCH-LARGE", instance_number=index + 1, rescale_slope=1,
                                 rescale_intercept=-1024, window_center=40, window_width=80,
                                 pixel_spacing=(SPACING_MM, SPACING_MM), transfer_syntax=STORAGES[storage],
                                 slice_thickness=spacing, slice_location=round(index * spacing, 3))
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


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds these processes have used so far (those that are gone count 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def time_to_triage(settings: Settings, orthanc_url: str, template: StudyTemplate, studies: int,
                   workdir: Path, orthanc_pid: int | None = None) -> dict[str, Any]:
    """A fresh worker; one warm-up study, then `studies` one at a time; the worker's peak memory, and the
    CPU seconds each study took in the worker (and its decoder processes) and in Orthanc: on a machine
    shared with other work, what two idle cores would need at the least."""
    fhir = FhirClient(settings.fhir_base_url)
    api = httpx.Client(base_url=settings.public_url, timeout=10, trust_env=False)
    worker = start_worker(settings, workdir / "logs" / f"worker-{template.slices}-{template.storage}", index=0)
    records, worker_cpu, orthanc_cpu = [], [], []
    try:
        for attempt in range(studies + 1):
            order, orthanc_study = place_order(fhir, orthanc_url, template)
            assert worker.pid is not None
            before = cpu_seconds([worker.pid, *descendants(worker.pid)]), cpu_seconds([orthanc_pid] if orthanc_pid else [])
            fhir.update(order.study_resource, if_match=None)
            accepted = time.time()
            wait_until(lambda order=order: priority_raised(fhir, order), 300, 0.05, f"triage of {template.slices} slices")
            seen = time.time()
            if attempt:  # the first one loads the model and starts the decoders
                records.append(latency_record(accepted, seen, job_times(api, order)))
                worker_cpu.append(cpu_seconds([worker.pid, *descendants(worker.pid)]) - before[0])
                orthanc_cpu.append(cpu_seconds([orthanc_pid] if orthanc_pid else []) - before[1])
            forget(orthanc_url, orthanc_study)
        memory = memory_of(worker.pid)
    finally:
        worker.stop()
        api.close()
        fhir.close()
    return {"time_to_triage": summarise_latencies(records), "memory": memory,
            "cpu_s": {"worker": statistics.median(worker_cpu), "orthanc": statistics.median(orthanc_cpu)}}


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
            clock = SlabStageClock()
            with clock.installed(deps, model):
                started = time.perf_counter()
                state, reason, summary = pipeline.run_triage(job, deps)
                total = time.perf_counter() - started
            forget(orthanc_url, orthanc_study)
            if state is not JobState.DONE:
                raise RuntimeError(f"the pipeline did not triage the study: {state.value} {reason}")
            if attempt:
                seconds = {stage: clock.seconds.get(stage, 0.0) for stage in STAGES + BUSY if stage != "other"}
                seconds["other"] = max(0.0, total - sum(seconds[s] for s in STAGES if s != "other"))
                totals.append(total)
                per_stage.append(seconds)
    finally:
        fhir.close()
        deps.fhir.close()
    return {"per_study_s": statistics.median(totals), "runs_s": totals,
            "stages_s": {s: statistics.median(r[s] for r in per_stage) for s in STAGES},
            "fetch_decode_score_busy_s": {s: statistics.median(r.get(s, 0.0) for r in per_stage) for s in BUSY}}


class SlabStageClock(StageClock):
    """The bench's stage clock, with the slab path's steps: the positions asked beside the first slices
    (positions), the slices decoded (decode_preprocess, in the decoder processes or here), summed,
    windowed and resized per slab or alone (slab_sum, here), the driving slab's slices fetched again and
    averaged (gradcam)."""

    @contextmanager
    def installed(self, deps: pipeline.PipelineDeps, model: Any) -> Iterator[None]:
        pacs = deps.pacs_for(deps.settings.dicomweb_url)
        series = pipeline.StreamedSeries
        real_counted = series.counted

        def counted(streamed: Any, decoded: Iterator[Any]) -> Iterator[Any]:
            for prepared in real_counted(streamed, decoded):
                self.add("decode_preprocess", prepared.seconds)
                yield prepared

        real_slab_inputs = pipeline.slab_inputs

        def slab_inputs(decoded: Iterator[Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
            waited = [0.0]  # waiting for the next decoded slice (WADO-RS, the decoders): not this step's

            def timed() -> Iterator[Any]:
                for_each = iter(decoded)
                while True:
                    started = time.perf_counter()
                    item = next(for_each, StopIteration)
                    waited[0] += time.perf_counter() - started
                    if item is StopIteration:
                        return
                    yield item

            iterator = iter(real_slab_inputs(timed(), *args, **kwargs))
            while True:  # summing each slice into its slab, windowing and resizing each slab, in this thread
                started, before = time.perf_counter(), waited[0]
                item = next(iterator, StopIteration)
                self.add("slab_sum", max(0.0, time.perf_counter() - started - (waited[0] - before)))
                if item is StopIteration:
                    return
                yield item

        real_add, real_single = series.add, pipeline.single_slice

        def single_slice(*args: Any) -> Any:  # inside fetch_decode_score: busy time, added as it is spent
            started = time.perf_counter()
            try:
                return real_single(*args)
            finally:
                self.add("slab_sum", time.perf_counter() - started)

        def add(streamed: Any, prepared: Any, counted: bool = False) -> None:
            if not counted:  # decoded by prepare_slice (a card without slabs); else timed by `counted`
                self.add("decode_preprocess", prepared.seconds)
            real_add(streamed, prepared, counted)

        with ExitStack() as stack:
            stack.enter_context(super().installed(deps, model))
            stack.enter_context(mock.patch.object(series, "add", add))
            stack.enter_context(mock.patch.object(series, "counted", counted))
            stack.enter_context(mock.patch.object(pipeline, "slab_inputs", slab_inputs))
            stack.enter_context(mock.patch.object(pipeline, "single_slice", single_slice))
            stack.enter_context(mock.patch.object(series, "slab_datasets", self.wrap("gradcam", series.slab_datasets)))
            stack.enter_context(mock.patch.object(pipeline, "slab_image", self.wrap("gradcam", pipeline.slab_image)))
            # asked in a thread of its own while the first slices are decoded: busy time, not a stage
            stack.enter_context(mock.patch.object(pacs, "instance_places", self.wrap("positions", pacs.instance_places)))
            yield


def with_shipped_series_rule(weights: Path) -> None:
    """The head CT test card gets the shipped card's `series_pooling` (its window and slab thickness)."""
    shipped = json.loads((REPO / "weights" / f"{Task.HEAD_CT_ICH.value}.json").read_text())
    card_file = weights / f"{Task.HEAD_CT_ICH.value}.json"
    card = json.loads(card_file.read_text())
    card["series_pooling"] = shipped["series_pooling"]
    card_file.write_text(json.dumps(card, indent=2))


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
        with_shipped_series_rule(weights)
        slab_mm = json.loads((weights / f"{Task.HEAD_CT_ICH.value}.json").read_text())["series_pooling"].get("slab_mm")
        settings = Settings(operator_open_on_loopback=True, weights_dir=weights, data_dir=workdir / "inprocess",
                            workers=1, log_level="WARNING", http_timeout_s=60,
                            **{name: int(os.environ[f"CDS_{name.upper()}"]) for name in ("decode_processes", "decode_threads")
                               if f"CDS_{name.upper()}" in os.environ})
        bare = bare_model(weights, args.input_size, settings.inference_batch_size, settings.inference_threads)
        log(f"bare model: {bare * 1000:.1f} ms per image at {args.input_size} px")
        rng = np.random.default_rng(21)
        pixels = {size: head_series(rng, size) for size in args.sizes}
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
                        entry = time_to_triage(service_settings, orthanc.url, template, args.studies, workdir, orthanc.pid)
                        if args.stage_runs:
                            log(f"{size} slices, {storage}: stages, in-process")
                            entry["pipeline"] = stages(settings, orthanc.url, template, args.stage_runs)
                        inputs = -(-size // max(1, round(slab_mm / slice_mm(size)))) if slab_mm else size
                        entry |= {"slices": size, "storage": storage, "stored_mb": template.stored_bytes / 1e6,
                                  "slice_mm": slice_mm(size), "model_inputs": inputs, "bare_model_s": bare * inputs}
                        results[key] = entry
                        ttt, memory = entry["time_to_triage"], entry["memory"]
                        log(f"  p50 {ttt['p50_s']:.2f} s (p95 {ttt['p95_s']:.2f}), worker peak "
                            f"{memory['worker_peak_mb']:.0f} MiB + decoders {sum(memory['children_peak_mb']):.0f} MiB")
            finally:
                service.stop()
        return rounded({
            "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "load_avg_start": list(load_start), "load_avg_end": list(os.getloadavg())},
            "git": git_revision(),
            "config": {"input_size": args.input_size, "studies": args.studies, "stage_runs": args.stage_runs,
                       "batch_size": settings.inference_batch_size, "decode_processes": getattr(settings, "decode_processes", None),
                       "decode_threads": getattr(settings, "decode_threads", None),
                       "slice": f"{SIZE} x {SIZE}, 16-bit, head phantom", "slab_mm": slab_mm,
                       "slice_mm": {str(size): slice_mm(size) for size in args.sizes}},
            "bare_model_per_image_s": bare, "results": results,
        })
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def git_revision() -> str:
    """The checkout's commit, "+changes" when its tracked files differ from it."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def print_report(summary: dict[str, Any]) -> None:
    out = [f"\n{'study':<30}{'stored MB':>10}{'p50 s':>8}{'p95 s':>8}{'bare s':>8}{'worker MiB':>12}{'+decoders':>11}"
           f"{'CPU s':>7}{'Orthanc':>8}   in-process stages (median s)"]
    for entry in summary["results"].values():
        memory, ttt = entry["memory"], entry["time_to_triage"]
        stages_text = ""
        if "pipeline" in entry:
            top = sorted(entry["pipeline"]["stages_s"].items(), key=lambda kv: -kv[1])[:4]
            busy = entry["pipeline"]["fetch_decode_score_busy_s"]
            stages_text = (f"{entry['pipeline']['per_study_s']:.2f}: " + ", ".join(f"{k} {v:.2f}" for k, v in top)
                           + " (busy: " + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()) + ")")
        out.append(f"{entry['slices']:>4} x {entry['slice_mm']:g} mm ({entry['model_inputs']:>3}) {entry['storage']:<12}"
                   f"{entry['stored_mb']:>4.0f}{ttt['p50_s']:>10.2f}"
                   f"{ttt['p95_s']:>8.2f}{entry['bare_model_s']:>8.2f}{memory['worker_peak_mb']:>12.0f}"
                   f"{sum(memory['children_peak_mb']):>11.0f}{entry['cpu_s']['worker']:>7.2f}{entry['cpu_s']['orthanc']:>8.2f}"
                   f"   {stages_text}")

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
