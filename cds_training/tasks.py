"""What differs between the three tasks at training time: activation, preprocessing, augmentation, pooling, provenance."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from cds_service.core import domain
from cds_service.core.domain import Task
from cds_service.core.model_cards import PoolingMethod, SeriesPooling
from cds_service.core.preprocessing import Framing, PreprocessingSpec

CARD_VERSION = "1.0.0"


DISCLAIMER = f"{domain.DISCLAIMER} For worklist prioritisation only; a radiologist reads every study."


@dataclass(frozen=True)
class Augmentation:
    """Random training-time changes; modest, because anatomy has a fixed orientation.

    Applied to the batch after the service preprocessing (so the un-augmented tensor is
    exactly the inference input). Brightness/contrast act on the [0, 1] image.
    """

    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    hflip: bool = True
    # what differs between hospitals' scanners and exports (0 = off), each drawn per image:
    aspect: float = 0.0  # width and height scaled apart by up to this share (a non-square export squashed)
    gamma: float = 0.0  # grey levels raised to exp(±gamma): another window shape or display curve
    noise: float = 0.0  # Gaussian noise of up to this standard deviation (on [0, 1]): dose, kernel
    blur: float = 0.0  # Gaussian blur of up to this sigma in input pixels, on half the images: a soft kernel
    downscale: float = 1.0  # on half the images, down to this share of the size and back: a coarser matrix or export


# The scanner-robust additions (`--augmentation scanner`), per task: what the outside checks found
# differing between our training images and other hospitals' (framing, window, noise, resolution).
SCANNER_AUGMENTATION: dict[str, dict[str, Any]] = {
    "head_ct_ich": {"scale": (0.85, 1.2), "aspect": 0.1, "gamma": 0.3, "noise": 0.03, "blur": 1.0, "downscale": 0.5},
    "brain_mri": {"scale": (0.8, 1.2), "aspect": 0.1, "gamma": 0.4, "noise": 0.04, "blur": 1.0, "downscale": 0.5},
    "chest_pneumothorax": {"aspect": 0.05, "gamma": 0.3, "noise": 0.02, "blur": 0.8, "downscale": 0.6},
}


@dataclass(frozen=True)
class TaskSetup:
    """The fixed, per-task parts of a model: output activation, preprocessing, augmentation."""

    task: Task
    activation: str
    spec_kind: str
    windows: tuple[tuple[float, float], ...]
    augmentation: Augmentation
    intended_use: str
    preprocessing_note: str
    series_pooling: SeriesPooling = SeriesPooling()
    # the bar a trained label must clear on the validation split before its finding may raise a priority
    priority_bar_min_positives: int = 20
    priority_bar_min_auc_lower95: float = 0.80
    # ((center lo, hi), (width lo, hi)) HU: a DICOM's own window within these is used (PreprocessingSpec.own_window)
    own_window: tuple[tuple[float, float], tuple[float, float]] | None = None
    framing: Framing = Framing.NONE


TASK_SETUPS: dict[Task, TaskSetup] = {
    Task.BRAIN_MRI: TaskSetup(
        Task.BRAIN_MRI,
        "softmax",
        "mr_robust",
        (),
        # stronger than the first models' (rotate 10, scale 0.9-1.1, brightness 0.1, contrast 0.15): scanners
        # and hospitals differ in intensity and framing, and meningiomas were missed on unseen images
        Augmentation(rotate_deg=15, scale=(0.85, 1.15), translate=0.08, brightness=0.15, contrast=0.25, hflip=True),
        "Flag single 2D brain MRI slices that may show a glioma, meningioma or pituitary tumour, "
        "to move the study up a radiologist's worklist.",
        "Grey levels are percentile-normalised per image (0.5th/99.5th percentile to 0/1), since MR "
        "intensities have no absolute scale; 8-bit JPEG/PNG and DICOM go through the same step.",
    ),
    Task.HEAD_CT_ICH: TaskSetup(
        Task.HEAD_CT_ICH,
        "sigmoid",
        "ct_windows",
        ((40.0, 80.0), (40.0, 80.0), (40.0, 80.0)),
        # bleeds occur on either side, so left-right flips are valid; windowed CT keeps brightness small
        # brightness/contrast wide enough to cover the spread of DICOM brain windows the PNGs were made with
        # (30/80 to 40/150 HU); DICOM input gets its own brain window too (own_window below)
        Augmentation(rotate_deg=10, scale=(0.9, 1.1), translate=0.05, brightness=0.12, contrast=0.25, hflip=True),
        "Flag non-contrast head CT series that may show intracranial haemorrhage (any type; the subtype is "
        "named where the model is trusted for it), to move the study up a radiologist's worklist.",
        "The training PNGs were each made with their DICOM's own window (a brain window: centre 30-50 HU, "
        "width 80-150 HU); their grey levels 0..255 map to 0..1 directly. DICOM input is windowed the same way: "
        "with its own first Window Center/Width when that is a brain window (centre 20-60 HU, width 60-160 HU, "
        "own_window), else with 40/80 HU (windows), so it looks like the training PNGs. "
        "Every image is converted to one grey channel and resized to a fixed square size first, "
        "which removes the original image size and RGBA/RGB layout (in this data they differ between sources, "
        "a shortcut the model must not learn).",
        # three neighbouring slices, chosen on validation among the rules measured (max, top-2/top-3 mean, 2nd
        # highest, adjacent mean of 2 or 3): at 90% of simulated bleeding series raised, window 3 raised 36% of
        # normal series against 46% for window 2 (head_ct_ich 2.1.0); max and top-k scored lower still there but
        # ignore adjacency, so a longer series (150-300 slices) gives an isolated spike more chances
        # RSNA slices are ~5 mm (28-44 a head): a thin-slice series is read as 5 mm slabs (core/slabs.py)
        SeriesPooling(PoolingMethod.ADJACENT_MEAN, 3, slab_mm=5.0),
        # the RSNA DICOMs' own windows (30/80, 36/80, 40/80, 40/150, 35/135, 50/100 ...): brain-tissue grey levels of
        # the training PNGs match the DICOMs at their own window (median 121 vs 120), not at 40/80 (103)
        own_window=((20.0, 60.0), (60.0, 160.0)),
    ),
    Task.CHEST_PNEUMOTHORAX: TaskSetup(
        Task.CHEST_PNEUMOTHORAX,
        "sigmoid",
        "xray",
        (),
        # no left-right flip: the heart and mediastinum are not symmetric
        Augmentation(rotate_deg=5, scale=(0.95, 1.05), translate=0.03, brightness=0.1, contrast=0.1, hflip=False),
        "Flag frontal chest radiographs that may show a pneumothorax, to move the study up a "
        "radiologist's worklist.",
        "Modality LUT, VOI LUT or window, MONOCHROME1 inverted, then percentile normalisation.",
    ),
}


PROVENANCE: dict[str, str] = {
    "brain_mri": "Public 'Brain Tumor MRI Dataset' (Kaggle, M. Nickparvar; combines figshare (Cheng et al.), "
    "SARTAJ and Br35H), training split only, de-duplicated; images that duplicate the original test split "
    "were removed. 2D slices, 224x224 JPEG, mixed greyscale/RGB; some 'notumor' images are CT, not MR.",
    "head_ct_png": "Public 'Head CT - hemorrhage' set (Kaggle, F. Kitamura): single axial head CT slices, "
    "already windowed to 8-bit PNG, varying sizes; 75 haemorrhage / 75 normal, labels from the folder.",
    "head_ct_rsna_png": "RSNA 2019 Intracranial Hemorrhage Detection challenge (stage-1 train; Flanders et al., Radiology: AI "
    "2020; non-commercial research and education): 1,222 axial head CT slices converted to 512x512 8-bit PNG, each "
    "windowed with its own DICOM window (a brain window in nearly all), with the challenge's expert slice labels "
    "(any 538; epidural 16, intraparenchymal 180, intraventricular 127, subarachnoid 177, subdural 237). No patient or "
    "series ids survived the conversion. The 1,500 unlabelled slices of the same conversion (256x256, almost all normal) "
    "are not in any split.",
    "rsna_sources": "RSNA 2019 Intracranial Hemorrhage Detection challenge (Flanders et al., Radiology: AI 2020; "
    "non-commercial research and education), every labelled source of the shared data folder (datasets.RSNA_SOURCES): "
    "1,222 slices of a PNG conversion (512x512, each in its own DICOM window; any 538); 249 slices of a radiologist's "
    "224x224 brain-window subset (any 151, mostly intraparenchymal: its author kept single-type bleeds, so the subtype mix "
    "shifts towards intraparenchymal; its near-duplicate groups kept on one side of the split); 418 slices of the same "
    "PNG conversion's unlabelled folder (256x256) and 28 real DICOM slices, both labelled by the challenge's labels "
    "(27 positive). 1,917 slices in all, no two with the same SOP id. The challenge's expert slice labels throughout "
    "(any + five subtypes). No patient or series ids survived the PNG conversions; the DICOMs are grouped by PatientID.",
    "chest_xray_ptx": "NIH ChestX-ray14 (Wang et al., CVPR 2017; courtesy of the NIH Clinical Center), its radiologist-"
    "boxed subset: 694 frontal radiographs (PA and AP) of 574 patients, 384x384 grey PNG (from 1024x1024); 126 with "
    "pneumothorax, 568 with other findings only (no image without a finding). Labels mined from reports by NIH (noisy; "
    "a 2019 expert re-read disagreed on about half of a small sample). Split by NIH Patient ID.",
}


def default_spec(task: Task, image_size: int, setup: TaskSetup | None = None) -> PreprocessingSpec:
    setup = setup or TASK_SETUPS[task]
    return PreprocessingSpec(kind=setup.spec_kind, input_size=image_size, windows=setup.windows,
                             own_window=setup.own_window, framing=setup.framing)


def setup_for(task: Task, framing: Framing | None, augmentation: str) -> TaskSetup:
    """The task's setup with a run's choices: its framing (None: the task's) and augmentation
    ("task": the task's own; "scanner": with `SCANNER_AUGMENTATION`)."""
    setup = TASK_SETUPS[task]
    if framing is not None:
        setup = replace(setup, framing=Framing(framing))
    if augmentation == "scanner":
        setup = replace(setup, augmentation=replace(setup.augmentation, **SCANNER_AUGMENTATION[task.value]))
    elif augmentation != "task":
        raise ValueError(f"unknown augmentation {augmentation!r} (task, scanner)")
    return setup


def model_name(task: Task) -> str:
    return "cds-triage-" + task.value.replace("_", "-")
