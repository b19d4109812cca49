"""Large studies, fast and lean (issue #21).

- A series streamed through the decoder processes and forgotten gets the findings, probabilities,
  input check and Grad-CAM overlay it got before (recorded in tests/references/large_study_reference.json
  with the code before this change, and computed here again by a copy of that code);
- the decoder pool keeps the arrival order, reports its failures, and does not run the caller's script;
- an instance that would cost more to decode than CDS_MAX_SERIES_BYTES is refused undecoded;
- an idle worker asks a SQLite queue every 20 ms; on Redis it blocks on the queue.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cds_service.core.decoding import DecodePool, PreparedSlice, prepare_slice
from cds_devtools.dicom_data import dicom_bytes
from cds_service.core.domain import Task
from cds_service.core.errors import BadDicomError, StudyTooLargeError
from cds_service.core.preprocessing import PreprocessingSpec, decode_cost, read_dicom
from support import make_test_weights
from test_decode_memory import head_ct_series, todays_image

pytestmark = pytest.mark.slow  # decoder processes, 40-slice series, the shipped head CT model

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((ROOT / "tests" / "references" / "large_study_reference.json").read_text())
CARDS = {"three_windows": {"seed": 0, "preprocessing": None},
         "one_window": {"seed": 3, "preprocessing": {"kind": "ct_windows", "windows": [[40, 80]] * 3}}}


# --- the decoder pool ------------------------------------------------------------------------------


SPEC = PreprocessingSpec("ct_windows", 64, ((40.0, 80.0),) * 3)


@pytest.mark.parametrize("processes,threads", [(2, 0), (0, 2)])
@pytest.mark.parametrize("storage", ["explicit", "jpegls"])
def test_the_pool_gives_what_the_caller_would_in_the_order_the_slices_came(processes: int, threads: int,
                                                                          storage: str) -> None:
    parts = [dicom_bytes(ds) for ds in head_ct_series(7, size=96, transfer_syntax=storage)]
    here = [prepare_slice(part, SPEC) for part in parts]
    pool = DecodePool(processes, threads)
    try:
        pooled = list(pool.map(prepare_slice, parts, SPEC))
        assert len(pool.pids()) == processes and os.getpid() not in pool.pids()
        assert pool.workers == 2
    finally:
        pool.close()
    assert [p.sop_instance_uid for p in pooled] == [h.sop_instance_uid for h in here]
    for a, b in zip(pooled, here):
        np.testing.assert_array_equal(a.model_input, b.model_input)
        np.testing.assert_array_equal(a.statistics, b.statistics)
        assert a.position == b.position and a.instance_bytes == b.instance_bytes and a.modality == "CT"
    assert pooled[0].model_input.shape == (64, 64)  # one plane crosses the pipe; the model sees it three times
    assert pooled[0].image.shape == (64, 64, 3) and pooled[0].image.strides[2] == 0


def test_small_machines_decode_in_threads_by_default() -> None:
    """On two cores decoder processes were no faster than the worker's own thread, and two decoder
    threads faster for JPEG-LS (bench/README.md); a larger machine gets processes, and then no threads."""
    from cds_service.core.decoding import decode_pool, default_processes, default_threads

    assert [default_processes(cores) for cores in (1, 2, 3, 4, 8, 16, 64)] == [0, 0, 0, 2, 6, 8, 8]
    assert [default_threads(cores) for cores in (1, 2, 3, 4, 8)] == [0, 2, 3, 4, 4]
    assert decode_pool(0).workers == 0 and DecodePool(-1).processes == default_processes()
    assert DecodePool(0, -1).threads == default_threads() and DecodePool(2, 2).threads == 0
    assert decode_pool(0, 2) is decode_pool(0, 2) and decode_pool(0, 2) is not decode_pool(0)


def test_decoder_counts_are_checked_at_start_up() -> None:
    from cds_service.core.settings import Settings, SettingsError

    for name in ("DECODE_THREADS", "DECODE_PROCESSES"):
        with pytest.raises(SettingsError, match=f"CDS_{name}=-2"):
            Settings.from_env({f"CDS_{name}": "-2"})
    assert Settings.from_env({"CDS_DECODE_THREADS": "3"}).decode_threads == 3


def test_a_bad_slice_in_a_decoder_process_fails_the_study_like_one_decoded_here(tmp_path: Path) -> None:
    good = dicom_bytes(head_ct_series(1, size=64)[0])
    pool = DecodePool(1)
    try:
        with pytest.raises(BadDicomError, match="not a readable DICOM"):
            list(pool.map(prepare_slice, [good, b"not dicom at all"], SPEC))
        with pytest.raises(BadDicomError, match="not a readable DICOM"):
            list(DecodePool(0).map(prepare_slice, [good, b"not dicom at all"], SPEC))
        with pytest.raises(BadDicomError, match="not a readable DICOM"):
            list(DecodePool(0, 2).map(prepare_slice, [good, b"not dicom at all"] + [good] * 6, SPEC))
        with pytest.raises(BadDicomError, match="decoder process died"):
            list(pool.map(killed_while_decoding, [good], SPEC))  # killed for memory, or crashed in a codec
        assert isinstance(next(pool.map(prepare_slice, [good], SPEC)), PreparedSlice)  # started afresh
        [pid] = pool.pids()
        os.kill(pid, signal.SIGKILL)  # one that dies between studies is replaced unnoticed
        time.sleep(0.5)
        assert isinstance(next(pool.map(prepare_slice, [good], SPEC)), PreparedSlice)
    finally:
        pool.close()


def killed_while_decoding(data: bytes, spec: PreprocessingSpec) -> PreparedSlice:
    os.kill(os.getpid(), signal.SIGKILL)
    return prepare_slice(data, spec)


def test_decoder_processes_do_not_run_the_callers_main_script(tmp_path: Path) -> None:
    """A spawned child would normally import the parent's __main__ again (the bench's whole script, or
    an unguarded one that starts servers at import); the decoders import only what they use."""
    marker = tmp_path / "imported"
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
        open({str(marker)!r}, "a").write("x")  # what an unguarded script does at import
        from cds_service.core.decoding import DecodePool, prepare_slice
        from cds_devtools.dicom_data import dicom_bytes
        from test_large_studies import SPEC, head_ct_series
        pool = DecodePool(2)
        print(len(list(pool.map(prepare_slice, [dicom_bytes(ds) for ds in head_ct_series(3, size=64)], SPEC))))
        pool.close()
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "3" and marker.read_text() == "x"


# --- what decoding may cost


def test_an_instance_that_would_cost_more_than_the_limit_is_refused_before_decoding(monkeypatch) -> None:
    """CDS_MAX_SERIES_BYTES bounds what one instance may take to decode (`decode_cost`), as well as
    what the series weighs: the worker holds one instance per decoder at a time, not the series."""
    part = dicom_bytes(head_ct_series(1, transfer_syntax="rle")[0])
    cost = decode_cost(read_dicom(part))
    assert prepare_slice(part, SPEC, max_decode_bytes=cost).sop_instance_uid
    monkeypatch.setattr("cds_service.core.preprocessing.pixel_array", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(StudyTooLargeError, match="CDS_MAX_SERIES_BYTES"):
        prepare_slice(part, SPEC, max_decode_bytes=cost - 1)


# --- the queue wakes the worker -------------------------------------------------------------------


def test_an_idle_worker_asks_a_sqlite_queue_every_20_ms_and_blocks_on_redis(tmp_path: Path) -> None:
    from huey import RedisHuey

    from cds_service.jobs.queue import SQLITE_POLL_S, consumer_delays, create_queue

    sqlite = create_queue("", tmp_path / "queue.db")
    assert not sqlite.storage.blocking
    consumer = sqlite.create_consumer(workers=1, worker_type="thread", periodic=False, **consumer_delays(sqlite))
    worker = consumer.worker_threads[0][0]
    for _ in range(50):  # idle: it never backs off beyond SQLITE_POLL_S (it went to 0.5 s before)
        worker.loop()
    assert worker.delay <= SQLITE_POLL_S == 0.02
    redis = RedisHuey("cds-triage-test", url="redis://127.0.0.1:1/0", results=False)
    assert redis.storage.blocking and consumer_delays(redis)["initial_delay"] > 0  # BRPOP: a queued job wakes it


# --- the pipeline, end to end on Orthanc and the FHIR server ------------------------------------------


def triaged_before(weights: Path, datasets: list[pydicom.Dataset]):
    """The in-memory triage of these slices by the code before (the decoder settings do not enter it)."""
    from cds_service.core.models import ModelRegistry
    from cds_service.adapters.pacs import sort_slices
    from cds_service.core.settings import Settings
    from cds_service.core.triage import triage_images

    settings = Settings(weights_dir=weights)
    model = ModelRegistry(weights, runtime="auto").get(Task.HEAD_CT_ICH)
    images = [todays_image(ds, model.card.preprocessing, 0) for ds in sort_slices(datasets)]
    return triage_images(model, images, settings.priority_rules, study_uid="before",
                         batch_size=settings.inference_batch_size)


def streamed_and_before(orthanc, fhir_server, tmp_path: Path, weights: Path, datasets: list[pydicom.Dataset],
                        **overrides):
    """run_triage's summary and overlay PNG, and the in-memory triage of the same slices by the code before."""
    from test_slabs import run_on_orthanc

    summary, png = run_on_orthanc(orthanc, fhir_server, tmp_path, weights, datasets, **overrides)
    return summary, png, triaged_before(weights, datasets)


@pytest.mark.integration
@pytest.mark.parametrize("storage", ["explicit", "jpegls"])
@pytest.mark.parametrize("card", sorted(CARDS))
def test_a_streamed_series_gets_the_findings_and_overlay_it_got_before(orthanc, fhir_server, tmp_path: Path,
                                                                       card: str, storage: str) -> None:
    weights = make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64, **CARDS[card])
    reference = REFERENCE["phantom"]["cards"][card][storage]
    summary, png, before = streamed_and_before(orthanc, fhir_server, tmp_path, weights,
                                               head_ct_series(24, transfer_syntax=storage))
    assert summary["findings"] == reference["pipeline_findings"]
    assert summary["slices"] == 24
    assert [f.probability for f in before.findings] == pytest.approx(
        [f["probability"] for f in reference["findings"]], abs=1e-6)
    assert [f.positive for f in before.findings] == [f["positive"] for f in reference["findings"]]
    assert before.heatmap.slice_index == reference["heatmap_slice"]
    assert png == before.heatmap.png  # the driving slice fetched again and scored again: the same overlay


RSNA_DICOM = ROOT.parent / "shared" / "data" / "head_ct_dicom_unlabelled"


@pytest.mark.integration
@pytest.mark.skipif(not RSNA_DICOM.is_dir(), reason="../shared/data is not here")
@pytest.mark.parametrize("storage", ["explicit", "jpegls"])
def test_forty_real_slices_get_the_shipped_models_findings_and_input_check_they_got_before(
        orthanc, fhir_server, tmp_path: Path, storage: str) -> None:
    """The committed head CT model on 40 real RSNA slices (one series), streamed through two decoder
    processes, two decoder threads, and neither: what it concluded before this change, to the fourth decimal."""
    from test_pixel_routing import rsna_series
    from test_slabs import run_on_orthanc

    datasets = rsna_series(40)
    for ds in datasets:
        ds.BodyPartExamined = "HEAD"
        if storage == "jpegls":
            ds.compress(pydicom.uid.JPEGLSLossless, generate_instance_uid=False)
    datasets = [read_dicom(dicom_bytes(ds)) for ds in datasets]
    reference = REFERENCE["rsna"][storage]
    before = triaged_before(ROOT / "weights", datasets)  # once: new UIDs and decoder settings do not enter it
    assert [f.probability for f in before.findings] == pytest.approx(
        [f["probability"] for f in reference["local_findings"]], abs=1e-6)
    assert before.heatmap.slice_index == reference["local_heatmap"][0]
    for processes, threads in ((2, 0), (0, 2), (0, 0)):
        for ds in datasets:  # the same slices, again: new UIDs
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        for ds in datasets:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        summary, png = run_on_orthanc(orthanc, fhir_server, tmp_path / f"{processes}-{threads}", ROOT / "weights",
                                      datasets, decode_processes=processes, decode_threads=threads)
        assert summary["findings"] == reference["pipeline"]["findings"]
        assert summary["inputCheck"] == reference["pipeline"]["inputCheck"]
        assert png == before.heatmap.png


# --- cds-triage triage streams the same way ---------------------------------------------------------


@pytest.mark.parametrize("processes,threads", [(2, 0), (0, 2), (0, 0)])
def test_a_folder_series_is_streamed_from_its_files_with_the_findings_it_got_before(tmp_path: Path,
                                                                                   processes: int, threads: int) -> None:
    """40 JPEG-LS slices in a folder: held as headers only, decoded as they are scored (by two decoder
    processes, two decoder threads, or here), the same findings and overlay as decoding every slice first."""
    from cds_service.local_triage import collect_inputs, triage_input
    from cds_service.core.models import ModelRegistry
    from cds_service.core.settings import Settings
    from cds_service.core.triage import triage_images

    weights = make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64, **CARDS["three_windows"])
    folder = tmp_path / "study"
    folder.mkdir()
    datasets = head_ct_series(40, size=128, transfer_syntax="jpegls")
    for index, ds in enumerate(datasets[::-1]):
        (folder / f"{index:03d}.dcm").write_bytes(dicom_bytes(ds))
    [item] = collect_inputs([folder])
    assert len(item.datasets) == 40 and not any("PixelData" in ds for ds in item.datasets)
    registry = ModelRegistry(weights, runtime="auto")
    streamed = triage_input(item, registry, Settings(weights_dir=weights, decode_processes=processes,
                                                             decode_threads=threads), None)
    model = registry.get(Task.HEAD_CT_ICH)
    images = [todays_image(read_dicom(Path(ds.filename).read_bytes()), model.card.preprocessing, 0) for ds in item.datasets]
    before = triage_images(model, images, Settings().priority_rules, study_uid="before")
    assert [(f.label, f.probability, f.positive) for f in streamed.findings] == \
        [(f.label, f.probability, f.positive) for f in before.findings]
    assert streamed.heatmap.slice_index == before.heatmap.slice_index and streamed.heatmap.png == before.heatmap.png
    assert streamed.slices_scored == 40


def test_decoders_leave_when_their_worker_is_killed(tmp_path: Path) -> None:
    """A worker killed with SIGKILL (the OOM killer, `docker kill`) cannot shut its pool down; its decoder
    processes notice they are orphaned and leave, instead of holding their memory forever."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{str(ROOT)!r}]
        from cds_service.core.decoding import DecodePool
        pool = DecodePool(2)
        pool.warm()
        print(" ".join(map(str, pool.pids())), flush=True)
        time.sleep(600)
    """))
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True) as worker:
        try:
            decoders = [int(pid) for pid in worker.stdout.readline().split()]
            assert len(decoders) == 2
        finally:
            worker.kill()
            worker.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in decoders) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in decoders if Path(f"/proc/{pid}").exists()]
