"""`cds-triage`: the product's command line. Every subcommand is documented in the README."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .domain import Task
from .settings import Settings


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from gunicorn.app.base import BaseApplication

    from . import metrics
    from .app import create_app

    metrics.configure(settings.metrics_dir)  # before gunicorn forks: /metrics adds up every process

    class Server(BaseApplication):  # gunicorn's documented way to embed a WSGI app
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host or settings.host}:{args.port or settings.port}")
            self.cfg.set("workers", args.http_workers)
            self.cfg.set("threads", 4)
            self.cfg.set("timeout", 60)
            self.cfg.set("accesslog", None)  # ops.py logs each request as JSON, without resource ids

        def load(self):  # type: ignore[no-untyped-def]
            return create_app(settings)

    Server().run()
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from .worker import run_worker

    run_worker(settings, prepare=args.prepare_models)
    return 0


def _prepare_models(args: argparse.Namespace, settings: Settings) -> int:
    from .worker import prepare_models

    outcome = prepare_models(settings)
    for task, (_, what) in outcome.items():
        print(f"{task.value}: {what}")
    return 0 if all(ok for ok, _ in outcome.values()) else 1


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from .models import available_cards, write_shipped_graph

    cards = available_cards(settings.weights_dir)
    for task in [Task(value) for value in args.task] if args.task else list(cards):
        block = write_shipped_graph(settings.weights_dir, task)
        print(f"{task.value}: {settings.weights_dir / block['file']} (sha256 {block['sha256'][:12]}…)")
    return 0


def _subscribe(args: argparse.Namespace, settings: Settings) -> int:
    from .subscribe import ensure_subscription

    endpoint = args.endpoint or f"{settings.public_url.rstrip('/')}/fhir-notify"
    subscription_id, created = ensure_subscription(settings, endpoint)
    print(f"{'created' if created else 'already present'}: Subscription/{subscription_id} → {endpoint}")
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    return run_demo(settings, workdir=args.workdir, keep_running=not args.no_wait, port=args.port)


def _triage(args: argparse.Namespace, settings: Settings) -> int:
    from .local_triage import triage_paths

    return triage_paths(args.paths, settings, task=args.task, as_json=args.json, heatmaps=args.heatmaps)


def _validate(args: argparse.Namespace, settings: Settings) -> int:
    from .validate import run_validate

    return run_validate(args, settings)


def _jobs(args: argparse.Namespace, settings: Settings) -> int:
    from .jobs import QueueUnavailableError, create_queue, open_job_store, register_triage_task

    try:
        store = open_job_store(settings)
        if args.action == "list":
            for job in store.list(state=args.status, limit=args.limit):
                print(f"{job.id}  {job.state.value:18} {job.attempts:>2} attempts  ImagingStudy/{job.imaging_study_id}  {job.reason}")
            return 0
        if not args.job_id:
            print("a job id is needed", file=sys.stderr)
            return 2
        job = store.get(args.job_id)
        if job is None:
            print(f"no job {args.job_id}", file=sys.stderr)
            return 1
        if args.action == "requeue":
            job = store.requeue(job.id)
            if job is not None and job.state.value == "running":
                print(f"job {job.id} is running on {job.worker}; it is re-queued by itself if that worker stops",
                      file=sys.stderr)
                return 1
            huey = create_queue(settings.queue_url, settings.queue_db_path, timeout_s=settings.http_timeout_s)
            task = register_triage_task(huey, store, lambda: None, max_attempts=settings.job_retries,  # type: ignore[arg-type,return-value]
                                        retry_base_s=settings.job_retry_delay_s)
            task(args.job_id)
            job = store.get(args.job_id)
    except QueueUnavailableError as exc:
        print(f"cds-triage jobs: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(job.to_json() if job else {}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cds-triage", description="AI radiology triage for the EHR (FHIR R4, CDS Hooks, DICOMweb).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the web service (subscription endpoint, CDS Hooks, worklist) under gunicorn")
    p.add_argument("--host", help="bind address (default CDS_HOST)")
    p.add_argument("--port", type=int, help="port (default CDS_PORT)")
    p.add_argument("--http-workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("worker", help="run triage jobs from the queue")
    p.add_argument("--prepare-models", action="store_true",
                   help="export the models' ONNX graphs (as prepare-models does) before taking the first job")
    p.set_defaults(func=_worker)

    p = sub.add_parser("prepare-models", help="export each model's ONNX graph for the workers before the first study")
    p.set_defaults(func=_prepare_models)

    p = sub.add_parser("export", help="write each model's ONNX graph into the weights folder and vouch for it in its card "
                       "(needs torch; the graphs let serve, worker and triage run without torch)")
    p.add_argument("--task", action="append", choices=[task.value for task in Task], help="only this task (repeatable)")
    p.set_defaults(func=_export)

    p = sub.add_parser("subscribe", help="create (idempotently) the ImagingStudy rest-hook Subscription on the FHIR server")
    p.add_argument("--endpoint", help="notification URL (default CDS_PUBLIC_URL + /fhir-notify)")
    p.set_defaults(func=_subscribe)

    p = sub.add_parser("demo", help="start Orthanc, the FHIR server and the service; triage the sample studies")
    p.add_argument("--workdir", type=Path, help="where the demo servers keep their data and logs, kept afterwards "
                   "(default: a temp dir, removed when the demo ends well)")
    p.add_argument("--port", type=int, default=0, help="port of the service (default: a free port)")
    p.add_argument("--no-wait", action="store_true", help="stop everything once the samples are triaged")
    p.set_defaults(func=_demo)

    from .local_triage import EXIT_STATUSES as TRIAGE_EXIT_STATUSES

    p = sub.add_parser("triage", help="triage local DICOM files/folders (or PNG/JPEG with --task) without servers",
                       epilog=TRIAGE_EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files, folders of DICOM, or images with --task")
    p.add_argument("--task", choices=["head_ct_ich", "brain_mri", "chest_pneumothorax"],
                   help="force the task (needed for PNG/JPEG); a DICOM of another modality is warned about and its "
                        "row marked (\"warning\" in --json)")
    p.add_argument("--json", action="store_true", help="print one JSON object per input (per series for DICOM folders)")
    p.add_argument("--heatmaps", type=Path, help="write Grad-CAM overlay PNGs into this folder, named after their input "
                   "(<file>_<label>.png, <folder>_<series uid>_<label>.png)")
    p.set_defaults(func=_triage)

    from .validate import add_validate_arguments

    p = sub.add_parser("validate", help="measure a model on this site's own labelled studies (AUC, operating points, "
                       "calibration, HTML report) and optionally write site thresholds (CDS_SITE_THRESHOLDS)")
    add_validate_arguments(p)
    p.set_defaults(func=_validate)

    p = sub.add_parser("jobs", help="list, show or re-queue triage jobs")
    p.add_argument("action", choices=["list", "show", "requeue"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--status", help="only jobs in this state (list)")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=_jobs)

    from .training import add_evaluate_arguments, add_train_arguments, run_evaluate, run_train

    p = sub.add_parser("train", help="train a task's model and write weights + model card")
    add_train_arguments(p)
    p.set_defaults(func=lambda a, s: run_train(a))
    p = sub.add_parser("evaluate", help="evaluate a model on its validation split (metrics JSON + plots)")
    add_evaluate_arguments(p)
    p.set_defaults(func=lambda a, s: run_evaluate(a))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"cds-triage: bad setting: {exc}", file=sys.stderr)
        return 2
    from .logs import configure_logging

    configure_logging(settings.log_level)
    return int(args.func(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
