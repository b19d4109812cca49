"""Decompression bombs: a compressed frame larger than its DICOM header says is refused before
any decoder allocates it (the attack run's 4 kB JPEG-LS file with a 64 x 64 header over a
16000 x 16000 frame took a worker from 240 MB to 1.8 GB)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from cds_devtools.dicom_data import dicom_bytes, encoder_available, make_dataset
from cds_service.core.errors import BadDicomError
from cds_service.core.preprocessing import MAX_DECODED_PIXELS, codestream_size, dicom_pixels, read_dicom


def encoded(transfer_syntax: str, size: int = 256) -> pydicom.Dataset:
    if not encoder_available(transfer_syntax):
        pytest.skip(f"no {transfer_syntax} encoder installed")
    pixels = (np.arange(size * size).reshape(size, size) % 4000).astype(np.uint16)
    return read_dicom(dicom_bytes(make_dataset(pixels, modality="CT", transfer_syntax=transfer_syntax, bits_stored=12)))


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch):
    """Fails the test if anything asks pydicom to decode pixels."""
    def refuse(self):
        raise AssertionError("the decoder ran")
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(refuse))


@pytest.mark.parametrize("transfer_syntax", ["jpegls", "jpeg2000"])
def test_the_codestream_tells_its_real_size(transfer_syntax: str) -> None:
    ds = encoded(transfer_syntax)
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    assert codestream_size(frame) == (256, 256)


@pytest.mark.parametrize("transfer_syntax", ["jpegls", "jpeg2000", "rle"])
def test_a_frame_larger_than_its_header_is_refused_before_decoding(transfer_syntax: str, no_decoding) -> None:
    ds = encoded(transfer_syntax)
    ds.Rows = ds.Columns = 64  # the header lies: the frame inside is 256 x 256
    if transfer_syntax == "rle":
        ds.BitsAllocated = 8  # RLE carries no size, but its segment count must fit the header's bytes per pixel
    with pytest.raises(BadDicomError, match="header"):
        dicom_pixels(ds)


def test_an_honest_frame_still_decodes() -> None:
    for transfer_syntax in ("jpegls", "jpeg2000", "rle"):
        assert dicom_pixels(encoded(transfer_syntax, 128)).shape == (128, 128)


def test_an_absurd_header_size_is_refused_before_decoding(no_decoding) -> None:
    ds = encoded("rle", 64)
    ds.Rows, ds.Columns = 65535, 65535
    assert 65535 * 65535 > MAX_DECODED_PIXELS
    with pytest.raises(BadDicomError, match="limit"):
        dicom_pixels(ds)


def test_a_forged_jpeg_header_is_read_without_decoding() -> None:
    """A hand-made JPEG-LS header (SOI, SOF55 16000 x 16000) is all the check needs to see."""
    sof55 = b"\xff\xf7" + (11).to_bytes(2, "big") + bytes([16]) + (16000).to_bytes(2, "big") + (16000).to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    assert codestream_size(b"\xff\xd8" + sof55 + b"\xff\xda") == (16000, 16000)
    assert codestream_size(b"not a codestream") is None
