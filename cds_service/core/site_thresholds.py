"""A site's own operating thresholds (`CDS_SITE_THRESHOLDS=/path/site-thresholds.json`).

`cds-triage validate --write-thresholds FILE` chooses them on the site's labelled studies, and
`cds-triage trial --write-thresholds FILE` on the studies its radiologists have reported (both with
`threshold_entry`, on the same decision: `decision_score` against `card_threshold`); the service
then decides with them instead of the model card's. The file names the model and card
version it was made for: a threshold chosen for other weights means nothing, so an entry whose
card version differs from the loaded card is ignored with a warning (and /healthz says so).
Anything else wrong (missing file, not JSON, unknown task or label, a threshold outside (0, 1))
stops the process at start-up with an error naming the setting.

`validate --write-thresholds` also recalibrates the input check's familiarity reference from the
site's labelled studies (`familiarity`): the distance up to which images count as familiar becomes
the site's own 99.5th percentile where that is above the card's (a hospital's scanners make all its
studies a little "unfamiliar" to a model trained elsewhere; once validated there, they are not), and
the refusal distance moves out likewise so no validated study of the right anatomy is refused.

Format (one entry per task; `presence` is the brain MRI rule, 1 - p(no_tumor) >= t):

    {"format": "cds-triage-site-thresholds/1",
     "tasks": {"head_ct_ich": {"model": "cds-triage-head-ct-ich", "card_version": "2.0.0",
                               "thresholds": {"any": 0.41}, "target_sensitivity": 0.95,
                               "created": "2025-06-01T10:00:00Z",
                               "chosen_on": {"unit": "series", "n": 64, "positives": 30, ...},
                               "familiarity": {"threshold": 31.2, "refuse_beyond": 52.0, "n": 64}}}}
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from cds_service.core.domain import NEGATIVE_LABELS, TASK_LABELS, Task
from cds_service.core.input_profile import InputProfile
from cds_service.core.model_cards import ModelCard, available_cards

FORMAT = "cds-triage-site-thresholds/1"
SETTING = "CDS_SITE_THRESHOLDS"
PRESENCE = "presence"  # the key of a presence rule's threshold (brain MRI: tumour present)
log = logging.getLogger(__name__)


def has_presence_rule(task: Task) -> bool:
    """Tasks whose card decides "anything there?" from 1 - p(negative label) (brain MRI)."""
    return any(label in NEGATIVE_LABELS for label in TASK_LABELS[task])


def main_label(task: Task) -> str:
    """The label of the decision a site measures: the first label for sigmoid tasks, `presence` for brain MRI."""
    return PRESENCE if has_presence_rule(task) else TASK_LABELS[task][0]


def decision_score(task: Task, probabilities: Mapping[str, float]) -> float:
    """The score the measured decision compares with its threshold: p(main label), or for a presence
    rule 1 - p(negative label) (tumour present)."""
    if has_presence_rule(task):
        negative = next(label for label in TASK_LABELS[task] if label in NEGATIVE_LABELS)
        return 1.0 - probabilities[negative]
    return probabilities[TASK_LABELS[task][0]]


def card_threshold(card: ModelCard) -> float:
    """The model card's own threshold of the measured decision."""
    return card.presence_threshold if has_presence_rule(card.task) and card.presence_threshold is not None \
        else card.thresholds[main_label(card.task)]


def threshold_entry(y: Any, p: Any, card: ModelCard, target: float, chosen_on: Mapping[str, Any]) -> dict[str, Any]:
    """A site threshold file's entry for the card's task: the highest threshold reaching `target`
    sensitivity on these studies (truth `y`, scores `p` of `decision_score`), and what it did there
    (`chosen_on` adds where the studies came from). ValueError when no usable threshold exists."""
    import numpy as np

    from cds_service.core.evaluation import operating_point, threshold_for_sensitivity

    y, p = np.asarray(y, dtype=bool), np.asarray(p, dtype=np.float64)
    if not y.any():
        raise ValueError("no positive study: a threshold for a sensitivity cannot be chosen")
    threshold = min(threshold_for_sensitivity(y, p, target), 0.999999)
    if threshold <= 0.0:
        raise ValueError(f"sensitivity {target} needs a threshold of 0 here (a positive scored 0): it would raise every study")
    point = operating_point(y, p, threshold)
    return {
        "model": card.name, "card_version": card.version, "thresholds": {main_label(card.task): threshold},
        "target_sensitivity": target, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "chosen_on": {"n": int(len(y)), "positives": int(y.sum()), "negatives": int((~y).sum()), **chosen_on,
                      "sensitivity": point["sensitivity"], "specificity": point["specificity"], "ppv": point["ppv"]},
    }


def decision_labels(task: Task) -> tuple[str, ...]:
    """The keys a site file may set for a task: `presence` for a presence rule, else its labels."""
    if has_presence_rule(task):
        return (PRESENCE,)
    return TASK_LABELS[task]


@dataclass(frozen=True)
class SiteTaskThresholds:
    """One task's entry; `ignored` says why it is not used (empty: it is)."""

    task: Task
    model: str
    card_version: str
    thresholds: Mapping[str, float]
    target_sensitivity: float | None = None
    created: str = ""
    chosen_on: Mapping[str, Any] = field(default_factory=dict)
    ignored: str = ""
    card_thresholds: Mapping[str, float] = field(default_factory=dict)
    familiarity: Mapping[str, float] = field(default_factory=dict)  # the input check's site distances

    def note(self, key: str, file_name: str) -> str:
        """Where the threshold came from, in words (after "from"), for an Observation's method and the card view."""
        chosen = dict(self.chosen_on)
        how = []
        if self.target_sensitivity is not None:
            how.append(f"sensitivity {self.target_sensitivity:.2f}")
        if chosen.get("n"):
            unit = {"image": "images", "study": "studies"}.get(str(chosen.get("unit", "study")), str(chosen.get("unit")))
            how.append(f"on {chosen['n']} local {unit} ({chosen.get('positives', '?')} positive)")
        card = self.card_thresholds.get(key)
        return (f"the site's threshold file {file_name}"
                + (f" ({self.created[:10]})" if self.created else "")
                + (f", chosen for {' '.join(how)}" if how else "")
                + (f"; the model card's threshold is {card:.4g}" if card is not None else ""))


@dataclass(frozen=True)
class SiteThresholds:
    """The parsed, checked file: what the service decides with."""

    path: Path
    tasks: Mapping[Task, SiteTaskThresholds]

    def applied(self, task: Task) -> SiteTaskThresholds | None:
        entry = self.tasks.get(task)
        return entry if entry is not None and not entry.ignored else None

    def apply(self, card: ModelCard) -> ModelCard:
        """The card deciding with this site's thresholds where the file has them for its version."""
        entry = self.applied(card.task)
        if entry is None:
            return card
        if (entry.model, entry.card_version) != (card.name, card.version):  # weights replaced since start-up
            log.warning("%s: %s thresholds were made for %s %s, the loaded model is %s %s; using the card's",
                        SETTING, card.task.value, entry.model, entry.card_version, card.name, card.version)
            return card
        thresholds, sources = dict(card.thresholds), dict(card.threshold_sources)
        presence_threshold = card.presence_threshold
        for key, value in entry.thresholds.items():
            labels = [label for label in card.labels if label not in NEGATIVE_LABELS] if key == PRESENCE else [key]
            if key == PRESENCE:
                presence_threshold = value
            for label in labels:
                thresholds[label] = value
                sources[label] = entry.note(key, self.path.name)
        return replace(card, thresholds=thresholds, presence_threshold=presence_threshold, threshold_sources=sources)

    def adjust_profile(self, task: Task, profile: InputProfile | None) -> InputProfile | None:
        """The task's input profile with the site's familiarity distances, where the file has them."""
        entry = self.applied(task)
        if profile is None or entry is None or not entry.familiarity:
            return profile
        threshold = max(profile.threshold, float(entry.familiarity["threshold"]))
        beyond = entry.familiarity.get("refuse_beyond")
        refuse_beyond = None if profile.refuse_beyond is None else max(profile.refuse_beyond, float(beyond or 0.0),
                                                                       threshold * 1.01)
        return replace(profile, threshold=threshold, refuse_beyond=refuse_beyond)

    def to_health(self) -> dict[str, Any]:
        """What /healthz shows: the file and, per task, the thresholds and whether they are used."""
        return {"file": str(self.path), "tasks": {
            task.value: {"model": e.model, "cardVersion": e.card_version, "thresholds": dict(e.thresholds),
                         "cardThresholds": dict(e.card_thresholds), "targetSensitivity": e.target_sensitivity,
                         "created": e.created, "chosenOn": dict(e.chosen_on), "familiarity": dict(e.familiarity),
                         "status": f"ignored: {e.ignored}" if e.ignored else "applied"}
            for task, e in self.tasks.items()}}


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"{SETTING}={path}: {problem}")


def _threshold(path: Path, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 < value < 1.0:
        raise _fail(path, f"{where} must be a number between 0 and 1 (exclusive), not {value!r}")
    return float(value)


def _familiarity(path: Path, name: str, block: Any) -> dict[str, float]:
    """A task entry's `familiarity` block, checked: positive distances, refuse_beyond above threshold."""
    if block is None:
        return {}
    where = f"tasks.{name}.familiarity"
    if not isinstance(block, dict) or "threshold" not in block:
        raise _fail(path, f"{where} must be an object with a threshold (an input-check distance)")
    out: dict[str, float] = {}
    for key in ("threshold", "refuse_beyond", "n"):
        value = block.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise _fail(path, f"{where}.{key} must be a positive number, not {value!r}")
        out[key] = float(value)
    if "refuse_beyond" in out and out["refuse_beyond"] <= out["threshold"]:
        raise _fail(path, f"{where}.refuse_beyond must be above its threshold")
    return out


def familiarity_entry(distances: Any, profile: InputProfile) -> dict[str, float]:
    """The `familiarity` block from the input-check distances of a site's labelled studies of the right
    anatomy: familiar up to their 99.5th percentile (never below the card's), refused only 1.25 times
    beyond the farthest of them (never nearer than the card's)."""
    import numpy as np

    d = np.asarray(distances, dtype=np.float64)
    threshold = max(profile.threshold, float(np.quantile(d, 0.995)))
    beyond = max(profile.refuse_beyond or 0.0, 1.25 * float(d.max()), 1.01 * threshold)
    return {"threshold": round(threshold, 3), "refuse_beyond": round(beyond, 3), "n": int(len(d))}


def parse_site_thresholds(path: Path, document: Any, cards: Mapping[Task, ModelCard]) -> SiteThresholds:
    """Check a site threshold document against the tasks and the loaded cards (ValueError naming the setting)."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise _fail(path, f'not a site threshold file (needs "format": "{FORMAT}")')
    tasks = document.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise _fail(path, '"tasks" must be an object with at least one task')
    parsed: dict[Task, SiteTaskThresholds] = {}
    for name, entry in tasks.items():
        try:
            task = Task(name)
        except ValueError:
            raise _fail(path, f"unknown task {name!r} (one of {', '.join(t.value for t in Task)})") from None
        if not isinstance(entry, dict):
            raise _fail(path, f"tasks.{name} must be an object")
        for key in ("model", "card_version"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise _fail(path, f"tasks.{name}.{key} must name the model card the thresholds were made for")
        thresholds = entry.get("thresholds")
        if not isinstance(thresholds, dict) or not thresholds:
            raise _fail(path, f"tasks.{name}.thresholds must be an object of label: threshold")
        allowed = decision_labels(task)
        for label in thresholds:
            if label not in allowed:
                raise _fail(path, f"tasks.{name}.thresholds: unknown label {label!r} (known: {', '.join(allowed)})")
        values = {label: _threshold(path, f"tasks.{name}.thresholds.{label}", v) for label, v in thresholds.items()}
        target = entry.get("target_sensitivity")
        if target is not None:
            target = _threshold(path, f"tasks.{name}.target_sensitivity", target)
        card = cards.get(task)
        if card is None:
            ignored = "no model for this task in CDS_WEIGHTS_DIR"
        elif (card.name, card.version) != (entry["model"], entry["card_version"]):
            ignored = (f"made for {entry['model']} {entry['card_version']}, the weights are {card.name} {card.version}: "
                       f"validate again with `cds-triage validate --write-thresholds`")
        else:
            ignored = ""
        card_thresholds = {}
        if card is not None:
            card_thresholds = {key: (card.presence_threshold if key == PRESENCE else card.thresholds.get(key))
                               for key in values}
        parsed[task] = SiteTaskThresholds(
            task=task, model=entry["model"], card_version=entry["card_version"], thresholds=values,
            target_sensitivity=target, created=str(entry.get("created", "")),
            chosen_on=chosen if isinstance(chosen := entry.get("chosen_on"), dict) else {},
            ignored=ignored, card_thresholds={k: v for k, v in card_thresholds.items() if v is not None},
            familiarity=_familiarity(path, name, entry.get("familiarity")))
        if ignored:
            log.warning("%s: the %s thresholds are ignored: %s", SETTING, name, ignored)
    return SiteThresholds(path=path, tasks=parsed)


def load_site_thresholds(path: Path, weights_dir: Path) -> SiteThresholds:
    """Read and check the file named by CDS_SITE_THRESHOLDS against the cards in `weights_dir`."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not JSON: {exc}") from None
    return parse_site_thresholds(path, document, available_cards(weights_dir))


def write_site_entry(path: Path, task: Task, entry: dict[str, Any]) -> dict[str, Any]:
    """Write (atomically) `entry` as the task's thresholds, keeping the other tasks' entries of an
    existing site threshold file. Returns the whole document."""
    document: dict[str, Any] = {"format": FORMAT, "tasks": {}}
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} exists and is not a site threshold file ({exc}); not overwritten") from None
        if not isinstance(existing, dict) or existing.get("format") != FORMAT or not isinstance(existing.get("tasks"), dict):
            raise ValueError(f"{path} exists and is not a site threshold file; not overwritten")
        document = existing
    document["tasks"][task.value] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    with os.fdopen(handle, "w") as out:
        out.write(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, path)
    return document
