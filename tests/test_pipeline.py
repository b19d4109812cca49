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

from cds_service.devservers import make_dataset, upload_dicom
from cds_service.domain import Task
from cds_service.fhir_client import FhirClient
from cds_service.jobs import Job, JobState
from cds_service.models import load_model
from cds_service.pacs import sort_slices
from cds_service.pipeline import run_triage
from cds_service.preprocessing import dicom_to_image
from cds_service.settings import Settings
from cds_service.triage import triage_images
from cds_service.worker import build_deps
from fhir_mappings.imaging_study import build_imaging_study
from support import make_test_weights

pytestmark = pytest.mark.integration


def ordered_study(fhir: FhirClient, orthanc, slices: int) -> tuple[Job, list[pydicom.Dataset]]:
    """A head CT in the PACS and its order in the EHR (slices uploaded in reverse order)."""
    study_uid, series_uid, tag = pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), uuid.uuid4().hex[:10]
    rng = np.random.default_rng(7)
    datasets = [make_dataset((rng.normal(40, 60, (96, 96)) + 1024).clip(0, 4095).astype(np.uint16),
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


@pytest.mark.parametrize("runtime", ["auto", "torch"])  # ONNX Runtime's feature map, and pytorch-grad-cam
def test_the_pacs_and_local_files_give_the_same_findings_and_overlay(orthanc, fhir_server, tmp_path: Path,
                                                                      runtime: str) -> None:
    weights = make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64)  # three different windows
    settings = Settings(weights_dir=weights, data_dir=tmp_path / "data", fhir_base_url=fhir_server.url,
                        dicomweb_url=orthanc.dicomweb_url, inference_runtime=runtime, http_timeout_s=30)
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
