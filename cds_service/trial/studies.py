"""Each triaged study with what the AI said, the radiologist's final report, the truth and the times (pure).

In: the resources `fhir_reads` found (our AI DiagnosticReports with their Observations and Devices,
the final reports of the same patients, the orders and studies) and the CDS Hooks feedback. Out: one
`StudyRecord` per study and task, and the `Problems` a person should know of: final reports that name
no study, or a study we never triaged; studies with several final reports (the latest is used); codes
the map does not know; AI reports whose task cannot be told. Each is counted and listed, none stops
the trial.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fhir_mappings import codes
from fhir_mappings.conventions import DEFAULT_CONVENTIONS, Conventions
from fhir_mappings.builders import is_shadow, parse_fhir_datetime, reference_id

from fhir_mappings.ai_reports import WITHDRAWN_STATUSES, ai_report_from_fhir, is_ai_report
from cds_service.core.domain import NEGATIVE_LABELS, TASK_LABELS, Task, TaskMode
from cds_service.core.site_thresholds import has_presence_rule, main_label
from cds_service.trial.truth import TaskCodes, Truth, report_codings, truth_from_codes, truth_from_feedback

FINAL_STATUSES = ("final", "amended")
_OLDEST = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class AiResult:
    """Our AI report of one study, as the trial needs it."""

    report_id: str
    study_id: str
    task: Task
    mode: TaskMode
    issued: datetime | None
    probabilities: Mapping[str, float]  # per label, as written in the Observations (4 decimals)
    decided: Mapping[str, bool]  # per measured label: positive at triage
    recorded_thresholds: Mapping[str, float]  # per label: the operating threshold the Observation records
    order_id: str | None = None
    patient_id: str | None = None
    model: tuple[str, str] | None = None  # (name, version) of the Device

    @property
    def raised(self) -> bool:
        """Whether triage raised the study (in shadow mode: would have): its main decision was positive."""
        return bool(self.decided.get(main_label(self.task)))


@dataclass
class StudyRecord:
    ai: AiResult
    final_report: dict[str, Any] | None = None
    truth: Truth | None = None
    unknown: str = ""  # why there is no truth
    started: datetime | None = None
    started_from: str = ""  # "order authoredOn" or "study started"

    @property
    def study_id(self) -> str:
        return self.ai.study_id

    @property
    def reported(self) -> datetime | None:
        return parse_fhir_datetime((self.final_report or {}).get("issued"))

    @property
    def turnaround_h(self) -> float | None:
        """Hours from the order (or the study's start) to the radiologist's final report."""
        if self.started is None or self.reported is None:
            return None
        return (self.reported - self.started).total_seconds() / 3600.0


@dataclass
class Problems:
    """What a person should know about the data, each listed (report and study ids)."""

    final_without_study: list[str] = field(default_factory=list)  # DiagnosticReport ids
    final_for_untriaged_study: list[dict[str, Any]] = field(default_factory=list)
    several_finals: list[dict[str, Any]] = field(default_factory=list)
    unknown_codes: list[dict[str, Any]] = field(default_factory=list)
    several_ai_reports: list[dict[str, Any]] = field(default_factory=list)
    ai_reports_without_task: list[str] = field(default_factory=list)
    final_without_issued: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {name: value for name, value in vars(self).items()}

    def lines(self) -> list[str]:
        """One sentence per kind of problem found, with its count."""
        said = {
            "final_without_study": "final reports that name no ImagingStudy and no order of a triaged study (not used)",
            "final_for_untriaged_study": "final reports for studies or orders we never triaged (not used)",
            "several_finals": "studies with several final reports (the latest, amended first, is used)",
            "unknown_codes": "final reports with codes the code map does not know (listed; add them with --codes)",
            "several_ai_reports": "studies with several AI reports of one task (the latest is used)",
            "ai_reports_without_task": "AI reports without an Observation that names their task (not used)",
            "final_without_issued": "final reports without an `issued` time (no turnaround for their study)",
        }
        return [f"{said[name][0].upper()}{said[name][1:]}: {len(items)}" for name, items in vars(self).items() if items]


def task_of_labels(labels: Iterable[str]) -> Task | None:
    found = {task for label in labels for task, known in TASK_LABELS.items() if label in known}
    return found.pop() if len(found) == 1 else None


def _device_model(device: Mapping[str, Any] | None) -> tuple[str, str] | None:
    if not device:
        return None
    name = next((n.get("name") for n in device.get("deviceName") or [] if isinstance(n, dict) and n.get("type") == "model-name"), None)
    version = next((v.get("value") for v in device.get("version") or [] if isinstance(v, dict) and v.get("value")), None)
    return (str(name), str(version)) if name and version else None


def _recorded_threshold(observation: Mapping[str, Any], conventions: Conventions) -> float | None:
    for component in observation.get("component") or []:
        coded = any(c.get("system") == conventions.component_system and c.get("code") == codes.COMPONENT_OPERATING_THRESHOLD
                    for c in (component.get("code") or {}).get("coding") or [] if isinstance(c, dict))
        value = (component.get("valueQuantity") or {}).get("value")
        if coded and isinstance(value, (int, float)):
            return float(value)
    return None


def ai_results(resources: Sequence[Mapping[str, Any]], devices: Mapping[str, Mapping[str, Any]],
               problems: Problems, conventions: Conventions = DEFAULT_CONVENTIONS) -> list[AiResult]:
    """Our AI reports among `resources` (with their Observations) as AiResults; `devices` by "Device/<id>"."""
    observations = {f"Observation/{r['id']}": r for r in resources if r.get("resourceType") == "Observation" and r.get("id")}
    found = []
    for report in resources:
        if not is_ai_report(report, conventions) or not report.get("id") or report.get("status") in WITHDRAWN_STATUSES:
            continue
        parsed = ai_report_from_fhir(report, observations, conventions)
        results = [observations.get(f"Observation/{reference_id(r.get('reference'), 'Observation')}")
                   for r in report.get("result") or [] if isinstance(r, dict)]
        labelled = {f.label: f for f in parsed.findings}
        task = task_of_labels(labelled)
        if task is None or parsed.imaging_study_id is None:
            problems.ai_reports_without_task.append(str(report["id"]))
            continue
        probabilities = {label: f.probability for label, f in labelled.items() if f.probability is not None}
        decided = {label: f.positive for label, f in labelled.items() if label not in NEGATIVE_LABELS}
        if has_presence_rule(task):
            decided[main_label(task)] = any(decided.values())
        thresholds: dict[str, float] = {}
        device_ref = None
        for observation in filter(None, results):
            label = next((c.get("code") for c in (observation.get("code") or {}).get("coding") or []
                          if isinstance(c, dict) and c.get("system") == conventions.finding_system), None)
            recorded = _recorded_threshold(observation, conventions)
            if label and recorded is not None:
                thresholds[str(label)] = recorded
            device_ref = device_ref or (observation.get("device") or {}).get("reference")
        device_id = reference_id(device_ref, "Device")
        found.append(AiResult(
            report_id=str(report["id"]), study_id=parsed.imaging_study_id, task=task,
            mode=TaskMode.SHADOW if is_shadow(report) else TaskMode.ACTIVE, issued=parsed.issued,
            probabilities=probabilities, decided=decided, recorded_thresholds=thresholds,
            order_id=next((reference_id(r.get("reference"), "ServiceRequest") for r in report.get("basedOn") or []
                           if isinstance(r, dict) and reference_id(r.get("reference"), "ServiceRequest")), None),
            patient_id=reference_id((report.get("subject") or {}).get("reference"), "Patient"),
            model=_device_model(devices.get(f"Device/{device_id}")) if device_id else None))
    return found


def latest_per_study(results: Iterable[AiResult], problems: Problems) -> list[AiResult]:
    """One AI result per (study, task): the latest issued; the others are listed."""
    grouped: dict[tuple[str, Task], list[AiResult]] = defaultdict(list)
    for result in results:
        grouped[(result.study_id, result.task)].append(result)
    kept = []
    for (study, task), group in sorted(grouped.items(), key=lambda item: (item[0][0], item[0][1].value)):
        group.sort(key=lambda r: (r.issued or _OLDEST, r.report_id))
        kept.append(group[-1])
        if len(group) > 1:
            problems.several_ai_reports.append({"study": study, "task": task.value, "reports": [r.report_id for r in group],
                                                "used": group[-1].report_id})
    return kept


def _final_sort_key(report: Mapping[str, Any]) -> tuple[datetime, bool, datetime]:
    """Latest first when sorted in reverse: issued, then amended over final, then the server's lastUpdated."""
    return (parse_fhir_datetime(report.get("issued")) or _OLDEST, report.get("status") == "amended",
            parse_fhir_datetime((report.get("meta") or {}).get("lastUpdated")) or _OLDEST)


def finals_by_study(finals: Iterable[Mapping[str, Any]], triaged: Sequence[AiResult],
                    studies: Mapping[str, Mapping[str, Any]], problems: Problems,
                    conventions: Conventions = DEFAULT_CONVENTIONS) -> dict[str, list[dict[str, Any]]]:
    """The radiologists' final reports (status final/amended, not ours) of each triaged study: named
    by its ImagingStudy, or by its order. Reports naming nothing we triaged are listed as problems."""
    triaged_ids = {r.study_id for r in triaged}
    by_order: dict[str, set[str]] = defaultdict(set)
    for result in triaged:
        orders = {result.order_id} | {reference_id(ref.get("reference"), "ServiceRequest")
                                      for ref in (studies.get(result.study_id) or {}).get("basedOn") or [] if isinstance(ref, dict)}
        for order in filter(None, orders):
            by_order[order].add(result.study_id)
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen: set[str] = set()
    for report in finals:
        report_id = str(report.get("id"))
        if report.get("status") not in FINAL_STATUSES or is_ai_report(report, conventions) or report_id in seen:
            continue
        seen.add(report_id)
        named_studies = {s for s in (reference_id(r.get("reference"), "ImagingStudy") for r in report.get("imagingStudy") or []
                                     if isinstance(r, dict)) if s}
        named_orders = {o for o in (reference_id(r.get("reference"), "ServiceRequest") for r in report.get("basedOn") or []
                                    if isinstance(r, dict)) if o}
        targets = (named_studies & triaged_ids) | {s for o in named_orders for s in by_order.get(o, ())}
        if targets:
            for study in sorted(targets):
                found[study].append(dict(report))
        elif named_studies or named_orders:
            problems.final_for_untriaged_study.append({"report": report_id, "names": sorted(
                [f"ImagingStudy/{s}" for s in named_studies] + [f"ServiceRequest/{o}" for o in named_orders])})
        else:
            problems.final_without_study.append(report_id)
    for study, reports in found.items():
        reports.sort(key=_final_sort_key, reverse=True)
        if len(reports) > 1:
            problems.several_finals.append({"study": study, "reports": [str(r.get("id")) for r in reports],
                                            "used": str(reports[0].get("id"))})
    return found


def start_of(result: AiResult, studies: Mapping[str, Mapping[str, Any]],
             orders: Mapping[str, Mapping[str, Any]]) -> tuple[datetime | None, str]:
    """When the wait began: the order's authoredOn, else the study's `started`."""
    study = studies.get(result.study_id) or {}
    order_ids = [result.order_id] + [reference_id(ref.get("reference"), "ServiceRequest")
                                     for ref in study.get("basedOn") or [] if isinstance(ref, dict)]
    for order_id in filter(None, order_ids):
        authored = parse_fhir_datetime((orders.get(order_id) or {}).get("authoredOn"))
        if authored is not None:
            return authored, "order authoredOn"
    started = parse_fhir_datetime(study.get("started"))
    return (started, "study started") if started is not None else (None, "")


def study_records(results: Sequence[AiResult], finals: Mapping[str, list[dict[str, Any]]],
                  studies: Mapping[str, Mapping[str, Any]], orders: Mapping[str, Mapping[str, Any]],
                  feedback: Iterable[Mapping[str, Any]], code_maps: Mapping[Task, TaskCodes],
                  problems: Problems, conventions: Conventions = DEFAULT_CONVENTIONS) -> list[StudyRecord]:
    """Every triaged study with its truth (final report codes, else feedback, else unknown) and times."""
    feedback_of: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for item in feedback:
        feedback_of[str(item.get("study"))].append(item)
    records = []
    noted_codes: set[str] = set()
    noted_issued: set[str] = set()
    for result in results:
        record = StudyRecord(result)
        record.started, record.started_from = start_of(result, studies, orders)
        reasons = []
        reports = finals.get(result.study_id) or []
        if reports:
            record.final_report = reports[0]
            report_id = str(reports[0].get("id"))
            if reports[0].get("issued") is None and report_id not in noted_issued:
                noted_issued.add(report_id)
                problems.final_without_issued.append(report_id)
            reading = truth_from_codes(code_maps[result.task], report_codings(reports[0]))
            if reading.unknown_codes and report_id not in noted_codes:
                noted_codes.add(report_id)
                problems.unknown_codes.append({"report": report_id, "study": result.study_id, "codes": list(reading.unknown_codes)})
            if reading.truth is not None:
                record.truth = Truth(reading.truth, "final report", f"DiagnosticReport/{report_id} ({reports[0].get('status')})")
            else:
                reasons.append(reading.problem)
        else:
            reasons.append("no final report yet")
        if record.truth is None:
            truth, detail = truth_from_feedback(result.task, feedback_of.get(result.study_id, []), conventions)
            if truth is not None:
                record.truth = Truth(truth, "feedback", detail)
            else:
                reasons.append(detail or "no CDS Hooks feedback")
        if record.truth is None:
            record.unknown = "; ".join(reasons)
        records.append(record)
    return records
