"""B7: 16 tuning trials on 2 workers against the same 16 trials one after another.

    .venv/bin/python -m benchmarks.parallel_trials [--rows 300000] [--repeats 2]

The pipeline's `tune` step (TuningStep: trials as Dask tasks, an MLflow run per trial, progress
artifacts) on a 2-worker LocalCluster, on the scaled bike data (`benchmarks.scaled_data`) after
`prepare`. The random strategy makes the trials independent of the schedule, so every run tries
the same 16 parameter sets with the same seed, 400 trees at most and early stopping:

- 2 at once, 1 LightGBM thread each (`parallel=2`);
- one after another, 1 thread each (`parallel=1`): the same work, not parallel;
- one after another, 2 threads each: what a sequential tuner on this machine would do.

A short tuning job first lets each worker read and bin the data, so no schedule pays for that.

Writes benchmarks/results/parallel_trials.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import go_standalone, heading, machine, spread, summary, target_row, write_results
from benchmarks.scaled_data import write_parts

TRIALS = 16
TARGET = 0.6
SCHEDULES = {
    "parallel": (2, 1, "2 trials at once, 1 thread each"),
    "sequential": (1, 1, "one after another, 1 thread each (the same work)"),
    "sequential_all_cores": (1, 2, "one after another, 2 threads each"),
}


def measure(rows: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        go_standalone(Path(tmp) / "state")
        data = Path(tmp) / "data"
        write_parts(rows, data)
        from prefect import flow

        from tasks.steps import TuningSpec, lineage
        from tasks.steps.compute import dask_cluster
        from tasks.steps.settings import get_settings
        from tasks.tabular.data import TableSpec
        from tasks.tabular.prepare import SplitSpec, prepare, validate_input
        from tasks.tabular.train import TrainingSpec, default_search_space, tune

        @flow(name="parallel-trials")
        def run() -> dict[str, list[dict]]:
            settings = get_settings()
            table = TableSpec(path=str(data), target="cnt", time_column="dteday")
            plan = lineage.ExecutionPlan(force=frozenset({"tune"}))  # every repeat really runs
            timings: dict[str, list[dict]] = {name: [] for name in SCHEDULES}
            with (
                lineage.pipeline_run("parallel-trials", {}, settings, plan=plan),
                dask_cluster(settings),
            ):
                raw = validate_input(table)
                splits = prepare(raw, table, SplitSpec())
                # Warm-up, not timed: each worker reads and bins the splits once, then every schedule
                # finds them ready (the first schedule timed would otherwise pay for it alone).
                warm = TuningSpec(space=default_search_space(), n_trials=4, parallel=2, objective="rmse")
                tune(splits.train, splits.valid, splits.features, warm, TrainingSpec())
                for _ in range(repeats):
                    for name, (parallel, threads, _label) in SCHEDULES.items():
                        spec = TuningSpec(
                            space=default_search_space(),
                            n_trials=TRIALS,
                            parallel=parallel,
                            threads_per_trial=threads,
                            strategy="random",
                            objective="rmse",
                        )
                        started = time.perf_counter()
                        result = tune(splits.train, splits.valid, splits.features, spec, TrainingSpec())
                        timings[name].append(
                            {
                                "seconds": time.perf_counter() - started,
                                "trials": [r.params for r in result.trials],
                                "best_rmse": result.best_value,
                            }
                        )
                        print(f"{name}: {timings[name][-1]['seconds']:.1f} s", flush=True)
            return timings

        return {"rows": rows, "runs": run()}


def analyse(r: dict) -> dict:
    runs = r["runs"]
    median = {name: statistics.median(x["seconds"] for x in runs[name]) for name in SCHEDULES}
    every = [x["trials"] for name in SCHEDULES for x in runs[name]]
    return {
        "ratio": median["parallel"] / median["sequential"],
        "ratio_all_cores": median["parallel"] / median["sequential_all_cores"],
        "same_trials": all(t == every[0] for t in every),
    }


def markdown(result: dict) -> str:
    r, a = result["result"], result["analysis"]
    lines = [
        *heading("B7: 16 tuning trials on 2 workers vs one after another", result),
        f"The `tune` step on {r['rows']:,} rows of the scaled bike data (70% train, 15% validation), "
        f"{TRIALS} random-strategy trials (the same parameter sets in every run: {a['same_trials']}), "
        "up to 400 trees with early stopping.",
        "",
        "| schedule | wall time | parallel / this |",
        "|---|---|---|",
    ]
    parallel = statistics.median(x["seconds"] for x in r["runs"]["parallel"])
    for name, (_p, _t, label) in SCHEDULES.items():
        s = summary([x["seconds"] for x in r["runs"][name]])
        lines.append(f"| {label} | {spread(s)} | {parallel / s['median']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    result = {
        "command": f"python -m benchmarks.parallel_trials --rows {args.rows} --repeats {args.repeats}",
        "machine": machine(),
        "result": measure(args.rows, args.repeats),
    }
    a = result["analysis"] = analyse(result["result"])
    runs = result["result"]["runs"]
    result["summary"] = [
        target_row(
            "B7",
            f"{TRIALS} tuning trials on 2 workers ({args.rows:,} rows)",
            spread(summary([x["seconds"] for x in runs["parallel"]])),
            "the same trials one after another "
            + spread(summary([x["seconds"] for x in runs["sequential"]]))
            + f"; with 2 threads each {spread(summary([x['seconds'] for x in runs['sequential_all_cores']]))}",
            f"{a['ratio']:.2f}x (vs 2 threads each: {a['ratio_all_cores']:.2f}x)",
            f"<= {TARGET}x",
            a["ratio"] <= TARGET and a["same_trials"],
        )
    ]
    write_results("parallel_trials", result, markdown(result))


if __name__ == "__main__":
    main()
