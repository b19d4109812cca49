"""One study's journey, top to bottom: ImagingStudy → PACS → model → FHIR write-back.

`run_triage` is the function to read to understand the product. Everything it calls is
either a pure function (routing, preprocessing, triage, priority policy, FHIR mapping) or
a thin adapter (FhirClient, Pacs) that raises the service's error kinds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from itertools import chain
from typing import Any, Callable, Iterator

import numpy as np

from fhir_mappings.builders import build_triage_transaction, reference_id, study_uid_from_imaging_study, with_priority
from fhir_mappings.conventions import Conventions
from fhir_mappings.reading import fhir_datetime

from cds_service.core.decoding import PreparedValues, decode_pool, prepare_slice, prepare_values, slab_decoders
from cds_service.core.domain import DISCLAIMER, OrderContext, PacsResult, Priority, Series, Task, TaskMode, TriageResult
from cds_service.core.errors import InvalidResourceError, ModelUnavailableError, UpstreamError
from cds_service.adapters.fhir_client import FhirClient, VersionConflictError
from cds_service.core.inference import score_stream
from cds_service.core.input_profile import series_verdict
from .jobs.state import Job, JobState
from cds_service.adapters.metrics import observe_model_latency
from cds_service.core.models import ModelRegistry
from cds_service.adapters.pacs import Pacs
from cds_service.core.preprocessing import dicom_to_image
from cds_service.core.priority import parse_priority, raised_priority
from cds_service.core.routing import (fhir_hints, header_text, not_applicable_reason, pixel_candidates, route_by_pixels, route_study,
                                      task_from_pixels)
from cds_service.adapters.secondary_capture import StoredCapture, heatmap_to_pacs
from cds_service.adapters.structured_report import report_to_pacs
from cds_service.core.settings import Settings
from cds_service.core.slabs import single_slice, slab_image, slab_inputs
from cds_service.streamed_series import StreamedSeries, in_background, series_plan
from cds_service.core.triage import triage_scores

log = logging.getLogger(__name__)
# decoded slices held while the series' positions are asked for (QIDO-RS, ~0.2 s for 300 instances in
# Orthanc): at 0.5 MB each (512 x 512 stored integers) at most 32 MB; then the worker waits for the plan
PLAN_WAIT_SLICES = 64

PRIORITY_UPDATE_ATTEMPTS = 5


@dataclass
class PipelineDeps:
    """The adapters a worker holds for its lifetime (models load once per process)."""

    settings: Settings
    fhir: FhirClient
    models: ModelRegistry
    pacs_for: Callable[[str], Pacs]


def order_context(imaging_study: dict[str, Any], service_request_id: str | None) -> OrderContext:
    """Patient and order of an ImagingStudy; the caller's ServiceRequest id wins over basedOn."""
    patient_id = reference_id((imaging_study.get("subject") or {}).get("reference"), "Patient")
    if not patient_id:
        raise InvalidResourceError("ImagingStudy has no Patient subject")
    if not service_request_id:
        based_on = [reference_id(ref.get("reference"), "ServiceRequest") for ref in imaging_study.get("basedOn") or []]
        service_request_id = next((ref for ref in based_on if ref), None)
    return OrderContext(
        imaging_study_id=str(imaging_study["id"]),
        patient_id=patient_id,
        service_request_id=service_request_id,
        study_uid=study_uid_from_imaging_study(imaging_study),
    )


def result_summary(result: TriageResult) -> dict[str, Any]:
    """What the job record keeps of a result (no pixels, no patient data)."""
    return {
        "task": result.task.value if result.task else None,
        "model": {"name": result.model.name, "version": result.model.version} if result.model else None,
        "findings": [
            {"label": f.label, "probability": round(f.probability, 4), "positive": f.positive, "trained": f.trained}
            for f in result.findings
        ],
        "suggestedPriority": result.suggested_priority.value if result.suggested_priority else None,
        "slices": result.slices_scored,
        "mode": result.mode.value,
        "studyUid": result.study_uid,  # where a viewer opens it (CDS_VIEWER_URL, on a card)
    }



def run_triage(job: Job, deps: PipelineDeps) -> tuple[JobState, str, dict[str, Any]]:
    """Triage the job's ImagingStudy and write the result back. Raises TriageError kinds."""
    settings = deps.settings

    # 1. The order, as the EHR knows it.
    imaging_study, _ = deps.fhir.read("ImagingStudy", job.imaging_study_id)
    if imaging_study.get("resourceType") != "ImagingStudy":
        raise InvalidResourceError(f"expected an ImagingStudy, got {imaging_study.get('resourceType')}")
    ctx = order_context(imaging_study, job.service_request_id)

    # 2. The images, as the PACS has them.
    pacs = deps.pacs_for(dicomweb_url_for(imaging_study, deps.fhir, settings))
    study = pacs.find_study(ctx.study_uid)

    # 3. Which model reads it, if any.
    hints = fhir_hints(imaging_study)
    route = route_study(study, hints)
    if route is None and ctx.service_request_id:  # the order's code, read only when nothing else decided
        order, _ = deps.fhir.read("ServiceRequest", ctx.service_request_id)
        hints = fhir_hints(imaging_study, order)
        route = route_study(study, hints)
    candidates = pixel_candidates(study, hints) if route is None else []
    if candidates:  # neither DICOM nor FHIR named the anatomy: one image per candidate series, looked at
        route = route_by_pixels(study, pixel_looks(pacs, ctx.study_uid, candidates, deps.models), hints)
    if route is None:
        return JobState.NOT_APPLICABLE, not_applicable_reason(study, with_fhir=True, pixels_looked_at=bool(candidates)), {}
    try:
        model = deps.models.get(route.task)
        profile = deps.models.input_profile(route.task)
    except ModelUnavailableError as exc:
        return JobState.MODEL_UNAVAILABLE, str(exc), {"task": route.task.value}
    mode = settings.mode_for(route.task, model.card.default_mode)
    if mode is TaskMode.OFF:
        return (JobState.NOT_APPLICABLE, f"{route.task.value} is off at this site (CDS_TASK_MODES)",
                {"task": route.task.value, "mode": mode.value})

    # 4. Fetch the series and score it as it arrives: each slice is decoded and preprocessed as the
    #    model card says (by the decoder processes, CDS_DECODE_PROCESSES, or in this thread: the
    #    default on small machines) while the model's threads score the batch before. Of each slice
    #    only its place, its SOP Instance UID and a few hundred numbers for the input check are kept:
    #    memory does not grow with the series. A card with a slab thickness (head CT, core/slabs.py)
    #    has the series' positions asked of the PACS (QIDO-RS) while its first slices arrive and are
    #    decoded; a thin-slice series is then scored as slabs: each slice summed into its slab, and
    #    the slab becomes one model input when its last slice has arrived, and decoder threads decode
    #    the rest of the series. Any other series is read slice by slice, as before.
    spec = model.card.preprocessing
    pool = decode_pool(settings.decode_processes)
    slab_pool = slab_decoders(pool, settings.decode_threads)  # takes over once the plan says slabs
    slab_mm = model.card.series_pooling.slab_mm if spec.kind == "ct_windows" else None
    planning = (in_background(lambda: series_plan(pacs, ctx.study_uid, route.series, slab_mm), "slab-plan")
                if slab_mm is not None else None)
    series = StreamedSeries(pacs, ctx.study_uid, route.series.uid, pool, settings.max_series_bytes)

    def model_inputs() -> Iterator[np.ndarray]:
        parts = pacs.iter_series_parts(ctx.study_uid, route.series, settings.max_instances)
        if planning is None:
            for prepared in pool.map(prepare_slice, parts, spec, settings.max_series_bytes):
                series.add(prepared)
                yield prepared.image
        else:
            decoded = series.counted(pool.map(prepare_values, parts, spec, settings.max_series_bytes))
            early: list[PreparedValues] = []
            for prepared in decoded:  # decoded while the plan is asked for, held until it is known
                early.append(prepared)
                if planning.done() or len(early) >= PLAN_WAIT_SLICES:
                    break
            series.plan, series.plan_sops = planning.result()
            if series.plan.slabbed:
                if slab_pool is not pool and slab_pool.workers:
                    # the rest by the decoder threads (`decoded` ran here, one at a time: none is in flight)
                    decoded = series.counted(slab_pool.map(prepare_values, parts, spec, settings.max_series_bytes))
                for slab in slab_inputs(chain(early, decoded), series.plan, series.plan_sops, spec.input_size, spec.framing):
                    series.add_slab(slab)
                    yield slab.image
            else:
                for prepared in chain(early, decoded):
                    alone = single_slice(prepared, spec.input_size, spec.framing)
                    series.add(alone, counted=True)
                    yield alone.image
        if route.task is Task.HEAD_CT_ICH and series.modality.upper() == "CT":
            series.measure_middle_slices()  # fetched again while the last batch is scored

    started = time.perf_counter()
    scores = score_stream(model, model_inputs(), route.series.number_of_instances, settings.inference_batch_size,
                          keep_features=False)
    scores = scores.reordered(series.order)

    # 4b. Refuse what the model was not made for (a chest CT whose header says head, an X-ray of a
    #     knee), before anything is written: the reason names the measurement. Images of the right
    #     anatomy from another scanner or hospital are scored, and marked unfamiliar.
    verdict = series_verdict(route.task, profile, series.statistics(), ct_shapes=series.middle_shapes(),
                             modality=route.series.modality, header_text=header_text(route.series))
    if verdict.fits is False:
        return (JobState.NOT_APPLICABLE, verdict.reason,
                {"task": route.task.value, "routedBy": route.evidence, "inputCheck": verdict.to_summary()})

    # 5. Findings, priority, and Grad-CAM of the top finding, drawn on its slice: the one slice that
    #    drove the finding is fetched and decoded again (the explanation scores it, shifted, and the
    #    overlay draws on it), so no slice is kept while the series arrives.
    def slice_image(index: int) -> np.ndarray:
        if series.slabbed:  # the slab: its slices fetched again and averaged
            return slab_image(series.slab_datasets(index), spec)
        return dicom_to_image(series.dataset(index), spec)

    result = triage_scores(
        model, scores, slice_image, settings.priority_rules,
        study_uid=ctx.study_uid, series_uid=route.series.uid, sop_instance_uids=series.sop_instance_uids(),
        slab_plan=series.plan,
    )
    result = replace(result, mode=mode, input_fit=verdict.fit)
    observe_model_latency(route.task.value, time.perf_counter() - started)

    # 6. Write the report, observations, heatmap, device and provenance: all or nothing. Their effective
    #    time is the study's (ImagingStudy.started), else the series' acquisition date from the PACS.
    issued = datetime.now(timezone.utc)
    conventions = Conventions.from_settings(settings)
    bundle = build_triage_transaction(ctx, result, issued=issued, worklist_url=f"{settings.public_url}/worklist",
                                      effective=fhir_datetime(imaging_study.get("started")) or route.series.acquired or None,
                                      conventions=conventions)
    response = deps.fhir.transaction(bundle.model_dump(mode="json", exclude_none=True))
    written = written_locations(response)

    # 7. Move the order up the worklist (never down); a task in shadow mode never touches it.
    if mode is TaskMode.SHADOW:
        change = {"changed": False, "reason": f"shadow mode: {route.task.value} never changes a priority here"}
    else:
        change = raise_order_priority(deps.fhir, ctx.service_request_id, result.suggested_priority, result, conventions)
    summary = result_summary(result) | {"routedBy": route.evidence, "inputCheck": verdict.to_summary(),
                                        "written": written, "priority": change}
    if series.plan is not None:  # "300 instances read as 30 slabs of 5 mm", or why each was read alone
        summary["slabs"] = series.plan.to_summary()

    # 8. The results into the PACS too, in the same study, as CDS_RESULTS_TO_PACS asks: the heatmap as a
    #    Secondary Capture, the findings as a DICOM Structured Report that references the key image and
    #    the capture. A failure is recorded in the job result; it never fails a triage already written.
    summary |= results_to_pacs(settings.results_to_pacs, pacs, deps.fhir, series, result, written, issued, conventions)

    log.info("triage done", extra={"job": job.id, "task": route.task.value, "priority": change})
    return JobState.DONE, "", summary


def results_to_pacs(wanted: frozenset[PacsResult], pacs: Pacs, fhir: FhirClient, series: StreamedSeries,
                    result: TriageResult, written: dict[str, list[str]], issued: datetime,
                    conventions: Conventions) -> dict[str, Any]:
    """Step 8: the Secondary Capture, then the SR that references it, each where CDS_RESULTS_TO_PACS names it;
    what the job record keeps of them (`heatmapToPacs`, `reportToPacs`)."""
    record: dict[str, Any] = {}
    if PacsResult.SC in wanted and result.heatmap is not None:
        record["heatmapToPacs"] = heatmap_to_pacs(pacs, fhir, series.fetched_datasets(), result, written.get("Media") or [])
    if PacsResult.SR in wanted:
        key = series.input_instances(result.heatmap.slice_index) if result.heatmap is not None else []
        record["reportToPacs"] = report_to_pacs(
            pacs, fhir, result, source=next(iter(series.fetched_datasets()), None), key_instances=key,
            capture=StoredCapture.from_record(record.get("heatmapToPacs")),
            report_references=written.get("DiagnosticReport") or [], issued=issued, conventions=conventions)
    return record


def pixel_looks(pacs: Pacs, study_uid: str, candidates: list[Series], models: ModelRegistry) -> dict[str, Task | None]:
    """Series UID -> the task its middle image shows, for the candidate series in order, stopping at
    the first that decides (each look fetches one instance)."""
    looks: dict[str, Task | None] = {}
    pixel_models = models.pixel_models() if candidates else {}
    for series in candidates:
        looks[series.uid] = task_from_pixels(pacs.middle_instance(study_uid, series), pixel_models)
        if looks[series.uid] is not None:
            break
    return looks


def dicomweb_url_for(imaging_study: dict[str, Any], fhir: FhirClient, settings: Settings) -> str:
    """The DICOMweb base for this study: its Endpoint if allow-listed, else the default.

    An ImagingStudy can name any Endpoint; following it blindly would let whoever writes
    ImagingStudy resources make us fetch from arbitrary hosts, so only known PACS are used.
    """
    for ref in imaging_study.get("endpoint") or []:
        endpoint_id = reference_id(ref.get("reference"), "Endpoint")
        if not endpoint_id:
            continue
        endpoint, _ = fhir.read("Endpoint", endpoint_id)
        address = str(endpoint.get("address", "")).rstrip("/")
        if address in settings.allowed_dicomweb_urls:
            return address
        log.warning("ignoring an ImagingStudy endpoint that is not allow-listed (CDS_DICOMWEB_ALLOWED_ENDPOINTS)")
    return settings.dicomweb_url.rstrip("/")


def written_locations(response: dict[str, Any]) -> dict[str, list[str]]:
    """`{"DiagnosticReport": ["DiagnosticReport/12"], ...}` from a transaction-response."""
    written: dict[str, list[str]] = {}
    for entry in response.get("entry") or []:
        location = (entry.get("response") or {}).get("location", "")
        parts = location.split("/_history")[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-1]:
            written.setdefault(parts[-2], []).append(f"{parts[-2]}/{parts[-1]}")
    return written


def raise_order_priority(fhir: FhirClient, service_request_id: str | None, suggested: Priority | None,
                         result: TriageResult, conventions: Conventions | None = None) -> dict[str, Any]:
    """Raise ServiceRequest.priority with If-Match; on 412 re-read and decide again."""
    if not service_request_id:
        return {"changed": False, "reason": "no ServiceRequest for this study"}
    for _ in range(PRIORITY_UPDATE_ATTEMPTS):
        order, version = fhir.read("ServiceRequest", service_request_id)
        current = parse_priority(order.get("priority"))
        new = raised_priority(current, suggested)
        if new is None:
            return {"changed": False, "from": _code(current), "to": _code(current)}
        try:
            fhir.update(with_priority(order, new, note=priority_note(current, new, result),
                                      conventions=conventions or Conventions()), if_match=version)
        except VersionConflictError:
            continue  # someone changed the order meanwhile: re-read, and never lower theirs
        return {"changed": True, "from": _code(current), "to": new.value}
    raise UpstreamError("ServiceRequest kept changing under us; priority update will be retried")


def priority_note(current: Priority | None, new: Priority, result: TriageResult) -> str:
    """The note left on the order, so a person sees who raised it, from what, and why."""
    top = result.top_finding
    why = f"{top.label} {top.probability:.0%}" if top else "AI finding"
    model = f"{result.model.name} {result.model.version}" if result.model else "AI model"
    return (f"Priority raised from {_code(current) or 'unset'} to {new.value} by AI triage ({why}; {model}). "
            f"{DISCLAIMER}")


def _code(priority: Priority | None) -> str | None:
    return priority.value if priority else None
