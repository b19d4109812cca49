"""Drift alarms: does each task still raise the share of studies its model card expects?

A model that starts raising every head CT (a new scanner's images, a broken conversion, a
changed protocol), or none at all, looks from any single result like a model at work. What
gives it away is the share of studies raised over the last few dozen, against what the card's
own evaluation says a site should see. So, per task:

- the window: the last CDS_DRIFT_WINDOW (50) triages that finished `done`, read from the job
  store, which every `serve` and `worker` process shares: the numbers are the same from any of
  them. A study counts as raised when the model found something (a positive finding); a task
  in shadow mode counts what it would have raised, which is what a site watches before go-live.
  Each study's score (the card's deciding probability) gives the window's score distribution;
- the band: the share raised the card expects (`expected_raised_share`, derived from its test
  figures by `expected_raised_share` below), or the site's own (CDS_DRIFT_BANDS);
- the alarm: on when the window holds at least CDS_DRIFT_MIN_STUDIES (20) studies and the 95%
  interval (Wilson) of its share raised lies wholly outside the band, so chance alone in a
  window of 50 does not ring it, and "every head CT raised in the last 50" (interval 93-100%)
  does. It shows on /healthz (`drift`), in /metrics (`cds_triage_drift_*`), as a banner on the
  worklist, and as one WARNING log line from the worker when it trips and one when it clears;
- unfamiliar inputs: how many of the window's studies the input check marked `unfamiliar`
  (scored, but unlike the model's training images: another scanner, protocol or export). A
  share that grows says the site's images have moved away from what the model learnt from,
  before the share raised may show it; `cds-triage validate` re-fits the reference on the
  site's own studies.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from cds_service.core.domain import NEGATIVE_LABELS, InputFit, Task
from cds_service.core.evaluation import wilson_interval

if TYPE_CHECKING:
    from .jobs.state import BaseJobStore, Job, JobState
    from cds_service.core.model_cards import ModelCard
    from cds_service.core.settings import Settings

log = logging.getLogger(__name__)

# The site prevalence of the finding that the card's band allows for: from none to half the studies.
PREVALENCE_RANGE = (0.0, 0.5)
SCORE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


# --- the band the card expects ---------------------------------------------------------------------


def _rate(value: float, ci95: Sequence[float]) -> dict[str, Any]:
    return {"value": round(float(value), 4), "ci95": [round(float(ci95[0]), 4), round(float(ci95[1]), 4)]}


def operating_rates(card: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str] | None:
    """The shares of studies raised with and without the finding at the card's operating point, each
    `{"value", "ci95"}`, and where they come from; from the test split (else validation). None when
    the card has no such figures (a test card, an old card).

    Per task, the figures that decide a study: the presence rule's (softmax with a negative class),
    the simulated whole series' (a CT whose neighbouring slices must agree), else the main label's
    sensitivity and 1 - specificity at its threshold.
    """
    for split, metrics_key in (("test", "test_metrics"), ("validation", "validation_metrics")):
        presence = (card.get("presence") or {}).get(split)
        if presence:
            with_finding, without = presence["raised_with_finding"], presence["raised_without_finding"]
            return (_rate(with_finding["value"], with_finding["ci95"]), _rate(without["value"], without["ci95"]),
                    f"{split} split, presence rule")
        metrics = (card.get(metrics_key) or {}).get("metrics") or {}
        main = next((label for label in card.get("trained_labels") or [] if label not in NEGATIVE_LABELS), None)
        sens, spec = metrics.get(f"{main}.sensitivity_at_threshold"), metrics.get(f"{main}.specificity_at_threshold")
        if not sens or not spec or sens.get("value") is None or spec.get("value") is None:
            continue
        series = (card.get("series_operating_point") or {}).get(split)
        if series and sens.get("count") and spec.get("count"):
            n_with, n_without = int(sens["count"][1]), int(spec["count"][1])
            raised, normal = float(series["bleeding_series_raised"]), float(series["normal_series_raised"])
            return (_rate(raised, wilson_interval(round(raised * n_with), n_with)),
                    _rate(normal, wilson_interval(round(normal * n_without), n_without)),
                    (f"{split} split, whole series simulated from its slices (intervals: Wilson at its "
                     f"{n_with} slices with and {n_without} without the finding)"))
        lo, hi = spec["ci95"]
        return (_rate(sens["value"], sens["ci95"]), _rate(1.0 - spec["value"], (1.0 - hi, 1.0 - lo)),
                f"{split} split, {main} at its threshold")
    return None


def expected_raised_share(card: Mapping[str, Any],
                          prevalence: tuple[float, float] = PREVALENCE_RANGE) -> dict[str, Any] | None:
    """The card's `expected_raised_share` block: the band of shares raised a site should see.

    A site with prevalence p of the finding sees p x (share raised with the finding) + (1 - p) x
    (share raised without it). The band takes both shares at the ends of their 95% intervals and p
    over `prevalence`, so it holds every site in that range. Computed from figures already in the
    card (`training` writes it with the operating points).
    """
    rates = operating_rates(card)
    if rates is None:
        return None
    with_finding, without, source = rates
    (w_lo, w_hi), (o_lo, o_hi) = with_finding["ci95"], without["ci95"]
    ends = [(p, 1.0 - p) for p in prevalence]
    low = min(p * w_lo + q * o_lo for p, q in ends)
    high = max(p * w_hi + q * o_hi for p, q in ends)
    return {
        "band": [math.floor(low * 1000) / 1000, math.ceil(high * 1000) / 1000],
        "prevalence": list(prevalence),
        "raised_with_finding": with_finding,
        "raised_without_finding": without,
        "from": source,
        "derivation": (
            "A site whose studies show the finding with prevalence p should see p x (share raised with the "
            "finding) + (1 - p) x (share raised without it). Both shares are this card's at its operating "
            f"point (see `from`), taken at the ends of their 95% intervals, and p runs from {prevalence[0]:g} "
            f"to {prevalence[1]:g}. The service's drift alarm warns when the 95% interval of the share raised "
            "over a task's last CDS_DRIFT_WINDOW studies lies wholly outside this band; a site whose "
            "prevalence lies outside that range sets its own band with CDS_DRIFT_BANDS."
        ),
    }


# --- one task's window -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Band:
    low: float
    high: float
    source: str  # "card" or "CDS_DRIFT_BANDS"

    def __str__(self) -> str:
        return f"{self.low:.0%}-{self.high:.0%}"


@dataclass(frozen=True)
class Triaged:
    """What the window keeps of one finished triage."""

    raised: bool
    score: float | None
    unfamiliar: bool = False  # the input check marked the images unlike the model's training images


def study_score(findings: Sequence[Mapping[str, Any]]) -> float | None:
    """The study's deciding probability: 1 - p(negative class) where the card has one, else the main
    (first trained) label's probability."""
    negative = next((f for f in findings if f.get("label") in NEGATIVE_LABELS), None)
    if negative is not None:
        return round(1.0 - float(negative["probability"]), 4)
    main = next((f for f in findings if f.get("trained", True)), None)
    return float(main["probability"]) if main is not None else None


def triaged(result: Mapping[str, Any]) -> Triaged | None:
    """A done job's result (`pipeline.result_summary`) as the window sees it; None if it holds no findings."""
    findings = result.get("findings") or []
    if not findings:
        return None
    fit = (result.get("inputCheck") or {}).get("fit")
    return Triaged(raised=any(f.get("positive") for f in findings), score=study_score(findings),
                   unfamiliar=fit == InputFit.UNFAMILIAR.value)


def quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), of a sorted sequence."""
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


@dataclass(frozen=True)
class TaskDrift:
    """One task's window, its band and whether the alarm is on."""

    task: Task
    window: int
    min_studies: int
    studies: int
    raised: int
    band: Band | None
    scores: tuple[float, ...] = ()
    unfamiliar: int = 0  # studies of the window whose images the input check marked unfamiliar

    @property
    def share(self) -> float | None:
        return self.raised / self.studies if self.studies else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.raised, self.studies) if self.studies else None

    @property
    def state(self) -> str:
        """ok, high, low (the alarm), warming_up (fewer than the minimum studies) or no_band."""
        if self.band is None:
            return "no_band"
        if self.studies < self.min_studies or self.interval is None:
            return "warming_up"
        low, high = self.interval
        if low > self.band.high:
            return "high"
        if high < self.band.low:
            return "low"
        return "ok"

    @property
    def alarm(self) -> bool:
        return self.state in ("high", "low")

    def score_quantiles(self) -> dict[float, float]:
        ordered = sorted(self.scores)
        return {q: round(quantile(ordered, q), 4) for q in SCORE_QUANTILES} if ordered else {}

    def describe(self) -> str:
        """One sentence for a person: the log line, the worklist banner."""
        if not self.studies:
            return f"{self.task.value}: no finished triage yet"
        share_ci = self.interval or (0.0, 1.0)
        text = (f"{self.task.value} raised {self.raised} of its last {self.studies} studies ({self.share:.0%}; "
                f"95% interval {share_ci[0]:.0%}-{share_ci[1]:.0%})")
        if self.unfamiliar:
            text += f"; {self.unfamiliar} of them unlike its training images (unfamiliar)"
        if self.band is None:
            return text + "; no expected band (neither its card nor CDS_DRIFT_BANDS gives one)"
        expects = f"the {self.band} {'its model card' if self.band.source == 'card' else 'CDS_DRIFT_BANDS'} expects"
        where = {"high": f"above {expects}", "low": f"below {expects}", "ok": f"consistent with {expects}"}
        return f"{text}, {where.get(self.state, f'too few studies yet to judge against {expects}')}"

    def to_json(self) -> dict[str, Any]:
        interval = self.interval
        quantiles = self.score_quantiles()
        return {
            "window": self.window,
            "minStudies": self.min_studies,
            "studies": self.studies,
            "raised": self.raised,
            "share": None if self.share is None else round(self.share, 4),
            "shareCi95": None if interval is None else [round(interval[0], 4), round(interval[1], 4)],
            "band": None if self.band is None else [self.band.low, self.band.high],
            "bandFrom": None if self.band is None else self.band.source,
            "state": self.state,
            "alarm": self.alarm,
            "unfamiliar": self.unfamiliar,
            "unfamiliarShare": round(self.unfamiliar / self.studies, 4) if self.studies else None,
            "scores": {f"p{round(q * 100)}": v for q, v in quantiles.items()} | (
                {"mean": round(sum(self.scores) / len(self.scores), 4)} if self.scores else {}),
        }


def assess(task: Task, results: Sequence[Mapping[str, Any]], band: Band | None, *, window: int,
           min_studies: int) -> TaskDrift:
    """The drift of one task from its latest done results (newest first; beyond `window` ignored)."""
    seen = [t for t in map(triaged, results) if t is not None][:window]
    return TaskDrift(task=task, window=window, min_studies=min_studies, studies=len(seen),
                     raised=sum(t.raised for t in seen), band=band,
                     scores=tuple(t.score for t in seen if t.score is not None),
                     unfamiliar=sum(t.unfamiliar for t in seen))


def card_band(card: "ModelCard | None") -> Band | None:
    """The band the card expects, if it states one that makes sense."""
    block = (card.raw.get("expected_raised_share") or {}) if card is not None else {}
    try:
        low, high = (float(x) for x in block.get("band") or ())
    except (TypeError, ValueError):
        return None
    return Band(low, high, "card") if 0.0 <= low <= high <= 1.0 else None


def band_for(task: Task, settings: "Settings", card: "ModelCard | None") -> Band | None:
    """CDS_DRIFT_BANDS where it names the task, else the card's band."""
    if task in settings.drift_bands:
        low, high = settings.drift_bands[task]
        return Band(low, high, "CDS_DRIFT_BANDS")
    return card_band(card)


def task_drift(store: "BaseJobStore", settings: "Settings", task: Task, card: "ModelCard | None") -> TaskDrift:
    jobs = store.recent_triages(task.value, settings.drift_window)
    return assess(task, [job.result for job in jobs], band_for(task, settings, card), window=settings.drift_window,
                  min_studies=settings.drift_min_studies)


def drift_report(store: "BaseJobStore", settings: "Settings") -> dict[Task, TaskDrift]:
    """Every task with a model (card and weights) here. Raises QueueUnavailableError with the store."""
    from cds_service.core.model_cards import available_cards

    cards = available_cards(settings.weights_dir)
    return {task: task_drift(store, settings, task, card) for task, card in cards.items()}


# --- the log line: once when the alarm trips, once when it clears -----------------------------------


def check_alarm(store: "BaseJobStore", settings: "Settings", task: Task) -> TaskDrift:
    """Evaluate one task and log a WARNING if its alarm changed since any process last looked.

    The alarm's state is a flag in the shared job store, swapped atomically, so of several workers
    finishing jobs at once exactly one logs each change.
    """
    from cds_service.core.model_cards import available_cards

    drift = task_drift(store, settings, task, available_cards(settings.weights_dir).get(task))
    before = store.swap_flag(f"drift-alarm:{task.value}", drift.state if drift.alarm else "off")
    was_on = before not in (None, "off")
    if drift.alarm != was_on:
        fields = {"task": task.value, "drift_state": drift.state, "window_studies": drift.studies,
                  "raised": drift.raised, "share": drift.to_json()["share"],
                  "band": None if drift.band is None else [drift.band.low, drift.band.high]}
        if drift.alarm:
            log.warning("drift alarm: %s", drift.describe(), extra=fields)
        else:
            log.warning("drift alarm cleared: %s", drift.describe(), extra=fields)
    return drift


def alarm_hook(store: "BaseJobStore", settings: "Settings") -> Callable[["Job", "JobState", dict[str, Any]], None]:
    """The worker's after-outcome hook: a done triage moves its task's window, so look again."""

    def check(job: "Job", state: "JobState", result: dict[str, Any]) -> None:
        if state.value != "done" or not result.get("task"):
            return
        check_alarm(store, settings, Task(result["task"]))

    return check
