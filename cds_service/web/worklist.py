"""The radiologist's worklist: imaging orders, most dangerous first, with the AI's evidence.

Read from the FHIR server in one search: active ServiceRequests with their Patient, the
ImagingStudy based on each, and our DiagnosticReport with its Observations and heatmap
Media. Everything a row says about the AI comes from there (finding, probability, model,
shadow mode, heatmap, the priority the AI raised, from the note's structured extension), so
every service instance pointed at the same FHIR server shows the same list. The local job
store only adds progress for a study that has no AI result in FHIR yet (queued, running,
retrying, failed, not applicable, with the reason).

`worklist_rows.build_worklist` is the pure core (FHIR JSON and job records in, ordered rows out); the
routes only fetch and render. Order: priority (stat > asap > urgent > routine), then the
AI score (probability of the top positive finding), then the longest waiting.

Pages:
- `GET /worklist`: the table; it polls `GET /worklist/rows.json` every
  CDS_WORKLIST_REFRESH_S seconds and re-renders without a reload (static/worklist.js).
- `GET /worklist/orders/<ServiceRequest id>`: the study view (key image, heatmap overlay
  with opacity slider, findings, model card summary, "Open in viewer" with CDS_VIEWER_URL).
- `GET /worklist/orders/<id>/key-image.png`: the key slice from the PACS, rendered as the
  model saw it, so the overlay lines up with it. `GET /heatmaps/<Media id>.png`: the overlay.

URLs carry only opaque FHIR ids. Every route here shows patient data: access is checked per CDS_WORKLIST_AUTH
(access.py) and every view recorded in the access log (adapters/access_log.py).
"""

from __future__ import annotations

import base64
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import pydicom
import requests
from flask import Blueprint, Response, abort, g, jsonify, redirect, render_template, request, url_for
from PIL import Image

from cds_service.adapters.pacs import pacs_from_settings
from cds_service.core.domain import DISCLAIMER, TASK_LABELS, Task, WorklistAuth
from cds_service.core.errors import QueueUnavailableError, StudyNotFoundError, TriageError
from cds_service.core.model_cards import ModelCard, available_cards
from cds_service.core.preprocessing import dicom_to_image, display_image
from cds_service.drift import drift_report
from cds_service.pipeline import dicomweb_url_for
from cds_service.web.access import AUTOMATIC_ENDPOINTS, AccessRefused, Viewer, identify
from cds_service.web.web_context import access_log, ctx, operation_outcome
from cds_service.web.worklist_rows import WorklistRow, build_worklist, is_ours
from fhir_mappings.conventions import Conventions
from fhir_mappings.builders import is_fhir_id, reference_id

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the pages' templates and static files stay in cds_service/
worklist = Blueprint("worklist", __name__, template_folder=PACKAGE_DIR / "templates", static_folder=PACKAGE_DIR / "static",
                     static_url_path="/worklist/static")

DRIFT_ADVICE = ("Its flags may not mean what its model card says (a new scanner, protocol or population, or a fault): "
                "check it before trusting them.")


def row_json(row: WorklistRow, now: datetime) -> dict[str, Any]:
    """A row as the page script renders it, with the study's link into the site's viewer (CDS_VIEWER_URL)."""
    return row.to_json(now) | {"viewerUrl": ctx().settings.viewer_link(row.study_uid)}


def task_for_label(label: str) -> Task | None:
    return next((task for task, labels in TASK_LABELS.items() if label in labels), None)


def key_image_png(ds: pydicom.Dataset, card: ModelCard, size: tuple[int, int]) -> bytes:
    """The key slice as the model saw it (same windowing and resize as the overlay's background)."""
    image = display_image(dicom_to_image(ds, card.preprocessing), max(size))
    buffer = io.BytesIO()
    Image.fromarray((image * 255).clip(0, 255).astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


def model_card_summary(card: ModelCard | None) -> dict[str, Any] | None:
    """What the study view shows of the model card: intended use, limits, thresholds."""
    if card is None:
        return None
    raw = card.raw
    limitations = raw.get("limitations") or []
    return {
        "name": card.name, "version": card.version, "date": raw.get("date"),
        "intended_use": raw.get("intended_use"),
        "limitations": [limitations] if isinstance(limitations, str) else list(limitations),
        "thresholds": card.thresholds,
        "threshold_sources": card.threshold_sources,  # labels deciding with a site threshold (CDS_SITE_THRESHOLDS)
    }


# --- the thin shell: fetch, render ---------------------------------------------------------


def fetch_worklist(order_id: str | None = None) -> list[WorklistRow]:
    """One FHIR search (orders + patient + study + our report, observations, media), which says
    everything about the AI; the job store only adds the progress of studies without a result."""
    settings = ctx().settings
    params: dict[str, Any] = {
        "_count": str(settings.worklist_max_orders),
        "_include": "ServiceRequest:subject",
        "_revinclude": ["ImagingStudy:basedon", "DiagnosticReport:based-on"],
        "_include:iterate": ["DiagnosticReport:result", "DiagnosticReport:media"],
    }
    if order_id:
        params["_id"] = order_id
    else:
        params["status"] = "active"
    fhir = ctx().fhir()
    try:
        resources = fhir.search("ServiceRequest", params, max_pages=1)
    finally:
        fhir.close()
    return build_worklist(resources, ctx().store.list(limit=5000), now=datetime.now(timezone.utc),
                          conventions=Conventions.from_settings(ctx().settings))


def drift_alarms() -> list[dict[str, str]]:
    """The tasks whose drift alarm is on (drift.py), for the banner: their flags may not mean what the card says."""
    try:
        report = drift_report(ctx().store, ctx().settings)
    except QueueUnavailableError:
        return []
    return [{"task": task.value, "state": drift.state, "message": drift.describe() + ".", "advice": DRIFT_ADVICE}
            for task, drift in report.items() if drift.alarm]


def _row_or_404(order_id: str) -> WorklistRow:
    if not is_fhir_id(order_id):
        abort(404, "no such order")
    rows = fetch_worklist(order_id)
    if not rows:
        abort(404, "no imaging order with this id")
    return rows[0]


def wants_json() -> bool:
    """An API client that asked for JSON (Accept: application/json or FHIR JSON before text/html); a browser,
    or a client that states no preference, gets the HTML page."""
    best = request.accept_mimetypes.best_match(["text/html", "application/json", "application/fhir+json"],
                                               default="text/html")
    return best != "text/html"


def study_not_found(order_id: str, message: str) -> Any:
    """The study page of an order that is not on the worklist: a page with the way back (404), or the
    OperationOutcome for an API client asking for JSON."""
    if wants_json():
        return operation_outcome(404, message, "not-found")
    shown = order_id if is_fhir_id(order_id) else None  # a malformed id is not echoed into the page
    text = (f"There is no imaging order {shown} on the worklist." if shown
            else "This link does not name an imaging order.")
    return render_template("not_found.html", message=text, disclaimer=DISCLAIMER), 404


@worklist.before_request
def check_access() -> Any:
    """Nothing here without a Viewer (access.identify); a browser not signed in (oidc) is sent to sign in.
    Our scripts and styles hold no patient data: the sign-in pages use them too."""
    if request.endpoint == "worklist.static":
        return None
    try:
        g.viewer = identify(ctx().settings)
    except AccessRefused as refused:
        if refused.sign_in and request.method == "GET" and not wants_json() and request.endpoint not in AUTOMATIC_ENDPOINTS:
            return redirect(url_for("sign_in.login", next=request.full_path.rstrip("?")))
        response, status = operation_outcome(refused.status, refused.message, "login" if refused.status == 401 else "forbidden")
        if ctx().settings.worklist_auth is WorklistAuth.BEARER:
            response.headers["WWW-Authenticate"] = 'Bearer realm="cds-triage worklist"'
        return response, status
    return None


@worklist.context_processor
def signed_in() -> dict[str, Any]:
    return {"viewer": g.get("viewer")}


def viewed(view: str, patient_id: str | None) -> None:
    """Record that this request's viewer saw this patient's data (before it is sent)."""
    viewer: Viewer = g.viewer
    access_log().viewed(viewer.name, view, patient_id, auth=viewer.auth.value, address=request.remote_addr)


def listed(rows: list[WorklistRow]) -> None:
    viewer: Viewer = g.viewer
    access_log().listed(viewer.name, [row.patient_id for row in rows if row.patient_id], auth=viewer.auth.value,
                        address=request.remote_addr)


@worklist.after_request
def security_headers(response: Response) -> Response:
    """Our own assets only (no CDN, no inline script), no caching or referrers of patient pages."""
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'self'"
    )
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    if request.endpoint != "worklist.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@worklist.errorhandler(TriageError)
def upstream_unavailable(exc: TriageError) -> Any:
    if isinstance(exc, StudyNotFoundError):
        return operation_outcome(404, str(exc), "not-found")
    return operation_outcome(502, f"worklist unavailable: {exc}", "transient")


@worklist.get("/worklist")
def show_worklist() -> Any:
    now = datetime.now(timezone.utc)
    found = fetch_worklist()
    listed(found)
    rows = [row_json(row, now) for row in found]
    return render_template("worklist.html", rows=rows, refresh_s=ctx().settings.worklist_refresh_s,
                           disclaimer=DISCLAIMER, drift=drift_alarms())


@worklist.get("/worklist/rows.json")
def worklist_rows() -> Any:
    now = datetime.now(timezone.utc)
    found = fetch_worklist()
    listed(found)
    return jsonify({"rows": [row_json(row, now) for row in found], "generated": now.isoformat(),
                    "drift": drift_alarms()})


@worklist.get("/worklist/orders/<order_id>")
def study_view(order_id: str) -> Any:
    if not is_fhir_id(order_id):
        return study_not_found(order_id, "no such order")
    try:
        rows = fetch_worklist(order_id)
    except StudyNotFoundError as exc:
        return study_not_found(order_id, str(exc))
    if not rows:
        return study_not_found(order_id, "no imaging order with this id")
    row = rows[0]
    top = row.top_finding or next(iter(row.findings), None)
    task = task_for_label(top.label) if top else None
    card = available_cards(ctx().settings.weights_dir).get(task) if task else None
    site = ctx().settings.site_thresholds
    if card is not None and site is not None:
        card = site.apply(card)  # the thresholds the service decides with
    viewed("study", row.patient_id)
    return render_template("study.html", row=row, data=row_json(row, datetime.now(timezone.utc)),
                           card=model_card_summary(card), disclaimer=DISCLAIMER)


@worklist.get("/worklist/orders/<order_id>/key-image.png")
def key_image(order_id: str) -> Any:
    """The key slice from the PACS (WADO-RS), rendered with the model card's preprocessing."""
    row = _row_or_404(order_id)
    top = row.top_finding
    task = task_for_label(top.label) if top else None
    card = available_cards(ctx().settings.weights_dir).get(task) if task else None
    if not (row.key_instance_uid and row.study_uid and row.imaging_study_id and row.heatmap_size and card):
        return operation_outcome(404, "this order has no key image", "not-found")
    settings = ctx().settings
    fhir = ctx().fhir()
    try:
        study, _ = fhir.read("ImagingStudy", row.imaging_study_id)
        url = dicomweb_url_for(study, fhir, settings)
    finally:
        fhir.close()
    pacs = pacs_from_settings(settings, url)
    try:
        series_uid = series_of_instance(study, row.key_instance_uid) or pacs.series_of_instance(row.study_uid, row.key_instance_uid)
        if series_uid is None:
            return operation_outcome(404, "key image not found in the PACS", "not-found")
        ds = pacs.retrieve_instance(row.study_uid, series_uid, row.key_instance_uid)
    except (requests.RequestException, ValueError) as exc:
        return operation_outcome(502, f"key image unavailable from the PACS: {type(exc).__name__}", "transient")
    viewed("key-image", row.patient_id)
    return Response(key_image_png(ds, card, row.heatmap_size), mimetype="image/png")


def series_of_instance(study: Mapping[str, Any], sop_instance_uid: str) -> str | None:
    """The series of an instance, when the ImagingStudy lists its instances."""
    for series in study.get("series") or []:
        if any(i.get("uid") == sop_instance_uid for i in series.get("instance") or []):
            return str(series.get("uid"))
    return None


@worklist.get("/heatmaps/<media_id>.png")
def heatmap(media_id: str) -> Any:
    """The Grad-CAM overlay stored in one of our FHIR Media, served as a plain PNG."""
    if not is_fhir_id(media_id):
        abort(404, "no such heatmap")
    fhir = ctx().fhir()
    try:
        media, _ = fhir.read("Media", media_id)
    finally:
        fhir.close()
    content = media.get("content") or {}
    if not is_ours(media, Conventions.from_settings(ctx().settings)) or content.get("contentType") != "image/png" or not content.get("data"):
        return operation_outcome(404, "no AI heatmap with this id", "not-found")
    viewed("heatmap", reference_id((media.get("subject") or {}).get("reference"), "Patient"))
    return Response(base64.b64decode(content["data"]), mimetype="image/png")

