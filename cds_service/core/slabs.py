"""Thin slices read as slabs of the thickness the model was trained on. Pure: no I/O.

The head CT model learnt from ~5 mm slices (RSNA series of 28-44 slices a head), and its series rule
(neighbouring slices must agree) was chosen for ~5 mm neighbours. A 150-300-slice head CT is a
thin-slice reconstruction (0.5-1.25 mm). CT reconstruction is linear, so a 5 mm slice is, to first
order, the mean in HU of the thin slices it covers (a radiologist's 5 mm "average" reformat). So a
series whose spacing is well below the card's `series_pooling.slab_mm` has its consecutive slices
averaged in HU into slabs of about that thickness, and each slab is windowed, resized and scored as
one slice; a series already about that thick is read slice by slice, as before.

`plan_slabs` decides the slabs from the slices' positions (before any pixel arrives); `slab_inputs`
turns decoded slices, arriving in any order, into the slabs' model inputs, holding only the slabs
still open (`SlabSum`: stored integers summed, rescaled to HU once per slab); `slab_image` rebuilds one slab's full-size image (the driving slab, for Grad-CAM). The
worker (`pipeline.run_triage`) and `cds-triage triage` share all three.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pydicom

from cds_service.core.decoding import PreparedSlice, PreparedValues, positions_order, stored_values
from cds_service.core.errors import BadDicomError, UpstreamError
from cds_service.core.input_profile import image_statistics
from cds_service.core.preprocessing import (Framing, PreprocessingSpec, as_model_input, ct_values_to_model_input, ct_windows_for, framed,
                                            rescale_to_hu, window)

GAP_FACTOR = 1.5  # a step this many times the series' spacing is a missing slice: no slab spans it
TOLERANCE_MM = 1e-3  # DS positions are decimal strings: 0.1 mm steps are not exact in binary


@dataclass(frozen=True)
class SlabPlan:
    """Which instances make each slab: `groups` of instance indices (into the positions planned from),
    each group and the groups in anatomical order. Every instance alone (groups of one) is today's
    slice-by-slice path; `reason` then says why, where a slab thickness was asked for."""

    groups: tuple[tuple[int, ...], ...]
    spacing_mm: float | None = None  # median step between neighbouring slices
    thickness_mm: float | None = None  # the card's slab thickness (None: the card asks for none)
    reason: str = ""

    @property
    def slabbed(self) -> bool:
        """Whether any slab averages more than one instance (else: today's path)."""
        return any(len(group) > 1 for group in self.groups)

    @property
    def instances(self) -> int:
        return sum(len(group) for group in self.groups)

    @property
    def per_slab(self) -> int:
        """Instances in a full slab."""
        return max((len(group) for group in self.groups), default=1)

    def middles(self) -> list[int]:
        """Each slab's middle instance (the later of two): the slab's SOP Instance UID in results."""
        return [group[len(group) // 2] for group in self.groups]

    def anatomical(self) -> list[int]:
        """Every instance index, in anatomical order."""
        return [index for group in self.groups for index in group]

    def to_summary(self) -> dict[str, Any]:
        """What the job record says of it: "300 instances read as 30 slabs of 5 mm"."""
        out: dict[str, Any] = {"instances": self.instances, "modelInputs": len(self.groups)}
        if self.slabbed:
            out |= {"slabMm": self.thickness_mm, "spacingMm": round(self.spacing_mm or 0.0, 3),
                    "note": f"{self.instances} instances read as {len(self.groups)} slabs of {self.thickness_mm:g} mm "
                            f"(slices {self.spacing_mm:.2g} mm apart, up to {self.per_slab} a slab, averaged in HU)"}
        elif self.thickness_mm is not None:
            out["note"] = f"each instance read alone: {self.reason}"
        return out


def single(count: int, order: Sequence[int] | None = None, *, thickness_mm: float | None = None,
           spacing_mm: float | None = None, reason: str = "") -> SlabPlan:
    """Every instance alone (today's path), in `order` (default: as given)."""
    return SlabPlan(tuple((index,) for index in (order if order is not None else range(count))),
                    spacing_mm, thickness_mm, reason)


def plan_slabs(positions: Sequence[tuple[float, float] | None], slab_mm: float | None) -> SlabPlan:
    """The slabs of a series from its instances' `decoding.slice_position`s (None: the instance has no
    ImagePositionPatient) and the card's slab thickness.

    Every instance alone when no thickness is asked for, with fewer than 2 instances, when any has no
    position, or when fewer than two slices fit in a slab. Else consecutive instances,
    `k = floor(slab_mm / spacing)` at most, in anatomical order: a slab never spans a
    missing slice (a step over GAP_FACTOR x the spacing) nor more than `slab_mm`; a short remainder
    (at the end, or before a gap) is a thinner slab of its own, not merged into a full one."""
    count = len(positions)
    if slab_mm is None:
        return single(count)
    missing = sum(position is None for position in positions)
    if missing:
        return single(count, thickness_mm=slab_mm,
                      reason=f"no ImagePositionPatient for {missing} of {count} instances")
    located = [position for position in positions if position is not None]
    order = positions_order(located)
    if count < 2:
        return single(count, order, thickness_mm=slab_mm, reason="a single instance")
    z = [located[index][0] for index in order]
    spacing = statistics.median(b - a for a, b in zip(z, z[1:]))
    if spacing <= TOLERANCE_MM:
        return single(count, order, thickness_mm=slab_mm, spacing_mm=spacing,
                      reason="instances share their positions (more than one stack?)")
    # floor, not round: a series 3-4 mm apart (44 slices a head: the RSNA series the model learnt from, one
    # slice each) is read slice by slice, never in pairs; a slab is never thicker than slab_mm
    k = math.floor(slab_mm / spacing + 1e-6)
    if k <= 1:
        return single(count, order, thickness_mm=slab_mm, spacing_mm=spacing,
                      reason=f"slices {spacing:.2g} mm apart are already about {slab_mm:g} mm")
    groups: list[list[int]] = []
    for place, index in enumerate(order):
        gap = place > 0 and z[place] - z[place - 1] > GAP_FACTOR * spacing + TOLERANCE_MM
        group = groups[-1] if groups else None
        if (group is None or gap or len(group) >= k
                or z[place] - located[group[0]][0] > slab_mm + TOLERANCE_MM):
            groups.append([index])
        else:
            group.append(index)
    return SlabPlan(tuple(tuple(group) for group in groups), spacing, slab_mm)


@dataclass(frozen=True)
class SlabInput:
    """One slab's model input, ready to score."""

    index: int  # the slab's place in the plan (anatomical order)
    model_input: np.ndarray  # as `preprocessing.dicom_to_model_input` gives a slice's
    statistics: np.ndarray  # input_profile.image_statistics of it

    @property
    def image(self) -> np.ndarray:
        return as_model_input(self.model_input)


def single_slice(prepared: PreparedValues, input_size: int, framing: Framing = Framing.NONE) -> PreparedSlice:
    """A slice read alone from its decoded values (a series the plan leaves slice by slice): exactly what
    `decoding.prepare_slice` gives, by the same arithmetic."""
    values = rescale_to_hu(prepared.values, *prepared.rescale) if prepared.rescale is not None else prepared.values
    model_input = ct_values_to_model_input(values, prepared.windows, input_size, framing)
    return PreparedSlice(prepared.sop_instance_uid, prepared.position, prepared.modality, model_input,
                         image_statistics(as_model_input(model_input)), prepared.instance_bytes, prepared.seconds)


class SlabSum:
    """One slab's slices added up as they arrive: stored integers summed exactly while every slice has
    the same rescale (the usual case), else HU in float64. `mean` divides once: k identical slices give
    back exactly the slice's `preprocessing.modality_values`."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.rescale: tuple[float, float] | None = None
        self.count = 0

    def add(self, values: np.ndarray, rescale: tuple[float, float] | None) -> None:
        if self.total is not None and self.total.shape != values.shape:
            raise BadDicomError(f"slices of different sizes ({self.total.shape} and {values.shape}) in one slab of the series")
        if self.total is None:
            self.total = values.astype(np.int64 if rescale is not None else np.float64)
            self.rescale = rescale
        elif rescale is not None and rescale == self.rescale:
            self.total += values
        else:  # rescales differ (or HU already): go on in HU
            if self.rescale is not None:
                slope, intercept = self.rescale
                self.total = self.total * slope + self.count * intercept
                self.rescale = None
            self.total += values * rescale[0] + rescale[1] if rescale is not None else values
        self.count += 1

    def mean(self) -> np.ndarray:
        """The slab's HU, float32."""
        assert self.total is not None
        mean = (self.total / self.count).astype(np.float32)
        return rescale_to_hu(mean, *self.rescale) if self.rescale is not None else mean


def slab_inputs(decoded: Iterable[PreparedValues], plan: SlabPlan, keys: Sequence[str],
                input_size: int, framing: Framing = Framing.NONE) -> Iterator[SlabInput]:
    """Decoded instances (full size, in any order) summed per slab (`SlabSum`), each slab's model input
    yielded as soon as its last member arrived, in its middle instance's window(s). Only open slabs
    are held.

    `keys[i]` is plan instance i's SOP Instance UID. An instance the plan does not name, one that
    comes twice, or a slab still open at the end means the PACS delivered another series than it
    listed: UpstreamError (retried)."""
    where: dict[str, tuple[int, bool]] = {}
    for slab, group in enumerate(plan.groups):
        for member in group:
            where[keys[member]] = (slab, member == group[len(group) // 2])
    sums: dict[int, SlabSum] = {}
    windows: dict[int, tuple[tuple[float, float], ...]] = {}
    seen: set[str] = set()
    for prepared in decoded:
        key = prepared.sop_instance_uid
        if key not in where or key in seen:
            raise UpstreamError(f"the PACS sent an instance it did not list for this series ({key or 'no UID'}): "
                                "the series changed while it was fetched")
        seen.add(key)
        slab, is_middle = where[key]
        total = sums.setdefault(slab, SlabSum())
        total.add(prepared.values, prepared.rescale)
        if is_middle:
            windows[slab] = prepared.windows
        if total.count == len(plan.groups[slab]):
            model_input = ct_values_to_model_input(sums.pop(slab).mean(), windows.pop(slab), input_size, framing)
            yield SlabInput(slab, model_input, image_statistics(as_model_input(model_input)))
    if sums or len(seen) != len(where):
        raise UpstreamError(f"the PACS sent {len(seen)} of the {len(where)} instances it listed for this series: "
                            "the series changed while it was fetched")


def mean_values(members: Sequence[pydicom.Dataset]) -> np.ndarray:
    """The members' HU averaged as `slab_inputs` averages them."""
    total = SlabSum()
    for ds in members:
        total.add(*stored_values(ds))
    return total.mean()


def slab_image(members: Sequence[pydicom.Dataset], spec: PreprocessingSpec) -> np.ndarray:
    """One slab as `preprocessing.dicom_to_image` gives a slice (HxWx3 in [0, 1], full size): its members
    (in anatomical order, with pixels) averaged in HU, in the middle member's window(s)."""
    values = mean_values(members)
    windows = ct_windows_for(members[len(members) // 2], spec)
    if len(set(windows)) == 1:
        grey = framed(window(values, *windows[0], out=values), spec.framing)
        return np.broadcast_to(grey[..., None], grey.shape + (3,))
    return framed(np.stack([window(values, c, w) for c, w in windows], axis=2), spec.framing)
