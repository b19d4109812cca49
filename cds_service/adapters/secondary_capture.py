"""The Grad-CAM overlay back into the PACS: a DICOM Secondary Capture in the same study.

Radiologists read in the PACS viewer, not in our web page, so the heatmap goes where they
look: a new series ("AI-generated Grad-CAM …") in the *same* study (same Study Instance UID,
patient and study attributes copied from the slice the heatmap explains), stored with
STOW-RS. The object is built with `highdicom` (SCImage), which checks the IOD as it builds.

How FHIR points to it: our own Media (the same overlay as a PNG) gets an `identifier` with
system `urn:dicom:uid` holding the Secondary Capture's SOP Instance UID, which is how FHIR R4
says "this Media is that DICOM instance" (Media.identifier). The EHR's ImagingStudy is left
alone: it belongs to the EHR / PACS bridge, and changing it would fire the ImagingStudy
Subscription again; a bridge that re-reads the PACS will list the new series by itself.

The series is never triaged itself: routing skips series described "AI-generated"
(cds_service/core/routing.py). UIDs are derived from (study, task, model version), so a re-run
of the same job stores the same instance again instead of a second copy.

`heatmap_to_pacs` is the pipeline step; it never raises: a PACS that refuses the object must
not undo a triage already written to FHIR, so failures are logged and returned for the job record.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pydicom
from highdicom.sc import SCImage
from PIL import Image
from pydicom.uid import generate_uid

from fhir_mappings import codes

from cds_service.core.domain import DISCLAIMER, Heatmap, TriageResult
from cds_service.adapters.fhir_client import FhirClient
from cds_service.adapters.pacs import Pacs

log = logging.getLogger(__name__)

#: Starts every series description we write; routing.EXCLUDED_WORDS matches it (upper-cased).
AI_SERIES_PREFIX = "AI-generated"
SERIES_NUMBER = 9901  # high, so the AI series sorts after the acquired ones in most viewers
MANUFACTURER = "cds-triage"


@dataclass(frozen=True)
class StoredInstance:
    """Where an object we stored lives in the PACS (the Secondary Capture, the Structured Report)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str

    def to_json(self) -> dict[str, str]:
        return {"studyUid": self.study_uid, "seriesUid": self.series_uid, "sopInstanceUid": self.sop_instance_uid}

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> "StoredInstance | None":
        """The object a job record says was stored (`heatmap_to_pacs`'s answer), else None."""
        if not record or not record.get("stored"):
            return None
        return cls(str(record["studyUid"]), str(record["seriesUid"]), str(record["sopInstanceUid"]))

    def identifier(self, what: str) -> dict[str, Any]:
        """A FHIR identifier naming this instance (system urn:dicom:uid, value urn:oid:<uid>); `what` it is."""
        return {"use": "secondary", "type": {"text": f"DICOM SOP Instance UID of {what} in the PACS"},
                "system": codes.DICOM_UID_SYSTEM, "value": f"{codes.URN_OID_PREFIX}{self.sop_instance_uid}"}

    def named_by(self, resource: Mapping[str, Any]) -> bool:
        """Whether a FHIR resource already names this instance among its identifiers."""
        value = f"{codes.URN_OID_PREFIX}{self.sop_instance_uid}"
        return any(i.get("system") == codes.DICOM_UID_SYSTEM and i.get("value") == value
                   for i in resource.get("identifier") or [])


StoredCapture = StoredInstance  # the Secondary Capture's


def derived_uids(study_uid: str, task: str, model_version: str, kind: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the object `kind` we derive from a triage: the same for every
    run of the same triage, so a re-run stores the same instance again instead of a second copy."""
    parts = [study_uid, task, model_version, kind]
    return generate_uid(entropy_srcs=[*parts, "series"]), generate_uid(entropy_srcs=[*parts, "instance"])


def capture_uids(study_uid: str, task: str, model_version: str) -> tuple[str, str]:
    """The Secondary Capture's (Series Instance UID, SOP Instance UID)."""
    return derived_uids(study_uid, task, model_version, "grad-cam-secondary-capture")


_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x / +y, -y / +z, -z in LPS


def _direction_letter(cosines: Sequence[float]) -> str:
    axis = int(np.argmax(np.abs(cosines)))
    return _AXIS_LETTERS[axis][0 if cosines[axis] > 0 else 1]


def patient_orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    """Row and column directions of the source image (e.g. ("L", "P") for an axial slice).

    From Image Orientation (Patient) for CT/MR, else Patient Orientation as the modality wrote
    it (CR/DX); None when the source does not say.
    """
    iop = getattr(source, "ImageOrientationPatient", None)
    if iop is not None and len(iop) == 6:
        values = [float(v) for v in iop]
        return _direction_letter(values[:3]), _direction_letter(values[3:])
    given = getattr(source, "PatientOrientation", None)
    if given is not None and not isinstance(given, str) and len(given) == 2 and all(given):
        return str(given[0])[:1], str(given[1])[:1]
    return None


def _overlay_pixels(heatmap: Heatmap) -> np.ndarray:
    with Image.open(io.BytesIO(heatmap.png)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def build_heatmap_capture(source: pydicom.Dataset, heatmap: Heatmap, *, task: str, model_name: str,
                          model_version: str) -> pydicom.Dataset:
    """The overlay as an RGB Secondary Capture in the source's study, copying its patient/study tags.

    `source` is the slice the heatmap explains (headers are enough). Pure: no I/O.
    """
    pixels = _overlay_pixels(heatmap)
    series_uid, sop_uid = capture_uids(str(source.StudyInstanceUID), task, model_version)
    orientation = patient_orientation(source)
    spacing = None
    if "PixelSpacing" in source and len(source.PixelSpacing) == 2:
        # The overlay is the whole image resized to a square: scale the spacing with it.
        rows, columns = int(source.Rows), int(source.Columns)
        spacing = (float(source.PixelSpacing[0]) * rows / pixels.shape[0],
                   float(source.PixelSpacing[1]) * columns / pixels.shape[1])
    label_text = f"Grad-CAM {heatmap.label}"
    capture = SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=orientation or ("L", "P"),  # placeholder, emptied below when unknown
        pixel_spacing=spacing,
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        series_description=f"{AI_SERIES_PREFIX} {label_text}"[:64],
        manufacturer_model_name=model_name[:64],
        software_versions=model_version[:64],
    )
    if orientation is None:
        capture["PatientOrientation"].value = ""  # Type 2C: present, empty when the source does not say
    for keyword in ("StudyDescription", "IssuerOfPatientID", "BodyPartExamined", "Laterality"):
        if keyword in source:
            setattr(capture, keyword, getattr(source, keyword))
    if "Laterality" not in capture and "BodyPartExamined" not in capture:
        capture.Laterality = ""  # Type 2C (General Series): empty = unknown, since no body part says otherwise
    capture.BurnedInAnnotation = "NO"
    capture.ImageComments = (
        f"{DISCLAIMER} Grad-CAM explanation of the AI finding '{heatmap.label}' "
        f"({model_name} {model_version}); not for primary diagnosis."
    )[:10240]
    capture.DerivationDescription = f"Grad-CAM saliency overlay for '{heatmap.label}' by {model_name} {model_version}"[:1024]
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    capture.SourceImageSequence = [reference]
    return capture


def store_capture(pacs: Pacs, capture: pydicom.Dataset) -> StoredCapture:
    """STOW-RS one instance; UpstreamError / UpstreamRejectedError when the PACS says no."""
    pacs.store(capture)
    return StoredCapture(str(capture.StudyInstanceUID), str(capture.SeriesInstanceUID), str(capture.SOPInstanceUID))


def capture_identifier(stored: StoredCapture) -> dict[str, Any]:
    """Media.identifier for the DICOM instance (system urn:dicom:uid, value urn:oid:<uid>)."""
    return stored.identifier("the AI-generated Secondary Capture")


def with_capture_reference(media: dict[str, Any], stored: StoredCapture) -> dict[str, Any] | None:
    """A copy of our Media that names the Secondary Capture; None when it already does."""
    if stored.named_by(media):
        return None
    note = (f"Also stored in the PACS as a DICOM Secondary Capture: study {stored.study_uid}, "
            f"series {stored.series_uid}, instance {stored.sop_instance_uid}. {DISCLAIMER}")
    return media | {"identifier": [*(media.get("identifier") or []), capture_identifier(stored)],
                    "note": [*(media.get("note") or []), {"text": note}]}


def source_slice(datasets: Sequence[pydicom.Dataset], heatmap: Heatmap) -> pydicom.Dataset:
    """The slice the heatmap was computed on: by SOP Instance UID, else by its index."""
    for ds in datasets:
        if heatmap.sop_instance_uid and str(getattr(ds, "SOPInstanceUID", "")) == heatmap.sop_instance_uid:
            return ds
    return datasets[min(heatmap.slice_index, len(datasets) - 1)]


def heatmap_to_pacs(pacs: Pacs, fhir: FhirClient, datasets: Sequence[pydicom.Dataset], result: TriageResult,
                    media_references: Sequence[str]) -> dict[str, Any]:
    """Pipeline step 8: build, store and reference the Secondary Capture. Never raises.

    Returns what the job record keeps: `{"stored": true, "studyUid", "seriesUid",
    "sopInstanceUid", "media"}`, or `{"stored": false, "error": "..."}`.
    """
    if result.heatmap is None or result.model is None or result.task is None or not datasets:
        return {"stored": False, "error": "no heatmap to store"}
    try:
        capture = build_heatmap_capture(source_slice(datasets, result.heatmap), result.heatmap,
                                        task=result.task.value, model_name=result.model.name,
                                        model_version=result.model.version)
        stored = store_capture(pacs, capture)
    except Exception as exc:  # noqa: BLE001 - an optional copy must never fail a triage already in FHIR
        log.warning("heatmap not stored in the PACS: %s", exc)
        return {"stored": False, "error": f"{type(exc).__name__}: {exc}"}
    record: dict[str, Any] = {"stored": True, **stored.to_json()}
    if media_references:
        try:
            fhir.amend("Media", media_references[0].split("/")[-1], lambda media: with_capture_reference(media, stored))
            record["media"] = media_references[0]
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("Secondary Capture stored but Media not updated: %s", exc)
            record["error"] = f"Media not updated: {exc}"
    return record
