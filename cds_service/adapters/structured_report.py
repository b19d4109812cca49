"""The AI result in the PACS as a DICOM Structured Report, beside the heatmap's Secondary Capture.

Radiologists, RIS and viewers (OHIF, Weasis) read the PACS, not our FHIR server. The standard shape
of an AI result there (IHE AI Results) is a TID 1500 "Imaging Measurement Report", built here with
highdicom's `Comprehensive3DSR`, which checks the templates as it builds:

- the same study and patient (copied from a header of the source series), a new series "AI-generated
  triage report" (number 9902); PRELIMINARY, UNVERIFIED: no radiologist has signed it;
- the observer is our model as a device (TID 1004): its UID is the FHIR Device identifier's UUID as a
  `2.25.` UID, its name "<model> <version>", manufacturer "cds-triage", model name the card's name
  (a card's name is its id);
- one measurement group (TID 1501) per label our FHIR Observations carry (the trained ones): the
  Finding coded with the very codings of `Observation.code` (`builders.finding_code`: the first as the
  code, the others in its Equivalent Code Sequence; our local system as the private designator
  99CDSTRIAGE, named with its URL in the Coding Scheme Identification Sequence); the algorithm (TID
  4019) with its version and operating threshold; the probability as "Certainty of Finding" (DCM
  111012) in UCUM `{probability}`, 0 to 1 as in FHIR; and Present/Absent (SCT, CID 241) at the
  threshold wherever the Observation has an interpretation (`Finding.has_verdict`);
- the group of the heatmap's label references the key image, the slice or every slice of the slab
  behind the finding, as "Source of Measurement", and the Grad-CAM Secondary Capture as "Best
  illustration of finding" (DCM 121080, CID 7003);
- a report-level "Qualitative Evaluations" container (UMLS C0034375) with two comments: the mode
  (shadow or active) and the disclaimer;
- every instance of the source series (QIDO-RS), and the Secondary Capture, as evidence.

Its UIDs derive from (study, task, model version), like the Secondary Capture's and the FHIR
identifiers, so a re-run stores the same instance again and never a second report. FHIR points to
it from our DiagnosticReport (`with_report_reference`; docs/worklist.md says why those elements).
`report_to_pacs` is the pipeline step: like `heatmap_to_pacs` it never raises.
"""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem, CodingSchemeResourceItem
import pydicom
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from fhir_mappings import codes
from fhir_mappings.builders import SHADOW_SENTENCE, device_identifier, finding_code
from fhir_mappings.conventions import DEFAULT_CONVENTIONS, Conventions

from cds_service.core.domain import DISCLAIMER, Finding, TaskMode, TriageResult
from cds_service.adapters.fhir_client import FhirClient
from cds_service.adapters.pacs import Pacs
from cds_service.adapters.secondary_capture import AI_SERIES_PREFIX, MANUFACTURER, StoredCapture, StoredInstance, derived_uids

log = logging.getLogger(__name__)

SERIES_NUMBER = 9902  # after the Grad-CAM series (9901)
#: DICOM Coding Scheme Designators of the FHIR systems our finding codes use (PS3.16 Table 8-1); our own
#: system gets a private designator ("99" prefix, PS3.16 section 8.2), resolved by the URL we give it.
STANDARD_SCHEMES = {codes.SNOMED_SYSTEM: "SCT", codes.RADLEX_SYSTEM: "RADLEX", codes.LOINC_SYSTEM: "LN"}
LOCAL_SCHEME = "99CDSTRIAGE"
PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
#: Procedure reported (CID 100), by the source's modality; a radiograph otherwise.
PROCEDURES = {"CT": dicom_codes.LN.CTUnspecifiedBodyRegion, "MR": dicom_codes.LN.MRIUnspecifiedBodyRegion}
#: Type 2 attributes highdicom copies from the source, present (maybe empty) in every report we write.
PATIENT_AND_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                     "StudyDate", "StudyTime", "ReferringPhysicianName")
MODE_TEXT = {
    TaskMode.ACTIVE: "Mode: active. This task's results are used to order the worklist at this site.",
    TaskMode.SHADOW: f"Mode: shadow. {SHADOW_SENTENCE}",
}


@dataclass(frozen=True)
class ReportEvidence:
    """What the report references in the PACS: a header of the source series (patient and study), every
    instance of the series as (SOP Class UID, SOP Instance UID), the key image's instances (the slice, or
    the slab's slices, behind the heatmap; none without a heatmap) and the heatmap's Secondary Capture."""

    source: pydicom.Dataset
    instances: tuple[tuple[str, str], ...]
    key_instances: tuple[str, ...] = ()
    capture: StoredCapture | None = None

    def __post_init__(self) -> None:
        known = {sop for _, sop in self.instances}
        if missing := [sop for sop in self.key_instances if sop not in known]:
            raise ValueError(f"key images not among the series' instances: {missing}")


def report_uids(study_uid: str, task: str, model_version: str) -> tuple[str, str]:
    """The report's (Series Instance UID, SOP Instance UID), the same for every run of the same triage."""
    return derived_uids(study_uid, task, model_version, "triage-structured-report")


def device_uid(result: TriageResult) -> str:
    """The model's Device Observer UID: the FHIR Device identifier (a UUID) as a DICOM UID (PS3.5 B.2)."""
    assert result.model is not None
    return f"2.25.{uuid.UUID(str(device_identifier(result.model).value)).int}"


def concept(system: str, code: str, display: str, conventions: Conventions = DEFAULT_CONVENTIONS) -> hd.sr.CodedConcept:
    """A FHIR coding as a DICOM coded concept (our local system, CDS_FHIR_CANONICAL_BASE's, under its private designator)."""
    scheme = STANDARD_SCHEMES.get(system) or (LOCAL_SCHEME if system == conventions.finding_system else None)
    if scheme is None:
        raise ValueError(f"no DICOM coding scheme for {system}")
    return hd.sr.CodedConcept(code, scheme, display[:64])


def finding_concept(label: str, conventions: Conventions = DEFAULT_CONVENTIONS) -> hd.sr.CodedConcept:
    """The label coded as our FHIR Observation codes it: the first coding as the code, the others as its
    Equivalent Code Sequence (PS3.3 Table 8.8-1)."""
    first, *others = [concept(str(c.system), str(c.code), str(c.display), conventions)
                      for c in finding_code(label, conventions).coding or []]
    if others:
        first.EquivalentCodeSequence = others
    return first


def _group(result: TriageResult, finding: Finding, evidence: ReportEvidence,
           conventions: Conventions) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of one label: finding, algorithm, probability, present/absent, images."""
    assert result.model is not None and result.task is not None
    task, model = result.task.value, result.model
    source = finding.threshold_source or "the model card"
    key = result.heatmap is not None and result.heatmap.label == finding.label
    classes = {sop: sop_class for sop_class, sop in evidence.instances}
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[result.study_uid, task, model.version, finding.label, "tracking"]),
            identifier=f"{task} {finding.label}"),
        finding_type=finding_concept(finding.label, conventions),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=model.name, version=model.version, manufacturer=MANUFACTURER,
            parameters=[f"operating threshold {finding.threshold:.4g} ({source})"]),
        measurements=[hd.sr.Measurement(name=dicom_codes.DCM.CertaintyOfFinding, value=round(finding.probability, 4),
                                        unit=PROBABILITY_UNIT)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            finding_concept(finding.label, conventions), dicom_codes.SCT.Present if finding.positive else dicom_codes.SCT.Absent,
        )] if finding.has_verdict else None,
        source_images=[hd.sr.SourceImageForMeasurementGroup(classes[sop], sop) for sop in evidence.key_instances]
        if key else None,
    )
    if key and evidence.capture is not None:
        group[0].ContentSequence.append(hd.sr.ImageContentItem(
            name=dicom_codes.DCM.BestIllustrationOfFinding, referenced_sop_class_uid=SecondaryCaptureImageStorage,
            referenced_sop_instance_uid=evidence.capture.sop_instance_uid,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _comments(result: TriageResult) -> hd.sr.ContainerContentItem:
    """TID 1500's report-level Qualitative Evaluations: the task's mode and the disclaimer, as text."""
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=dicom_codes.DCM.Comment, value=text,
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for text in (MODE_TEXT[result.mode], f"{DISCLAIMER} Preliminary AI triage result; no radiologist has "
                                             "verified this report.")])
    return container


def _evidence_datasets(evidence: ReportEvidence, study_uid: str) -> list[pydicom.Dataset]:
    """The source header (with its patient and study attributes, empty where it has none), then a
    reference of every other instance the report names."""
    source = pydicom.Dataset()
    source.update(evidence.source)
    for keyword in PATIENT_AND_STUDY:
        if keyword not in source:
            setattr(source, keyword, "")
    series_uid = str(evidence.source.SeriesInstanceUID)
    refs = [(series_uid, sop_class, sop) for sop_class, sop in evidence.instances]
    if evidence.capture is not None:
        refs.append((evidence.capture.series_uid, SecondaryCaptureImageStorage, evidence.capture.sop_instance_uid))
    others = []
    for series, sop_class, sop in refs:
        ref = pydicom.Dataset()
        ref.StudyInstanceUID, ref.SeriesInstanceUID, ref.SOPClassUID, ref.SOPInstanceUID = study_uid, series, sop_class, sop
        others.append(ref)
    return [source, *others]


def build_triage_report(result: TriageResult, evidence: ReportEvidence, *, issued: datetime,
                        conventions: Conventions = DEFAULT_CONVENTIONS) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of one triage (the trained findings, as our FHIR Observations). Pure: no I/O."""
    if result.model is None or result.task is None:
        raise ValueError("only a done triage has a report")
    if str(evidence.source.StudyInstanceUID) != result.study_uid:
        raise ValueError(f"the source is of study {evidence.source.StudyInstanceUID}, the result of {result.study_uid}")
    model, task = result.model, result.task.value
    findings = [f for f in result.findings if f.trained]
    if not findings:
        raise ValueError("a result without trained findings has nothing to report")
    observer = hd.sr.ObserverContext(
        observer_type=dicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(result), name=f"{model.name} {model.version}"[:64], manufacturer_name=MANUFACTURER,
            model_name=model.name[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURES.get(str(evidence.source.get("Modality", "")).upper(),
                                          dicom_codes.LN.XRUnspecifiedBodyRegion),
        imaging_measurements=[_group(result, finding, evidence, conventions) for finding in findings],
        title=dicom_codes.DCM.ImagingMeasurementReport,
    )
    report[0].ContentSequence.append(_comments(result))
    series_uid, sop_uid = report_uids(result.study_uid, task, model.version)
    issued = issued.astimezone(timezone.utc)  # with its offset said below: the same instant as FHIR's `issued`
    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence_datasets(evidence, result.study_uid),
        content=report,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # PRELIMINARY
        is_verified=False,
        series_description=f"{AI_SERIES_PREFIX} triage report ({task})"[:64],
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        content_date=issued.date(),
        content_time=issued.time().replace(tzinfo=None),
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME, name="cds-triage finding labels", responsible_organization=MANUFACTURER,
            resources=[CodingSchemeResourceItem(url=conventions.finding_system, url_type="DOC")])],
    )
    sr.TimezoneOffsetFromUTC = "+0000"
    return sr


# --- FHIR ---------------------------------------------------------------------------------------------


def with_report_reference(report: dict[str, Any], stored: StoredInstance, dicomweb_url: str) -> dict[str, Any] | None:
    """A copy of our DiagnosticReport that names the SR: an identifier (the same report as a DICOM object)
    and a presentedForm with its WADO-RS address; None when it already does."""
    if stored.named_by(report):
        return None
    form = {"contentType": "application/dicom",
            "url": f"{dicomweb_url.rstrip('/')}/studies/{stored.study_uid}/series/{stored.series_uid}"
                   f"/instances/{stored.sop_instance_uid}",
            "title": "DICOM Structured Report (TID 1500) of this AI result, in the PACS"}
    return report | {"identifier": [*(report.get("identifier") or []), stored.identifier("the AI-generated Structured Report")],
                     "presentedForm": [*(report.get("presentedForm") or []), form]}


# --- the pipeline step --------------------------------------------------------------------------------


def report_to_pacs(pacs: Pacs, fhir: FhirClient, result: TriageResult, *, source: pydicom.Dataset | None,
                   key_instances: Sequence[str], capture: StoredCapture | None, report_references: Sequence[str],
                   issued: datetime, conventions: Conventions = DEFAULT_CONVENTIONS) -> dict[str, Any]:
    """Pipeline step 8b: build, store (STOW-RS) and reference the SR. Never raises.

    `source`: a slice of the source series fetched already, if any (else the first instance is read).
    Returns what the job record keeps: `{"stored": true, "studyUid", "seriesUid", "sopInstanceUid",
    "report"}`, or `{"stored": false, "error": "..."}`.
    """
    if result.model is None or result.task is None or not result.series_uid:
        return {"stored": False, "error": "no triage result to report"}
    try:
        instances = tuple(pacs.series_instances(result.study_uid, result.series_uid))
        if source is None:  # no slice fetched again (no heatmap, no input check): one instance's header
            part = pacs.retrieve_part(result.study_uid, result.series_uid, instances[0][1])
            source = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True)
        dataset = build_triage_report(result, ReportEvidence(source, instances, tuple(key_instances), capture),
                                      issued=issued, conventions=conventions)
        pacs.store(dataset)
    except Exception as exc:  # noqa: BLE001 - an optional copy must never fail a triage already in FHIR
        log.warning("structured report not stored in the PACS: %s", exc)
        return {"stored": False, "error": f"{type(exc).__name__}: {exc}"}
    stored = StoredInstance(result.study_uid, str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID))
    record: dict[str, Any] = {"stored": True, **stored.to_json()}
    if report_references:
        try:
            fhir.amend("DiagnosticReport", report_references[0].split("/")[-1],
                       lambda report: with_report_reference(report, stored, pacs.config.url))
            record["report"] = report_references[0]
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("structured report stored but DiagnosticReport not updated: %s", exc)
            record["error"] = f"DiagnosticReport not updated: {exc}"
    return record
