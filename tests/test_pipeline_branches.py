"""`run_triage`'s branches in milliseconds: an in-memory FHIR server behind httpx's MockTransport and
an in-memory PACS, beside the real-server tests (test_pipeline.py, test_e2e.py) that prove the same
path on Orthanc and a FHIR server. Each test names the branch it takes."""

from __future__ import annotations

import copy
import io
import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pydicom
import pytest

from cds_devtools.dicom_data import make_dataset
from cds_service.core.domain import Series, Study, Task, TaskMode
from cds_service.core.errors import UpstreamError
from cds_service.adapters.fhir_client import FHIR_JSON, FhirClient
from cds_service.jobs.state import Job, JobState
from cds_service.core.models import ModelRegistry
from cds_service.adapters.pacs import series_from_dataset
from cds_service.pipeline import PipelineDeps, run_triage
from cds_service.core.settings import Settings
from fhir_mappings.builders import heatmap_source_instance
from fhir_mappings.imaging_study import build_imaging_study
from support import make_test_weights
from test_anatomy import phantom


class FakeFhir:
    """Read, update with If-Match and transaction, with versions; `conflicts` answers that many
    updates of a ServiceRequest with `conflict_status` after a person's change to `person_sets`."""

    def __init__(self) -> None:
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.transactions: list[dict[str, Any]] = []
        self.conflicts, self.conflict_status, self.person_sets = 0, 412, None

    def put(self, resource: dict[str, Any]) -> None:
        stored = copy.deepcopy(resource)
        key = (stored["resourceType"], stored["id"])
        version = int(self.resources.get(key, {}).get("meta", {}).get("versionId", "0")) + 1
        stored["meta"] = {**stored.get("meta", {}), "versionId": str(version)}
        self.resources[key] = stored

    def handler(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")
        if request.method == "GET" and len(parts) >= 2 and (parts[-2], parts[-1]) in self.resources:
            resource = self.resources[(parts[-2], parts[-1])]
            return httpx.Response(200, json=resource, headers={"ETag": f'W/"{resource["meta"]["versionId"]}"'})
        if request.method == "PUT":
            body = json.loads(request.content)
            current = self.resources.get((body["resourceType"], body["id"]))
            if body["resourceType"] == "ServiceRequest" and self.conflicts:
                self.conflicts -= 1
                if self.person_sets:  # a person changed the order meanwhile
                    self.put({**current, "priority": self.person_sets})
                return httpx.Response(self.conflict_status, json={"resourceType": "OperationOutcome", "issue": []})
            self.put(body)
            return httpx.Response(200, json=self.resources[(body["resourceType"], body["id"])])
        if request.method == "POST" and parts[-1] == "fhir":
            bundle = json.loads(request.content)
            self.transactions.append(bundle)
            entries = []
            for entry in bundle["entry"]:  # stored as created (references left as urn:uuid)
                created = {**entry["resource"], "id": uuid.uuid4().hex[:8]}
                self.put(created)
                entries.append({"response": {"status": "201", "location": f"{created['resourceType']}/{created['id']}/_history/1"}})
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "transaction-response", "entry": entries})
        return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})


class FakePacs:
    """One study's series in memory, handed out as Pacs does (Part-10 bytes per instance); storing
    (STOW-RS) is answered 503, or kept in `stored` when it `accepts`."""

    def __init__(self, datasets: list[pydicom.Dataset], accepts: bool = False) -> None:
        self.datasets = datasets
        self.parts = {str(ds.SOPInstanceUID): part_bytes(ds) for ds in datasets}
        self.accepts = accepts
        self.stored: list[pydicom.Dataset] = []
        self.config = type("Config", (), {"url": "http://pacs.invalid/dicom-web"})

    def store(self, dataset: pydicom.Dataset) -> None:
        if not self.accepts:
            raise UpstreamError("PACS answered 503 to STOW-RS")
        self.stored.append(dataset)

    def series_instances(self, study_uid: str, series_uid: str) -> list[tuple[str, str]]:
        return [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in self.datasets]

    def find_study(self, study_uid: str) -> Study:
        return Study(uid=study_uid, series=(series_from_dataset(self.datasets[0], len(self.datasets)),))

    def iter_series_parts(self, study_uid: str, series: Series, max_instances: int) -> Iterator[bytes]:
        yield from self.parts.values()

    def check_series_bytes(self, total: int, count: int) -> None:
        return None

    def retrieve_part(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> bytes:
        return self.parts[sop_instance_uid]

    def middle_instance(self, study_uid: str, series: Series) -> pydicom.Dataset:
        return self.datasets[len(self.datasets) // 2]


def part_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def head_ct(slices: int = 3, **header: str) -> list[pydicom.Dataset]:
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    rng = np.random.default_rng(0)
    header = {"body_part": "HEAD", "series_description": "CT HEAD WO"} | header
    return [make_dataset((rng.normal(40, 20, (64, 64)) + 1024).astype(np.uint16), modality="CT", study_uid=study,
                         series_uid=series, instance_number=i + 1, rescale_slope=1, rescale_intercept=-1024, **header)
            for i in range(slices)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_weights(tmp_path_factory.mktemp("weights"), Task.HEAD_CT_ICH, input_size=64)  # all positive


def triage(datasets: list[pydicom.Dataset], weights: Path, tmp_path: Path, fhir: FakeFhir | None = None,
           pacs: FakePacs | None = None, **settings: Any) -> tuple[JobState, str, dict[str, Any], FakeFhir]:
    fhir = fhir or FakeFhir()
    fhir.put({"resourceType": "Patient", "id": "p1"})
    fhir.put({"resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order", "priority": "routine",
              "subject": {"reference": "Patient/p1"}})
    fhir.put(build_imaging_study(datasets, patient_id="p1", service_request_id="sr1", study_id="is1")
             .model_dump(mode="json", exclude_none=True))
    config = Settings(data_dir=tmp_path / "data", weights_dir=weights, fhir_base_url="http://fhir.invalid/fhir",
                      dicomweb_url="http://pacs.invalid/dicom-web", inference_runtime="torch", **settings)
    client = FhirClient(config.fhir_base_url)
    client.http = httpx.Client(base_url=client.base_url + "/", headers={"Accept": FHIR_JSON},
                               transport=httpx.MockTransport(fhir.handler))
    pacs = pacs or FakePacs(datasets)
    deps = PipelineDeps(settings=config, fhir=client, models=ModelRegistry(weights, runtime="torch"),
                        pacs_for=lambda url: pacs)  # type: ignore[arg-type,return-value]
    job = Job(id="j1", imaging_study_id="is1", service_request_id="sr1", source="test", model_set="test",
              state=JobState.RUNNING)
    state, reason, summary = run_triage(job, deps)
    return state, reason, summary, fhir


def test_done_writes_one_transaction_and_raises_the_order(weights: Path, tmp_path: Path) -> None:
    state, reason, summary, fhir = triage(head_ct(), weights, tmp_path)
    assert state is JobState.DONE, reason
    assert len(fhir.transactions) == 1 and summary["routedBy"] == "dicom"
    assert summary["priority"] == {"changed": True, "from": "routine", "to": "stat"}
    assert fhir.resources[("ServiceRequest", "sr1")]["priority"] == "stat"


def test_a_study_no_model_reads_is_not_applicable_and_writes_nothing(weights: Path, tmp_path: Path) -> None:
    state, reason, summary, fhir = triage(head_ct(body_part="ABDOMEN", series_description="CT ABDOMEN"), weights, tmp_path)
    assert state is JobState.NOT_APPLICABLE and "ABDOMEN" in reason and not fhir.transactions


def test_a_task_without_weights_is_model_unavailable(tmp_path: Path) -> None:
    state, reason, summary, fhir = triage(head_ct(), tmp_path / "no-weights", tmp_path)
    assert state is JobState.MODEL_UNAVAILABLE and summary == {"task": "head_ct_ich"} and not fhir.transactions


def test_a_task_that_is_off_writes_nothing(weights: Path, tmp_path: Path) -> None:
    state, reason, _, fhir = triage(head_ct(), weights, tmp_path, task_modes={Task.HEAD_CT_ICH: TaskMode.OFF})
    assert state is JobState.NOT_APPLICABLE and "CDS_TASK_MODES" in reason and not fhir.transactions


def test_a_study_the_model_was_not_made_for_is_refused_before_writing(weights: Path, tmp_path: Path) -> None:
    slices = [phantom(340, 240, lungs=True, spacing=0.9) for _ in range(4)]
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for number, ds in enumerate(slices, start=1):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber, ds.BodyPartExamined = study, series, number, "HEAD"
    state, reason, summary, fhir = triage(slices, weights, tmp_path)
    assert state is JobState.NOT_APPLICABLE and reason.startswith("not a head CT") and not fhir.transactions
    assert fhir.resources[("ServiceRequest", "sr1")]["priority"] == "routine"


@pytest.mark.parametrize("status", [412, 409])  # 412: the standard's answer; 409: HAPI's (HAPI-0989)
def test_a_stale_if_match_is_read_again_and_a_persons_stat_is_never_lowered(weights: Path, tmp_path: Path, status: int) -> None:
    fhir = FakeFhir()
    fhir.conflicts, fhir.conflict_status, fhir.person_sets = 1, status, "stat"
    state, _, summary, fhir = triage(head_ct(), weights, tmp_path, fhir=fhir)
    assert state is JobState.DONE and summary["priority"] == {"changed": False, "from": "stat", "to": "stat"}


def test_an_order_that_keeps_changing_is_left_for_a_retry(weights: Path, tmp_path: Path) -> None:
    fhir = FakeFhir()
    fhir.conflicts = 99
    with pytest.raises(UpstreamError, match="kept changing"):
        triage(head_ct(), weights, tmp_path, fhir=fhir)


def test_a_heatmap_the_pacs_refuses_is_recorded_and_the_triage_stays_done(weights: Path, tmp_path: Path) -> None:
    state, _, summary, fhir = triage(head_ct(), weights, tmp_path, heatmap_to_pacs=True)
    assert state is JobState.DONE and len(fhir.transactions) == 1
    assert summary["heatmapToPacs"] == {"stored": False, "error": "UpstreamError: PACS answered 503 to STOW-RS"}
    assert "reportToPacs" not in summary  # CDS_HEATMAP_TO_PACS alone: the capture only, as before


def test_results_to_pacs_off_stores_nothing_and_a_refused_report_is_recorded(weights: Path, tmp_path: Path) -> None:
    state, _, summary, _ = triage(head_ct(), weights, tmp_path)
    assert state is JobState.DONE and "heatmapToPacs" not in summary and "reportToPacs" not in summary
    state, _, summary, _ = triage(head_ct(), weights, tmp_path, results_to_pacs="sr")
    assert state is JobState.DONE and "heatmapToPacs" not in summary
    assert summary["reportToPacs"] == {"stored": False, "error": "UpstreamError: PACS answered 503 to STOW-RS"}


def test_the_report_references_the_key_slice_and_the_capture_and_the_fhir_report_names_it(weights: Path,
                                                                                           tmp_path: Path) -> None:
    datasets = head_ct()
    pacs = FakePacs(datasets, accepts=True)
    state, _, summary, fhir = triage(datasets, weights, tmp_path, pacs=pacs, results_to_pacs="sr,sc")
    assert state is JobState.DONE
    capture, report = summary["heatmapToPacs"], summary["reportToPacs"]
    assert capture["stored"] and report["stored"] and "error" not in capture | report, summary
    sc, sr = pacs.stored  # the capture first: the report references it
    assert (str(sc.SOPInstanceUID), str(sr.SOPInstanceUID)) == (capture["sopInstanceUid"], report["sopInstanceUid"])
    [group] = [item for item in sr.ContentSequence if item.ValueType == "CONTAINER"
               and item.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"][0].ContentSequence
    images = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in group.ContentSequence if i.ValueType == "IMAGE"}
    [media] = [r for (kind, _), r in fhir.resources.items() if kind == "Media"]
    assert images == {str(sc.SOPInstanceUID), heatmap_source_instance(media)}  # the key slice and its overlay
    [diagnostic_report] = [r for (kind, _), r in fhir.resources.items() if kind == "DiagnosticReport"]
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{sr.SOPInstanceUID}"}.items() <= diagnostic_report["identifier"][-1].items()
    assert summary["studyUid"] == str(datasets[0].StudyInstanceUID)
