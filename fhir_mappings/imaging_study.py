"""ImagingStudy from DICOM headers: what a PACS bridge writes when the EHR has none.

Used by the demo (playing the EHR) and by the PACS-side trigger, where a study arrives in
the PACS before any ImagingStudy exists. Only header fields are read (no pixels).
"""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import date
from typing import Any, Sequence

from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.humanname import HumanName
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.imagingstudy import ImagingStudy, ImagingStudySeries, ImagingStudySeriesInstance
from fhir.resources.R4B.meta import Meta
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.reference import Reference

from . import codes
from .common import narrative
from .conventions import DEFAULT_CONVENTIONS, Conventions

#: DICOM modality codes (DICOM PS3.16 CID 29), the system R4 ImagingStudy.modality uses.
DICOM_DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"

#: Identifier type for the accession number (HL7 v2 table 0203 "ACSN"), as R4 ImagingStudy.identifier shows.
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
ACCESSION_TYPE = "ACSN"


#: DICOM Patient's Sex (0010,0040) → FHIR administrative gender.
_GENDER = {"M": "male", "F": "female", "O": "other"}


def _text(ds: Any, keyword: str) -> str:
    return str(getattr(ds, keyword, "") or "").strip()


_DA = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})")
_TM = re.compile(r"([0-9]{2})([0-9]{2})?([0-9]{2})?(\.[0-9]{1,6})?")
_OFFSET = re.compile(r"([+-])([0-9]{2})([0-9]{2})")


def dicom_datetime(da: str, tm: str = "", offset: str = "") -> Any:  # a str; Any: the models type dateTime as datetime
    """DICOM DA and TM (and TimezoneOffsetFromUTC, `+0100`) as a FHIR dateTime; None when the date is
    missing or malformed. The time is kept only with a known offset, because FHIR requires a zone with
    a time and guessing the PACS's would shift the study; without one the date alone is written."""
    day = _DA.fullmatch(da.strip())
    if not day:
        return None
    try:
        date(int(day[1]), int(day[2]), int(day[3]))
    except ValueError:
        return None
    text = f"{day[1]}-{day[2]}-{day[3]}"
    clock, zone = _TM.fullmatch(tm.strip()), _OFFSET.fullmatch(offset.strip())
    if clock and zone and int(clock[1]) < 24 and int(clock[2] or 0) < 60 and int(clock[3] or 0) < 60:
        text += f"T{clock[1]}:{clock[2] or '00'}:{clock[3] or '00'}{zone[1]}{zone[2]}:{zone[3]}"
    return text


def build_imaging_study(
    datasets: Sequence[Any],
    *,
    patient_id: str,
    service_request_id: str | None = None,
    study_id: str | None = None,
    endpoint_id: str | None = None,
) -> ImagingStudy:
    """An `available` ImagingStudy listing the series and instances of one DICOM study.

    `datasets` are pydicom datasets (headers are enough) of a single study.
    """
    if not datasets:
        raise ValueError("an ImagingStudy needs at least one DICOM instance")
    study_uids = {_text(ds, "StudyInstanceUID") for ds in datasets}
    if len(study_uids) != 1 or "" in study_uids:
        raise ValueError(f"instances belong to {len(study_uids)} studies; expected exactly one")
    by_series: dict[str, list[Any]] = defaultdict(list)
    for ds in datasets:
        by_series[_text(ds, "SeriesInstanceUID")].append(ds)

    series = []
    for number, (uid, members) in enumerate(sorted(by_series.items()), start=1):
        first = members[0]
        body_part = _text(first, "BodyPartExamined")
        series.append(ImagingStudySeries(
            uid=uid,
            number=int(getattr(first, "SeriesNumber", number) or number),
            modality=Coding(system=DICOM_DCM_SYSTEM, code=_text(first, "Modality") or "OT"),
            description=_text(first, "SeriesDescription") or None,
            numberOfInstances=len(members),
            bodySite=Coding(display=body_part) if body_part else None,
            instance=[
                ImagingStudySeriesInstance(
                    uid=_text(ds, "SOPInstanceUID"),
                    sopClass=Coding(system="urn:ietf:rfc:3986", code=f"urn:oid:{_text(ds, 'SOPClassUID')}"),
                    number=int(getattr(ds, "InstanceNumber", 0) or 0) or None,
                )
                for ds in members
            ],
        ))
    first = datasets[0]
    modalities = sorted({code for s in series if (code := s.modality.code)})  # each series has one ("OT" at least)
    identifiers = [Identifier(system=codes.DICOM_UID_SYSTEM, value=f"{codes.URN_OID_PREFIX}{study_uids.pop()}")]
    if accession := _text(first, "AccessionNumber"):
        identifiers.append(Identifier(
            type=CodeableConcept(coding=[Coding(system=IDENTIFIER_TYPE_SYSTEM, code=ACCESSION_TYPE)]), value=accession))
    described = _text(first, "StudyDescription") or _text(first, "SeriesDescription")
    return ImagingStudy(
        id=study_id,
        text=narrative(f"Imaging study {described or '(no description)'}: {', '.join(modalities)}, {len(series)} series, "
                       f"{len(datasets)} instances (from the DICOM headers in the PACS)."),
        status="available",
        identifier=identifiers,
        modality=[Coding(system=DICOM_DCM_SYSTEM, code=m) for m in modalities],
        subject=Reference(reference=f"Patient/{patient_id}"),
        basedOn=[Reference(reference=f"ServiceRequest/{service_request_id}")] if service_request_id else None,
        endpoint=[Reference(reference=f"Endpoint/{endpoint_id}")] if endpoint_id else None,
        description=described or None,
        started=dicom_datetime(_text(first, "StudyDate"), _text(first, "StudyTime"), _text(first, "TimezoneOffsetFromUTC")),
        numberOfSeries=len(series),
        numberOfInstances=len(datasets),
        series=series,
    )


def build_patient_from_dicom(ds: Any, *, identifier_system: str, conventions: Conventions = DEFAULT_CONVENTIONS) -> Patient:
    """A Patient from a study's DICOM patient module, identified by `identifier_system|PatientID`.

    Only for a PACS-side trigger told to create unknown patients (CDS_PACS_UNKNOWN_PATIENT=create);
    tagged (codes.PATIENT_FROM_DICOM_TAG_CODE) so the record can be found and merged by a person.
    """
    patient_id = _text(ds, "PatientID")
    if not patient_id:
        raise ValueError("the DICOM study has no PatientID")
    family, _, rest = str(getattr(ds, "PatientName", "") or "").partition("^")
    given = [part for part in rest.split("^")[:2] if part.strip()]
    name = HumanName(family=family.strip() or None, given=[g.strip() for g in given] or None) if family.strip() or given else None
    birth = _text(ds, "PatientBirthDate")
    return Patient(
        text=narrative(f"Patient created by cds-triage from the DICOM headers of a study (PatientID {patient_id}): "
                       "to be checked, and merged with the EHR's record, by a person."),
        meta=Meta(tag=[Coding.model_validate(conventions.tag(codes.PATIENT_FROM_DICOM_TAG_CODE))]),
        identifier=[Identifier(system=identifier_system, value=patient_id)],
        name=[name] if name else None,
        gender=_GENDER.get(_text(ds, "PatientSex").upper(), "unknown"),
        birthDate=date.fromisoformat(f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}") if len(birth) == 8 and birth.isdigit() else None,
    )
