"""What the pipeline keeps of a series while it streams through the decoders (`StreamedSeries`), and the
series' slab plan, asked of the PACS before the pixels (`series_plan`, core/slabs.py)."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pydicom

from cds_service.adapters.pacs import Pacs
from cds_service.core.anatomy import CtSliceShape, middle_slices
from cds_service.core.decoding import DecodePool, PreparedSlice, PreparedValues, measure_shape, positions_order
from cds_service.core.domain import Series
from cds_service.core.preprocessing import read_dicom
from cds_service.core.slabs import SlabInput, SlabPlan, plan_slabs, single


def series_plan(pacs: Pacs, study_uid: str, series: Series, slab_mm: float) -> tuple[SlabPlan, list[str]]:
    """The series' slab plan from its instances' positions (QIDO-RS, asked while the first slices are
    decoded), and the SOP Instance UID of each planned instance."""
    places = pacs.instance_places(study_uid, series.uid)
    sops = [sop for sop, _ in places]
    if series.number_of_instances and len(places) != series.number_of_instances:
        return single(len(places), thickness_mm=slab_mm, reason=f"the PACS listed {len(places)} of the "
                      f"{series.number_of_instances} instances with their positions"), sops
    if len(set(sops)) != len(sops) or not all(sops):
        return single(len(places), thickness_mm=slab_mm, reason="the PACS listed instances without distinct UIDs"), sops
    return plan_slabs([position for _, position in places], slab_mm), sops


@dataclass
class StreamedSeries:
    """What the pipeline keeps of a series streamed through the decoders, a few numbers per model input
    (a slice, or a slab of slices: `plan`), and the few slices it fetches again afterwards (the input
    check's middle slices, the driving slice or the driving slab's slices)."""

    pacs: Pacs
    study_uid: str
    series_uid: str
    pool: DecodePool
    max_decode_bytes: int
    plan: SlabPlan | None = None  # the slab plan, where the card asks for one (None: each instance alone)
    plan_sops: list[str] = field(default_factory=list)  # the planned instances' SOP Instance UIDs
    positions: list[tuple[float, float]] = field(default_factory=list)  # of each model input
    sops: list[str] = field(default_factory=list)  # of each model input (a slab: its middle instance)
    stats: list[np.ndarray] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)
    weight: int = 0  # what CDS_MAX_SERIES_BYTES counts
    instances: int = 0
    _first_modality: str = ""
    _order: list[int] | None = None
    _parts: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> fetched again
    _datasets: dict[str, pydicom.Dataset] = field(default_factory=dict)
    _middle: Future | None = None

    def _count(self, instance_bytes: int) -> None:
        self.instances += 1
        self.weight += instance_bytes
        self.pacs.check_series_bytes(self.weight, self.instances)

    def counted(self, decoded: Iterator[PreparedValues]) -> Iterator[PreparedValues]:
        """Decoded slices, each counted against CDS_MAX_SERIES_BYTES as it arrives."""
        for prepared in decoded:
            self._count(prepared.instance_bytes)
            self._first_modality = self._first_modality or prepared.modality
            yield prepared

    def add(self, prepared: PreparedSlice, counted: bool = False) -> None:
        """One slice, one model input (`counted`: already counted as it arrived)."""
        if not counted:
            self._count(prepared.instance_bytes)
        self.positions.append(prepared.position)
        self.sops.append(prepared.sop_instance_uid)
        self.stats.append(prepared.statistics)
        self.modalities.append(prepared.modality)

    def add_slab(self, slab: SlabInput) -> None:
        assert self.plan is not None
        self.positions.append((float(slab.index), 0.0))  # slabs are in anatomical order already
        self.sops.append(self.plan_sops[self.plan.middles()[slab.index]])
        self.stats.append(slab.statistics)

    @property
    def slabbed(self) -> bool:
        return self.plan is not None and self.plan.slabbed

    @property
    def order(self) -> list[int]:
        """Arrival indices in anatomical order."""
        if self._order is None or len(self._order) != len(self.sops):
            self._order = positions_order(self.positions)
        return self._order

    @property
    def modality(self) -> str:
        """The modality of the first slice in anatomical order (of a slab plan: of the first to arrive)."""
        if not self.sops:
            return ""
        return self._first_modality if self.slabbed else self.modalities[self.order[0]]

    def statistics(self) -> list[np.ndarray]:
        return [self.stats[index] for index in self.order]

    def sop_instance_uids(self) -> list[str]:
        """Each model input's SOP Instance UID in anatomical order (a slab's: its middle instance's)."""
        return [self.sops[index] for index in self.order]

    def instance_uids(self) -> list[str]:
        """Every instance's SOP Instance UID in anatomical order."""
        if self.plan is None or not self.plan.slabbed:
            return self.sop_instance_uids()
        return [self.plan_sops[index] for index in self.plan.anatomical()]

    def measure_middle_slices(self) -> None:
        """Start fetching the middle slices (single instances, also in a slab plan) again and measuring
        them (`anatomy.dataset_shape`), in the background: the input check waits for them in
        `middle_shapes`."""
        instances = self.instance_uids()
        sops = [instances[index] for index in middle_slices(len(instances))]

        def fetch_and_measure() -> list[CtSliceShape | None]:
            with ThreadPoolExecutor(max_workers=max(1, len(sops)), thread_name_prefix="refetch") as fetcher:
                parts = list(fetcher.map(self._part, sops))
            return self.pool.map_all(measure_shape, parts, self.max_decode_bytes)

        self._middle = in_background(fetch_and_measure, "middle-slices")

    def middle_shapes(self) -> list[CtSliceShape | None] | None:
        """The measured middle slices (None: not measured, not a CT routed to the head CT model)."""
        return None if self._middle is None else self._middle.result()

    def _part(self, sop: str) -> bytes:
        if sop not in self._parts:
            self._parts[sop] = self.pacs.retrieve_part(self.study_uid, self.series_uid, sop)
        return self._parts[sop]

    def _dataset(self, sop: str) -> pydicom.Dataset:
        if sop not in self._datasets:
            self._datasets[sop] = read_dicom(self._part(sop))
        return self._datasets[sop]

    def dataset(self, index: int) -> pydicom.Dataset:
        """The slice at `index` in anatomical order, fetched again (or kept from the input check's fetch)."""
        return self._dataset(self.sop_instance_uids()[index])

    def input_instances(self, index: int) -> list[str]:
        """The SOP Instance UIDs behind the model input at `index` (anatomical order): the slab's slices, or
        the one slice."""
        if self.plan is not None and self.plan.slabbed:
            return [self.plan_sops[member] for member in self.plan.groups[index]]
        return [self.sop_instance_uids()[index]]

    def slab_datasets(self, index: int) -> list[pydicom.Dataset]:
        """The slices of the slab at `index` (anatomical order), fetched again, side by side."""
        assert self.plan is not None
        sops = self.input_instances(index)
        with ThreadPoolExecutor(max_workers=min(8, len(sops)), thread_name_prefix="refetch") as fetcher:
            list(fetcher.map(self._part, [sop for sop in sops if sop not in self._parts]))
        return [self._dataset(sop) for sop in sops]

    def fetched_datasets(self) -> list[pydicom.Dataset]:
        return list(self._datasets.values())


def in_background(function: Callable[[], Any], name: str) -> Future:
    """Run `function` in a thread of its own; its result (or exception) in the returned Future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the result
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
