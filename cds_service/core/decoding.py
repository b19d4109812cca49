"""A series' slices decoded beside the model: bytes in, the model's input and a few numbers out.

pydicom's JPEG-LS, JPEG and JPEG 2000 plugins (CharLS by pyjpegls, libjpeg, OpenJPEG) hold Python's
GIL while they decode (measured: two threads decode no faster than one). JPEG-LS is therefore decoded
by imagecodecs' CharLS (`core.codecs`), which releases it, so decoder threads share the cores with
each other and with the model's threads. The pipeline hands each instance's bytes, as WADO-RS
delivered them, to `DecodePool.map`: with CDS_DECODE_PROCESSES decoder processes (spawned) each
parses, checks, decodes and preprocesses one slice (`prepare_slice`); with none, the worker's own
thread does, while the model's threads score the batch before; a thin-slice series read as slabs,
where ten slices are decoded per model input, gets CDS_DECODE_THREADS decoder threads instead. On two
cores no processes and two threads are the default (`default_processes`, `default_threads`, measured
in bench/README.md); a larger machine gets processes. Either way a slice comes back as the model's
input and what the pipeline keeps of it: its SOP Instance UID, its place in the series and the input
check's statistics, in the order the instances arrived (so the model's batches are what they were),
with only a few instances in flight, so memory does not grow with the series.

Asking the PACS for an uncompressed transfer syntax instead was measured and not kept: Orthanc
transcoding a 512 x 512 JPEG-LS slice took 12 ms of its CPU and ~20 ms a slice in series, where
CharLS decodes it here in about 6 ms (bench/README.md).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.spawn
import os
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import pydicom

from cds_service.core import codecs
from cds_service.core.anatomy import CtSliceShape, dataset_shape
from cds_service.core.errors import BadDicomError, StudyTooLargeError
from cds_service.core.input_profile import image_statistics
from cds_service.core.preprocessing import (PreprocessingSpec, as_model_input, ct_windows_for, decode_cost, dicom_pixels,
                                            dicom_to_model_input, instance_bytes, modality_values, read_dicom, rescale_to_hu)

log = logging.getLogger(__name__)

Prepared = TypeVar("Prepared")

IN_FLIGHT_PER_PROCESS = 2  # instances handed to a decoder (process or thread) ahead of the one being read


def slice_position(ds: pydicom.Dataset) -> tuple[float, float]:
    """Where a slice sits in its series: (ImagePositionPatient z, InstanceNumber); sorting by it gives
    the anatomical order (`pacs.slice_order`)."""
    return known_position(ds) or (0.0, float(getattr(ds, "InstanceNumber", 0) or 0))


def known_position(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """`slice_position`, or None when the slice has no ImagePositionPatient (no slabs can be planned)."""
    position = getattr(ds, "ImagePositionPatient", None)
    if position is None or len(position) != 3:
        return None
    return (float(position[2]), float(getattr(ds, "InstanceNumber", 0) or 0))


def positions_order(positions: Sequence[tuple[float, float]]) -> list[int]:
    """Indices in anatomical order of slices at these `slice_position`s."""
    return sorted(range(len(positions)), key=positions.__getitem__)


@dataclass(frozen=True)
class PreparedSlice:
    """One slice, decoded and preprocessed: its model input and what the pipeline keeps of it."""

    sop_instance_uid: str
    position: tuple[float, float]  # slice_position
    modality: str
    model_input: np.ndarray  # size x size (one plane the model sees on all three channels) or size x size x 3
    statistics: np.ndarray  # input_profile.image_statistics of the model input
    instance_bytes: int  # what CDS_MAX_SERIES_BYTES counts of it
    seconds: float  # time spent parsing, decoding and preprocessing it, where that ran

    @property
    def image(self) -> np.ndarray:
        """The model input as HxWx3 (a one-plane input repeated, without a copy)."""
        return as_model_input(self.model_input)


def check_decode_cost(ds: pydicom.Dataset, max_bytes: int) -> None:
    """StudyTooLargeError when decoding this instance would take more memory at once than `max_bytes`
    (CDS_MAX_SERIES_BYTES: one instance may not cost more than a whole series may weigh)."""
    cost = decode_cost(ds)
    if max_bytes and cost > max_bytes:
        raise StudyTooLargeError(f"decoding an instance ({int(ds.get('Rows', 0) or 0)} x {int(ds.get('Columns', 0) or 0)}) "
                                 f"would take {cost} bytes, above the limit of {max_bytes} bytes (CDS_MAX_SERIES_BYTES)")


def prepare_slice(data: bytes, spec: PreprocessingSpec, max_decode_bytes: int = 0) -> PreparedSlice:
    """Parse, check, decode and preprocess one instance (Part-10 bytes) as the card says. Pure: runs
    in a decoder process or in the caller's thread with the same result."""
    started = time.perf_counter()
    ds = read_dicom(data)
    check_decode_cost(ds, max_decode_bytes)
    model_input = dicom_to_model_input(ds, spec)
    return PreparedSlice(
        sop_instance_uid=str(getattr(ds, "SOPInstanceUID", "") or ""),
        position=slice_position(ds),
        modality=str(getattr(ds, "Modality", "") or ""),
        model_input=model_input,
        statistics=image_statistics(as_model_input(model_input)),
        instance_bytes=instance_bytes(ds),
        seconds=time.perf_counter() - started,
    )


def prepare_file(path: str, spec: PreprocessingSpec, max_decode_bytes: int = 0) -> PreparedSlice:
    """`prepare_slice` of a DICOM file (`cds-triage triage` on a folder); a slice that cannot be
    decoded names its file."""
    return _from_file(prepare_slice, path, spec, max_decode_bytes)


def _from_file(prepare: Callable[[bytes, PreprocessingSpec, int], Prepared], path: str, spec: PreprocessingSpec,
               max_decode_bytes: int) -> Prepared:
    """`prepare` of a file's bytes; an unreadable file, or one that cannot be decoded, names the file."""
    try:
        return prepare(Path(path).read_bytes(), spec, max_decode_bytes)
    except OSError as exc:
        raise BadDicomError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    except BadDicomError as exc:
        raise BadDicomError(f"{path}: {exc}") from exc


@dataclass(frozen=True)
class PreparedValues:
    """One CT slice of a slab (`core.slabs`), decoded: its values at full size and its window(s), which
    the pipeline sums with the slab's other slices before the model input is made."""

    sop_instance_uid: str
    position: tuple[float, float]  # slice_position
    modality: str
    values: np.ndarray  # stored integers (with `rescale`), else HU as float32 (`rescale` None)
    rescale: tuple[float, float] | None  # Rescale Slope, Intercept: HU = values x slope + intercept
    windows: tuple[tuple[float, float], ...]  # preprocessing.ct_windows_for
    instance_bytes: int
    seconds: float


def stored_values(ds: pydicom.Dataset) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A CT slice's decoded values and the rescale to HU (`preprocessing.modality_values` before its
    rescale): the stored integers and (slope, intercept), so a slab sums integers (exactly, and at a
    quarter of the cost of float HU) and rescales its mean once; HU as float32 and None where there is
    a Modality LUT Sequence or the decoded values are not integers."""
    if "ModalityLUTSequence" in ds:
        return modality_values(ds), None
    pixels = dicom_pixels(ds)
    try:
        rescale = (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))
    except Exception as exc:
        raise BadDicomError(f"cannot apply modality LUT: {exc}") from exc
    if np.issubdtype(pixels.dtype, np.integer):
        return pixels, rescale
    return rescale_to_hu(pixels, *rescale), None


def prepare_values(data: bytes, spec: PreprocessingSpec, max_decode_bytes: int = 0) -> PreparedValues:
    """Parse, check and decode one CT instance (`prepare_slice` up to the window). Pure."""
    started = time.perf_counter()
    ds = read_dicom(data)
    check_decode_cost(ds, max_decode_bytes)
    values, rescale = stored_values(ds)
    return PreparedValues(
        sop_instance_uid=str(getattr(ds, "SOPInstanceUID", "") or ""),
        position=slice_position(ds),
        modality=str(getattr(ds, "Modality", "") or ""),
        values=values,
        rescale=rescale,
        windows=tuple(ct_windows_for(ds, spec)),
        instance_bytes=instance_bytes(ds),
        seconds=time.perf_counter() - started,
    )


def prepare_values_file(path: str, spec: PreprocessingSpec, max_decode_bytes: int = 0) -> PreparedValues:
    """`prepare_values` of a DICOM file; a slice that cannot be decoded names its file."""
    return _from_file(prepare_values, path, spec, max_decode_bytes)


def measure_shape(data: bytes, max_decode_bytes: int = 0) -> CtSliceShape | None:
    """`anatomy.dataset_shape` of one instance's bytes (a middle slice, fetched again for the input check)."""
    ds = read_dicom(data)
    check_decode_cost(ds, max_decode_bytes)
    return dataset_shape(ds)


_spawning = threading.Lock()


@contextmanager
def _without_main_module() -> Iterator[None]:
    """Decoder processes started meanwhile do not import the parent's `__main__` again.

    A spawned child normally re-runs the parent's main script (or module) before its first task:
    the bench's whole script, or a caller's unguarded script with everything it does at import. The
    decoders need only this module, which they import by name to unpickle `prepare_slice`. Processes
    are started inside ProcessPoolExecutor.submit, so only submits are wrapped (one at a time)."""
    original = multiprocessing.spawn.get_preparation_data

    def without_main(name: str) -> dict[str, Any]:
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    with _spawning:
        multiprocessing.spawn.get_preparation_data = without_main  # type: ignore[assignment]
        try:
            yield
        finally:
            multiprocessing.spawn.get_preparation_data = original  # type: ignore[assignment]


def _child_ready(pause_s: float) -> int:
    time.sleep(pause_s)  # long enough that each warm-up call lands in its own process
    return os.getpid()


def _child_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one slice per process: the parallelism is the pool's
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()


def _exit_with_parent(parent: int, interval_s: float = 1.0) -> None:
    """A decoder whose worker died without shutting the pool down (SIGKILL, the OOM killer) would wait for
    work forever: it holds its own end of the task queue, so it never sees the queue close. It leaves
    within a second of being orphaned."""
    while os.getppid() == parent:
        time.sleep(interval_s)
    os._exit(0)


class DecodePool:
    """`processes` decoder processes (spawned, not forked: the worker runs threads), else `threads`
    decoder threads, or neither (0, 0): the same functions then run in the caller's thread. One pool
    serves every worker thread of a process."""

    def __init__(self, processes: int, threads: int = 0) -> None:
        self.processes = default_processes() if processes < 0 else processes
        self.threads = 0 if self.processes else (default_threads() if threads < 0 else threads)
        self._executor: Executor | None = None
        self._lock = threading.Lock()

    @property
    def workers(self) -> int:
        """How many instances are decoded at once (0: in the caller's thread)."""
        return self.processes or self.threads

    def _pool(self) -> Executor:
        with self._lock:
            if self._executor is None:
                if self.processes:
                    self._executor = ProcessPoolExecutor(self.processes, initializer=_child_init,
                                                         mp_context=multiprocessing.get_context("spawn"))
                else:
                    self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
            return self._executor

    def warm(self) -> None:
        """Start every decoder process now (each imports numpy, pydicom, OpenCV: about a second), so
        the first study does not wait for them. Threads need no warming."""
        if self.processes:
            self.map_all(_child_ready, [0.2] * self.processes)

    def pids(self) -> list[int]:
        """The decoder processes' ids (those started so far)."""
        executor = self._executor
        return sorted(getattr(executor, "_processes", None) or {}) if executor is not None else []

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        if self.threads:
            return self._pool().submit(function, *args)
        if not self.processes:
            future: Future = Future()
            try:
                future.set_result(function(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for the result
                future.set_exception(exc)
            return future
        try:
            with _without_main_module():
                return self._pool().submit(function, *args)
        except BrokenProcessPool:
            self._reset()
            with _without_main_module():
                return self._pool().submit(function, *args)

    def result(self, future: Future) -> Any:
        """The call's result; a decoder process that died (killed for memory, crashed in a codec) is
        BadDicomError, and the pool is started afresh for the next call."""
        try:
            return future.result()
        except BrokenProcessPool as exc:
            self._reset()
            raise BadDicomError("a decoder process died while decoding an instance (out of memory, or a codec "
                                "crashed on it)") from exc

    def map(self, function: Callable[..., Any], items: Iterable[Any], *args: Any) -> Iterator[Any]:
        """`function(item, *args)` for each item, results in the items' order, as soon as each is ready;
        at most IN_FLIGHT_PER_PROCESS per decoder are handed out ahead of the one waited for."""
        if not self.workers:
            for item in items:
                yield function(item, *args)
            return
        ahead = IN_FLIGHT_PER_PROCESS * self.workers
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(self.submit(function, item, *args))
                while pending and (len(pending) > ahead or pending[0].done()):
                    yield self.result(pending.popleft())
            while pending:
                yield self.result(pending.popleft())
        finally:
            for future in pending:  # the consumer stopped (a limit, a failed transfer): drop the rest
                future.cancel()

    def map_all(self, function: Callable[..., Any], items: Sequence[Any], *args: Any) -> list[Any]:
        """Every result at once (a few instances: the middle slices)."""
        futures = [self.submit(function, item, *args) for item in items]
        return [self.result(future) for future in futures]

    def _reset(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._reset()


_pools: dict[tuple[int, int], DecodePool] = {}
_pools_lock = threading.Lock()


def decode_pool(processes: int, threads: int = 0) -> DecodePool:
    """This process's pool of `processes` decoder processes, else `threads` decoder threads (-1: the
    default for this machine; created once, shared by its worker threads)."""
    with _pools_lock:
        if (processes, threads) not in _pools:
            _pools[processes, threads] = DecodePool(processes, threads)
        return _pools[processes, threads]


def slab_decoders(pool: DecodePool, threads: int) -> DecodePool:
    """Who decodes a series read as slabs: `pool` where it has decoder processes, else `threads` decoder
    threads (CDS_DECODE_THREADS). Ten slices are decoded per model input there, so decoding, not the
    model, is the bottleneck; a series read slice by slice keeps `pool` (bench/README.md)."""
    return pool if pool.workers else decode_pool(0, threads)


def default_threads(cores: int | None = None) -> int:
    """How many decoder threads a worker without decoder processes runs for a series read as slabs
    unless CDS_DECODE_THREADS says: one per core, at most four; none on one core, or where JPEG-LS is
    decoded by a plugin that holds the GIL (imagecodecs missing: `codecs.register`).

    Measured on two cores (bench/README.md, *Large studies*): two threads took the 300-slice JPEG-LS
    head CT (0.5 mm, 30 slabs) from 4.85-5.48 s to 3.50-4.06 s; uncompressed, whose decoding is a
    copy, and 40 slices of 5 mm, where the model is the bottleneck, were as fast either way."""
    cores = cores or os.cpu_count() or 1
    return min(cores, 4) if cores > 1 and codecs.register() else 0


def default_processes(cores: int | None = None) -> int:
    """How many decoder processes a worker starts unless CDS_DECODE_PROCESSES says: none on up to three
    cores, else all cores but two (the model's intra-op threads and the worker's own), at most eight.

    Measured on two cores (bench/README.md, 300-slice head CT, in-process, alternating): decoding in
    the worker's own thread beside the model's two threads took 2.2-2.5 s for JPEG-LS against 2.1-2.7 s
    with two decoder processes, and 1.3 against 1.5 s uncompressed: the processes compete with the model
    for the same two cores (its batches took twice as long), and they weigh ~90 MB each. Above two
    cores a lone thread cannot decode as fast as the model scores (7 ms a JPEG-LS slice against
    ~4 ms of model CPU); that default is not measured here."""
    cores = cores or os.cpu_count() or 1
    return 0 if cores <= 3 else min(cores - 2, 8)
