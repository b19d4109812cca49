# Over 400 lines on purpose: every FHIR resource of one triage, built by pure functions that share its identifiers and codes.
"""Pure builders: one study's TriageResult becomes FHIR R4B resources and one transaction.

No I/O and no HTTP here: every function takes plain values and returns `fhir.resources`
R4B models, which validate themselves on construction. The write-back client POSTs the
Bundle from `build_triage_transaction` as it is.

Idempotency, because a job may run twice (retry, redelivered subscription): every result
resource gets a deterministic identifier (`result_identifier`) and is created with
`request.ifNoneExist`, so a second transaction for the same study, task and model version
creates nothing. The Device identifier depends on model name and version only, so all
studies share one Device per model version.

Serialise with `bundle.model_dump(mode="json", exclude_none=True)` (a dict) or
`bundle.model_dump_json(exclude_none=True)` / `bundle.json()` (a str).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, TypeVar

from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.attachment import Attachment
from fhir.resources.R4B.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.device import Device, DeviceDeviceName, DeviceVersion
from fhir.resources.R4B.diagnosticreport import DiagnosticReport, DiagnosticReportMedia
from fhir.resources.R4B.extension import Extension
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.media import Media
from fhir.resources.R4B.meta import Meta
from fhir.resources.R4B.observation import Observation, ObservationComponent
from fhir.resources.R4B.provenance import Provenance, ProvenanceAgent, ProvenanceEntity
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.resource import Resource
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.subscription import Subscription, SubscriptionChannel
from pydantic import ValidationError

from cds_service.core.domain import (
         DISCLAIMER,
         NEGATIVE_LABELS,
         Finding,
         ModelRef,
         OrderContext,
         Priority,
         Task,
         TaskMode,
         TriageResult,
         TriageStatus,
     )
from cds_service.core.errors import InvalidResourceError

from . import codes

#: Last sentence of every conclusion and note: the words a clinician must see.
AI_DISCLAIMER = DISCLAIMER  # the name FHIR builders and their tests use

#: Header the FHIR server sends with each notification so our webhook can check it.
SUBSCRIPTION_SECRET_HEADER = "X-CDS-Subscription-Secret"

#: Default Subscription.reason (R4 requires one).
DEFAULT_SUBSCRIPTION_REASON = "cds-triage: AI triage of new imaging studies"

#: meta.tag on the Subscription created by `cds-triage subscribe`; search it back with
#: SUBSCRIPTION_TAG_QUERY to find our own Subscription instead of creating a second one.
SUBSCRIPTION_TAG = Coding(
    system=codes.SUBSCRIPTION_TAG_SYSTEM,
    code=codes.SUBSCRIPTION_TAG_CODE,
    display=codes.SUBSCRIPTION_TAG_DISPLAY,
)
SUBSCRIPTION_TAG_QUERY = f"_tag={codes.SUBSCRIPTION_TAG_SYSTEM}|{codes.SUBSCRIPTION_TAG_CODE}"

# uuid5 namespaces, fixed forever: changing them would make every repeat job look new.
_RESULT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, codes.RESULT_IDENTIFIER_SYSTEM)
_DEVICE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, codes.DEVICE_IDENTIFIER_SYSTEM)

# A DICOM UID: dot-separated numbers without leading zeros, at most 64 characters (PS3.5 9.1).
_DICOM_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
# FHIR's oid type (without its urn:oid: prefix): what an extension's valueOid accepts.
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


# ---------------------------------------------------------------------------------------
# Identifiers
# ---------------------------------------------------------------------------------------


def result_identifier(study_uid: str, task: Task | str, model_version: str, kind: str) -> Identifier:
    """The deterministic business identifier of one result resource.

    Same study, task, model version and kind give the same identifier in every run, which
    is what lets `ifNoneExist` turn a repeated job into a no-op. `kind` is "report",
    "media", "provenance" or "observation-<label>". The value is a UUID (uuid5), also
    used as the entry's `urn:uuid:` fullUrl.
    """
    parts = [study_uid, _task_value(task), model_version, kind]
    if not all(parts):
        raise ValueError(f"result_identifier needs study UID, task, model version and kind: {parts}")
    # json.dumps of the list: unambiguous even if a part contains a separator character.
    value = uuid.uuid5(_RESULT_NAMESPACE, json.dumps(parts))
    return Identifier(system=codes.RESULT_IDENTIFIER_SYSTEM, value=str(value))


def device_identifier(model: ModelRef) -> Identifier:
    """The Device identifier: model name and version only, so all studies share one Device."""
    value = uuid.uuid5(_DEVICE_NAMESPACE, json.dumps([model.name, model.version]))
    return Identifier(system=codes.DEVICE_IDENTIFIER_SYSTEM, value=str(value))


def full_url(identifier: Identifier) -> str:
    """The bundle fullUrl of a resource whose identifier value is one of our UUIDs."""
    return f"urn:uuid:{identifier.value}"


def identifier_query(identifier: Identifier) -> str:
    """Search string that finds a resource by identifier (for ifNoneExist or a GET)."""
    return f"identifier={identifier.system}|{identifier.value}"


# ---------------------------------------------------------------------------------------
# Small shared pieces
# ---------------------------------------------------------------------------------------


def _ai_asserted_meta(mode: TaskMode = TaskMode.ACTIVE) -> Meta:
    """meta.security AIAST: marks content asserted by AI (HL7 AI Transparency on FHIR); plus the
    shadow-mode tag when the task runs silently (readers show it as information only)."""
    return Meta(
        security=[
            Coding(
                system=codes.SECURITY_OBSERVATION_VALUE_SYSTEM,
                code=codes.SECURITY_AI_ASSERTED,
                display=codes.SECURITY_AI_ASSERTED_DISPLAY,
            )
        ],
        tag=[Coding(system=codes.SUBSCRIPTION_TAG_SYSTEM, code=codes.SHADOW_TAG_CODE, display=codes.SHADOW_TAG_DISPLAY)]
        if mode is TaskMode.SHADOW else None,
    )


SHADOW_SENTENCE = ("SHADOW MODE: this task runs silently at this site; the result is recorded for local "
                   "validation and did not change the order's priority.")


def is_shadow(resource: Any) -> bool:
    """Whether a resource we wrote carries the shadow-mode tag (dict from the server or model)."""
    meta = resource.get("meta") if isinstance(resource, dict) else None
    return any(tag.get("system") == codes.SUBSCRIPTION_TAG_SYSTEM and tag.get("code") == codes.SHADOW_TAG_CODE
               for tag in (meta or {}).get("tag") or [])


def _ref(reference: str, display: str | None = None) -> Reference:
    return Reference(reference=reference, display=display)


def _patient(ctx: OrderContext) -> Reference:
    return _ref(f"Patient/{ctx.patient_id}")


def _imaging_study(ctx: OrderContext, study_uid: str = "") -> Reference:
    """The order's ImagingStudy; with `study_uid` also its DICOM Study Instance UID as the reference's identifier
    (R4 lets a Reference carry both), so whoever reads the report alone can open the study in a viewer."""
    identifier = Identifier(system=codes.DICOM_UID_SYSTEM, value=f"{codes.URN_OID_PREFIX}{study_uid}") if study_uid else None
    return Reference(reference=f"ImagingStudy/{ctx.imaging_study_id}", identifier=identifier)


def _based_on(ctx: OrderContext) -> list[Reference] | None:
    """The order the result answers, when the study came with one."""
    if not ctx.service_request_id:
        return None
    return [_ref(f"ServiceRequest/{ctx.service_request_id}")]


def _probability(value: float) -> Quantity:
    """A 0-1 probability as a UCUM unity quantity (see codes.UCUM_UNITY for why not %)."""
    return Quantity(
        value=Decimal(str(round(float(value), 4))),  # the decimal pydantic made of the rounded float before
        unit=codes.UCUM_UNITY,
        system=codes.UCUM_SYSTEM,
        code=codes.UCUM_UNITY,
    )


def _require_timezone(issued: datetime) -> None:
    # FHIR instants must carry a zone; a naive datetime would be read as server-local time.
    if issued.tzinfo is None or issued.utcoffset() is None:
        raise ValueError("issued must be timezone-aware (e.g. datetime.now(timezone.utc))")


_T = TypeVar("_T")


def _first(items: list[_T] | None) -> _T:
    """The first of a list our builders always fill (an identifier, a tag)."""
    if not items:
        raise ValueError("a resource built here lacks the identifier or tag it always gets")
    return items[0]


def _task_of(result: TriageResult) -> Task:
    """The task of a result that has FHIR resources (a done triage always names its task)."""
    if result.task is None:
        raise ValueError("a triage result without a task has no FHIR resources")
    return result.task


def _task_value(task: Task | str) -> str:
    return task.value if isinstance(task, Task) else str(task)


def finding_code(label: str) -> CodeableConcept:
    """Code of a finding label: verified standard codes first, then always our local code."""
    codings = [
        Coding(system=std.system, code=std.code, display=std.display)
        for std in codes.STANDARD_FINDING_CODES.get(label, ())
    ]
    codings.append(
        Coding(system=codes.LOCAL_FINDING_SYSTEM, code=label, display=codes.finding_display(label))
    )
    return CodeableConcept(coding=codings, text=codes.finding_display(label))


# ---------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------


def build_device(model: ModelRef, task: Task | str) -> Device:
    """The AI model as a Device: Observation.device and Provenance.agent point to it.

    No AIAST label: a Device describes software, it asserts nothing about the patient.
    """
    return Device(
        identifier=[device_identifier(model)],
        status="active",
        deviceName=[DeviceDeviceName(name=model.name, type="model-name")],
        version=[DeviceVersion(value=model.version)],
        type=CodeableConcept(text=f"AI triage classifier ({_task_value(task)})"),
        note=[Annotation(text="Software model of the cds-triage service. Its outputs are " + AI_DISCLAIMER)],
    )


def build_observation(
    ctx: OrderContext,
    result: TriageResult,
    finding: Finding,
    *,
    device_reference: str,
    issued: datetime,
) -> Observation:
    """One trained label's study-level probability as a preliminary imaging Observation.

    Untrained outputs are refused: the model card says they were never trained, so they
    carry no meaning a clinician could use.
    """
    if not finding.trained:
        raise ValueError(f"label {finding.label} was not trained and is not written to FHIR")
    model = _require_done(result)
    display = codes.finding_display(finding.label)

    interpretation = None
    source = finding.threshold_source or f"the model card of {model.name} {model.version}"
    note = f"AI-estimated probability {finding.probability:.2f} of {display}; operating threshold {finding.threshold:.2f}, from {source}. "
    if finding.label in NEGATIVE_LABELS:
        # POS/NEG on "no tumor" would read as a double negative; report the number only.
        note += "This label means 'nothing found' and is reported as a probability only. "
    elif not finding.raises_priority:
        note += ("Too few examples to trust this label as a finding (see the model card's priority_bar): "
                 "reported as a probability only. ")
    else:
        interpretation = [_interpretation(finding.positive)]
    note += AI_DISCLAIMER

    return Observation(
        meta=_ai_asserted_meta(result.mode),
        identifier=[result_identifier(result.study_uid, _task_of(result), model.version,
                                      f"observation-{finding.label}")],
        basedOn=_based_on(ctx),
        status="preliminary",
        category=[
            CodeableConcept(
                coding=[
                    Coding(
                        system=codes.OBSERVATION_CATEGORY_SYSTEM,
                        code=codes.OBSERVATION_CATEGORY_IMAGING,
                        display=codes.OBSERVATION_CATEGORY_IMAGING_DISPLAY,
                    )
                ]
            )
        ],
        code=_observation_code(finding.label),
        subject=_patient(ctx),
        issued=issued,
        valueQuantity=_probability(finding.probability),
        interpretation=interpretation,
        note=[Annotation(text=note)],
        method=_threshold_method(finding, source),
        device=_ref(device_reference, f"{model.name} {model.version}"),
        derivedFrom=[_imaging_study(ctx)],
        component=[
            ObservationComponent(
                code=CodeableConcept(
                    coding=[
                        Coding(
                            system=codes.LOCAL_COMPONENT_SYSTEM,
                            code=codes.COMPONENT_OPERATING_THRESHOLD,
                            display="Operating threshold",
                        )
                    ],
                    text=f"Operating threshold ({'site' if finding.threshold_source else 'model card'})",
                ),
                valueQuantity=_probability(finding.threshold),
            )
        ],
    )


def _threshold_method(finding: Finding, source: str) -> CodeableConcept:
    """Observation.method: which operating threshold decided, the model card's or the site's own."""
    site = bool(finding.threshold_source)
    return CodeableConcept(
        coding=[Coding(system=codes.LOCAL_METHOD_SYSTEM,
                       code=codes.METHOD_SITE_THRESHOLD if site else codes.METHOD_CARD_THRESHOLD,
                       display="Site operating threshold" if site else "Model card operating threshold")],
        text=f"AI probability against the operating threshold {finding.threshold:.4g} from {source}",
    )


def _observation_code(label: str) -> CodeableConcept:
    code = finding_code(label)
    code.text = f"AI probability: {codes.finding_display(label)}"
    return code


def _interpretation(positive: bool) -> CodeableConcept:
    if positive:
        code, display = codes.INTERPRETATION_POSITIVE, codes.INTERPRETATION_POSITIVE_DISPLAY
    else:
        code, display = codes.INTERPRETATION_NEGATIVE, codes.INTERPRETATION_NEGATIVE_DISPLAY
    return CodeableConcept(
        coding=[Coding(system=codes.INTERPRETATION_SYSTEM, code=code, display=display)]
    )


def build_media(
    ctx: OrderContext,
    result: TriageResult,
    *,
    device_reference: str,
    issued: datetime,
) -> Media:
    """The Grad-CAM overlay PNG, inline (base64), so the EHR can show why the model fired."""
    heatmap = result.heatmap
    if heatmap is None:
        raise ValueError("result has no heatmap")
    model = _require_done(result)
    display = codes.finding_display(heatmap.label)

    where = heatmap.location
    if heatmap.sop_instance_uid:
        where += f" (SOP Instance UID {heatmap.sop_instance_uid}{', its middle slice' if heatmap.averaged_slices > 1 else ''})"
    note = (
        f"Grad-CAM heatmap for {display} (label '{heatmap.label}'), {where}. "
        "Explanation overlay, not a diagnostic image. " + AI_DISCLAIMER
    )
    return Media(
        meta=_ai_asserted_meta(result.mode),
        identifier=[result_identifier(result.study_uid, _task_of(result), model.version, "media")],
        basedOn=_based_on(ctx),
        status="completed",
        type=CodeableConcept(
            coding=[
                Coding(
                    system=codes.MEDIA_TYPE_SYSTEM,
                    code=codes.MEDIA_TYPE_IMAGE,
                    display=codes.MEDIA_TYPE_IMAGE_DISPLAY,
                )
            ]
        ),
        subject=_patient(ctx),
        issued=issued,
        device=_ref(device_reference, f"{model.name} {model.version}"),
        extension=_heatmap_source_extension(heatmap.sop_instance_uid),
        # positiveInt: leave out a size the heatmap did not know rather than write 0.
        width=heatmap.width if heatmap.width > 0 else None,
        height=heatmap.height if heatmap.height > 0 else None,
        content=Attachment(
            contentType="image/png",
            data=base64.b64encode(heatmap.png),
            size=len(heatmap.png),
            title=f"Grad-CAM heatmap: {display}, {where}",
        ),
        note=[Annotation(text=note)],
    )


def _heatmap_source_extension(sop_instance_uid: str | None) -> list[Extension] | None:
    """The explained slice's SOP Instance UID as an extension, when it is a UID FHIR's oid type takes."""
    if not sop_instance_uid or not _OID.fullmatch(sop_instance_uid):
        return None
    return [Extension(url=codes.HEATMAP_SOURCE_INSTANCE_EXTENSION, valueOid=f"{codes.URN_OID_PREFIX}{sop_instance_uid}")]


def heatmap_source_instance(media: Any) -> str | None:
    """The SOP Instance UID of the slice our heatmap Media explains (its extension), else None."""
    extensions = media.get("extension") if isinstance(media, dict) else None
    for extension in extensions or []:
        if isinstance(extension, dict) and extension.get("url") == codes.HEATMAP_SOURCE_INSTANCE_EXTENSION:
            value = extension.get("valueOid")
            uid = value.removeprefix(codes.URN_OID_PREFIX) if isinstance(value, str) else ""
            return uid if _OID.fullmatch(uid) else None
    return None


def build_conclusion(result: TriageResult) -> str:
    """The human-readable summary a radiologist reads first in the report."""
    model = _require_done(result)
    sentences: list[str] = []
    positives = result.positive_findings
    if positives:
        top = positives[0]
        sentences.append(
            f"AI triage suggests {codes.finding_display(top.label)} "
            f"(probability {top.probability:.2f}, threshold {top.threshold:.2f})."
        )
        if len(positives) > 1:
            others = ", ".join(
                f"{codes.finding_display(f.label)} ({f.probability:.2f})" for f in positives[1:]
            )
            sentences.append(f"Also above threshold: {others}.")
    else:
        sentences.append("AI triage: no finding above threshold.")
    if result.mode is TaskMode.SHADOW:
        sentences.insert(0, SHADOW_SENTENCE)
    if result.suggested_priority is not None:
        verb = "Would have suggested priority" if result.mode is TaskMode.SHADOW else "Suggested priority"
        sentences.append(f"{verb}: {result.suggested_priority.value}.")
    untrained = [f.label for f in result.findings if not f.trained]
    if untrained:
        sentences.append(
            f"Untrained subtype outputs ({', '.join(untrained)}) are not reported."
        )
    sentences.append(f"Model: {model.name} {model.version}.")
    sentences.append(AI_DISCLAIMER)
    return " ".join(sentences)


def build_diagnostic_report(
    ctx: OrderContext,
    result: TriageResult,
    *,
    observation_references: list[str],
    media_reference: str | None,
    issued: datetime,
    worklist_url: str | None = None,
) -> DiagnosticReport:
    """The preliminary AI report that groups the Observations and the heatmap for the EHR."""
    model = _require_done(result)
    media = None
    if media_reference is not None and result.heatmap is not None:
        media = [
            DiagnosticReportMedia(
                comment=(
                    f"Grad-CAM heatmap for {codes.finding_display(result.heatmap.label)}, "
                    f"{result.heatmap.location}. {AI_DISCLAIMER}"
                ),
                link=_ref(media_reference),
            )
        ]
    presented_form = None
    if worklist_url:
        # A link to the worklist page (result, heatmap, feedback) for EHRs that show it.
        presented_form = [
            Attachment(
                contentType="text/html",
                url=worklist_url,
                title="CDS triage worklist entry (AI result and heatmap)",
            )
        ]
    return DiagnosticReport(
        meta=_ai_asserted_meta(result.mode),
        identifier=[result_identifier(result.study_uid, _task_of(result), model.version, "report")],
        basedOn=_based_on(ctx),
        status="preliminary",
        category=[
            CodeableConcept(
                coding=[
                    Coding(
                        system=codes.V2_0074_SYSTEM,
                        code=codes.V2_0074_RADIOLOGY,
                        display=codes.V2_0074_RADIOLOGY_DISPLAY,
                    )
                ]
            )
        ],
        code=CodeableConcept(
            coding=[
                Coding(
                    system=codes.LOINC_SYSTEM,
                    code=codes.LOINC_DIAGNOSTIC_IMAGING_STUDY,
                    display=codes.LOINC_DIAGNOSTIC_IMAGING_STUDY_DISPLAY,
                )
            ],
            text="AI triage result (preliminary)",
        ),
        subject=_patient(ctx),
        issued=issued,
        imagingStudy=[_imaging_study(ctx, result.study_uid)],
        result=[_ref(r) for r in observation_references] or None,
        media=media,
        conclusion=build_conclusion(result),
        conclusionCode=[finding_code(f.label) for f in result.positive_findings] or None,
        presentedForm=presented_form,
    )


def build_provenance(
    ctx: OrderContext,
    result: TriageResult,
    *,
    target_references: list[str],
    device_reference: str,
    issued: datetime,
) -> Provenance:
    """Who made the results (the model Device) from what (the ImagingStudy), and when.

    No AIAST label here: this record is written by our software about the AI, it is not
    itself an AI assertion. R4 Provenance has no identifier, so idempotency uses a
    meta.tag carrying the deterministic UUID (searched with `_tag` in ifNoneExist).
    """
    if not target_references:
        raise ValueError("a Provenance needs at least one target")
    model = _require_done(result)
    tag_code = result_identifier(result.study_uid, _task_of(result), model.version, "provenance").value
    return Provenance(
        meta=Meta(tag=[Coding(system=codes.PROVENANCE_TAG_SYSTEM, code=tag_code)]),
        target=[_ref(r) for r in target_references],
        recorded=issued,
        agent=[
            ProvenanceAgent(
                type=CodeableConcept(
                    coding=[
                        Coding(
                            system=codes.PROVENANCE_PARTICIPANT_SYSTEM,
                            code=codes.PROVENANCE_PARTICIPANT_PERFORMER,
                            display=codes.PROVENANCE_PARTICIPANT_PERFORMER_DISPLAY,
                        )
                    ]
                ),
                who=_ref(device_reference, f"{model.name} {model.version}"),
            )
        ],
        entity=[
            ProvenanceEntity(
                role=codes.PROVENANCE_ENTITY_ROLE_DERIVATION,
                what=_imaging_study(ctx),
            )
        ],
    )


def _require_done(result: TriageResult) -> ModelRef:
    """Only a DONE result has findings and a model; anything else must not reach FHIR."""
    if result.status is not TriageStatus.DONE:
        raise ValueError(
            f"only a done triage result is written to FHIR, not {result.status.value} "
            f"(study {result.study_uid})"
        )
    assert result.model is not None and result.task is not None  # guaranteed by TriageResult
    return result.model


# ---------------------------------------------------------------------------------------
# The transaction
# ---------------------------------------------------------------------------------------


def _entry(resource: Resource, url: str, if_none_exist: str) -> BundleEntry:
    return BundleEntry(
        fullUrl=url,
        resource=resource,
        request=BundleEntryRequest(
            method="POST",
            url=resource.get_resource_type(),
            ifNoneExist=if_none_exist,
        ),
    )


def build_triage_transaction(
    ctx: OrderContext,
    result: TriageResult,
    *,
    issued: datetime,
    worklist_url: str | None = None,
) -> Bundle:
    """Everything one study's triage writes, as one all-or-nothing FHIR transaction.

    Contents: the model Device; one Observation per trained label; a Media with the
    heatmap when there is one; the DiagnosticReport; a Provenance for all of them.
    Every entry is a conditional create (ifNoneExist), so posting the same result twice
    creates nothing the second time. References inside the bundle use the entries'
    `urn:uuid:` fullUrls; the server rewrites them to the ids it assigns (or finds).
    """
    model = _require_done(result)
    _require_timezone(issued)
    if ctx.study_uid and ctx.study_uid != result.study_uid:
        # Writing one study's findings onto another patient's order is the worst outcome.
        raise ValueError(
            f"order context is for study {ctx.study_uid} but the result is for {result.study_uid}"
        )
    labels = [f.label for f in result.findings]
    if len(labels) != len(set(labels)):
        raise ValueError(f"duplicate labels in findings: {labels}")

    entries: list[BundleEntry] = []

    device = build_device(model, _task_of(result))
    device_id = _first(device.identifier)
    device_url = full_url(device_id)
    entries.append(_entry(device, device_url, identifier_query(device_id)))

    observation_urls: list[str] = []
    for finding in result.findings:
        if not finding.trained:
            continue  # said so in the report conclusion instead
        observation = build_observation(
            ctx, result, finding, device_reference=device_url, issued=issued
        )
        observation_id = _first(observation.identifier)
        url = full_url(observation_id)
        observation_urls.append(url)
        entries.append(_entry(observation, url, identifier_query(observation_id)))

    media_url: str | None = None
    if result.heatmap is not None:
        media = build_media(ctx, result, device_reference=device_url, issued=issued)
        media_id = _first(media.identifier)
        media_url = full_url(media_id)
        entries.append(_entry(media, media_url, identifier_query(media_id)))

    report = build_diagnostic_report(
        ctx,
        result,
        observation_references=observation_urls,
        media_reference=media_url,
        issued=issued,
        worklist_url=worklist_url,
    )
    report_id = _first(report.identifier)
    report_url = full_url(report_id)
    entries.append(_entry(report, report_url, identifier_query(report_id)))

    targets = observation_urls + ([media_url] if media_url else []) + [report_url]
    provenance = build_provenance(
        ctx, result, target_references=targets, device_reference=device_url, issued=issued
    )
    tag = _first(provenance.meta.tag if provenance.meta else None)
    entries.append(
        _entry(provenance, f"urn:uuid:{tag.code}", f"_tag={tag.system}|{tag.code}")
    )

    return Bundle(type="transaction", entry=entries)


# ---------------------------------------------------------------------------------------
# Subscription, ImagingStudy, ServiceRequest helpers
# ---------------------------------------------------------------------------------------


def build_subscription(
    endpoint: str,
    *,
    header_secret: str | None,
    criteria: str = "ImagingStudy?",
    reason: str = DEFAULT_SUBSCRIPTION_REASON,
) -> Subscription:
    """The R4 rest-hook Subscription that makes the FHIR server notify us of new studies.

    Tagged with SUBSCRIPTION_TAG so `cds-triage subscribe` can find its own Subscription
    (search SUBSCRIPTION_TAG_QUERY) and not create a duplicate. The secret travels in a
    header the webhook checks; header values must not contain line breaks.
    """
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"subscription endpoint must be an http(s) URL, got {endpoint!r}")
    headers: list[str | None] | None = None
    if header_secret is not None:
        if not header_secret.strip() or any(c in header_secret for c in "\r\n"):
            raise ValueError("header secret must be non-empty and contain no line breaks")
        headers = [f"{SUBSCRIPTION_SECRET_HEADER}: {header_secret}"]
    return Subscription(
        meta=Meta(tag=[SUBSCRIPTION_TAG.model_copy()]),
        status="requested",
        reason=reason,
        criteria=criteria,
        channel=SubscriptionChannel(
            type="rest-hook",
            endpoint=endpoint,
            payload="application/fhir+json",
            header=headers,
        ),
    )


_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def is_fhir_id(text: object) -> bool:
    """A FHIR R4 id (1-64 of A-Z a-z 0-9 - .) that is also safe as a URL path segment.

    "." and ".." match the FHIR pattern but are path segments: `ImagingStudy/..` reads the
    server's base. The one rule for every place an id meets a URL.
    """
    return isinstance(text, str) and bool(_FHIR_ID.fullmatch(text)) and text not in (".", "..")


def reference_id(reference: str | None, resource_type: str) -> str | None:
    """`ServiceRequest/123` (or a full URL ending so, with or without `/_history/n`) → `123`;
    anything else → None."""
    if not reference:
        return None
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == resource_type and is_fhir_id(parts[-1]):
        return parts[-1]
    return None


def parse_fhir_datetime(value: Any) -> datetime | None:
    """A FHIR dateTime/instant as an aware datetime (UTC when it has no offset); None if absent or malformed."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def study_uid_from_imaging_study(resource: dict[str, Any]) -> str:
    """The DICOM Study Instance UID of an ImagingStudy (JSON dict).

    R4 keeps it in identifier[system=urn:dicom:uid], value "urn:oid:<uid>". A bare UID
    without the "urn:oid:" prefix is accepted too (some bridges write it that way); any
    other shape raises InvalidResourceError, because without the UID we cannot find the
    pixels in the PACS.
    """
    if not isinstance(resource, dict) or resource.get("resourceType") != "ImagingStudy":
        kind = resource.get("resourceType") if isinstance(resource, dict) else type(resource).__name__
        raise InvalidResourceError(f"expected an ImagingStudy resource, got {kind!r}")
    identifiers = resource.get("identifier") or []
    if not isinstance(identifiers, list):
        raise InvalidResourceError("ImagingStudy.identifier must be a list")
    values = {
        str(ident.get("value", ""))
        for ident in identifiers
        if isinstance(ident, dict) and ident.get("system") == codes.DICOM_UID_SYSTEM
    }
    where = f"ImagingStudy/{resource.get('id', '?')}"
    if not values:
        raise InvalidResourceError(
            f"{where} has no identifier with system {codes.DICOM_UID_SYSTEM} (Study Instance UID)"
        )
    if len(values) > 1:
        raise InvalidResourceError(f"{where} has several Study Instance UIDs: {sorted(values)}")
    value = values.pop().strip()
    uid = value[len(codes.URN_OID_PREFIX):] if value.startswith(codes.URN_OID_PREFIX) else value
    if len(uid) > 64 or not _DICOM_UID.match(uid):
        raise InvalidResourceError(f"{where} has a malformed Study Instance UID: {value!r}")
    return uid


def with_priority(service_request: dict[str, Any], priority: Priority, *, note: str | None = None) -> dict[str, Any]:
    """A copy of a ServiceRequest (JSON dict) with `priority` set, checked against R4B.

    Works on the dict, not on a re-serialised model, so everything else the EHR stored
    (extensions, meta.versionId for If-Match) goes back unchanged. `note` is appended to
    ServiceRequest.note, so whoever opens the order sees that the AI raised it and from what;
    the note carries the change itself as data too (PRIORITY_CHANGE_EXTENSION: from, to), which
    is what readers use (`ai_priority_change`), never the note's words.
    """
    if not isinstance(service_request, dict) or service_request.get("resourceType") != "ServiceRequest":
        raise InvalidResourceError("expected a ServiceRequest resource")
    updated = copy.deepcopy(service_request)
    updated["priority"] = Priority(priority).value
    if note:
        change = [{"url": codes.PRIORITY_CHANGE_TO, "valueCode": updated["priority"]}]
        before = service_request.get("priority")
        if isinstance(before, str) and before:
            change.insert(0, {"url": codes.PRIORITY_CHANGE_FROM, "valueCode": before})
        updated["note"] = [*(updated.get("note") or []), {
            "extension": [{"url": codes.PRIORITY_CHANGE_EXTENSION, "extension": change}], "text": note}]
    try:
        ServiceRequest.model_validate(updated)
    except ValidationError as exc:
        raise InvalidResourceError(
            f"ServiceRequest/{service_request.get('id', '?')} is not valid R4B: {exc}"
        ) from exc
    return updated


def ai_priority_change(service_request: Any) -> tuple[str | None, str] | None:
    """The newest priority change the AI recorded on this order, as (from, to); from is None when
    the order had no priority. None when the AI never raised it. Read from the note's extension."""
    notes = service_request.get("note") if isinstance(service_request, dict) else None
    for note in reversed(notes or []):
        for extension in (note.get("extension") or []) if isinstance(note, dict) else []:
            if not isinstance(extension, dict) or extension.get("url") != codes.PRIORITY_CHANGE_EXTENSION:
                continue
            parts = {part.get("url"): part.get("valueCode") for part in extension.get("extension") or []
                     if isinstance(part, dict)}
            to = parts.get(codes.PRIORITY_CHANGE_TO)
            if isinstance(to, str) and to:
                before = parts.get(codes.PRIORITY_CHANGE_FROM)
                return (before if isinstance(before, str) and before else None), to
    return None
