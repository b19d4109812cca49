"""`cds-triage trial`, its pure parts: the code map and the truth rules, the study records and the data's
problems, the figures (validate's statistics) and the turnaround, the report; and, with a fake FHIR
server (httpx MockTransport), the paging and the one-line errors for a server that refuses or lacks a
search parameter. The whole command on real servers (sekmet and HAPI) is in test_trial_e2e.py."""

from __future__ import annotations

import io
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest

from cds_service import cli
from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.domain import Task, TaskMode
from cds_service.core.evaluation import binary_validation
from cds_service.trial.figures import AT_TRIAGE, CARD, task_document
from cds_service.trial.report import html_report, summary_lines
from cds_service.trial.studies import Problems, ai_results, finals_by_study, latest_per_study, study_records
from cds_service.trial.truth import (FALSE_POSITIVE, CodeMapError, default_codes, load_code_map, measured_labels,
                                     truth_from_codes, truth_from_feedback)
from fhir_mappings import codes
from fhir_mappings.conventions import DEFAULT_CONVENTIONS
from trial_support import SNOMED_ICH, SNOMED_NORMAL, T0, ai_report, final_report, order

LOCAL = DEFAULT_CONVENTIONS.finding_system
HOUR = timedelta(hours=1)


# --- the code map and the truth rules -------------------------------------------------------------------------


def test_measured_labels_are_the_main_decision_then_the_other_findings():
    assert measured_labels(Task.HEAD_CT_ICH) == ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
    assert measured_labels(Task.BRAIN_MRI) == ("presence", "glioma", "meningioma", "pituitary")
    assert measured_labels(Task.CHEST_PNEUMOTHORAX) == ("pneumothorax",)


def test_the_default_codes_are_the_ones_we_write_and_no_abnormality():
    head = default_codes(Task.HEAD_CT_ICH).meaning
    assert head[SNOMED_ICH] == "any" and head[f"{LOCAL}|any"] == "any"
    assert head[f"{codes.SNOMED_SYSTEM}|21454007"] == "subarachnoid" and head[SNOMED_NORMAL] == "negative"
    chest = default_codes(Task.CHEST_PNEUMOTHORAX).meaning
    assert chest[f"{codes.RADLEX_SYSTEM}|RID5352"] == chest[f"{codes.SNOMED_SYSTEM}|36118008"] == "pneumothorax"
    assert default_codes(Task.BRAIN_MRI).meaning[f"{LOCAL}|no_tumor"] == "negative"


@pytest.mark.parametrize("task, codings, truth, unknown, problem", [
    (Task.HEAD_CT_ICH, [SNOMED_ICH], {"any": True}, (), ""),  # "a bleed": says nothing of its kind
    (Task.HEAD_CT_ICH, [f"{codes.SNOMED_SYSTEM}|21454007"],  # a subarachnoid bleed: a bleed, and of no other kind
     {"any": True, "epidural": False, "intraparenchymal": False, "intraventricular": False, "subarachnoid": True, "subdural": False}, (), ""),
    (Task.HEAD_CT_ICH, [SNOMED_NORMAL], dict.fromkeys(measured_labels(Task.HEAD_CT_ICH), False), (), ""),
    (Task.HEAD_CT_ICH, [SNOMED_ICH, "http://x|Z"], {"any": True}, ("http://x|Z",), ""),
    (Task.HEAD_CT_ICH, ["http://x|Z"], None, ("http://x|Z",), "codes the map does not know: http://x|Z"),
    (Task.HEAD_CT_ICH, [SNOMED_ICH, SNOMED_NORMAL], None, (), "contradict each other"),
    (Task.HEAD_CT_ICH, [], None, (), "has no conclusionCode"),
    (Task.BRAIN_MRI, [f"{LOCAL}|glioma"], {"presence": True, "glioma": True, "meningioma": False, "pituitary": False}, (), ""),
    (Task.BRAIN_MRI, [f"{LOCAL}|no_tumor"], {"presence": False, "glioma": False, "meningioma": False, "pituitary": False}, (), ""),
    (Task.CHEST_PNEUMOTHORAX, [f"{codes.RADLEX_SYSTEM}|RID5352"], {"pneumothorax": True}, (), ""),
])
def test_truth_from_the_final_reports_codes(task, codings, truth, unknown, problem):
    reading = truth_from_codes(default_codes(task), codings)
    assert reading.truth == truth and reading.unknown_codes == unknown and problem in reading.problem


def test_a_site_code_map_adds_codes_and_a_bad_one_is_refused_naming_what(tmp_path):
    path = tmp_path / "codes.json"
    path.write_text(json.dumps({"format": "cds-triage-trial-codes/1", "tasks": {"head_ct_ich": {
        "subdural": ["http://hospital.example/codes|SDH"], "negative": ["http://hospital.example/codes|NORMAL"]}}}))
    maps = load_code_map(path)
    assert maps[Task.HEAD_CT_ICH].meaning["http://hospital.example/codes|SDH"] == "subdural"
    assert maps[Task.HEAD_CT_ICH].meaning[SNOMED_ICH] == "any"  # the defaults stay
    assert truth_from_codes(maps[Task.HEAD_CT_ICH], ["http://hospital.example/codes|NORMAL"]).truth["any"] is False
    for document, said in [
        ({"format": "nope"}, "not a code map"),
        ({"format": "cds-triage-trial-codes/1", "tasks": {"knee_mri": {}}}, "unknown task 'knee_mri'"),
        ({"format": "cds-triage-trial-codes/1", "tasks": {"head_ct_ich": {"bleed": []}}}, "unknown label 'bleed'"),
        ({"format": "cds-triage-trial-codes/1", "tasks": {"head_ct_ich": {"any": ["1386000"]}}}, "system|code"),
        ({"format": "cds-triage-trial-codes/1", "tasks": {"head_ct_ich": {"negative": [SNOMED_ICH]}}}, "both 'any' and 'negative'"),
    ]:
        path.write_text(json.dumps(document))
        with pytest.raises(CodeMapError, match=said):
            load_code_map(path)
    with pytest.raises(CodeMapError, match="no such file"):
        load_code_map(tmp_path / "missing.json")


def feedback(outcome: str, reason: str | None = None, findings=("any",), at: str = "2026-12-01T09:00:00Z", card: str = "c1") -> dict:
    item: dict[str, Any] = {"study": "s1", "card": card, "outcome": outcome, "outcome_timestamp": at, "findings": list(findings),
                            "override_reason": {"reason": {"system": DEFAULT_CONVENTIONS.override_reason_system, "code": reason}} if reason else {}}
    return item


def test_truth_from_feedback_accepted_or_a_false_positive_and_the_latest_wins():
    assert FALSE_POSITIVE in codes.OVERRIDE_REASON_CODES
    truth, detail = truth_from_feedback(Task.HEAD_CT_ICH, [feedback("accepted", findings=("any", "subdural"))])
    assert truth == {"any": True, "subdural": True} and detail.startswith("accepted on card c1")
    truth, _ = truth_from_feedback(Task.HEAD_CT_ICH, [feedback("overridden", FALSE_POSITIVE)])
    assert truth == dict.fromkeys(measured_labels(Task.HEAD_CT_ICH), False)
    later = feedback("overridden", FALSE_POSITIVE, at="2026-12-01T10:00:00+00:00", card="c2")
    truth, detail = truth_from_feedback(Task.HEAD_CT_ICH, [later, feedback("accepted")])
    assert truth["any"] is False and "card c2" in detail
    truth, detail = truth_from_feedback(Task.HEAD_CT_ICH, [feedback("overridden", "already-read"), feedback("accepted", findings=())])
    assert truth is None and detail == ("feedback says nothing about a finding: overridden (already-read), "
                                        "accepted on a card without a finding")
    assert truth_from_feedback(Task.BRAIN_MRI, [feedback("accepted", findings=("glioma",))])[0] == {"presence": True, "glioma": True}


# --- study records, the data's problems, the figures ---------------------------------------------------------


def shadow_trial() -> dict[str, Any]:
    """Eight head CT studies triaged in shadow mode and what the radiologists wrote, with every kind of bad input."""
    scores = {"a1": 0.9, "a2": 0.8, "a3": 0.7, "a4": 0.6, "b1": 0.3, "b2": 0.4, "b3": 0.2, "b4": 0.1}
    resources = [r for study, p in scores.items() for r in ai_report(study, [("any", p, p >= 0.5)])]
    resources += ai_report("a1", [("any", 0.2, False)], issued=T0, prefix="old")  # an earlier AI report of a1: the later one is used
    devices = {f"Device/{r['id']}": r for r in resources if r["resourceType"] == "Device"}
    finals = [
        final_report("f-a1", study="a1", patient="p-a1", codes_=[SNOMED_ICH], issued=T0 + 2 * HOUR),
        final_report("f-a3", order="sr-a3", patient="p-a3", codes_=[SNOMED_NORMAL], issued=T0 + 6 * HOUR),  # by its order only
        final_report("f-a4", study="a4", patient="p-a4", codes_=[SNOMED_ICH], issued=T0 + HOUR),
        final_report("f-a4-amended", study="a4", patient="p-a4", codes_=[SNOMED_NORMAL], issued=T0 + 10 * HOUR, status="amended"),
        final_report("f-b1", study="b1", patient="p-b1", codes_=[SNOMED_NORMAL], issued=T0 + 8 * HOUR),
        final_report("f-b2", study="b2", patient="p-b2", codes_=[f"{LOCAL}|any", "http://ris.example|X1"], issued=T0 + 12 * HOUR),
        final_report("f-b3", study="b3", patient="p-b3", codes_=["http://ris.example|X2"], issued=T0 + 5 * HOUR),
        final_report("f-a2", study="a2", patient="p-a2", issued=T0 + 4 * HOUR),  # uncoded: its truth comes from feedback
        final_report("f-none", patient="p-a1", codes_=[SNOMED_ICH], issued=T0 + HOUR),  # names no study
        final_report("f-other", study="never-triaged", patient="p-a1", codes_=[SNOMED_ICH], issued=T0 + HOUR),
        final_report("f-prelim", study="b4", patient="p-b4", codes_=[SNOMED_ICH], status="preliminary"),  # not final: not used
    ]
    orders = {f"sr-{s}": order(f"sr-{s}", f"p-{s}") for s in scores}
    orders["sr-b3"] = order("sr-b3", "p-b3", authored=None)  # no order time: the study's start is used
    studies = {"b3": {"resourceType": "ImagingStudy", "id": "b3", "status": "available", "started": "2026-12-01T07:00:00Z"}}
    return {"resources": resources, "devices": devices, "finals": finals, "orders": orders, "studies": studies,
            "feedback": [feedback("accepted") | {"study": "a2"}]}


def records_of(trial: dict[str, Any]):
    problems = Problems()
    results = latest_per_study(ai_results(trial["resources"], trial["devices"], problems), problems)
    finals = finals_by_study(trial["finals"], results, trial["studies"], problems)
    return study_records(results, finals, trial["studies"], trial["orders"], trial["feedback"], load_code_map(None), problems), problems


def test_each_study_gets_its_final_reports_truth_or_feedback_or_a_reason_and_the_problems_are_listed():
    records, problems = records_of(shadow_trial())
    by_study = {r.study_id: r for r in records}
    assert sorted(by_study) == ["a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4"]
    assert by_study["a1"].ai.probabilities == {"any": 0.9} and by_study["a1"].ai.model == ("test-model", "1.0.0")
    assert all(r.ai.mode is TaskMode.SHADOW for r in records)
    truth = {s: (r.truth.labels.get("any") if r.truth else None, r.truth.source if r.truth else r.unknown) for s, r in by_study.items()}
    assert truth == {
        "a1": (True, "final report"), "a2": (True, "feedback"), "a3": (False, "final report"),
        "a4": (False, "final report"),  # the amended report, issued last, wins
        "b1": (False, "final report"), "b2": (True, "final report"),
        "b3": (None, "codes the map does not know: http://ris.example|X2; no CDS Hooks feedback"),
        "b4": (None, "no final report yet; no CDS Hooks feedback"),
    }
    assert by_study["a4"].truth.detail == "DiagnosticReport/f-a4-amended (amended)"
    assert problems.final_without_study == ["f-none"]
    assert problems.final_for_untriaged_study == [{"report": "f-other", "names": ["ImagingStudy/never-triaged"]}]
    assert problems.several_finals == [{"study": "a4", "reports": ["f-a4-amended", "f-a4"], "used": "f-a4-amended"}]
    assert problems.unknown_codes == [{"report": "f-b2", "study": "b2", "codes": ["http://ris.example|X1"]},
                                      {"report": "f-b3", "study": "b3", "codes": ["http://ris.example|X2"]}]
    assert problems.several_ai_reports[0]["study"] == "a1" and len(problems.several_ai_reports[0]["reports"]) == 2
    assert len(problems.lines()) == 5
    assert by_study["b3"].started_from == "study started" and by_study["b3"].turnaround_h == 6.0  # 07:00 -> 13:00
    assert by_study["a3"].started_from == "order authoredOn" and by_study["a3"].turnaround_h == 6.0


def test_the_figures_are_validates_statistics_with_the_studies_in_each_cell_and_the_waits():
    records, _ = records_of(shadow_trial())
    doc = task_document(Task.HEAD_CT_ICH, records, card=None, site_threshold=None, resamples=200)
    anywhere = doc["labels"]["any"]
    # known truth: a1 0.9 T, a2 0.8 T, a3 0.7 F, a4 0.6 F, b1 0.3 F, b2 0.4 T (b3, b4 unknown)
    y = np.array([1, 1, 0, 0, 0, 1], bool)
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.4])
    assert anywhere["metrics"] == binary_validation(y, p, {}, resamples=200)  # the same code as validate, nothing else
    assert anywhere["metrics"]["auc"]["value"] == pytest.approx(7 / 9, abs=1e-4)
    point = anywhere["at_triage"]
    assert (point["tp"], point["fp"], point["fn"], point["tn"]) == (2, 2, 1, 1) and point["threshold"] == 0.5
    assert point["sensitivity"]["count"] == [2, 3] and point["npv"]["count"] == [1, 2] and point["raised"]["count"] == [4, 6]
    assert anywhere["cells"][AT_TRIAGE] == {"tp": ["a1", "a2"], "fp": ["a3", "a4"], "fn": ["b2"], "tn": ["b1"]}
    assert doc["studies"] == {"triaged": 8, "shadow": 8, "active": 0, "with_final_report": 7, "truth_known": 6,
                              "truth_from": {"final report": 5, "feedback": 1}, "truth_unknown": 2}
    assert any("no model card" in w for w in doc["warnings"]) and any("2 of 8 studies have no known truth" in w for w in doc["warnings"])
    waits = doc["turnaround"]["shadow"]
    # raised: a1 2 h, a2 4 h, a3 6 h, a4 10 h; not raised: b1 8 h, b2 12 h, b3 6 h (b4 no final report)
    assert waits["raised"] | {"studies": None} == {"n": 4, "median_h": 5.0, "q1_h": 3.5, "q3_h": 7.0, "studies": None}
    assert (waits["not_raised"]["n"], waits["not_raised"]["median_h"], waits["not_raised"]["q1_h"], waits["not_raised"]["q3_h"]) == (3, 8.0, 7.0, 10.0)
    assert waits["counts"] == {"raised": 4, "not_raised": 4, "positives_raised": 2, "positives_missed": 1}
    assert (waits["positives_raised"]["median_h"], waits["positives_raised"]["studies"]) == (3.0, ["a1", "a2"])
    assert (waits["positives_missed"]["median_h"], waits["positives_missed"]["studies"]) == (12.0, ["b2"])
    assert "active" not in doc["turnaround"]


def test_thresholds_of_the_card_in_use_and_the_site_are_measured_too(tmp_path):
    from support import make_test_weights
    from cds_service.core.model_cards import available_cards

    card = available_cards(make_test_weights(tmp_path, Task.HEAD_CT_ICH, threshold=0.35))[Task.HEAD_CT_ICH]
    records, _ = records_of(shadow_trial())
    doc = task_document(Task.HEAD_CT_ICH, records, card=card, site_threshold=0.75, resamples=200)
    cells = doc["labels"]["any"]["cells"]
    assert cells[CARD] == {"tp": ["a1", "a2", "b2"], "fp": ["a3", "a4"], "fn": [], "tn": ["b1"]}
    assert cells["site (CDS_SITE_THRESHOLDS)"] == {"tp": ["a1", "a2"], "fp": [], "fn": ["b2"], "tn": ["a3", "a4", "b1"]}
    assert any("another model than the weights in use" in w for w in doc["warnings"])  # test-model 1.0.0 vs the card


def test_the_report_is_one_page_without_external_assets(tmp_path):
    records, problems = records_of(shadow_trial())
    doc = {"fhir_server": "http://127.0.0.1:1/fhir", "period": {"since": "2026-12-01", "until": None}, "created": "now",
           "code_map": "defaults", "feedback": "1 item", "searches": [{"search": "DiagnosticReport?x", "pages": 1, "resources": 3}],
           "problems": problems.to_json(), "problem_lines": problems.lines(),
           "tasks": {"head_ct_ich": task_document(Task.HEAD_CT_ICH, records, None, None, resamples=100)}}
    page = html_report(doc)
    assert page.startswith("<!doctype html>") and "<svg" in page and "f-none" in page and "never-triaged" in page
    assert "src=" not in page and "<link" not in page and "http://ris.example|X2" in page
    lines = summary_lines(doc, tmp_path / "trial.html")
    assert any(line.startswith("  shadow: positives triage would have raised 2 of 3 positives, waited median 3 h 00 min")
               for line in lines), lines


# --- the command against a fake FHIR server: paging, refusals ---------------------------------------------------


BASE = "http://fhir.test/fhir"


class FakeFhir:
    """A FHIR server in memory: answers searches from resources, `per_page` at a time, with `next` links."""

    def __init__(self, resources: list[dict[str, Any]], *, per_page: int = 3, refuse: str | None = None,
                 warn: str | None = None, next_base: str = BASE) -> None:
        self.resources, self.per_page, self.refuse, self.warn, self.next_base = resources, per_page, refuse, warn, next_base
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        query = parse_qs(urlsplit(str(request.url)).query)
        if self.refuse and self.refuse in query:
            return httpx.Response(400, json={"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "not-supported", "diagnostics": f"Unknown search parameter '{self.refuse}'"}]})
        kind = request.url.path.rsplit("/", 1)[-1]
        found = [r for r in self.resources if r["resourceType"] == kind and self.matches(r, query)]
        if kind == "DiagnosticReport" and "_include" in query:
            found += [r for r in self.resources if r["resourceType"] == "Observation"]
        offset = int(query.get("_offset", ["0"])[0])
        page = [{"resource": r} for r in found[offset:offset + self.per_page]]
        if self.warn:
            page.append({"resource": {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "diagnostics": self.warn}]},
                         "search": {"mode": "outcome"}})
        links = []
        if offset + self.per_page < len(found):
            rest = {k: v for k, v in query.items() if k != "_offset"}
            links.append({"relation": "next", "url": str(httpx.URL(f"{self.next_base}/{kind}", params={**rest, "_offset": offset + self.per_page}))})
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "total": len(found), "entry": page, "link": links})

    @staticmethod
    def matches(resource: dict[str, Any], query: dict[str, list[str]]) -> bool:
        if "_id" in query:
            return resource["id"] in query["_id"][0].split(",")
        if "status" in query:
            return resource.get("status") in query["status"][0].split(",") and \
                (resource.get("subject") or {}).get("reference") in query["subject"][0].split(",")
        if "identifier" in query:
            return any(i.get("system") == DEFAULT_CONVENTIONS.result_identifier_system for i in resource.get("identifier") or [])
        return True


@pytest.fixture
def fake_server(monkeypatch, tmp_path):
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path / "data"))  # no audit log: no feedback
    monkeypatch.setenv("CDS_WEIGHTS_DIR", str(tmp_path / "no-weights"))

    def install(fake: FakeFhir) -> FakeFhir:
        from cds_service.adapters import smart_auth

        def client(settings, auth):
            made = FhirClient(BASE)
            made.http = httpx.Client(base_url=BASE + "/", headers=made.http.headers, transport=httpx.MockTransport(fake))
            return made

        monkeypatch.setattr(smart_auth, "fhir_client", client)
        monkeypatch.setenv("CDS_FHIR_BASE_URL", BASE)
        return fake
    return install


def fake_resources() -> list[dict[str, Any]]:
    trial = shadow_trial()
    return (trial["resources"] + trial["finals"] + list(trial["orders"].values()) + list(trial["studies"].values()))


def run(tmp_path: Path, *args: str) -> int:
    return cli.main(["trial", "--since", "2026-12-01", "--no-progress", "--bootstrap", "100", "--report", str(tmp_path / "t.html"), *args])


def test_the_command_pages_through_every_search_with_count_and_next_links(fake_server, tmp_path, capsys):
    fake = fake_server(FakeFhir(fake_resources(), per_page=3))
    assert run(tmp_path, "--json", "--page-size", "3") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tasks"]["head_ct_ich"]["labels"]["any"]["at_triage"]["tp"] == 1  # a2's feedback is not in this data dir
    ai = next(s for s in doc["searches"] if s["search"].startswith("DiagnosticReport?identifier="))
    assert ai["pages"] > 3 and ai["resources"] == len([r for r in fake_resources() if r["resourceType"] in ("DiagnosticReport", "Observation")
                                                       and r.get("id", "").startswith(("ai-", "old-"))])
    first = fake.requests[0]
    assert first.headers["Prefer"] == "handling=strict" and parse_qs(first.url.query.decode())["_count"] == ["3"]
    assert parse_qs(first.url.query.decode())["issued"] == ["ge2026-12-01"]
    assert (tmp_path / "t.html").read_text().startswith("<!doctype html>")


def test_a_server_that_refuses_a_search_parameter_is_one_line_and_exit_2(fake_server, tmp_path, capsys):
    fake_server(FakeFhir(fake_resources(), refuse="issued"))
    assert run(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cds-triage trial: the FHIR server refused the search DiagnosticReport?")
    assert "Unknown search parameter 'issued'" in err and f"CDS_FHIR_BASE_URL={BASE}" in err
    assert not (tmp_path / "t.html").exists()


def test_a_server_that_ignores_a_search_parameter_is_refused_too(fake_server, tmp_path, capsys):
    fake_server(FakeFhir(fake_resources(), warn="Unknown _include parameter 'DiagnosticReport:result'"))
    assert run(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did not run the search DiagnosticReport?" in err and "Unknown _include" in err


def test_a_next_link_to_another_host_is_refused(fake_server, tmp_path, capsys):
    fake = fake_server(FakeFhir(fake_resources(), per_page=2, next_base="http://elsewhere.test/fhir"))
    assert run(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "next link leads to http://elsewhere.test" in err and "CDS_FHIR_BASE_URL" in err
    assert all(r.url.host == "fhir.test" for r in fake.requests)  # our token never left for the other host


def test_nothing_in_the_period_is_exit_1(fake_server, tmp_path, capsys):
    fake_server(FakeFhir([]))
    assert run(tmp_path) == 1
    assert "nothing to measure" in capsys.readouterr().err


@pytest.mark.parametrize("args, said", [
    (["--since", "01.12.2026"], "is not a date"),
    (["--since", "2026-12-01T08:00:00"], "needs a time zone"),
    (["--since", "2026-12-01", "--page-size", "0"], "not between 1 and 1000"),
])
def test_bad_arguments_are_exit_2(args, said, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["trial", *args])
    assert exited.value.code == 2 and said in capsys.readouterr().err


def test_a_bad_code_map_is_exit_2_naming_the_file(tmp_path, capsys):
    (tmp_path / "codes.json").write_text("{}")
    assert run(tmp_path, "--codes", str(tmp_path / "codes.json")) == 2
    assert f"--codes {tmp_path / 'codes.json'}: not a code map" in capsys.readouterr().err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_goes_to_a_terminal_only(fake_server, tmp_path, monkeypatch):
    fake_server(FakeFhir(fake_resources(), per_page=4))
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["trial", "--since", "2026-12-01", "--bootstrap", "100", "--report", str(tmp_path / "t.html")]) == 0
    assert "trial: AI reports" in terminal.getvalue() and "resources" in terminal.getvalue()
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert run(tmp_path) == 0 and "trial: AI reports" not in quiet.getvalue()  # --no-progress


def test_a_fhir_server_that_cannot_be_reached_is_named_like_every_command_does(tmp_path, monkeypatch, capsys):
    from cds_devtools.devservers import free_port

    base = f"http://127.0.0.1:{free_port()}/fhir"  # nothing listens there
    monkeypatch.setenv("CDS_FHIR_BASE_URL", base)
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path / "data"))
    assert run(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "FHIR server unreachable" in err and base in err and "(CDS_FHIR_BASE_URL: is it right" in err


def test_the_terminal_summary(fake_server, tmp_path, capsys):
    fake_server(FakeFhir(fake_resources(), per_page=50))
    assert run(tmp_path) == 0
    out = capsys.readouterr().out
    assert "head_ct_ich: 8 studies triaged (8 shadow, 0 active), 7 with a final report; truth known for 5 (5 final report), unknown for 3" in out
    assert "    as decided at triage" in out and f"report: {tmp_path / 't.html'}" in out
    assert "note: Final reports that name no ImagingStudy and no order of a triaged study (not used): 1" in out


def test_a_withdrawn_ai_report_and_one_without_its_observations_are_said_not_measured():
    trial = shadow_trial()
    for resource in trial["resources"]:
        if resource["resourceType"] == "DiagnosticReport" and resource["imagingStudy"][0]["reference"] == "ImagingStudy/b4":
            resource["status"] = "entered-in-error"
    trial["resources"] = [r for r in trial["resources"]
                          if not (r["resourceType"] == "Observation" and r["id"].startswith(("ai-a1", "ai-b1")))]
    records, problems = records_of(trial)
    assert "b4" not in {r.study_id for r in records}
    assert problems.ai_reports_without_task == ["ai-b1-2"]  # no Observation, no positive finding: nothing names its task
    doc = task_document(Task.HEAD_CT_ICH, records, None, None, resamples=100)
    assert doc["labels"]["any"]["metrics"]["n"] == 4  # a1 keeps its truth (its finding is in conclusionCode) but has no score
    assert any(w.startswith("1 studies with a known truth have no score") and w.endswith(": a1") for w in doc["warnings"])
