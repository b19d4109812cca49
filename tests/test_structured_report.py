"""The DICOM Structured Report (TID 1500) of a triage: built with highdicom, read back by highdicom into what
our FHIR Observations say, checked by dciodvfy, stored in the real Orthanc (STOW-RS) and fetched back
(WADO-RS), and named by our DiagnosticReport; plus the settings that turn it on and the viewer links."""

from __future__ import annotations

import io
import shutil
import uuid
from datetime import datetime, timezone

import numpy as np
import pydicom
import pytest

from cds_devtools.devservers import free_port, upload_dicom
from cds_devtools.dicom_data import make_dataset
from cds_service.adapters.fhir_client import FhirClient
from cds_service.adapters.pacs import Pacs, PacsConfig
from cds_service.adapters.secondary_capture import StoredCapture, StoredInstance, build_heatmap_capture, heatmap_to_pacs
from cds_service.adapters.structured_report import (ReportEvidence, build_triage_report, report_to_pacs, report_uids,
                                                     with_report_reference)
from fhir_mappings.ai_reports import ai_report_from_job, ai_reports_from_fhir
from cds_service.web.cds_hooks.cards import report_card
from cds_service.core.domain import (DISCLAIMER, Finding, Heatmap, ModelRef, OrderContext, PacsResult, Task, TaskMode,
                                     TriageResult, TriageStatus)
from cds_service.core.settings import DEFAULT_PRIORITY_RULES, Settings, SettingsError
from cds_service.core.viewer import viewer_link
from cds_service.pipeline import written_locations
from fhir_mappings import codes
from fhir_mappings.conventions import DEFAULT_CONVENTIONS
from fhir_mappings.builders import build_triage_transaction, device_identifier
from conftest import require
from sr_support import comments, dciodvfy_findings, evidence_uids, fhir_findings, group_images, sr_findings
from test_cds_hooks import HEMORRHAGE, as_stored, transaction
from test_secondary_capture import overlay_png

ISSUED = datetime(2026, 12, 7, 9, 30, tzinfo=timezone.utc)
MODALITY_BODY = {"CT": "HEAD", "MR": "BRAIN", "CR": "CHEST"}
TASK_OF = {"CT": Task.HEAD_CT_ICH, "MR": Task.BRAIN_MRI, "CR": Task.CHEST_PNEUMOTHORAX}


def series(modality: str, count: int) -> list[pydicom.Dataset]:
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    rng = np.random.default_rng(5)
    ct = {"rescale_slope": 1, "rescale_intercept": -1024} if modality == "CT" else {}
    return [make_dataset(rng.integers(900, 1100, (48, 48)).astype(np.uint16), modality=modality,
                         body_part=MODALITY_BODY[modality], patient_name="Doe^Jane", patient_id="MRN-42",
                         patient_birth_date="19600101", patient_sex="F", accession_number="ACC7", study_uid=study_uid,
                         series_uid=series_uid, instance_number=i + 1, **ct)  # type: ignore[arg-type]
            for i in range(count)]


def findings_of(task: Task, positive: bool) -> tuple[Finding, ...]:
    if task is Task.HEAD_CT_ICH:  # "any" trained, a subtype trained but short of its bar, one untrained
        return (Finding("any", 0.93 if positive else 0.04, positive, 0.5),
                Finding("subdural", 0.61, False, 0.3, raises_priority=False),
                Finding("epidural", 0.2, False, 0.5, trained=False))
    if task is Task.BRAIN_MRI:
        return (Finding("glioma", 0.81 if positive else 0.1, positive, 0.4), Finding("meningioma", 0.05, False, 0.5),
                Finding("pituitary", 0.03, False, 0.5, threshold_source="site thresholds 2026-11"),
                Finding("no_tumor", 0.11 if positive else 0.82, False, 1.0))
    return (Finding("pneumothorax", 0.87 if positive else 0.02, positive, 0.19),)


def triage_of(datasets: list[pydicom.Dataset], *, positive: bool, slab: int = 1,
              mode: TaskMode = TaskMode.ACTIVE) -> tuple[TriageResult, list[str]]:
    """A done result of the series' task and the key image's instances (the slab's slices, or one slice)."""
    task = TASK_OF[str(datasets[0].Modality)]
    findings = findings_of(task, positive)
    key = [str(ds.SOPInstanceUID) for ds in datasets[:slab]]
    top = next((f for f in findings if f.positive), None)
    heatmap = Heatmap(png=overlay_png(), label=top.label, width=48, height=48, slice_index=0,
                      sop_instance_uid=key[len(key) // 2], averaged_slices=slab, slab_mm=5.0 if slab > 1 else None) \
        if top else None
    result = TriageResult(study_uid=str(datasets[0].StudyInstanceUID), status=TriageStatus.DONE, task=task,
                          series_uid=str(datasets[0].SeriesInstanceUID), findings=findings,
                          model=ModelRef(f"test-{task.value}", "3.1.0"), heatmap=heatmap, mode=mode)
    return result, key if heatmap else []


def evidence_of(datasets: list[pydicom.Dataset], result: TriageResult, key: list[str]) -> ReportEvidence:
    capture = None
    if result.heatmap is not None:
        sc = build_heatmap_capture(datasets[0], result.heatmap, task=str(result.task.value), model_name="m",
                                   model_version="3.1.0")
        capture = StoredCapture(result.study_uid, str(sc.SeriesInstanceUID), str(sc.SOPInstanceUID))
    return ReportEvidence(datasets[0], tuple((str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets),
                          tuple(key), capture)


def fhir_observations(result: TriageResult) -> list[dict]:
    ctx = OrderContext(imaging_study_id="is-1", patient_id="p-1", service_request_id="sr-1", study_uid=result.study_uid)
    bundle = build_triage_transaction(ctx, result, issued=ISSUED).model_dump(mode="json", exclude_none=True)
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]


# --- pure -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("modality", "positive"), [("CT", True), ("CT", False), ("MR", True), ("MR", False),
                                                    ("CR", True), ("CR", False)])
def test_highdicom_reads_back_what_the_fhir_observations_say(modality, positive):
    datasets = series(modality, 3 if modality == "CT" else 1)
    result, key = triage_of(datasets, positive=positive)
    report = build_triage_report(result, evidence_of(datasets, result, key), issued=ISSUED)
    read = sr_findings(pydicom.dcmread(io.BytesIO(dicom_bytes(report))))  # as a file, read back
    assert read == fhir_findings(fhir_observations(result))
    assert set(read) == {f.label for f in result.findings if f.trained}  # untrained outputs are in neither
    if modality == "CT":  # SNOMED CT where verified, our local code beside it; the subtype short of its bar: no verdict
        assert read["any"].codes == {(codes.SNOMED_SYSTEM, "1386000"), (DEFAULT_CONVENTIONS.finding_system, "any")}
        assert read["any"].present is positive and read["subdural"].present is None
    if modality == "MR":  # "no tumour" is a probability only (no double negative)
        assert read["no_tumor"].present is None and read["glioma"].present is positive


def dicom_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_the_report_is_a_preliminary_ai_report_in_the_same_study_by_our_model():
    datasets = series("CT", 3)
    result, key = triage_of(datasets, positive=True)
    report = build_triage_report(result, evidence_of(datasets, result, key), issued=ISSUED)
    assert report.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and report.Modality == "SR"
    assert report.StudyInstanceUID == datasets[0].StudyInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate"):
        assert str(report.get(keyword)) == str(datasets[0].get(keyword)), keyword
    assert report.SeriesDescription.startswith("AI-generated") and report.SeriesNumber == 9902
    assert (report.SeriesInstanceUID, report.SOPInstanceUID) == report_uids(result.study_uid, "head_ct_ich", "3.1.0")
    assert (report.PreliminaryFlag, report.VerificationFlag, report.CompletionFlag) == ("PRELIMINARY", "UNVERIFIED", "COMPLETE")
    assert (str(report.ContentDate), str(report.ContentTime), report.TimezoneOffsetFromUTC) == ("20261207", "093000", "+0000")
    assert report.Manufacturer == "cds-triage"
    root = report.ContentSequence
    observer = {item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue") or item.get("UID") for item in root
                if item.RelationshipType == "HAS OBS CONTEXT" and item.ValueType in ("TEXT", "UIDREF")}
    assert observer == {"Device Observer UID": f"2.25.{uuid.UUID(device_identifier(result.model).value).int}",
                        "Device Observer Name": "test-head_ct_ich 3.1.0", "Device Observer Manufacturer": "cds-triage",
                        "Device Observer Model Name": "test-head_ct_ich"}  # the same identity as the FHIR Device
    [scheme] = report.CodingSchemeIdentificationSequence  # our private designator, resolved to our code system's URL
    assert scheme.CodingSchemeDesignator == "99CDSTRIAGE"
    assert scheme.CodingSchemeResourcesSequence[0].CodingSchemeURL == DEFAULT_CONVENTIONS.finding_system


def test_the_key_images_and_the_heatmap_are_referenced_in_the_finding_behind_them():
    """A slab of three thin slices drove the finding: all three are its source, the Secondary Capture illustrates
    it; every instance of the series and the capture are the report's evidence."""
    datasets = series("CT", 5)
    result, key = triage_of(datasets, positive=True, slab=3)
    evidence = evidence_of(datasets, result, key)
    report = build_triage_report(result, evidence, issued=ISSUED)
    assert group_images(report, "any") == {"Source of Measurement": key,
                                           "Best illustration of finding": [evidence.capture.sop_instance_uid]}
    assert group_images(report, "subdural") == {}
    assert evidence_uids(report) == {str(ds.SOPInstanceUID) for ds in datasets} | {evidence.capture.sop_instance_uid}
    with pytest.raises(ValueError, match="not among the series"):
        ReportEvidence(datasets[0], evidence.instances, ("1.2.3",))


@pytest.mark.parametrize("mode", [TaskMode.SHADOW, TaskMode.ACTIVE])
def test_the_mode_and_the_disclaimer_are_written_as_text(mode):
    datasets = series("CR", 1)
    result, key = triage_of(datasets, positive=False, mode=mode)
    said = comments(build_triage_report(result, evidence_of(datasets, result, key), issued=ISSUED))
    assert said[0].startswith(f"Mode: {mode.value}.") and said[1].startswith(DISCLAIMER)


@pytest.mark.parametrize(("modality", "positive"), [("CT", True), ("MR", True), ("MR", False), ("CR", True), ("CR", False)])
def test_the_report_passes_dciodvfy(modality, positive, tmp_path):
    """dicom3tools' IOD validator (run.sh installs it for the tests; CI fails without it)."""
    require(shutil.which("dciodvfy"), "dciodvfy not installed (apt-get install dicom3tools)")
    datasets = series(modality, 4 if modality == "CT" else 1)
    result, key = triage_of(datasets, positive=positive, slab=2 if modality == "CT" else 1)
    errors, warnings = dciodvfy_findings(build_triage_report(result, evidence_of(datasets, result, key), issued=ISSUED),
                                         tmp_path)
    assert errors == [] and warnings == []


def test_uids_are_stable_per_study_task_and_model_version():
    assert report_uids("1.2.3", "brain_mri", "1.0") == report_uids("1.2.3", "brain_mri", "1.0")
    assert report_uids("1.2.3", "brain_mri", "1.0") != report_uids("1.2.3", "brain_mri", "1.1")
    series_uid, sop_uid = report_uids("1.2.3", "brain_mri", "1.0")
    assert series_uid != sop_uid and len(sop_uid) <= 64


def test_the_diagnostic_report_names_the_sr_once():
    stored = StoredInstance("1.2", "1.2.3", "1.2.3.4")
    report = {"resourceType": "DiagnosticReport", "id": "d1", "status": "preliminary",
              "identifier": [{"system": DEFAULT_CONVENTIONS.result_identifier_system, "value": "x"}],
              "presentedForm": [{"contentType": "text/html", "url": "https://cds.example/worklist"}]}
    updated = with_report_reference(report, stored, "https://pacs.example/dicom-web/")
    assert updated is not None and updated["identifier"][0] == report["identifier"][0]
    assert updated["identifier"][1]["system"] == "urn:dicom:uid" and updated["identifier"][1]["value"] == "urn:oid:1.2.3.4"
    assert updated["presentedForm"][1] == {
        "contentType": "application/dicom", "url": "https://pacs.example/dicom-web/studies/1.2/series/1.2.3/instances/1.2.3.4",
        "title": "DICOM Structured Report (TID 1500) of this AI result, in the PACS"}
    assert with_report_reference(updated, stored, "https://pacs.example/dicom-web") is None
    [read] = ai_reports_from_fhir([updated | {"subject": {"reference": "Patient/p1"}, "meta": {"security": [
        {"system": codes.SECURITY_OBSERVATION_VALUE_SYSTEM, "code": codes.SECURITY_AI_ASSERTED}]}}], "p1")
    assert read.structured_report_uid == "1.2.3.4"  # what the worklist's "also in the PACS" reads


def test_nothing_is_reported_of_a_triage_without_a_series():
    result = TriageResult(study_uid="1.2.3", status=TriageStatus.NOT_APPLICABLE)
    record = report_to_pacs(None, None, result, source=None, key_instances=[], capture=None,  # type: ignore[arg-type]
                            report_references=[], issued=ISSUED)
    assert record == {"stored": False, "error": "no triage result to report"}


# --- settings and viewer links ----------------------------------------------------------------------


def test_results_to_pacs_is_a_closed_set_and_the_older_switch_still_works():
    assert Settings().results_to_pacs == frozenset()  # off by default
    assert Settings.from_env({"CDS_RESULTS_TO_PACS": " SR, sc "}).results_to_pacs == {PacsResult.SR, PacsResult.SC}
    assert Settings.from_env({"CDS_RESULTS_TO_PACS": "none"}).results_to_pacs == frozenset()
    assert Settings.from_env({"CDS_HEATMAP_TO_PACS": "true"}).results_to_pacs == {PacsResult.SC}
    both = Settings.from_env({"CDS_HEATMAP_TO_PACS": "on", "CDS_RESULTS_TO_PACS": "sr"})
    assert both.results_to_pacs == {PacsResult.SR, PacsResult.SC} and both.heatmap_to_pacs
    assert Settings.from_env(both.to_env()).results_to_pacs == both.results_to_pacs  # what a child process reads
    with pytest.raises(SettingsError, match=r"^CDS_RESULTS_TO_PACS='sr,pdf': pdf is not one of sr, sc"):
        Settings.from_env({"CDS_RESULTS_TO_PACS": "sr,pdf"})
    with pytest.raises(SettingsError, match="CDS_RESULTS_TO_PACS"):
        Settings(results_to_pacs="kos")


OHIF = "https://viewer.example.org/viewer?StudyInstanceUIDs={study_uid}"
WEASIS = "weasis://%24dicom%3Ars%20--url%20%22https%3A%2F%2Fpacs.example.org%2Fdicom-web%22%20-r%20%22studyUID%3D{study_uid}%22"


@pytest.mark.parametrize(("template", "words"), [
    ("https://viewer.example.org/viewer?StudyInstanceUIDs={study}", "unknown placeholders {study}; it may use {study_uid}"),
    ("https://viewer.example.org/{study_uid}/{accession}", "unknown placeholders {accession}"),
    ("https://viewer.example.org/viewer", "has no {study_uid}"),
    ("javascript:alert({study_uid})", "must start with http://, https://, weasis://"),
    ("https://viewer.example.org/{study_uid", "is not a URL template"),
    ("https:///viewer/{study_uid}", "has no host"),
    ("https://viewer.example.org/{study_uid!r}", "with a format"),
])
def test_a_viewer_template_that_cannot_work_stops_the_start_naming_the_setting(template, words):
    with pytest.raises(SettingsError, match=r"^CDS_VIEWER_URL=") as refused:
        Settings.from_env({"CDS_VIEWER_URL": template})
    assert words in str(refused.value)


def test_viewer_links_from_the_template_and_the_older_name():
    assert Settings.from_env({"CDS_VIEWER_URL": OHIF}).viewer_link("1.2.840.1") == \
        "https://viewer.example.org/viewer?StudyInstanceUIDs=1.2.840.1"
    assert Settings.from_env({"CDS_PACS_VIEWER_URL": OHIF}).viewer_url == OHIF  # the setting's name before
    assert Settings.from_env({"CDS_PACS_VIEWER_URL": "https://old/{study_uid}", "CDS_VIEWER_URL": OHIF}).viewer_url == OHIF
    assert viewer_link(WEASIS, "1.2.3").endswith("studyUID%3D1.2.3%22") and viewer_link(WEASIS, "1.2.3").startswith("weasis://")
    assert Settings().viewer_link("1.2.3") is None and viewer_link(OHIF, None) is None


def test_cards_link_to_the_viewer_when_one_is_configured():
    [report] = ai_reports_from_fhir(HEMORRHAGE, "p1")
    assert report.study_uid == "1.2.3.4"  # from the DiagnosticReport's imagingStudy identifier
    links = report_card(report, DEFAULT_PRIORITY_RULES, "http://cds", viewer=OHIF)["links"]
    assert {"label": "Open the study in the image viewer", "url": "https://viewer.example.org/viewer?StudyInstanceUIDs=1.2.3.4",
            "type": "absolute"} in links
    assert all("viewer" not in link["url"] for link in report_card(report, DEFAULT_PRIORITY_RULES, "http://cds")["links"])
    from_job = ai_report_from_job({"findings": [{"label": "any", "probability": 0.9, "positive": True}], "studyUid": "1.2.9",
                                   "reportToPacs": {"stored": True, "sopInstanceUid": "1.2.9.9"}}, "ct1")
    assert from_job.study_uid == "1.2.9" and from_job.structured_report_uid == "1.2.9.9"
    older = as_stored(transaction("p1", "ct1", triage_of(series("CR", 1), positive=True)[0], ISSUED), "x")
    for resource in older:  # a report written before the study's UID was carried: no link, no error
        for reference in resource.get("imagingStudy") or []:
            reference.pop("identifier", None)
    [old] = ai_reports_from_fhir(older, "p1")
    assert old.study_uid is None
    assert all("viewer" not in link["url"] for link in report_card(old, DEFAULT_PRIORITY_RULES, "http://cds", viewer=OHIF)["links"])


# --- against the real Orthanc and FHIR server -----------------------------------------------------


@pytest.mark.integration
def test_the_report_round_trips_through_orthanc_and_is_named_by_the_diagnostic_report(orthanc, fhir_server, tmp_path):
    datasets = series("CT", 3)
    upload_dicom(orthanc.url, datasets)
    result, key = triage_of(datasets, positive=True)
    fhir = FhirClient(fhir_server.url)
    ctx = OrderContext(imaging_study_id="is-sr", patient_id="p-sr", study_uid=result.study_uid)
    bundle = build_triage_transaction(ctx, result, issued=ISSUED).model_dump(mode="json", exclude_none=True)
    for entry in bundle["entry"]:  # referential integrity on servers that check it
        entry["resource"].pop("basedOn", None)
    fhir.update({"resourceType": "Patient", "id": "p-sr"}, if_match=None)
    fhir.update({"resourceType": "ImagingStudy", "id": "is-sr", "status": "available", "subject": {"reference": "Patient/p-sr"}},
                if_match=None)
    written = written_locations(fhir.transaction(bundle))
    [report_ref], [media_ref] = written["DiagnosticReport"], written["Media"]
    pacs = Pacs(PacsConfig(url=orthanc.dicomweb_url))
    try:
        capture = heatmap_to_pacs(pacs, fhir, datasets, result, [media_ref])
        assert capture["stored"] is True, capture
        record = report_to_pacs(pacs, fhir, result, source=None, key_instances=key,
                                capture=StoredCapture.from_record(capture), report_references=[report_ref], issued=ISSUED)
        assert record["stored"] is True and "error" not in record, record
        assert record["sopInstanceUid"] == report_uids(result.study_uid, "head_ct_ich", "3.1.0")[1]

        # WADO-RS: the report the PACS now holds, as a viewer fetches it
        [retrieved] = pacs.client.retrieve_series(result.study_uid, record["seriesUid"])
        assert retrieved.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and retrieved.PatientID == "MRN-42"
        observations = [fhir.read("Observation", ref.split("/")[1])[0] for ref in written["Observation"]]
        assert sr_findings(retrieved) == fhir_findings(observations)
        assert group_images(retrieved, "any") == {"Source of Measurement": key,
                                                  "Best illustration of finding": [capture["sopInstanceUid"]]}
        if shutil.which("dciodvfy"):
            assert dciodvfy_findings(retrieved, tmp_path) == ([], [])

        report, _ = fhir.read("DiagnosticReport", report_ref.split("/")[1])
        [named] = [i for i in report["identifier"] if i["system"] == "urn:dicom:uid"]
        assert named["value"] == f"urn:oid:{record['sopInstanceUid']}"
        [form] = [f for f in report["presentedForm"] if f["contentType"] == "application/dicom"]
        fetched = pacs.session.get(form["url"], headers={"Accept": 'multipart/related; type="application/dicom"'})
        assert fetched.status_code == 200 and record["sopInstanceUid"].encode() in fetched.content

        # a re-run stores the same instance again: one report in the PACS, named once
        again = report_to_pacs(pacs, fhir, result, source=datasets[0], key_instances=key,
                               capture=StoredCapture.from_record(capture), report_references=[report_ref], issued=ISSUED)
        assert again["sopInstanceUid"] == record["sopInstanceUid"] and again["stored"] is True
        assert len(pacs.client.search_for_instances(result.study_uid, record["seriesUid"])) == 1
        report, _ = fhir.read("DiagnosticReport", report_ref.split("/")[1])
        assert sum(i["system"] == "urn:dicom:uid" for i in report["identifier"]) == 1
        assert sum(f["contentType"] == "application/dicom" for f in report["presentedForm"]) == 1
    finally:
        fhir.close()


@pytest.mark.integration
def test_a_pacs_that_is_down_is_recorded_not_raised(fhir_server):
    datasets = series("CR", 1)
    result, key = triage_of(datasets, positive=True)
    fhir = FhirClient(fhir_server.url)
    try:
        pacs = Pacs(PacsConfig(url=f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=2))
        record = report_to_pacs(pacs, fhir, result, source=datasets[0], key_instances=key, capture=None,
                                report_references=["DiagnosticReport/does-not-matter"], issued=ISSUED)
    finally:
        fhir.close()
    assert record["stored"] is False and "unreachable" in record["error"]
