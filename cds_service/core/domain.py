"""Domain objects of one triage: what a study is, what the model found, what we suggest.

Plain frozen dataclasses, validated on construction (in the style of highdicom), so that
the pure core (routing, preprocessing, inference, priority policy, FHIR mapping) never
sees a half-formed value.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: The safety disclaimer on everything the AI writes (FHIR resources, cards, DICOM, pages): defined here only.
DISCLAIMER = "AI-generated, preliminary, not a diagnosis."

#: The default canonical base of every FHIR code system, extension, identifier system and profile the
#: service mints (CDS_FHIR_CANONICAL_BASE; docs/fhir.md): the project's FHIR namespace, fixed and documented.
DEFAULT_FHIR_CANONICAL_BASE = "https://cds-triage.org/fhir"


class Priority(str, enum.Enum):
    """FHIR request-priority codes, ordered: routine < urgent < asap < stat."""

    ROUTINE = "routine"
    URGENT = "urgent"
    ASAP = "asap"
    STAT = "stat"

    @property
    def rank(self) -> int:
        return _PRIORITY_ORDER.index(self)

    def __lt__(self, other: object) -> bool:  # type: ignore[override]
        if not isinstance(other, Priority):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:  # type: ignore[override]
        if not isinstance(other, Priority):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:  # type: ignore[override]
        if not isinstance(other, Priority):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:  # type: ignore[override]
        if not isinstance(other, Priority):
            return NotImplemented
        return self.rank >= other.rank


class InferenceRuntime(enum.StrEnum):
    """Where models score (CDS_INFERENCE_RUNTIME): ONNX Runtime, torch, or auto (ONNX Runtime on a CPU)."""

    AUTO = "auto"
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"


class WorklistAuth(enum.StrEnum):
    """How the pages with patient data check who asks (CDS_WORKLIST_AUTH; cds_service/web/access.py)."""

    NONE = "none"  # no sign-in: direct calls from this machine only, and `serve` stays on loopback
    PROXY_HEADER = "proxy-header"  # an authenticating reverse proxy at CDS_TRUSTED_PROXIES names the user
    BEARER = "bearer"  # one shared token (scripts, EHR embedding): no per-user identity
    OIDC = "oidc"  # per-user sign-in at the site's OpenID Connect provider (cds_service/web/sign_in.py)


class HooksAuth(enum.StrEnum):
    """Whether CDS Hooks calls must carry a JWT (CDS_HOOKS_AUTH; off only on loopback)."""

    JWT = "jwt"
    OFF = "off"


class UnknownPatientPolicy(enum.StrEnum):
    """What to do when no Patient carries the study's PatientID (CDS_PACS_UNKNOWN_PATIENT)."""

    REJECT = "reject"  # the EHR owns patient identity: fail the arrival, a person looks at it
    CREATE = "create"  # create the Patient from the DICOM patient module (test and demo set-ups)


class PacsResult(enum.StrEnum):
    """What the worker also stores in the PACS, in the study it triaged (CDS_RESULTS_TO_PACS: none, one or both)."""

    SR = "sr"  # the findings as a DICOM Structured Report (TID 1500 Measurement Report)
    SC = "sc"  # the Grad-CAM overlay as a DICOM Secondary Capture


class AiLabelMode(enum.StrEnum):
    """How a site's own AI security label (CDS_AI_SECURITY_LABEL) joins HL7's AIAST (CDS_AI_SECURITY_LABEL_MODE)."""

    ADD = "add"  # AIAST and the site's coding
    REPLACE = "replace"  # the site's coding only (a server whose terminology lacks AIAST and refuses it)


_PRIORITY_ORDER = [Priority.ROUTINE, Priority.URGENT, Priority.ASAP, Priority.STAT]


class Task(str, enum.Enum):
    """One classification task, which is also the name of its model in weights/."""

    HEAD_CT_ICH = "head_ct_ich"
    BRAIN_MRI = "brain_mri"
    CHEST_PNEUMOTHORAX = "chest_pneumothorax"


TASK_LABELS: dict[Task, tuple[str, ...]] = {
    Task.HEAD_CT_ICH: (
        "any",
        "epidural",
        "intraparenchymal",
        "intraventricular",
        "subarachnoid",
        "subdural",
    ),
    Task.BRAIN_MRI: ("glioma", "meningioma", "pituitary", "no_tumor"),
    Task.CHEST_PNEUMOTHORAX: ("pneumothorax",),
}

# Labels that mean "nothing found": reported with their probability, never a finding.
NEGATIVE_LABELS: frozenset[str] = frozenset({"no_tumor"})

# The DICOM modalities each task's model reads (routing and the input check).
TASK_MODALITIES: dict[Task, tuple[str, ...]] = {
    Task.HEAD_CT_ICH: ("CT",),
    Task.BRAIN_MRI: ("MR",),
    Task.CHEST_PNEUMOTHORAX: ("CR", "DX"),
}


class InputFit(str, enum.Enum):
    """What the input check said of a study's images (`input_profile.series_verdict`).

    Only the wrong anatomy or modality is refused. Images of the right anatomy that are far from
    the model's training images (another scanner, protocol or export) are scored and marked
    `unfamiliar`: a radiologist and the site's validation should read the model's figures for them
    with care, but a study is never dropped for coming from another hospital.
    """

    FAMILIAR = "familiar"
    UNFAMILIAR = "unfamiliar"
    WRONG_ANATOMY = "wrong_anatomy"
    UNCHECKED = "unchecked"  # no input profile for the task


class TaskMode(str, enum.Enum):
    """How a site runs a task: not at all, silently beside the radiologists, or for real.

    `shadow` writes the results (marked as shadow) but never changes a priority and shows
    only information cards: how a site watches a model on its own studies before go-live.
    """

    OFF = "off"
    SHADOW = "shadow"
    ACTIVE = "active"


class TriageStatus(str, enum.Enum):
    """How a study's triage ended. Only DONE writes findings."""

    DONE = "done"
    NOT_APPLICABLE = "not_applicable"
    MODEL_UNAVAILABLE = "model_unavailable"


@dataclass(frozen=True)
class Series:
    """One DICOM series as QIDO-RS describes it; enough to route it to a task."""

    uid: str
    modality: str = ""
    body_part: str = ""
    description: str = ""
    number_of_instances: int = 0
    protocol: str = ""  # ProtocolName
    study_description: str = ""  # StudyDescription (study level, repeated per series)
    requested_procedure: str = ""  # RequestedProcedureDescription (what the order asked for)
    # AnatomicRegionSequence as (FHIR system, code) pairs and the codes' meanings, as text
    anatomic_region: tuple[tuple[str, str], ...] = ()
    anatomic_region_text: str = ""
    # SeriesDate/SeriesTime (else the study's) as a FHIR dateTime: the results' effective time when the
    # ImagingStudy has no `started` (date only without TimezoneOffsetFromUTC; fhir_mappings.dicom_datetime)
    acquired: str = ""

    def __post_init__(self) -> None:
        if not self.uid:
            raise ValueError("Series needs a SeriesInstanceUID")


@dataclass(frozen=True)
class Study:
    """A DICOM study in the PACS, and the series it holds."""

    uid: str
    series: tuple[Series, ...] = ()

    def __post_init__(self) -> None:
        if not self.uid:
            raise ValueError("Study needs a StudyInstanceUID")


@dataclass(frozen=True)
class ModelRef:
    """Which model produced a result: name and version, as written to FHIR Device."""

    name: str
    version: str

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("ModelRef needs a name and a version")


@dataclass(frozen=True)
class Finding:
    """One label's study-level probability and whether it crosses the card's threshold.

    `trained` is False for outputs the model card says were never trained: they are reported
    as such and are never positive. `raises_priority` is False for a trained label that missed
    its bar on the card's test split (a rare subtype): its probability is reported, but it is
    never positive, so it neither names a finding nor moves the study up. `threshold_source` names a
    site threshold (CDS_SITE_THRESHOLDS) that replaced the card's; empty: the model card's own.
    """

    label: str
    probability: float
    positive: bool
    threshold: float
    trained: bool = True
    raises_priority: bool = True
    threshold_source: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability out of range for {self.label}: {self.probability}")
        if self.positive and not (self.trained and self.raises_priority):
            raise ValueError(f"label {self.label} is untrained or short of its bar and cannot be positive")

    @property
    def has_verdict(self) -> bool:
        """Whether the result states this label present or absent at its threshold (FHIR interpretation POS/NEG,
        DICOM SR Present/Absent): not a label that means "nothing found" (a double negative), nor one short of
        its bar (its probability only)."""
        return self.trained and self.raises_priority and self.label not in NEGATIVE_LABELS


@dataclass(frozen=True)
class Heatmap:
    """A Grad-CAM overlay PNG for one label, on the slice that drove it."""

    png: bytes
    label: str
    width: int
    height: int
    slice_index: int = 0  # in anatomical order: of the slices, or of the slabs where thin slices were averaged
    sop_instance_uid: str = ""  # the slice's; a slab's middle slice
    averaged_slices: int = 1  # a slab: the mean of this many thin slices (core/slabs.py)
    slab_mm: float | None = None  # the slab thickness the card asks for, where slices were averaged

    def __post_init__(self) -> None:
        if not self.png.startswith(b"\x89PNG"):
            raise ValueError("Heatmap.png must be PNG bytes")
        if self.averaged_slices < 1:
            raise ValueError("Heatmap.averaged_slices must be at least 1")

    @property
    def location(self) -> str:
        """Where the overlay was drawn, in words for the report: "slice 12", or "slab 12 (5 mm, the mean of
        10 thin slices)"."""
        if self.averaged_slices > 1:
            thickness = f"{self.slab_mm:g} mm, " if self.slab_mm else ""
            return f"slab {self.slice_index} ({thickness}the mean of {self.averaged_slices} thin slices)"
        return f"slice {self.slice_index}"


@dataclass(frozen=True)
class TriageResult:
    """What the triage of one study concluded. Pure data: the FHIR mapping reads only this."""

    study_uid: str
    status: TriageStatus
    task: Task | None = None
    series_uid: str = ""
    findings: tuple[Finding, ...] = ()
    suggested_priority: Priority | None = None
    model: ModelRef | None = None
    heatmap: Heatmap | None = None
    reason: str = ""
    slices_scored: int = 0  # model inputs: slices, or slabs where thin slices were averaged
    instances_read: int = 0  # the series' instances behind them (equal to slices_scored without slabs)
    slab_mm: float | None = None  # where thin slices were averaged: the slab thickness
    mode: TaskMode = TaskMode.ACTIVE
    input_fit: InputFit = InputFit.UNCHECKED  # `unfamiliar`: scored, but unlike the model's training images
    input_distance: float | None = None  # the input check's distance from the training images (input_profile)

    def __post_init__(self) -> None:
        if not self.study_uid:
            raise ValueError("TriageResult needs a study UID")
        if self.status is TriageStatus.DONE:
            if self.task is None or self.model is None:
                raise ValueError("a done TriageResult needs its task and model")
        elif self.findings:
            raise ValueError(f"a {self.status.value} result carries no findings")

    @property
    def positive_findings(self) -> tuple[Finding, ...]:
        """Positive findings, most probable first."""
        return tuple(sorted((f for f in self.findings if f.positive), key=lambda f: -f.probability))

    @property
    def top_finding(self) -> Finding | None:
        positives = self.positive_findings
        return positives[0] if positives else None


@dataclass(frozen=True)
class OrderContext:
    """Where the result goes in the EHR: the FHIR ids the write-back references."""

    imaging_study_id: str
    patient_id: str
    service_request_id: str | None = None
    study_uid: str = ""

    def __post_init__(self) -> None:
        if not self.imaging_study_id or not self.patient_id:
            raise ValueError("OrderContext needs the ImagingStudy and Patient ids")
