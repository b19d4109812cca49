"""`cds-triage trial`: the arguments, and the run from the FHIR searches to the report."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fhir_mappings.builders import reference_id

from cds_service.core.domain import Task
from cds_service.core.model_cards import ModelCard, available_cards
from cds_service.core.settings import Settings
from fhir_mappings.conventions import Conventions
from cds_service.core.site_thresholds import main_label, threshold_entry, write_site_entry
from cds_service.trial.fhir_reads import SearchRefusedError, TrialReader, read_feedback
from cds_service.trial.figures import score_of, task_document
from cds_service.trial.report import html_report, summary_lines
from cds_service.trial.studies import Problems, StudyRecord, ai_results, finals_by_study, latest_per_study, study_records
from cds_service.trial.truth import CodeMapError, load_code_map
from cds_service.validate.arguments import add_measure_arguments

EXIT_STATUSES = """exit status:
  0  done (the report written)
  1  nothing to measure in the period, or no site threshold could be written
  2  bad arguments or code map, or the FHIR server refused a search or lacks a search parameter
     (one line on stderr names the search and CDS_FHIR_BASE_URL)"""


def fhir_time(text: str) -> str:
    """argparse type of --since/--until: a date (2026-11-01) or a dateTime with a zone, as FHIR search takes it."""
    try:
        if len(text) == 10:
            return datetime.strptime(text, "%Y-%m-%d").strftime("%Y-%m-%d")
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (2026-11-01) or a date and time (2026-11-01T08:00:00Z)") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a time zone (e.g. 2026-11-01T08:00:00Z)")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def page_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 1000")
    return value


def add_trial_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", required=True, type=fhir_time, help="first day (or moment) of the period: AI reports "
                        "issued from then on, and the final reports issued since")
    parser.add_argument("--until", type=fhir_time, help="end of the period, exclusive (default: none)")
    parser.add_argument("--task", action="append", choices=[t.value for t in Task],
                        help="only this task (repeatable; default: every task with AI reports in the period)")
    parser.add_argument("--codes", type=Path, metavar="FILE", help="the site's code map: which conclusionCode means which "
                        "finding, added to the defaults (docs/validation.md)")
    parser.add_argument("--report", type=Path, help="the HTML report (default trial.html here)")
    parser.add_argument("--page-size", type=page_size, default=100, help="_count of each FHIR search page (default 100)")
    add_measure_arguments(parser)


def trial_threshold(task: Task, records: list[StudyRecord], card: ModelCard, target: float,
                    chosen_on: dict[str, Any]) -> dict[str, Any]:
    """The site threshold entry from this trial's studies with a known truth scored by the weights in use."""
    main = main_label(task)
    usable = [(r, s) for r in records if r.ai.model == (card.name, card.version) and r.truth is not None
              and main in r.truth.labels and (s := score_of(r, main)) is not None]
    if not usable:
        raise ValueError(f"no study with a known truth was scored by {card.name} {card.version}, the model in use")
    y = np.array([r.truth.labels[main] for r, _ in usable if r.truth is not None], dtype=bool)
    p = np.array([s for _, s in usable], dtype=np.float64)
    return threshold_entry(y, p, card, target, {"unit": "study", **chosen_on})


def run_trial(args: argparse.Namespace, settings: Settings) -> int:
    """Exit status as EXIT_STATUSES says; a server that cannot be reached is `cli.main`'s (exit 2, naming the setting)."""
    from cds_service.adapters.smart_auth import fhir_auth, fhir_client

    def refuse(message: str) -> int:
        print(f"cds-triage trial: {message}", file=sys.stderr)
        return 2

    if args.until and args.until <= args.since:
        return refuse(f"--until {args.until} is not after --since {args.since}")
    conventions = Conventions.from_settings(settings)  # CDS_FHIR_CANONICAL_BASE: our codes and identifiers
    try:
        code_maps = load_code_map(args.codes, conventions)
    except CodeMapError as exc:
        return refuse(str(exc))
    wanted = {Task(t) for t in args.task} if args.task else None
    fhir = fhir_client(settings, fhir_auth(settings))
    reader = TrialReader(fhir, page_size=args.page_size, progress=not args.no_progress and sys.stderr.isatty(),
                         conventions=conventions)
    problems = Problems()
    try:
        resources = reader.ai_reports(args.since, args.until)
        device_ids = {reference_id((r.get("device") or {}).get("reference"), "Device") for r in resources
                      if r.get("resourceType") == "Observation"}
        devices = {f"Device/{i}": d for i, d in reader.by_ids("Device", filter(None, device_ids)).items()}
        results = [r for r in latest_per_study(ai_results(resources, devices, problems, conventions), problems)
                   if wanted is None or r.task in wanted]
        if not results:
            print(f"cds-triage trial: no AI report{' of ' + ', '.join(sorted(t.value for t in wanted)) if wanted else ''} "
                  f"issued from {args.since}{' until ' + args.until if args.until else ''} on {settings.fhir_base_url}: "
                  "nothing to measure", file=sys.stderr)
            return 1
        finals = reader.final_reports(filter(None, (r.patient_id for r in results)), args.since)
        studies = reader.by_ids("ImagingStudy", {r.study_id for r in results})
        order_ids = {r.order_id for r in results} | {reference_id(ref.get("reference"), "ServiceRequest")
                                                     for s in studies.values() for ref in s.get("basedOn") or [] if isinstance(ref, dict)}
        orders = reader.by_ids("ServiceRequest", filter(None, order_ids))
    except SearchRefusedError as exc:
        return refuse(f"{exc} (CDS_FHIR_BASE_URL={settings.fhir_base_url}; the trial needs these standard R4 searches: "
                      "see docs/validation.md)")
    finally:
        fhir.close()
    feedback, feedback_source = read_feedback(settings.data_dir, {r.study_id for r in results})
    records = study_records(results, finals_by_study(finals, results, studies, problems, conventions), studies, orders, feedback,
                            code_maps, problems, conventions)
    cards = available_cards(settings.weights_dir)
    report = args.report or Path("trial.html")
    doc: dict[str, Any] = {
        "kind": "cds-triage trial", "fhir_server": settings.fhir_base_url,
        "period": {"since": args.since, "until": args.until},
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "code_map": str(args.codes) if args.codes else "the defaults (the codes cds-triage writes, and SNOMED CT 281900007)",
        "feedback": feedback_source, "searches": reader.searches,
        "problems": problems.to_json(), "problem_lines": problems.lines(), "tasks": {},
    }
    status = 0
    for task in sorted({r.ai.task for r in records}, key=lambda t: t.value):
        mine = [r for r in records if r.ai.task is task]
        card = cards.get(task)
        site = settings.site_thresholds.applied(task) if settings.site_thresholds else None
        doc["tasks"][task.value] = task_document(task, mine, card, site.thresholds.get(main_label(task)) if site else None,
                                                 resamples=args.bootstrap)
        if args.write_thresholds:
            main = doc["tasks"][task.value]["labels"].get(main_label(task))
            try:
                if card is None:
                    raise ValueError(f"no model card for {task.value} in CDS_WEIGHTS_DIR={settings.weights_dir}")
                entry = trial_threshold(task, mine, card, args.target_sensitivity, {
                    "source": "cds-triage trial", "fhir_server": settings.fhir_base_url, "period": doc["period"],
                    "truth_from": doc["tasks"][task.value]["studies"]["truth_from"],
                    "auc": main["metrics"]["auc"] if main else None, "report": str(report.resolve()),
                    "warnings": doc["tasks"][task.value]["warnings"]})
                write_site_entry(args.write_thresholds, task, entry)
            except ValueError as exc:
                print(f"cds-triage trial: {task.value}: no threshold written: {exc}", file=sys.stderr)
                status = 1
            else:
                doc.setdefault("site_thresholds", {})[task.value] = {"file": str(args.write_thresholds), "entry": entry}
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(html_report(doc))
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print("\n".join(summary_lines(doc, report)))
        for task, written in doc.get("site_thresholds", {}).items():
            print(f"site thresholds: {written['file']} ({json.dumps(written['entry']['thresholds'])}); set "
                  f"CDS_SITE_THRESHOLDS={written['file']} and CDS_TASK_MODES={task}=active for the service to use them")
    return status
