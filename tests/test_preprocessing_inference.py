"""Preprocessing from DICOM headers, and turning probabilities into findings."""

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cds_service.core.domain import Task
from cds_service.core.errors import BadDicomError
from cds_service.core.inference import findings_from_scores
from cds_service.core.model_cards import ModelCard
from cds_service.core.preprocessing import (PreprocessingSpec, dicom_to_image, grey_to_image, read_dicom, robust_normalise,
                                            to_batch, window)
from support import PREPROCESSING, make_test_weights


def dicom(pixels: np.ndarray, **tags) -> pydicom.Dataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("x", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


CT = PreprocessingSpec.from_card(PREPROCESSING[Task.HEAD_CT_ICH], 64)


def test_ct_windows_use_rescale_slope_and_intercept():
    stored = np.full((16, 16), 1024 + 40, np.uint16)  # HU 40 with intercept -1024
    image = dicom_to_image(dicom(stored, RescaleSlope=1, RescaleIntercept=-1024), CT)
    assert image.shape == (16, 16, 3)
    assert image[0, 0, 0] == pytest.approx(0.5)          # brain 40/80: centre
    assert image[0, 0, 1] == pytest.approx((40 - (80 - 100)) / 200)  # subdural 80/200
    assert image[0, 0, 2] == pytest.approx((40 - (600 - 1400)) / 2800)  # bone 600/2800
    doubled = dicom_to_image(dicom(np.full((16, 16), 532, np.uint16), RescaleSlope=2, RescaleIntercept=-1024), CT)
    assert doubled[0, 0, 0] == pytest.approx(0.5)


def test_xray_monochrome1_is_inverted():
    spec = PreprocessingSpec.from_card(PREPROCESSING[Task.CHEST_PNEUMOTHORAX], 64)
    ramp = np.tile(np.arange(32, dtype=np.uint16) * 100, (32, 1))
    mono2 = dicom_to_image(dicom(ramp), spec)
    mono1 = dicom_to_image(dicom(ramp, PhotometricInterpretation="MONOCHROME1"), spec)
    assert mono2[0, -1, 0] > mono2[0, 0, 0]
    assert mono1[0, -1, 0] < mono1[0, 0, 0]
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-5)


def test_mr_robust_normalisation_ignores_outliers():
    values = np.concatenate([np.linspace(0, 100, 1000), [10_000]])
    out = robust_normalise(values, (0.5, 99.5))
    assert out.min() == 0.0 and out.max() == 1.0 and out[500] == pytest.approx(0.5, abs=0.02)
    assert not robust_normalise(np.ones(10), (1, 99)).any()


def test_png_path_matches_dicom_path_for_brain_window():
    spec = PreprocessingSpec.from_card({"kind": "ct_windows", "windows": [[40, 80]] * 3}, 32)
    grey = np.arange(256, dtype=np.float32).reshape(16, 16)
    hu = grey / 255.0 * 80.0
    ds = dicom(np.round(hu + 1024).astype(np.uint16), RescaleSlope=1, RescaleIntercept=-1024)
    np.testing.assert_allclose(dicom_to_image(ds, spec), grey_to_image(grey, spec), atol=1.0 / 80 + 1e-6)


def test_batch_shape_and_normalisation():
    batch = to_batch([np.full((10, 20, 3), 0.5, np.float32)] * 3, CT)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == np.float32
    assert np.allclose(batch, 0.0)  # (0.5 - mean 0.5) / std


@pytest.mark.parametrize("blob, message", [(b"", "0 bytes"), (b"not dicom at all", "not a readable DICOM")])
def test_broken_dicom_is_a_clear_error(blob, message):
    with pytest.raises(BadDicomError, match=message):
        read_dicom(blob)


def test_pixelless_dicom_is_a_clear_error():
    ds = dicom(np.zeros((8, 8)))
    del ds.PixelData
    with pytest.raises(BadDicomError, match="no pixel data"):
        dicom_to_image(ds, CT)


def test_window_maths():
    assert window(np.array([0.0, 40.0, 80.0, 200.0]), 40, 80).tolist() == [0.0, 0.5, 1.0, 1.0]


def card(task=Task.HEAD_CT_ICH):
    return ModelCard.from_dict({
        "task": "head_ct_ich", "name": "m", "version": "1", "labels": ["any", "epidural", "intraparenchymal",
        "intraventricular", "subarachnoid", "subdural"], "trained_labels": ["any"], "activation": "sigmoid",
        "input_size": 64, "preprocessing": PREPROCESSING[task], "thresholds": {"any": 0.3}})


def test_findings_use_card_thresholds_and_never_report_untrained_labels_as_positive():
    findings = findings_from_scores(card(), np.array([0.31, 0.99, 0.99, 0.99, 0.99, 0.99]))
    by_label = {f.label: f for f in findings}
    assert by_label["any"].positive and by_label["any"].threshold == 0.3
    assert not any(f.positive for f in findings if f.label != "any")
    assert not by_label["subdural"].trained
    assert not findings_from_scores(card(), np.array([0.29, 0, 0, 0, 0, 0]))[0].positive


def test_card_validation():
    data = card().raw | {"thresholds": {}}
    from cds_service.core.errors import ModelUnavailableError
    with pytest.raises(ModelUnavailableError, match="threshold"):
        ModelCard.from_dict(data)
    with pytest.raises(ModelUnavailableError, match="labels"):
        ModelCard.from_dict(card().raw | {"labels": ["any"]})


# --- compressed transfer syntaxes, as a PACS may store them ----------------------------


@pytest.mark.parametrize("syntax", ["rle", "jpegls", "jpeg2000"])
def test_lossless_compressed_ct_decodes_to_the_same_image(syntax):
    from cds_devtools.dicom_data import make_dataset

    stored = (np.arange(64 * 64).reshape(64, 64) % 2000).astype(np.uint16)
    plain = make_dataset(stored, modality="CT", rescale_slope=1, rescale_intercept=-1024)
    packed = read_dicom(_part10(make_dataset(stored, modality="CT", rescale_slope=1, rescale_intercept=-1024,
                                             transfer_syntax=syntax)))
    assert packed.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(dicom_to_image(packed, CT), dicom_to_image(plain, CT))


def test_jpeg_baseline_decodes():
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    grey = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG", quality=95)
    ds = dicom(np.zeros((64, 64)), BitsAllocated=8, BitsStored=8, HighBit=7)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    image = dicom_to_image(read_dicom(_part10(ds)), PreprocessingSpec.from_card(PREPROCESSING[Task.BRAIN_MRI], 64))
    assert np.corrcoef(image[..., 0].ravel(), grey.ravel().astype(float))[0, 1] > 0.99


def test_unknown_transfer_syntax_is_a_clear_error():
    ds = dicom(np.zeros((16, 16)))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    with pytest.raises(BadDicomError, match="transfer syntax 1.2.3.4.5.6.7"):
        dicom_to_image(ds, CT)


def _part10(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_one_window_on_three_channels_is_resized_once_with_the_same_result():
    """The shipped head CT card puts one window on all channels; that shortcut must not change pixels."""
    from cds_service.core.preprocessing import PreprocessingSpec, dicom_to_image, resize, to_batch
    from cds_devtools.dicom_data import make_dataset

    stored = (np.arange(96 * 80).reshape(96, 80) % 1500).astype(np.uint16)
    ds = make_dataset(stored, modality="CT", rescale_slope=1, rescale_intercept=-1024)
    same = PreprocessingSpec(kind="ct_windows", input_size=32, windows=((40.0, 80.0),) * 3)
    image = dicom_to_image(ds, same)
    assert image.shape == (96, 80, 3) and image.strides[2] == 0  # one plane, three views
    full_copy = np.array(image)  # an ordinary array: resized channel by channel
    np.testing.assert_array_equal(resize(image, 32), resize(full_copy, 32))
    np.testing.assert_array_equal(to_batch([image], same), to_batch([full_copy], same))
    mixed = PreprocessingSpec(kind="ct_windows", input_size=32, windows=((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)))
    three = dicom_to_image(ds, mixed)
    assert three.strides[2] != 0 and not np.array_equal(three[..., 0], three[..., 2])


@pytest.mark.parametrize("slope,intercept", [(1, -1024), (2, -1024), (0.5, -1000.5), (1, 0)])
def test_modality_values_match_pydicom(slope, intercept):
    """The float32 in-place rescale gives what pydicom's apply_modality_lut gives."""
    from pydicom.pixels import apply_modality_lut

    from cds_service.core.preprocessing import modality_values

    stored = (np.arange(64 * 48).reshape(64, 48) * 7 % 4096).astype(np.uint16)
    ds = read_dicom(_part10(dicom(stored, RescaleSlope=slope, RescaleIntercept=intercept)))
    expected = apply_modality_lut(ds.pixel_array, ds)
    values = modality_values(ds)
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-3)


def test_modality_lut_sequence_is_still_applied():
    from pydicom.dataset import Dataset

    from cds_service.core.preprocessing import modality_values

    ds = dicom(np.array([[0, 1], [2, 3]] * 4, np.uint16).reshape(8, 2).repeat(4, axis=1))
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.LUTData = [100, 200, 300, 400]
    lut.ModalityLUTType = "HU"
    ds.ModalityLUTSequence = [lut]
    values = modality_values(ds)
    assert set(np.unique(values)) == {100.0, 200.0, 300.0, 400.0}


def test_slices_are_scored_in_batches_of_equal_size():
    """40 slices at batch 16 go as 13+14+13: a short last batch costs almost as much per image as one."""
    from types import SimpleNamespace

    from cds_service.core.inference import score_images
    from cds_service.core.model_cards import SeriesPooling

    sizes: list[int] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return batch.mean(axis=(2, 3))[:, :2]  # any per-image function of the pixels

    spec = PreprocessingSpec(kind="mr_robust", input_size=16)
    model = SimpleNamespace(card=SimpleNamespace(preprocessing=spec, series_pooling=SeriesPooling()), predict_with_features=lambda b: (predict(b), None))
    rng = np.random.default_rng(0)
    images = [np.broadcast_to(rng.random((12, 12, 1), dtype=np.float32), (12, 12, 3)) for _ in range(40)]
    scores = score_images(model, images, batch_size=16)
    assert sizes == [13, 14, 13]
    one_batch = predict(to_batch(images, spec))
    np.testing.assert_allclose(scores.per_slice, one_batch, rtol=1e-6)
    assert scores.features is None
    assert scores.driving_slice(0) == int(np.argmax(one_batch[:, 0]))
    sizes.clear()
    score_images(model, images[:5], batch_size=16)
    assert sizes == [5]


def test_only_a_pooled_linear_head_gets_grad_cam_without_a_backward_pass():
    import torch

    from cds_service.core.models import create_network, linear_head_weights

    network = create_network(6)
    weights = linear_head_weights(network)
    assert weights is not None and weights.shape == (6, 1280)
    np.testing.assert_array_equal(weights, network.classifier.weight.detach().numpy())
    network.global_pool.pool_type = "max"  # max pooling: the gradient is not W / hw any more
    assert linear_head_weights(network) is None
    assert linear_head_weights(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())) is None


@pytest.mark.slow  # an ONNX export
@pytest.mark.parametrize("runtime", ["auto", "torch"])
def test_triage_explains_from_the_scoring_pass_only_where_it_can(tmp_path, monkeypatch, runtime):
    """ONNX Runtime returns the feature map: no backward pass. torch: pytorch-grad-cam runs."""
    import cds_service.core.explain as explain_module
    from cds_service.core.domain import Priority
    from cds_service.core.models import load_model
    from cds_service.core.triage import triage_images

    make_test_weights(tmp_path, Task.HEAD_CT_ICH, input_size=64)
    model = load_model(tmp_path, Task.HEAD_CT_ICH, runtime=runtime)
    backward_passes = []
    real_grad_cam = explain_module.grad_cam
    monkeypatch.setattr(explain_module, "grad_cam", lambda *a, **k: backward_passes.append(1) or real_grad_cam(*a, **k))
    rng = np.random.default_rng(0)
    images = [np.broadcast_to(rng.random((80, 80, 1), dtype=np.float32), (80, 80, 3)) for _ in range(5)]
    result = triage_images(model, images, {"any": Priority.STAT}, study_uid="1.2.3")
    assert result.heatmap is not None and result.heatmap.png.startswith(b"\x89PNG")
    assert backward_passes == ([] if runtime == "auto" else [1])


def test_slices_scored_as_they_arrive_get_the_same_scores_in_equal_batches():
    """score_stream (the pipeline's, overlapping transfer and scoring) = score_images, whatever the
    PACS's announced count; a failing transfer fails the scoring."""
    from types import SimpleNamespace

    from cds_service.core.inference import batch_sizes, score_images, score_stream
    from cds_service.core.model_cards import SeriesPooling

    sizes: list[int] = []

    def predict(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sizes.append(len(batch))
        return batch.mean(axis=(2, 3))[:, :2], batch[:, :, :2, :2]  # per-image functions of the pixels

    spec = PreprocessingSpec(kind="mr_robust", input_size=16)
    model = SimpleNamespace(card=SimpleNamespace(preprocessing=spec, series_pooling=SeriesPooling()), predict_with_features=predict)
    rng = np.random.default_rng(1)
    images = [np.broadcast_to(rng.random((12, 12, 1), dtype=np.float32), (12, 12, 3)) for _ in range(40)]
    reference = score_images(model, images, batch_size=16)
    assert batch_sizes(40, 16) == [13, 14, 13] and batch_sizes(0, 16) == []
    for expected, batches in ((40, [13, 14, 13]), (0, [16, 16, 8]), (30, [15, 15, 10]), (50, [12, 13, 13, 2])):
        sizes.clear()
        streamed = score_stream(model, iter(images), expected, batch_size=16)
        assert sizes == batches, expected
        np.testing.assert_array_equal(streamed.per_slice, reference.per_slice)
        np.testing.assert_array_equal(streamed.features, reference.features)
    order = list(range(39, -1, -1))
    reordered = reference.reordered(order)
    np.testing.assert_array_equal(reordered.per_slice, reference.per_slice[::-1])
    assert reordered.driving_slice(0) == 39 - reference.driving_slice(0)

    def broken_transfer():
        yield from images[:20]
        raise ConnectionError("PACS went away")

    with pytest.raises(ConnectionError):
        score_stream(model, broken_transfer(), 40, batch_size=16)
    with pytest.raises(ValueError, match="no images"):
        score_stream(model, iter([]), 0)


def test_the_overlay_is_the_same_drawn_on_the_display_copy_the_pipeline_keeps():
    from cds_service.core.explain import overlay_png, overlay_size
    from cds_service.core.preprocessing import display_image

    rng = np.random.default_rng(4)
    cam = rng.random((16, 16), dtype=np.float32)
    for shape in ((700, 600), (300, 300)):  # larger than the overlay (resized, made square), and smaller
        image = np.broadcast_to(rng.random(shape + (1,), dtype=np.float32), shape + (3,))
        kept = display_image(image, overlay_size(image))
        assert kept.shape[:2] == (min(max(shape), 512),) * 2
        assert overlay_png(kept, cam) == overlay_png(image, cam)


def test_the_overlay_png_is_lossless_rgb():
    """The fast PNG settings (one filter, run-length zlib) still give back every pixel, in RGB order."""
    from PIL import Image

    from cds_service.core.explain import png_bytes

    rng = np.random.default_rng(5)
    smooth = np.repeat(np.linspace(0, 255, 300, dtype=np.uint8)[None, :, None], 200, axis=0)
    for rgb in (rng.integers(0, 256, (64, 80, 3), dtype=np.uint8),
                np.concatenate([smooth, smooth[:, ::-1], np.zeros_like(smooth)], axis=2)):
        decoded = Image.open(io.BytesIO(png_bytes(rgb)))
        assert decoded.format == "PNG" and decoded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(decoded), rgb)


def test_framing_crops_a_square_around_the_head_whatever_the_field_of_view() -> None:
    """framing=body: the same head, small in a wide field (a table line below it) or filling a tight crop,
    reaches the model at the same size; framing=none leaves the image as it is."""
    import cv2

    from cds_service.core.preprocessing import Framing, body_box, framed

    wide = np.zeros((512, 512), np.float32)
    cv2.ellipse(wide, (256, 220), (120, 150), 0, 0, 360, 0.5, -1)  # a head, 240 x 300 px
    wide[420:423, 20:492] = 1.0  # a thin table line: opened away, not part of the head
    top, left, side = body_box(wide)
    assert abs(side - round(300 * 1.08)) <= 8 and abs(top + side / 2 - 220) <= 4 and abs(left + side / 2 - 256) <= 4
    head = framed(wide, Framing.BODY)
    tight = framed(np.ascontiguousarray(wide[65:376, 131:382]), Framing.BODY)  # the same head cropped by an export
    assert head.shape[0] == head.shape[1] and abs(head.shape[0] - tight.shape[0]) <= 8
    assert framed(wide, Framing.NONE) is wide
    assert body_box(np.zeros((64, 64), np.float32)) is None  # nothing bright: left as it is
    three = np.stack([wide] * 3, axis=2)
    assert framed(three, Framing.BODY).shape == (side, side, 3)


def test_framing_is_a_card_setting_for_ct_windows_only() -> None:
    from cds_service.core.preprocessing import Framing

    spec = PreprocessingSpec(kind="ct_windows", input_size=64, windows=((40.0, 80.0),) * 3, framing=Framing.BODY)
    assert spec.to_card()["framing"] == "body" and PreprocessingSpec.from_card(spec.to_card(), 64) == spec
    assert "framing" not in PreprocessingSpec(kind="ct_windows", input_size=64, windows=((40.0, 80.0),) * 3).to_card()
    with pytest.raises(ValueError, match="framing"):
        PreprocessingSpec(kind="mr_robust", input_size=64, framing=Framing.BODY)
    with pytest.raises(ValueError):
        PreprocessingSpec.from_card({"kind": "ct_windows", "windows": [[40, 80]] * 3, "framing": "face"}, 64)
