"""The truth per study, from what the radiologists themselves recorded (pure: data in, truth out).

First the final report's `conclusionCode`, read through a code map per task and label; else a
clinician's CDS Hooks feedback on the card that showed the AI result; else unknown, with the reason.
Never from the report's free text: a truth guessed from prose would measure the guesser.

The code map (`--codes FILE`, format `cds-triage-trial-codes/1`) adds a site's codes to the defaults,
which are the codes we write ourselves (`fhir_mappings.codes`: the verified SNOMED CT / RadLex codes of
each label and our local finding code) and SNOMED CT 281900007 "No abnormality detected" as
"none of this task's findings":

    {"format": "cds-triage-trial-codes/1",
     "tasks": {"head_ct_ich": {"any": ["http://snomed.info/sct|274100004"],
                               "subdural": ["http://hospital.example/radlex-local|SDH"],
                               "negative": ["http://hospital.example/report-codes|NORMAL-HEAD-CT"]}}}

Each key is a label the trial measures (`measured_labels`) or `negative`; each value a list of
`system|code`. How codes become truth (`truth_from_codes`): any positive code makes the task's main
decision positive; the other labels are known only when the report names at least one of them
specifically (then each is positive if named, negative if not): a report coded only "intracranial
hemorrhage" says nothing about the subtype. A negative code makes every label negative. Positive and
negative codes together, or only codes the map does not know, leave the study unknown, and the
report says which codes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fhir_mappings import codes
from fhir_mappings.conventions import DEFAULT_CONVENTIONS, Conventions
from fhir_mappings.builders import parse_fhir_datetime

from cds_service.core.domain import NEGATIVE_LABELS, TASK_LABELS, Task
from cds_service.core.site_thresholds import main_label

FORMAT = "cds-triage-trial-codes/1"
NEGATIVE = "negative"  # the code map's key for "none of this task's findings"
#: The override reason that says the AI's finding was not there (cards.OVERRIDE_REASONS).
FALSE_POSITIVE = "false-positive"


def measured_labels(task: Task) -> tuple[str, ...]:
    """The decisions the trial measures: the main one (`any`, `pneumothorax`, `presence` for a tumour),
    then every other finding label (head CT subtypes, tumour classes); never a "nothing found" label."""
    main = main_label(task)
    return (main, *(label for label in TASK_LABELS[task] if label != main and label not in NEGATIVE_LABELS))


def token(system: Any, code: Any) -> str:
    return f"{system}|{code}"


@dataclass(frozen=True)
class TaskCodes:
    """One task's code map: `system|code` -> the label it names, or NEGATIVE."""

    task: Task
    meaning: Mapping[str, str]

    def codes_for(self, label: str) -> list[str]:
        return sorted(code for code, meant in self.meaning.items() if meant == label)


def default_codes(task: Task, conventions: Conventions = DEFAULT_CONVENTIONS) -> TaskCodes:
    """The codes we write (verified standard codes and our local code, per label), and "no abnormality"."""
    meaning: dict[str, str] = {token(codes.NO_ABNORMALITY_DETECTED.system, codes.NO_ABNORMALITY_DETECTED.code): NEGATIVE}
    for label in TASK_LABELS[task]:
        meant = NEGATIVE if label in NEGATIVE_LABELS else label
        meaning[token(conventions.finding_system, label)] = meant
        for standard in codes.STANDARD_FINDING_CODES.get(label, ()):
            meaning[token(standard.system, standard.code)] = meant
    return TaskCodes(task, meaning)


class CodeMapError(ValueError):
    """A code map file that cannot be used; the message names the file and the entry."""


def load_code_map(path: Path | None, conventions: Conventions = DEFAULT_CONVENTIONS) -> dict[Task, TaskCodes]:
    """The defaults of every task, with a site's file (if any) added; CodeMapError naming what is wrong."""
    maps = {task: default_codes(task, conventions) for task in Task}
    if path is None:
        return maps
    where = f"--codes {path}"
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise CodeMapError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodeMapError(f"{where}: not a JSON file ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(document.get("tasks"), dict):
        raise CodeMapError(f'{where}: not a code map (needs "format": "{FORMAT}" and "tasks")')
    for name, entry in document["tasks"].items():
        try:
            task = Task(name)
        except ValueError:
            raise CodeMapError(f"{where}: unknown task {name!r} (one of {', '.join(t.value for t in Task)})") from None
        if not isinstance(entry, dict):
            raise CodeMapError(f"{where}: tasks.{name} must be an object of label: [system|code, …]")
        meaning = dict(maps[task].meaning)
        allowed = (*measured_labels(task), NEGATIVE)
        for label, listed in entry.items():
            if label not in allowed:
                raise CodeMapError(f"{where}: tasks.{name}: unknown label {label!r} (known: {', '.join(allowed)})")
            if not isinstance(listed, list) or not all(isinstance(c, str) and c.count("|") == 1 and all(c.split("|"))
                                                       for c in listed):
                raise CodeMapError(f"{where}: tasks.{name}.{label} must be a list of \"system|code\" strings")
            for code in listed:
                if meaning.get(code, label) != label:
                    raise CodeMapError(f"{where}: tasks.{name}: {code} is mapped to both {meaning[code]!r} and {label!r}")
                meaning[code] = label
        maps[task] = TaskCodes(task, meaning)
    return maps


@dataclass(frozen=True)
class Truth:
    """What is known of one study: label -> positive; labels absent are unknown. `source` is
    `final report` or `feedback`; `detail` says which one, for a person to check."""

    labels: Mapping[str, bool]
    source: str
    detail: str


@dataclass(frozen=True)
class CodedReading:
    """What a report's codes say for a task: the truth (None: nothing usable), the codes the map does
    not know, and why there is no truth (empty when there is)."""

    truth: dict[str, bool] | None
    unknown_codes: tuple[str, ...] = ()
    problem: str = ""


def report_codings(report: Mapping[str, Any]) -> list[str]:
    """Every `system|code` of a report's conclusionCode."""
    return [token(c.get("system"), c.get("code")) for concept in report.get("conclusionCode") or [] if isinstance(concept, dict)
            for c in concept.get("coding") or [] if isinstance(c, dict) and c.get("code")]


def truth_from_codes(task_codes: TaskCodes, codings: Sequence[str]) -> CodedReading:
    """The module's rules, for one report's codes."""
    task = task_codes.task
    main = main_label(task)
    named = {task_codes.meaning[c] for c in codings if c in task_codes.meaning}
    unknown = tuple(sorted({c for c in codings if c not in task_codes.meaning}))
    positive = named - {NEGATIVE}
    if not codings:
        return CodedReading(None, problem="the final report has no conclusionCode")
    if positive and NEGATIVE in named:
        return CodedReading(None, unknown, f"the final report's codes contradict each other ({', '.join(sorted(codings))})")
    if not named:
        return CodedReading(None, unknown, f"codes the map does not know: {', '.join(unknown)}")
    labels = measured_labels(task)
    if NEGATIVE in named:
        return CodedReading({label: False for label in labels}, unknown)
    truth = {main: True}
    specific = positive - {main}
    if specific:
        truth |= {label: label in specific for label in labels if label != main}
    return CodedReading(truth, unknown)


def truth_from_feedback(task: Task, feedback: Iterable[Mapping[str, Any]],
                        conventions: Conventions = DEFAULT_CONVENTIONS) -> tuple[dict[str, bool] | None, str]:
    """The latest feedback that says something about the finding a card showed: `accepted` (the
    finding is there: the main decision and the labels shown are positive) or `overridden` as a false
    positive (nothing there: every label negative). Returns (truth, detail); truth None with the
    reason when no feedback says anything."""
    main, labels = main_label(task), measured_labels(task)
    telling, silent = [], []
    for item in feedback:
        reason = (item.get("override_reason") or {}).get("reason") or {}
        false_positive = reason.get("system") == conventions.override_reason_system and reason.get("code") == FALSE_POSITIVE
        if item.get("findings") and (item.get("outcome") == "accepted" or (item.get("outcome") == "overridden" and false_positive)):
            telling.append(item)
        else:
            silent.append(f"{item.get('outcome')}{' (' + str(reason.get('code')) + ')' if reason.get('code') else ''}"
                          f"{'' if item.get('findings') else ' on a card without a finding'}")
    if not telling:
        return None, ("feedback says nothing about a finding: " + ", ".join(silent)) if silent else ""
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    latest = max(telling, key=lambda i: parse_fhir_datetime(i.get("outcome_timestamp")) or oldest)
    detail = f"{latest['outcome']} on card {latest.get('card')} ({latest.get('outcome_timestamp')})"
    if latest["outcome"] == "overridden":
        return {label: False for label in labels}, detail + ", as a false positive"
    shown = {str(label) for label in latest["findings"]}
    return {main: True} | {label: True for label in labels if label in shown and label != main}, detail
