"""Training images to model input, through the service's own preprocessing only.

`load_grey` + `grey_to_image` for 8-bit files, `dicom_to_image` for DICOM, then `to_batch`: training
sees exactly what the service sees at inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom

from cds_service.core.preprocessing import PreprocessingSpec, dicom_to_image, grey_to_image, load_grey, read_dicom, to_batch

from .datasets import Sample


def load_image(path: Path, spec: PreprocessingSpec) -> np.ndarray:
    """One file to HxWx3 in [0, 1], through the service's own preprocessing functions."""
    if path.suffix.lower() == ".dcm":
        return dicom_to_image(read_dicom(path), spec)
    return grey_to_image(load_grey(path), spec)


def original_size_features(path: Path) -> tuple[int, int, str]:
    """(width, height, PIL mode) of the file as stored: what the size-only baseline may use."""
    from PIL import Image

    if path.suffix.lower() == ".dcm":
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        return int(ds.Columns), int(ds.Rows), str(getattr(ds, "PhotometricInterpretation", ""))
    with Image.open(path) as img:
        return img.size[0], img.size[1], img.mode


def preprocess_samples(samples: Sequence[Sample], spec: PreprocessingSpec, chunk: int = 64, progress: bool = True) -> np.ndarray:
    """All samples as one normalised N x 3 x S x S float16 array (the network's input).

    Built once and kept in memory: decoding and percentile-normalising every JPEG again
    each epoch would cost more CPU than the network on a 2-core machine.
    """
    from tqdm import tqdm

    out = np.empty((len(samples), 3, spec.input_size, spec.input_size), dtype=np.float16)
    bar = tqdm(total=len(samples), desc="preprocess", unit="img", disable=not progress, leave=False)
    for start in range(0, len(samples), chunk):
        part = samples[start : start + chunk]
        out[start : start + len(part)] = to_batch([load_image(s.path, spec) for s in part], spec)
        bar.update(len(part))
    bar.close()
    return out
