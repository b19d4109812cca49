"""A cheap look at the pixels of a CT: how big is the body, and is there lung in it?

CT numbers are physical (Hounsfield units) and pixels have a size in millimetres, so a
head can be told from a chest or an abdomen without a model: an adult head is at most
about 22 cm across and holds almost no air, a chest or abdomen is 28–50 cm across and a
chest is a third air (the lungs). Used twice:

- routing: a CT whose DICOM header and EHR order are both silent is read as a head CT when
  its middle slices look like one (`Route.evidence == "pixels"`);
- refusal: a series routed to the head CT model (by any evidence) whose slices do not look
  like a head is refused with the measurement as the reason, never scored as if it were one.

Measured on the 100 real RSNA head CT slices in ../shared/data/head_ct_dicom_unlabelled (99
with a body; one holds only a sliver of skull): larger side 13–245 mm, depth/width 0.83–1.61,
air inside the outline at most 7 %. Depth/width needs no pixel spacing, so it was also measured
on every head slice we have as a picture (`var/exp/shapes.py`, outline of the grey level above
~3 HU): of 2,673 RSNA PNG slices with a body, 37 were under 0.8 and 24 under 0.7 — skull-base
slices, wider than deep across the face and mastoids (0.51–0.8), and slices holding only the head
holder; the 246 slices of a radiologist's RSNA subset 0.73–1.9; another hospital's slices, seen
outside the project, 0.75–0.78 at the skull base. So depth/width alone refuses below 0.45, and a
trunk is told by its size (an adult chest or abdomen is 280–450 mm wide) and its air (lungs)
first. No chest or abdomen CT is in our data: the trunk figures are textbook anatomy, and the
tests use phantoms for them. A small child's abdomen (under 260 mm, little air) is the case the
rule cannot tell from a head.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import pydicom

from cds_service.core.preprocessing import modality_values

HEAD_MAX_EXTENT_MM = 260.0  # RSNA head slices 13–245 mm (nose to occiput); an adult chest or abdomen ≥ 280 mm wide
HEAD_MIN_EXTENT_MM = 90.0  # a middle slice of an adult head is ≥ 120 mm; smaller ones are the vertex, or not a head
HEAD_MIN_DEPTH_TO_WIDTH = 0.45  # a head is deeper than wide, except at the skull base (real heads down to 0.51 there)
HEAD_MAX_AIR_FRACTION = 0.25  # RSNA head slices ≤ 12 % (sinuses, mastoids); chest slices ≈ 30–60 % (lungs)
TABLE_CUT_MM = 7.0
BODY_HU = -400.0  # tissue and bone are above, air and lung below
SLICES_LOOKED_AT = 5  # from the middle 60 % of the series: the vertex and the skull base are the odd ones


class SliceKind(str, enum.Enum):
    HEAD = "head"
    TRUNK = "trunk"  # too wide, too flat or too airy for a head: a chest, an abdomen, a pelvis
    UNSURE = "unsure"  # too small to be a whole head, or cut by the image edge, yet nothing says trunk


@dataclass(frozen=True)
class CtSliceShape:
    """The body outline of one CT slice, in physical units."""

    extent_mm: float  # the outline's larger side, in millimetres
    depth_to_width: float  # front-to-back over side-to-side (image rows over columns, in mm)
    air_fraction: float  # the share of the filled outline that is air or lung
    cut_by_edge: bool = False  # the outline spans the image edge to edge: the body is larger than the field of view

    @property
    def kind(self) -> SliceKind:
        if (self.extent_mm > HEAD_MAX_EXTENT_MM or self.air_fraction > HEAD_MAX_AIR_FRACTION
                or (not self.cut_by_edge and self.depth_to_width < HEAD_MIN_DEPTH_TO_WIDTH)):
            return SliceKind.TRUNK
        if self.cut_by_edge or self.extent_mm < HEAD_MIN_EXTENT_MM:
            return SliceKind.UNSURE
        return SliceKind.HEAD

    def describe(self) -> str:
        return (f"body {self.extent_mm:.0f} mm across{' (cut by the image edge)' if self.cut_by_edge else ''}, "
                f"depth/width {self.depth_to_width:.2f}, {100 * self.air_fraction:.0f} % air inside")


@dataclass(frozen=True)
class CtVerdict:
    """Whether a CT series looks like a head, with the measurements that say so."""

    is_head: bool | None  # None: the slices do not say (unmeasurable, too small, cut by the edge)
    reason: str


def pixel_spacing_mm(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm from PixelSpacing (CT), or None when absent or absurd."""
    try:
        row, col = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        return None
    return (row, col) if 0.05 <= row <= 10 and 0.05 <= col <= 10 else None


def ct_slice_shape(hu: np.ndarray, spacing_mm: tuple[float, float]) -> CtSliceShape | None:
    """The body outline of a slice in Hounsfield units: the largest connected region above -400 HU
    (table cut off), holes filled (so lungs and sinuses inside it count), or None when there is no body."""
    body = np.ascontiguousarray(hu > BODY_HU, dtype=np.uint8)
    # An opening of about 7 mm cuts the thin table and head holder off the body (they touch it).
    size = max(3, int(round(TABLE_CUT_MM / min(spacing_mm))) | 1)
    opened = cv2.morphologyEx(body, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    contours, _ = cv2.findContours(opened, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    outline = max(contours, key=cv2.contourArea)
    if cv2.contourArea(outline) < 100:
        return None
    filled = np.zeros_like(opened)
    cv2.drawContours(filled, [outline], -1, 1, thickness=-1)
    inside = filled.astype(bool)
    left, top, width, height = cv2.boundingRect(outline)
    rows, cols = hu.shape
    cut = (left <= 0 and left + width >= cols) or (top <= 0 and top + height >= rows)  # edge to edge
    width_mm, depth_mm = width * spacing_mm[1], height * spacing_mm[0]
    air = float(np.count_nonzero(inside & (hu <= BODY_HU))) / float(np.count_nonzero(inside))
    return CtSliceShape(extent_mm=float(max(width_mm, depth_mm)), depth_to_width=float(depth_mm / width_mm),
                        air_fraction=air, cut_by_edge=cut)


def dataset_shape(ds: pydicom.Dataset) -> CtSliceShape | None:
    spacing = pixel_spacing_mm(ds)
    if spacing is None:
        return None
    return ct_slice_shape(modality_values(ds), spacing)


def middle_slices(count: int, wanted: int = SLICES_LOOKED_AT) -> list[int]:
    """Up to `wanted` evenly spaced indices from the middle 60 % of `count` ordered slices."""
    if count <= 0:
        return []
    low, high = int(count * 0.2), max(int(count * 0.8) - 1, int(count * 0.2))
    return sorted(set(np.linspace(low, high, num=min(wanted, count)).round().astype(int).tolist()))


def ct_series_verdict(datasets: Sequence[pydicom.Dataset]) -> CtVerdict:
    """A head when most measured middle slices look like one, not a head when most look like a trunk,
    else undecided (datasets in anatomical order)."""
    return ct_shapes_verdict([dataset_shape(datasets[i]) for i in middle_slices(len(datasets))])


def ct_shapes_verdict(shapes: Sequence[CtSliceShape | None]) -> CtVerdict:
    """`ct_series_verdict` from the measured shapes of the series' middle slices (`middle_slices` of
    the ordered series, in that order; None where a slice could not be measured). What the pipeline
    keeps of a streamed series instead of its datasets: a few numbers for five slices."""
    measured = [shape for shape in shapes if shape is not None]
    if not measured:
        return CtVerdict(None, "the CT slices could not be measured (no PixelSpacing, or no body in the image)")
    kinds = [shape.kind for shape in measured]
    typical = sorted(measured, key=lambda s: s.extent_mm)[len(measured) // 2].describe()
    heads, trunks = kinds.count(SliceKind.HEAD), kinds.count(SliceKind.TRUNK)
    if heads * 2 > len(measured):
        return CtVerdict(True, f"{heads} of {len(measured)} middle slices look like a head ({typical})")
    if trunks * 2 > len(measured):
        return CtVerdict(False, f"{trunks} of {len(measured)} middle slices do not look like a head ({typical}; a head "
                                f"is at most {HEAD_MAX_EXTENT_MM:.0f} mm across, deeper than {HEAD_MIN_DEPTH_TO_WIDTH:.1f} "
                                f"of its width, and at most {100 * HEAD_MAX_AIR_FRACTION:.0f} % air)")
    return CtVerdict(None, f"the middle slices neither look like a head nor like a trunk ({typical})")
