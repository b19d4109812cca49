# Over 400 lines on purpose: every subcommand of `cds-triage` is registered here, beside the one-line errors they share (docs/cli.md mirrors it).
"""`cds-triage`: the product's command line. Every subcommand is documented in docs/cli.md.

The errors it expects are one line on stderr, not a traceback: a bad setting, or a server named by a
setting that cannot be reached or answers like something else, names the variable (`main`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from cds_service.core.domain import Task
from cds_service.core.errors import TriageError
from cds_service.core.settings import HTTP_URL_SETTINGS, Settings, env_name
from cds_service.web.listen import address_problem

EXIT_STATUSES = """exit status:
  0  done
  1  the command ran but did not succeed (an input not triaged, a model not exported, a job not found)
  2  bad command line, a bad setting, or a server named by a setting that cannot be reached
     (one line on stderr names the setting and its value)"""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cds-triage")
    except PackageNotFoundError:
        return "unknown (not installed)"


def port_number(text: str) -> int:
    """argparse type of --port: 0-65535 (0: a free port, chosen by the system)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535)")
    return port


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from gunicorn.app.base import BaseApplication

    from cds_service.adapters import metrics
    from cds_service.web.app import create_app

    metrics.configure(settings.metrics_dir)  # before gunicorn forks: /metrics adds up every process

    host = args.host or settings.host
    port = settings.port if args.port is None else args.port  # 0: the system picks a free port
    from cds_service.web.access import exposure_problem

    if exposed := exposure_problem(settings, [host]):  # patient data without sign-in on the network: never
        print(f"cds-triage serve: {exposed}", file=sys.stderr)
        return 2
    problem = address_problem(host, port)
    if problem:  # gunicorn would retry for seconds and then exit with a traceback-like message
        source = "--port/--host" if args.port is not None or args.host else "CDS_PORT/CDS_HOST"
        print(f"cds-triage serve: cannot listen on {host}:{port} ({source}): {problem}", file=sys.stderr)
        return 2

    def say_where(server) -> None:  # type: ignore[no-untyped-def]
        """gunicorn's when_ready: the address actually bound (the port the system chose for --port 0)."""
        for listener in server.LISTENERS:
            bound_host, bound_port = listener.sock.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            print(f"cds-triage serve: listening on http://{shown}:{bound_port} "
                  f"(worklist: http://{shown}:{bound_port}/worklist)", flush=True)

    class Server(BaseApplication):  # gunicorn's documented way to embed a WSGI app
        def load_config(self) -> None:
            self.cfg.set("bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            self.cfg.set("workers", args.http_workers)
            self.cfg.set("threads", 4)
            self.cfg.set("timeout", 60)
            self.cfg.set("accesslog", None)  # ops.py logs each request as JSON, without resource ids
            self.cfg.set("when_ready", say_where)

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
    from cds_service.core.model_cards import available_cards
    from cds_service.core.onnx_graphs import write_shipped_graph

    cards = available_cards(settings.weights_dir)
    for task in [Task(value) for value in args.task] if args.task else list(cards):
        block = write_shipped_graph(settings.weights_dir, task)
        print(f"{task.value}: {settings.weights_dir / block['file']} (sha256 {block['sha256'][:12]}…)")
    return 0


def _subscribe(args: argparse.Namespace, settings: Settings) -> int:
    from cds_service.adapters.subscribe import (SubscriptionNotActiveError, ai_label_checks, ensure_subscription,
                                                wait_until_active)

    endpoint = args.endpoint or f"{settings.public_url.rstrip('/')}/fhir-notify"
    subscription_id, created = ensure_subscription(settings, endpoint)
    print(f"{'created' if created else 'already present'}: Subscription/{subscription_id} → {endpoint}", flush=True)
    for check in ai_label_checks(settings):  # informative: we write the label either way
        print(check.line(), flush=True)
    if args.wait <= 0:
        return 0
    print(f"waiting up to {args.wait:.0f} s for the FHIR server to activate it", flush=True)
    try:
        waited = wait_until_active(settings, subscription_id, timeout_s=args.wait)
    except SubscriptionNotActiveError as exc:
        print(f"not active: {exc}", file=sys.stderr)
        return 1
    print(f"active: Subscription/{subscription_id} (after {waited:.1f} s)")
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from cds_devtools.demo import run_demo

    return run_demo(settings, workdir=args.workdir, keep_running=not args.no_wait, port=args.port)


def _triage(args: argparse.Namespace, settings: Settings) -> int:
    from .local_triage import triage_paths

    return triage_paths(args.paths, settings, task=args.task, as_json=args.json, heatmaps=args.heatmaps)


def _validate(args: argparse.Namespace, settings: Settings) -> int:
    from cds_service.validate.command import run_validate

    return run_validate(args, settings)


def _trial(args: argparse.Namespace, settings: Settings) -> int:
    from cds_service.trial.command import run_trial

    return run_trial(args, settings)


def _jobs(args: argparse.Namespace, settings: Settings) -> int:
    """A job store or queue that cannot be reached raises QueueUnavailableError: `main` names the setting."""
    from .jobs.queue import create_queue, open_job_store, register_triage_task

    store = open_job_store(settings)
    if args.action == "list":
        jobs = store.list(state=args.status, limit=args.limit)
        print(f"{'JOB':<36}  {'STATE':<18} {'TRIES':>5}  {'STUDY':<30} REASON")
        for listed in jobs:
            print(f"{listed.id:<36}  {listed.state.value:<18} {listed.attempts:>5}  "
                  f"{'ImagingStudy/' + listed.imaging_study_id:<30} {listed.reason or ''}".rstrip())
        if not jobs:
            print(f"(no {args.status + ' ' if args.status else ''}jobs)", file=sys.stderr)
        return 0
    if not args.job_id:
        print(f"cds-triage jobs {args.action}: a job id is needed", file=sys.stderr)
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
    print(json.dumps(job.to_json() if job else {}, indent=2))
    return 0


def _fhir_package(args: argparse.Namespace, settings: Settings) -> int:
    from .fhir_package import default_package_path, write_fhir_package

    version = args.version or package_version().split()[0]
    if not version[:1].isdigit():
        print("cds-triage fhir-package: the package version is unknown (not installed): give --version", file=sys.stderr)
        return 2
    path, count = write_fhir_package(settings, args.output or default_package_path(version), version)
    print(f"{path}: {count} resources under {settings.fhir_canonical_base} (FHIR package cds-triage.r4#{version})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cds-triage", description="AI radiology triage for the EHR (FHIR R4, CDS Hooks, DICOMweb).",
                                     epilog=EXIT_STATUSES + "\n\nSettings come from CDS_* environment variables (docs/settings.md).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the web service (subscription endpoint, CDS Hooks, worklist) under gunicorn")
    p.add_argument("--host", help="bind address (default CDS_HOST)")
    p.add_argument("--port", type=port_number, help="port (default CDS_PORT; 0: a free port, printed once bound)")
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
    p.add_argument("--wait", type=float, default=120, metavar="SECONDS",
                   help="wait until the server has activated the Subscription (HAPI does so asynchronously); "
                        "exit 1 if it is not active within SECONDS (default 120; 0: do not wait)")
    p.set_defaults(func=_subscribe)

    p = sub.add_parser("fhir-package", help="write our FHIR definitions (code systems, extensions, profiles) as an NPM-style "
                       "FHIR package for a validating FHIR server, under CDS_FHIR_CANONICAL_BASE (docs/fhir.md)")
    p.add_argument("--output", type=Path, help="a .tgz file, or a folder to hold package/ (default cds-triage.r4-VERSION.tgz)")
    p.add_argument("--version", help="the package version (default: this cds-triage's version)")
    p.set_defaults(func=_fhir_package)

    p = sub.add_parser("demo", help="start Orthanc, the FHIR server and the service; triage the sample studies")
    p.add_argument("--workdir", type=Path, help="where the demo servers keep their data and logs, kept afterwards "
                   "(default: a temp dir, removed when the demo ends well)")
    p.add_argument("--port", type=port_number, help="port of the service (default CDS_PORT, 8000, when it is free, "
                   "else a free port; 0: a free port)")
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

    from cds_service.validate.command import add_validate_arguments

    p = sub.add_parser("validate", help="measure a model on this site's own labelled studies (AUC, operating points, "
                       "calibration, HTML report) and optionally write site thresholds (CDS_SITE_THRESHOLDS)")
    add_validate_arguments(p)
    p.set_defaults(func=_validate)

    from cds_service.trial.command import EXIT_STATUSES as TRIAL_EXIT_STATUSES, add_trial_arguments

    p = sub.add_parser("trial", help="silent trial: measure each model against the radiologists' final reports on the FHIR "
                       "server (figures, turnaround, HTML report) and optionally write site thresholds",
                       epilog=TRIAL_EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trial_arguments(p)
    p.set_defaults(func=_trial)

    p = sub.add_parser("jobs", help="list, show or re-queue triage jobs")
    p.add_argument("action", choices=["list", "show", "requeue"])
    p.add_argument("job_id", nargs="?")
    from .jobs.state import JobState

    p.add_argument("--status", choices=[state.value for state in JobState], help="only jobs in this state (list)")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=_jobs)

    from .access_audit import add_audit_arguments, run_audit

    p = sub.add_parser("audit", help="who saw which patient's data, when: the access log of the worklist, study pages, "
                       "heatmaps, key images, CDS cards and sign-ins (by --user or --patient)")
    add_audit_arguments(p)
    p.set_defaults(func=run_audit)

    # the training tools: cds_training is imported only when one of them runs, so a half-edited training
    # module cannot break `triage` or `serve`; their own parser takes the rest of the command line
    for name, text in TRAINING_COMMANDS.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.set_defaults(func=_training_command, training_command=name)
    return parser


#: The setting that points at each kind of server an error can name (errors.Server).
SERVER_SETTINGS = {"fhir": "fhir_base_url", "pacs": "dicomweb_url", "auth": "fhir_smart_token_url"}
# the settings that carry our credentials for each kind of server: named when a server answers 401 or 403
CREDENTIAL_SETTINGS = {
    "fhir": "CDS_FHIR_BEARER_TOKEN, or CDS_FHIR_SMART_CLIENT_ID with CDS_FHIR_SMART_PRIVATE_KEY_FILE",
    "pacs": "CDS_DICOMWEB_USERNAME with CDS_DICOMWEB_PASSWORD, or CDS_DICOMWEB_BEARER_TOKEN",
    "auth": "CDS_FHIR_SMART_CLIENT_ID, CDS_FHIR_SMART_PRIVATE_KEY_FILE and CDS_FHIR_SMART_KEY_ID",
}


def hint_for(error: TriageError, where: str) -> str:
    """What to check: our credentials when the server refused who we are, else the URL and the server."""
    from cds_service.core.errors import UpstreamRedirectError, UpstreamRejectedError

    if isinstance(error, UpstreamRedirectError):
        return f"{where} is redirected: set it to the URL the server answers at now"
    refused = isinstance(error, UpstreamRejectedError) and error.status_code in (401, 403)
    if refused and error.server in CREDENTIAL_SETTINGS:
        return f"{where} refused our credentials: check {CREDENTIAL_SETTINGS[error.server]}"
    return f"{where}: is it right, and is the server up?"


def setting_named_by(error: TriageError, settings: Settings) -> tuple[str, str] | None:
    """The URL setting (variable, value) of the server an error is about, from its structured fields
    (`url`, `server`): the longest configured URL that the error's URL starts with, else the setting of
    its kind of server; None when the error is not about a server."""
    if error.url:
        urls = [(env_name(name), getattr(settings, name)) for name in HTTP_URL_SETTINGS]
        urls += [("CDS_DICOMWEB_ALLOWED_ENDPOINTS", url.strip()) for url in settings.dicomweb_allowed_endpoints.split(",")]
        named = [(variable, value) for variable, value in urls if value and error.url.rstrip("/").startswith(value.rstrip("/"))]
        if named:
            return max(named, key=lambda pair: len(pair[1]))
    name = SERVER_SETTINGS.get(error.server or "")
    if name and getattr(settings, name):
        return env_name(name), getattr(settings, name)
    return None


def one_line(message: str, limit: int = 300) -> str:
    """An error message as one line: a server's HTML error page loses its tags, and long bodies are cut."""
    if "<html" in message.lower() or "<!doctype" in message.lower():
        message = re.sub(r"<[^>]*>", " ", message)
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit - 1] + "…"


#: the commands that cds_training answers (`_training_command`), and their one-line help
TRAINING_COMMANDS = {
    "train": "train a task's model and write weights + model card",
    "evaluate": "evaluate a model on its validation split (metrics JSON + plots)",
}


def _training_command(args: argparse.Namespace, settings: Settings) -> int:
    """`cds-triage train|evaluate …`: cds_training's own parser reads the arguments."""
    from cds_training import cli as training

    parser = argparse.ArgumentParser(prog=f"cds-triage {args.training_command}")
    if args.training_command == "train":
        training.add_train_arguments(parser)
        return training.run_train(parser.parse_args(args.training_args))
    training.add_evaluate_arguments(parser)
    return training.run_evaluate(parser.parse_args(args.training_args))


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; its exit status as EXIT_STATUSES says. Errors it did not handle are one line on stderr."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "training_command", None):
        args.training_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        settings = Settings.from_env()
    except ValueError as exc:  # SettingsError, and the checks that name their variable (drift, site thresholds)
        print(f"cds-triage: bad setting: {exc}", file=sys.stderr)
        return 2
    from cds_service.core.errors import QueueUnavailableError
    from .logs import configure_logging

    configure_logging(settings.log_level)
    try:
        return int(args.func(args, settings) or 0)
    except QueueUnavailableError as exc:
        where = f"CDS_QUEUE_URL={settings.queue_url}" if settings.queue_url else f"CDS_DATA_DIR={settings.data_dir}"
        print(f"cds-triage {args.command}: {one_line(str(exc))} ({where}: is it right, and is the server up?)",
              file=sys.stderr)
        return 2
    except TriageError as exc:  # the FHIR server or the PACS failed or refused; the message is safe to show
        message = one_line(str(exc))
        named = setting_named_by(exc, settings)
        if named is None:
            print(f"cds-triage {args.command}: {message}", file=sys.stderr)
            return 1
        variable, value = named
        where = variable if value.rstrip("/") in message else f"{variable}={value}"
        print(f"cds-triage {args.command}: {message} ({hint_for(exc, where)})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
