"""Synthetic tabular streams with known truth, for testing retrain policies.

    .venv/bin/python -m tests.streams --scenario important-shift --out /tmp/stream.csv

Hourly rows with daily and weekly seasonality and a binary target (so performance can also be
estimated without labels). The target follows a logistic model of the inputs:

    logit = 2.5·x1 + 0.6·x3 + 0.8·[weekend] + 0.7·sin(2π·hour/24) + effect(channel) - 0.2
            + 0.03·(x2 + x4 + x5)

- `x1` ~ N(0, 1): the important input. `x3` = sin(2π·hour/24) + N(0, 0.5): a moderately used input
  with a daily cycle. `channel` ∈ {web, app, store} (0, +0.3, -0.3): a categorical input. `x2`, `x4`,
  `x5` ~ N(0, 1): inputs the target barely depends on.

From `change_day` on (default: day 120), by scenario:
- `stationary` (a): nothing changes; no calibrated policy should fire.
- `minor-shift` (b): x2, x4 and x5 shift by +3 standard deviations. Half of the feature columns
  drift (Evidently's rule fires), but the model barely uses them: no retrain is needed.
- `important-shift` (c): x1 concentrates near the decision boundary (sd 1 -> 0.25): the important
  input drifts and accuracy falls, visibly even without labels (the model becomes unsure).
- `concept` (d): the effect of x1 flips sign (2.5·x1 -> -2.5·x1); no input moves. Only labels
  show it.

Seeded: the same arguments give the same rows.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd

SCENARIOS = ("stationary", "minor-shift", "important-shift", "concept")
START = pd.Timestamp("2024-01-01")


def stream(scenario: str, days: int = 210, change_day: int = 120, seed: int = 0) -> pd.DataFrame:
    """`days` of hourly rows; columns time, x1..x5, channel, y."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; one of {SCENARIOS}")
    rng = np.random.default_rng(seed)
    n = days * 24
    time = START + pd.to_timedelta(np.arange(n), unit="h")
    hour = np.asarray(time.hour)
    weekend = np.asarray(time.dayofweek >= 5, dtype=float)
    after = np.asarray(time >= START + pd.Timedelta(days=change_day))
    daily = np.sin(2 * np.pi * hour / 24)
    x1 = rng.normal(0, 1, n)
    x2, x4, x5 = (rng.normal(0, 1, n) for _ in range(3))
    x3 = daily + rng.normal(0, 0.5, n)
    channel = rng.choice(np.array(["web", "app", "store"]), n, p=[0.5, 0.3, 0.2])
    if scenario == "important-shift":
        x1 = np.where(after, x1 * 0.25, x1)
    if scenario == "minor-shift":
        x2, x4, x5 = (np.where(after, x + 3.0, x) for x in (x2, x4, x5))
    slope = np.where(after & (scenario == "concept"), -2.5, 2.5)
    effect = pd.Series(channel).map({"web": 0.0, "app": 0.3, "store": -0.3}).to_numpy()
    logit = slope * x1 + 0.6 * x3 + 0.8 * weekend + 0.7 * daily + effect - 0.2 + 0.03 * (x2 + x4 + x5)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return pd.DataFrame(
        {"time": time, "x1": x1, "x2": x2, "x3": x3, "x4": x4, "x5": x5, "channel": channel, "y": y}
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.streams",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenario", choices=SCENARIOS, required=True)
    parser.add_argument("--days", type=int, default=210)
    parser.add_argument("--change-day", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="A .csv or .parquet file to write.")
    args = parser.parse_args(argv)
    frame = stream(args.scenario, args.days, args.change_day, args.seed)
    if args.out.endswith(".parquet"):
        frame.to_parquet(args.out, index=False)
    else:
        frame.to_csv(args.out, index=False)
    print(f"{len(frame):,} rows of {args.scenario} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
