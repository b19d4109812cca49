"""`cds-triage triage`: the service's preprocessing, model and Grad-CAM on local files, no servers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cds_devtools.dicom_data import make_dataset
from cds_service.core.domain import Task
from support import make_test_weights, ship_onnx_graphs

pytestmark = pytest.mark.slow  # `cds-triage triage` in child processes

SCHEMA_KEYS = {"input", "task", "status", "findings", "priority", "model"}


def run_cli(args, weights_dir, tmp_path):
    env = {**os.environ, "CDS_WEIGHTS_DIR": str(weights_dir), "CDS_DATA_DIR": str(tmp_path / "var")}
    return subprocess.run([sys.executable, "-m", "cds_service.cli", "triage", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Untrained test models, their ONNX graphs shipped beside them as `cds-triage export` ships the committed
    ones: each `triage` child scores them at once, as it does the committed models."""
    root = tmp_path_factory.mktemp("weights")
    make_test_weights(root, Task.HEAD_CT_ICH)
    make_test_weights(root, Task.BRAIN_MRI, threshold=1.0)  # nothing positive
    return ship_onnx_graphs(root)


def test_folder_of_dicom_gives_one_object_per_series_and_heatmaps(weights, tmp_path):
    study = pydicom.uid.generate_uid()
    folder = tmp_path / "study"
    folder.mkdir()
    for series_index, (modality, body_part) in enumerate([("CT", "HEAD"), ("MR", "BRAIN"), ("CT", "ABDOMEN")]):
        series = pydicom.uid.generate_uid()
        for i in range(2):
            ds = make_dataset(np.full((32, 32), 1064, np.uint16), modality=modality, body_part=body_part,
                              study_uid=study, series_uid=series, instance_number=i + 1)
            ds.save_as(folder / f"{series_index}_{i}.dcm", enforce_file_format=True)
    (folder / "README.txt").write_text("not dicom")
    heatmaps = tmp_path / "heat"
    result = run_cli([folder, "--json", "--heatmaps", heatmaps], weights, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3 and all(SCHEMA_KEYS <= set(line) for line in lines)
    by_task = {line["task"]: line for line in lines}
    ct = by_task["head_ct_ich"]
    assert ct["status"] == "done" and ct["priority"] == "stat" and ct["model"]["version"] == "0.0.0-test"
    assert [f["label"] for f in ct["findings"]] == ["any"] and ct["findings"][0]["positive"] is True
    mr = by_task["brain_mri"]
    assert mr["priority"] is None and {f["label"] for f in mr["findings"]} == {"glioma", "meningioma", "pituitary", "no_tumor"}
    assert not any(f["positive"] for f in mr["findings"])
    assert by_task[None]["status"] == "not_applicable"
    [png] = heatmaps.glob("*.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_png_needs_task_and_chest_without_weights_is_model_unavailable(weights, tmp_path):
    image = tmp_path / "slice.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)).save(image)
    with_task = run_cli([image, "--task", "head_ct_ich", "--json"], weights, tmp_path)
    assert with_task.returncode == 0, with_task.stderr
    assert json.loads(with_task.stdout)["task"] == "head_ct_ich"
    without_task = run_cli([image, "--json"], weights, tmp_path)
    assert without_task.returncode == 1 and "needs --task" in json.loads(without_task.stdout)["reason"]
    chest = run_cli([image, "--task", "chest_pneumothorax", "--json"], weights, tmp_path)
    out = json.loads(chest.stdout)
    assert chest.returncode == 1 and out["status"] == "model_unavailable" and out["findings"] == []


def test_broken_file_is_a_clear_error(weights, tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" * 10)
    result = run_cli([broken, "--json"], weights, tmp_path)
    assert result.returncode == 1 and "not a readable DICOM" in (result.stdout + result.stderr)


def ct_slice(path, *, modality="CT", body_part="HEAD", series=None, study=None, number=1):
    ds = make_dataset(np.full((32, 32), 1064, np.uint16), modality=modality, body_part=body_part,
                      study_uid=study or pydicom.uid.generate_uid(), series_uid=series or pydicom.uid.generate_uid(),
                      instance_number=number)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_bad_file_is_one_failed_row_naming_it_and_the_batch_goes_on(weights, tmp_path):
    good = ct_slice(tmp_path / "good.dcm")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" * 10)
    folder = tmp_path / "series"
    folder.mkdir()
    series = pydicom.uid.generate_uid()
    for i in range(2):
        ct_slice(folder / f"slice{i}.dcm", series=series, number=i + 1)
    (folder / "truncated.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")  # meant to be DICOM, unreadable
    (folder / "notes.txt").write_text("not dicom, not reported")
    missing = tmp_path / "missing.dcm"
    result = run_cli([broken, good, missing, folder, "--json"], weights, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    rows = {row["input"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert all(SCHEMA_KEYS <= set(row) for row in rows.values())
    assert rows[str(broken)]["status"] == "failed" and "not a readable DICOM" in rows[str(broken)]["reason"]
    assert rows[str(missing)]["status"] == "failed" and rows[str(missing)]["reason"] == "no such file or folder"
    assert rows[str(folder / "truncated.dcm")]["status"] == "failed"
    assert rows[str(good)]["status"] == "done"  # after the broken one: the batch went on
    assert rows[f"{folder}#{series}"]["status"] == "done"
    assert not any("notes.txt" in name for name in rows)
    text = run_cli([broken, good], weights, tmp_path)  # the same without --json: a line per input
    assert text.returncode == 1
    first, second = text.stdout.splitlines()
    assert first.startswith(f"{broken}: failed: not a readable DICOM") and second.startswith(f"{good}: done")


def test_an_empty_folder_says_so_and_exits_non_zero(weights, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli([empty], weights, tmp_path)
    assert result.returncode == 1 and result.stdout.strip() == f"{empty}: failed: nothing to triage: empty folder"
    (empty / "README.txt").write_text("no images")
    as_json = run_cli([empty, "--json"], weights, tmp_path)
    row = json.loads(as_json.stdout)
    assert as_json.returncode == 1 and row["status"] == "failed" and row["input"] == str(empty)
    assert row["reason"] == "nothing to triage: no DICOM, PNG or JPEG file among its 1 files"


def test_a_task_forced_on_another_modality_warns_and_marks_the_row(weights, tmp_path):
    ct = ct_slice(tmp_path / "head_ct.dcm")
    result = run_cli([ct, "--task", "brain_mri", "--json"], weights, tmp_path)
    row = json.loads(result.stdout)
    assert row["task"] == "brain_mri" and "reads MR images; this input is CT" in row["warning"]
    assert f"warning: {ct}: --task brain_mri reads MR images; this input is CT" in result.stderr
    chest = run_cli([ct, "--task", "chest_pneumothorax"], weights, tmp_path)  # no chest weights here: still warned
    assert "--task chest_pneumothorax reads CR or DX images; this input is CT" in chest.stderr
    assert "[warning: --task chest_pneumothorax" in chest.stdout
    fits = run_cli([ct, "--task", "head_ct_ich", "--json"], weights, tmp_path)
    assert "warning" not in json.loads(fits.stdout) and "warning" not in fits.stderr


def test_heatmaps_are_named_after_their_input(weights, tmp_path):
    first = ct_slice(tmp_path / "ct_001.dcm")
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    second = ct_slice(elsewhere / "ct_001.dcm")  # the same file name in another folder
    folder = tmp_path / "study 7"
    folder.mkdir()
    series = pydicom.uid.generate_uid()
    ct_slice(folder / "a.dcm", series=series)
    heatmaps = tmp_path / "heat"
    result = run_cli([first, second, folder, "--json", "--heatmaps", heatmaps], weights, tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(row["heatmap"]).name for row in rows] == ["ct_001_any.png", "ct_001_any-2.png", f"study_7_{series}_any.png"]
    assert sorted(p.name for p in heatmaps.iterdir()) == sorted(Path(row["heatmap"]).name for row in rows)


def test_the_exit_statuses_are_in_the_help():
    result = subprocess.run([sys.executable, "-m", "cds_service.cli", "triage", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "exit status:" in result.stdout
    assert "0  every input was triaged" in result.stdout and "1  at least one input was not" in result.stdout
