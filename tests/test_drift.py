"""Drift alarms (cds_service/drift.py): the band each card expects, the window read from the job store,
the alarm on /healthz, /metrics, the worklist and in the log; and, on the real servers, a burst of
raised studies that trips it.

The end-to-end test uses untrained test weights with every threshold at 0, so every study is
raised: the burst "every head CT raised in the last N" that must never go unnoticed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import httpx
import pytest

from cds_service.web.app import create_app
from cds_service.web.context import ServiceContext
from cds_service.core.domain import Task
from cds_service.drift import (Band, alarm_hook, assess, band_for, check_alarm, expected_raised_share, operating_rates,
                               study_score, triaged)
from cds_service.jobs.state import JobState, TriageRequest
from cds_service.jobs.sqlite_store import JobStore
from cds_service.jobs.redis_store import RedisJobStore
from cds_service.core.model_cards import ModelCard
from cds_service.core.settings import Settings
from stack_support import SECRET, ct_series, metric_value, notify, order_study, wait_finished
from support import make_test_weights, seed_onnx_exports

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"
SHIPPED = [Task.HEAD_CT_ICH, Task.BRAIN_MRI, Task.CHEST_PNEUMOTHORAX]


def card(task: Task) -> dict:
    return json.loads((WEIGHTS / f"{task.value}.json").read_text())


def result(raised: bool, probability: float = 0.9, task: str = "head_ct_ich", mode: str = "active") -> dict:
    """A done head CT job's result as pipeline.result_summary writes it."""
    return {"task": task, "mode": mode, "suggestedPriority": "stat" if raised else None, "findings": [
        {"label": "any", "probability": probability, "positive": raised, "trained": True},
        {"label": "subdural", "probability": 0.99, "positive": False, "trained": True}]}


# --- the band the card expects --------------------------------------------------------------------


@pytest.mark.parametrize("task", SHIPPED, ids=lambda t: t.value)
def test_each_committed_card_states_the_band_its_own_figures_give(task: Task) -> None:
    c = card(task)
    block = c["expected_raised_share"]
    assert block == expected_raised_share(c)  # current: `recard`/`rethreshold` would write the same
    low, high = block["band"]
    assert 0.0 <= low < high <= 1.0 and "CDS_DRIFT_BANDS" in block["derivation"]
    # the figures it rests on are the card's test figures, and both ends of the band follow from them
    with_finding, without = block["raised_with_finding"], block["raised_without_finding"]
    assert with_finding["ci95"][0] <= with_finding["value"] <= with_finding["ci95"][1]
    assert low == pytest.approx(without["ci95"][0], abs=1e-3)  # prevalence 0, at the interval's low end
    assert high == pytest.approx(0.5 * with_finding["ci95"][1] + 0.5 * without["ci95"][1], abs=1e-3)


def test_the_head_ct_band_is_the_simulated_series_and_leaves_out_every_study_raised() -> None:
    block = card(Task.HEAD_CT_ICH)["expected_raised_share"]
    series = card(Task.HEAD_CT_ICH)["series_operating_point"]["test"]
    assert block["raised_with_finding"]["value"] == series["bleeding_series_raised"]
    assert block["raised_without_finding"]["value"] == series["normal_series_raised"]
    assert "series" in block["from"]
    low, high = block["band"]
    assert 0.1 < low and high < 0.85  # "every head CT raised" (1.0) and "none raised" (0.0) are both far outside


def test_rates_come_from_the_rule_that_decides_a_study() -> None:
    brain = card(Task.BRAIN_MRI)
    with_finding, without, source = operating_rates(brain)
    assert with_finding["value"] == brain["presence"]["test"]["raised_with_finding"]["value"]
    assert without["value"] == brain["presence"]["test"]["raised_without_finding"]["value"]
    assert source == "test split, presence rule"
    chest = card(Task.CHEST_PNEUMOTHORAX)
    spec = chest["test_metrics"]["metrics"]["pneumothorax.specificity_at_threshold"]
    _, without, _ = operating_rates(chest)
    assert without["value"] == pytest.approx(1 - spec["value"], abs=1e-4)
    assert without["ci95"] == pytest.approx([1 - spec["ci95"][1], 1 - spec["ci95"][0]], abs=1e-4)
    # a card without a test split falls back to validation; one without figures has no band
    no_test = {k: v for k, v in chest.items() if k != "test_metrics"}
    assert operating_rates(no_test)[2].startswith("validation split")
    assert expected_raised_share({"trained_labels": ["any"], "thresholds": {"any": 0.0}}) is None


def test_a_wider_prevalence_range_widens_the_band() -> None:
    c = card(Task.CHEST_PNEUMOTHORAX)
    narrow, wide = expected_raised_share(c, (0.0, 0.1))["band"], expected_raised_share(c, (0.0, 0.9))["band"]
    assert narrow[0] == wide[0] and narrow[1] < wide[1]


@pytest.mark.slow  # the shipped models' stored probabilities, rescored
def test_rethreshold_writes_the_band_into_the_card(tmp_path: Path) -> None:
    """What `recard` runs last: from the stored probabilities, the card as committed, band included."""
    from cds_training.training import rethreshold

    task = Task.CHEST_PNEUMOTHORAX
    for suffix in (".json", ".split.json"):
        shutil.copy(WEIGHTS / f"{task.value}{suffix}", tmp_path / f"{task.value}{suffix}")
    rewritten = rethreshold(tmp_path, task, card(task)["target_sensitivity"], bootstrap=1000)
    assert rewritten["expected_raised_share"] == card(task)["expected_raised_share"]


# --- one task's window --------------------------------------------------------------------------


def test_a_study_counts_as_raised_when_the_model_found_something_shadow_included() -> None:
    assert triaged(result(True)).raised and not triaged(result(False)).raised
    assert triaged(result(True, mode="shadow")).raised  # what a shadow task would have raised counts
    assert triaged({"task": "head_ct_ich"}) is None  # no findings: not a triage
    assert study_score(result(True, 0.7)["findings"]) == 0.7  # the main label, not the larger subtype
    brain = [{"label": "glioma", "probability": 0.5, "positive": True, "trained": True},
             {"label": "no_tumor", "probability": 0.2, "positive": False, "trained": True}]
    assert study_score(brain) == 0.8  # presence: 1 - p(no tumour)


def test_every_study_raised_in_the_last_50_trips_the_alarm_and_none_raised_too() -> None:
    band = Band(0.439, 0.779, "card")  # the head CT card's
    burst = assess(Task.HEAD_CT_ICH, [result(True)] * 50, band, window=50, min_studies=20)
    assert burst.share == 1.0 and burst.state == "high" and burst.alarm
    assert burst.describe().startswith("head_ct_ich raised 50 of its last 50 studies (100%")
    assert "above the 44%-78% its model card expects" in burst.describe()
    silent = assess(Task.HEAD_CT_ICH, [result(False, 0.1)] * 50, band, window=50, min_studies=20)
    assert silent.state == "low" and silent.alarm


def test_chance_alone_does_not_ring_it() -> None:
    band = Band(0.439, 0.779, "card")
    # 84% raised is above the band, but 42 of 50 is within what chance gives a model at 78%
    near = assess(Task.HEAD_CT_ICH, [result(True)] * 42 + [result(False)] * 8, band, window=50, min_studies=20)
    assert near.share > band.high and near.state == "ok" and not near.alarm
    typical = assess(Task.HEAD_CT_ICH, [result(True)] * 30 + [result(False)] * 20, band, window=50, min_studies=20)
    assert typical.state == "ok"


def test_the_window_holds_the_latest_studies_and_waits_for_enough() -> None:
    band = Band(0.05, 0.5, "CDS_DRIFT_BANDS")
    latest_first = [result(True)] * 5 + [result(False)] * 100
    drift = assess(Task.HEAD_CT_ICH, latest_first, band, window=5, min_studies=3)
    assert (drift.studies, drift.raised, drift.state) == (5, 5, "high")
    assert "CDS_DRIFT_BANDS expects" in drift.describe()
    young = assess(Task.HEAD_CT_ICH, [result(True)] * 2, band, window=5, min_studies=3)
    assert young.state == "warming_up" and not young.alarm
    unbanded = assess(Task.HEAD_CT_ICH, [result(True)] * 5, None, window=5, min_studies=3)
    assert unbanded.state == "no_band" and not unbanded.alarm and "no expected band" in unbanded.describe()
    empty = assess(Task.HEAD_CT_ICH, [], band, window=5, min_studies=3)
    assert empty.share is None and empty.to_json()["scores"] == {}


def test_the_json_block_and_the_score_quantiles() -> None:
    results = [result(i % 2 == 0, probability=i / 10) for i in range(11)]  # scores 0.0 … 1.0
    block = assess(Task.HEAD_CT_ICH, results, Band(0.1, 0.9, "card"), window=50, min_studies=5).to_json()
    assert block["studies"] == 11 and block["raised"] == 6 and block["share"] == round(6 / 11, 4)
    assert block["band"] == [0.1, 0.9] and block["bandFrom"] == "card" and block["state"] == "ok"
    assert block["scores"] == {"p10": 0.1, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9, "mean": 0.5}
    lo, hi = block["shareCi95"]
    assert lo < block["share"] < hi


def test_the_window_counts_the_studies_whose_images_were_unlike_the_training_images() -> None:
    unfamiliar = [result(True) | {"inputCheck": {"fit": "unfamiliar", "fits": True}}] * 3
    familiar = [result(False) | {"inputCheck": {"fit": "familiar", "fits": True}}] * 6 + [result(False)]  # an older job
    drift = assess(Task.HEAD_CT_ICH, unfamiliar + familiar, Band(0.1, 0.9, "card"), window=50, min_studies=5)
    assert drift.unfamiliar == 3 and drift.raised == 3 and drift.studies == 10
    assert drift.to_json()["unfamiliar"] == 3 and drift.to_json()["unfamiliarShare"] == 0.3
    assert "3 of them unlike its training images (unfamiliar)" in drift.describe()
    assert "unfamiliar" not in assess(Task.HEAD_CT_ICH, familiar, None, window=50, min_studies=5).describe()


def test_a_site_band_wins_over_the_card() -> None:
    raw = card(Task.HEAD_CT_ICH)
    head = ModelCard.from_dict(raw)
    low, high = raw["expected_raised_share"]["band"]  # written by training from the card's test split
    assert 0 < low < high < 1
    assert band_for(Task.HEAD_CT_ICH, Settings(), head) == Band(low, high, "card")
    site = Settings(drift_bands={Task.HEAD_CT_ICH: (0.1, 0.3)})
    assert band_for(Task.HEAD_CT_ICH, site, head) == Band(0.1, 0.3, "CDS_DRIFT_BANDS")
    assert band_for(Task.BRAIN_MRI, site, None) is None


def test_drift_settings_are_parsed_and_checked_at_start_up() -> None:
    settings = Settings.from_env({"CDS_DRIFT_WINDOW": "5", "CDS_DRIFT_MIN_STUDIES": "3",
                                  "CDS_DRIFT_BANDS": "head_ct_ich=0.05-0.6, chest_pneumothorax=0-1"})
    assert settings.drift_window == 5 and settings.drift_min_studies == 3
    assert settings.drift_bands == {Task.HEAD_CT_ICH: (0.05, 0.6), Task.CHEST_PNEUMOTHORAX: (0.0, 1.0)}
    assert Settings.from_env(settings.to_env()).drift_bands == settings.drift_bands  # as a child process gets them
    assert Settings().drift_window == 50 and Settings().drift_min_studies == 20
    for env, says in [({"CDS_DRIFT_BANDS": "head=0.1-0.2"}, "CDS_DRIFT_BANDS"),
                      ({"CDS_DRIFT_BANDS": "head_ct_ich=0.5"}, "CDS_DRIFT_BANDS"),
                      ({"CDS_DRIFT_BANDS": "head_ct_ich=0.6-0.2"}, "low <= high"),
                      ({"CDS_DRIFT_WINDOW": "0"}, "CDS_DRIFT_WINDOW"),
                      ({"CDS_DRIFT_WINDOW": "10", "CDS_DRIFT_MIN_STUDIES": "11"}, "CDS_DRIFT_MIN_STUDIES")]:
        with pytest.raises(ValueError, match=says):
            Settings.from_env(env)


# --- the job store: the window and the alarm's state, shared by every process ---------------------


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return JobStore(tmp_path / "jobs.sqlite3")
    return RedisJobStore(request.getfixturevalue("redis_url"), prefix=f"drift-{tmp_path.name}:")


def finish(store, study: str, outcome: dict | None, state: JobState = JobState.DONE) -> str:
    job, _ = store.submit(TriageRequest(study, "subscription"), "m@1")
    store.claim(job.id, "w")
    assert store.finish(job.id, state, "", outcome or {}, worker="w")
    return job.id


def test_the_store_gives_each_task_its_latest_done_triages(store) -> None:
    ids = [finish(store, f"s{i}", result(i % 2 == 0)) for i in range(6)]
    finish(store, "brain", result(True, task="brain_mri"))
    finish(store, "failed", {}, JobState.FAILED)
    finish(store, "off", {"task": "head_ct_ich", "mode": "off"}, JobState.NOT_APPLICABLE)
    recent = store.recent_triages("head_ct_ich", 4)
    assert [job.id for job in recent] == ids[::-1][:4]  # latest finished first; other tasks and outcomes left out
    assert [job.id for job in store.recent_triages("brain_mri", 10)] == [store.list(imaging_study_id="brain")[0].id]
    assert store.recent_triages("chest_pneumothorax", 10) == []
    store.requeue(ids[-1])  # an operator re-runs a done job: it leaves the window until it is done again
    assert ids[-1] not in [job.id for job in store.recent_triages("head_ct_ich", 10)]


def test_the_alarm_flag_is_swapped_atomically(store) -> None:
    assert store.swap_flag("drift-alarm:head_ct_ich", "high") is None
    assert store.swap_flag("drift-alarm:head_ct_ich", "off") == "high"
    assert store.swap_flag("drift-alarm:head_ct_ich", "off") == "off"
    assert store.swap_flag("drift-alarm:brain_mri", "off") is None


def test_the_log_says_once_when_the_alarm_trips_and_once_when_it_clears(tmp_path, caplog) -> None:
    weights = make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH)
    settings = Settings(data_dir=tmp_path / "data", weights_dir=weights, drift_window=5, drift_min_studies=3,
                        drift_bands={Task.HEAD_CT_ICH: (0.05, 0.5)})
    store = JobStore(settings.job_db_path)
    hook = alarm_hook(store, settings)
    caplog.set_level(logging.WARNING, logger="cds_service.drift")

    def done(i: int, raised: bool) -> None:
        job_id = finish(store, f"s{i}", result(raised))
        hook(store.get(job_id), JobState.DONE, result(raised))

    for i in range(8):  # 5 of 5 raised from the 5th on: trips once
        done(i, True)
    hook(store.get(finish(store, "x", {}, JobState.FAILED)), JobState.FAILED, {})  # not a triage: no look
    trips = [r for r in caplog.records if r.getMessage().startswith("drift alarm:")]
    assert len(trips) == 1 and trips[0].levelno == logging.WARNING
    assert "head_ct_ich raised 4 of its last 4 studies" in trips[0].getMessage() and trips[0].drift_state == "high"
    for i in range(8, 12):  # 4 of 5 raised is already within chance of the band: clears once, and stays so
        done(i, False)
    clears = [r for r in caplog.records if r.getMessage().startswith("drift alarm cleared:")]
    assert len(clears) == 1 and "raised 4 of its last 5" in clears[0].getMessage()
    assert check_alarm(store, settings, Task.HEAD_CT_ICH).state == "ok"
    assert len([r for r in caplog.records if r.name == "cds_service.drift"]) == 2


# --- /healthz, /metrics and the worklist page, in process -----------------------------------------


def test_healthz_metrics_and_worklist_show_the_alarm(tmp_path, monkeypatch) -> None:
    import cds_service.web.worklist as worklist_module

    weights = make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH)
    shutil.copy(WEIGHTS / "brain_mri.json", weights / "brain_mri.json")  # a card with its own band
    shutil.copy(WEIGHTS / "brain_mri.safetensors", weights / "brain_mri.safetensors")
    settings = Settings(data_dir=tmp_path / "data", weights_dir=weights, operator_open_on_loopback=True,
                        drift_window=5, drift_min_studies=3, drift_bands={Task.HEAD_CT_ICH: (0.05, 0.5)})
    store = JobStore(settings.job_db_path)
    for i in range(5):
        finish(store, f"s{i}", result(True, probability=0.5 + i / 10))
    context = ServiceContext(settings=settings, store=store, enqueue=lambda _: None, model_set="m@1")
    client = create_app(settings, context).test_client()
    monkeypatch.setattr(worklist_module, "fetch_worklist", lambda order_id=None: [])  # no FHIR server here

    drift = client.get("/healthz").get_json()["drift"]
    assert drift["head_ct_ich"]["alarm"] is True and drift["head_ct_ich"]["state"] == "high"
    assert drift["head_ct_ich"]["studies"] == 5 and drift["head_ct_ich"]["bandFrom"] == "CDS_DRIFT_BANDS"
    assert drift["head_ct_ich"]["scores"]["p50"] == 0.7
    assert drift["brain_mri"] == {**drift["brain_mri"], "studies": 0, "state": "warming_up", "alarm": False,
                                  "band": card(Task.BRAIN_MRI)["expected_raised_share"]["band"], "bandFrom": "card"}

    text = client.get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"}).get_data(as_text=True)
    assert metric_value(text, "cds_triage_drift_alarm", task="head_ct_ich") == 1
    assert metric_value(text, "cds_triage_drift_alarm", task="brain_mri") == 0
    assert metric_value(text, "cds_triage_drift_raised_share", task="head_ct_ich") == 1.0
    assert metric_value(text, "cds_triage_drift_window_studies", task="head_ct_ich") == 5
    assert metric_value(text, "cds_triage_drift_expected_share", task="head_ct_ich", bound="high") == 0.5
    assert metric_value(text, "cds_triage_drift_score", task="head_ct_ich", quantile="0.5") == 0.7
    assert metric_value(text, "cds_triage_drift_raised_share", task="brain_mri") is None  # nothing to share yet

    page = client.get("/worklist").get_data(as_text=True)
    assert "Drift alarm." in page and "head_ct_ich raised 5 of its last 5 studies (100%" in page
    assert "above the 5%-50% CDS_DRIFT_BANDS expects" in page
    [alarm] = client.get("/worklist/rows.json").get_json()["drift"]
    assert alarm["task"] == "head_ct_ich" and alarm["state"] == "high"


def test_healthz_still_answers_when_the_store_does_not(tmp_path, monkeypatch) -> None:
    from cds_service.core.errors import QueueUnavailableError

    settings = Settings(data_dir=tmp_path / "data", weights_dir=make_test_weights(tmp_path / "w", Task.HEAD_CT_ICH))
    store = JobStore(settings.job_db_path)

    def down(*args, **kwargs):
        raise QueueUnavailableError("down")

    monkeypatch.setattr(store, "recent_triages", down)
    client = create_app(settings, ServiceContext(settings=settings, store=store, enqueue=lambda _: None,
                                                 model_set="m@1")).test_client()
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_json()["drift"] == {"error": "job store unavailable"}


# --- end to end: Orthanc, the FHIR server, `serve` and a `worker` ---------------------------------


@pytest.mark.integration
def test_a_burst_of_raised_studies_trips_the_alarm_on_the_real_servers(orthanc, fhir_server, tmp_path) -> None:
    from cds_devtools.demo import start_service
    from cds_devtools.devservers import free_port
    from cds_service.adapters.fhir_client import FhirClient

    port = free_port()
    settings = Settings(
        operator_open_on_loopback=True,  # the test reads /jobs and /metrics directly
        fhir_base_url=fhir_server.url, dicomweb_url=orthanc.dicomweb_url, public_url=f"http://127.0.0.1:{port}",
        host="127.0.0.1", port=port, data_dir=tmp_path / "data", subscription_secret=SECRET, http_timeout_s=10,
        weights_dir=make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH),  # thresholds 0: every study raised
        drift_window=5, drift_min_studies=3, drift_bands={Task.HEAD_CT_ICH: (0.05, 0.5)},
    )
    service = start_service(seed_onnx_exports(settings), tmp_path / "logs")
    fhir = FhirClient(fhir_server.url)
    try:
        with httpx.Client(base_url=settings.public_url, timeout=30) as api:
            def order(count: int, first: int) -> None:
                studies = [order_study(fhir, ct_series(2, seed=first + i), orthanc_url=orthanc.url)["study"]
                           for i in range(count)]
                for study in studies:
                    notify(api, study)
                finished = wait_finished(api, studies, timeout=120)
                assert {job["status"] for job in finished.values()} == {"done"}, finished

            order(2, 0)  # fewer than CDS_DRIFT_MIN_STUDIES: too few to judge
            drift = api.get("/healthz").json()["drift"]["head_ct_ich"]
            assert (drift["studies"], drift["state"], drift["alarm"]) == (2, "warming_up", False)
            assert "Drift alarm." not in api.get("/worklist").text

            order(3, 2)  # the burst: 5 of the last 5 raised, against a band of 5-50%
            drift = api.get("/healthz").json()["drift"]["head_ct_ich"]
            assert drift["alarm"] is True and drift["state"] == "high"
            assert (drift["studies"], drift["raised"], drift["share"]) == (5, 5, 1.0)
            text = api.get("/metrics").text
            assert metric_value(text, "cds_triage_drift_alarm", task="head_ct_ich") == 1
            assert metric_value(text, "cds_triage_drift_raised_share", task="head_ct_ich") == 1.0
            assert metric_value(text, "cds_triage_drift_window_studies", task="head_ct_ich") == 5
            page = api.get("/worklist").text
            assert "Drift alarm." in page and "head_ct_ich raised 5 of its last 5 studies (100%" in page
            assert api.get("/worklist/rows.json").json()["drift"][0]["task"] == "head_ct_ich"
        log_lines = [json.loads(line) for line in service.worker.log_path.read_text().splitlines()
                     if line.startswith("{")]
        trips = [line for line in log_lines if line["message"].startswith("drift alarm:")]
        assert len(trips) == 1 and trips[0]["level"] == "WARNING" and trips[0]["task"] == "head_ct_ich", trips
    finally:
        fhir.close()
        service.stop()
