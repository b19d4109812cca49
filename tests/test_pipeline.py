"""`run_triage` in-process against the real Orthanc and FHIR server: a study gets the same
findings and the same Grad-CAM overlay whether it came from the PACS or from local files,
in either inference runtime."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cds_devtools.devservers import upload_dicom
from cds_devtools.dicom_data import make_dataset
from cds_service.core.domain import Task
from cds_service.adapters.fhir_client import FhirClient
from cds_service.jobs.state import Job, JobState
from cds_service.core.models import load_model
from cds_service.adapters.pacs import sort_slices
from cds_service.pipeline import run_triage
from cds_service.core.preprocessing import dicom_to_image
from cds_service.core.settings import Settings
from cds_service.core.triage import triage_images
from cds_service.worker import build_deps
from fhir_mappings.imaging_study import build_imaging_study
from support import make_test_weights, seed_onnx_exports
from test_anatomy import phantom
from test_pixel_routing import ROOT, RSNA_DICOM, rsna_series

pytestmark = pytest.mark.integration


def ordered_study(fhir: FhirClient, orthanc, slices: int,
                  datasets: list[pydicom.Dataset] | None = None) -> tuple[Job, list[pydicom.Dataset]]:
    """A head CT in the PACS and its order in the EHR (slices uploaded in reverse order); or the
    given `datasets` (one study) and their order."""
    study_uid, series_uid, tag = pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), uuid.uuid4().hex[:10]
    rng = np.random.default_rng(7)
    datasets = datasets or [make_dataset((rng.normal(40, 60, (96, 96)) + 1024).clip(0, 4095).astype(np.uint16),
                                         modality="CT", body_part="HEAD", series_description="CT HEAD WO",
                                         study_uid=study_uid, series_uid=series_uid, instance_number=slices - index,
                                         rescale_slope=1, rescale_intercept=-1024)
                            for index in range(slices)]
    upload_dicom(orthanc.url, datasets)
    patient, order, study = f"pp-{tag}", f"psr-{tag}", f"pis-{tag}"
    fhir.update({"resourceType": "Patient", "id": patient}, if_match=None)
    fhir.update({"resourceType": "ServiceRequest", "id": order, "status": "active", "intent": "order",
                 "priority": "routine", "subject": {"reference": f"Patient/{patient}"}}, if_match=None)
    fhir.update(build_imaging_study(datasets, patient_id=patient, service_request_id=order, study_id=study)
                .model_dump(mode="json", exclude_none=True), if_match=None)
    return Job(id=tag, imaging_study_id=study, service_request_id=order, source="test", model_set="test",
               state=JobState.RUNNING), datasets


def pipeline_settings(tmp_path: Path, orthanc, fhir_server, **overrides) -> Settings:
    """Settings for run_triage in this process against the session's Orthanc and FHIR server."""
    return seed_onnx_exports(Settings(data_dir=tmp_path / "data", fhir_base_url=fhir_server.url,
                                      dicomweb_url=orthanc.dicomweb_url, http_timeout_s=30, **overrides))


@pytest.mark.parametrize("runtime", ["auto", "torch"])  # ONNX Runtime's feature map, and pytorch-grad-cam
def test_the_pacs_and_local_files_give_the_same_findings_and_overlay(orthanc, fhir_server, tmp_path: Path,
                                                                      runtime: str) -> None:
    weights = make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64)  # three different windows
    settings = pipeline_settings(tmp_path, orthanc, fhir_server, weights_dir=weights, inference_runtime=runtime)
    fhir = FhirClient(settings.fhir_base_url)
    deps = build_deps(settings)
    try:
        job, datasets = ordered_study(fhir, orthanc, slices=5)
        state, reason, summary = run_triage(job, deps)
        assert state is JobState.DONE, reason
        [media_ref] = summary["written"]["Media"]
        media, _ = fhir.read(*media_ref.split("/"))
    finally:
        fhir.close()
        deps.fhir.close()

    model = load_model(weights, Task.HEAD_CT_ICH, runtime="onnxruntime" if runtime == "auto" else runtime)
    images = [dicom_to_image(ds, model.card.preprocessing) for ds in sort_slices(datasets)]
    local = triage_images(model, images, settings.priority_rules, study_uid="local",
                          batch_size=settings.inference_batch_size)
    assert [f["probability"] for f in summary["findings"]] == pytest.approx(
        [f.probability for f in local.findings], abs=1e-4)
    assert base64.b64decode(media["content"]["data"]) == local.heatmap.png


@pytest.mark.parametrize("source", ["setting", "card"])
def test_a_task_in_shadow_mode_writes_marked_results_and_never_touches_the_priority(
        orthanc, fhir_server, tmp_path: Path, source: str) -> None:
    """CDS_TASK_MODES=head_ct_ich=shadow (or the card's default_mode): Observations and the report are
    written with the shadow tag and sentence, the order stays routine, the card is information only."""
    import json

    from fhir_mappings.ai_reports import ai_report_from_fhir
    from cds_service.web.cds_hooks.cards import report_card
    from cds_service.core.domain import TaskMode
    from fhir_mappings.builders import SHADOW_SENTENCE, is_shadow

    weights = make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64)  # threshold 0: positive
    modes = {}
    if source == "card":
        card_file = weights / "head_ct_ich.json"
        card_file.write_text(json.dumps(json.loads(card_file.read_text()) | {"default_mode": "shadow"}))
    else:
        modes = {Task.HEAD_CT_ICH: TaskMode.SHADOW}
    settings = pipeline_settings(tmp_path, orthanc, fhir_server, weights_dir=weights, task_modes=modes)
    fhir = FhirClient(settings.fhir_base_url)
    deps = build_deps(settings)
    try:
        job, _ = ordered_study(fhir, orthanc, slices=3)
        state, reason, summary = run_triage(job, deps)
        assert state is JobState.DONE, reason
        assert summary["mode"] == "shadow" and summary["suggestedPriority"] == "stat"
        assert summary["priority"]["changed"] is False and "shadow" in summary["priority"]["reason"]
        order, _ = fhir.read("ServiceRequest", job.service_request_id)
        assert order["priority"] == "routine"
        [report_ref] = summary["written"]["DiagnosticReport"]
        report, _ = fhir.read(*report_ref.split("/"))
        assert is_shadow(report) and report["conclusion"].startswith(SHADOW_SENTENCE)
        observations = {ref: fhir.read(*ref.split("/"))[0] for ref in summary["written"]["Observation"]}
        assert observations and all(is_shadow(o) for o in observations.values())
        card = report_card(ai_report_from_fhir(report, observations), settings.priority_rules, settings.public_url)
        assert card["indicator"] == "info" and card["summary"].startswith("[Shadow mode]")
    finally:
        fhir.close()
        deps.fhir.close()


def test_a_task_that_is_off_is_not_applicable_and_writes_nothing(orthanc, fhir_server, tmp_path: Path) -> None:
    from cds_service.core.domain import TaskMode

    weights = make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64)
    settings = pipeline_settings(tmp_path, orthanc, fhir_server, weights_dir=weights, task_modes={Task.HEAD_CT_ICH: TaskMode.OFF})
    deps = build_deps(settings)
    try:
        fhir = FhirClient(settings.fhir_base_url)
        job, _ = ordered_study(fhir, orthanc, slices=2)
        state, reason, summary = run_triage(job, deps)
        assert state is JobState.NOT_APPLICABLE and "CDS_TASK_MODES" in reason and "written" not in summary
        assert fhir.read("ServiceRequest", job.service_request_id)[0]["priority"] == "routine"
        fhir.close()
    finally:
        deps.fhir.close()


@pytest.mark.skipif(not RSNA_DICOM.is_dir(), reason="../shared/data is not here")
def test_a_real_head_ct_with_a_silent_header_and_no_body_site_is_routed_by_its_pixels(orthanc, fhir_server, tmp_path: Path) -> None:
    """The committed models, real RSNA slices with empty header fields, an ImagingStudy without bodySite
    and an order without a code: the PACS gives one middle image, its pixels say head CT."""
    settings = pipeline_settings(tmp_path, orthanc, fhir_server, weights_dir=ROOT / "weights", inference_runtime="torch")
    deps = build_deps(settings)
    fhir = FhirClient(settings.fhir_base_url)
    try:
        job, _ = ordered_study(fhir, orthanc, 0, datasets=rsna_series(5))
        state, reason, summary = run_triage(job, deps)
        assert state is JobState.DONE, reason
        assert summary["task"] == "head_ct_ich" and summary["routedBy"] == "pixels"
        assert summary["inputCheck"]["fits"] is True and summary["written"]["DiagnosticReport"]
    finally:
        fhir.close()
        deps.fhir.close()


def test_a_chest_ct_whose_header_says_head_is_refused_and_nothing_is_written(orthanc, fhir_server, tmp_path: Path) -> None:
    weights = make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64)  # would call anything stat
    settings = pipeline_settings(tmp_path, orthanc, fhir_server, weights_dir=weights)
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    slices = []
    for number in range(1, 5):
        ds = phantom(340, 240, lungs=True, spacing=0.9)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study_uid, series_uid, number
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.BodyPartExamined, ds.SeriesDescription = "HEAD", "CT HEAD WO"
        slices.append(ds)
    deps = build_deps(settings)
    fhir = FhirClient(settings.fhir_base_url)
    try:
        job, _ = ordered_study(fhir, orthanc, 0, datasets=slices)
        state, reason, summary = run_triage(job, deps)
        assert state is JobState.NOT_APPLICABLE and reason.startswith("not a head CT") and "mm across" in reason
        assert summary["inputCheck"]["fits"] is False and "written" not in summary
        assert fhir.read("ServiceRequest", job.service_request_id)[0]["priority"] == "routine"
    finally:
        fhir.close()
        deps.fhir.close()
