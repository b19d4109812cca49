"""End to end on real servers: a study of the right anatomy whose images are unlike the model's training
images is scored, not refused, and marked unfamiliar wherever its result shows: the FHIR report and its
Observations (a sentence and a meta.tag), the worklist row and study page, the CDS Hooks card, and the
drift window on /healthz. A study whose header names another body part is refused.

`serve` + `worker` with the shipped brain MR model (ONNX graph, input profile) on Orthanc and sekmet. The
inputs are one real meningioma slice of the Kaggle set as a DICOM MR: as it is (familiar), and with its grey
levels raised to the power 0.5 (another display curve, as another scanner's export might give: unfamiliar;
tests/test_input_check.py measures the same image with the shipped profile), and the same slice with
BodyPartExamined KNEE, ordered in the EHR as a brain MR (wrong anatomy: routed to the brain model by the
order, refused by the input check).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from cds_devtools.demo import start_service
from cds_devtools.devservers import free_port
from cds_devtools.dicom_data import make_dataset
from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.preprocessing import load_grey
from cds_service.core.settings import Settings
from fhir_mappings import codes
from fhir_mappings.builders import UNFAMILIAR_SENTENCE
from fhir_mappings.imaging_study import build_imaging_study
from hook_client import EhrSigner, hook_request
from stack_support import NOTIFY_HEADERS, SECRET, order_study, wait_finished

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
MENINGIOMA = ROOT.parent / "shared" / "data" / "brain_mri" / "meningioma" / "Tr-meTr_0000.jpg"
EHR = EhrSigner()


def brain_mr(grey: np.ndarray, seed: int, body_part: str = "BRAIN") -> list[pydicom.Dataset]:
    pixels = np.clip(grey * 4.0, 0, 1023).astype(np.uint16)  # 8-bit grey as 10-bit MR values
    return [make_dataset(pixels, modality="MR", body_part=body_part, series_description="MR T1 POST",
                         patient_name="Doe^Jane", patient_id=f"MRN-U{seed}")]


@pytest.fixture(scope="module")
def triaged(orthanc, fhir_server, tmp_path_factory) -> dict[str, dict]:
    if not MENINGIOMA.is_file():
        pytest.skip(f"{MENINGIOMA} is not here (the shared data set)")
    root = tmp_path_factory.mktemp("unfamiliar")
    grey = load_grey(MENINGIOMA)
    studies = {"familiar": brain_mr(grey, 1), "unfamiliar": brain_mr(255.0 * (grey / 255.0) ** 0.5, 2),
               "knee": brain_mr(grey, 3, body_part="KNEE")}
    port = free_port()
    settings = Settings(operator_open_on_loopback=True, fhir_base_url=fhir_server.url, dicomweb_url=orthanc.dicomweb_url,
                        public_url=f"http://127.0.0.1:{port}", port=port, data_dir=root / "data", weights_dir=ROOT / "weights",
                        subscription_secret=SECRET, job_retries=1, job_retry_delay_s=0.2, http_timeout_s=20,
                        **EHR.hook_settings(root / "ehr-jwks.json"))
    fhir = FhirClient(fhir_server.url)
    processes = start_service(settings, root / "logs")
    try:
        with httpx.Client(base_url=settings.public_url, timeout=60) as api:
            ids = {name: order_study(fhir, datasets, orthanc_url=orthanc.url) for name, datasets in studies.items()
                   if name != "knee"}
            # the knee: ordered in the EHR as a brain MR (procedureCode), its DICOM header saying KNEE
            knee_study = build_imaging_study(studies["knee"], patient_id="p-knee", service_request_id="sr-knee",
                                             study_id="is-knee").model_dump(mode="json", exclude_none=True)
            knee_study["procedureCode"] = [{"text": "MR BRAIN WITH CONTRAST"}]
            for key in ("subject", "basedOn"):  # order_study's own patient
                knee_study.pop(key, None)
            ids["knee"] = order_study(fhir, studies["knee"], orthanc_url=orthanc.url, imaging_study=knee_study)
            for study in ids.values():
                assert api.put(f"/fhir-notify/ImagingStudy/{study['study']}", headers=NOTIFY_HEADERS).status_code == 200
            jobs = wait_finished(api, [i["study"] for i in ids.values()], timeout=300)
            out: dict[str, dict] = {}
            rows = {row["orderId"]: row for row in api.get("/worklist/rows.json").json()["rows"]}
            for name, study in ids.items():
                reports = fhir.search("DiagnosticReport", {"subject": f"Patient/{study['patient']}",
                                                           "_include": "DiagnosticReport:result"})
                card = []
                if name != "knee":
                    url = f"{settings.public_url}/cds-services/patient-view"
                    body = hook_request("patient-view", {"patientId": study["patient"]}, prefetch={"aiReports": {
                        "resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in reports]}})
                    card = api.post("/cds-services/patient-view", json=body, headers=EHR.auth(url)).json()["cards"]
                out[name] = {"ids": study, "job": jobs[study["study"]], "resources": reports, "cards": card,
                             "row": rows.get(study["order"]), "page": api.get(f"/worklist/orders/{study['order']}").text}
            out["health"] = {"drift": api.get("/healthz").json().get("drift")}
            return out
    finally:
        processes.stop()
        fhir.close()


def tags(resource: dict) -> set[str]:
    return {t.get("code") for t in (resource.get("meta") or {}).get("tag") or []}


def test_the_unfamiliar_study_is_scored_and_marked_in_the_fhir_report_and_observations(triaged) -> None:
    unfamiliar, familiar = triaged["unfamiliar"], triaged["familiar"]
    assert unfamiliar["job"]["status"] == "done" and familiar["job"]["status"] == "done"
    assert unfamiliar["job"]["result"]["inputCheck"]["fit"] == "unfamiliar"
    assert familiar["job"]["result"]["inputCheck"]["fit"] == "familiar"
    [report] = [r for r in unfamiliar["resources"] if r["resourceType"] == "DiagnosticReport"]
    assert report["conclusion"].startswith(UNFAMILIAR_SENTENCE)
    assert "UNFAMILIAR IMAGES" in report["text"]["div"]
    observations = [r for r in unfamiliar["resources"] if r["resourceType"] == "Observation"]
    assert observations and all(codes.UNFAMILIAR_INPUT_TAG_CODE in tags(r) for r in [report, *observations])
    [plain] = [r for r in familiar["resources"] if r["resourceType"] == "DiagnosticReport"]
    assert codes.UNFAMILIAR_INPUT_TAG_CODE not in tags(plain) and UNFAMILIAR_SENTENCE not in plain["conclusion"]


def test_the_worklist_and_the_card_say_unfamiliar(triaged) -> None:
    unfamiliar, familiar = triaged["unfamiliar"], triaged["familiar"]
    assert unfamiliar["row"]["unfamiliar"] is True and familiar["row"]["unfamiliar"] is False
    assert "Unfamiliar images:" in unfamiliar["page"] and "Unfamiliar images:" not in familiar["page"]
    [card] = unfamiliar["cards"]
    assert UNFAMILIAR_SENTENCE in card["detail"]
    assert all(UNFAMILIAR_SENTENCE not in c["detail"] for c in familiar["cards"])


def test_the_drift_window_counts_the_unfamiliar_study(triaged) -> None:
    brain = triaged["health"]["drift"]["brain_mri"]
    assert brain["studies"] == 2 and brain["unfamiliar"] == 1


def test_a_study_whose_header_names_another_body_part_is_refused_not_scored(triaged) -> None:
    knee = triaged["knee"]
    assert knee["job"]["status"] == "not_applicable"
    assert "names KNEE" in knee["job"]["reason"] and knee["resources"] == []
