"""Thin slices read as slabs of the card's thickness (core/slabs.py, issue #21).

- the plan: a thick series is read slice by slice (today's path); 0.5, 1 and 2.5 mm slices become
  slabs of 10, 5 and 2; a slab never spans a gap nor more than its thickness; no positions, no slabs;
- the averaging: a slab's model input is its slices' mean in HU, windowed, resized (k identical slices
  give back exactly the slice);
- end to end (Orthanc, the FHIR server, the worker's pipeline, and `cds-triage triage`): 40 real RSNA
  slices as a 5 mm series, and the same slices each repeated 5 times 1 mm apart, get the same
  findings, probabilities and overlay; a thin series without positions keeps today's path.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cds_devtools.dicom_data import dicom_bytes
from cds_service.core.decoding import PreparedValues, prepare_values
from cds_service.core.domain import Task
from cds_service.core.errors import BadDicomError, UpstreamError
from cds_service.core.model_cards import PoolingMethod, SeriesPooling
from cds_service.core.preprocessing import (PreprocessingSpec, ct_values_to_model_input, dicom_to_image, modality_values,
                                            read_dicom)
from cds_service.core.slabs import SlabSum, plan_slabs, slab_image, slab_inputs
from support import make_test_weights, seed_onnx_exports
from test_decode_memory import head_ct_series

ROOT = Path(__file__).resolve().parents[1]
RSNA_DICOM = ROOT.parent / "shared" / "data" / "head_ct_dicom_unlabelled"
SPEC = PreprocessingSpec("ct_windows", 64, ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)))


def at(*z: float) -> list[tuple[float, float]]:
    """`decoding.slice_position`s at these z, instance numbers in the order given."""
    return [(float(value), float(number)) for number, value in enumerate(z, start=1)]


# --- the plan -------------------------------------------------------------------------------------


def test_a_series_already_about_the_slab_thickness_is_read_slice_by_slice() -> None:
    # 28-44 slices a head (the RSNA series the model learnt from, one slice each) are 3.2-6 mm apart:
    # floor(5 / 3.2) = 1, never pairs of slices averaged
    for spacing in (5.0, 4.0, 7.0, 3.2, 2.6):
        plan = plan_slabs(at(*(spacing * i for i in range(40))), 5.0)
        assert plan.groups == tuple((i,) for i in range(40)) and not plan.slabbed
        assert plan.spacing_mm == pytest.approx(spacing)
        assert "already about 5 mm" in plan.to_summary()["note"]
    assert plan_slabs(at(*(0.5 * i for i in range(40))), None).groups == tuple((i,) for i in range(40))


@pytest.mark.parametrize(("spacing", "k"), [(0.5, 10), (1.0, 5), (2.5, 2), (0.625, 8), (1.25, 4)])
def test_thin_slices_are_grouped_into_slabs_of_about_the_cards_thickness(spacing: float, k: int) -> None:
    count = 300 if spacing < 1 else 150
    plan = plan_slabs(at(*(round(spacing * i, 4) for i in range(count))), 5.0)
    assert plan.slabbed and plan.per_slab == k
    assert plan.groups[0] == tuple(range(k)) and plan.anatomical() == list(range(count))
    assert all(len(group) == k for group in plan.groups[:-1]) and 1 <= len(plan.groups[-1]) <= k
    assert len(plan.groups) == -(-count // k)
    assert plan.middles()[0] == k // 2
    summary = plan.to_summary()
    assert summary["instances"] == count and summary["modelInputs"] == len(plan.groups) and summary["slabMm"] == 5.0
    assert summary["note"].startswith(f"{count} instances read as {len(plan.groups)} slabs of 5 mm")


def test_a_short_remainder_is_a_thinner_slab_of_its_own() -> None:
    plan = plan_slabs(at(*range(12)), 5.0)  # 1 mm: 5 + 5 + 2
    assert plan.groups == ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (10, 11))


def test_instances_arriving_in_any_order_are_planned_in_anatomical_order() -> None:
    z = [float(v) for v in np.random.default_rng(3).permutation(20)]
    positions = at(*z)
    plan = plan_slabs(positions, 5.0)
    assert [[z[i] for i in group] for group in plan.groups] == [[float(v) for v in range(s, s + 5)] for s in (0, 5, 10, 15)]
    head_first = plan_slabs(at(*(-1.0 * i for i in range(10))), 5.0)  # z decreasing: the order is by z, as ever
    assert head_first.groups == ((9, 8, 7, 6, 5), (4, 3, 2, 1, 0))


def test_a_slab_never_spans_a_gap_nor_more_than_its_thickness() -> None:
    z = [0, 1, 2, 7, 8, 9, 10, 11, 12, 13]  # slices 3-6 missing: no slab joins 2 mm and 7 mm
    plan = plan_slabs(at(*z), 5.0)
    assert plan.groups == ((0, 1, 2), (3, 4, 5, 6, 7), (8, 9))
    for group in plan.groups:
        assert max(z[i] for i in group) - min(z[i] for i in group) <= 5.0
        assert all(z[b] - z[a] == 1 for a, b in zip(group, group[1:]))
    z = [0, 1.5, 3, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5]  # median step 1 mm (k = 5), steps of 1.5 mm are no gap,
    uneven = plan_slabs(at(*z), 5.0)              # but 0..5.5 mm would be more than 5 mm
    assert uneven.groups == ((0, 1, 2, 3), (4, 5, 6, 7, 8))


def test_without_positions_every_instance_is_read_alone() -> None:
    positions: list[tuple[float, float] | None] = list(at(*(0.5 * i for i in range(20))))
    positions[7] = None
    plan = plan_slabs(positions, 5.0)
    assert not plan.slabbed and len(plan.groups) == 20
    assert plan.to_summary()["note"] == "each instance read alone: no ImagePositionPatient for 1 of 20 instances"
    assert not plan_slabs(at(3.0), 5.0).slabbed
    assert not plan_slabs(at(*([2.0] * 10)), 5.0).slabbed  # one position for all: no spacing to go by


def test_the_card_says_the_slab_thickness() -> None:
    pooling = SeriesPooling.from_card({"method": "adjacent_mean", "window": 3, "slab_mm": 5})
    assert pooling.slab_mm == 5.0 and pooling.to_card() == {"method": "adjacent_mean", "window": 3, "slab_mm": 5.0}
    assert SeriesPooling.from_card({"method": "max"}).slab_mm is None
    assert "slab_mm" not in SeriesPooling(PoolingMethod.MAX).to_card()
    for bad in (0, -5, float("nan")):
        with pytest.raises(ValueError, match="slab_mm"):
            SeriesPooling(PoolingMethod.ADJACENT_MEAN, 3, bad)
    shipped = json.loads((ROOT / "weights" / "head_ct_ich.json").read_text())
    assert shipped["series_pooling"]["slab_mm"] == 5.0
    from cds_training.training import TASK_SETUPS

    assert TASK_SETUPS[Task.HEAD_CT_ICH].series_pooling.slab_mm == 5.0  # a re-generated card keeps it


# --- the averaging --------------------------------------------------------------------------------


def thin(datasets: list[pydicom.Dataset], k: int, step: float = 1.0) -> list[pydicom.Dataset]:
    """Each slice `k` times, `step` mm apart (new SOP Instance UIDs, instance numbers in order): the thin
    series whose k-slice averages are exactly the given slices."""
    out = []
    for index, ds in enumerate(datasets):
        for copy in range(k):
            new = read_dicom(dicom_bytes(ds))
            new.SOPInstanceUID = new.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            new.InstanceNumber = index * k + copy + 1
            x, y = (float(v) for v in (ds.ImagePositionPatient[:2] if "ImagePositionPatient" in ds else (0, 0)))
            new.ImagePositionPatient = [x, y, round(index * k * step + copy * step, 3)]
            out.append(new)
    return out


def test_a_slab_is_the_mean_of_its_slices_in_hu_and_k_identical_slices_give_back_the_slice() -> None:
    series = head_ct_series(6, size=96)  # different slices
    parts = [dicom_bytes(ds) for ds in series]
    decoded = [prepare_values(part, SPEC) for part in parts]
    keys = [d.sop_instance_uid for d in decoded]
    plan = plan_slabs(at(*range(6)), 3.0)  # 1 mm, 3 mm slabs: (0, 1, 2), (3, 4, 5)
    assert plan.groups == ((0, 1, 2), (3, 4, 5))
    slabs = {s.index: s for s in slab_inputs(reversed(decoded), plan, keys, SPEC.input_size)}  # any order
    for index, group in enumerate(plan.groups):
        mean = np.mean([modality_values(read_dicom(parts[i])).astype(np.float64) for i in group], axis=0
                       ).astype(np.float32)  # the mean in HU, computed here
        np.testing.assert_allclose(slabs[index].model_input, ct_values_to_model_input(mean, SPEC.windows, 64),
                                   atol=1e-6)
        members = [read_dicom(parts[i]) for i in group]
        np.testing.assert_allclose(slab_image(members, SPEC), np.stack(
            [np.clip((mean - (c - w / 2)) / w, 0, 1) for c, w in SPEC.windows], axis=2), atol=1e-6)
    one_slice = prepare_values(parts[2], SPEC)
    copies = [PreparedValues(f"k{i}", one_slice.position, "CT", one_slice.values, one_slice.rescale, one_slice.windows,
                             0, 0.0) for i in range(4)]  # four identical slices, four UIDs
    assert one_slice.rescale == (1.0, -1024.0) and one_slice.values.dtype == np.uint16  # integers summed
    [slab] = slab_inputs(copies, plan_slabs(at(0, 1, 2, 3), 5.0), ["k0", "k1", "k2", "k3"], SPEC.input_size)
    from cds_service.core.preprocessing import dicom_to_model_input

    one = read_dicom(parts[2])
    assert np.array_equal(slab.model_input, dicom_to_model_input(one, SPEC))  # exactly, not nearly
    assert np.array_equal(slab_image([one] * 4, SPEC), dicom_to_image(read_dicom(parts[2]), SPEC))


def test_slices_with_different_rescales_are_averaged_in_hu() -> None:
    """Stored integers are summed while the slab's slices share Rescale Slope/Intercept; one that does not
    turns the sum into HU: the mean is the mean in HU either way."""
    a, b, c = (np.full((8, 8), v, np.uint16) for v in (1000, 2000, 500))
    total = SlabSum()
    total.add(a, (1.0, -1024.0))
    total.add(b, (1.0, -1024.0))
    assert total.total is not None and total.total.dtype == np.int64
    total.add(c, (2.0, -1000.0))  # HU 0
    total.add(np.full((8, 8), 24.0, np.float32), None)  # HU already (a Modality LUT)
    np.testing.assert_allclose(total.mean(), np.full((8, 8), (-24 + 976 + 0 + 24) / 4), atol=1e-4)
    with pytest.raises(BadDicomError, match="different sizes"):
        total.add(np.zeros((4, 4), np.uint16), (1.0, 0.0))


def test_a_slice_the_plan_does_not_name_or_a_slab_left_open_is_an_upstream_fault() -> None:
    decoded = [prepare_values(dicom_bytes(ds), SPEC) for ds in head_ct_series(3, size=64)]
    keys = [d.sop_instance_uid for d in decoded]
    plan = plan_slabs(at(0, 1, 2), 5.0)
    with pytest.raises(UpstreamError, match="did not list"):
        list(slab_inputs(decoded, plan, keys[:2] + ["1.2.3"], 64))
    with pytest.raises(UpstreamError, match="sent 2 of the 3"):
        list(slab_inputs(decoded[:2], plan, keys, 64))


# --- end to end -------------------------------------------------------------------------------------


def with_slabs(weights: Path, slab_mm: float = 5.0) -> Path:
    """The test card with the shipped head CT card's series rule and slab thickness."""
    card_file = weights / f"{Task.HEAD_CT_ICH.value}.json"
    card = json.loads(card_file.read_text())
    card["series_pooling"] = {"method": "adjacent_mean", "window": 3, "slab_mm": slab_mm}
    card_file.write_text(json.dumps(card, indent=2))
    return weights


def rsna_thick_and_thin() -> tuple[list[pydicom.Dataset], list[pydicom.Dataset]]:
    """The 40 real RSNA slices as one 5 mm series, and each repeated 5 times 1 mm apart (200 slices)."""
    from test_pixel_routing import rsna_series

    thick = rsna_series(40)
    for index, ds in enumerate(thick):
        ds.BodyPartExamined = "HEAD"
        ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [5.0 * index]
    thick = [read_dicom(dicom_bytes(ds)) for ds in thick]
    slim = thin(thick, 5)
    series = pydicom.uid.generate_uid()
    for ds in slim:
        ds.SeriesInstanceUID = series
    return thick, slim


def run_on_orthanc(orthanc, fhir_server, tmp_path: Path, weights: Path, datasets: list[pydicom.Dataset], **overrides):
    """run_triage's state, summary and overlay PNG for these slices, uploaded in reverse order."""
    from cds_service.adapters.fhir_client import FhirClient
    from cds_service.jobs.state import JobState
    from cds_service.pipeline import run_triage
    from cds_service.core.settings import Settings
    from cds_service.worker import build_deps
    from test_pipeline import ordered_study

    study = pydicom.uid.generate_uid()
    for ds in datasets:
        ds.StudyInstanceUID = study
    settings = seed_onnx_exports(Settings(data_dir=tmp_path / "data", fhir_base_url=fhir_server.url,
                                          dicomweb_url=orthanc.dicomweb_url, http_timeout_s=60, weights_dir=weights, **overrides))
    fhir = FhirClient(settings.fhir_base_url)
    deps = build_deps(settings)
    try:
        state, reason, summary = run_triage(ordered_study(fhir, orthanc, 0, datasets=datasets[::-1])[0], deps)
        assert state is JobState.DONE, reason
        media, _ = fhir.read(*summary["written"]["Media"][0].split("/"))
    finally:
        fhir.close()
        deps.fhir.close()
    return summary, base64.b64decode(media["content"]["data"])


@pytest.mark.integration
@pytest.mark.skipif(not RSNA_DICOM.is_dir(), reason="../shared/data is not here")
def test_forty_real_slices_repeated_as_thin_slices_get_what_the_thick_series_gets(orthanc, fhir_server,
                                                                                   tmp_path: Path, monkeypatch) -> None:
    """The shipped head CT model: 200 slices 1 mm apart, each 5-slice slab the same as one 5 mm slice, give
    the 40-slice series' findings, probabilities and overlay, through the worker's pipeline (decoder
    processes, two decoder threads and neither) and through `cds-triage triage`; the thick series is read as before."""
    thick, slim = rsna_thick_and_thin()
    weights = ROOT / "weights"
    thick_summary, thick_png = run_on_orthanc(orthanc, fhir_server, tmp_path / "thick", weights, thick)
    assert thick_summary["slices"] == 40
    assert thick_summary["slabs"]["modelInputs"] == 40 and "already about 5 mm" in thick_summary["slabs"]["note"]
    import threading

    import cds_service.pipeline
    from cds_service.core.decoding import prepare_values

    decoded_in: set[str] = set()

    def recorded(*args, **kwargs):
        decoded_in.add(threading.current_thread().name.split("_")[0])
        return prepare_values(*args, **kwargs)

    for processes, threads in ((2, 0), (0, 2), (0, 0)):
        decoded_in.clear()  # (a decoder process is handed the function by name: not the recording one)
        monkeypatch.setattr(cds_service.pipeline, "prepare_values", prepare_values if processes else recorded)
        for ds in slim:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        series = pydicom.uid.generate_uid()
        for ds in slim:
            ds.SeriesInstanceUID = series
        summary, png = run_on_orthanc(orthanc, fhir_server, tmp_path / f"thin{processes}-{threads}", weights, slim,
                                      decode_processes=processes, decode_threads=threads)
        assert summary["findings"] == thick_summary["findings"]
        assert summary["slices"] == 40
        assert summary["slabs"] == {"instances": 200, "modelInputs": 40, "slabMm": 5.0, "spacingMm": 1.0,
                                    "note": "200 instances read as 40 slabs of 5 mm (slices 1 mm apart, up to 5 a "
                                            "slab, averaged in HU)"}
        assert summary["inputCheck"]["fits"] == thick_summary["inputCheck"]["fits"]
        assert png == thick_png  # the driving slab, its 5 slices fetched again and averaged: the same overlay
        if not processes:  # the first slices in this thread while the plan is asked for, the rest by the decoder threads
            assert decoded_in == ({"MainThread", "decode"} if threads else {"MainThread"}), decoded_in

    from cds_service.local_triage import collect_inputs, triage_input
    from cds_service.core.models import ModelRegistry
    from cds_service.core.settings import Settings

    results = {}
    registry = ModelRegistry(weights, runtime="auto")
    for name, datasets in (("thick", thick), ("thin", slim)):
        folder = tmp_path / "cli" / name
        folder.mkdir(parents=True)
        for index, ds in enumerate(datasets[::-1]):
            (folder / f"{index:03d}.dcm").write_bytes(dicom_bytes(ds))
        [item] = collect_inputs([folder])
        results[name] = triage_input(item, registry, Settings(weights_dir=weights, decode_processes=2), None)
        if name == "thin":  # and by two decoder threads
            results["thin_threads"] = triage_input(item, registry, Settings(weights_dir=weights, decode_processes=0,
                                                                            decode_threads=2), None)
    assert results["thin"].slices_scored == results["thick"].slices_scored == 40
    assert [(f.label, f.probability, f.positive) for f in results["thin"].findings] == \
        [(f.label, f.probability, f.positive) for f in results["thick"].findings]  # exactly
    assert [f.probability for f in results["thick"].findings] == pytest.approx(
        [f["probability"] for f in thick_summary["findings"]], abs=1e-4)
    assert [(f.label, f.probability, f.positive) for f in results["thin_threads"].findings] == \
        [(f.label, f.probability, f.positive) for f in results["thin"].findings]
    assert results["thin_threads"].heatmap.png == results["thin"].heatmap.png
    assert results["thin"].heatmap.png == results["thick"].heatmap.png == thick_png
    assert results["thin"].heatmap.slice_index == results["thick"].heatmap.slice_index
    assert (results["thin"].heatmap.averaged_slices, results["thin"].heatmap.slab_mm) == (5, 5.0)
    assert results["thin"].heatmap.location.endswith("(5 mm, the mean of 5 thin slices)")
    assert results["thick"].heatmap.averaged_slices == 1
    from cds_service.local_triage import result_json

    assert {k: result_json("thin", results["thin"])[k] for k in ("instances", "modelInputs", "slabMm")} == \
        {"instances": 200, "modelInputs": 40, "slabMm": 5.0}
    assert "slabMm" not in result_json("thick", results["thick"])
    assert (results["thick"].instances_read, results["thick"].slices_scored) == (40, 40)
    assert results["thick"].heatmap.location == f"slice {results['thick'].heatmap.slice_index}"
    # the key image is the driving slab's middle slice
    middle = {str(ds.SOPInstanceUID) for ds in slim[2::5]}
    assert results["thin"].heatmap.sop_instance_uid in middle


@pytest.mark.integration
def test_a_thin_series_without_positions_keeps_todays_path_and_says_so(orthanc, fhir_server, tmp_path: Path) -> None:
    weights = with_slabs(make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH, input_size=64))
    series = head_ct_series(12, size=64)
    for index, ds in enumerate(series):
        ds.ImagePositionPatient = [0.0, 0.0, 0.5 * index]
    plain = [read_dicom(dicom_bytes(ds)) for ds in series]
    plain_series = pydicom.uid.generate_uid()
    for ds in plain:
        ds.SeriesInstanceUID = plain_series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    for ds in series:
        del ds.ImagePositionPatient
    summary, _ = run_on_orthanc(orthanc, fhir_server, tmp_path / "none", weights, series)
    assert summary["slices"] == 12
    assert summary["slabs"] == {"instances": 12, "modelInputs": 12,
                                "note": "each instance read alone: no ImagePositionPatient for 12 of 12 instances"}
    slabbed, _ = run_on_orthanc(orthanc, fhir_server, tmp_path / "thin", weights, plain)  # the same with positions
    assert slabbed["slices"] == 2 and slabbed["slabs"]["modelInputs"] == 2  # 0.5 mm: 10 + 2
