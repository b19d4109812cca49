"""The Flask app factory: wires settings, the job store and the queue into the blueprints.

The web process never loads a model: it records jobs and answers at once; the worker
process (`cds-triage worker`) does the inference.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flask import Flask
from werkzeug.exceptions import HTTPException

from cds_service.adapters.access_log import AccessRecorder, open_access_log
from cds_service.web.access import exposure_problem
from cds_service.web.context import ServiceContext
from cds_service.jobs.queue import create_queue, open_job_store, register_triage_task
from cds_service.core.model_cards import model_set_version
from cds_service.core.settings import Settings, SettingsError
from cds_service.web.web_context import operation_outcome

log = logging.getLogger(__name__)
# the pages' templates and static files stay in cds_service/templates and cds_service/static
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def build_context(settings: Settings) -> ServiceContext:
    """The queue and store as the web process sees them (it enqueues; it never runs jobs)."""
    store = open_job_store(settings)  # SQLite file, or Redis with CDS_QUEUE_URL=redis://…
    huey = create_queue(settings.queue_url, settings.queue_db_path, timeout_s=settings.http_timeout_s)
    task = register_triage_task(huey, store, runner_factory=_no_runner, max_attempts=settings.job_retries,
                                retry_base_s=settings.job_retry_delay_s)
    return ServiceContext(settings=settings, store=store, enqueue=task, model_set=model_set_version(settings.weights_dir))


def _no_runner() -> Any:
    raise RuntimeError("the web process does not run triage jobs; start `cds-triage worker`")


def create_app(settings: Settings | None = None, context: ServiceContext | None = None) -> Flask:
    """The WSGI app: `cds-triage serve` runs it under gunicorn."""
    settings = settings or Settings.from_env()
    if problem := exposure_problem(settings, [settings.host]):  # `serve` and gunicorn's start-up ask first, with the real bind
        raise SettingsError(problem)
    app = Flask(__name__, template_folder=PACKAGE_DIR / "templates", static_folder=PACKAGE_DIR / "static")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["cds_triage"] = context or build_context(settings)
    app.extensions["cds_access_log"] = AccessRecorder(open_access_log(settings), settings.access_log_retention_days)

    from cds_service.web.api import api
    from cds_service.web.cds_hooks.routes import register_cds_hooks
    from cds_service.web.ops import ops
    from cds_service.web.pacs_trigger import pacs_trigger
    from cds_service.web.sign_in import init_sign_in
    from cds_service.web.worklist import worklist

    app.register_blueprint(api)
    register_cds_hooks(app, settings)  # CDS Hooks behind their JWT check (security.py)
    app.register_blueprint(worklist)
    init_sign_in(app, settings)  # /auth/… with CDS_WORKLIST_AUTH=oidc (sign_in.py)
    app.register_blueprint(pacs_trigger)
    app.register_blueprint(ops)  # /readyz, /metrics, /audit, request logs (ops.py)

    @app.after_request
    def no_sniffing(response: Any) -> Any:
        """Every answer, not only the worklist's: a browser must never guess a JSON or PNG as HTML."""
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Any, int]:
        return operation_outcome(exc.code or 500, exc.description or exc.name, "invalid" if (exc.code or 500) < 500 else "exception")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Any, int]:
        log.exception("unhandled error")
        return operation_outcome(500, f"internal error: {type(exc).__name__}", "exception")

    return app
