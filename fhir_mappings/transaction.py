"""One study's triage as one all-or-nothing FHIR transaction of conditional creates.

Serialise with `bundle.model_dump(mode="json", exclude_none=True)` (a dict) or
`bundle.model_dump_json(exclude_none=True)` (a str); the write-back client POSTs it as it is.
"""

from __future__ import annotations

from datetime import datetime

from fhir.resources.R4B.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhir.resources.R4B.resource import Resource

from cds_service.core.domain import OrderContext, TriageResult

from .common import first, require_done, require_timezone, task_of
from .conventions import DEFAULT_CONVENTIONS, Conventions
from .device import build_device
from .diagnostic_report import build_diagnostic_report
from .identifiers import full_url, identifier_query
from .media import build_media
from .observation import build_observation
from .provenance import build_provenance


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
    effective: str | None = None,
    conventions: Conventions = DEFAULT_CONVENTIONS,
) -> Bundle:
    """Everything one study's triage writes, as one all-or-nothing FHIR transaction.

    Contents: the model Device; one Observation per trained label; a Media with the
    heatmap when there is one; the DiagnosticReport; a Provenance for all of them.
    Every entry is a conditional create (ifNoneExist), so posting the same result twice
    creates nothing the second time. References inside the bundle use the entries'
    `urn:uuid:` fullUrls; the server rewrites them to the ids it assigns (or finds).
    """
    model = require_done(result)
    require_timezone(issued)
    if ctx.study_uid and ctx.study_uid != result.study_uid:
        # Writing one study's findings onto another patient's order is the worst outcome.
        raise ValueError(
            f"order context is for study {ctx.study_uid} but the result is for {result.study_uid}"
        )
    labels = [f.label for f in result.findings]
    if len(labels) != len(set(labels)):
        raise ValueError(f"duplicate labels in findings: {labels}")

    entries: list[BundleEntry] = []

    device = build_device(model, task_of(result), conventions)
    device_id = first(device.identifier)
    device_url = full_url(device_id)
    entries.append(_entry(device, device_url, identifier_query(device_id)))

    observation_urls: list[str] = []
    for finding in result.findings:
        if not finding.trained:
            continue  # said so in the report conclusion instead
        observation = build_observation(
            ctx, result, finding, device_reference=device_url, issued=issued, effective=effective,
            conventions=conventions,
        )
        observation_id = first(observation.identifier)
        url = full_url(observation_id)
        observation_urls.append(url)
        entries.append(_entry(observation, url, identifier_query(observation_id)))

    media_url: str | None = None
    if result.heatmap is not None:
        media = build_media(ctx, result, device_reference=device_url, issued=issued, conventions=conventions)
        media_id = first(media.identifier)
        media_url = full_url(media_id)
        entries.append(_entry(media, media_url, identifier_query(media_id)))

    report = build_diagnostic_report(
        ctx,
        result,
        observation_references=observation_urls,
        media_reference=media_url,
        issued=issued,
        worklist_url=worklist_url,
        effective=effective,
        conventions=conventions,
    )
    report_id = first(report.identifier)
    report_url = full_url(report_id)
    entries.append(_entry(report, report_url, identifier_query(report_id)))

    targets = observation_urls + ([media_url] if media_url else []) + [report_url]
    provenance = build_provenance(
        ctx, result, target_references=targets, device_reference=device_url, issued=issued,
        conventions=conventions,
    )
    tag = first(provenance.meta.tag if provenance.meta else None)
    entries.append(
        _entry(provenance, str(tag.code), f"_tag={tag.system}|{tag.code}")  # the code is urn:uuid:<uuid>
    )

    return Bundle(type="transaction", entry=entries)
