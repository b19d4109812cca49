"""Pure decisions: which model reads a series, and what priority its findings ask for."""

import pytest

from cds_service.core.domain import Finding, InferenceRuntime, Priority, Series, Study, Task
from cds_service.core.priority import parse_priority, raised_priority, suggest_priority
from cds_service.core.routing import route_study, task_for_series
from cds_service.core.settings import DEFAULT_PRIORITY_RULES, Settings, SettingsError, parse_priority_rules


@pytest.mark.parametrize(
    "modality, body_part, description, task",
    [
        ("CT", "HEAD", "", Task.HEAD_CT_ICH),
        ("CT", "", "CT BRAIN WO CONTRAST", Task.HEAD_CT_ICH),
        ("MR", "BRAIN", "T1 POST", Task.BRAIN_MRI),
        ("MR", "HEAD", "", Task.BRAIN_MRI),
        ("CR", "CHEST", "PA", Task.CHEST_PNEUMOTHORAX),
        ("DX", "", "CHEST PA/LAT", Task.CHEST_PNEUMOTHORAX),
        ("CT", "ABDOMEN", "CT ABD", None),
        ("MR", "KNEE", "", None),
        ("US", "HEAD", "", None),
        ("CT", "HEAD", "SCOUT", None),
        ("SC", "HEAD", "AI-generated heatmap", None),
    ],
)
def test_task_for_series(modality, body_part, description, task):
    assert task_for_series(Series("1.2", modality, body_part, description)) is task


def test_route_prefers_the_series_with_most_images_and_skips_inapplicable():
    study = Study("1.2.3", (
        Series("1.1", "CT", "HEAD", "SCOUT", 2),
        Series("1.2", "CT", "HEAD", "thin", 40),
        Series("1.3", "CT", "HEAD", "thick", 10),
        Series("1.4", "SR", "", "report", 1),
    ))
    route = route_study(study)
    assert route is not None and route.series.uid == "1.2" and route.task is Task.HEAD_CT_ICH
    assert route_study(Study("9", (Series("1", "US", "ABDOMEN"),))) is None


def finding(label, p, positive, trained=True):
    return Finding(label, p, positive, 0.5, trained)


def test_priority_policy_defaults():
    assert suggest_priority([finding("any", 0.9, True)], DEFAULT_PRIORITY_RULES) is Priority.STAT
    assert suggest_priority([finding("glioma", 0.9, True), finding("no_tumor", 0.1, False)], DEFAULT_PRIORITY_RULES) is Priority.URGENT
    assert suggest_priority([finding("any", 0.2, False)], DEFAULT_PRIORITY_RULES) is None
    both = [finding("glioma", 0.9, True), finding("any", 0.9, True)]
    assert suggest_priority(both, DEFAULT_PRIORITY_RULES) is Priority.STAT


def test_priority_is_never_lowered():
    assert raised_priority(Priority.ROUTINE, Priority.STAT) is Priority.STAT
    assert raised_priority(None, Priority.URGENT) is Priority.URGENT
    assert raised_priority(Priority.STAT, Priority.URGENT) is None
    assert raised_priority(Priority.URGENT, Priority.URGENT) is None
    assert raised_priority(Priority.ASAP, None) is None
    assert Priority.ROUTINE < Priority.URGENT < Priority.ASAP < Priority.STAT
    assert parse_priority("asap") is Priority.ASAP and parse_priority("bogus") is None and parse_priority(None) is None


def test_priority_rules_are_configurable():
    rules = parse_priority_rules("glioma=asap, pneumothorax=urgent")
    assert rules["glioma"] is Priority.ASAP and rules["pneumothorax"] is Priority.URGENT and rules["any"] is Priority.STAT
    with pytest.raises(ValueError):
        parse_priority_rules("glioma")
    with pytest.raises(ValueError):
        parse_priority_rules("glioma=soon")


def test_settings_from_env_round_trip(tmp_path):
    env = {"CDS_FHIR_BASE_URL": "http://127.0.0.1:1/fhir", "CDS_PORT": "9", "CDS_DATA_DIR": str(tmp_path),
           "CDS_PRIORITY_RULES": "meningioma=routine", "CDS_HTTP_TIMEOUT_S": "2.5"}
    settings = Settings.from_env(env)
    assert settings.fhir_base_url == "http://127.0.0.1:1/fhir" and settings.port == 9 and settings.http_timeout_s == 2.5
    assert settings.data_dir == tmp_path and settings.priority_rules["meningioma"] is Priority.ROUTINE
    assert Settings.from_env(settings.to_env()) == settings


def test_inference_threads_share_the_cores_between_workers(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert Settings(workers=1).inference_threads == 8
    assert Settings(workers=3).inference_threads == 2
    assert Settings(workers=16).inference_threads == 1
    assert Settings(workers=2, torch_threads=3).inference_threads == 3  # set by hand: taken as is
    assert Settings.from_env({"CDS_INFERENCE_RUNTIME": "torch"}).inference_runtime is InferenceRuntime.TORCH
    for variable, typo in (("CDS_INFERENCE_RUNTIME", "onnx"), ("CDS_DEVICE", "gpu"), ("CDS_HOOKS_AUTH", "maybe"),
                           ("CDS_PACS_UNKNOWN_PATIENT", "ignore"), ("CDS_HOOKS_SYSTEM_ACTIONS", "sometimes")):
        with pytest.raises(SettingsError, match=variable):
            Settings.from_env({variable: typo})
    assert Settings.from_env(Settings(inference_runtime="onnxruntime", cds_hooks_system_actions="on").to_env()) == \
        Settings(inference_runtime=InferenceRuntime.ONNXRUNTIME, cds_hooks_system_actions=True)


def test_batch_size_small_on_a_cpu_unless_set():
    from cds_service.core.settings import CPU_BATCH_SIZE

    assert Settings().inference_batch_size == CPU_BATCH_SIZE == 6
    assert Settings(device="cuda").inference_batch_size == Settings(device="cuda:1").inference_batch_size == 16
    assert Settings.from_env({"CDS_BATCH_SIZE": "24"}).inference_batch_size == 24  # set by hand: taken as is


def test_openmp_threads_wait_passively_unless_told_otherwise():
    """Spinning OpenMP threads stall triage on a small shared machine (see cds_service/__init__.py)."""
    import os
    import subprocess
    import sys

    code = "import os, cds_service; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "ACTIVE"
