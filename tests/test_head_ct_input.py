"""Head CT: a DICOM slice and its 8-bit brain-window conversion reach the model alike.

The hemorrhage model is trained on RSNA PNGs, each made from a DICOM windowed with that DICOM's
own window (a brain window: 30/80, 36/80, 40/80, 40/150 ... HU) and stored 8-bit. The service
sees the DICOM: HU from Rescale Slope and Intercept, the file's own window when it is a brain
window (the card's `own_window` ranges), else the card's 40/80 HU, the same resize. Here a DICOM
is converted to its PNG the way the training data was, and both go through the shipped model.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cds_devtools.dicom_data import make_dataset
from cds_service.core.domain import Task
from cds_service.core.models import load_model
from cds_service.core.preprocessing import (Framing, PreprocessingSpec, ct_windows_for, dicom_to_image, dicom_window, grey_to_image, resize,
                                           load_grey, read_dicom, to_batch)

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
DICOM_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "head_ct_dicom_unlabelled"


def brain_window_png(ds, center: float | None = None, width: float | None = None) -> bytes:
    """What the RSNA PNG conversion did: HU, the file's own window (or the one given), 8 bits."""
    if center is None or width is None:
        center, width = dicom_window(ds) or (40.0, 80.0)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    grey = np.clip((hu - (center - width / 2)) / width, 0, 1) * 255
    buffer = io.BytesIO()
    Image.fromarray(np.round(grey).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_head_slice() -> np.ndarray:
    """A skull ring around brain tissue with a bright crescent, stored as 12-bit CT with intercept -1024."""
    yy, xx = np.mgrid[:512, :512]
    r = np.hypot(yy - 256, xx - 256)
    hu = np.full((512, 512), -1000.0)
    hu[r < 200] = 35.0
    hu[(r >= 200) & (r < 215)] = 1000.0
    hu[(r > 170) & (r < 195) & (xx < 256)] = 70.0  # a subdural-like crescent
    return np.clip(hu + 1024, 0, 4095).astype(np.uint16)


def dicom_slices() -> list:
    if DICOM_DIR.is_dir():
        return [read_dicom(path) for path in sorted(DICOM_DIR.glob("*.dcm"))[:6]]
    return [read_dicom(make_dataset(synthetic_head_slice(), rescale_slope=1.0, rescale_intercept=-1024.0,
                                    window_center=40.0, window_width=80.0, bits_stored=12))]


def test_a_dicom_slice_and_its_png_conversion_give_the_model_the_same_input_and_answer() -> None:
    model = load_model(WEIGHTS, Task.HEAD_CT_ICH)
    spec = model.card.preprocessing
    assert spec.windows[0] == (40.0, 80.0), "without a brain window of its own, a DICOM gets the 40/80 HU brain window"
    assert spec.own_window is not None, "the training PNGs were made with each DICOM's own window"
    unframed = replace(spec, framing=Framing.NONE)
    slices, answered_alike = dicom_slices(), 0
    for ds in slices:
        png = load_grey(brain_window_png(ds))
        assert np.abs(dicom_to_image(ds, unframed) - grey_to_image(png, unframed)).max() <= 1.0 / 255 + 1e-6  # 8-bit rounding
        p_dicom, p_png = model.predict(to_batch([dicom_to_image(ds, spec), grey_to_image(png, spec)], spec))
        answered_alike += int(np.abs(p_dicom - p_png).max() < 0.02)
    # framed as the card says (spec.framing), 8-bit rounding can tip which part of a skull-base or vertex slice is
    # the largest bright region and so the crop: 1 of the 100 real RSNA DICOMs (docs/models.md)
    assert answered_alike >= len(slices) - 1


def test_the_real_slices_own_windows_are_used_and_differ_from_40_80() -> None:
    """The real RSNA DICOMs carry 30/80, 36/80, 40/150 ... windows: each is used, so the check above
    compares against the file's own conversion, not a fixed 40/80 one (which is 30 grey levels off for
    a 30/80 file)."""
    if not DICOM_DIR.is_dir():
        pytest.skip("the real RSNA DICOMs are not here")
    spec = load_model(WEIGHTS, Task.HEAD_CT_ICH).card.preprocessing
    windows = {ct_windows_for(ds, spec)[0] for ds in dicom_slices()}
    assert windows != {(40.0, 80.0)}
    ds = next(ds for ds in dicom_slices() if ct_windows_for(ds, spec)[0] != (40.0, 80.0))
    fixed = grey_to_image(load_grey(brain_window_png(ds, 40.0, 80.0)), spec)
    assert np.abs(dicom_to_image(ds, spec) - fixed).max() > 0.05


@pytest.mark.parametrize(("center", "width", "expected"), [
    (30.0, 80.0, (30.0, 80.0)),     # the commonest RSNA brain window
    (40.0, 150.0, (40.0, 150.0)),   # a wide brain window
    (500.0, 2000.0, (40.0, 80.0)),  # a bone window: the card's brain window instead
    (75.0, 215.0, (40.0, 80.0)),    # a subdural window: likewise
    (None, None, (40.0, 80.0)),     # no window at all
])
def test_own_window_only_when_it_is_a_brain_window(center, width, expected) -> None:
    spec = load_model(WEIGHTS, Task.HEAD_CT_ICH).card.preprocessing
    ds = make_dataset(synthetic_head_slice(), rescale_slope=1.0, rescale_intercept=-1024.0, window_center=center,
                      window_width=width, bits_stored=12)
    assert ct_windows_for(ds, spec) == (expected,) * 3


def test_a_multi_valued_window_gives_its_first_pair() -> None:
    ds = make_dataset(synthetic_head_slice(), rescale_slope=1.0, rescale_intercept=-1024.0, window_center=36.0,
                      window_width=80.0, bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = [36, 600], [80, 2800]
    assert dicom_window(ds) == (36.0, 80.0)
    ds.WindowWidth = 0
    assert dicom_window(ds) is None  # a window of no width is no window
    del ds.WindowWidth
    assert dicom_window(ds) is None


def test_own_window_is_checked_at_load() -> None:
    with pytest.raises(ValueError, match="own_window"):
        PreprocessingSpec(kind="ct_windows", input_size=224, windows=((40, 80), (80, 200), (600, 2800)),
                          own_window=((20, 60), (60, 160)))
    with pytest.raises(ValueError, match="own_window"):
        PreprocessingSpec(kind="mr_robust", input_size=224, own_window=((20, 60), (60, 160)))
    spec = PreprocessingSpec(kind="ct_windows", input_size=224, windows=((40, 80),) * 3, own_window=((20, 60), (60, 160)))
    assert PreprocessingSpec.from_card(spec.to_card(), 224) == spec


def test_a_different_window_is_not_the_same_input() -> None:
    """The check above can fail: a PNG made with a bone window is far from the model's input."""
    spec = load_model(WEIGHTS, Task.HEAD_CT_ICH).card.preprocessing
    ds = dicom_slices()[0]
    from_dicom = resize(dicom_to_image(ds, spec), spec.input_size)  # the model's input size: framing may crop apart
    bone = resize(grey_to_image(load_grey(brain_window_png(ds, 500.0, 2000.0)), spec), spec.input_size)
    assert np.abs(from_dicom - bone).max() > 0.2


@pytest.mark.parametrize("size", [256, 512])
def test_png_and_dicom_of_other_sizes_reach_the_model_size(size: int) -> None:
    spec = load_model(WEIGHTS, Task.HEAD_CT_ICH).card.preprocessing
    grey = np.zeros((size, size), np.uint8)
    assert to_batch([grey_to_image(grey, spec)], spec).shape == (1, 3, spec.input_size, spec.input_size)
