"""`cds-triage trial` end to end, on each real FHIR server (`[sekmet]`, `[hapi]`), with Orthanc and our
service (serve + worker) triaging head CTs in shadow mode; then, with the site threshold the trial
wrote, the same service in active mode: a site goes from shadow to active with the trial alone.

The model is card-compatible untrained weights whose classifier is scaled up so that differently
exposed noise images get clearly different scores; the studies' scores are measured locally first
(`triage_input`, the service's own code) and the card threshold set between the 5th and 6th, so the
test knows which studies triage raises. Each study then gets a role (what the radiologist's final
report says, or a clinician's feedback on the CDS Hooks card), and every cell count and every
turnaround figure is checked exactly. The EHR side is plain FHIR REST; notifications are sent as the
rest-hook sends them (`PUT /fhir-notify/ImagingStudy/<id>`), so no Subscription is left behind.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest

import hapi_support
from cds_devtools.demo import start_service
from cds_devtools.devservers import free_port, upload_dicom
from cds_devtools.dicom_data import make_dataset
from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.domain import Task, TaskMode
from cds_service.core.models import ModelRegistry
from cds_service.core.settings import Settings
from cds_service.local_triage import collect_inputs, triage_input
from cds_service.web.cds_hooks.calls import render_query
from cds_service.web.cds_hooks.services import AI_REPORTS_QUERY, site_prefetch
from fhir_mappings import codes
from fhir_mappings.conventions import DEFAULT_CONVENTIONS
from hook_client import EhrSigner
from stack_support import NOTIFY_HEADERS, SECRET, wait_finished
from support import make_test_weights
from trial_support import final_report
from test_browser import browser, page, screenshot  # noqa: F401  (pytest fixtures: Debian's Chromium, loopback only)

pytestmark = pytest.mark.integration

EHR = EhrSigner()
ICH = f"{codes.SNOMED_SYSTEM}|1386000"
NORMAL = f"{codes.SNOMED_SYSTEM}|281900007"
UNKNOWN = "http://ris.example.org/codes|HEAD-42"
#: (mean HU, spread) of each study's noise: different exposures give the sharpened model different scores
PROFILES = [(0, 10), (35, 10), (-500, 50), (60, 20), (-100, 400), (100, 40), (1500, 300), (800, 200), (300, 100)]
#: roles by score rank, highest first: the top five are raised (card threshold between the 5th and 6th)
ROLES = ["a1_ich", "a2_feedback_accepted", "a3_feedback_false_positive", "a4_final_then_amended_normal", "a5_unknown_code",
         "b2_ich_missed", "b1_normal", "b3_uncoded_study_started", "b4_no_final"]


def series(profile: int, seed: int) -> list[pydicom.Dataset]:
    """A two-slice head CT of noise in a new study (same profile and seed: the same pixels, so the same score)."""
    mean, spread = PROFILES[profile]
    rng = np.random.default_rng(seed)
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    return [make_dataset((rng.normal(mean, spread, (64, 64)).clip(-1000, 2000) + 1024).astype(np.uint16), modality="CT",
                         body_part="HEAD", series_description="CT HEAD WO", study_uid=study_uid, series_uid=series_uid,
                         instance_number=i + 1, rescale_slope=1, rescale_intercept=-1024) for i in range(2)]


def sharpened_weights(folder: Path) -> Path:
    """Untrained head CT weights whose classifier is scaled so that scores spread over (0, 1)."""
    from safetensors.torch import load_file, save_file

    make_test_weights(folder, Task.HEAD_CT_ICH)
    path = folder / "head_ct_ich.safetensors"
    tensors = load_file(str(path))
    tensors["classifier.weight"] = tensors["classifier.weight"] * 20000
    save_file(tensors, str(path))
    return folder


def local_scores(weights: Path, folder: Path) -> list[float]:
    """p(any) of each profile's series, scored as `cds-triage triage` (and the service) score it."""
    settings = Settings(weights_dir=weights)
    registry = ModelRegistry(weights, settings.device, settings.inference_runtime, settings.inference_threads)
    scores = []
    for index in range(len(PROFILES)):
        target = folder / f"profile{index}"
        target.mkdir(parents=True)
        for n, ds in enumerate(series(index, index)):
            ds.save_as(target / f"{n}.dcm", enforce_file_format=True)
        [item] = collect_inputs([target])
        result = triage_input(item, registry, settings, Task.HEAD_CT_ICH, with_heatmap=False)
        scores.append(next(f.probability for f in result.findings if f.label == "any"))
    return scores


def at(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Site:
    """The EHR and the radiology system of one test site, on one FHIR server, with our service."""

    settings: Settings
    fhir: FhirClient
    api: httpx.Client
    orthanc_url: str
    ids: dict[str, dict[str, str]] = field(default_factory=dict)

    def order(self, role: str, datasets: list[pydicom.Dataset], authored: datetime | None, started: datetime | None = None) -> dict[str, str]:
        """Patient, imaging order and ImagingStudy in the EHR, images in the PACS, the study announced to the service."""
        from fhir_mappings.imaging_study import build_imaging_study

        upload_dicom(self.orthanc_url, datasets)
        tag = uuid.uuid4().hex[:8]
        ids = {"patient": f"p-{tag}", "order": f"sr-{tag}", "study": f"is-{tag}"}
        self.fhir.update({"resourceType": "Patient", "id": ids["patient"], "name": [{"family": "Trial", "given": [role]}]}, if_match=None)
        order = {"resourceType": "ServiceRequest", "id": ids["order"], "status": "active", "intent": "order", "priority": "routine",
                 "subject": {"reference": f"Patient/{ids['patient']}"}, "code": {"text": "CT head"}}
        if authored:
            order["authoredOn"] = at(authored)
        self.fhir.update(order, if_match=None)
        study = build_imaging_study(datasets, patient_id=ids["patient"], service_request_id=ids["order"],
                                    study_id=ids["study"]).model_dump(mode="json", exclude_none=True)
        if started:
            study["started"] = at(started)
        self.fhir.update(study, if_match=None)
        response = self.api.put(f"/fhir-notify/ImagingStudy/{ids['study']}", headers=NOTIFY_HEADERS)
        assert response.status_code == 200, response.text
        self.ids[role] = ids
        return ids

    def final(self, role: str, *, hours: float, codes_: list[str] | None = None, status: str = "final", base: datetime,
              study: bool = True, order: bool = True, patient_of: str | None = None) -> dict[str, Any]:
        """The radiologist's report as the RIS writes it: final or amended, coded or not, naming study and order."""
        ids = self.ids[patient_of or role]
        report = final_report("", study=ids["study"] if study else None, order=ids["order"] if order else None,
                              patient=ids["patient"], codes_=codes_, issued=base + timedelta(hours=hours), status=status)
        del report["id"]  # the server gives it
        return self.fhir.create(report)

    def feedback(self, role: str, outcome: str, reason: str | None = None) -> dict[str, Any]:
        """The clinician's answer to the patient-view card of the study's AI result (the EHR runs our prefetch)."""
        ids = self.ids[role]
        prefetch = self.fhir.http.get(render_query(site_prefetch(AI_REPORTS_QUERY, self.settings), {"patientId": ids["patient"]})).json()
        url = f"{self.settings.public_url}/cds-services/patient-view"
        body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": {"patientId": ids["patient"]},
                "prefetch": {"aiReports": prefetch}}
        response = self.api.post("/cds-services/patient-view", json=body, headers=EHR.auth(url))
        assert response.status_code == 200, response.text
        [card] = response.json()["cards"]
        item: dict[str, Any] = {"card": card["uuid"], "outcome": outcome, "outcomeTimestamp": at(datetime.now(timezone.utc))}
        if outcome == "accepted":
            item["acceptedSuggestions"] = [{"id": str(uuid.uuid4())}]
        if reason:
            item["overrideReason"] = {"reason": next({"system": r["system"], "code": r["code"]} for r in card["overrideReasons"]
                                                     if r["code"] == reason)}
        response = self.api.post("/cds-services/patient-view/feedback", json={"feedback": [item]}, headers=EHR.auth(url + "/feedback"))
        assert response.status_code == 200, response.text
        return card

    def ai_report(self, role: str) -> dict[str, Any]:
        [report] = self.fhir.search("DiagnosticReport", {"subject": f"Patient/{self.ids[role]['patient']}",
                                                         "identifier": f"{DEFAULT_CONVENTIONS.result_identifier_system}|"})
        return report


def run_trial(settings: Settings, *args: object) -> tuple[subprocess.CompletedProcess, dict[str, Any] | None]:
    """`cds-triage trial …` as an operator runs it on the service's machine (its settings, its data dir)."""
    done = subprocess.run([sys.executable, "-m", "cds_service.cli", "trial", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **settings.to_env()})
    doc = json.loads(done.stdout) if "--json" in map(str, args) and done.returncode in (0, 1) and done.stdout else None
    return done, doc


@dataclass(frozen=True)
class FhirUnderTest:
    name: str  # sekmet or hapi
    url: str


@pytest.fixture(scope="module", params=["sekmet", "hapi"])
def fhir_under_test(request) -> FhirUnderTest:
    if request.param == "hapi":
        hapi: hapi_support.HapiProcess = request.getfixturevalue("hapi_server")
        return FhirUnderTest("hapi", hapi.url)
    return FhirUnderTest("sekmet", request.getfixturevalue("fhir_server").url)


@pytest.fixture(scope="module")
def shadow(fhir_under_test, orthanc, tmp_path_factory) -> Any:
    """Nine head CTs triaged in shadow mode, their final reports and feedback written, and the trial run."""
    root = tmp_path_factory.mktemp("trial")
    weights = sharpened_weights(root / "weights")
    scores = local_scores(weights, root / "local")
    ranked = sorted(range(len(PROFILES)), key=lambda i: -scores[i])
    ordered = [scores[i] for i in ranked]
    assert min(a - b for a, b in zip(ordered, ordered[1:])) > 0.002, f"the profiles' scores are too close: {ordered}"
    card_path = weights / "head_ct_ich.json"
    card = json.loads(card_path.read_text())
    card["thresholds"]["any"] = round((ordered[4] + ordered[5]) / 2, 4)
    card_path.write_text(json.dumps(card))

    fhir_base = fhir_under_test.url
    port = free_port()
    settings = Settings(operator_open_on_loopback=True, fhir_base_url=fhir_base, dicomweb_url=orthanc.dicomweb_url,
                        public_url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port, data_dir=root / "data",
                        weights_dir=weights, subscription_secret=SECRET, job_retries=1, http_timeout_s=15,
                        task_modes={Task.HEAD_CT_ICH: TaskMode.SHADOW}, **EHR.hook_settings(root / "ehr-jwks.json"))
    processes = start_service(settings, root / "logs")
    fhir = FhirClient(fhir_base)
    api = httpx.Client(base_url=settings.public_url, timeout=30)
    site = Site(settings, fhir, api, orthanc.url)
    try:
        since = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=2)
        t0 = since  # every order placed then; final reports come hours "later"
        for role, profile in zip(ROLES, ranked):
            started = t0 - timedelta(hours=1) if role == "b3_uncoded_study_started" else None
            site.order(role, series(profile, profile), authored=None if started else t0, started=started)
        jobs = wait_finished(api, [ids["study"] for ids in site.ids.values()], timeout=240)
        assert all(job["status"] == "done" for job in jobs.values()), jobs
        reports = {role: site.ai_report(role) for role in ROLES}
        raised = {role for role, report in reports.items() if report.get("conclusionCode")}
        assert raised == set(ROLES[:5]), f"scores {ordered}, threshold {card['thresholds']['any']}: raised {raised}"

        site.feedback("a2_feedback_accepted", "accepted")
        site.feedback("a3_feedback_false_positive", "overridden", "false-positive")
        site.final("a1_ich", hours=2, codes_=[ICH], base=t0)
        site.final("a2_feedback_accepted", hours=4, base=t0)  # uncoded: the feedback says
        site.final("a3_feedback_false_positive", hours=6, base=t0, study=False)  # uncoded, names the order only
        site.final("a4_final_then_amended_normal", hours=1, codes_=[ICH], base=t0)
        site.final("a4_final_then_amended_normal", hours=10, codes_=[NORMAL], status="amended", base=t0)
        site.final("a5_unknown_code", hours=3, codes_=[UNKNOWN], base=t0)
        site.final("b1_normal", hours=8, codes_=[NORMAL], base=t0)
        site.final("b2_ich_missed", hours=12, codes_=[ICH, UNKNOWN], base=t0)
        site.final("b3_uncoded_study_started", hours=5, base=t0)
        # bad input: a final report naming no study (nor order), one for a study we never triaged
        no_study = site.final("x", hours=1, codes_=[ICH], base=t0, study=False, order=False, patient_of="a1_ich")
        untriaged_study = {"resourceType": "ImagingStudy", "status": "available",
                           "subject": {"reference": f"Patient/{site.ids['a1_ich']['patient']}"}}
        untriaged = fhir.create(untriaged_study)
        site.ids["x-untriaged"] = {"patient": site.ids["a1_ich"]["patient"], "study": untriaged["id"], "order": ""}
        other = site.final("x-untriaged", hours=1, codes_=[ICH], base=t0, order=False)

        report, site_file = root / "trial.html", root / "site-thresholds.json"
        done, doc = run_trial(settings, "--since", at(since), "--task", "head_ct_ich", "--json", "--report", report,
                              "--write-thresholds", site_file, "--page-size", "3", "--bootstrap", "300", "--no-progress")
        assert done.returncode == 0 and doc is not None, done.stdout[-2000:] + done.stderr[-3000:]
        yield {"site": site, "doc": doc, "since": since, "t0": t0, "scores": ordered, "reports": reports, "report": report,
               "site_file": site_file, "no_study": no_study["id"], "other": other["id"], "untriaged": untriaged["id"],
               "weights": weights, "ranked": ranked, "server": fhir_under_test.name}
    finally:
        api.close()
        fhir.close()
        processes.stop()


def study(shadow: dict[str, Any], role: str) -> str:
    return shadow["site"].ids[role]["study"]


def test_every_study_gets_its_truth_from_the_final_report_or_the_feedback(shadow):
    doc = shadow["doc"]["tasks"]["head_ct_ich"]
    assert doc["studies"] == {"triaged": 9, "shadow": 9, "active": 0, "with_final_report": 8, "truth_known": 6,
                              "truth_from": {"final report": 4, "feedback": 2}, "truth_unknown": 3}
    rows = {row["study"]: row for row in doc["study_rows"]}
    expected = {"a1_ich": (True, "final report"), "a2_feedback_accepted": (True, "feedback"),
                "a3_feedback_false_positive": (False, "feedback"), "a4_final_then_amended_normal": (False, "final report"),
                "a5_unknown_code": (None, None), "b2_ich_missed": (True, "final report"), "b1_normal": (False, "final report"),
                "b3_uncoded_study_started": (None, None), "b4_no_final": (None, None)}
    assert {role: (rows[study(shadow, role)]["truth"], rows[study(shadow, role)]["truth_from"]) for role in ROLES} == expected
    unknown = {u["study"]: u["reason"] for u in doc["unknown"]}
    assert unknown == {study(shadow, "a5_unknown_code"): f"codes the map does not know: {UNKNOWN}; no CDS Hooks feedback",
                       study(shadow, "b3_uncoded_study_started"): "the final report has no conclusionCode; no CDS Hooks feedback",
                       study(shadow, "b4_no_final"): "no final report yet; no CDS Hooks feedback"}
    assert rows[study(shadow, "a3_feedback_false_positive")]["truth_detail"].endswith("as a false positive")
    assert "2 CDS Hooks feedback items" in shadow["doc"]["feedback"]


def test_every_cell_count_and_the_studies_in_each_cell(shadow):
    figures = shadow["doc"]["tasks"]["head_ct_ich"]["labels"]["any"]
    s = lambda *roles: sorted(study(shadow, r) for r in roles)  # noqa: E731
    cells = {"tp": s("a1_ich", "a2_feedback_accepted"), "fp": s("a3_feedback_false_positive", "a4_final_then_amended_normal"),
             "fn": s("b2_ich_missed"), "tn": s("b1_normal")}
    assert {k: sorted(v) for k, v in figures["cells"]["as decided at triage"].items()} == cells
    assert {k: sorted(v) for k, v in figures["cells"]["model card"].items()} == cells
    for point in (figures["at_triage"], figures["metrics"]["at_thresholds"]["model card"]):
        assert (point["tp"], point["fp"], point["fn"], point["tn"]) == (2, 2, 1, 1)
        assert [point[k]["count"] for k in ("sensitivity", "specificity", "ppv", "npv", "raised")] == [[2, 3], [1, 3], [2, 4], [1, 2], [4, 6]]
    assert figures["at_triage"]["threshold"] == pytest.approx(json.loads((shadow["weights"] / "head_ct_ich.json").read_text())["thresholds"]["any"])
    metrics = figures["metrics"]
    assert (metrics["n"], metrics["positives"], metrics["negatives"]) == (6, 3, 3)
    assert metrics["auc"]["value"] == pytest.approx(7 / 9, abs=1e-4)  # positives ranked 1, 2, 6; negatives 3, 4, 7
    assert metrics["auc"]["interval"] == "stratified percentile bootstrap, 300 resamples"
    assert [p["sensitivity"]["count"] for p in metrics["at_target_sensitivity"]] == [[3, 3]] * 3


def test_the_turnaround_of_raised_and_missed_studies_exactly(shadow):
    waits = shadow["doc"]["tasks"]["head_ct_ich"]["turnaround"]["shadow"]
    # raised: a1 2 h, a5 3 h, a2 4 h, a3 6 h, a4 10 h (the amended report); not raised: b3 6 h (from the study's
    # start), b1 8 h, b2 12 h; b4 has no final report
    assert {k: waits[k] for k in ("studies", "with_final_report", "positives", "counts", "without_start_time")} == {
        "studies": 9, "with_final_report": 8, "positives": 3, "without_start_time": [],
        "counts": {"raised": 5, "not_raised": 4, "positives_raised": 2, "positives_missed": 1}}
    summary = {k: (waits[k]["n"], waits[k]["median_h"], waits[k]["q1_h"], waits[k]["q3_h"])
               for k in ("raised", "not_raised", "positives_raised", "positives_missed")}
    assert summary == {"raised": (5, 4.0, 3.0, 6.0), "not_raised": (3, 8.0, 7.0, 10.0), "positives_raised": (2, 3.0, 2.5, 3.5),
                       "positives_missed": (1, 12.0, 12.0, 12.0)}
    assert waits["positives_missed"]["studies"] == [study(shadow, "b2_ich_missed")]
    rows = {row["study"]: row for row in shadow["doc"]["tasks"]["head_ct_ich"]["study_rows"]}
    assert rows[study(shadow, "b3_uncoded_study_started")]["started_from"] == "study started"
    assert rows[study(shadow, "a1_ich")]["started_from"] == "order authoredOn"


def test_bad_input_is_counted_and_said_and_nothing_crashes(shadow):
    problems, lines = shadow["doc"]["problems"], shadow["doc"]["problem_lines"]
    assert problems["final_without_study"] == [shadow["no_study"]]
    assert problems["final_for_untriaged_study"] == [{"report": shadow["other"], "names": [f"ImagingStudy/{shadow['untriaged']}"]}]
    [several] = problems["several_finals"]
    assert several["study"] == study(shadow, "a4_final_then_amended_normal") and len(several["reports"]) == 2
    assert {(u["study"], tuple(u["codes"])) for u in problems["unknown_codes"]} == {
        (study(shadow, "a5_unknown_code"), (UNKNOWN,)), (study(shadow, "b2_ich_missed"), (UNKNOWN,))}
    assert lines == ["Final reports that name no ImagingStudy and no order of a triaged study (not used): 1",
                     "Final reports for studies or orders we never triaged (not used): 1",
                     "Studies with several final reports (the latest, amended first, is used): 1",
                     "Final reports with codes the code map does not know (listed; add them with --codes): 2"]
    pages = {s["search"].split("?")[0]: s for s in shadow["doc"]["searches"]}
    assert pages["DiagnosticReport"]["pages"] > 1  # `_count=3`: the servers' own next links were followed


def test_the_written_site_threshold_is_validates_format_chosen_on_these_studies(shadow):
    document = json.loads(shadow["site_file"].read_text())
    entry = document["tasks"]["head_ct_ich"]
    assert document["format"] == "cds-triage-site-thresholds/1"
    assert (entry["model"], entry["card_version"], entry["target_sensitivity"]) == ("test-untrained-head_ct_ich", "0.0.0-test", 0.95)
    missed = shadow["reports"]["b2_ich_missed"]  # the lowest-scored positive: the threshold keeps all three positives
    observation_score = next(s["score"] for s in shadow["doc"]["tasks"]["head_ct_ich"]["labels"]["any"]["studies"]
                             if s["study"] == study(shadow, "b2_ich_missed"))
    assert missed["id"] and entry["thresholds"] == {"any": math.floor(observation_score * 1e6) / 1e6}
    chosen = entry["chosen_on"]
    assert (chosen["n"], chosen["positives"], chosen["negatives"], chosen["unit"], chosen["source"]) == (6, 3, 3, "study", "cds-triage trial")
    assert chosen["sensitivity"]["count"] == [3, 3] and chosen["specificity"]["count"] == [1, 3]


def test_the_site_goes_active_with_the_trials_threshold_alone(shadow, tmp_path):
    """CDS_SITE_THRESHOLDS=<what the trial wrote> and CDS_TASK_MODES=head_ct_ich=active: a study scoring like the
    missed bleed is now raised (the order goes to stat), one like the normal study is not; the next trial
    measures the active task and its turnaround."""
    site = shadow["site"]
    threshold = json.loads(shadow["site_file"].read_text())["tasks"]["head_ct_ich"]["thresholds"]["any"]
    port = free_port()
    active = replace(site.settings, port=port, public_url=f"http://127.0.0.1:{port}", data_dir=tmp_path / "data",
                     site_thresholds_file=str(shadow["site_file"]), task_modes={Task.HEAD_CT_ICH: TaskMode.ACTIVE})
    processes = start_service(active, tmp_path / "logs")
    live = Site(active, site.fhir, httpx.Client(base_url=active.public_url, timeout=30), site.orthanc_url)
    try:
        health = live.api.get("/healthz").json()
        assert health["siteThresholds"]["tasks"]["head_ct_ich"]["status"] == "applied"
        since = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=2)
        profile_of = dict(zip(ROLES, shadow["ranked"]))  # the same pixels score the same
        like_missed, like_normal = profile_of["b2_ich_missed"], profile_of["b1_normal"]
        assert shadow["scores"][5] >= threshold > shadow["scores"][6]
        live.order("p1_bleed", series(like_missed, like_missed), authored=since)
        live.order("p2_normal", series(like_normal, like_normal), authored=since)
        jobs = wait_finished(live.api, [ids["study"] for ids in live.ids.values()], timeout=240)
        assert all(job["status"] == "done" for job in jobs.values()), jobs
        raised, _ = live.fhir.read("ServiceRequest", live.ids["p1_bleed"]["order"])
        kept, _ = live.fhir.read("ServiceRequest", live.ids["p2_normal"]["order"])
        assert (raised["priority"], kept["priority"]) == ("stat", "routine")
        observation = live.fhir.search("Observation", {"subject": f"Patient/{live.ids['p1_bleed']['patient']}"})[0]
        assert observation["method"]["coding"][0]["code"] == "site-threshold"
        live.final("p1_bleed", hours=1, codes_=[ICH], base=since)
        live.final("p2_normal", hours=7, codes_=[NORMAL], base=since)
        done, doc = run_trial(active, "--since", at(since), "--json", "--report", tmp_path / "active.html", "--no-progress",
                              "--bootstrap", "100")
        assert done.returncode == 0 and doc is not None, done.stderr[-3000:]
        task = doc["tasks"]["head_ct_ich"]
        assert task["studies"]["active"] == 2 and task["studies"]["shadow"] == 0
        cells = task["labels"]["any"]["cells"]
        expected = {"tp": [live.ids["p1_bleed"]["study"]], "fp": [], "fn": [], "tn": [live.ids["p2_normal"]["study"]]}
        assert cells["site (CDS_SITE_THRESHOLDS)"] == cells["as decided at triage"] == expected
        waits = task["turnaround"]["active"]
        assert (waits["raised"]["n"], waits["raised"]["median_h"], waits["not_raised"]["median_h"]) == (1, 1.0, 7.0)
        assert (waits["positives_raised"]["median_h"], waits["counts"]["positives_missed"]) == (1.0, 0)
    finally:
        live.api.close()
        processes.stop()


def test_the_report_opens_in_chromium(shadow, page):  # noqa: F811
    """The page as a radiologist opens it: everything inline (the `page` fixture fails on any request that
    leaves loopback, and the page makes none), the figures, the plots, the waits, the problems."""
    page.set_content(shadow["report"].read_text())
    assert page.title() == "Silent trial"
    text = page.locator("body").inner_text()
    assert "Silent trial: the AI against the radiologists' final reports" in text
    assert "AI-generated triage, preliminary, not a diagnosis" in text
    assert page.locator("#head_ct_ich-roc-plot svg").count() == 1 and page.locator("#head_ct_ich-calibration-plot svg").count() == 1
    raised_row = page.locator("tr", has_text="triage would have raised").first.inner_text()
    assert "4 h 00 min" in raised_row and "3 h 00 min – 6 h 00 min" in raised_row  # median, IQR
    assert "Final reports that name no ImagingStudy and no order of a triaged study (not used): 1" in text
    assert "2 / 2 / 1 / 1" in page.locator("table", has_text="as decided at triage").first.inner_text()  # TP / FP / FN / TN
    screenshot(page, f"trial-report-{shadow['server']}.png")
