"""What operators use: `/readyz`, `/metrics`, `/audit`, and one JSON log line per request.

- `/healthz` (api.py) says the process is up; `/readyz` says it can do its job: the job
  store/queue answers, the FHIR server and the PACS answer, and model cards with weights
  are present. 503 lists what is missing (a load balancer stops sending traffic meanwhile).
  Operators also see whether the FHIR server's terminology knows our AI security label
  (`aiSecurityLabels`, adapters/terminology.py): informative, never a reason for 503.
- `/metrics`: Prometheus text (see metrics.py for what is counted where).
- `/audit`: the write-back trail (what triage wrote where, by which model version).
- `/jobs*` and `/audit` need `Authorization: Bearer <CDS_OPERATOR_TOKEN>` when that is set.

Request logs name the route (`/fhir-notify/<path:path>`), never the path itself, which
carries resource ids.
"""

from __future__ import annotations

import hmac
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import httpx
import requests
from flask import Blueprint, Response, current_app, g, jsonify, request

from cds_service.adapters import metrics
from cds_service.web.access import from_this_machine
from cds_service.web.web_context import ctx, operation_outcome
from cds_service.adapters.audit import open_write_back_trail
from cds_service.adapters.subscribe import ai_label_checks
from cds_service.drift import drift_report
from cds_service.core.errors import QueueUnavailableError, is_redirect_status
from cds_service.jobs.queue import is_redis_url
from cds_service.logs import hashed
from cds_service.core.model_cards import available_cards
from cds_service.core.settings import Settings

log = logging.getLogger("cds_service.http")

ops = Blueprint("ops", __name__)

PROBE_TIMEOUT_S = 5.0


# --- operator access -----------------------------------------------------------------------------


def operator_refusal() -> tuple[Any, int] | None:
    """None when the caller may use the operator endpoints (/jobs, /audit, /metrics, /readyz details).

    Default deny: the request must carry CDS_OPERATOR_TOKEN (401 otherwise). Without a token
    configured, nobody gets in (403), unless CDS_OPERATOR_OPEN_ON_LOOPBACK is on and the call
    comes straight from this machine: a proxy on this host that adds only X-Real-IP, or no
    header at all (nginx's default), must not turn every outside caller into "loopback"."""
    settings = ctx().settings
    expected = settings.operator_token
    if not expected:
        if settings.operator_open_on_loopback and from_this_machine():
            return None
        return operation_outcome(403, "operator endpoints need CDS_OPERATOR_TOKEN (or, for development on this "
                                      "machine only, CDS_OPERATOR_OPEN_ON_LOOPBACK=true)", "forbidden")
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if hmac.compare_digest(given.encode(), expected.encode()):
        return None
    return operation_outcome(401, "operator endpoints need Authorization: Bearer <CDS_OPERATOR_TOKEN>", "login")


# --- readiness -------------------------------------------------------------------------------------


def _check_store() -> str:
    ctx().store.ping()
    settings = ctx().settings
    if not is_redis_url(settings.queue_url) and not os.access(settings.queue_db_path.parent, os.W_OK):
        raise OSError(f"queue folder {settings.queue_db_path.parent} is not writable")
    return "redis" if is_redis_url(settings.queue_url) else "sqlite"


def _check_fhir(settings: Settings, timeout_s: float) -> str:
    response = httpx.get(f"{settings.fhir_base_url.rstrip('/')}/metadata", timeout=timeout_s,
                         headers={"Accept": "application/fhir+json"})
    if response.status_code != 200:
        location = response.headers.get("Location", "") if is_redirect_status(response.status_code) else ""
        raise OSError(f"GET metadata answered {response.status_code}" + (f" redirect to {location}" if location else ""))
    return f"FHIR {response.json().get('fhirVersion', '?')}"


def _check_pacs(settings: Settings, timeout_s: float) -> str:
    headers = {"Accept": "application/dicom+json"}
    if settings.dicomweb_bearer_token:
        headers["Authorization"] = f"Bearer {settings.dicomweb_bearer_token}"
    auth = (settings.dicomweb_username, settings.dicomweb_password) if settings.dicomweb_username else None
    response = requests.get(f"{settings.dicomweb_url.rstrip('/')}/studies", params={"limit": "1"}, headers=headers,
                            auth=auth, timeout=timeout_s, allow_redirects=False)  # a 3xx is an answer to report
    if response.status_code not in (200, 204):
        location = response.headers.get("Location", "") if is_redirect_status(response.status_code) else ""
        raise OSError(f"QIDO-RS answered {response.status_code}" + (f" redirect to {location}" if location else ""))
    return "QIDO-RS answers"


def _check_models(settings: Settings) -> str:
    cards = available_cards(settings.weights_dir)
    if not cards:
        raise OSError(f"no model card with weights in {settings.weights_dir}")
    return ", ".join(f"{card.name}@{card.version}" for card in cards.values())


def readiness(checks: dict[str, Callable[[], str]]) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Run the checks side by side; each is ok with a detail, or not with the error."""
    with ThreadPoolExecutor(max_workers=len(checks)) as pool:
        futures = {name: pool.submit(check) for name, check in checks.items()}
    report: dict[str, dict[str, Any]] = {}
    for name, future in futures.items():
        try:
            report[name] = {"ok": True, "detail": future.result()}
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with why
            report[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
    return all(r["ok"] for r in report.values()), report


@ops.get("/readyz")
def readyz() -> Any:
    settings = ctx().settings
    timeout_s = min(settings.http_timeout_s, PROBE_TIMEOUT_S)
    app = current_app._get_current_object()  # type: ignore[attr-defined]

    def in_app(check: Callable[[], str]) -> Callable[[], str]:
        def run() -> str:
            with app.app_context():
                return check()
        return run

    ok, report = readiness({
        "queue": in_app(_check_store),
        "fhir": lambda: _check_fhir(settings, timeout_s),
        "pacs": lambda: _check_pacs(settings, timeout_s),
        "models": lambda: _check_models(settings),
    })
    status = 200 if ok else 503
    if operator_refusal() is not None:  # a load balancer needs the status only; the details are the operator's
        return jsonify({"status": "ready" if ok else "not ready"}), status
    try:  # informative: jobs wait (safely) while no worker runs
        workers = len(ctx().store.live_workers(time.time() - 3 * settings.job_lease_s))
    except QueueUnavailableError:
        workers = None
    labels = [check.to_json() for check in ai_label_checks(settings, timeout_s)] if report["fhir"]["ok"] else []
    return jsonify({"status": "ready" if ok else "not ready", "checks": report, "workers": workers,
                    "aiSecurityLabels": labels}), status


# --- metrics and audit -----------------------------------------------------------------------------


@ops.get("/metrics")
def prometheus_metrics() -> Any:
    if refused := operator_refusal():
        return refused
    body = metrics.render(ctx().store, live_within_s=3 * ctx().settings.job_lease_s,
                          drift=lambda: drift_report(ctx().store, ctx().settings))
    return Response(body, mimetype=metrics.CONTENT_TYPE.split(";")[0], content_type=metrics.CONTENT_TYPE)


def _trail() -> Any:
    if "cds_write_back_trail" not in current_app.extensions:
        current_app.extensions["cds_write_back_trail"] = open_write_back_trail(ctx().settings)
    return current_app.extensions["cds_write_back_trail"]


@ops.get("/audit")
def audit_trail() -> Any:
    """What triage wrote where, newest first: `?imagingStudy=<id>`, `?job=<id>`, `?limit=`."""
    refused = operator_refusal()
    if refused:
        return refused
    try:
        limit = max(1, min(int(request.args.get("limit", "100")), 1000))
    except ValueError:
        return operation_outcome(400, "limit must be a whole number", "invalid")
    study = request.args.get("imagingStudy", "").removeprefix("ImagingStudy/")
    try:
        events = _trail().events(subject=hashed(study) if study else None, job=request.args.get("job") or None,
                                 limit=limit)
    except Exception as exc:  # noqa: BLE001 - SQLite locked, Redis down
        raise QueueUnavailableError(f"audit trail unavailable: {type(exc).__name__}") from exc
    return jsonify({"events": events})


# --- errors and request logs -------------------------------------------------------------------------


@ops.app_errorhandler(QueueUnavailableError)
def queue_unavailable(exc: QueueUnavailableError) -> Any:
    """Nothing was accepted: 503 with Retry-After, so a FHIR server re-sends its notification."""
    log.warning("job store or queue unavailable", extra={"error": str(exc)})
    response, status = operation_outcome(503, f"job store or queue unavailable, try again: {exc}", "transient")
    response.headers["Retry-After"] = "5"
    return response, status


@ops.before_app_request
def _start_timer() -> None:
    g.cds_started = time.perf_counter()


DRAIN_FACTOR = 8


@ops.before_app_request
def _refuse_oversized_body() -> Any:
    """413 for a body over CDS_MAX_BODY_BYTES, read and dropped first (up to 8x the limit).

    A body with a Content-Length is judged by it. A chunked body (no length; the server dechunks it and
    says so with `wsgi.input_terminated`) is counted as it streams: Werkzeug would stop reading at the
    limit and hand over the cut body as if it were whole. One that fits is kept and handed on whole.
    Answering before the upload is done makes the server close a socket the client is still
    writing to: the client sees a reset instead of the 413. Draining lets it read the answer.
    """
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    length = request.content_length
    if not limit:
        return None
    stream = request.environ["wsgi.input"]
    if length is None and request.environ.get("wsgi.input_terminated"):
        body = _read_at_most(stream, limit + 1)
        if len(body) <= limit:  # the whole body: from here on it is an ordinary one with a length
            request.environ.update({"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))})
            for name in ("wsgi.input_terminated", "HTTP_TRANSFER_ENCODING"):
                request.environ.pop(name, None)
            return None
        _read_at_most(stream, (DRAIN_FACTOR - 1) * limit)
        what = f"chunked request body is over the limit of {limit} bytes"
    elif length and length > limit:
        if length <= DRAIN_FACTOR * limit:
            _read_at_most(stream, length)
        what = f"request body of {length} bytes is over the limit of {limit} bytes"
    else:
        return None
    response, status = operation_outcome(413, f"{what} (CDS_MAX_BODY_BYTES)", "too-costly")
    response.headers["Connection"] = "close"
    return response, status


def _read_at_most(stream: Any, size: int) -> bytes:
    """Up to `size` bytes of a WSGI input stream (less when it ends first)."""
    parts, remaining = [], size
    while remaining > 0 and (chunk := stream.read(min(65536, remaining))):
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


@ops.after_app_request
def _log_request(response: Response) -> Response:
    started = g.get("cds_started")
    quiet = request.path in ("/healthz", "/readyz", "/metrics")  # polled every few seconds
    log.log(logging.DEBUG if quiet else logging.INFO, "request", extra={
        "method": request.method,
        "route": request.url_rule.rule if request.url_rule else "(no route)",
        "status": response.status_code,
        "duration_ms": round((time.perf_counter() - started) * 1000, 1) if started else None,
    })
    return response
