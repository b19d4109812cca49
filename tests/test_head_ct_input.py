"""Head CT: a DICOM slice and its 8-bit brain-window conversion reach the model alike.

The hemorrhage model is trained on RSNA PNGs, each made from a DICOM windowed with a brain
window (40/80 HU) and stored 8-bit. The service sees the DICOM: HU from Rescale Slope and
Intercept, the card's 40/80 HU window, the same resize. Here a DICOM is converted to its PNG
the way the training data was, and both go through the shipped model.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cds_devtools.dicom_data import make_dataset
from cds_service.core.domain import Task
from cds_service.core.models import load_model
from cds_service.core.preprocessing import dicom_to_image, grey_to_image, load_grey, read_dicom, to_batch

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
DICOM_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "head_ct_dicom_unlabelled"


def brain_window_png(ds, center: float = 40.0, width: float = 80.0) -> bytes:
    """What the RSNA PNG conversion did: HU, the window, 8 bits."""
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
    assert spec.windows[0] == (40.0, 80.0), "the card's DICOM window must be the training PNGs' brain window"
    for ds in dicom_slices():
        from_dicom = dicom_to_image(ds, spec)
        from_png = grey_to_image(load_grey(brain_window_png(ds)), spec)
        assert from_dicom.shape == from_png.shape
        assert np.abs(from_dicom - from_png).max() <= 1.0 / 255 + 1e-6  # 8-bit rounding only
        p_dicom, p_png = model.predict(to_batch([from_dicom, from_png], spec))
        assert np.abs(p_dicom - p_png).max() < 0.02


def test_a_different_window_is_not_the_same_input() -> None:
    """The check above can fail: a PNG made with a bone window is far from the model's input."""
    spec = load_model(WEIGHTS, Task.HEAD_CT_ICH).card.preprocessing
    ds = dicom_slices()[0]
    from_dicom = dicom_to_image(ds, spec)
    bone = grey_to_image(load_grey(brain_window_png(ds, 500.0, 2000.0)), spec)
    assert np.abs(from_dicom - bone).max() > 0.2


@pytest.mark.parametrize("size", [256, 512])
def test_png_and_dicom_of_other_sizes_reach_the_model_size(size: int) -> None:
    spec = load_model(WEIGHTS, Task.HEAD_CT_ICH).card.preprocessing
    grey = np.zeros((size, size), np.uint8)
    assert to_batch([grey_to_image(grey, spec)], spec).shape == (1, 3, spec.input_size, spec.input_size)
