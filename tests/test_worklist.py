"""The worklist's pure core: joining FHIR orders, studies, our reports and jobs, and ordering them.

The AI resources are made with the real builders (fhir_mappings) and given ids the way a FHIR
server does, so a change in what the pipeline writes shows up here.
"""

from __future__ import annotations

import io
import json
import re
from datetime import datetime, timedelta, timezone
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cds_service.web.app import create_app
from cds_service.web.context import ServiceContext
from cds_service.core.domain import Finding, Heatmap, ModelRef, OrderContext, Priority, Task, TriageResult, TriageStatus
from cds_devtools.devservers import free_port
from cds_service.jobs.state import Job, JobState
from cds_service.jobs.sqlite_store import JobStore
from cds_service.core.settings import Settings, SettingsError
from cds_service.core.viewer import viewer_link
from cds_service.web.worklist_rows import ai_raised_from, build_worklist, format_waiting, patient_details
from fhir_mappings.builders import build_triage_transaction, heatmap_source_instance, with_priority

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
MODEL = ModelRef("ich-efficientnet-b0", "1.2.0")


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def order(order_id: str, priority: str | None = "routine", *, minutes_ago: int = 30, patient: str = "p1",
          category: bool = False, note: str | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest", "id": order_id, "status": "active", "intent": "order", "priority": priority,
        "subject": {"reference": f"Patient/{patient}"}, "authoredOn": (NOW - timedelta(minutes=minutes_ago)).isoformat(),
    }
    if category:
        resource["category"] = [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005"}]}]
    if note:
        resource["note"] = [{"text": note}]
    if priority is None:
        del resource["priority"]
    return resource


def raised_by_ai(resource: dict[str, Any], to: str) -> dict[str, Any]:
    """The order after the pipeline raised it (builders.with_priority, as pipeline.raise_order_priority calls it)."""
    return with_priority(resource, Priority(to), note=f"Priority raised to {to} by AI triage (any 93%; m 1).")


def study(study_id: str, order_id: str, *, uid: str = "1.2.3", modality: str = "CT", body_part: str = "HEAD",
          patient: str = "p1") -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy", "id": study_id, "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "subject": {"reference": f"Patient/{patient}"}, "basedOn": [{"reference": f"ServiceRequest/{order_id}"}],
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": modality}],
        "description": f"{modality} {body_part}",
        "series": [{"uid": f"{uid}.1", "modality": {"code": modality}, "bodySite": {"display": body_part},
                    "instance": [{"uid": f"{uid}.1.1", "sopClass": {"code": "urn:oid:1.2"}}]}],
    }


def patient(patient_id: str = "p1") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": patient_id, "name": [{"family": "Doe", "given": ["Jane"]}],
            "gender": "female", "birthDate": "1959-03-01"}


def ai_result(study_uid: str, probability: float, *, positive: bool = True) -> TriageResult:
    heatmap = Heatmap(png=png(), label="any", width=32, height=32, slice_index=1, sop_instance_uid=f"{study_uid}.1.1")
    return TriageResult(
        study_uid=study_uid, status=TriageStatus.DONE, task=Task.HEAD_CT_ICH, series_uid=f"{study_uid}.1",
        findings=(Finding("any", probability, positive, 0.5),),
        suggested_priority=Priority.STAT if positive else None, model=MODEL,
        heatmap=heatmap if positive else None, slices_scored=3,
    )


def as_stored(bundle: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """The transaction's resources as a FHIR server keeps them: ids assigned, urn:uuid references rewritten."""
    ids = {}
    for n, entry in enumerate(bundle["entry"]):
        kind = entry["resource"]["resourceType"]
        ids[entry["fullUrl"]] = f"{kind}/{prefix}-{n}"
    text = json.dumps([entry["resource"] for entry in bundle["entry"]])
    for url, ref in ids.items():
        text = text.replace(json.dumps(url), json.dumps(ref))
    resources = json.loads(text)
    for resource, ref in zip(resources, ids.values()):
        resource["id"] = ref.split("/")[1]
    return resources


def triaged(order_id: str, study_id: str, uid: str, probability: float, *, positive: bool = True) -> list[dict[str, Any]]:
    ctx = OrderContext(imaging_study_id=study_id, patient_id="p1", service_request_id=order_id, study_uid=uid)
    bundle = build_triage_transaction(ctx, ai_result(uid, probability, positive=positive), issued=NOW)
    return as_stored(bundle.model_dump(mode="json", exclude_none=True), order_id)


def job(study_id: str, state: JobState = JobState.DONE, result: dict | None = None, created: float = 1.0) -> Job:
    return Job(id=f"job-{study_id}", imaging_study_id=study_id, service_request_id=None, source="subscription",
               model_set="m@1", state=state, created_at=created, updated_at=created, result=result or {})


def test_rows_are_ordered_by_priority_then_ai_score_then_waiting_time():
    resources = [
        patient(),
        order("routine-old", "routine", minutes_ago=300), study("s1", "routine-old", uid="1.1"),
        order("routine-new", "routine", minutes_ago=5), study("s2", "routine-new", uid="1.2"),
        order("urgent", "urgent", minutes_ago=10), study("s3", "urgent", uid="1.3"),
        order("asap", "asap", minutes_ago=10), study("s4", "asap", uid="1.4"),
        order("stat-low", "stat", minutes_ago=500), study("s5", "stat-low", uid="1.5"),
        order("stat-high", "stat", minutes_ago=1), study("s6", "stat-high", uid="1.6"),
        *triaged("stat-low", "s5", "1.5", 0.61), *triaged("stat-high", "s6", "1.6", 0.97),
    ]
    rows = build_worklist(resources, [], now=NOW)
    assert [r.order_id for r in rows] == ["stat-high", "stat-low", "asap", "urgent", "routine-old", "routine-new"]


def test_equal_priority_and_score_goes_to_the_longest_waiting():
    resources = [order("b", "stat", minutes_ago=20), study("sb", "b", uid="2.1"),
                 order("a", "stat", minutes_ago=90), study("sa", "a", uid="2.2")]
    assert [r.order_id for r in build_worklist(resources, [], now=NOW)] == ["a", "b"]


def test_a_row_shows_what_the_ehr_and_the_ai_wrote():
    resources = [patient(), raised_by_ai(order("o1", "routine"), "stat"), study("s1", "o1", uid="1.2.3"),
                 *triaged("o1", "s1", "1.2.3", 0.93)]
    [row] = build_worklist(resources, [], now=NOW)  # no job here: another instance triaged it
    assert row.patient == "Jane Doe" and row.patient_details == "67 y, female"
    assert (row.modality, row.body_part, row.study) == ("CT", "HEAD", "CT HEAD")
    assert row.imaging_study_id == "s1" and row.study_uid == "1.2.3"
    assert row.priority == "stat" and row.ai_raised_from == "routine"
    assert row.top_finding is not None and row.top_finding.label == "any" and row.top_finding.probability == 0.93
    assert row.model == "ich-efficientnet-b0 1.2.0"
    assert row.status == "done"
    assert row.heatmap_media_id is not None and row.heatmap_media_id.startswith("o1-")
    assert row.heatmap_size == (32, 32)
    assert row.key_instance_uid == "1.2.3.1.1"  # the slice the Media's extension says it explains
    assert row.heatmap_in_pacs is False and row.shadow is False
    data = row.to_json(NOW)
    assert data["waiting"] == "30 min" and data["url"] == "/worklist/orders/o1"
    assert data["heatmap"] == f"/heatmaps/{row.heatmap_media_id}.png"
    assert "Doe" not in data["url"] and "Doe" not in data["heatmap"]


def test_negative_result_has_no_top_finding_and_scores_zero():
    resources = [order("o1"), study("s1", "o1", uid="3.1"), *triaged("o1", "s1", "3.1", 0.2, positive=False)]
    [row] = build_worklist(resources, [job("s1")], now=NOW)
    assert row.top_finding is None and row.score == 0.0
    assert [(f.label, f.probability, f.positive) for f in row.findings] == [("any", 0.2, False)]
    assert row.heatmap_media_id is None


def test_job_status_comes_from_the_newest_job_of_the_study():
    resources = [order("o1"), study("s1", "o1")]
    jobs = [job("s1", JobState.FAILED, created=1.0), Job(**{**job("s1", JobState.RUNNING).__dict__, "id": "j2", "created_at": 2.0})]
    [row] = build_worklist(resources, jobs, now=NOW)
    assert row.status == "running"


def test_the_ai_status_comes_from_fhir_and_the_job_store_only_adds_progress():
    """Two instances, one FHIR server: the one whose job store knows nothing shows the same row."""
    resources = [patient(), raised_by_ai(order("o1", "routine"), "stat"), study("s1", "o1", uid="4.1"),
                 *triaged("o1", "s1", "4.1", 0.97)]
    here = build_worklist(resources, [job("s1", JobState.DONE)], now=NOW)
    elsewhere = build_worklist(resources, [], now=NOW)
    assert [r.to_json(NOW) for r in here] == [r.to_json(NOW) for r in elsewhere]
    [row] = elsewhere
    assert (row.status, row.priority, row.ai_raised_from) == ("done", "stat", "routine")
    assert row.top_finding is not None and row.top_finding.probability == 0.97

    # a result in FHIR wins over any job state (a re-run failing, a retry pending)
    [row] = build_worklist(resources, [job("s1", JobState.FAILED)], now=NOW)
    assert row.status == "done" and row.reason is None
    # no result in FHIR yet: the job's progress, with its reason
    waiting = [order("o2"), study("s2", "o2", uid="4.2")]
    failed = Job(**{**job("s2", JobState.FAILED).__dict__, "reason": "PACS unreachable"})
    assert [(r.status, r.reason) for r in build_worklist(waiting, [failed], now=NOW)] == [("failed", "PACS unreachable")]
    assert [r.status for r in build_worklist(waiting, [job("s2", JobState.QUEUED)], now=NOW)] == ["queued"]
    # a job done here whose result is not (or no longer) in FHIR: what every instance shows
    assert [r.status for r in build_worklist(waiting, [job("s2", JobState.DONE)], now=NOW)] == ["not triaged"]


def test_withdrawn_reports_and_shadow_mode_are_read_from_fhir():
    resources = [order("o1"), study("s1", "o1", uid="5.1"), *triaged("o1", "s1", "5.1", 0.9)]
    report = next(r for r in resources if r["resourceType"] == "DiagnosticReport")
    report["meta"]["tag"] = [{"system": "https://cds-triage.org/fhir/CodeSystem/triage-tag", "code": "shadow-mode"}]
    [row] = build_worklist(resources, [], now=NOW)
    assert row.shadow is True and row.score == 0.0 and row.top_finding is not None
    report["status"] = "entered-in-error"
    [row] = build_worklist(resources, [], now=NOW)
    assert row.status == "not triaged" and row.findings == () and row.heatmap_media_id is None


def test_a_heatmap_in_the_pacs_is_read_from_our_media():
    resources = [order("o1"), study("s1", "o1", uid="6.1"), *triaged("o1", "s1", "6.1", 0.9)]
    media = next(r for r in resources if r["resourceType"] == "Media")
    media["identifier"].append({"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.9"})
    [row] = build_worklist(resources, [], now=NOW)
    assert row.heatmap_in_pacs is True


def test_findings_named_only_by_the_conclusion_have_no_probability():
    """The report's conclusionCode names a positive finding even when its Observation was not returned."""
    resources = [r for r in [order("o1"), study("s1", "o1", uid="7.1"), *triaged("o1", "s1", "7.1", 0.9)]
                 if r["resourceType"] != "Observation"]
    [row] = build_worklist(resources, [], now=NOW)
    assert row.top_finding is not None and row.top_finding.label == "any" and row.top_finding.probability is None
    assert row.to_json(NOW)["topFinding"]["probability"] is None and row.model is None


def test_only_imaging_orders_are_listed():
    resources = [order("lab"), order("ordered-imaging", category=True), order("with-study"), study("s1", "with-study"),
                 {"resourceType": "OperationOutcome", "id": "x", "issue": []}]
    rows = build_worklist(resources, [], now=NOW)
    assert {r.order_id: r.status for r in rows} == {"ordered-imaging": "no study yet", "with-study": "not triaged"}


def test_reports_not_written_by_us_are_ignored():
    human = {"resourceType": "DiagnosticReport", "id": "r1", "status": "final", "basedOn": [{"reference": "ServiceRequest/o1"}],
             "result": [{"reference": "Observation/x"}], "code": {"text": "CT head"}}
    observation = {"resourceType": "Observation", "id": "x", "status": "final", "code": {"text": "x"},
                   "valueQuantity": {"value": 0.99}}
    [row] = build_worklist([order("o1"), study("s1", "o1"), human, observation], [], now=NOW)
    assert row.findings == () and row.model is None


@pytest.mark.parametrize(("before", "raised_to", "now_", "expected"), [
    ("routine", "stat", "stat", "routine"),
    (None, "stat", "stat", "unset"),
    ("urgent", "stat", "stat", "urgent"),
    ("routine", "stat", "asap", None),  # a person changed it since
    ("routine", None, "stat", None),  # the AI never touched it
])
def test_ai_raised_marker_is_read_from_the_notes_extension(before, raised_to, now_, expected):
    resource = order("o1", before)
    if raised_to:
        resource = raised_by_ai(resource, raised_to)
    resource["priority"] = now_
    assert ai_raised_from(resource) == expected


def test_the_ai_raised_marker_is_never_read_from_prose():
    """A note that merely says so (typed by a person, or written before the extension) is not the AI's change."""
    resource = order("o1", "stat", note="Priority raised from urgent to stat by AI triage (any 93%; m 1).")
    assert ai_raised_from(resource) is None
    raised = raised_by_ai(order("o1", "urgent"), "stat")
    raised["note"].append({"text": "Priority raised from routine to stat by AI triage"})  # prose after it
    assert ai_raised_from(raised) == "urgent"


def test_key_instance_is_read_from_our_medias_extension():
    media = {"extension": [{"url": "https://cds-triage.org/fhir/StructureDefinition/heatmap-source-instance",
                            "valueOid": "urn:oid:1.2.840.5"}]}
    assert heatmap_source_instance(media) == "1.2.840.5"
    assert heatmap_source_instance({"content": {"title": "Grad-CAM heatmap: x, slice 2 (SOP Instance UID 1.2.840.5)"}}) is None
    assert heatmap_source_instance(None) is None


def test_patient_details_handle_partial_dates_and_missing_data():
    today = NOW.date()
    assert patient_details({"birthDate": "1959"}, today) == "67 y"
    assert patient_details({"gender": "male", "birthDate": "not-a-date"}, today) == "male"
    assert patient_details(None, today) == ""


def test_waiting_time_text():
    assert [format_waiting(m) for m in (None, 0, 59, 61, 60 * 47, 60 * 72)] == ["", "0 min", "59 min", "1 h 01 min",
                                                                              "47 h 00 min", "3 d"]


def test_pacs_viewer_link_from_the_template():
    [row] = build_worklist([order("o1"), study("s1", "o1", uid="1.2.3")], [], now=NOW)
    assert viewer_link("https://pacs.example/viewer?StudyInstanceUIDs={study_uid}", row.study_uid) == \
        "https://pacs.example/viewer?StudyInstanceUIDs=1.2.3"
    assert viewer_link("", row.study_uid) is None
    [no_study] = build_worklist([order("o2", category=True)], [], now=NOW)  # an imaging order, no study yet: no link
    assert viewer_link("https://v.example/{study_uid}", no_study.study_uid) is None


@pytest.mark.parametrize(("settings", "headers", "remote", "allowed"), [
    (Settings(), {}, "127.0.0.1", True),
    (Settings(), {}, "10.1.2.3", False),  # none: direct calls from this machine only
    (Settings(), {"X-Forwarded-For": "10.1.2.3"}, "127.0.0.1", False),  # … never through a proxy
    (Settings(worklist_open_to_network=True), {}, "10.1.2.3", True),  # the development opt-out
    (Settings(worklist_auth="proxy-header", trusted_proxies="127.0.0.1"), {}, "127.0.0.1", False),
    (Settings(worklist_auth="proxy-header", trusted_proxies="127.0.0.1"), {"X-Forwarded-User": "dr.house"}, "127.0.0.1", True),
    (Settings(worklist_auth="proxy-header", trusted_proxies="10.0.0.0/8"), {"X-Forwarded-User": "dr.house"}, "10.9.8.7", True),
    (Settings(worklist_auth="proxy-header", trusted_proxies="10.0.0.0/8"), {"X-Forwarded-User": "dr.house"}, "192.168.1.5", False),
    (Settings(worklist_auth="proxy-header", trusted_proxies="10.0.0.0/8"),  # the peer counts, never X-Forwarded-For
     {"X-Forwarded-User": "dr.house", "X-Forwarded-For": "10.1.1.1"}, "192.168.1.5", False),
    (Settings(worklist_auth="proxy-header", trusted_proxies="::ffff:10.0.0.0/104,10.0.0.0/8"),
     {"X-Forwarded-User": "dr.house"}, "::ffff:10.1.2.3", True),  # an IPv4 peer on an IPv6 socket
    (Settings(worklist_auth="proxy-header", trusted_proxies="127.0.0.1", proxy_secret="s3cret"),
     {"X-Forwarded-User": "dr.house"}, "127.0.0.1", False),
    (Settings(worklist_auth="proxy-header", trusted_proxies="127.0.0.1", proxy_secret="s3cret"),
     {"X-Forwarded-User": "dr.house", "X-CDS-Proxy-Secret": "wrong"}, "127.0.0.1", False),
    (Settings(worklist_auth="proxy-header", trusted_proxies="127.0.0.1", proxy_secret="s3cret"),
     {"X-Forwarded-User": "dr.house", "X-CDS-Proxy-Secret": "s3cret"}, "127.0.0.1", True),
    (Settings(worklist_auth="proxy-header", worklist_auth_header="X-Remote-User", trusted_proxies="127.0.0.1"),
     {"X-Forwarded-User": "a"}, "127.0.0.1", False),
    (Settings(worklist_auth="bearer", worklist_bearer_token="t0ken"), {"Authorization": "Bearer t0ken"}, "10.1.2.3", True),
    (Settings(worklist_auth="bearer", worklist_bearer_token="t0ken"), {"Authorization": "Bearer wrong"}, "127.0.0.1", False),
])
def test_access_check(settings, headers, remote, allowed):
    from flask import Flask

    from cds_service.web.access import AccessRefused, identify

    with Flask(__name__).test_request_context("/worklist", headers=headers, environ_base={"REMOTE_ADDR": remote}):
        try:
            viewer = identify(settings)
        except AccessRefused as refused:
            assert not allowed, refused.message
            assert refused.status == 401
        else:
            assert allowed, viewer
            assert viewer.name == headers.get(settings.worklist_auth_header, viewer.name)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"worklist_auth": "bogus"}, "CDS_WORKLIST_AUTH='bogus' is not one of none, proxy-header, bearer, oidc"),
    ({"worklist_auth": "proxy-header"}, "CDS_WORKLIST_AUTH=proxy-header needs CDS_TRUSTED_PROXIES"),
    ({"worklist_auth": "proxy-header", "trusted_proxies": "10.0.0.300/8"}, "CDS_TRUSTED_PROXIES: '10.0.0.300/8' is not"),
    ({"worklist_auth": "bearer"}, "CDS_WORKLIST_AUTH=bearer needs CDS_WORKLIST_BEARER_TOKEN"),
    ({"worklist_auth": "oidc"}, "CDS_WORKLIST_AUTH=oidc needs CDS_OIDC_ISSUER"),
    ({"worklist_auth": "oidc", "oidc_issuer": "https://idp.example", "oidc_client_id": "c"},
     "CDS_WORKLIST_AUTH=oidc needs CDS_OIDC_SESSION_SECRET"),
    ({"worklist_auth": "oidc", "oidc_issuer": "http://idp.example", "oidc_client_id": "c", "oidc_session_secret": "s" * 32},
     "CDS_OIDC_ISSUER='http://idp.example' must be https://"),
    ({"worklist_auth": "oidc", "oidc_issuer": "https://idp.example", "oidc_client_id": "c", "oidc_session_secret": "s" * 32,
      "public_url": "http://triage.example"}, "CDS_PUBLIC_URL='http://triage.example' must be https://"),
    ({"worklist_auth": "oidc", "oidc_issuer": "https://idp.example", "oidc_client_id": "c", "oidc_session_secret": "short"},
     "CDS_OIDC_SESSION_SECRET is shorter than 32 characters"),
    ({"access_log_retention_days": 0}, "CDS_ACCESS_LOG_RETENTION_DAYS=0"),
])
def test_a_wrong_access_setting_stops_the_start_naming_the_variable(overrides, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings(**overrides)


@pytest.fixture
def client(tmp_path):
    """The app with a FHIR server that is not there: auth and error paths only."""
    settings = Settings(data_dir=tmp_path, weights_dir=tmp_path / "weights", worklist_auth="proxy-header",
                        trusted_proxies="127.0.0.1", fhir_base_url=f"http://127.0.0.1:{free_port()}/fhir", http_timeout_s=2)
    context = ServiceContext(settings=settings, store=JobStore(settings.job_db_path), enqueue=lambda _: None, model_set="m@1")
    return create_app(settings, context).test_client()


def test_pages_need_the_proxy_header_and_say_so(client):
    for path in ("/worklist", "/worklist/rows.json", "/worklist/orders/o1", "/heatmaps/m1.png"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.json["resourceType"] == "OperationOutcome"
    assert client.get("/healthz").status_code == 200  # the API blueprint is not behind the worklist check


def test_an_unreachable_fhir_server_is_a_clear_502(client):
    response = client.get("/worklist/rows.json", headers={"X-Forwarded-User": "dr.house"})
    assert response.status_code == 502 and "worklist unavailable" in response.json["issue"][0]["diagnostics"]
    assert response.headers["Cache-Control"] == "no-store"
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]


def test_malformed_ids_are_refused_before_any_fhir_call(client):
    response = client.get("/worklist/orders/a%20b", headers={"X-Forwarded-User": "dr.house"})
    assert response.status_code == 404


def test_static_assets_are_served_by_us(client):
    for name in ("worklist.js", "study.js", "worklist.css"):
        with client.get(f"/worklist/static/{name}", headers={"X-Forwarded-User": "dr.house"}) as response:
            assert response.status_code == 200 and response.data


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def test_a_study_page_that_does_not_exist_is_a_page_with_the_way_back(client, monkeypatch):
    import cds_service.web.worklist as worklist_module

    monkeypatch.setattr(worklist_module, "fetch_worklist", lambda order_id=None: [])  # the EHR has no such order
    user = {"X-Forwarded-User": "dr.house"}
    for accept in (BROWSER_ACCEPT, None):  # a browser, and a client that states no preference
        headers = {**user, **({"Accept": accept} if accept else {})}
        page = client.get("/worklist/orders/o-gone", headers=headers)
        assert page.status_code == 404 and page.mimetype == "text/html", page.data[:200]
        html = page.get_data(as_text=True)
        assert "Study not found" in html and "o-gone" in html
        assert 'href="/worklist" id="back"' in html  # the way back
        assert "resourceType" not in html
        assert page.headers["Cache-Control"] == "no-store" and "default-src 'self'" in page.headers["Content-Security-Policy"]
    malformed = client.get("/worklist/orders/%3Cscript%3E", headers={**user, "Accept": BROWSER_ACCEPT})
    assert malformed.status_code == 404 and malformed.mimetype == "text/html"
    assert "<script>" not in malformed.get_data(as_text=True)  # not echoed
    for accept in ("application/json", "application/fhir+json"):  # API clients keep their OperationOutcome
        api = client.get("/worklist/orders/o-gone", headers={**user, "Accept": accept})
        assert api.status_code == 404 and api.json["resourceType"] == "OperationOutcome"
        assert api.json["issue"][0]["code"] == "not-found"


# --- the study page's "About the model" speaks to clinicians ----------------------------------------

SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
#: what belongs in the model card (weights/README.md), not on the clinician's page: hashes, files, code
DEVELOPER_WORDS = re.compile(
    r"sha256|\.safetensors|\.json|\.onnx|\.npz|\.py\b|weights/|\.\./|/\w+/|\b[a-z]+_[a-z_]+\b"  # paths, snake_case ids
    r"|pytorch|tensorflow|\btimm\b|grad-cam|\bcds[-_]|\bsee [a-z_]+\)", re.IGNORECASE)
FINDING_OF_TASK = {Task.HEAD_CT_ICH: "any", Task.BRAIN_MRI: "glioma", Task.CHEST_PNEUMOTHORAX: "pneumothorax"}


@pytest.mark.parametrize("task", list(FINDING_OF_TASK))
def test_the_study_page_shows_every_limitation_of_the_shipped_card_in_clinical_words(task, tmp_path, monkeypatch):
    import cds_service.web.worklist as worklist_module

    label = FINDING_OF_TASK[task]
    result = TriageResult(study_uid="1.2.3", status=TriageStatus.DONE, task=task, series_uid="1.2.3.1",
                          findings=(Finding(label, 0.9, True, 0.5),), suggested_priority=Priority.URGENT, model=MODEL,
                          heatmap=None, slices_scored=1)
    ctx = OrderContext(imaging_study_id="s1", patient_id="p1", service_request_id="o1", study_uid="1.2.3")
    bundle = build_triage_transaction(ctx, result, issued=NOW).model_dump(mode="json", exclude_none=True)
    rows = build_worklist([order("o1"), study("s1", "o1"), patient(), *as_stored(bundle, "o1")], [], now=NOW)
    monkeypatch.setattr(worklist_module, "fetch_worklist", lambda order_id=None: rows)
    settings = Settings(data_dir=tmp_path, weights_dir=SHIPPED_WEIGHTS)
    context = ServiceContext(settings=settings, store=JobStore(settings.job_db_path), enqueue=lambda _: None, model_set="m@1")
    page = create_app(settings, context).test_client().get("/worklist/orders/o1", headers={"Accept": BROWSER_ACCEPT})
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    shown = [unescape(item) for item in re.findall(r"<li>(.*?)</li>", html.split("Limitations:", 1)[1].split("</ul>", 1)[0])]
    card = json.loads((SHIPPED_WEIGHTS / f"{task.value}.json").read_text())
    assert shown == card["limitations"]  # all of them, none cut off
    for item in shown:
        assert not DEVELOPER_WORDS.search(item), f"developer wording on the study page: {DEVELOPER_WORDS.search(item)[0]!r} in {item!r}"
