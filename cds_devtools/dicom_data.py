"""DICOM test data in memory, shared by the tests, bench/ and `cds-triage demo`: `make_dataset` builds a
valid dataset from pixels and the tags a test cares about (modality, transfer syntax, spacing…),
`make_dicom` / `image_to_dicom` give Part-10 bytes from pixels or an 8-bit picture (PNG/JPEG),
`grey_to_ct` turns a picture into Hounsfield units, `encoder_available` says which compressions can
be written here."""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

__all__ = [
    "make_dataset",
    "make_dicom",
    "image_to_dicom",
    "load_grey",
    "grey_to_ct",
    "dicom_bytes",
    "encoder_available",
    "SOP_CLASSES",
    "TRANSFER_SYNTAXES",
]

SOP_CLASSES = {
    "CT": UID("1.2.840.10008.5.1.4.1.1.2"),  # CT Image Storage
    "MR": UID("1.2.840.10008.5.1.4.1.1.4"),  # MR Image Storage
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),  # Computed Radiography Image Storage
    "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),  # Digital X-Ray Image Storage - For Presentation
}

#: short names accepted by `transfer_syntax=`; pydicom encodes RLE itself, JPEG-LS needs
#: pyjpegls, JPEG 2000 needs pylibjpeg + pylibjpeg-openjpeg. JPEG baseline cannot be encoded.
TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}


def encoder_available(transfer_syntax: str) -> bool:
    """Can pydicom (with the installed plugins) compress to this transfer syntax?"""
    uid = UID(TRANSFER_SYNTAXES.get(transfer_syntax, transfer_syntax))
    if not uid.is_compressed:
        return True
    try:
        from pydicom.pixels import get_encoder

        return bool(get_encoder(uid).is_available)
    except (ValueError, NotImplementedError, ImportError):
        return False


def _ds(value: float) -> str:
    """A DS (decimal string, at most 16 characters) for value."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.9e}"[:16]
    return text


def make_dataset(
    pixels: np.ndarray,
    *,
    modality: str = "CT",
    body_part: str = "",
    series_description: str = "",
    study_description: str = "",
    patient_id: str = "CDS-TEST-0001",
    patient_name: str = "Test^Patient",
    patient_birth_date: str = "",
    patient_sex: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    accession_number: str = "",
    study_id: str = "1",
    study_datetime: datetime | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    photometric: str = "MONOCHROME2",
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
    window_center: float | None = None,
    window_width: float | None = None,
    pixel_spacing: tuple[float, float] = (0.5, 0.5),
    slice_thickness: float | None = 5.0,
    slice_location: float | None = None,
    bits_stored: int | None = None,
    manufacturer: str = "cds-triage devservers",
    institution: str = "",
    referring_physician: str = "",
    transfer_syntax: str = "explicit",
    extra: Mapping[str, Any] | None = None,
) -> Dataset:
    """A single-frame greyscale DICOM image (Part-10 ready, with file meta) from stored pixels.

    `pixels` are the *stored* values (2-D uint8, uint16 or int16); for CT pass
    `rescale_slope`/`rescale_intercept` (defaults 1 / -1024). UIDs are generated when missing.
    `transfer_syntax` is one of TRANSFER_SYNTAXES ("explicit", "rle", "jpegls", "jpeg2000")
    or a UID; compressed ones are encoded losslessly by pydicom. `extra` sets any further
    attributes by keyword, e.g. `{"ViewPosition": "PA"}`.
    """
    modality = modality.upper()
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality {modality!r} not supported; expected one of {sorted(SOP_CLASSES)}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"pixels must be a 2-D greyscale array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        bits_allocated, signed = 8, False
    elif arr.dtype in (np.uint16, np.int16):
        bits_allocated, signed = 16, arr.dtype == np.int16
    else:
        raise ValueError(f"pixels dtype must be uint8, uint16 or int16, got {arr.dtype}")
    if bits_stored is None:
        bits_stored = bits_allocated
        if bits_allocated == 16 and not signed and arr.size and int(arr.max()) < 4096:
            bits_stored = 12  # the usual for CT/MR/CR; keeps JPEG-LS/J2K happy
    arr = np.ascontiguousarray(arr)

    when = study_datetime or datetime.now()
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    sop_instance_uid = sop_instance_uid or generate_uid()
    sop_class = SOP_CLASSES[modality]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CDS_TRIAGE_DEV"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if modality == "CT" else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    if institution:
        ds.InstitutionName = institution
    ds.ReferringPhysicianName = referring_physician
    if study_description:
        ds.StudyDescription = study_description
    if series_description:
        ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex
    if body_part:
        ds.BodyPartExamined = body_part.upper()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study_id
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    if modality in ("CT", "MR"):
        ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid(entropy_srcs=[study_uid, "frame"])
        ds.PositionReferenceIndicator = ""
        z = float(slice_location if slice_location is not None else (instance_number - 1) * (slice_thickness or 5.0))
        ds.ImagePositionPatient = [_ds(-pixel_spacing[1] * arr.shape[1] / 2), _ds(-pixel_spacing[0] * arr.shape[0] / 2), _ds(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _ds(z)
        if slice_thickness is not None:
            ds.SliceThickness = _ds(slice_thickness)
    else:
        ds.PatientOrientation = ""
    if modality == "CT":
        ds.KVP = ""
        ds.AcquisitionNumber = 1
    if modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if modality == "CT" or rescale_slope is not None or rescale_intercept is not None:
        ds.RescaleIntercept = _ds(-1024.0 if rescale_intercept is None else rescale_intercept)
        ds.RescaleSlope = _ds(1.0 if rescale_slope is None else rescale_slope)
        ds.RescaleType = "HU" if modality == "CT" else "US"
    if window_center is not None and window_width is not None:
        ds.WindowCenter = _ds(window_center)
        ds.WindowWidth = _ds(window_width)
    ds.PixelData = arr.tobytes()
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)

    ts = UID(TRANSFER_SYNTAXES.get(transfer_syntax, transfer_syntax))
    if ts.is_compressed:
        if not encoder_available(ts):
            raise RuntimeError(f"pydicom cannot encode {ts.name} here: a plugin is missing")
        ds.compress(ts, arr, generate_instance_uid=False)
    elif ts != ExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ts  # e.g. Implicit VR Little Endian; dcmwrite follows it
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part-10 file (preamble, DICM, file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_dicom(pixels: np.ndarray, **kwargs: Any) -> bytes:
    """`make_dataset(pixels, **kwargs)` as Part-10 bytes (see make_dataset for the options)."""
    return dicom_bytes(make_dataset(pixels, **kwargs))


def load_grey(source: str | Path | bytes | np.ndarray | Any) -> np.ndarray:
    """A picture (PNG/JPEG path or bytes, PIL image, or array) as a 2-D uint8 grey image.
    RGB/RGBA go through PIL's luminance conversion ("L"), as training does."""
    from PIL import Image

    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 3:
            arr = np.asarray(Image.fromarray(arr.astype(np.uint8)).convert("L"))
        if arr.dtype != np.uint8:
            if arr.min() < 0 or arr.max() > 255:
                raise ValueError("array values must be in 0..255 for an 8-bit grey image")
            arr = np.rint(arr).astype(np.uint8)
        return arr
    if isinstance(source, (bytes, bytearray)):
        img = Image.open(io.BytesIO(source))
    elif isinstance(source, (str, Path)):
        img = Image.open(source)
    else:
        img = source  # a PIL image
    return np.asarray(img.convert("L"), dtype=np.uint8)


def grey_to_ct(
    grey: np.ndarray, window: tuple[float, float] = (40.0, 80.0), *, exact: bool = False
) -> tuple[np.ndarray, float, float]:
    """8-bit windowed grey levels back to CT stored values: returns (stored uint16, slope, intercept).

    HU = grey / 255 * width + (center - width / 2); for the brain window 40/80 that is
    HU = grey / 255 * 80. Default: integer HU stored as HU + 1024 with slope 1 / intercept -1024
    (what real scanners write); windowing at the same window then gives the grey image back
    to within 0.5 HU = 0.5 * 255 / width grey levels (1.6 levels for width 80).
    `exact=True` uses slope width/255 instead, so windowing gives the grey levels back exactly
    (unusual for CT but valid DICOM).
    """
    center, width = window
    lo = center - width / 2.0
    g = np.asarray(grey, dtype=np.float64)
    if exact:
        slope = width / 255.0
        offset = int(round((lo + 1024.0) / slope))  # stored value of grey level 0
        intercept = lo - offset * slope
        slope, intercept = float(_ds(slope)), float(_ds(intercept))
        stored = np.rint(g + offset)
    else:
        slope, intercept = 1.0, -1024.0
        stored = np.rint(g / 255.0 * width + lo) + 1024.0
    if stored.min() < 0 or stored.max() > 4095:
        raise ValueError("window maps outside the 12-bit stored range; choose another window")
    return stored.astype(np.uint16), slope, intercept


def image_to_dicom(
    image: str | Path | bytes | np.ndarray | Any,
    *,
    modality: str = "CT",
    window: tuple[float, float] = (40.0, 80.0),
    exact_hu: bool = False,
    **kwargs: Any,
) -> bytes:
    """An 8-bit picture (PNG/JPEG path/bytes, PIL image or uint8 array) as a DICOM file.

    CT: the picture is taken as windowed at `window` (default brain 40/80) and turned back into
    Hounsfield units (see grey_to_ct), with WindowCenter/WindowWidth set to that window.
    MR/CR/DX: the grey levels are stored as they are (8-bit). Other options go to make_dataset.
    """
    grey = load_grey(image)
    if modality.upper() == "CT":
        stored, slope, intercept = grey_to_ct(grey, window, exact=exact_hu)
        kwargs.setdefault("window_center", window[0])
        kwargs.setdefault("window_width", window[1])
        return make_dicom(stored, modality="CT", rescale_slope=slope, rescale_intercept=intercept, **kwargs)
    return make_dicom(grey, modality=modality, **kwargs)
