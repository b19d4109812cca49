"""CDS Hooks 2.0: discovery, the four services, feedback; every response checked against the
JSON Schemas in tests/schemas (written from the specification).

Three layers: the pure card builders on FHIR resources made by our own FHIR builders; the
services through Flask's test client with real signed JWTs; the same with data read from the
real FHIR server (fhirAuthorization) instead of prefetch. The end-to-end test (hook call → job
→ results in the FHIR server → patient-view card) runs the whole product with SMART on.
"""

from __future__ import annotations

import shutil
import time
import json
import sqlite3
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from cds_service.web.app import create_app
from cds_service.web.context import ServiceContext
from fhir_mappings.ai_reports import AiReport, ReportedFinding, ai_report_from_job, ai_reports_from_fhir
from cds_service.web.cds_hooks.cards import indicator_for, is_imaging_order, md, prune, report_card, severity
from cds_service.web.cds_hooks.calls import HookCallError, discovery_document, parse_feedback, parse_hook_call, render_query
from cds_service.web.cds_hooks.services import SERVICES
from cds_service.core.domain import Finding, Heatmap, ModelRef, OrderContext, Priority, Task, TriageResult, TriageStatus
from cds_service.adapters.fhir_client import FhirClient
from cds_service.jobs.state import JobState, TriageRequest
from cds_service.jobs.sqlite_store import JobStore
from cds_service.core.settings import DEFAULT_PRIORITY_RULES, Settings
from fhir_mappings.builders import build_triage_transaction
from hook_client import EhrSigner, assert_valid, hook_request, schema_errors

PUBLIC = "http://127.0.0.1:8000"
EHR = EhrSigner()
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
MODEL = ModelRef("effnet-ich", "1.2.0")


# --- FHIR resources as our pipeline writes them -----------------------------------------------------


def triage_result(task: Task, findings: list[tuple[str, float, bool]], study_uid: str = "1.2.3.4") -> TriageResult:
    return TriageResult(
        study_uid=study_uid, status=TriageStatus.DONE, task=task, series_uid="1.2.3.4.5",
        findings=tuple(Finding(label, p, positive, threshold=0.5) for label, p, positive in findings),
        model=MODEL, heatmap=Heatmap(PNG, findings[0][0], 64, 64) if any(f[2] for f in findings) else None,
    )


def transaction(patient: str, study: str, result: TriageResult, issued: datetime) -> dict[str, Any]:
    ctx = OrderContext(imaging_study_id=study, patient_id=patient, service_request_id=f"sr-{study}", study_uid=result.study_uid)
    return build_triage_transaction(ctx, result, issued=issued).model_dump(mode="json", exclude_none=True)


def as_stored(bundle: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """What a FHIR server stores from our transaction: ids assigned, urn:uuid references resolved."""
    ids = {}
    for n, entry in enumerate(bundle["entry"]):
        ids[entry["fullUrl"]] = f"{entry['resource']['resourceType']}/{prefix}-{n}"

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (ids.get(v, v) if k == "reference" else resolve(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    stored = []
    for entry in bundle["entry"]:
        resource = resolve(entry["resource"])
        resource["id"] = ids[entry["fullUrl"]].split("/")[1]
        stored.append(resource)
    return stored


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


NOW = datetime(2026, 11, 23, 8, 0, tzinfo=timezone.utc)
HEMORRHAGE = as_stored(transaction("p1", "ct1", triage_result(Task.HEAD_CT_ICH, [("any", 0.93, True)]), NOW), "new")
TUMOUR = as_stored(transaction("p1", "mr1", triage_result(Task.BRAIN_MRI, [("glioma", 0.81, True), ("meningioma", 0.1, False),
                                                                         ("pituitary", 0.05, False), ("no_tumor", 0.04, False)],
                                                            study_uid="1.2.3.9"), NOW - timedelta(days=2)), "old")
NEGATIVE = as_stored(transaction("p1", "ct0", triage_result(Task.HEAD_CT_ICH, [("any", 0.02, False)], study_uid="1.2.3.7"),
                                 NOW - timedelta(days=9)), "neg")


# --- pure: reports and cards --------------------------------------------------------------------------


def test_ai_reports_are_read_from_our_diagnostic_reports_newest_first():
    others = [{"resourceType": "DiagnosticReport", "id": "human", "status": "final", "subject": {"reference": "Patient/p1"}},
              *as_stored(transaction("p2", "x", triage_result(Task.HEAD_CT_ICH, [("any", 0.9, True)]), NOW), "p2")]
    reports = ai_reports_from_fhir(NEGATIVE + HEMORRHAGE + others + TUMOUR, "p1")
    assert [r.imaging_study_id for r in reports] == ["ct1", "mr1", "ct0"]
    top = reports[0]
    assert top.positive_findings == (ReportedFinding("any", 0.93, True),)
    assert top.model == "effnet-ich 1.2.0" and top.media_id == "new-2" and top.unread
    assert [f.label for f in reports[1].positive_findings] == ["glioma"]


def test_without_observations_the_report_still_names_its_positive_findings():
    [report] = ai_reports_from_fhir([r for r in HEMORRHAGE if r["resourceType"] == "DiagnosticReport"], "p1")
    assert report.positive_findings == (ReportedFinding("any", None, True),)


@pytest.mark.parametrize("resources, indicator", [(HEMORRHAGE, "critical"), (TUMOUR, "warning"), (NEGATIVE, "info")])
def test_card_indicator_follows_the_priority_policy(resources, indicator):
    [report] = ai_reports_from_fhir(resources, "p1")
    card = report_card(report, DEFAULT_PRIORITY_RULES, PUBLIC)
    assert_valid("card.json", card)
    assert card["indicator"] == indicator


def test_result_card_content():
    [report] = ai_reports_from_fhir(HEMORRHAGE, "p1")
    card = report_card(report, DEFAULT_PRIORITY_RULES, PUBLIC)
    assert card["summary"] == "AI triage: possible Intracranial hemorrhage (any type) (93%), preliminary"
    detail = card["detail"]
    for text in ("Intracranial hemorrhage (any type)", "0.93", "effnet-ich 1.2.0",
                 "AI-generated, preliminary", "Suggested priority: **stat**"):
        assert text in detail, (text, detail)
    assert card["source"]["topic"]["code"] == "ai-imaging-triage" and card["source"]["url"] == f"{PUBLIC}/worklist"
    assert [link["url"] for link in card["links"]] == [f"{PUBLIC}/heatmaps/new-2.png", f"{PUBLIC}/worklist"]
    assert all(r["display"] and r["code"] and r["system"] for r in card["overrideReasons"])
    uuid.UUID(card["uuid"])


def test_summary_stays_under_140_characters_and_markdown_is_escaped():
    report = AiReport(findings=(ReportedFinding("x" * 200, 0.9, True),), model="m|odel *1*")
    card = report_card(report, {"x" * 200: Priority.STAT}, PUBLIC)
    assert len(card["summary"]) < 140 and card["summary"].endswith("…")
    assert "m\\|odel \\*1\\*" in card["detail"]


def test_severity_and_indicator():
    assert severity(AiReport(findings=(ReportedFinding("glioma", 0.9, True), ReportedFinding("any", 0.6, True))),
                    DEFAULT_PRIORITY_RULES) is Priority.STAT
    assert severity(AiReport(findings=(ReportedFinding("any", 0.9, False),)), DEFAULT_PRIORITY_RULES) is None
    assert [indicator_for(p) for p in (Priority.STAT, Priority.ASAP, Priority.URGENT, Priority.ROUTINE, None)] == \
        ["critical", "warning", "warning", "info", "info"]


def test_job_results_become_the_same_report():
    result = {"task": "head_ct_ich", "model": {"name": "effnet-ich", "version": "1.2.0"},
              "findings": [{"label": "any", "probability": 0.93, "positive": True, "trained": True},
                           {"label": "subdural", "probability": 0.4, "positive": False, "trained": False}],
              "written": {"Media": ["Media/m1"], "DiagnosticReport": ["DiagnosticReport/d1"]}}
    report = ai_report_from_job(result, "ct1")
    assert report.findings == (ReportedFinding("any", 0.93, True),)  # untrained outputs are not shown
    assert report.media_id == "m1" and report.report_id == "d1" and report.model == "effnet-ich 1.2.0"


def test_prune_drops_null_and_empty_values():
    assert prune({"a": None, "b": "", "c": [], "d": {}, "e": [{"f": None}], "g": {"h": 0, "i": False}}) == {"g": {"h": 0, "i": False}}


def test_imaging_orders():
    snomed = {"resourceType": "ServiceRequest", "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005"}]}]}
    rad = {"resourceType": "ServiceRequest", "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}]}
    lab = {"resourceType": "ServiceRequest", "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "108252007"}]}]}
    assert is_imaging_order(snomed) and is_imaging_order(rad)
    assert not is_imaging_order(lab) and not is_imaging_order({"resourceType": "MedicationRequest"})


# --- pure: discovery and requests ----------------------------------------------------------------------


def test_discovery_document_is_valid():
    document = discovery_document(SERVICES)
    assert_valid("discovery.json", document)
    assert {(s["id"], s["hook"]) for s in document["services"]} == {
        ("imagingstudy-create", "imagingstudy-create"), ("patient-view", "patient-view"),
        ("order-select", "order-select"), ("order-sign", "order-sign")}
    assert all(s["title"] and s["usageRequirements"] for s in document["services"])


def test_schemas_catch_what_the_specification_forbids():
    assert schema_errors("card.json", {"summary": "x", "indicator": "hard-stop", "source": {"label": "s"}})
    assert schema_errors("card.json", {"summary": "x", "indicator": "info", "source": {"label": "s"}, "links": []})
    assert schema_errors("card.json", {"summary": "x", "indicator": "info", "source": {"label": "s"}, "detail": None})
    assert schema_errors("card.json", {"summary": "x", "indicator": "info", "source": {"label": "s"},
                                       "suggestions": [{"label": "do it"}]})  # selectionBehavior missing
    assert schema_errors("link.json", {"label": "l", "url": "https://x", "type": "absolute", "appContext": "a"})
    assert schema_errors("suggestion.json", {"label": "l", "actions": [{"type": "update", "description": "d"}]})
    assert schema_errors("hook-response.json", {"cards": [], "systemActions": []})
    assert not schema_errors("suggestion.json", {"label": "l", "uuid": "u", "isRecommended": True, "actions": [
        {"type": "delete", "description": "d", "resourceId": "ServiceRequest/1"}]})


@pytest.mark.parametrize("body, words", [
    (["not", "an", "object"], "JSON object"),
    ({"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "context": {"patientId": "p"}}, "handles hook"),
    ({"hook": "patient-view", "hookInstance": "not-a-uuid", "context": {"patientId": "p"}}, "hookInstance"),
    ({"hook": "patient-view", "hookInstance": str(uuid.uuid4())}, "context must be"),
    ({"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": {}}, "context.patientId"),
    ({"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": {"patientId": "a b&c"}}, "FHIR id"),
    ({"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": {"patientId": "p"},
      "fhirAuthorization": {"access_token": "t", "token_type": "Bearer"}}, "without fhirServer"),
    ({"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": {"patientId": "p"},
      "fhirServer": "http://ehr.hospital.example/fhir"}, "https"),
    ({"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": {"patientId": "p"}, "prefetch": []}, "prefetch"),
])
def test_malformed_requests(body, words):
    with pytest.raises(HookCallError, match=words) as error:
        parse_hook_call(body, SERVICES["patient-view"])
    assert error.value.status == 400


def test_prefetch_tokens_are_filled_and_quoted():
    assert render_query("Observation?patient={{context.patientId}}&x=1", {"patientId": "a/b"}) == "Observation?patient=a%2Fb&x=1"
    with pytest.raises(HookCallError):
        render_query("ServiceRequest/{{context.serviceRequestId}}", {})


def test_feedback_parsing():
    stamp = "2026-11-23T08:00:00Z"
    [item] = parse_feedback({"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": stamp,
                                           "overrideReason": {"reason": {"system": "s", "code": "x"}, "userComment": "no"}}]})
    assert item.outcome == "overridden" and item.override_reason["reason"]["code"] == "x"
    for bad in ({"feedback": []}, {"feedback": [{"card": "c", "outcome": "maybe", "outcomeTimestamp": stamp}]},
                {"feedback": [{"card": "c", "outcome": "accepted", "outcomeTimestamp": stamp}]},
                {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "yesterday"}]},
                {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": stamp, "overrideReason": {"reason": "x"}}]}):
        with pytest.raises(HookCallError):
            parse_feedback(bad)


# --- the services through Flask, with signed tokens -------------------------------------------------------


@pytest.fixture
def service(tmp_path):
    def make(**overrides: Any):
        settings = Settings(operator_open_on_loopback=True, data_dir=tmp_path, weights_dir=tmp_path / "weights",
                            **(EHR.hook_settings(tmp_path / "jwks.json") | overrides))
        queued: list[str] = []
        context = ServiceContext(settings=settings, store=JobStore(settings.job_db_path), enqueue=queued.append, model_set="m@1")
        app = create_app(settings, context)
        client = app.test_client()
        client.queued, client.context, client.app = queued, context, app
        return client
    return make


def call(client, service_id: str, body: dict, status: int = 200) -> dict:
    url = f"{client.context.settings.public_url}/cds-services/{service_id}"
    response = client.post(f"/cds-services/{service_id}", json=body, headers=EHR.auth(url))
    assert response.status_code == status, response.get_data(as_text=True)
    if status == 200:
        assert_valid("hook-response.json", response.json)
    return response.json


def test_discovery_over_http(service):
    client = service()
    response = client.get("/cds-services", headers=EHR.auth(f"{PUBLIC}/cds-services"))
    assert response.status_code == 200
    assert_valid("discovery.json", response.json)


def test_imagingstudy_create_queues_and_answers_at_once(service):
    client = service()
    body = hook_request("imagingstudy-create", {"patientId": "p1", "imagingStudyId": "ImagingStudy/ct1"})
    answer = call(client, "imagingstudy-create", body)  # answered without waiting for inference (latency: bench/hooks_bench.py)
    [card] = answer["cards"]
    assert card["summary"] == "AI triage: analysis pending" and card["indicator"] == "info"
    assert "AI-generated, preliminary" in card["detail"] and len(client.queued) == 1
    [event] = client.app.extensions["cds_hooks_guard"].audit.events("hook-call")
    assert event["client"].startswith(EHR.issuer) and event["detail"]["cards"] == [card["uuid"]]
    assert event["subject"] != "p1"  # hashed, never the id itself


def test_imagingstudy_create_after_the_job_finished_shows_the_result(service):
    client = service()
    store = client.context.store
    job, _ = store.submit(TriageRequest("ct1", "subscription", "sr1"), "m@1")
    store.claim(job.id)
    store.finish(job.id, JobState.DONE, "", {"model": {"name": "effnet-ich", "version": "1.2.0"}, "suggestedPriority": "stat",
                                             "findings": [{"label": "any", "probability": 0.97, "positive": True}],
                                             "written": {"Media": ["Media/m9"]}})
    body = hook_request("imagingstudy-create", {"patientId": "p1", "imagingStudyId": "ct1", "serviceRequestId": "sr1"},
                        prefetch={"serviceRequest": {"resourceType": "ServiceRequest", "id": "sr1", "status": "active",
                                                     "intent": "order", "priority": "routine",
                                                     "subject": {"reference": "Patient/p1"}},
                                  "imagingStudy": {"resourceType": "ImagingStudy", "id": "ct1", "status": "available",
                                                   "subject": {"reference": "Patient/p1"}}})
    answer = call(client, "imagingstudy-create", body)
    [card] = answer["cards"]
    assert card["indicator"] == "critical" and card["links"][0]["url"] == f"{PUBLIC}/heatmaps/m9.png"

    # patient p2 in context with p1's study: nothing of p1's result is shown
    other = json.loads(json.dumps(body)) | {"hookInstance": str(uuid.uuid4())}
    other["context"]["patientId"] = "p2"
    [card] = call(client, "imagingstudy-create", other)["cards"]
    assert card["indicator"] == "info" and "could not be confirmed" in card["detail"] and "heatmaps" not in json.dumps(card)
    # no way to check the study's patient (no prefetch, no fhirServer): nothing shown either
    bare = hook_request("imagingstudy-create", {"patientId": "p1", "imagingStudyId": "ct1"})
    [card] = call(client, "imagingstudy-create", bare)["cards"]
    assert "could not be confirmed" in card["detail"]
    assert "systemActions" not in answer  # off by default

    with_actions = service(cds_hooks_system_actions="on")
    answer = call(with_actions, "imagingstudy-create", body)
    [action] = answer["systemActions"]
    assert action["type"] == "update" and action["resource"]["priority"] == "stat"
    assert action["resource"]["id"] == "sr1" and "AI triage" in action["resource"]["note"][-1]["text"]
    # never lowers: an order already at stat gets no action
    body["prefetch"]["serviceRequest"]["priority"] = "stat"
    body["hookInstance"] = str(uuid.uuid4())
    assert "systemActions" not in call(with_actions, "imagingstudy-create", body)


def test_imagingstudy_create_for_a_study_no_model_reads(service):
    client = service()
    store = client.context.store
    job, _ = store.submit(TriageRequest("abd1", "subscription"), "m@1")
    store.claim(job.id)
    store.finish(job.id, JobState.NOT_APPLICABLE, "no triage model applies to this study (CT ABDOMEN)", {})
    [card] = call(client, "imagingstudy-create", hook_request("imagingstudy-create", {"patientId": "p", "imagingStudyId": "abd1"}))["cards"]
    assert card["summary"] == "AI triage: not performed for this study" and "ABDOMEN" in card["detail"]


def test_patient_view_from_prefetch(service):
    client = service()
    body = hook_request("patient-view", {"patientId": "p1", "userId": "Practitioner/dr"},
                        prefetch={"aiReports": searchset(NEGATIVE + TUMOUR + HEMORRHAGE)})
    cards = call(client, "patient-view", body)["cards"]
    assert [c["indicator"] for c in cards] == ["critical", "warning", "info"]
    assert "Intracranial hemorrhage" in cards[0]["summary"] and "Glioma" in cards[1]["summary"]


def test_patient_view_without_results_has_no_cards(service):
    body = hook_request("patient-view", {"patientId": "p1"}, prefetch={"aiReports": searchset([])})
    assert call(service(), "patient-view", body) == {"cards": []}


@pytest.mark.parametrize("prefetch", [{}, {"aiReports": None}, {"aiReports": {"resourceType": "OperationOutcome"}}])
def test_patient_view_without_data_or_access_is_412(service, prefetch):
    body = hook_request("patient-view", {"patientId": "p1"}, prefetch=prefetch)
    answer = call(service(), "patient-view", body, status=412)
    assert answer["resourceType"] == "OperationOutcome" and "aiReports" in answer["issue"][0]["diagnostics"]


def test_patient_view_when_the_fhir_server_is_unreachable_is_412(service):
    from cds_devtools.devservers import free_port

    url = f"http://127.0.0.1:{free_port()}/fhir"
    body = hook_request("patient-view", {"patientId": "p1"}, fhirServer=url,
                        fhirAuthorization={"access_token": "t", "token_type": "Bearer", "expires_in": 300,
                                           "scope": "patient/*.read", "subject": "cds-triage"})
    listed = service(cds_hooks_fhir_servers=url, cds_hooks_allow_loopback_fhir=True)
    assert "could not read" in call(listed, "patient-view", body, status=412)["issue"][0]["diagnostics"]


def imaging_order(order_id: str) -> dict:
    return {"resourceType": "ServiceRequest", "id": order_id, "status": "draft", "intent": "order",
            "subject": {"reference": "Patient/p1"},
            "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}]}]}


def test_order_sign_warns_of_an_unread_critical_finding(service):
    client = service()
    draft = searchset([imaging_order("new-ct")])
    reports = searchset(TUMOUR + HEMORRHAGE)
    [card] = call(client, "order-sign", hook_request("order-sign", {"patientId": "p1", "draftOrders": draft},
                                                     prefetch={"aiReports": reports}))["cards"]
    assert card["indicator"] == "critical" and card["summary"].startswith("Unread critical AI finding")
    assert card["links"][0]["url"].endswith("/heatmaps/new-2.png")
    # once a radiologist has finalised the report, nothing to warn about
    read = [dict(r, status="final") if r["resourceType"] == "DiagnosticReport" else r for r in HEMORRHAGE]
    assert call(client, "order-sign", hook_request("order-sign", {"patientId": "p1", "draftOrders": draft},
                                                   prefetch={"aiReports": searchset(read)}))["cards"] == []


def test_order_select_only_for_selected_imaging_orders(service):
    client = service()
    lab = {"resourceType": "ServiceRequest", "id": "lab", "status": "draft", "intent": "order", "subject": {"reference": "Patient/p1"}}
    draft = searchset([imaging_order("ct"), lab])
    reports = {"aiReports": searchset(HEMORRHAGE)}
    selected_ct = hook_request("order-select", {"patientId": "p1", "selections": ["ServiceRequest/ct"], "draftOrders": draft},
                               prefetch=reports)
    assert [c["indicator"] for c in call(client, "order-select", selected_ct)["cards"]] == ["critical"]
    selected_lab = hook_request("order-select", {"patientId": "p1", "selections": ["ServiceRequest/lab"], "draftOrders": draft})
    assert call(client, "order-select", selected_lab)["cards"] == []  # no data needed, so no 412 either


def test_unknown_service_is_404(service):
    response = service().post("/cds-services/nope", json={}, headers=EHR.auth(f"{PUBLIC}/cds-services/nope"))
    assert response.status_code == 404 and response.json["resourceType"] == "OperationOutcome"


def test_feedback_is_stored_once_and_audited(service):
    client = service()
    body = hook_request("patient-view", {"patientId": "p1"}, prefetch={"aiReports": searchset(HEMORRHAGE)})
    [card] = call(client, "patient-view", body)["cards"]
    reason = card["overrideReasons"][0]
    feedback = {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-23T08:05:00Z",
                              "overrideReason": {"reason": {k: reason[k] for k in ("system", "code")},
                                                 "userComment": "read it already"}}]}
    assert_valid("feedback.json", feedback)
    url = f"{PUBLIC}/cds-services/patient-view/feedback"
    first = client.post("/cds-services/patient-view/feedback", json=feedback, headers=EHR.auth(url))
    again = client.post("/cds-services/patient-view/feedback", json=feedback,
                        headers=EHR.auth(f"{PUBLIC}/cds-services/patient-view"))  # the service URL as aud is fine too
    assert first.status_code == again.status_code == 200
    assert first.json["feedback"][0]["status"] == "stored" and again.json["feedback"][0]["status"] == "already-stored"
    audit = client.app.extensions["cds_hooks_guard"].audit
    [stored] = audit.feedback_for(card["uuid"])
    assert stored["outcome"] == "overridden" and stored["override_reason"]["reason"]["code"] == "already-read"
    [event] = audit.events("feedback")
    assert event["detail"] == {"card": card["uuid"], "outcome": "overridden", "overrideReason": "already-read",
                               "outcomeTimestamp": "2026-11-23T08:05:00Z"}
    assert "read it already" not in str(event)  # free text stays out of the event log


def test_feedback_is_tied_to_the_study_the_card_showed(service):
    """A result card names its AI result in its `extension`; the audit log keeps it (the study hashed), so
    `cds-triage trial` can read a clinician's feedback as truth for that study."""
    client = service()
    body = hook_request("patient-view", {"patientId": "p1"}, prefetch={"aiReports": searchset(HEMORRHAGE)})
    [card] = call(client, "patient-view", body)["cards"]
    assert card["extension"]["cds-triage-ai-result"] == {"imagingStudy": "ImagingStudy/ct1", "findings": ["any"], "mode": "active"}
    feedback = {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-23T08:05:00Z",
                              "overrideReason": {"reason": {"system": card["overrideReasons"][1]["system"],
                                                            "code": "false-positive"}}}]}
    url = f"{PUBLIC}/cds-services/patient-view/feedback"
    assert client.post("/cds-services/patient-view/feedback", json=feedback, headers=EHR.auth(url)).status_code == 200
    audit = client.app.extensions["cds_hooks_guard"].audit
    [found] = audit.feedback_on_studies(["ct1", "other"])
    assert found["study"] == "ct1" and found["card"] == card["uuid"] and found["findings"] == ["any"]
    assert found["outcome"] == "overridden" and found["override_reason"]["reason"]["code"] == "false-positive"
    assert audit.feedback_on_studies(["other"]) == []
    with sqlite3.connect(audit.path) as db:  # the study id is stored hashed, as everywhere in the audit log
        assert "ct1" not in str(db.execute("SELECT * FROM card_result").fetchall())


def test_feedback_for_cards_we_never_issued_or_malformed_is_400(service):
    client = service()
    url = f"{PUBLIC}/cds-services/patient-view/feedback"
    unknown = {"feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": "2026-11-23T08:05:00Z"}]}
    response = client.post("/cds-services/patient-view/feedback", json=unknown, headers=EHR.auth(url))
    assert response.status_code == 400 and "not issued" in response.json["issue"][0]["diagnostics"]
    response = client.post("/cds-services/patient-view/feedback", json={"feedback": "yes"}, headers=EHR.auth(url))
    assert response.status_code == 400
    assert client.post("/cds-services/patient-view/feedback", json=unknown).status_code == 401


# --- data read from the real FHIR server with the client's token --------------------------------------------


def test_patient_view_reads_the_fhir_server_with_fhir_authorization(service, fhir_server):
    fhir = FhirClient(fhir_server.url)
    patient = f"pv-{uuid.uuid4().hex[:8]}"
    fhir.update({"resourceType": "Patient", "id": patient}, if_match=None)
    older = triage_result(Task.BRAIN_MRI, [("glioma", 0.7, True), ("meningioma", 0.1, False), ("pituitary", 0.1, False),
                                           ("no_tumor", 0.1, False)], study_uid=f"1.2.{uuid.uuid4().int % 10**9}")
    newer = triage_result(Task.HEAD_CT_ICH, [("any", 0.91, True)], study_uid=f"1.3.{uuid.uuid4().int % 10**9}")
    fhir.transaction(transaction(patient, "mr", older, NOW - timedelta(hours=5)))
    fhir.transaction(transaction(patient, "ct", newer, NOW))
    fhir.close()
    body = hook_request("patient-view", {"patientId": patient}, fhirServer=fhir_server.url,
                        fhirAuthorization={"access_token": "ehr-issued-token", "token_type": "Bearer", "expires_in": 300,
                                           "scope": "user/DiagnosticReport.read user/Observation.read", "subject": "cds-triage"})
    # SSRF guard: a fhirServer nobody listed, or a listed loopback one without the development switch, is never called
    for refused in (service(), service(cds_hooks_fhir_servers=fhir_server.url),
                    service(cds_hooks_fhir_servers=f"https://other-issuer.example|{fhir_server.url}", cds_hooks_allow_loopback_fhir=True)):
        answer = call(refused, "patient-view", body, status=412)
        assert "CDS_HOOKS_FHIR_SERVERS" in answer["issue"][0]["diagnostics"]
    cards = call(service(cds_hooks_fhir_servers=f"{EHR.issuer}|{fhir_server.url}", cds_hooks_allow_loopback_fhir=True),
                 "patient-view", body)["cards"]
    assert [c["indicator"] for c in cards] == ["critical", "warning"]
    assert "0.91" in cards[0]["detail"] and "effnet-ich 1.2.0" in cards[0]["detail"]  # Observations came with _include
    assert "0.70" in cards[1]["detail"]


# --- end to end: hook call → job → results in the FHIR server → patient-view card ------------------------------


EHR_FHIR_TOKEN = "ehr-static-token"  # how the EHR itself (and the token it hands us in fhirAuthorization) reaches FHIR


@pytest.fixture(scope="module")
def secured_product(orthanc, tmp_path_factory):
    """Orthanc, a FHIR server with SMART on, and our serve + worker: SMART outbound, JWT inbound."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from cds_devtools import devservers
    from cds_devtools.demo import start_service
    from cds_service.adapters.smart_auth import public_jwk
    from conftest import require
    from support import make_test_weights, seed_onnx_exports

    require(devservers.find_sekmet(), "sekmet executable not found in this virtualenv (pip install sekmet-fhir==0.1.1)")
    root = tmp_path_factory.mktemp("secured")
    our_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = root / "cds-triage-smart.pem"
    key_file.write_bytes(our_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    fhir_server = devservers.start_fhir_server(root / "fhir", extra_settings={"server_auth": {
        "types": ["smart", "bearer"], "tokens": [EHR_FHIR_TOKEN],
        "smart_clients": [{"client_id": "cds-triage", "jwks": {"keys": [public_jwk(our_key)]}, "scopes": "system/*.rs system/*.cu"}],
    }})
    port = devservers.free_port()
    settings = Settings(
        operator_open_on_loopback=True,  # tests call /jobs directly
        fhir_base_url=fhir_server.url, dicomweb_url=orthanc.dicomweb_url, public_url=f"http://127.0.0.1:{port}",
        host="127.0.0.1", port=port, data_dir=root / "data", weights_dir=make_test_weights(root / "weights", Task.HEAD_CT_ICH),
        job_retries=2, job_retry_delay_s=0.2, http_timeout_s=10,
        fhir_smart_client_id="cds-triage", fhir_smart_private_key_file=str(key_file),
        cds_hooks_fhir_servers=f"{EHR.issuer}|{fhir_server.url}", cds_hooks_allow_loopback_fhir=True,  # a local EHR
        **EHR.hook_settings(root / "ehr-jwks.json"),
    )
    try:
        processes = start_service(seed_onnx_exports(settings), root / "logs")
    except BaseException:
        fhir_server.stop()
        raise
    yield settings, orthanc
    processes.stop()
    fhir_server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.integration
def test_hook_call_to_critical_patient_view_card_end_to_end(secured_product):
    import httpx
    import numpy as np
    import pydicom

    from cds_service.adapters.audit import AuditLog
    from cds_devtools.devservers import upload_dicom
    from cds_devtools.dicom_data import make_dataset
    from fhir_mappings.imaging_study import build_imaging_study

    settings, orthanc = secured_product
    base = settings.public_url
    tag = uuid.uuid4().hex[:8]
    patient, order, study = f"p-{tag}", f"sr-{tag}", f"is-{tag}"
    series_uid, study_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    rng = np.random.default_rng(3)
    slices = [make_dataset((rng.normal(35, 10, (64, 64)) + 1024).astype(np.uint16), modality="CT", body_part="HEAD",
                           series_description="CT HEAD WO", study_uid=study_uid, series_uid=series_uid, instance_number=i + 1,
                           rescale_slope=1, rescale_intercept=-1024) for i in range(3)]
    upload_dicom(orthanc.url, slices)
    ehr_fhir = FhirClient(settings.fhir_base_url, bearer_token=EHR_FHIR_TOKEN)
    ehr_fhir.update({"resourceType": "Patient", "id": patient}, if_match=None)
    ehr_fhir.update({"resourceType": "ServiceRequest", "id": order, "status": "active", "intent": "order", "priority": "routine",
                     "subject": {"reference": f"Patient/{patient}"}}, if_match=None)
    imaging_study = build_imaging_study(slices, patient_id=patient, service_request_id=order, study_id=study)
    ehr_fhir.update(imaging_study.model_dump(mode="json", exclude_none=True), if_match=None)

    with httpx.Client(base_url=base, timeout=10) as http:
        # 1. the EHR calls imagingstudy-create: a pending card, at once
        hook = hook_request("imagingstudy-create", {"patientId": patient, "imagingStudyId": study, "serviceRequestId": order})
        assert http.post("/cds-services/imagingstudy-create", json=hook).status_code == 401  # no JWT, no service
        response = http.post("/cds-services/imagingstudy-create", json=hook,
                             headers=EHR.auth(f"{base}/cds-services/imagingstudy-create"))
        assert response.status_code == 200
        assert_valid("hook-response.json", response.json())
        assert response.json()["cards"][0]["summary"] == "AI triage: analysis pending"

        # 2. the worker triages it, reading and writing FHIR with its SMART token
        deadline, job = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            jobs = http.get("/jobs", params={"imagingStudy": study}).json()["jobs"]
            job = jobs[0] if jobs else {}
            if job.get("status") in ("done", "failed", "not_applicable", "model_unavailable"):
                break
            time.sleep(0.3)
        assert job.get("status") == "done", job
        [report] = ehr_fhir.search("DiagnosticReport", {"subject": f"Patient/{patient}"})
        assert report["status"] == "preliminary"
        assert ehr_fhir.read("ServiceRequest", order)[0]["priority"] == "stat"

        # 3. the clinician opens the chart: patient-view reads the results with the EHR's token
        view = hook_request("patient-view", {"patientId": patient}, fhirServer=settings.fhir_base_url,
                            fhirAuthorization={"access_token": EHR_FHIR_TOKEN, "token_type": "Bearer", "expires_in": 300,
                                               "scope": "user/DiagnosticReport.read user/Observation.read", "subject": "cds-triage"})
        response = http.post("/cds-services/patient-view", json=view, headers=EHR.auth(f"{base}/cds-services/patient-view"))
        assert response.status_code == 200, response.text
        assert_valid("hook-response.json", response.json())
        [card] = response.json()["cards"]
        assert card["indicator"] == "critical" and "Intracranial hemorrhage" in card["summary"]
        assert md("test-untrained-head_ct_ich 0.0.0-test") in card["detail"] and "AI-generated, preliminary" in card["detail"]
        heatmap = next(link["url"] for link in card["links"] if "/heatmaps/" in link["url"])
        png = http.get(heatmap)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

        # without prefetch or fhirAuthorization the service cannot see the chart: 412
        blind = hook_request("patient-view", {"patientId": patient})
        assert http.post("/cds-services/patient-view", json=blind,
                         headers=EHR.auth(f"{base}/cds-services/patient-view")).status_code == 412

        # 4. the clinician dismisses the card with a reason: stored once, in the audit log
        feedback = {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-23T09:00:00Z",
                                  "overrideReason": {"reason": {"system": card["overrideReasons"][1]["system"],
                                                                "code": card["overrideReasons"][1]["code"]}}}]}
        url = f"{base}/cds-services/patient-view/feedback"
        statuses = [http.post("/cds-services/patient-view/feedback", json=feedback, headers=EHR.auth(url)).json()
                    ["feedback"][0]["status"] for _ in range(2)]
        assert statuses == ["stored", "already-stored"]
    ehr_fhir.close()
    events = AuditLog(settings.data_dir / "audit.sqlite3").events("feedback")
    assert [e["detail"]["overrideReason"] for e in events if e["detail"]["card"] == card["uuid"]] == ["false-positive"]


def test_an_upstream_error_body_is_never_echoed(service):
    """The 412 says which key and the HTTP status; what the fhirServer wrote stays in our log."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Talkative(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"resourceType": "OperationOutcome", "issue": [{"diagnostics": "INTERNAL-SECRET db=10.0.0.5"}]}'
            self.send_response(400)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Talkative)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/fhir"
        body = hook_request("patient-view", {"patientId": "p1"}, fhirServer=url,
                            fhirAuthorization={"access_token": "t", "token_type": "Bearer"})
        answer = call(service(cds_hooks_fhir_servers=url, cds_hooks_allow_loopback_fhir=True), "patient-view", body, status=412)
        diagnostics = answer["issue"][0]["diagnostics"]
        assert "HTTP 400" in diagnostics and "SECRET" not in diagnostics and "10.0.0.5" not in diagnostics
    finally:
        server.shutdown()
        server.server_close()
