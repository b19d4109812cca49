"""The input check (cds_service.core.input_profile): wrong anatomy or modality is refused, images of the right
anatomy from elsewhere are scored and marked unfamiliar. Pure functions, real images and the shipped profiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cds_service.core.domain import InputFit, Task
from cds_service.core.input_profile import (InputProfile, InputVerdict, header_verdict, image_statistics, load_profile,
                                            series_verdict, study_verdict)
from cds_service.core.preprocessing import PreprocessingSpec, dicom_to_image, grey_to_image, load_grey, resize

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MENINGIOMA = DATA / "brain_mri" / "meningioma" / "Tr-meTr_0000.jpg"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def shipped(task: Task) -> tuple[InputProfile, PreprocessingSpec]:
    card = json.loads((ROOT / "weights" / f"{task.value}.json").read_text())
    profile = load_profile(ROOT / "weights", task.value, card)
    assert profile is not None and profile.refuse_beyond is not None
    return profile, PreprocessingSpec.from_card(card["preprocessing"], card["input_size"])


def statistics_of_grey(grey: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    return image_statistics(resize(grey_to_image(grey.astype(np.float32), spec), spec.input_size))


@pytest.mark.parametrize(("task", "modality", "text", "refused_because"), [
    (Task.BRAIN_MRI, "CT", "HEAD", "are CT"),
    (Task.BRAIN_MRI, "US", "", "are US"),
    (Task.BRAIN_MRI, "CR", "CHEST PA", "are CR"),
    (Task.BRAIN_MRI, "MR", "KNEE", "names KNEE"),
    (Task.BRAIN_MRI, "MR", "L-SPINE SAG T2", "names SPINE"),
    (Task.HEAD_CT_ICH, "MR", "BRAIN", "are MR"),
    (Task.HEAD_CT_ICH, "CT", "CT ABDOMEN PELVIS", "names PELVIS"),
    (Task.HEAD_CT_ICH, "CT", "THORAX", "names the chest"),
    (Task.CHEST_PNEUMOTHORAX, "DX", "HAND PA", "names HAND"),
    (Task.CHEST_PNEUMOTHORAX, "MR", "CHEST", "are MR"),
])
def test_the_wrong_modality_or_body_part_in_the_header_is_refused(task: Task, modality: str, text: str,
                                                                   refused_because: str) -> None:
    verdict = header_verdict(task, modality, text)
    assert verdict is not None and verdict.fit is InputFit.WRONG_ANATOMY and verdict.fits is False
    assert refused_because in verdict.reason and "refused" in verdict.reason


@pytest.mark.parametrize(("task", "modality", "text"), [
    (Task.HEAD_CT_ICH, "CT", "CT HEAD/NECK TRAUMA C-SPINE"),  # the task's own anatomy named too: believed
    (Task.HEAD_CT_ICH, "CT", "AXIAL 5MM"),  # silent: the other checks decide
    (Task.HEAD_CT_ICH, "", ""),  # an image file: no header at all
    (Task.BRAIN_MRI, "MR", "MR BRAIN T1 POST SELLA"),
    (Task.CHEST_PNEUMOTHORAX, "CR", "CHEST PA"),
    (Task.CHEST_PNEUMOTHORAX, "DX", ""),
])
def test_a_header_of_the_right_modality_and_anatomy_or_a_silent_one_does_not_refuse(task: Task, modality: str,
                                                                                      text: str) -> None:
    assert header_verdict(task, modality, text) is None


@pytest.mark.skipif(not MENINGIOMA.is_file(), reason="../shared/data/brain_mri is not here")
def test_a_brain_mr_unlike_the_training_images_is_scored_and_marked_unfamiliar_not_refused() -> None:
    """The same real meningioma slice with another display curve (grey levels to the power 0.5, as another
    scanner's or PACS's export might give): familiar as it is, unfamiliar so changed, refused neither time."""
    profile, spec = shipped(Task.BRAIN_MRI)
    grey = load_grey(MENINGIOMA)
    as_trained = study_verdict(profile, [statistics_of_grey(grey, spec)], "brain_mri")
    elsewhere = study_verdict(profile, [statistics_of_grey(255.0 * (grey / 255.0) ** 0.5, spec)], "brain_mri")
    assert as_trained.fit is InputFit.FAMILIAR
    assert elsewhere.fit is InputFit.UNFAMILIAR and elsewhere.fits is True, elsewhere.reason
    assert profile.threshold < (elsewhere.distance or 0) <= (profile.refuse_beyond or 0)
    assert "scored" in elsewhere.reason and "another scanner" in elsewhere.reason


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm"])
def test_an_image_unlike_any_brain_mr_is_refused_by_its_pixels_alone(name: str) -> None:
    """Two real images of the DICOM WG04 test set (pydicom's test files): a 64 px MR crop that is no whole brain
    slice, and a CT. With the header read away (an image file), the pixels alone refuse them."""
    profile, spec = shipped(Task.BRAIN_MRI)
    ds = pydicom.dcmread(PYDICOM_FILES / name)
    verdict = study_verdict(profile, [image_statistics(resize(dicom_to_image(ds, spec), spec.input_size))], "brain_mri")
    assert verdict.fit is InputFit.WRONG_ANATOMY, verdict.reason
    assert "unlike any image of brain_mri's anatomy" in verdict.reason


def test_the_series_check_reads_the_header_of_the_first_dataset_before_the_pixels() -> None:
    profile, spec = shipped(Task.BRAIN_MRI)
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    ds.BodyPartExamined = "KNEE"
    statistics = [image_statistics(resize(dicom_to_image(ds, spec), spec.input_size))]
    verdict = series_verdict(Task.BRAIN_MRI, profile, statistics, [ds])
    assert verdict.fit is InputFit.WRONG_ANATOMY and "names KNEE" in verdict.reason


def test_a_profile_without_a_refusal_distance_never_refuses_on_pixels_and_no_profile_is_unchecked() -> None:
    profile, _ = shipped(Task.BRAIN_MRI)
    lenient = InputProfile(mean=profile.mean, precision=profile.precision, threshold=profile.threshold)
    far = profile.mean + 100.0
    assert study_verdict(lenient, [far], "brain_mri").fit is InputFit.UNFAMILIAR
    assert study_verdict(profile, [far], "brain_mri").fit is InputFit.WRONG_ANATOMY
    unchecked = study_verdict(None, [far], "brain_mri")
    assert unchecked.fit is InputFit.UNCHECKED and unchecked.fits is None


def test_a_profile_round_trips_with_its_refusal_distance_and_refuses_a_bad_one() -> None:
    profile, _ = shipped(Task.CHEST_PNEUMOTHORAX)
    again = InputProfile.from_bytes(profile.to_bytes())
    assert again.refuse_beyond == profile.refuse_beyond and again.threshold == profile.threshold
    with pytest.raises(ValueError, match="refuse_beyond"):
        InputProfile(mean=profile.mean, precision=profile.precision, threshold=2.0, refuse_beyond=1.0)


def test_the_verdict_summary_says_the_fit() -> None:
    summary = InputVerdict(InputFit.UNFAMILIAR, "why", 31.234).to_summary()
    assert summary == {"fit": "unfamiliar", "fits": True, "distance": 31.23, "reason": "why"}
