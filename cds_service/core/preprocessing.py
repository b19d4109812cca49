# Over 400 lines on purpose: the one pixel path (DICOM reading, windowing, resizing) that inference, training and the CLI share.
"""Pixels to model input: one code path shared by inference, training and the CLI.

Every function is pure (arrays in, arrays out). How to preprocess is never a constant
here: it comes from the model card's `preprocessing` block (`PreprocessingSpec`), so a
retrained model with another window or size needs no code change.

Spec kinds:
- `ct_windows`: Hounsfield units (Rescale Slope/Intercept applied), one window per
  channel, e.g. brain 40/80, subdural 80/200, bone 600/2800. With `own_window` (one window on
  all channels only), a DICOM's own first Window Center/Width is used instead when it lies
  within the card's ranges: the training PNGs were each made with their file's own window.
- `mr_robust`: percentile normalisation, since MR intensities have no absolute scale.
- `xray`: modality LUT, VOI LUT or window, MONOCHROME1 inverted, then percentiles.

`framing` (ct_windows): `body` crops every windowed image to a square around the body (the
largest bright region: the head, without the table and head holder) before it is resized, so
a head fills the model input whatever the field of view, the table and the framing of the
hospital that made the image (the RSNA DICOMs show the head at 50-70 % of a 512 px field,
other hospitals' exports crop it tight); `none` resizes the whole image.

An 8-bit PNG/JPEG (the training images) is taken as already windowed: its grey levels map
to [0, 1] directly for `ct_windows`, and go through the same percentile step otherwise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
import pydicom.encaps
import pydicom.multival
import pydicom.uid
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

from cds_service.core import codecs
from cds_service.core.errors import BadDicomError

SPEC_KINDS = ("ct_windows", "mr_robust", "xray")


class Framing(StrEnum):
    """How a windowed CT image is framed before it is resized (the card's `preprocessing.framing`)."""

    NONE = "none"  # the whole image
    BODY = "body"  # a square around the body (`body_box`)


@dataclass(frozen=True)
class PreprocessingSpec:
    """The card's `preprocessing` block, validated."""

    kind: str
    input_size: int
    windows: tuple[tuple[float, float], ...] = ()
    percentiles: tuple[float, float] = (0.5, 99.5)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    # ((center lo, hi), (width lo, hi)) in HU: a DICOM's own window inside both ranges replaces `windows`
    own_window: tuple[tuple[float, float], tuple[float, float]] | None = None
    framing: Framing = Framing.NONE

    def __post_init__(self) -> None:
        object.__setattr__(self, "framing", Framing(self.framing))  # a card's string, coerced (ValueError names it)
        if self.framing is not Framing.NONE and self.kind != "ct_windows":
            raise ValueError(f"framing {self.framing.value!r} is for ct_windows only")
        if self.kind not in SPEC_KINDS:
            raise ValueError(f"unknown preprocessing kind {self.kind!r}; expected one of {SPEC_KINDS}")
        if self.kind == "ct_windows" and len(self.windows) != 3:
            raise ValueError("ct_windows needs exactly three (center, width) windows, one per channel")
        if any(w <= 0 for _, w in self.windows):
            raise ValueError("window widths must be positive")
        if not 16 <= self.input_size <= 1024:
            raise ValueError(f"input_size {self.input_size} is out of range")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles {self.percentiles} must satisfy 0 <= lo < hi <= 100")
        if self.own_window is not None:
            if self.kind != "ct_windows" or len(set(self.windows)) != 1:
                raise ValueError("own_window needs ct_windows with one window on all three channels")
            (c_lo, c_hi), (w_lo, w_hi) = self.own_window
            if not (c_lo <= c_hi and 0 < w_lo <= w_hi):
                raise ValueError(f"own_window ranges {self.own_window} must be (lo <= hi), widths positive")

    @classmethod
    def from_card(cls, block: dict[str, Any], input_size: int) -> "PreprocessingSpec":
        return cls(
            kind=block["kind"],
            input_size=int(input_size),
            windows=tuple((float(c), float(w)) for c, w in block.get("windows", ())),
            percentiles=tuple(block.get("percentiles", (0.5, 99.5))),  # type: ignore[arg-type]
            mean=tuple(block.get("mean", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
            std=tuple(block.get("std", (0.25, 0.25, 0.25))),  # type: ignore[arg-type]
            own_window=_own_window(block.get("own_window")),
            framing=Framing(block.get("framing", Framing.NONE.value)),
        )

    def to_card(self) -> dict[str, Any]:
        block: dict[str, Any] = {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}
        if self.kind == "ct_windows":
            block["windows"] = [list(w) for w in self.windows]
            if self.own_window is not None:
                block["own_window"] = {"center": list(self.own_window[0]), "width": list(self.own_window[1])}
            if self.framing is not Framing.NONE:
                block["framing"] = self.framing.value
        else:
            block["percentiles"] = list(self.percentiles)
        return block


def _own_window(block: dict[str, Any] | None) -> tuple[tuple[float, float], tuple[float, float]] | None:
    if not block:
        return None
    (c_lo, c_hi), (w_lo, w_hi) = block["center"], block["width"]
    return ((float(c_lo), float(c_hi)), (float(w_lo), float(w_hi)))


# --- intensity steps -----------------------------------------------------------------


def window(values: np.ndarray, center: float, width: float, out: np.ndarray | None = None) -> np.ndarray:
    """Linear window to [0, 1]: center-width/2 maps to 0, center+width/2 to 1. With `out` (float32,
    e.g. `values` itself when the caller owns it) no new array is made: the same arithmetic, in place."""
    lo = center - width / 2.0
    out = np.subtract(values, np.float32(lo), out=out, dtype=np.float32)  # one new array (or `out`), then in place
    out /= np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def robust_normalise(values: np.ndarray, percentiles: tuple[float, float], in_place: bool = False) -> np.ndarray:
    """Scale so the lo/hi percentiles map to 0/1; a flat image becomes all zeros. `in_place`: `values`
    (float32, the caller's own) is changed and returned instead of a copy."""
    out = values if in_place and values.dtype == np.float32 else np.array(values, dtype=np.float32)  # our own
    lo, hi = np.percentile(out, percentiles)  # copy, then changed in place (a 2,048² X-ray: 4 float64 temporaries fewer)
    if hi - lo < 1e-6:
        return np.zeros_like(out)
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def _three_channels(grey: np.ndarray) -> np.ndarray:
    """A read-only HxWx3 view that repeats one channel: a third of the memory of a copy, and
    `resize` sees (stride 0) that one resize serves all three channels."""
    grey = np.ascontiguousarray(grey, dtype=np.float32)
    return np.broadcast_to(grey[..., None], grey.shape + (3,))


# --- framing -------------------------------------------------------------------------

FRAME_LEVEL = 0.1  # of a windowed image: brain, skin and bone are above (brain window: >= 8 HU); air and fat below
FRAME_MARGIN = 0.04  # added on each side, as a share of the body's larger side
FRAME_MIN_SIDE = 0.5  # of the image's larger side: a vertex or skull-base slice is magnified at most twice
FRAME_WORKING_SIDE = 128  # the mask is found on the image subsampled to about this many pixels a side


def body_box(plane: np.ndarray) -> tuple[int, int, int] | None:
    """(top, left, side) of a square around the largest bright region of a windowed plane (HxW in
    [0, 1]), centred on it; it may reach past the image (padded with black). None when no region
    covers 1 % of the image: such an image is left as it is.

    The mask is opened first, so thin bright lines (a head holder, the table, burnt-in letters
    far from the head) neither join the body nor become it."""
    import cv2

    rows, cols = plane.shape[:2]
    step = max(1, max(rows, cols) // FRAME_WORKING_SIDE)
    mask = np.ascontiguousarray(plane[::step, ::step] > FRAME_LEVEL, dtype=np.uint8)
    small = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    count, _, stats, _ = cv2.connectedComponentsWithStats(small, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < 0.01 * small.size:
        return None
    left, top, width, height = (int(v) * step for v in stats[largest, :4])
    side = int(round(max(width, height) * (1 + 2 * FRAME_MARGIN)))
    side = max(side, int(round(FRAME_MIN_SIDE * max(rows, cols))), 1)
    return (int(round(top + height / 2 - side / 2)), int(round(left + width / 2 - side / 2)), side)


def framed(image: np.ndarray, framing: Framing) -> np.ndarray:
    """`image` (HxW or HxWx3, windowed to [0, 1]) cropped to its `body_box` with `Framing.BODY`, the
    parts of the square outside the image black; unchanged with `Framing.NONE` or when no body is found.
    A three-channel image is framed by its first channel (the brain window), all channels alike."""
    if framing is Framing.NONE:
        return image
    if image.ndim == 3 and image.strides[2] == 0:  # one plane repeated (_three_channels): frame it once
        return _three_channels(framed(np.ascontiguousarray(image[..., 0]), framing))
    return cropped(image, body_box(image if image.ndim == 2 else image[..., 0]))


def cropped(image: np.ndarray, box: tuple[int, int, int] | None) -> np.ndarray:
    """`image` cut to the square `box` (top, left, side), black where the square reaches past it; as it is for None."""
    if box is None:
        return image
    top, left, side = box
    rows, cols = image.shape[:2]
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, rows), min(left + side, cols)
    out = np.zeros((side, side) + image.shape[2:], dtype=np.float32)
    out[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return out


# --- DICOM ---------------------------------------------------------------------------


def read_dicom(source: bytes | str | Path | pydicom.Dataset) -> pydicom.Dataset:
    """Parse a DICOM file (path or bytes); BadDicomError for anything that is not one."""
    if isinstance(source, pydicom.Dataset):
        return source
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise BadDicomError("empty DICOM file (0 bytes)")
            ds = pydicom.dcmread(io.BytesIO(source))
        else:
            ds = pydicom.dcmread(str(source))
    except BadDicomError:
        raise
    except Exception as exc:  # pydicom raises many types for broken files
        raise BadDicomError(f"not a readable DICOM file: {exc}") from exc
    if len(ds) == 0:  # a preamble and "DICM" with nothing after them
        raise BadDicomError("not a readable DICOM file: no data elements after the header")
    return ds


# The most pixels one instance may decode to (rows x columns x frames x samples): 16 k x 16 k.
# Beyond it a decoder's allocation alone could take a worker's memory.
MAX_DECODED_PIXELS = 16384 * 16384
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # 0xF7: JPEG-LS


def codestream_size(codestream: bytes) -> tuple[int, int] | None:
    """(rows, columns) that a JPEG, JPEG-LS or JPEG 2000 codestream says it holds; None if it says none.

    Read from the headers before any decoder runs (a JPEG's SOF or JPEG-LS's SOF55 segment,
    JPEG 2000's SIZ marker), so a frame larger than its DICOM header claims is refused unopened.
    """
    if codestream[:2] == b"\xff\xd8":  # JPEG / JPEG-LS: walk the marker segments up to the frame header
        at = 2
        while at + 4 <= len(codestream):
            if codestream[at] != 0xFF:
                return None
            marker = codestream[at + 1]
            if marker == 0xFF:  # fill byte
                at += 1
                continue
            length = int.from_bytes(codestream[at + 2 : at + 4], "big")
            if marker in _SOF_MARKERS and at + 9 <= len(codestream):
                return int.from_bytes(codestream[at + 5 : at + 7], "big"), int.from_bytes(codestream[at + 7 : at + 9], "big")
            if marker == 0xDA:  # start of scan before a frame header: none
                return None
            at += 2 + length
        return None
    siz = codestream.find(b"\xff\x4f\xff\x51")  # JPEG 2000 (bare, or inside a JP2 box): SOC then SIZ
    if siz >= 0 and siz + 24 <= len(codestream):
        x, y, x0, y0 = (int.from_bytes(codestream[siz + 8 + 4 * k : siz + 12 + 4 * k], "big") for k in range(4))
        return y - y0, x - x0
    return None


def check_pixel_size(ds: pydicom.Dataset) -> None:
    """Refuse, before decoding, an instance whose decoded size is absurd or whose compressed frame
    is not the size its header says (a decompression bomb: a 64 x 64 header over a 16000 x 16000 frame)."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        pixels = rows * columns * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise BadDicomError(f"cannot decode pixel data: unreadable image size in the DICOM header ({exc})") from exc
    if pixels > MAX_DECODED_PIXELS:
        raise BadDicomError(f"image of {pixels} pixels is above the limit of {MAX_DECODED_PIXELS} per instance")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        encapsulated = ts is not None and ts.is_encapsulated
    except ValueError:  # not a transfer syntax UID at all: the decoder says so with the UID in its message
        return
    if not encapsulated:
        return
    try:
        first = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    except Exception as exc:
        raise BadDicomError(f"encapsulated pixel data without a readable first frame: {exc}") from exc
    if ts == pydicom.uid.RLELossless:
        segments = int.from_bytes(first[:4], "little") if len(first) >= 64 else -1
        expected = int(ds.get("SamplesPerPixel", 1) or 1) * max(1, int(ds.get("BitsAllocated", 8) or 8) // 8)
        if segments != expected:
            raise BadDicomError(f"RLE frame has {segments} segments where the header implies {expected}")
        return
    size = codestream_size(first)
    if size is not None and size != (rows, columns):
        raise BadDicomError(f"compressed frame is {size[0]} x {size[1]} but the DICOM header says {rows} x {columns}")


# Where several decoders are installed, the ones used first for a transfer syntax, best first.
# imagecodecs' CharLS (`core.codecs`) releases the GIL, so decoder threads decode JPEG-LS side by side;
# pyjpegls' CharLS holds it but still decodes about four times faster than libjpeg, pydicom's first
# choice: 6 against 37 ms of CPU for a 512 x 512 CT slice here. JPEG-LS decoding is exactly specified,
# so every decoder gives the same values (tests/test_decode_memory.py, tests/test_large_studies.py compare them).
PREFERRED_DECODERS = {pydicom.uid.JPEGLSLossless: ("imagecodecs", "pyjpegls"),
                      pydicom.uid.JPEGLSNearLossless: ("imagecodecs", "pyjpegls")}

# The largest side an image is worked on at. A larger one (a 8000 x 8000 scan) is reduced by a whole
# factor at once, in its decoded dtype (the mean of each f x f block), before any float copy is made:
# every model input (at most 1,024 px) and overlay (512 px) is far smaller, and no CT, MR or radiograph
# up to 4,096 px a side is touched, so their results are what they always were.
MAX_WORKING_SIDE = 4096


def working_factor(rows: int, columns: int) -> int:
    """The whole factor an image of this size is reduced by after decoding (1: not reduced)."""
    return max(1, -(-max(rows, columns) // MAX_WORKING_SIDE))


def reduced(pixels: np.ndarray) -> np.ndarray:
    """`pixels` (rows x columns, or x samples) with each side divided by `working_factor`: the mean of
    each block, in the same dtype (OpenCV's area interpolation at a whole factor); unchanged when small."""
    factor = working_factor(pixels.shape[0], pixels.shape[1])
    if factor == 1:
        return pixels
    rows, columns = pixels.shape[0] // factor, pixels.shape[1] // factor
    block = pixels[: rows * factor, : columns * factor]
    samples = pixels.shape[2] if pixels.ndim == 3 else 1
    if pixels.dtype in (np.uint8, np.uint16, np.int16, np.float32) and samples <= 4:
        import cv2

        return cv2.resize(np.ascontiguousarray(block), (columns, rows), interpolation=cv2.INTER_AREA)
    shape = (rows, factor, columns, factor) + pixels.shape[2:]  # other dtypes (32-bit integers): in float32
    return block.reshape(shape).mean(axis=(1, 3), dtype=np.float32)


def instance_bytes(ds: pydicom.Dataset) -> int:
    """What an instance weighs, as CDS_MAX_SERIES_BYTES counts a series: its pixel data as stored, or
    as decoded if larger. The decoded size comes from the header (Rows x Columns x frames x samples x
    bits), so a header claiming a 65535 x 65535 image is caught before any decoder allocates it.
    """
    stored = len(ds.get("PixelData") or b"")
    try:
        decoded = (int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("NumberOfFrames", 1) or 1)
                   * int(ds.get("SamplesPerPixel", 1) or 1) * max(1, int(ds.get("BitsAllocated", 8) or 8) // 8))
    except (TypeError, ValueError):
        decoded = 0  # unreadable header values: the decoder will report them
    return max(stored, decoded)


def decode_cost(ds: pydicom.Dataset) -> int:
    """The most memory decoding and preprocessing this instance takes at once, in bytes, from its header:
    its stored pixel data, and the larger of two moments: decoding its first frame (twice the frame for
    a compressed one: the decoder's own buffer and the array it is copied into), and working on the
    image at its working size (`reduced`, then three float32 copies: the values, a windowed or sorted
    copy, the resampler's).

    An 8000 x 8000 16-bit RLE instance: 275 MB (19 MB stored, 2 x 128 MB decoding), and decoding it
    grew a process by 275 MB (tests/test_large_studies.py measures it), where it grew by 909 MB before
    the image was reduced at once. Unreadable header values count as 0: the decoder reports them."""
    stored = len(ds.get("PixelData") or b"")
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        samples, bytes_per_sample = int(ds.get("SamplesPerPixel", 1) or 1), max(1, int(ds.get("BitsAllocated", 8) or 8) // 8)
    except (TypeError, ValueError):
        return stored
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        encapsulated = ts is not None and ts.is_encapsulated
    except ValueError:
        encapsulated = False
    frame = rows * columns * samples * bytes_per_sample
    factor = working_factor(rows, columns)
    working_pixels = (rows // factor) * (columns // factor)
    working = working_pixels * samples * bytes_per_sample + working_pixels * 4 * 3
    return stored + max(frame * (2 if encapsulated else 1), working)


def _decoding_plugin(ts: object) -> str:
    """The first of PREFERRED_DECODERS installed for this transfer syntax ("": pydicom chooses)."""
    preferred = PREFERRED_DECODERS.get(ts, ())  # type: ignore[call-overload]
    if not preferred:
        return ""
    codecs.register()
    try:
        available = get_decoder(ts).available_plugins  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - no decoder for this syntax at all: pydicom says so when decoding
        return ""
    return next((plugin for plugin in preferred if plugin in available), "")


def dicom_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Decoded stored pixels of a single-frame greyscale image (the first frame of a multi-frame one).

    Compressed transfer syntaxes are decoded by the imagecodecs, pyjpegls or pylibjpeg plugins pydicom finds,
    after `check_pixel_size` has compared the frame's own header with the DICOM header. Only the first
    frame is decoded, nothing is cached on `ds` (pydicom's `pixel_array` would keep the array beside the
    pixel data), and an image larger than MAX_WORKING_SIDE is reduced at once (`reduced`).
    """
    if "PixelData" not in ds:
        raise BadDicomError("DICOM object has no pixel data")
    check_pixel_size(ds)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        pixels = pixel_array(ds, index=0 if frames > 1 else None, decoding_plugin=_decoding_plugin(ts))
    except Exception as exc:
        raise BadDicomError(f"cannot decode pixel data (transfer syntax {ts or 'unknown'}): {exc}") from exc
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame stands for the image
    if pixels.ndim not in (2, 3) or min(pixels.shape[:2]) < 8:
        raise BadDicomError(f"unexpected pixel array shape {pixels.shape}")
    pixels = reduced(pixels)
    if pixels.ndim == 3:  # colour (e.g. a secondary capture): luminance
        pixels = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return pixels


def modality_values(ds: pydicom.Dataset) -> np.ndarray:
    """Stored pixels in the modality's units (Hounsfield for CT), as float32.

    Rescale Slope/Intercept are applied in float32 in place (a quarter of the time of
    pydicom's float64 path, which still handles a Modality LUT Sequence).
    """
    pixels = dicom_pixels(ds)
    try:
        if "ModalityLUTSequence" in ds:
            return apply_modality_lut(pixels, ds).astype(np.float32)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    except Exception as exc:
        raise BadDicomError(f"cannot apply modality LUT: {exc}") from exc
    return rescale_to_hu(pixels, slope, intercept)


def rescale_to_hu(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values (or a slab's mean of them) times Rescale Slope plus Intercept, as a new float32
    array: the one rescale arithmetic, so a slab of k identical slices is exactly the slice."""
    values = pixels.astype(np.float32)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def dicom_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The DICOM's own first Window Center/Width in its modality's units (HU for CT), or None when it
    has none or it cannot be read. Multi-valued windows give their first pair, as DICOM viewers and
    the usual PNG conversions of the RSNA data do."""
    def first(value: Any) -> float:
        return float(value[0]) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else float(value)

    try:
        center, width = first(ds.WindowCenter), first(ds.WindowWidth)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return (center, width) if np.isfinite(center) and np.isfinite(width) and width > 0 else None


def ct_windows_for(ds: pydicom.Dataset, spec: PreprocessingSpec) -> tuple[tuple[float, float], ...]:
    """The windows this CT image is shown to the model in: its own window when the card allows it and
    the window lies within the card's ranges (a brain window), else the card's fixed windows. A bone
    or subdural window, or none at all, falls back to the card's brain window."""
    own = dicom_window(ds) if spec.own_window is not None else None
    if own is not None and spec.own_window is not None:
        (c_lo, c_hi), (w_lo, w_hi) = spec.own_window
        if c_lo <= own[0] <= c_hi and w_lo <= own[1] <= w_hi:
            return (own, own, own)
    return spec.windows


def dicom_to_image(ds: pydicom.Dataset, spec: PreprocessingSpec) -> np.ndarray:
    """One DICOM image to an HxWx3 float32 array in [0, 1], as the card says."""
    values = modality_values(ds)  # our own float32 copy: windowed or normalised in place
    if spec.kind == "ct_windows":
        windows = ct_windows_for(ds, spec)
        if len(set(windows)) == 1:  # one window on all channels (the shipped head CT card)
            return _three_channels(framed(window(values, *windows[0], out=values), spec.framing))
        return framed(np.stack([window(values, c, w) for c, w in windows], axis=2), spec.framing)
    if spec.kind == "xray":
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            values = apply_voi_lut(values, ds).astype(np.float32)
        if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            values = values.max() - values
        return _three_channels(robust_normalise(values, spec.percentiles, in_place=True))
    return _three_channels(robust_normalise(values, spec.percentiles, in_place=True))


def dicom_to_model_input(ds: pydicom.Dataset, spec: PreprocessingSpec) -> np.ndarray:
    """`resize(dicom_to_image(ds, spec), spec.input_size)`, the same numbers, without ever holding three
    full-size channels: with one window, one plane is windowed in place and resized; with several, each
    channel is windowed and resized before the next. Returns size x size (one plane, which the model
    sees on all three channels: `as_model_input`) or size x size x 3."""
    size = spec.input_size
    if spec.kind != "ct_windows":
        return resize(dicom_to_image(ds, spec), size)[..., 0]  # one plane repeated (_three_channels)
    return ct_values_to_model_input(modality_values(ds), ct_windows_for(ds, spec), size, spec.framing)


def ct_values_to_model_input(values: np.ndarray, windows: Sequence[tuple[float, float]], size: int,
                             framing: Framing = Framing.NONE) -> np.ndarray:
    """CT values (HU, float32, the caller's own: windowed in place) to the model input of
    `dicom_to_model_input`: size x size with one window, size x size x 3 with several."""
    if len(set(windows)) == 1:
        return resize(framed(window(values, *windows[0], out=values), framing)[..., None], size)[..., 0]
    # windowed, framed and resized a channel at a time: never three full-size planes (an 8000 px slice)
    first = window(values, *windows[0])  # frames the slice, and is the first channel
    box = body_box(first) if framing is Framing.BODY else None
    channels = [resize(cropped(first, box)[..., None], size)[..., 0]]
    del first
    channels += [resize(cropped(window(values, c, w), box)[..., None], size)[..., 0] for c, w in windows[1:]]
    return np.stack(channels, axis=2)


def as_model_input(image: np.ndarray) -> np.ndarray:
    """A `dicom_to_model_input` result as HxWx3 (a one-plane result repeated, without a copy)."""
    return _three_channels(image) if image.ndim == 2 else image


# --- 8-bit image files (training data, `triage --task` on PNG/JPEG) ------------------


def load_grey(source: str | Path | bytes | Image.Image) -> np.ndarray:
    """A PNG/JPEG as one grey channel (RGBA and RGB alike), float32 0..255."""
    try:
        if isinstance(source, Image.Image):
            img = source
        elif isinstance(source, (bytes, bytearray)):
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(source)
        return np.asarray(img.convert("L"), dtype=np.float32)
    except Exception as exc:
        raise BadDicomError(f"not a readable image file: {exc}") from exc


def grey_to_image(grey: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    """An 8-bit grey image (already windowed for CT) to HxWx3 in [0, 1]."""
    if spec.kind == "ct_windows":
        return _three_channels(framed(np.clip(grey / 255.0, 0.0, 1.0), spec.framing))
    return _three_channels(robust_normalise(grey, spec.percentiles))


# --- to the network ------------------------------------------------------------------


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize with antialiasing; a fixed size removes the image-size shortcut."""
    if image.shape[0] == size and image.shape[1] == size:
        return image if image.dtype == np.float32 else image.astype(np.float32)
    if image.shape[2] == 3 and image.strides[2] == 0:  # one plane repeated (_three_channels): resize it once
        return _three_channels(resize(image[..., :1], size)[..., 0])
    channels = [  # a contiguous float32 plane goes to Pillow as it is (Pillow copies it anyway)
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32), mode="F")
                   .resize((size, size), Image.Resampling.BILINEAR))
        for c in range(image.shape[2])
    ]
    return np.stack(channels, axis=2).astype(np.float32)


def to_batch(images: Sequence[np.ndarray], spec: PreprocessingSpec) -> np.ndarray:
    """Images (HxWx3 in [0,1]) to a normalised NCHW float32 batch at the card's size."""
    if not images:
        raise ValueError("no images to batch")
    size = spec.input_size
    batch = np.empty((len(images), 3, size, size), np.float32)  # written in place, channel by channel
    for index, img in enumerate(images):
        resized = resize(img, size)
        for c in range(3):
            np.subtract(resized[..., c], np.float32(spec.mean[c]), out=batch[index, c])
            batch[index, c] /= np.float32(spec.std[c])
    return batch


def display_image(image: np.ndarray, size: int) -> np.ndarray:
    """The picture a radiologist recognises (first channel, e.g. the brain window), as RGB."""
    grey = resize(image[..., :1], size)[..., 0]
    return _three_channels(grey)
