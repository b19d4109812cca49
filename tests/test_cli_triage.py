"""`cds-triage triage`: the service's preprocessing, model and Grad-CAM on local files, no servers."""

import json
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image

from cds_service.devservers import make_dataset
from cds_service.domain import Task
from support import make_test_weights

SCHEMA_KEYS = {"input", "task", "status", "findings", "priority", "model"}


def run_cli(args, weights_dir, tmp_path):
    env = {**os.environ, "CDS_WEIGHTS_DIR": str(weights_dir), "CDS_DATA_DIR": str(tmp_path / "var")}
    return subprocess.run([sys.executable, "-m", "cds_service.cli", "triage", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    make_test_weights(root, Task.HEAD_CT_ICH)
    make_test_weights(root, Task.BRAIN_MRI, threshold=1.0)  # nothing positive
    return root


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
