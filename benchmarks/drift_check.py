"""B4: drift check time: our check (stored reference profile + one pass over the new data on Dask) against
Evidently's DataDriftPreset run naively on both full frames, with the same per-column verdicts.

    .venv/bin/python -m benchmarks.drift_check                       # 1M rows, 3 repeats
    .venv/bin/python -m benchmarks.drift_check --rows 100000 1000000 --repeats 1

Data: 20 numeric columns of different shapes (normal, log-normal, uniform, integer counts) and one
categorical column; in the current data some columns are shifted a little, some a lot and some not
at all, so both verdicts occur. The current data sits in Parquet (8 parts) as a landed batch would.
Ours runs on a 2-worker LocalCluster that is already up (as in the stack); the profile of the
reference is built once, as at training time, and timed separately.
Writes benchmarks/results/drift_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import heading, machine, spread, summary, target_row, write_results
from tasks.monitoring import drift_stats, worker
from tasks.tabular.featurize import FeatureSpec

TARGET = 0.5
NUMERIC = [f"x{i:02d}" for i in range(20)]


def make_frame(rows: int, seed: int, shifted: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    columns = {}
    for i, name in enumerate(NUMERIC):
        shift = (0.0, 0.02, 0.05, 0.2, 0.5)[i % 5] if shifted else 0.0
        match i % 4:
            case 0:
                columns[name] = rng.normal(shift, 1.0, rows)
            case 1:
                columns[name] = rng.lognormal(shift, 0.8, rows)
            case 2:
                columns[name] = rng.uniform(0 + shift, 1 + shift, rows)
            case _:
                columns[name] = rng.poisson(20 * (1 + shift), rows).astype("float64")
    probabilities = [0.4, 0.3, 0.2, 0.1] if not shifted else [0.3, 0.3, 0.2, 0.2]
    columns["c"] = rng.choice(np.array(["a", "b", "c", "d"]), rows, p=probabilities)
    columns["t"] = pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(rows), unit="s")
    return pd.DataFrame(columns)


def naive_evidently(
    reference: pd.DataFrame, current: pd.DataFrame
) -> tuple[float, dict[str, bool], dict[str, float]]:
    from tasks.monitoring.drift_report import build_report

    started = time.perf_counter()
    report = build_report(reference, current, NUMERIC, ["c"])
    seconds = time.perf_counter() - started
    return (
        seconds,
        {c: v.drifted for c, v in report.verdicts.items()},
        {c: v.score for c, v in report.verdicts.items()},
    )


def ours(
    client, batch_uri: str, profiles: dict, spec: FeatureSpec
) -> tuple[float, dict[str, bool], dict[str, float]]:
    import dask.dataframe as dd

    started = time.perf_counter()
    summary = worker.summarise_batch(client, dd.read_parquet(batch_uri), profiles, spec, model=None)
    verdicts = {c: drift_stats.column_drift(profiles[c], summary.columns[c]) for c in profiles}
    seconds = time.perf_counter() - started
    return seconds, {c: v.drifted for c, v in verdicts.items()}, {c: v.score for c, v in verdicts.items()}


def build_profiles(reference: pd.DataFrame) -> tuple[float, dict]:
    started = time.perf_counter()
    profiles = {c: drift_stats.profile_column(reference[c], c, "numeric") for c in NUMERIC}
    profiles["c"] = drift_stats.profile_column(reference["c"], "c", "categorical")
    return time.perf_counter() - started, profiles


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import distributed

    spec = FeatureSpec(
        target="y",
        time_column="t",
        task="regression",
        numeric=NUMERIC,
        categorical={"c": list("abcd")},
        time_parts=[],
    )
    results = []
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit="6GiB",
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        distributed.Client(cluster) as client,
        tempfile.TemporaryDirectory() as tmp,
    ):
        for rows in args.rows:
            reference, current = make_frame(rows, 1, False), make_frame(rows, 2, True)
            batch = f"{tmp}/batch-{rows}"
            Path(batch).mkdir()
            for index, part in enumerate(np.array_split(current, 8)):
                part.to_parquet(f"{batch}/part-{index}.parquet", index=False)
            profile_seconds, profiles = build_profiles(reference)
            mine_times, theirs_times = [], []
            for _ in range(args.repeats):  # alternate, so both see the same machine load
                seconds, mine, mine_scores = ours(client, batch, profiles, spec)
                mine_times.append(seconds)
                seconds, theirs, theirs_scores = naive_evidently(reference, current)
                theirs_times.append(seconds)
            same = mine == theirs
            worst = max(
                abs(mine_scores[c] - theirs_scores[c]) / max(1.0, abs(theirs_scores[c])) for c in mine
            )
            result = {
                "rows": rows,
                "columns": len(NUMERIC) + 1,
                "ours_s": summary(mine_times),
                "evidently_s": summary(theirs_times),
                "ratio": statistics.median(mine_times) / statistics.median(theirs_times),
                "profile_build_s": profile_seconds,
                "same_verdicts": same,
                "drifted_columns": sorted(c for c, d in mine.items() if d),
                "worst_score_difference": worst,
            }
            results.append(result)
            print(json.dumps(result), flush=True)
    rows = " ".join(str(r) for r in args.rows)
    result = {
        "command": f"python -m benchmarks.drift_check --rows {rows} --repeats {args.repeats}",
        "machine": machine(),
        "results": results,
        "summary": [summary_row(r) for r in results],
    }
    write_results("drift_check", result, markdown(result))


def summary_row(r: dict) -> dict:
    return target_row(
        "B4",
        f"drift check, {r['rows']:,} reference x {r['rows']:,} current rows, 20 numeric + 1 categorical",
        spread(r["ours_s"], digits=2),
        f"Evidently DataDriftPreset on the full frames {spread(r['evidently_s'])}",
        f"{r['ratio']:.3f}x, same verdicts: {'yes' if r['same_verdicts'] else 'NO'}",
        f"<= {TARGET}x, same per-column verdicts",
        r["ratio"] <= TARGET and r["same_verdicts"],
    )


def markdown(result: dict) -> str:
    lines = [
        *heading("B4: drift check, ours vs Evidently DataDriftPreset on the full frames", result),
        "| rows (ref = cur) | ours | Evidently | ratio | same verdicts | worst score diff | profile build (once) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['rows']:,} x {r['columns']} cols | {spread(r['ours_s'], digits=2)} | {spread(r['evidently_s'])} "
            f"| {r['ratio']:.3f} | {'yes' if r['same_verdicts'] else 'NO'} ({len(r['drifted_columns'])} drifted) "
            f"| {r['worst_score_difference']:.2%} | {r['profile_build_s']:.2f} s |"
        )
    lines += ["", "Score difference: the largest |ours - Evidently| / max(1, Evidently) over the 21 columns."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
