"""Issue #4's measurements: re-running the pipeline with nothing changed, and after touching one input file.

    .venv/bin/python -m benchmarks.rerun_cache                 # 1M rows, default pipeline settings

The input is the bike data scaled to `--rows` rows (`benchmarks.training_paths.scaled_bike`), as a
folder of 10 Parquet files in time order; the pipeline trains on the window from the second file
on. Every run is `python -m flows.pipeline` as a new process, as a user runs it (Prefect without a
server, a LocalCluster when a step needs one), against one state directory:

1. cold: the first run;
2. warm: the same command again (`--repeats` times): every cacheable step should be a hit;
3. `touch` of one file (its time stamp, not its content): still all hits;
4. one value changed in the oldest file, outside the training window: the steps that read the raw
   input (check-quality, prepare) run again; prepare writes the same splits, so the steps after it
   are hits again.

Each run's step statuses are read back from MLflow. Writes benchmarks/results/rerun_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd

from benchmarks.pipeline_overhead import RESULTS, machine, summary, timed
from benchmarks.training_paths import scaled_bike

CACHEABLE = ["check-quality", "prepare", "tune", "train", "baseline", "evaluate"]
PARTS = 10


def write_parts(rows: int, folder: Path) -> str:
    """The scaled data as PARTS Parquet files in time order; returns the first day of the second."""
    frame = scaled_bike(rows)
    folder.mkdir(parents=True)
    size = -(-len(frame) // PARTS)
    for i in range(PARTS):
        frame.iloc[i * size : (i + 1) * size].to_parquet(folder / f"part-{i:02d}.parquet", index=False)
    return str(pd.to_datetime(frame["dteday"].iloc[size]).date())


def statuses(state: Path) -> dict[str, str]:
    """The cache status of each step of the newest execution in the state directory's MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    newest = client.search_runs(
        ["1"],
        "tags.`mlflow.source.name` = 'training-pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    steps = client.search_runs(["1"], f"tags.`mlflow.parentRunId` = '{newest.info.run_id}'")
    return {r.data.tags["keel.step"]: r.data.tags.get("keel.cache.status", "") for r in steps}


def run(cmd: list[str], env: dict[str, str], state: Path) -> tuple[float, dict[str, str]]:
    seconds, _ = timed(cmd, env)
    return seconds, statuses(state)


def measure(rows: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data, state = Path(tmp) / "parts", Path(tmp) / "state"
        start = write_parts(rows, data)
        env = {**os.environ, "KEEL_STATE_DIR": str(state), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "DASK_SCHEDULER_ADDRESS"):
            env.pop(name, None)
        cmd = [
            sys.executable,
            "-m",
            "flows.pipeline",
            "--data",
            str(data),
            "--drop-columns",
            "--start",
            start,
        ]

        cold, cold_steps = run(cmd, env, state)
        warm = [run(cmd, env, state) for _ in range(repeats)]

        oldest = data / "part-00.parquet"
        os.utime(oldest)  # a new time stamp, the same bytes
        touched = run(cmd, env, state)

        frame = pd.read_parquet(oldest)
        frame.loc[0, "cnt"] += 1  # outside the window: --start is the first day of part-01
        frame.to_parquet(oldest, index=False)
        changed = run(cmd, env, state)

    warm_seconds = [s for s, _ in warm]
    return {
        "rows": rows,
        "cold_s": cold,
        "cold_steps": cold_steps,
        "warm_s": summary(warm_seconds),
        "warm_steps": warm[-1][1],
        "warm_all_hits": all(all(steps[s] == "hit" for s in CACHEABLE) for _, steps in warm),
        "ratio_warm_cold": statistics.median(warm_seconds) / cold,
        "touched_s": touched[0],
        "touched_steps": touched[1],
        "changed_outside_window_s": changed[0],
        "changed_outside_window_steps": changed[1],
    }


def markdown(result: dict) -> str:
    m, r = result["machine"], result["result"]
    steps = ["validate-input", *CACHEABLE, "quality-gate", "register"]

    def row(name: str, seconds: str, found: dict[str, str]) -> str:
        return f"| {name} | {seconds} | " + " | ".join(found.get(s, "") for s in steps) + " |"

    return "\n".join(
        [
            f"Machine: {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}; prefect {m['prefect']}, "
            f"mlflow {m['mlflow']}, dask {m['dask']}, lightgbm {m['lightgbm']}. Command: `{result['command']}`",
            "",
            f"{r['rows']:,} rows in {PARTS} Parquet files; default pipeline settings (16 trials, up to 400 trees).",
            "",
            "| run | wall time, s | " + " | ".join(steps) + " |",
            "|---|---|" + "---|" * len(steps),
            row("cold", f"{r['cold_s']:.1f}", r["cold_steps"]),
            row(
                f"nothing changed (median of {r['warm_s']['runs']})",
                f"{r['warm_s']['median']:.1f} ({r['warm_s']['min']:.1f}-{r['warm_s']['max']:.1f})",
                r["warm_steps"],
            ),
            row("`touch` one file", f"{r['touched_s']:.1f}", r["touched_steps"]),
            row(
                "one value changed outside the window",
                f"{r['changed_outside_window_s']:.1f}",
                r["changed_outside_window_steps"],
            ),
            "",
            f"Re-run with nothing changed / cold run: **{r['ratio_warm_cold']:.1%}** (target: at most 10%); "
            f"every cacheable step a hit in every re-run: {r['warm_all_hits']}.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3, help="re-runs with nothing changed")
    args = parser.parse_args()
    result = {
        "command": f"python -m benchmarks.rerun_cache --rows {args.rows} --repeats {args.repeats}",
        "machine": machine(),
        "result": measure(args.rows, args.repeats),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rerun_cache.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "rerun_cache.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
