"""The worklist in a real browser: Debian's Chromium driven by Playwright, on loopback only.

A module-scoped service (serve + worker, untrained test weights with thresholds at 0, so a head
CT is always "stat" and a brain MR "urgent") runs against the real Orthanc and FHIR server.
The test plays the EHR and looks at the pages as a radiologist would. Screenshots are written
to tests/artifacts/ (git-ignored) for a person to look at.

Chromium comes from Debian (`apt-get install chromium`), never downloaded by Playwright. The
tests skip when it is missing on a developer machine and fail in CI (CI is set).
"""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from cds_devtools.demo import start_service
from cds_devtools.devservers import find_sekmet, free_port, start_fhir_server, upload_dicom
from cds_devtools.dicom_data import make_dataset
from cds_service.core.domain import Task
from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.settings import Settings
from cds_service.adapters.subscribe import ensure_subscription
from fhir_mappings.imaging_study import build_imaging_study
from conftest import require
from browser_support import launched_chromium
from support import make_test_weights, seed_onnx_exports

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
FINISHED = {"done", "failed", "not_applicable", "model_unavailable"}
VIEWER = "http://127.0.0.1:9/viewer?StudyInstanceUIDs={study_uid}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launched_chromium()


@pytest.fixture
def page(browser) -> Iterator[Any]:
    """A fresh page that can reach 127.0.0.1 and nothing else."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, locale="en-GB", timezone_id="UTC")
    blocked: list[str] = []

    def loopback_only(route: Any) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", loopback_only)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], f"JavaScript errors: {errors}"
    assert blocked == [], f"the page tried to leave loopback: {blocked}"


@pytest.fixture(scope="module")
def own_fhir_server(tmp_path_factory) -> Iterator[Any]:
    """A FHIR server of this module's own: the worklist lists every order on the server, and the
    tests assert the order of rows, so orders left by other test modules must not be there."""
    require(find_sekmet(), "sekmet executable not found in this virtualenv (pip install sekmet-fhir==0.1.1)")
    server = start_fhir_server(tmp_path_factory.mktemp("browser-fhir"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service(orthanc, own_fhir_server, tmp_path_factory) -> Iterator[Settings]:
    fhir_server = own_fhir_server
    root = tmp_path_factory.mktemp("browser-service")
    weights = make_test_weights(root / "weights", Task.HEAD_CT_ICH)
    make_test_weights(weights, Task.BRAIN_MRI)
    port = free_port()
    settings = Settings(
        operator_open_on_loopback=True,  # tests call /jobs directly
        fhir_base_url=fhir_server.url, dicomweb_url=orthanc.dicomweb_url, public_url=f"http://127.0.0.1:{port}",
        host="127.0.0.1", port=port, data_dir=root / "data", weights_dir=weights, subscription_secret="browser-secret",
        job_retries=2, job_retry_delay_s=0.2, http_timeout_s=10, results_to_pacs="sr,sc", worklist_refresh_s=1.0,
        viewer_url=VIEWER,
    )
    processes = start_service(seed_onnx_exports(settings), root / "logs")
    ensure_subscription(settings, f"{settings.public_url}/fhir-notify")
    yield settings
    processes.stop()


@pytest.fixture(scope="module")
def second_service(service, tmp_path_factory) -> Iterator[Settings]:
    """A second `serve` (and its idle worker) on the same FHIR server and PACS, with a data dir and
    job store of its own: it triages nothing (the Subscription calls the first), it only shows."""
    root = tmp_path_factory.mktemp("browser-second-service")
    port = free_port()
    settings = replace(service, port=port, public_url=f"http://127.0.0.1:{port}", data_dir=root / "data")
    processes = start_service(seed_onnx_exports(settings), root / "logs")
    yield settings
    processes.stop()


@pytest.fixture(scope="module")
def ehr(service, orthanc) -> Iterator["Ehr"]:
    ehr = Ehr(service, orthanc.url)
    yield ehr
    ehr.close()


class Ehr:
    """Plays the EHR: patients, imaging orders and the ImagingStudy that triggers triage."""

    def __init__(self, settings: Settings, orthanc_url: str) -> None:
        self.fhir = FhirClient(settings.fhir_base_url)
        self.api = httpx.Client(base_url=settings.public_url, timeout=10)
        self.orthanc_url = orthanc_url
        self.orders: dict[str, dict[str, str]] = {}

    def close(self) -> None:
        self.fhir.close()
        self.api.close()

    def order(self, name: str, datasets: list[pydicom.Dataset] | None, *, minutes_ago: int = 30,
              priority: str = "routine") -> dict[str, str]:
        tag = uuid.uuid4().hex[:8]
        ids = {"patient": f"p-{tag}", "order": f"sr-{tag}", "study": f"is-{tag}"}
        given, family = name.split(" ", 1)
        self.fhir.update({"resourceType": "Patient", "id": ids["patient"], "name": [{"family": family, "given": [given]}],
                          "gender": "female", "birthDate": "1961-05-04"}, if_match=None)
        authored = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60 * minutes_ago))
        self.fhir.update({"resourceType": "ServiceRequest", "id": ids["order"], "status": "active", "intent": "order",
                          "priority": priority, "subject": {"reference": f"Patient/{ids['patient']}"},
                          "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005"}]}],
                          "code": {"text": "Imaging"}, "authoredOn": authored}, if_match=None)
        if datasets:
            upload_dicom(self.orthanc_url, datasets)
            study = build_imaging_study(datasets, patient_id=ids["patient"], service_request_id=ids["order"],
                                        study_id=ids["study"]).model_dump(mode="json", exclude_none=True)
            self.fhir.update(study, if_match=None)
        self.orders[name] = ids
        return ids

    def wait_for_job(self, study_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        jobs: list = []
        while time.monotonic() < deadline:
            jobs = self.api.get("/jobs", params={"imagingStudy": study_id}).json()["jobs"]
            if jobs and jobs[0]["status"] in FINISHED:
                return jobs[0]
            time.sleep(0.3)
        raise AssertionError(f"job for ImagingStudy/{study_id} did not finish: {jobs}")


def images(modality: str, body_part: str, description: str, count: int = 1, seed: int = 0) -> list[pydicom.Dataset]:
    rng = np.random.default_rng(seed)
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    datasets = []
    for i in range(count):
        if modality == "CT":
            pixels = (rng.normal(35, 15, (64, 64)) + 1024).clip(0, 3000).astype(np.uint16)
            extra = {"rescale_slope": 1, "rescale_intercept": -1024}
        else:
            pixels, extra = rng.integers(0, 1500, (64, 64)).astype(np.uint16), {}
        datasets.append(make_dataset(pixels, modality=modality, body_part=body_part, series_description=description,
                                     study_uid=study_uid, series_uid=series_uid, instance_number=i + 1, **extra))
    return datasets


@pytest.fixture(scope="module")
def routine_worklist(ehr) -> Ehr:
    """Orders that stay routine or lower than stat: no model applies, no weights, no study yet, an MR."""
    abdomen = ehr.order("Ann Abdomen", images("CT", "ABDOMEN", "CT ABDOMEN"), minutes_ago=240)
    chest = ehr.order("Carl Chest", images("CR", "CHEST", "CHEST PA"), minutes_ago=120)
    ehr.order("Nina Notyet", None, minutes_ago=60)
    mr = ehr.order("Mona Brain", images("MR", "BRAIN", "MR BRAIN T1"), minutes_ago=30)
    for ids in (abdomen, chest, mr):
        ehr.wait_for_job(ids["study"])
    return ehr


def row_orders(page: Any) -> list[str]:
    return page.eval_on_selector_all("#worklist tbody tr[data-order]", "rows => rows.map(r => r.dataset.order)")


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_a_freshly_triaged_stat_study_moves_to_the_top_without_reload(page, service, routine_worklist):
    ehr = routine_worklist
    page.goto(f"{service.public_url}/worklist")
    page.wait_for_selector("#worklist tbody tr[data-order]")
    before = row_orders(page)
    mine = [ehr.orders[n]["order"] for n in ("Mona Brain", "Ann Abdomen", "Carl Chest", "Nina Notyet")]
    assert [o for o in before if o in mine] == mine  # urgent first; then routine, longest waiting first
    assert page.locator(f'tr[data-order="{mine[0]}"] .badge').inner_text().lower() == "urgent"
    assert "raised by AI from routine" in page.locator(f'tr[data-order="{mine[0]}"]').inner_text()
    screenshot(page, "worklist-before.png")
    page.evaluate("window.__notReloaded = true")

    stat = ehr.order("Sam Bleed", images("CT", "HEAD", "CT HEAD WO", count=3), minutes_ago=1)
    job = ehr.wait_for_job(stat["study"])
    assert job["status"] == "done" and job["result"]["priority"]["to"] == "stat"
    assert job["result"]["heatmapToPacs"]["stored"] is True, job["result"]

    page.wait_for_function("(id) => document.querySelector('#worklist tbody tr[data-order]').dataset.order === id",
                           arg=stat["order"], timeout=15_000)
    assert page.evaluate("window.__notReloaded") is True
    top = page.locator(f'tr[data-order="{stat["order"]}"]')
    text = top.inner_text()
    assert "Sam Bleed" in text and "female" in text
    assert top.locator(".badge").inner_text().lower() == "stat"
    assert "raised by AI from routine" in text and "%" in text and "test-untrained-head_ct_ich 0.0.0-test" in text
    after = row_orders(page)
    assert after.index(stat["order"]) < min(after.index(o) for o in mine)
    screenshot(page, "worklist-after-stat.png")


def test_study_view_shows_the_overlay_and_the_slider_changes_it(page, service, routine_worklist):
    ehr = routine_worklist
    ids = ehr.orders.get("Sam Bleed") or ehr.order("Sam Bleed", images("CT", "HEAD", "CT HEAD WO", count=3), minutes_ago=1)
    ehr.wait_for_job(ids["study"])
    page.goto(f"{service.public_url}/worklist")
    page.wait_for_selector(f'tr[data-order="{ids["order"]}"] a.open')
    study_uid = ehr.fhir.read("ImagingStudy", ids["study"])[0]["identifier"][0]["value"].removeprefix("urn:oid:")
    row_viewer = page.locator(f'tr[data-order="{ids["order"]}"] a.viewer-link')  # CDS_VIEWER_URL: the row opens the viewer too
    assert row_viewer.get_attribute("href") == VIEWER.replace("{study_uid}", study_uid)
    assert row_viewer.get_attribute("target") == "_blank" and "noopener" in row_viewer.get_attribute("rel")
    page.locator(f'tr[data-order="{ids["order"]}"] a.open').click()
    page.wait_for_url(f"**/worklist/orders/{ids['order']}")
    assert "/worklist/orders/" + ids["order"] == urlsplit(page.url).path  # opaque id only, no patient data

    page.wait_for_function("() => { const i = document.getElementById('overlay'); return i.complete && i.naturalWidth > 0 }")
    page.wait_for_function("() => { const i = document.getElementById('key-image'); return i.complete && i.naturalWidth > 0 }")
    src = page.get_attribute("#overlay", "src")
    png = page.request.get(f"{service.public_url}{src}")
    assert png.ok and png.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(png.body()))
    assert overlay.size[0] > 0 and overlay.size == (64, 64)  # the slice size (Grad-CAM overlay, at most 512)
    assert np.asarray(overlay.convert("RGB")).std() > 0  # not a blank picture
    natural = page.evaluate("() => { const i = document.getElementById('overlay'), k = document.getElementById('key-image');"
                            " return [i.naturalWidth, i.naturalHeight, k.naturalWidth, k.naturalHeight] }")
    assert natural == [64, 64, 64, 64]

    text = page.locator("main").inner_text()
    assert "AI-generated, preliminary, not a diagnosis" in text
    assert "any" in text and "%" in text and "test-untrained-head_ct_ich 0.0.0-test" in text
    assert "TEST ONLY" in text  # the model card's intended use
    assert "also in the PACS" in text and "as a DICOM Structured Report" in text
    assert page.get_attribute("#pacs-link", "href") == VIEWER.replace("{study_uid}", study_uid)
    assert page.locator("#pacs-link").inner_text() == "Open in viewer"

    viewer = page.locator("#viewer")
    full = viewer.screenshot()
    screenshot(page, "study-overlay-100.png")
    page.locator("#opacity").fill("20")
    assert page.evaluate("getComputedStyle(document.getElementById('overlay')).opacity") == "0.2"
    assert page.locator("#opacity-value").inner_text() == "20 %"
    faded = viewer.screenshot()
    assert _differs(full, faded)
    screenshot(page, "study-overlay-20.png")

    page.get_by_role("button", name="Show original").click()
    assert page.get_attribute("#toggle", "aria-pressed") == "true"
    assert page.evaluate("getComputedStyle(document.getElementById('overlay')).opacity") == "0"
    assert _differs(faded, viewer.screenshot())
    page.keyboard.press("t")  # keyboard: back to the overlay
    assert page.get_attribute("#toggle", "aria-pressed") == "false"
    page.keyboard.press("Escape")
    page.wait_for_url("**/worklist")


SAME_ON_EVERY_INSTANCE = ("orderId", "patient", "patientDetails", "modality", "bodyPart", "study", "ordered", "priority",
                          "aiRaisedFrom", "topFinding", "findings", "model", "status", "reason", "heatmap", "url", "shadow")


def test_a_second_instance_shows_the_ai_result_from_the_fhir_server(page, service, second_service, routine_worklist):
    """Two `serve` processes, two job stores, one FHIR server: a study triaged through the first shows
    identically (AI status, finding, priority, heatmap) in the second's rows.json, worklist and study page."""
    ehr = routine_worklist
    ids = ehr.orders.get("Sam Bleed") or ehr.order("Sam Bleed", images("CT", "HEAD", "CT HEAD WO", count=3), minutes_ago=1)
    ehr.wait_for_job(ids["study"])
    with httpx.Client(base_url=second_service.public_url, timeout=10) as second:
        assert second.get("/jobs", params={"imagingStudy": ids["study"]}).json()["jobs"] == []  # it ran nothing
        first_rows = {r["orderId"]: r for r in ehr.api.get("/worklist/rows.json").json()["rows"]}
        second_rows = {r["orderId"]: r for r in second.get("/worklist/rows.json").json()["rows"]}
    assert list(second_rows) == list(first_rows)  # the same rows in the same order
    triaged = [ids["order"], ehr.orders["Mona Brain"]["order"]]
    for order_id in triaged:
        mine, theirs = first_rows[order_id], second_rows[order_id]
        assert {k: theirs[k] for k in SAME_ON_EVERY_INSTANCE} == {k: mine[k] for k in SAME_ON_EVERY_INSTANCE}, order_id
    sam = second_rows[ids["order"]]
    assert (sam["status"], sam["priority"], sam["aiRaisedFrom"]) == ("done", "stat", "routine")
    assert sam["topFinding"]["label"] == "any" and sam["model"] == "test-untrained-head_ct_ich 0.0.0-test" and sam["heatmap"]
    # what only a job store knows (a study no model reads) is progress of the instance that ran it
    abdomen = ehr.orders["Ann Abdomen"]["order"]
    assert first_rows[abdomen]["status"] == "not_applicable" and second_rows[abdomen]["status"] == "not triaged"

    page.goto(f"{second_service.public_url}/worklist")
    page.wait_for_selector(f'tr[data-order="{ids["order"]}"]')
    row = page.locator(f'tr[data-order="{ids["order"]}"]')
    text = row.inner_text()
    assert row.locator(".badge").inner_text().lower() == "stat" and "raised by AI from routine" in text
    assert "%" in text and "test-untrained-head_ct_ich 0.0.0-test" in text and "done" in text and "not triaged" not in text
    assert row_orders(page) == list(second_rows)
    screenshot(page, "worklist-second-instance.png")

    page.goto(f"{second_service.public_url}/worklist/orders/{ids['order']}")
    page.wait_for_function("() => { const i = document.getElementById('overlay'); return i.complete && i.naturalWidth > 0 }")
    page.wait_for_function("() => { const i = document.getElementById('key-image'); return i.complete && i.naturalWidth > 0 }")
    theirs = study_page_facts(page)
    assert "also in the PACS" in page.locator("main").inner_text()
    assert "raised by AI from routine" in theirs[".facts"] and "done" in theirs[".facts"]
    page.goto(f"{service.public_url}/worklist/orders/{ids['order']}")
    page.wait_for_selector("#viewer-caption")
    assert study_page_facts(page) == theirs


def study_page_facts(page: Any) -> dict[str, str]:
    """What the study page says about the patient, order and AI (without the waiting time, which ticks)."""
    facts = {part: page.locator(part).inner_text() for part in ("h1", ".facts", ".findings", "#viewer-caption", ".model-card")}
    facts[".facts"] = "\n".join(line for line in facts[".facts"].splitlines() if "waiting" not in line)
    return facts


def test_filters_and_keyboard_navigation(page, service, routine_worklist):
    ehr = routine_worklist
    page.goto(f"{service.public_url}/worklist")
    page.wait_for_selector("#worklist tbody tr[data-order]")
    page.get_by_label("Modality").select_option("MR")
    modalities = page.eval_on_selector_all("#worklist tbody tr[data-order]", "rows => rows.map(r => r.dataset.modality)")
    assert modalities and all("MR" in m.split(", ") for m in modalities)
    assert ehr.orders["Mona Brain"]["order"] in row_orders(page)
    screenshot(page, "worklist-filter-mr.png")

    page.get_by_role("button", name="Clear filters").click()
    page.get_by_label("Priority").select_option("routine")
    priorities = page.eval_on_selector_all("#worklist tbody tr[data-order]", "rows => rows.map(r => r.dataset.priority)")
    assert priorities and set(priorities) == {"routine"}
    shown = row_orders(page)
    assert ehr.orders["Ann Abdomen"]["order"] in shown and ehr.orders["Mona Brain"]["order"] not in shown
    # a refresh keeps the filter
    refreshed = page.evaluate("document.getElementById('worklist').dataset.refreshed || ''")
    page.wait_for_function("(before) => (document.getElementById('worklist').dataset.refreshed || '') !== before",
                           arg=refreshed, timeout=10_000)
    assert set(page.eval_on_selector_all("#worklist tbody tr[data-order]", "rows => rows.map(r => r.dataset.priority)")) == {"routine"}

    page.get_by_role("button", name="Clear filters").click()
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("j")
    page.keyboard.press("j")
    second = row_orders(page)[1]
    focused = page.evaluate("document.activeElement.closest('tr').dataset.order")
    assert focused == second
    page.keyboard.press("k")
    first = page.evaluate("document.activeElement.closest('tr').dataset.order")
    assert first == row_orders(page)[0]
    screenshot(page, "worklist-keyboard.png")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/worklist/orders/{first}")


def test_pages_are_accessible_to_keyboard_and_screen_readers(page, service, routine_worklist):
    page.goto(f"{service.public_url}/worklist")
    page.wait_for_selector("#worklist tbody tr[data-order]")
    # every control has a label, and every action is a real button or link
    unlabelled = page.evaluate("""[...document.querySelectorAll('select, input')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id)""")
    assert unlabelled == []
    assert page.locator("a.open").count() == page.locator("#worklist tbody tr[data-order]").count()
    assert page.evaluate("document.documentElement.lang") == "en"
    # no third-party assets: every script and stylesheet is ours
    sources = page.evaluate("[...document.querySelectorAll('script[src], link[rel=stylesheet]')].map(e => e.src || e.href)")
    assert sources and all(urlsplit(s).hostname == "127.0.0.1" for s in sources)


def _differs(a: bytes, b: bytes) -> bool:
    first = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.int16)
    second = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.int16)
    return first.shape == second.shape and float(np.abs(first - second).mean()) > 1.0
