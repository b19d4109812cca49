"""What a site may change about what we write, and every URL we mint from it.

Our code systems, extensions, identifier systems, tags and profiles all live under one canonical
base (CDS_FHIR_CANONICAL_BASE, default `DEFAULT_FHIR_CANONICAL_BASE`, https://cds-triage.org/fhir);
`cds-triage fhir-package` writes their definitions under the same base. The AI security label is
HL7's AIAST unless the site adds or substitutes its own coding (CDS_AI_SECURITY_LABEL).

Builders and readers take a `Conventions` (default: the project's); the service makes one from its
settings with `Conventions.from_settings`. Readers recognise only what the configured conventions
write: set the base once, before go-live (docs/fhir.md says what changes when it moves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cds_service.core.domain import DEFAULT_FHIR_CANONICAL_BASE, AiLabelMode

from . import codes


@dataclass(frozen=True)
class SecurityLabel:
    """One coding of meta.security that marks a resource as asserted by AI."""

    system: str
    code: str
    display: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"system": self.system, "code": self.code, **({"display": self.display} if self.display else {})}


#: HL7's label for AI-asserted content (THO v3-ObservationValue AIAST; see codes.SECURITY_AI_ASSERTED).
AIAST = SecurityLabel(codes.SECURITY_OBSERVATION_VALUE_SYSTEM, codes.SECURITY_AI_ASSERTED,
                      codes.SECURITY_AI_ASSERTED_DISPLAY)


class ConventionSettings(Protocol):
    """The settings a Conventions is made from (cds_service.core.settings.Settings has them)."""

    @property
    def fhir_canonical_base(self) -> str: ...

    @property
    def ai_security_coding(self) -> tuple[str, str, str] | None: ...

    @property
    def ai_security_label_mode(self) -> AiLabelMode: ...


@dataclass(frozen=True)
class Conventions:
    """The canonical base and the AI security labels; every URL we mint comes from here."""

    base: str = DEFAULT_FHIR_CANONICAL_BASE
    ai_labels: tuple[SecurityLabel, ...] = (AIAST,)

    def __post_init__(self) -> None:
        if not self.base.startswith(("http://", "https://")) or self.base.endswith("/"):
            raise ValueError(f"canonical base must be an http(s) URL without a trailing slash, not {self.base!r}")
        if not self.ai_labels:
            raise ValueError("at least one AI security label is needed: nothing else marks a result as AI-asserted")

    @classmethod
    def from_settings(cls, settings: ConventionSettings) -> "Conventions":
        site = settings.ai_security_coding
        labels: tuple[SecurityLabel, ...] = (AIAST,)
        if site is not None:
            own = SecurityLabel(*site)
            labels = (own,) if settings.ai_security_label_mode is AiLabelMode.REPLACE else (AIAST, own)
        return cls(base=settings.fhir_canonical_base, ai_labels=labels)

    # --- URLs ------------------------------------------------------------------------------------

    def code_system(self, name: str) -> str:
        return f"{self.base}/CodeSystem/{name}"

    def structure_definition(self, name: str) -> str:
        return f"{self.base}/StructureDefinition/{name}"

    def identifier_system(self, name: str) -> str:
        return f"{self.base}/sid/{name}"

    @property
    def finding_system(self) -> str:
        """Finding labels; code = the model's label ("any", "glioma", ...). Every Observation carries one."""
        return self.code_system(codes.FINDING_CODE_SYSTEM)

    @property
    def component_system(self) -> str:
        """Observation.component codes (the operating threshold)."""
        return self.code_system(codes.COMPONENT_CODE_SYSTEM)

    @property
    def method_system(self) -> str:
        """Observation.method: the model card's operating threshold or the site's own."""
        return self.code_system(codes.METHOD_CODE_SYSTEM)

    @property
    def tag_system(self) -> str:
        """meta.tag codes: our Subscription, shadow-mode results, Patients made from DICOM headers."""
        return self.code_system(codes.TAG_CODE_SYSTEM)

    @property
    def card_topic_system(self) -> str:
        """CDS Hooks card topics."""
        return self.code_system(codes.CARD_TOPIC_CODE_SYSTEM)

    @property
    def override_reason_system(self) -> str:
        """CDS Hooks override reasons."""
        return self.code_system(codes.OVERRIDE_REASON_CODE_SYSTEM)

    @property
    def result_identifier_system(self) -> str:
        """Identifier system of DiagnosticReport, Observation and Media we write (deterministic UUIDs)."""
        return self.identifier_system(codes.RESULT_IDENTIFIER_NAME)

    @property
    def device_identifier_system(self) -> str:
        """Identifier system of the model Devices (a UUID over model name and version)."""
        return self.identifier_system(codes.DEVICE_IDENTIFIER_NAME)

    @property
    def priority_change_extension(self) -> str:
        """On the ServiceRequest.note the AI leaves: sub-extensions `from` and `to` (valueCode)."""
        return self.structure_definition(codes.PRIORITY_CHANGE_EXTENSION_ID)

    @property
    def heatmap_source_extension(self) -> str:
        """On the heatmap Media: the SOP Instance UID of the slice it explains (valueOid)."""
        return self.structure_definition(codes.HEATMAP_SOURCE_EXTENSION_ID)

    def profile(self, resource_type: str) -> str:
        """Our profile of a resource type we write (cds-triage-observation, ...)."""
        return self.structure_definition(codes.profile_id(resource_type))

    # --- codings and searches ---------------------------------------------------------------------

    def tag(self, code: str) -> dict[str, str]:
        """One of our meta.tag codings (codes.TAG_CODES has them all, with their displays)."""
        return {"system": self.tag_system, "code": code, "display": codes.TAG_CODES[code]}

    @property
    def subscription_tag_query(self) -> str:
        """`_tag=` search for the Subscription `cds-triage subscribe` made."""
        return f"_tag={self.tag_system}|{codes.SUBSCRIPTION_TAG_CODE}"

    def has_tag(self, resource: Any, code: str) -> bool:
        """Whether a resource (a dict from the server) carries one of our tags."""
        meta = resource.get("meta") if isinstance(resource, dict) else None
        return any(isinstance(t, dict) and t.get("system") == self.tag_system and t.get("code") == code
                   for t in (meta or {}).get("tag") or [])

    def is_ai_asserted(self, resource: Any) -> bool:
        """Whether a resource (a dict) carries one of our AI security labels."""
        meta = resource.get("meta") if isinstance(resource, dict) else None
        labels = {(label.system, label.code) for label in self.ai_labels}
        return any(isinstance(s, dict) and (s.get("system"), s.get("code")) in labels
                   for s in (meta or {}).get("security") or [])

    def is_our_result(self, resource: Any) -> bool:
        """Whether a resource (a dict) carries our result identifier."""
        identifiers = resource.get("identifier") if isinstance(resource, dict) else None
        return any(isinstance(i, dict) and i.get("system") == self.result_identifier_system for i in identifiers or [])


#: The project's own conventions: the default canonical base and AIAST.
DEFAULT_CONVENTIONS = Conventions()
