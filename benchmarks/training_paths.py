"""Single-worker LightGBM vs lightgbm.dask, on the bike data and on a 1M-row scale-up of it.

    .venv/bin/python -m benchmarks.training_paths

Both paths get the same features, parameters and trees, on the same 2-worker LocalCluster; the
single path runs `fit_single` on one worker with all cores, the distributed path `fit_distributed`
across both workers. The scale-up repeats the bike rows with small noise on the weather columns
(distributions kept) and shifted dates. Writes benchmarks/results/training_paths.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.featurize import FeatureSpec
from tasks.refs import DatasetRef, content_digest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PARAMS = {"num_leaves": 63, "learning_rate": 0.1, "min_data_in_leaf": 20}
TREES = 100


def scaled_bike(rows: int, seed: int = 0) -> pd.DataFrame:
    """The bike table repeated to `rows`, weather jittered within its range, dates shifted by copy."""
    bike = pd.read_csv(ROOT / "data" / "bike_sharing_hourly.csv")
    copies = -(-rows // len(bike))
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(copies):
        part = bike.copy()
        part["dteday"] = pd.to_datetime(part["dteday"]) + pd.Timedelta(days=731 * k)
        for column in ("temp", "atemp", "hum", "windspeed"):
            part[column] = np.clip(part[column] + rng.normal(0, 0.02, len(part)), 0, 1)
        parts.append(part)
    return pd.concat(parts, ignore_index=True).head(rows).drop(columns=["instant", "casual", "registered"])


def time_paths(client, frame: pd.DataFrame, repeats: int) -> dict:
    from tasks import modeling

    numeric = [c for c in frame.columns if c not in ("cnt", "dteday")]
    spec = FeatureSpec(
        target="cnt",
        time_column="dteday",
        task="regression",
        numeric=numeric,
        categorical={},
        time_parts=["dayofweek", "dayofyear", "month"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train"
        folder.mkdir()
        for i, chunk in enumerate(np.array_split(frame, 8)):
            chunk.to_parquet(folder / f"part.{i}.parquet", index=False)
        ref = DatasetRef(
            name="train",
            uri=str(folder),
            digest=content_digest(str(folder)),
            format="parquet",
            rows=len(frame),
        )
        timings: dict[str, list[float]] = {"single": [], "distributed": []}
        for _ in range(repeats):
            started = time.perf_counter()
            client.submit(modeling.fit_single, PARAMS, [ref], spec, TREES, 42, 0, pure=False).result()
            timings["single"].append(time.perf_counter() - started)
            started = time.perf_counter()
            modeling.fit_distributed(client, PARAMS, [ref], spec, TREES, 42)
            timings["distributed"].append(time.perf_counter() - started)
    return {
        path: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v)}
        for path, v in timings.items()
    }


def main() -> None:
    from distributed import Client, LocalCluster

    results = {}
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit="4GiB",
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        for rows, repeats in ((17_379, 3), (1_000_000, 3)):
            results[str(rows)] = time_paths(client, scaled_bike(rows), repeats)
    lines = ["| rows | single worker (all cores), s | lightgbm.dask, 2 workers, s |", "|---|---|---|"]
    for rows, r in results.items():
        lines.append(
            f"| {int(rows):,} | {r['single']['median']:.2f} ({r['single']['min']:.2f}-{r['single']['max']:.2f}) "
            f"| {r['distributed']['median']:.2f} ({r['distributed']['min']:.2f}-{r['distributed']['max']:.2f}) |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "training_paths.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "training_paths.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
