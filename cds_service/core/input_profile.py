"""Is this image like the ones the model learnt from? A cheap out-of-distribution check per task.

A model scores whatever it is given: a chest X-ray fed to the head CT model gets a haemorrhage
probability like any slice. Each task's card can name an *input profile*: what the model's
inputs looked like on its training split, as a small vector per image (the intensity histogram
of the preprocessed input and a 12×12 thumbnail of it), with their mean and a shrunk inverse
covariance (Ledoit–Wolf). An image whose Mahalanobis distance from that mean is above the
threshold (the 99.5th percentile of the validation split's distances) is refused with its
distance as the reason, never scored as if it belonged.

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
from cds_service.core.domain import Task

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
    """Mean and shrunk precision of the training inputs' statistics, and the refusal threshold."""

    mean: np.ndarray
    precision: np.ndarray
    threshold: float

    def __post_init__(self) -> None:
        size = HISTOGRAM_BINS + THUMBNAIL * THUMBNAIL
        if self.mean.shape != (size,) or self.precision.shape != (size, size):
            raise ValueError(f"an input profile holds a {size}-vector and a {size}x{size} matrix")
        if not np.isfinite(self.threshold) or self.threshold <= 0:
            raise ValueError("an input profile's threshold must be a positive number")

    def distances(self, statistics: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of `statistics` (N x size) from the training mean."""
        centred = np.atleast_2d(statistics).astype(np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0.0))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, precision=self.precision, threshold=np.float64(self.threshold))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "InputProfile":
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            return cls(mean=stored["mean"].astype(np.float64), precision=stored["precision"].astype(np.float64),
                       threshold=float(stored["threshold"]))


def fit_profile(train: np.ndarray, validation: np.ndarray, quantile: float = DEFAULT_QUANTILE) -> InputProfile:
    """Fit on the training split; the threshold is a quantile of the validation split's distances."""
    from sklearn.covariance import LedoitWolf

    estimate = LedoitWolf().fit(train.astype(np.float64))
    unthresholded = InputProfile(mean=estimate.location_, precision=estimate.precision_, threshold=1.0)
    threshold = float(np.quantile(unthresholded.distances(validation), quantile))
    return InputProfile(mean=estimate.location_, precision=estimate.precision_, threshold=threshold)


@dataclass(frozen=True)
class InputVerdict:
    """Whether a study's images fit the task's inputs, and in words why."""

    fits: bool | None  # None: not checked (no profile for this task)
    reason: str
    distance: float | None = None

    def to_summary(self) -> dict[str, Any]:
        return {"fits": self.fits, "distance": None if self.distance is None else round(self.distance, 2),
                "reason": self.reason}


def study_verdict(profile: InputProfile | None, statistics: Sequence[np.ndarray], task_name: str) -> InputVerdict:
    """A study fits when the median distance of the given images (a series' middle slices, or one
    image) is within the threshold: a few odd slices (vertex, skull base) do not refuse a series."""
    if profile is None:
        return InputVerdict(None, f"no input profile for {task_name}: the input check was not run")
    if not len(statistics):
        return InputVerdict(None, "no image to check")
    distance = float(np.median(profile.distances(np.stack(list(statistics)))))
    if distance <= profile.threshold:
        return InputVerdict(True, f"the images fit {task_name}'s training inputs "
                                  f"(distance {distance:.1f} ≤ {profile.threshold:.1f})", distance)
    return InputVerdict(False, f"the images do not look like what {task_name} was trained on (distance "
                               f"{distance:.1f} from its training images, above {profile.threshold:.1f}, which 99.5 % "
                               f"of its validation images stay under): refused rather than guessed at", distance)


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
                   ct_shapes: Sequence[CtSliceShape | None] | None = None) -> InputVerdict:
    """The input check of a routed study, before anything is written: for a head CT first the
    physical look (`anatomy`: head-sized, no lung), then the input profile on the middle slices.
    `statistics` and `datasets` in anatomical order (datasets may be empty: image files).

    `ct_shapes`, for a CT series streamed without keeping its datasets: the measured shapes of its
    middle slices (`anatomy.middle_slices(len(statistics))`, in that order), in place of `datasets`."""
    if (ct_shapes is None and task is Task.HEAD_CT_ICH and datasets
            and str(getattr(datasets[0], "Modality", "")).upper() == "CT"):
        ct_shapes = [dataset_shape(datasets[i]) for i in middle_slices(len(datasets))]
    if task is Task.HEAD_CT_ICH and ct_shapes is not None:
        anatomy = ct_shapes_verdict(ct_shapes)
        if anatomy.is_head is False:
            return InputVerdict(False, f"not a head CT: {anatomy.reason}; refused rather than guessed at")
    return study_verdict(profile, [statistics[i] for i in middle_slices(len(statistics))], task.value)
