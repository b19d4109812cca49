"""Load benchmark: a burst of notifications, two workers, SQLite or Redis — every study done once?

    .venv/bin/python bench/load.py                       # 200 studies, 2 workers, SQLite then Redis
    .venv/bin/python bench/load.py --count 20 --backend redis

For each backend it starts its own Orthanc, FHIR server (and redis-server) on loopback, our
service with `--workers` worker processes, stores `--count` one-series head CT studies and
orders them in the EHR, then sends all the rest-hook notifications at once (each study
`--repeat` times, like create + update events). It waits until every job has finished and
checks that each study has exactly one job, `done`, and that the FHIR server holds exactly
`--count` DiagnosticReports. It prints throughput and p50/p95 time-to-triage (job queued →
done, from the job records) and writes the numbers to bench/results/load-<backend>-<time>.json.

Without trained weights in CDS_WEIGHTS_DIR it uses card-compatible *untrained* weights at
224 px (tests/support.py): the timings are real, the findings are not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cds_devtools import devservers  # noqa: E402
from cds_devtools.demo import start_service  # noqa: E402
from cds_service.core.domain import Task  # noqa: E402
from cds_service.adapters.fhir_client import FhirClient  # noqa: E402
from cds_service.core.model_cards import available_cards  # noqa: E402
from cds_service.core.settings import Settings  # noqa: E402

SECRET = "bench-secret"
FINISHED = {"done", "failed", "not_applicable", "model_unavailable"}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def weights_for(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    weights = args.weights or Settings.from_env().weights_dir
    if Task.HEAD_CT_ICH in available_cards(weights):
        return weights, "trained"
    from support import make_test_weights

    return make_test_weights(workdir / "weights", Task.HEAD_CT_ICH, input_size=224), "untrained (224 px)"


def prepare_study(index: int, orthanc_url: str, fhir: FhirClient, slices: int) -> str:
    """One head CT study in the PACS and its Patient, ServiceRequest and ImagingStudy in the EHR."""
    from stack_support import ct_series
    from fhir_mappings.imaging_study import build_imaging_study

    datasets = ct_series(slices, size=256, seed=index)
    devservers.upload_dicom(orthanc_url, datasets)
    patient, order, study = f"bench-p{index}", f"bench-sr{index}", f"bench-is{index}"
    fhir.update({"resourceType": "Patient", "id": patient, "name": [{"family": "Bench", "given": [str(index)]}]},
                if_match=None)
    fhir.update({"resourceType": "ServiceRequest", "id": order, "status": "active", "intent": "order",
                 "priority": "routine", "subject": {"reference": f"Patient/{patient}"}}, if_match=None)
    resource = build_imaging_study(datasets, patient_id=patient, service_request_id=order, study_id=study)
    fhir.update(resource.model_dump(mode="json", exclude_none=True), if_match=None)
    return study


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"cds-bench-{backend}-"))
    started: list[Any] = []
    try:
        print(f"==> {backend}: starting Orthanc, the FHIR server{' and Redis' if backend == 'redis' else ''}")
        orthanc = devservers.start_orthanc(workdir / "orthanc")
        started.append(orthanc)
        fhir_server = devservers.start_fhir_server(workdir / "fhir")
        started.append(fhir_server)
        queue_url = ""
        if backend == "redis":
            from redis_support import start_redis

            redis = start_redis(workdir / "redis")
            started.append(redis)
            queue_url = redis.url
        weights, weights_kind = weights_for(args, workdir)
        port = devservers.free_port()
        settings = Settings(
            operator_open_on_loopback=True,  # tests call /jobs directly
            fhir_base_url=fhir_server.url, dicomweb_url=orthanc.dicomweb_url, public_url=f"http://127.0.0.1:{port}",
            host="127.0.0.1", port=port, data_dir=workdir / "data", weights_dir=weights, queue_url=queue_url,
            subscription_secret=SECRET, workers=args.workers, job_redeliver_s=3600, http_timeout_s=60,
        )
        settings = replace(settings, workers=1, torch_threads=settings.inference_threads)  # one per process
        service = start_service(settings, workdir / "logs", http_workers=2, workers=args.workers)
        started.append(service)

        print(f"==> {backend}: storing {args.count} studies in the PACS and ordering them in the EHR")
        fhir = FhirClient(fhir_server.url, timeout_s=60)
        with ThreadPoolExecutor(max_workers=4) as pool:
            studies = list(pool.map(lambda i: prepare_study(i, orthanc.url, fhir, args.slices), range(args.count)))

        print(f"==> {backend}: burst of {args.count * args.repeat} notifications, {args.workers} workers")
        burst_start = time.time()
        with httpx.Client(base_url=settings.public_url, timeout=60) as api, ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(
                lambda study: api.put(f"/fhir-notify/ImagingStudy/{study}", headers={"X-CDS-Subscription-Secret": SECRET}),
                [s for s in studies for _ in range(args.repeat)]))
            burst_s = time.time() - burst_start
            refused = [a.status_code for a in answers if a.status_code != 200]
            jobs = wait_for_all(api, set(studies), args.timeout)
        total_s = max(job["updatedAt"] for job in jobs) - burst_start
        reports = int(fhir.http.get("DiagnosticReport", params={"_summary": "count"}).json().get("total", -1))
        fhir.close()

        per_study = {s: [j for j in jobs if j["imagingStudy"] == f"ImagingStudy/{s}"] for s in studies}
        states = [j["status"] for j in jobs]
        ttt = [j["updatedAt"] - j["queuedAt"] for j in jobs if j["status"] == "done"]
        result = {
            "backend": backend,
            "studies": args.count,
            "notifications": args.count * args.repeat,
            "refused_notifications": len(refused),
            "workers": args.workers,
            "slices_per_study": args.slices,
            "weights": weights_kind,
            "all_done_exactly_once": all(len(v) == 1 for v in per_study.values()) and states.count("done") == args.count
            and reports == args.count,
            "jobs_by_state": {s: states.count(s) for s in sorted(set(states))},
            "diagnostic_reports": reports,
            "attempts_max": max(j["attempts"] for j in jobs),
            "burst_accept_s": round(burst_s, 3),
            "total_s": round(total_s, 2),
            "throughput_studies_per_s": round(args.count / total_s, 3),
            "time_to_triage_s": {"p50": round(percentile(ttt, 50), 2), "p95": round(percentile(ttt, 95), 2),
                                 "mean": round(statistics.fmean(ttt), 2), "max": round(max(ttt), 2)} if ttt else None,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return result
    finally:
        for process in reversed(started):
            process.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def wait_for_all(api: httpx.Client, studies: set[str], timeout_s: float) -> list[dict[str, Any]]:
    """Every job of these studies, once all have finished (raises on timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = [j for j in api.get("/jobs", params={"limit": 1000}).json()["jobs"]
                if j["imagingStudy"].removeprefix("ImagingStudy/") in studies]
        done = [j for j in jobs if j["status"] in FINISHED]
        if len(done) >= len(studies) and len(done) == len(jobs):
            return jobs
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {len(done)} of {len(studies)} studies finished")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="studies in the burst (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--backend", choices=["sqlite", "redis", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=1, help="notifications per study (default 1; 2 = create + update)")
    parser.add_argument("--slices", type=int, default=1, help="slices per study (default 1)")
    parser.add_argument("--weights", type=Path, help="weights folder (default CDS_WEIGHTS_DIR or weights/)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the burst (default 1800)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the JSON goes")
    parser.add_argument("--keep", action="store_true", help="keep the servers' temp folders")
    args = parser.parse_args(argv)
    ok = True
    for backend in (["sqlite", "redis"] if args.backend == "both" else [args.backend]):
        with devservers.stopped_like_ctrl_c():  # killed (SIGTERM), it still stops the servers it started
            result = run_backend(backend, args)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"load-{backend}-{datetime.now().strftime('%Y%m%dT%H%M%S')}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        ttt = result["time_to_triage_s"] or {}
        print(f"{backend:6}  {result['studies']} studies  all done exactly once: {result['all_done_exactly_once']}  "
              f"throughput {result['throughput_studies_per_s']} studies/s  "
              f"time-to-triage p50 {ttt.get('p50')} s  p95 {ttt.get('p95')} s  → {path}")
        ok = ok and result["all_done_exactly_once"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
