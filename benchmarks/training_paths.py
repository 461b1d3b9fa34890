"""Single-worker LightGBM vs lightgbm.dask, on the bike data and on a 1M-row scale-up of it.

    .venv/bin/python -m benchmarks.training_paths

Both paths get the same features, parameters and trees, on the same 2-worker LocalCluster; the
single path runs `fit_single` on one worker with all cores, the distributed path `fit_distributed`
across both workers, on `benchmarks.scaled_data`. Not part of `python -m benchmarks`. Writes benchmarks/results/training_paths.{json,md}.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import machine, machine_line, summary, write_results
from benchmarks.scaled_data import scaled_bike
from tasks.steps.refs import DatasetRef, content_digest
from tasks.tabular.featurize import FeatureSpec

PARAMS = {"num_leaves": 63, "learning_rate": 0.1, "min_data_in_leaf": 20}
TREES = 100


def time_paths(client, frame: pd.DataFrame, repeats: int) -> dict:
    from tasks.tabular import modeling

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
    return {path: summary(v) for path, v in timings.items()}


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
    lines = [
        "# Single-worker LightGBM vs lightgbm.dask (median of 3, min-max)",
        "",
        machine_line(machine()) + " Command: `python -m benchmarks.training_paths`",
        "",
        "| rows | single worker (all cores), s | lightgbm.dask, 2 workers, s |",
        "|---|---|---|",
    ]
    for rows, r in results.items():
        lines.append(
            f"| {int(rows):,} | {r['single']['median']:.2f} ({r['single']['min']:.2f}-{r['single']['max']:.2f}) "
            f"| {r['distributed']['median']:.2f} ({r['distributed']['min']:.2f}-{r['distributed']['max']:.2f}) |"
        )
    write_results("training_paths", {"machine": machine(), "results": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
