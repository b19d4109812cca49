"""Is this the anatomy the model reads, and is it like the images it learnt from? The input check.

A model scores whatever it is given: a chest X-ray fed to the head CT model gets a haemorrhage
probability like any slice. So a routed study is checked before anything is written, in two
separate questions with separate answers (`domain.InputFit`):

1. *Wrong anatomy or modality* is refused: the header's modality is not the task's
   (`domain.TASK_MODALITIES`), the header names another body part (`body_parts.other_body_part`),
   a CT is not head-shaped (`anatomy`), or the images are farther from the training images than any
   image of the right anatomy we have seen from any source (the card's `input_check.refuse_beyond`).
2. *Unfamiliar* images of the right anatomy (another hospital's scanner, protocol or export) are
   scored and marked `unfamiliar`: their distance from the training images is above the threshold
   that 99.5 % of the validation images stay under. A study is never dropped for coming from
   another hospital; the mark travels to the report, the worklist, the cards and the drift alarm.

Each task's card can name an *input profile*: what the model's inputs looked like on its
training split, as a small vector per image (the intensity histogram of the preprocessed input
and a 12×12 thumbnail of it), with their mean and a shrunk inverse covariance (Ledoit–Wolf).

The statistics are of the *preprocessed* input, so what the check sees is what the model sees:
windowing, photometric inversion and resizing are already applied. It needs no network, so it
also serves routing by pixels (`routing.task_from_pixels`), before any model is loaded.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import pydicom

from cds_service.core.anatomy import CtSliceShape, ct_shapes_verdict, dataset_shape, middle_slices
from cds_service.core.body_parts import anatomy_of_words, other_body_part
from cds_service.core.domain import TASK_MODALITIES, InputFit, Task

HISTOGRAM_BINS = 24
THUMBNAIL = 12
STATISTICS = f"sqrt histogram ({HISTOGRAM_BINS} bins) + {THUMBNAIL}x{THUMBNAIL} thumbnail of the model input"
DEFAULT_QUANTILE = 0.995


def image_statistics(image: np.ndarray) -> np.ndarray:
    """The vector the profile describes, of one preprocessed model input (H x W x 3 in [0, 1])."""
    grey = np.asarray(image[..., 0] if image.ndim == 3 else image, dtype=np.float32)
    histogram = np.histogram(grey, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0] / grey.size
    thumbnail = cv2.resize(grey, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA).ravel()
    return np.concatenate([np.sqrt(histogram), thumbnail]).astype(np.float32)


@dataclass(frozen=True)
class InputProfile:
    """Mean and shrunk precision of the training inputs' statistics; the familiarity threshold, and
    (optionally) the distance beyond which no image of the right anatomy was ever seen."""

    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    refuse_beyond: float | None = None  # None: the pixels alone never refuse (the header and shape still do)

    def __post_init__(self) -> None:
        size = HISTOGRAM_BINS + THUMBNAIL * THUMBNAIL
        if self.mean.shape != (size,) or self.precision.shape != (size, size):
            raise ValueError(f"an input profile holds a {size}-vector and a {size}x{size} matrix")
        if not np.isfinite(self.threshold) or self.threshold <= 0:
            raise ValueError("an input profile's threshold must be a positive number")
        if self.refuse_beyond is not None and not (np.isfinite(self.refuse_beyond) and self.refuse_beyond > self.threshold):
            raise ValueError("an input profile's refuse_beyond must be a number above its threshold")

    def distances(self, statistics: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of `statistics` (N x size) from the training mean."""
        centred = np.atleast_2d(statistics).astype(np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0.0))

    def fit_of(self, distance: float) -> InputFit:
        """What one distance means: familiar up to the threshold, wrong anatomy beyond `refuse_beyond`
        (where the profile has one), unfamiliar between: the one place this rule is written."""
        if distance <= self.threshold:
            return InputFit.FAMILIAR
        if self.refuse_beyond is not None and distance > self.refuse_beyond:
            return InputFit.WRONG_ANATOMY
        return InputFit.UNFAMILIAR

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {"mean": self.mean, "precision": self.precision, "threshold": np.float64(self.threshold)}
        if self.refuse_beyond is not None:
            arrays["refuse_beyond"] = np.float64(self.refuse_beyond)
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "InputProfile":
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            beyond = float(stored["refuse_beyond"]) if "refuse_beyond" in stored.files else None
            return cls(mean=stored["mean"].astype(np.float64), precision=stored["precision"].astype(np.float64),
                       threshold=float(stored["threshold"]), refuse_beyond=beyond)


def fit_profile(train: np.ndarray, validation: np.ndarray, quantile: float = DEFAULT_QUANTILE) -> InputProfile:
    """Fit on the training split; the threshold is a quantile of the validation split's distances."""
    from sklearn.covariance import LedoitWolf

    estimate = LedoitWolf().fit(train.astype(np.float64))
    unthresholded = InputProfile(mean=estimate.location_, precision=estimate.precision_, threshold=1.0)
    threshold = float(np.quantile(unthresholded.distances(validation), quantile))
    return InputProfile(mean=estimate.location_, precision=estimate.precision_, threshold=threshold)


@dataclass(frozen=True)
class InputVerdict:
    """What the input check said of a study's images, and in words why."""

    fit: InputFit
    reason: str
    distance: float | None = None

    @property
    def fits(self) -> bool | None:
        """False: refused (wrong anatomy or modality); True: scored (familiar or not); None: unchecked."""
        if self.fit is InputFit.WRONG_ANATOMY:
            return False
        return None if self.fit is InputFit.UNCHECKED else True

    def to_summary(self) -> dict[str, Any]:
        return {"fit": self.fit.value, "fits": self.fits,
                "distance": None if self.distance is None else round(self.distance, 2), "reason": self.reason}


def study_verdict(profile: InputProfile | None, statistics: Sequence[np.ndarray], task_name: str) -> InputVerdict:
    """Familiar when the median distance of the given images (a series' middle slices, or one image)
    is within the threshold (a few odd slices, the vertex or skull base, do not decide); unfamiliar
    above it; wrong anatomy beyond the profile's `refuse_beyond`."""
    if profile is None:
        return InputVerdict(InputFit.UNCHECKED, f"no input profile for {task_name}: the input check was not run")
    if not len(statistics):
        return InputVerdict(InputFit.UNCHECKED, "no image to check")
    distance = float(np.median(profile.distances(np.stack(list(statistics)))))
    fit = profile.fit_of(distance)
    if fit is InputFit.FAMILIAR:
        return InputVerdict(InputFit.FAMILIAR, f"the images fit {task_name}'s training inputs "
                                               f"(distance {distance:.1f} ≤ {profile.threshold:.1f})", distance)
    if fit is InputFit.WRONG_ANATOMY:
        return InputVerdict(InputFit.WRONG_ANATOMY,
                            f"the images are unlike any image of {task_name}'s anatomy we have seen, from any source "
                            f"(distance {distance:.1f} from its training images, beyond {profile.refuse_beyond:.1f}): "
                            "another body part or modality? Refused rather than guessed at", distance)
    return InputVerdict(InputFit.UNFAMILIAR,
                        f"scored, but the images are unlike {task_name}'s training images (distance {distance:.1f}, above "
                        f"the {profile.threshold:.1f} that 99.5 % of its validation images stay under): another scanner, "
                        "protocol or export; read the model's figures for them with care", distance)


def header_verdict(task: Task, modality: str, header_text: str) -> InputVerdict | None:
    """Wrong modality or body part by the DICOM header, else None (the header does not refuse).

    A series is routed by its header, the EHR's order or its pixels; a header that says it is another
    modality or names another body part (and not the task's own) is believed over the others."""
    modality = modality.strip().upper()
    if modality and modality not in TASK_MODALITIES[task]:
        return InputVerdict(InputFit.WRONG_ANATOMY,
                            f"the images are {modality}, and {task.value} reads {'/'.join(TASK_MODALITIES[task])} only: "
                            "refused rather than guessed at")
    own = "chest" if task is Task.CHEST_PNEUMOTHORAX else "head"
    other = other_body_part(header_text)
    named = anatomy_of_words(header_text, views=False)
    if other is not None and named != own:
        return InputVerdict(InputFit.WRONG_ANATOMY, f"the DICOM header names {other}, not the {own} {task.value} reads: "
                                                    "refused rather than guessed at")
    if named is not None and named != own:
        return InputVerdict(InputFit.WRONG_ANATOMY, f"the DICOM header names the {named}, not the {own} {task.value} "
                                                    "reads: refused rather than guessed at")
    return None


def profile_path(weights_dir: Path, task_value: str) -> Path:
    return Path(weights_dir) / f"{task_value}.input-profile.npz"


def load_profile(weights_dir: Path, task_value: str, card: dict[str, Any]) -> InputProfile | None:
    """The profile the card names, checked against its sha256; None when the card names none.

    A profile whose digest does not match the card raises ValueError: a check that silently
    compares against the wrong images is worse than none."""
    block = card.get("input_check")
    if not block:
        return None
    path = profile_path(weights_dir, task_value)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != block.get("sha256"):
        raise ValueError(f"{path.name} does not match its card (sha256 {digest[:12]}…, card says "
                         f"{str(block.get('sha256'))[:12]}…)")
    return InputProfile.from_bytes(data)


def series_verdict(task: Task, profile: InputProfile | None, statistics: Sequence[np.ndarray],
                   datasets: Sequence[pydicom.Dataset] = (),
                   ct_shapes: Sequence[CtSliceShape | None] | None = None,
                   modality: str = "", header_text: str = "") -> InputVerdict:
    """The input check of a routed study, before anything is written: the header (`header_verdict`:
    modality and named body part), for a head CT the physical look (`anatomy`: head-sized, no lung),
    then the input profile on the middle slices (familiar, unfamiliar, or beyond any image of the
    right anatomy). `statistics` and `datasets` in anatomical order (datasets may be empty: image files).

    `ct_shapes`, for a CT series streamed without keeping its datasets: the measured shapes of its
    middle slices (`anatomy.middle_slices(len(statistics))`, in that order), in place of `datasets`.
    `modality` and `header_text` (every header field that may name the anatomy), where known; read
    from the first dataset when not given."""
    if datasets and not modality:
        modality = str(getattr(datasets[0], "Modality", "") or "")
    if datasets and not header_text:
        header_text = " ".join(str(getattr(datasets[0], keyword, "") or "") for keyword in (
            "BodyPartExamined", "SeriesDescription", "ProtocolName", "StudyDescription", "RequestedProcedureDescription"))
    refused = header_verdict(task, modality, header_text)
    if refused is not None:
        return refused
    if (ct_shapes is None and task is Task.HEAD_CT_ICH and datasets
            and str(getattr(datasets[0], "Modality", "")).upper() == "CT"):
        ct_shapes = [dataset_shape(datasets[i]) for i in middle_slices(len(datasets))]
    if task is Task.HEAD_CT_ICH and ct_shapes is not None:
        anatomy = ct_shapes_verdict(ct_shapes)
        if anatomy.is_head is False:
            return InputVerdict(InputFit.WRONG_ANATOMY, f"not a head CT: {anatomy.reason}; refused rather than guessed at")
    return study_verdict(profile, [statistics[i] for i in middle_slices(len(statistics))], task.value)
