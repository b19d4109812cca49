"""Which rule turns a head CT series' slice scores into the study's score? Rules compared on simulated series.

    .venv/bin/python bench/series_rules.py [--weights weights]

The labelled data has no whole series, so series are assembled from the card's stored slice
probabilities (`<task>.split.json`), as the card's series operating point is
(`evaluation.SeriesSimulation`: 32 slices, a bleed one contiguous run of 1-12 slices). For each rule:
the series AUC and, at the threshold that raises 90 % of simulated bleeding series, the share of
normal series raised, on validation (which chooses) and test (which reports). Slices are drawn
independently, while real neighbours are alike: a rule that one high slice can trip looks better here
than on real series, where a streak artefact or the skull base gives one. Prints JSON; the service's rule is the card's
`series_pooling`. `max`, `noisy_or_3` and `smoothed_max_121` can raise a series on one slice alone;
the others need two slices (or, for the means, a second slice well above the rest).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cds_service.core.evaluation import SeriesSimulation, series_operating_point  # noqa: E402


def adjacent_mean(window: int) -> Callable[[np.ndarray], float]:
    def pool(s: np.ndarray) -> float:
        return float(np.convolve(s, np.ones(window) / window, "valid").max()) if len(s) >= window else float(s.mean())
    return pool


def top_k_mean(k: int) -> Callable[[np.ndarray], float]:
    return lambda s: float(np.sort(s)[-k:].mean())


def noisy_or(k: int) -> Callable[[np.ndarray], float]:
    return lambda s: float(1 - np.prod(1 - np.sort(s)[-k:]))


def smoothed_max(s: np.ndarray) -> float:
    return float(np.convolve(np.pad(s, 1, mode="edge"), [0.25, 0.5, 0.25], "valid").max())


def pair_min(s: np.ndarray) -> float:
    """The best pair of neighbours by its lower score: two adjacent slices must both be high."""
    return float(np.minimum(s[:-1], s[1:]).max()) if len(s) > 1 else float(s[0])


RULES: dict[str, Callable[[np.ndarray], float]] = {
    "max": lambda s: float(s.max()), "adjacent_mean_2": adjacent_mean(2), "adjacent_mean_3": adjacent_mean(3),
    "adjacent_mean_4": adjacent_mean(4), "top2_mean": top_k_mean(2), "top3_mean": top_k_mean(3),
    "noisy_or_3": noisy_or(3), "smoothed_max_121": smoothed_max, "second_highest": lambda s: float(np.sort(s)[-2]),
    "pair_min": pair_min,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=REPO / "weights")
    ap.add_argument("--trials", type=int, default=4000)
    args = ap.parse_args()
    split = json.loads((args.weights / "head_ct_ich.split.json").read_text())
    simulation = SeriesSimulation(trials=args.trials)

    def scores(part: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [r for r in split[part] if r["targets"][0] is not None]
        y = np.array([r["targets"][0] for r in rows]) > 0.5
        p = np.array([r["probs"][0] for r in rows])
        return p[y], p[~y]

    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, pool in RULES.items():
        out[name] = {}
        for part in ("validation", "test"):
            chosen = series_operating_point(*scores(part), pool, 0.9, simulation)
            out[name][part] = {"series_auc": chosen["series_auc"], "normal_series_raised_at_90": chosen["normal_series_raised"]}
        print(name, json.dumps(out[name]), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
