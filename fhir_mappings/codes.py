"""Every code system URI and code the FHIR write-back uses, in one place.

Each constant says where it is defined. "Verified" below means the code and its meaning
were looked up in a published source (HL7 FHIR specification / HL7 Terminology (THO) /
an HL7 implementation guide or tx.fhir.org expansion) while this module was written;
the source is named next to it. No code here was made up: where no standard code could
be verified, only our own local code is used.

The hospital's terminology team should review the SNOMED CT choices before go-live;
they are coded alongside our local code, never instead of it, so removing one is safe.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------------------
# Our own code systems, identifier systems, extensions and profiles: their names and codes.
# Their URLs are `<canonical base>/CodeSystem/<name>` etc., made by conventions.Conventions
# (the base is CDS_FHIR_CANONICAL_BASE); `cds-triage fhir-package` publishes their definitions.
# ---------------------------------------------------------------------------------------

#: Finding labels; code = the model's label ("any", "glioma", ...), display FINDING_DISPLAY.
#: Every Observation carries a code from it, so it always has a code even where no
#: standard code was verified.
FINDING_CODE_SYSTEM = "triage-finding"

#: Observation.component codes (the operating threshold).
COMPONENT_CODE_SYSTEM = "triage-observation-component"
COMPONENT_OPERATING_THRESHOLD = "operating-threshold"
COMPONENT_CODES = {COMPONENT_OPERATING_THRESHOLD: "Operating threshold"}

#: Observation.method: which operating threshold decided the result, the model card's or the
#: site's own (CDS_SITE_THRESHOLDS, chosen by `cds-triage validate`).
METHOD_CODE_SYSTEM = "triage-method"
METHOD_CARD_THRESHOLD = "model-card-threshold"
METHOD_SITE_THRESHOLD = "site-threshold"
METHOD_CODES = {METHOD_CARD_THRESHOLD: "Model card operating threshold", METHOD_SITE_THRESHOLD: "Site operating threshold"}

#: meta.tag codes: the Subscription `cds-triage subscribe` made (searched back with `_tag`), every
#: resource a task in shadow mode writes, and a Patient the PACS-side trigger made from DICOM headers.
TAG_CODE_SYSTEM = "triage-tag"
SUBSCRIPTION_TAG_CODE = "cds-triage-subscription"
SHADOW_TAG_CODE = "shadow-mode"
PATIENT_FROM_DICOM_TAG_CODE = "patient-from-dicom"
UNFAMILIAR_INPUT_TAG_CODE = "unfamiliar-input"
TAG_CODES = {
    SUBSCRIPTION_TAG_CODE: "Subscription owned by the cds-triage service",
    SHADOW_TAG_CODE: "Written in shadow mode: recorded for local validation, never used to change a priority",
    PATIENT_FROM_DICOM_TAG_CODE: "Patient created by cds-triage from DICOM headers",
    UNFAMILIAR_INPUT_TAG_CODE: "Scored, but the images were unlike the model's training images (another scanner, "
                               "protocol or export): its figures may not hold for them",
}
SUBSCRIPTION_TAG_DISPLAY = TAG_CODES[SUBSCRIPTION_TAG_CODE]
SHADOW_TAG_DISPLAY = TAG_CODES[SHADOW_TAG_CODE]

#: R4 Provenance has no `identifier` element, so a Provenance is made idempotent with a meta.tag
#: carrying its deterministic UUID, `urn:uuid:<uuid>`, as a code of RFC 3986 URIs (a system every
#: validator knows: a code system of our own could not list the UUIDs, and a validator cannot check
#: a code against one that does not), searched with `_tag=` in ifNoneExist.
URI_SYSTEM = "urn:ietf:rfc:3986"

#: CDS Hooks card topics and override reasons (cds_service/web/cds_hooks/cards.py).
CARD_TOPIC_CODE_SYSTEM = "cds-card-topic"
CARD_TOPIC_CODES = {"ai-imaging-triage": "AI imaging triage"}
OVERRIDE_REASON_CODE_SYSTEM = "cds-override-reason"
OVERRIDE_REASON_CODES = {
    "already-read": "Study already read by a radiologist",
    "false-positive": "AI finding judged a false positive",
    "not-relevant": "Not relevant to the current clinical question",
    "image-quality": "Image quality or artefact limits the AI result",
}

#: Identifier systems `<base>/sid/<name>`: the results we write (DiagnosticReport, Observation,
#: Media; deterministic UUIDs, see identifiers.result_identifier) and the model Devices (a UUID
#: over model name and version).
RESULT_IDENTIFIER_NAME = "triage-result"
DEVICE_IDENTIFIER_NAME = "triage-model"

#: Extension on the ServiceRequest.note the AI leaves when it raises an order's priority:
#: sub-extensions `from` (valueCode; absent when the order had none) and `to` (valueCode).
#: Readers (the worklist) take the change from here, never from the note's prose.
PRIORITY_CHANGE_EXTENSION_ID = "ai-priority-change"
PRIORITY_CHANGE_FROM = "from"
PRIORITY_CHANGE_TO = "to"

#: Extension on our heatmap Media: the DICOM SOP Instance UID of the slice the overlay explains
#: (valueOid, "urn:oid:<uid>"), so a viewer can fetch that slice from the PACS to lay it under.
HEATMAP_SOURCE_EXTENSION_ID = "heatmap-source-instance"

#: The resource types we write, each with our profile (StructureDefinition id cds-triage-<type>).
PROFILED_TYPES = ("DiagnosticReport", "Observation", "Media", "Device", "Provenance")


def profile_id(resource_type: str) -> str:
    return f"cds-triage-{resource_type.lower()}"


# ---------------------------------------------------------------------------------------
# HL7 / FHIR terminology
# ---------------------------------------------------------------------------------------

#: HL7 v2 table 0074 "Diagnostic Service Section ID"; RAD = Radiology.
#: Verified: FHIR R4 DiagnosticReport example f201 (category coding v2-0074 RAD) and
#: https://hl7.org/fhir/r4/v2/0074/v2-0074.vs.xml.html
V2_0074_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0074_RADIOLOGY = "RAD"
V2_0074_RADIOLOGY_DISPLAY = "Radiology"

#: Observation category. Verified: THO CodeSystem observation-category, code `imaging`
#: "Observations generated by imaging" (https://terminology.hl7.org/CodeSystem-observation-category.html;
#: also fixed in the HL7 Breast Radiology IG CategoryFragment).
OBSERVATION_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
OBSERVATION_CATEGORY_IMAGING = "imaging"
OBSERVATION_CATEGORY_IMAGING_DISPLAY = "Imaging"

#: Observation interpretation. Verified: THO v3-ObservationInterpretation POS "Positive",
#: NEG "Negative" ("based on the established threshold of the performed test"), as
#: listed in the CH ELM IG ValueSet ch-elm-interpretation-codes-pos-neg.
INTERPRETATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
INTERPRETATION_POSITIVE = "POS"
INTERPRETATION_POSITIVE_DISPLAY = "Positive"
INTERPRETATION_NEGATIVE = "NEG"
INTERPRETATION_NEGATIVE_DISPLAY = "Negative"

#: Security label "artificial intelligence asserted". Verified: THO v3-ObservationValue
#: AIAST "Artificial Intelligence asserted", the code the HL7 AI Transparency on FHIR IG
#: recommends for .meta.security (ValueSet ProvenanceVS,
#: https://build.fhir.org/ig/HL7/aitransparency-ig/ValueSet-ProvenanceVS.html).
SECURITY_OBSERVATION_VALUE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
SECURITY_AI_ASSERTED = "AIAST"
SECURITY_AI_ASSERTED_DISPLAY = "Artificial Intelligence asserted"

#: Provenance.agent.type. Verified: THO provenance-participant-type, `performer`
#: "A person, animal, organization or device that who actually and principally carries
#: out the activity" (https://terminology.hl7.org/CodeSystem-provenance-participant-type.html).
#: `performer` rather than `author`: its definition names devices, and an AI model
#: carries no responsibility for the content the way an author does.
PROVENANCE_PARTICIPANT_SYSTEM = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
PROVENANCE_PARTICIPANT_PERFORMER = "performer"
PROVENANCE_PARTICIPANT_PERFORMER_DISPLAY = "Performer"

#: Provenance.entity.role is a required `code` (http://hl7.org/fhir/provenance-entity-role).
#: Verified: R4B ValueSet provenance-entity-role, `derivation` "the construction of a new
#: entity based on a pre-existing entity" (https://hl7.org/fhir/R4B/valueset-provenance-entity-role.html).
PROVENANCE_ENTITY_ROLE_DERIVATION = "derivation"

#: Media.type. Verified: R4B ValueSet media-type, THO CodeSystem media-type `image`
#: (https://hl7.org/fhir/R4B/valueset-media-type.html).
MEDIA_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/media-type"
MEDIA_TYPE_IMAGE = "image"
MEDIA_TYPE_IMAGE_DISPLAY = "Image"

#: ServiceRequest.priority codes routine | urgent | asap | stat (FHIR code system
#: http://hl7.org/fhir/request-priority). Verified: https://hl7.org/fhir/R4B/codesystem-request-priority.html.
#: The values themselves live in cds_service.core.domain.Priority; the element is a plain
#: `code`, so only the system URI is needed here for documentation.
REQUEST_PRIORITY_SYSTEM = "http://hl7.org/fhir/request-priority"

#: DICOM UIDs as FHIR identifiers: system `urn:dicom:uid`, value `urn:oid:<uid>`.
#: Verified: HL7 DICOM SR to FHIR IG Example-ImagingStudy and THO NamingSystem "DICOM
#: Unique Id" ("DICOM OIDs are represented as plain OIDs, with a prefix of urn:oid:").
DICOM_UID_SYSTEM = "urn:dicom:uid"
URN_OID_PREFIX = "urn:oid:"

# ---------------------------------------------------------------------------------------
# LOINC
# ---------------------------------------------------------------------------------------

LOINC_SYSTEM = "http://loinc.org"
#: DiagnosticReport.code. Verified: LOINC 18748-4 "Diagnostic imaging study", member of
#: the LOINC Imaging Document Codes value set (C-CDA on FHIR IG, ValueSet
#: 1.3.6.1.4.1.12009.10.2.5).
LOINC_DIAGNOSTIC_IMAGING_STUDY = "18748-4"
LOINC_DIAGNOSTIC_IMAGING_STUDY_DISPLAY = "Diagnostic imaging study"

# ---------------------------------------------------------------------------------------
# UCUM
# ---------------------------------------------------------------------------------------

#: Unit of the probability in Observation.valueQuantity: UCUM unity "1" (dimensionless),
#: with the value on a 0-1 scale. Chosen over "%" because the model, the model card's
#: thresholds and cds_service.core.domain.Finding all use 0-1: writing "1" means no x100
#: conversion anywhere, so a threshold of 0.5 and a value of 0.93 compare directly.
#: ("1" is UCUM's unit one; the HL7 EU Laboratory IG uses code "1" for unitless values.)
UCUM_SYSTEM = "http://unitsofmeasure.org"
UCUM_UNITY = "1"

# ---------------------------------------------------------------------------------------
# Finding labels: SNOMED CT / RadLex where verified, our local code always
# ---------------------------------------------------------------------------------------

SNOMED_SYSTEM = "http://snomed.info/sct"
#: RadLex canonical URI. Verified: THO CodeSystem RadLex, url http://radlex.org.
RADLEX_SYSTEM = "http://radlex.org"


@dataclass(frozen=True)
class StandardCode:
    """One verified code from a standard terminology, with where it was verified."""

    system: str
    code: str
    display: str
    source: str


#: Human-readable name of each label, used as the local code's display and in text.
FINDING_DISPLAY: dict[str, str] = {
    "any": "Intracranial hemorrhage (any type)",
    "epidural": "Epidural hemorrhage",
    "intraparenchymal": "Intraparenchymal hemorrhage",
    "intraventricular": "Intraventricular hemorrhage",
    "subarachnoid": "Subarachnoid hemorrhage",
    "subdural": "Subdural hemorrhage",
    "glioma": "Glioma",
    "meningioma": "Meningioma",
    "pituitary": "Pituitary tumor",
    "no_tumor": "No tumor",
    "pneumothorax": "Pneumothorax",
}

#: Standard codes per label, ONLY those verified. Verified (and where):
#:  - any: SNOMED CT 1386000 "Intracranial hemorrhage (disorder)": FHIR specification
#:    example EvidenceVariable/example-fatal-ICH-in-7-days (characteristic "intracranial
#:    hemorrhage within 7 days") and an HL7 IG ValueSet listing.
#:  - subarachnoid: SNOMED CT 21454007 "Subarachnoid intracranial hemorrhage (disorder)":
#:    stroke-diagnosis ValueSet expanded from tx.fhir.org (SNOMED CT Intl 2025-02-01).
#:  - intraparenchymal: SNOMED CT 274100004 "Cerebral hemorrhage (disorder)": same
#:    tx.fhir.org expansion, where it codes intracerebral (= intraparenchymal) hemorrhage.
#:    This is a mapping judgment (closest concept), for the terminology team to confirm.
#:  - pneumothorax: SNOMED CT 36118008 "Pneumothorax (disorder)" (HL7 IG ValueSet JSON,
#:    OHDSI concept 253796) and RadLex RID5352 "pneumothorax" (several radiology
#:    projects, one stating it was checked against NCBO BioPortal).
#: NOT verified, so local code only: epidural, subdural, intraventricular, glioma,
#: meningioma, pituitary, no_tumor. The public sources found disagreed with each other
#: for these (e.g. the same SNOMED id given as "subdural hemorrhage" in one project and
#: "thrombosis of cerebral veins" in a tx.fhir.org expansion), so none was used.
STANDARD_FINDING_CODES: dict[str, tuple[StandardCode, ...]] = {
    "any": (
        StandardCode(SNOMED_SYSTEM, "1386000", "Intracranial hemorrhage (disorder)",
                     "FHIR example EvidenceVariable/example-fatal-ICH-in-7-days"),
    ),
    "subarachnoid": (
        StandardCode(SNOMED_SYSTEM, "21454007", "Subarachnoid intracranial hemorrhage (disorder)",
                     "tx.fhir.org expansion, SNOMED CT International 2025-02-01"),
    ),
    "intraparenchymal": (
        StandardCode(SNOMED_SYSTEM, "274100004", "Cerebral hemorrhage (disorder)",
                     "tx.fhir.org expansion, SNOMED CT International 2025-02-01"),
    ),
    "pneumothorax": (
        StandardCode(SNOMED_SYSTEM, "36118008", "Pneumothorax (disorder)",
                     "HL7 IG ValueSet; OHDSI concept 253796"),
        StandardCode(RADLEX_SYSTEM, "RID5352", "pneumothorax", "RadLex (NCBO BioPortal)"),
    ),
}


def finding_display(label: str) -> str:
    """Readable name of a label; an unknown label is shown as itself rather than failing."""
    return FINDING_DISPLAY.get(label, label)


#: A radiologist's "nothing abnormal" as a report's conclusionCode: SNOMED CT 281900007 "No abnormality
#: detected (finding)". Verified: HL7 mCODE IG, ValueSet mcode-condition-status-trend-vs (listed there as
#: "better than 260415000 Not detected"). Never written by us; `cds-triage trial` reads it in a final
#: report as "none of this task's findings" (cds_service/trial/truth.py).
NO_ABNORMALITY_DETECTED = StandardCode(SNOMED_SYSTEM, "281900007", "No abnormality detected (finding)",
                                       "HL7 mCODE IG ValueSet mcode-condition-status-trend-vs")
