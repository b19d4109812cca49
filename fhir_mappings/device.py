"""The AI model as a FHIR Device (one per model name and version, shared by every study)."""

from __future__ import annotations

from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.device import Device, DeviceDeviceName, DeviceVersion
from fhir.resources.R4B.meta import Meta

from cds_service.core.domain import ModelRef, Task

from .common import AI_DISCLAIMER, narrative, task_value
from .conventions import DEFAULT_CONVENTIONS, Conventions
from .identifiers import device_identifier


def build_device(model: ModelRef, task: Task | str, conventions: Conventions = DEFAULT_CONVENTIONS) -> Device:
    """The AI model as a Device: Observation.device and Provenance.agent point to it.

    No AIAST label: a Device describes software, it asserts nothing about the patient.
    """
    kind = f"AI triage classifier ({task_value(task)})"
    return Device(
        meta=Meta(profile=[conventions.profile("Device")]),
        text=narrative(f"{kind}: model {model.name}, version {model.version}, of the cds-triage service.",
                       f"Its outputs are {AI_DISCLAIMER}"),
        identifier=[device_identifier(model, conventions)],
        status="active",
        deviceName=[DeviceDeviceName(name=model.name, type="model-name")],
        version=[DeviceVersion(value=model.version)],
        type=CodeableConcept(text=kind),
        note=[Annotation(text="Software model of the cds-triage service. Its outputs are " + AI_DISCLAIMER)],
    )
