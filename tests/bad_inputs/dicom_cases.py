"""Malformed DICOM objects, made at test time from one valid CT slice (each a few KB at most).

Each function returns Part-10 bytes. `stored_by_orthanc` in the corpus table says whether the
PACS accepts the object (then our worker must fail the job clearly) or refuses it at upload
(then the PACS is the gate, and `cds-triage triage` on the file must still fail clearly).
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

from cds_devtools.dicom_data import dicom_bytes, make_dataset

MPEG2_MAIN_PROFILE = "1.2.840.10008.1.2.4.100"  # video: no image decoder here


def valid_slice(study_uid: str | None = None, size: int = 64, **kwargs: object) -> Dataset:
    pixels = (np.random.default_rng(7).normal(35, 10, (size, size)) + 1024).astype(np.uint16)
    return make_dataset(pixels, modality="CT", body_part="HEAD", series_description="CT HEAD WO",
                        study_uid=study_uid or pydicom.uid.generate_uid(), rescale_slope=1, rescale_intercept=-1024,
                        **kwargs)  # type: ignore[arg-type]


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- files no PACS should store (the CLI must still say what is wrong) ----------------------------

def zero_bytes() -> bytes:
    return b""


def truncated_file() -> bytes:
    data = dicom_bytes(valid_slice())
    return data[: len(data) // 3]  # cut inside the header-to-pixel data


def preamble_only() -> bytes:
    return b"\0" * 128 + b"DICM"


def png_named_dcm() -> bytes:
    return bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
                         "0000000a49444154789c6360000000020001e221bc330000000049454e44ae426082")


def random_bytes() -> bytes:
    return np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()


# --- objects a PACS may well store (the worker must fail the job clearly) -------------------------

def huge_dimensions(study_uid: str) -> bytes:
    ds = valid_slice(study_uid)
    ds.Rows = ds.Columns = 65535  # 8 GB if decoded; the pixel data is still 64 x 64
    return _bytes(ds)


def pixel_data_short(study_uid: str) -> bytes:
    ds = valid_slice(study_uid)
    ds.PixelData = ds.PixelData[:100]
    return _bytes(ds)


def tiny_image(study_uid: str) -> bytes:
    return _bytes(valid_slice(study_uid, size=4))


def unsupported_transfer_syntax(study_uid: str) -> bytes:
    ds = valid_slice(study_uid)
    ds.file_meta.TransferSyntaxUID = MPEG2_MAIN_PROFILE
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    return _bytes(ds)


def wrong_vr_rows(study_uid: str) -> bytes:
    """Rows (US) written as a text element: the header is not what the image needs."""
    ds = valid_slice(study_uid)
    del ds.Rows
    ds.add_new(0x00280010, "LO", "sixty-four")
    return _bytes(ds)


def bits_allocated_12(study_uid: str) -> bytes:
    ds = valid_slice(study_uid)
    ds.BitsAllocated = 12
    return _bytes(ds)


def bad_rescale_slope(study_uid: str) -> bytes:
    """Rescale Slope (DS, a decimal string) holding letters: pydicom will not write it, so patch the bytes."""
    ds = valid_slice(study_uid)
    ds.RescaleSlope = "9.876543"
    data = _bytes(ds)
    assert data.count(b"9.876543") == 1
    return data.replace(b"9.876543", b"slope!!!")


def frames_missing(study_uid: str) -> bytes:
    ds = valid_slice(study_uid)
    ds.NumberOfFrames = 40  # data for one frame only
    return _bytes(ds)


def colour_header_on_grey_pixels(study_uid: str) -> bytes:
    ds = valid_slice(study_uid)
    ds.PhotometricInterpretation = "RGB"
    ds.SamplesPerPixel = 3  # the pixel data holds one sample per pixel
    ds.PlanarConfiguration = 0
    return _bytes(ds)


def many_slices(study_uid: str, count: int) -> list[bytes]:
    """`count` valid slices of one series (for the instance limit)."""
    series_uid = pydicom.uid.generate_uid()
    return [_bytes(valid_slice(study_uid, series_uid=series_uid, instance_number=i + 1)) for i in range(count)]
