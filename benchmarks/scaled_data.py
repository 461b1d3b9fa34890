"""The benchmarks' data: the bike-sharing table scaled up to any number of rows, distributions kept.

    .venv/bin/python -m benchmarks.scaled_data --rows 1000000 --out /tmp/bike-1m

How it scales: the 17,379 hourly rows (2011-2012) are repeated; copy k is shifted by k x 731 days,
so time keeps moving forward and every (dteday, hr) key stays unique (beyond 120 copies, about 2.1M
rows, pandas' calendar ends in 2262: copy k is then shifted by (k mod 120) x 731 days plus k // 120
minutes, which keeps the keys unique and the calendar features as they were), and the four weather columns
(temp, atemp, hum, windspeed, all normalised to 0..1) get Gaussian noise (sd 0.02) clipped to 0..1.
Every other column (season, month, hour, weekday, holiday, working day, weather situation, the
target `cnt`) keeps its exact values, so each column's distribution and the target's relation to
the features are those of the real data. The columns `instant`, `casual` and `registered` are
dropped (an id, and two columns that add up to the target).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import ROOT

BIKE = ROOT / "data" / "bike_sharing_hourly.csv"
DAYS_PER_COPY = 731
CYCLE = 120  # copies before the dates would pass pandas' last day (2262-04-11)
PARTS = 10


def scaled_bike(rows: int, seed: int = 0) -> pd.DataFrame:
    """The bike table repeated to `rows`, weather jittered within its range, dates shifted by copy."""
    bike = pd.read_csv(BIKE)
    copies = -(-rows // len(bike))
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(copies):
        part = bike.copy()
        shift = pd.Timedelta(days=DAYS_PER_COPY * (k % CYCLE), minutes=k // CYCLE)
        part["dteday"] = pd.to_datetime(part["dteday"]) + shift
        for column in ("temp", "atemp", "hum", "windspeed"):
            part[column] = np.clip(part[column] + rng.normal(0, 0.02, len(part)), 0, 1)
        parts.append(part)
    return pd.concat(parts, ignore_index=True).head(rows).drop(columns=["instant", "casual", "registered"])


def write_parts(rows: int, folder: Path, parts: int = PARTS) -> str:
    """The scaled data as `parts` Parquet files in time order; returns the first day of the second
    file (the pipeline benchmarks train from there, so the first file lies outside their window)."""
    frame = scaled_bike(rows)
    folder.mkdir(parents=True)
    size = -(-len(frame) // parts)
    for i in range(parts):
        frame.iloc[i * size : (i + 1) * size].to_parquet(folder / f"part-{i:02d}.parquet", index=False)
    return str(pd.to_datetime(frame["dteday"].iloc[size]).date())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the Parquet files")
    args = parser.parse_args()
    start = write_parts(args.rows, args.out)
    print(f"{args.rows:,} rows in {PARTS} files under {args.out}; the second file starts on {start}")


if __name__ == "__main__":
    main()
