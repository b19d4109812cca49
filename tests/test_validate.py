"""`cds-triage validate`: a site's own labelled studies, scored as the service scores them, and the
site threshold file it writes, which the service then decides with (CDS_SITE_THRESHOLDS).

The end-to-end checks use the committed head CT model on 40 real labelled RSNA slices from
`../shared/data` (19 with a bleed); they skip, with the reason, where that data is not present.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cds_service.web.app import create_app
from cds_service.web.context import ServiceContext
from cds_service.cli import build_parser, main
from cds_devtools.dicom_data import make_dataset
from cds_service.core.domain import OrderContext, Task
from cds_service.core.evaluation import binary_validation, calibration_summary, sensitivity_operating_points, small_number_warnings
from cds_service.core.inference import findings_from_scores
from cds_service.jobs.sqlite_store import JobStore
from cds_service.local_triage import collect_inputs, triage_input
from cds_service.core.model_cards import ModelCard
from cds_service.core.models import ModelRegistry
from cds_service.core.settings import Settings
from cds_service.core.site_thresholds import FORMAT
from cds_service.validate.command import run_validate
from cds_service.validate.labels import LabelsError, match_units, read_labels
from cds_service.web.worklist import model_card_summary
from fhir_mappings import codes
from fhir_mappings.builders import build_observation
from support import make_test_weights

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"
RSNA = Path(os.environ.get("CDS_TRAINING_DATA") or REPO.parent / "shared" / "data") / "head_ct_rsna_png"
SUBTYPES = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
HEADER = "file,any," + ",".join(SUBTYPES)


def validate(*args: object, settings: Settings | None = None) -> int:
    """`cds-triage validate …` in this process (what `cli.main` runs, without re-configuring logging)."""
    parsed = build_parser().parse_args(["validate", *map(str, args)])
    return run_validate(parsed, settings or Settings())


def cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cds_service.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CDS_WEIGHTS_DIR": str(WEIGHTS), **(env or {})})


def png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32), value, np.uint8)).save(path)
    return path


# --- the figures, on constructed examples -----------------------------------------------------------------


def test_thresholds_for_sensitivity_090_095_098_on_a_constructed_example():
    positives = np.arange(1, 21) / 20  # 0.05, 0.10, … 1.00
    negatives = 0.01 + 0.02 * np.arange(20)  # 0.01, 0.03, … 0.39: none on a threshold
    y = np.r_[np.ones(20, bool), np.zeros(20, bool)]
    points = sensitivity_operating_points(y, np.r_[positives, negatives])
    # the highest threshold keeping 18, 19 and 20 of the 20 positives
    assert [p["threshold"] for p in points] == pytest.approx([0.15, 0.10, 0.05], abs=1e-5)
    assert [p["sensitivity"]["count"] for p in points] == [[18, 20], [19, 20], [20, 20]]
    assert [p["specificity"]["count"] for p in points] == [[7, 20], [5, 20], [2, 20]]
    assert points[0]["ppv"]["count"] == [18, 18 + 13] and points[0]["npv"]["count"] == [7, 9]
    lo, hi = points[0]["sensitivity"]["ci95"]
    assert lo < 0.9 < hi and points[0]["sensitivity"]["interval"] == "wilson"


def test_calibration_and_the_honesty_about_small_numbers():
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0], bool)
    p = np.array([0.9, 0.8, 0.85, 0.1, 0.95, 0.05, 0.15, 0.2])
    cal = calibration_summary(y, p, bins=2)
    assert cal["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-4)
    low, high = cal["bins"]
    assert (low["n"], low["observed"]["count"]) == (4, [0, 4]) and (high["n"], high["observed"]["count"]) == (4, [3, 4])
    assert cal["ece"] == pytest.approx((4 * abs(0 - p[~(p >= 0.5)].mean()) + 4 * abs(0.75 - p[p >= 0.5].mean())) / 8, abs=1e-4)
    doc = binary_validation(y, p, {"model card": 0.5}, resamples=200)
    assert doc["auc"]["value"] == pytest.approx(14 / 15, abs=1e-4)
    assert any("only 3 positives" in w for w in doc["warnings"]) and any("only 5 negatives" in w for w in doc["warnings"])
    assert small_number_warnings(30, 30) == [] and "no positives" in small_number_warnings(0, 40)[0]
    perfect = binary_validation(y, y.astype(float), {"model card": 0.5}, resamples=200)
    assert perfect["auc"]["ci95"] == [1.0, 1.0] and any("cannot show" in w for w in perfect["warnings"])


# --- labels CSV: clear errors, exit status 2 ----------------------------------------------------------------


@pytest.mark.parametrize("csv_text, expected", [
    ("file,finding\nimgs/a.png,1\n", "needs a 'label' column"),
    ("path,label\nimgs/a.png,1\n", "needs a 'file' or a 'study' column"),
    ("file,label\nimgs/a.png,1\nimgs/b.png,maybe\n", "line 3, column label: 'maybe' is not 0 or 1"),
    ("file,label\nimgs/a.png,1\nimgs/nope.png,0\n", "line 3: file 'imgs/nope.png' not found"),
    ("file,label\nimgs/a.png,1\nimgs/a.png,0\n", "line 3: file 'imgs/a.png' is labelled again (first on line 2)"),
    (HEADER + "\nimgs/a.png,0,1,0,0,0,0\n", "line 2: subtype epidural is 1 but any is 0"),
    ("file,label\n", "no rows"),
])
def test_a_bad_labels_file_is_refused_naming_the_row_with_exit_status_2(tmp_path, capsys, csv_text, expected):
    png(tmp_path / "imgs" / "a.png")
    png(tmp_path / "imgs" / "b.png")
    (tmp_path / "labels.csv").write_text(csv_text)
    status = validate("--task", "head_ct_ich", "--labels", tmp_path / "labels.csv", tmp_path / "imgs",
                      "--report", tmp_path / "r.html")
    err = capsys.readouterr().err
    assert status == 2 and expected in err, err
    assert not (tmp_path / "r.html").exists()


def test_a_brain_label_must_be_0_1_or_a_class_and_a_missing_labels_file_is_exit_2(tmp_path, capsys):
    png(tmp_path / "imgs" / "a.png")
    (tmp_path / "labels.csv").write_text("file,label\nimgs/a.png,astrocytoma\n")
    assert validate("--task", "brain_mri", "--labels", tmp_path / "labels.csv", tmp_path / "imgs") == 2
    assert "line 2: label 'astrocytoma' is not 0, 1 or one of glioma" in capsys.readouterr().err
    assert validate("--task", "brain_mri", "--labels", tmp_path / "none.csv", tmp_path / "imgs") == 2
    assert "no such labels file" in capsys.readouterr().err


def test_a_bare_file_name_is_looked_up_among_the_inputs_and_beside_the_labels(tmp_path):
    """NIH's metadata.csv names bare files that lie in class folders below it."""
    png(tmp_path / "data" / "pos" / "a.png")
    png(tmp_path / "data" / "neg" / "b.png")  # labelled, not passed: skipped
    (tmp_path / "data" / "labels.csv").write_text("file,label\na.png,1\nb.png,0\n")
    rows = read_labels(tmp_path / "data" / "labels.csv", Task.CHEST_PNEUMOTHORAX)
    units, unlabelled, unmatched = match_units(rows, collect_inputs([tmp_path / "data" / "pos"]), tmp_path / "data")
    assert [u.name for u in units] == [str(tmp_path / "data" / "pos" / "a.png")] and unlabelled == []
    assert [r.value for r in unmatched] == ["b.png"]
    (tmp_path / "data" / "labels.csv").write_text("file,label\na.png,1\nc.png,0\n")
    rows = read_labels(tmp_path / "data" / "labels.csv", Task.CHEST_PNEUMOTHORAX)
    with pytest.raises(LabelsError, match="line 3: file 'c.png' not found"):
        match_units(rows, collect_inputs([tmp_path / "data" / "pos"]), tmp_path / "data")


# --- series: a DICOM series or a folder of images is one study, pooled as the service pools -------------------


@pytest.mark.slow
def test_a_dicom_series_and_a_folder_of_images_are_one_study_each_pooled_like_the_service(tmp_path, capsys):
    weights = make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64)
    settings = Settings(weights_dir=weights, inference_runtime="torch", data_dir=tmp_path / "var")
    study = tmp_path / "studies"
    rng = np.random.default_rng(3)
    for name, level in (("ct-1", 1040), ("ct-2", 1100)):  # two DICOM series, 4 slices each
        series_uid = pydicom.uid.generate_uid()
        for i in range(4):
            ds = make_dataset((rng.normal(level, 40, (48, 48))).clip(0, 4095).astype(np.uint16), modality="CT",
                              body_part="HEAD", series_uid=series_uid, instance_number=i + 1)
            (study / name).mkdir(parents=True, exist_ok=True)
            ds.save_as(study / name / f"{i}.dcm", enforce_file_format=True)
    for i in range(3):  # a folder of three PNG slices
        png(study / "png-1" / f"slice{i}.png", 60 + 40 * i)
    png(study / "loose.png", 90)  # no label: reported and skipped
    (tmp_path / "labels.csv").write_text("study,label\nct-1,1\nct-2,0\npng-1,1\n")
    status = validate("--task", "head_ct_ich", "--labels", tmp_path / "labels.csv", study, "--json", "--no-progress",
                      "--report", tmp_path / "r.html", "--bootstrap", 100, settings=settings)
    doc = json.loads(capsys.readouterr().out)
    assert status == 0
    units = {u["name"]: u for u in doc["units"]}
    assert set(units) == {"ct-1", "ct-2", "png-1"} and doc["unit"] == "series"
    assert [units[n]["slices"] for n in ("ct-1", "ct-2", "png-1")] == [4, 4, 3]
    assert doc["unlabelled"] == [str(study / "loose.png")]
    # each unit's score is what `cds-triage triage` says of that series; the PNG folder pooled as the card says
    registry = ModelRegistry(weights, runtime="torch")
    inputs = {item.name: item for item in collect_inputs([study])}
    for name in ("ct-1", "ct-2"):
        [item] = [i for i in inputs.values() if i.image_path is None and Path(i.datasets[0].filename).parent.name == name]
        result = triage_input(item, registry, settings, Task.HEAD_CT_ICH, with_heatmap=False)
        assert units[name]["score"] == pytest.approx(result.findings[0].probability, abs=1e-6)
    slices = [triage_input(inputs[str(study / "png-1" / f"slice{i}.png")], registry, settings, Task.HEAD_CT_ICH,
                           with_heatmap=False).findings[0].probability for i in range(3)]
    pooling = registry.get(Task.HEAD_CT_ICH).card.series_pooling
    assert units["png-1"]["score"] == pytest.approx(float(pooling.pool(np.array(slices)[:, None])[0]), abs=1e-6)


# --- the real model on real labelled slices ---------------------------------------------------------------


@pytest.fixture(scope="module")
def rsna_set(tmp_path_factory) -> Path:
    """40 labelled RSNA head CT slices (links, not copies) and their labels in RSNA's own columns."""
    if not (RSNA / "labels.csv").exists():
        pytest.skip(f"{RSNA} is not here (the shared data set)")
    root = tmp_path_factory.mktemp("rsna")
    rows = (RSNA / "labels.csv").read_text().splitlines()[1:41]
    (root / "slices").mkdir()
    for row in rows:
        name = row.split(",")[0]
        (root / "slices" / Path(name).name).symlink_to(RSNA / name)
    (root / "labels.csv").write_text("\n".join([HEADER] + [row.replace("labelled/", "slices/", 1) for row in rows]) + "\n")
    return root


@pytest.fixture(scope="module")
def validated(rsna_set) -> dict:
    """`cds-triage validate` (JSON, report, site threshold file) and `cds-triage triage --json` on the same slices."""
    report, site = rsna_set / "report.html", rsna_set / "site-thresholds.json"
    run = cli("validate", "--task", "head_ct_ich", "--labels", rsna_set / "labels.csv", rsna_set / "slices", "--json",
              "--report", report, "--write-thresholds", site, "--target-sensitivity", "0.95")
    assert run.returncode == 0, run.stderr
    triaged = cli("triage", "--task", "head_ct_ich", "--json", rsna_set / "slices")
    assert triaged.returncode == 0, triaged.stderr
    return {"doc": json.loads(run.stdout), "triage": [json.loads(line) for line in triaged.stdout.splitlines()],
            "report": report, "site": site, "stderr": run.stderr}


def mann_whitney_auc(positives: list[float], negatives: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@pytest.mark.slow  # `cds-triage validate` on 40 real slices
def test_validate_reproduces_the_auc_computed_from_triage_json(validated, rsna_set):
    truth = {Path(line.split(",")[0]).name: line.split(",")[1] == "1"
             for line in (rsna_set / "labels.csv").read_text().splitlines()[1:]}
    scores = {Path(out["input"]).name: next(f["probability"] for f in out["findings"] if f["label"] == "any")
              for out in validated["triage"]}
    assert set(scores) == set(truth)
    expected = mann_whitney_auc([s for n, s in scores.items() if truth[n]], [s for n, s in scores.items() if not truth[n]])
    doc = validated["doc"]
    assert doc["metrics"]["auc"]["value"] == pytest.approx(expected, abs=5e-5)
    assert (doc["metrics"]["positives"], doc["metrics"]["negatives"]) == (19, 21)
    assert {Path(u["name"]).name: u["score"] for u in doc["units"]} == scores  # the very numbers triage prints
    card = ModelCard.load(WEIGHTS / "head_ct_ich.json")
    at_card = doc["metrics"]["at_thresholds"]["model card"]
    assert at_card["threshold"] == card.thresholds["any"]
    raised = {n for n, s in scores.items() if s >= card.thresholds["any"]}
    assert at_card["tp"] == sum(truth[n] for n in raised) and at_card["fp"] == sum(not truth[n] for n in raised)
    lo, hi = doc["metrics"]["auc"]["ci95"]
    assert lo < expected < hi
    assert [p["target_sensitivity"] for p in doc["metrics"]["at_target_sensitivity"]] == [0.9, 0.95, 0.98]
    assert set(doc["subtypes"]) == set(SUBTYPES)  # the RSNA subtype columns are measured too


@pytest.mark.slow
def test_the_report_has_the_plots_and_says_the_set_is_small(validated):
    doc, page = validated["doc"], validated["report"].read_text()
    assert any("only 19 positives" in w for w in doc["metrics"]["warnings"])
    assert "only 19 positives" in page and "only 21 negatives" in page
    for plot in ("roc-plot", "pr-plot", "calibration-plot"):
        assert f"<figure id='{plot}'><svg" in page, plot
    assert "Brier" in page and "sensitivity ≥ 0.95 here" in page and "model card" in page
    assert "<script" not in page  # self-contained, static


@pytest.mark.slow
def test_the_site_threshold_file_is_loaded_shown_on_healthz_and_decides(validated, tmp_path):
    site_file = validated["site"]
    written = json.loads(site_file.read_text())
    entry = written["tasks"]["head_ct_ich"]
    shipped = ModelCard.load(WEIGHTS / "head_ct_ich.json")
    assert written["format"] == FORMAT and entry["card_version"] == shipped.version and entry["target_sensitivity"] == 0.95
    site_t = entry["thresholds"]["any"]
    card_t = ModelCard.load(WEIGHTS / "head_ct_ich.json").thresholds["any"]
    assert 0 < site_t < card_t
    card_profile = ModelRegistry(WEIGHTS).input_profile(Task.HEAD_CT_ICH)
    assert card_profile is not None  # the input check's distances of the 40 slices recalibrate familiarity
    assert entry["familiarity"]["n"] == 40 and entry["familiarity"]["threshold"] >= round(card_profile.threshold, 3)
    settings = Settings(site_thresholds_file=str(site_file), data_dir=tmp_path, weights_dir=WEIGHTS)

    # /healthz names it
    context = ServiceContext(settings=settings, store=JobStore(settings.job_db_path), enqueue=lambda job_id: None, model_set="m@1")
    health = create_app(settings, context).test_client().get("/healthz").json
    shown = health["siteThresholds"]
    assert shown["file"] == str(site_file)
    assert shown["tasks"]["head_ct_ich"]["thresholds"] == {"any": site_t} and shown["tasks"]["head_ct_ich"]["status"] == "applied"

    # a slice scored between the two thresholds: below the card's, raised by the site's
    between = next(u for u in validated["doc"]["units"] if site_t * 2 < u["score"] < card_t - 0.05)
    by_card = next(o for o in validated["triage"] if o["input"] == between["name"])
    assert next(f for f in by_card["findings"] if f["label"] == "any")["positive"] is False
    registry = ModelRegistry(WEIGHTS, runtime="torch", site_thresholds=settings.site_thresholds)
    [item] = collect_inputs([Path(between["name"])])
    result = triage_input(item, registry, settings, Task.HEAD_CT_ICH, with_heatmap=False)
    finding = result.findings[0]
    assert finding.label == "any" and finding.positive and finding.threshold == site_t
    assert site_file.name in finding.threshold_source and result.suggested_priority is not None

    # the Observation says which threshold decided
    observation = build_observation(OrderContext("is-1", "pat-1"), result, finding, device_reference="urn:uuid:d",
                                    issued=datetime(2025, 1, 1, tzinfo=timezone.utc)).model_dump(mode="json")
    method = observation["method"]
    assert method["coding"][0]["code"] == codes.METHOD_SITE_THRESHOLD
    assert site_file.name in method["text"] and f"{site_t:.4g}" in method["text"]
    assert observation["component"][0]["code"]["text"] == "Operating threshold (site)"
    # and the model card the worklist shows
    summary = model_card_summary(settings.site_thresholds.apply(registry.get(Task.HEAD_CT_ICH).card))
    assert summary["thresholds"]["any"] == site_t and site_file.name in summary["threshold_sources"]["any"]


# --- the site threshold file at start-up ------------------------------------------------------------------


def site_document(**entry: object) -> dict:
    version = ModelCard.load(WEIGHTS / "head_ct_ich.json").version  # the shipped card's
    return {"format": FORMAT, "tasks": {"head_ct_ich": {"model": "cds-triage-head-ct-ich", "card_version": version,
                                                        "thresholds": {"any": 0.4}, **entry}}}


@pytest.mark.parametrize("document, expected", [
    ("not json", "not JSON"),
    ({"tasks": {}}, "not a site threshold file"),
    ({"format": FORMAT, "tasks": {"knee_xr": {}}}, "unknown task 'knee_xr'"),
    (site_document(thresholds={"haemorrhage": 0.4}), "unknown label 'haemorrhage'"),
    (site_document(thresholds={"any": 1.0}), "tasks.head_ct_ich.thresholds.any must be a number between 0 and 1"),
    (site_document(thresholds={"any": 0}), "must be a number between 0 and 1"),
    (site_document(card_version=""), "tasks.head_ct_ich.card_version must name the model card"),
    (site_document(familiarity={"threshold": -1}), "tasks.head_ct_ich.familiarity.threshold must be a positive number"),
    (site_document(familiarity={"threshold": 30, "refuse_beyond": 20}), "familiarity.refuse_beyond must be above its threshold"),
    (site_document(familiarity=[]), "tasks.head_ct_ich.familiarity must be an object with a threshold"),
    ({"format": FORMAT, "tasks": {"brain_mri": {"model": "m", "card_version": "1", "thresholds": {"glioma": 0.5}}}},
     "unknown label 'glioma' (known: presence)"),
])
def test_a_bad_site_threshold_file_stops_start_up_naming_the_setting(tmp_path, monkeypatch, capsys, document, expected):
    path = tmp_path / "site.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    with pytest.raises(ValueError) as error:
        Settings(site_thresholds_file=str(path))
    assert str(error.value).startswith(f"CDS_SITE_THRESHOLDS={path}: ") and expected in str(error.value)
    with pytest.raises(ValueError, match="no such file"):
        Settings(site_thresholds_file=str(tmp_path / "missing.json"))
    monkeypatch.setenv("CDS_SITE_THRESHOLDS", str(path))
    assert main(["validate", "--task", "head_ct_ich", "--labels", str(path), str(tmp_path)]) == 2
    assert "bad setting: CDS_SITE_THRESHOLDS" in capsys.readouterr().err


def test_the_site_familiarity_makes_its_own_validated_images_familiar_and_refuses_no_less(tmp_path):
    """A site whose validated studies all sit a little beyond the card's familiar distance (another scanner):
    with the file its studies are familiar; the refusal distance never comes nearer than the card's."""
    from cds_service.core.domain import InputFit
    from cds_service.core.input_profile import study_verdict
    from cds_service.core.site_thresholds import familiarity_entry

    card_profile = ModelRegistry(WEIGHTS).input_profile(Task.BRAIN_MRI)
    assert card_profile is not None and card_profile.refuse_beyond is not None
    site_distances = np.linspace(1.05, 1.3, 50) * card_profile.threshold
    block = familiarity_entry(site_distances, card_profile)
    assert block["n"] == 50 and card_profile.threshold < block["threshold"] <= 1.3 * card_profile.threshold
    assert block["refuse_beyond"] >= card_profile.refuse_beyond
    version = ModelCard.load(WEIGHTS / "brain_mri.json").version
    site_file = tmp_path / "site.json"
    site_file.write_text(json.dumps({"format": FORMAT, "tasks": {"brain_mri": {
        "model": "cds-triage-brain-mri", "card_version": version, "thresholds": {"presence": 0.5}, "familiarity": block}}}))
    settings = Settings(site_thresholds_file=str(site_file), data_dir=tmp_path, weights_dir=WEIGHTS)
    site_profile = ModelRegistry(WEIGHTS, site_thresholds=settings.site_thresholds).input_profile(Task.BRAIN_MRI)
    assert site_profile is not None and site_profile.threshold == block["threshold"]
    assert site_profile.refuse_beyond == max(card_profile.refuse_beyond, block["refuse_beyond"])
    # an image at the site's 1.2 x the card's familiar distance, along the profile's first axis
    direction = np.zeros_like(card_profile.mean)
    direction[0] = 1.0
    unit = float(card_profile.distances(card_profile.mean + direction)[0])
    image = card_profile.mean + direction * 1.2 * card_profile.threshold / unit
    assert study_verdict(card_profile, [image], "brain_mri").fit is InputFit.UNFAMILIAR
    assert study_verdict(site_profile, [image], "brain_mri").fit is InputFit.FAMILIAR
    assert settings.site_thresholds.to_health()["tasks"]["brain_mri"]["familiarity"] == block


def test_thresholds_made_for_another_card_version_are_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "site.json"
    path.write_text(json.dumps(site_document(card_version="1.0.0")))
    settings = Settings(site_thresholds_file=str(path))
    assert "made for cds-triage-head-ct-ich 1.0.0" in caplog.text
    site = settings.site_thresholds
    assert site.applied(Task.HEAD_CT_ICH) is None
    assert site.to_health()["tasks"]["head_ct_ich"]["status"].startswith("ignored: made for cds-triage-head-ct-ich 1.0.0")
    card = ModelCard.load(WEIGHTS / "head_ct_ich.json")
    assert site.apply(card).thresholds == card.thresholds and not site.apply(card).threshold_sources


def test_a_brain_presence_threshold_decides_tumour_present(tmp_path):
    card = ModelCard.load(WEIGHTS / "brain_mri.json")
    path = tmp_path / "site.json"
    path.write_text(json.dumps({"format": FORMAT, "tasks": {"brain_mri": {
        "model": card.name, "card_version": card.version, "thresholds": {"presence": 0.8}}}}))
    site_card = Settings(site_thresholds_file=str(path)).site_thresholds.apply(card)
    assert site_card.presence_threshold == 0.8 and site_card.thresholds["glioma"] == 0.8
    assert site_card.thresholds["no_tumor"] == card.thresholds["no_tumor"]
    assert card.presence_threshold is not None and card.presence_threshold < 0.6 < 0.8
    scores = np.array([0.40, 0.15, 0.05, 0.40])  # glioma, meningioma, pituitary, no_tumor: tumour present 0.60
    positive = [f for f in findings_from_scores(card, scores) if f.positive]
    assert [f.label for f in positive] == ["glioma"] and path.name not in positive[0].threshold_source  # the card's
    assert not any(f.positive for f in findings_from_scores(site_card, scores))  # the site's 0.8 leaves it
