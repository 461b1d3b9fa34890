"""B13: batch scoring (`flows.transform`) of 1M rows on 2 workers against a plain script.

    .venv/bin/python -m benchmarks.transform_vs_script [--rows 1000000] [--repeats 3]

Writes the bike table scaled up to `--rows` rows (`benchmarks.scaled_data`, 10 Parquet files), then
measures two ways of running the same command, each with a model trained on the bike data
(`flows.pipeline`, 2 trials) and its own 2 Dask workers:

- **on the local stack** (`infra.stack up`: Prefect and MLflow servers, a 2-worker Dask cluster, in
  a temporary folder): every command a new process that imports its libraries;
- **with the warm pool** (`KEEL_WARM_POOL=10m`, an embedded MLflow store: a user's laptop): the
  pool's runner takes each command with its libraries imported, its 2 workers have the model
  loaded from the runs before (two untimed runs first).

In each, `--repeats` times, alternating, against the same store:

- `benchmarks.plain_transform`: pandas reads the files, `mlflow.pyfunc` predicts (LightGBM on every
  core), the key columns and the predictions go to one Parquet file;
- `python -m flows.transform`: the same model version, the same files, the key columns kept (its
  default), plus what the script does not do: the input pinned and digested, an inference id per
  row, the output written whole or not at all, the MLflow run with both datasets.

Both are timed from process start to exit (imports included). For context, the `score` step's own
time (its MLflow run). Writes benchmarks/results/transform_vs_script.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    ROOT,
    heading,
    local_stack,
    machine,
    spread,
    standalone_env,
    summary,
    target_row,
    timed,
    write_results,
)
from benchmarks.scaled_data import BIKE, write_parts

TARGET = 0.8
MODEL = "b13-bike"
TRAIN = [
    "-m", "flows.pipeline", "--data", str(BIKE), "--model-name", MODEL, "--n-trials", "2", "--target", "cnt",
    "--time-column", "dteday", "--key-columns", "dteday", "hr", "--drop-columns", "instant", "casual", "registered",
]  # fmt: skip
PATHS = {
    "stack": "new process, local stack",
    "pool": "warm pool (KEEL_WARM_POOL=10m), embedded MLflow",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        write_parts(args.rows, data)
        measured = {
            "stack": on_the_stack(work, data, args.repeats),
            "pool": with_the_pool(work, data, args.repeats),
        }
    write(measured, args)


def on_the_stack(work: Path, data: Path, repeats: int) -> dict[str, list[float]]:
    with local_stack() as (env, _):
        run_env = {**os.environ, **env}
        run_env["KEEL_DATA_ROOTS"] += f",{work.resolve()}"  # the stack's roots, and this benchmark's folder
        timed([sys.executable, *TRAIN], run_env)
        return alternate(work / "stack", data, repeats, run_env, run_env, env["MLFLOW_TRACKING_URI"])


def with_the_pool(work: Path, data: Path, repeats: int) -> dict[str, list[float]]:
    state = work / "pool" / ".keel"
    pool_env = standalone_env(
        state,
        PREFECT_HOME=str(work / "pool" / "prefect"),
        KEEL_WARM_POOL="10m",
        KEEL_DATA_ROOTS=f"{work.resolve()},{BIKE.parent.resolve()}",
    )
    store = f"sqlite:///{state / 'mlflow.db'}"
    try:
        timed([sys.executable, *TRAIN], pool_env)  # starts the pool
        for i in range(2):  # the runner learns the command's imports, the workers load the model
            timed(transform_command(data, work / "pool" / f"untimed-{i}"), pool_env)
        return alternate(work / "pool", data, repeats, {**standalone_env(state), "MLFLOW_TRACKING_URI": store},
                         pool_env, store)  # fmt: skip
    finally:
        timed(
            [sys.executable, "-m", "infra.pool", "down", "--home", str(state / "pool")], standalone_env(state)
        )


def transform_command(data: Path, output: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flows.transform",
        "--model-name",
        MODEL,
        "--data",
        str(data),
        "--output",
        str(output),
    ]


def alternate(
    folder: Path, data: Path, repeats: int, script_env: dict[str, str], env: dict[str, str], store: str
) -> dict[str, list[float]]:
    """The plain script and `flows.transform`, one after the other, `repeats` times."""
    times: dict[str, list[float]] = {"script": [], "transform": [], "step": []}
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(repeats):
        out = folder / f"script-{i}.parquet"
        script = [
            sys.executable,
            "-m",
            "benchmarks.plain_transform",
            f"models:/{MODEL}@champion",
            str(data),
            str(out),
        ]
        times["script"].append(timed(script, script_env).seconds)
        scored = folder / f"scored-{i}"
        times["transform"].append(timed(transform_command(data, scored), env).seconds)
        times["step"].append(score_step_seconds(store))
        print(
            f"{folder.name} repeat {i + 1}: script {times['script'][-1]:.1f} s, "
            f"flows.transform {times['transform'][-1]:.1f} s",
            flush=True,
        )
        shutil.rmtree(scored)
        out.unlink()
    return times


def score_step_seconds(store: str) -> float:
    """The last `score` step's own time, from its MLflow run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    [run] = client.search_runs(
        experiments, "tags.`keel.step` = 'score'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return (run.info.end_time - run.info.start_time) / 1000


def write(measured: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    found = {
        path: {name: summary(values) for name, values in times.items()} for path, times in measured.items()
    }
    ratios = {path: x["transform"]["median"] / x["script"]["median"] for path, x in found.items()}
    result = {
        "command": f"python -m benchmarks.transform_vs_script --rows {args.rows} --repeats {args.repeats}",
        "machine": machine(),
        "rows": args.rows,
        **found,
        "ratios": ratios,
        "summary": [
            target_row(
                "B13",
                f"flows.transform, {args.rows:,} rows, 2 workers ({PATHS[path]})",
                spread(x["transform"]),
                f"plain script (pandas + pyfunc.predict + Parquet) {spread(x['script'])}",
                f"{ratios[path]:.2f}x (the score step alone: {x['step']['median']:.1f} s)",
                f"<= {TARGET}x",
                ratios[path] <= TARGET,
            )
            for path, x in found.items()
        ],
    }
    lines = [
        *heading("B13: batch scoring against a plain script", result),
        "| | median | min | max | runs |",
        "|---|---|---|---|---|",
    ]
    for path, x in found.items():
        lines += [
            f"| {label} ({PATHS[path]}) | {v['median']:.1f} s | {v['min']:.1f} s | {v['max']:.1f} s | {v['runs']} |"
            for label, v in (
                ("plain script", x["script"]),
                ("`python -m flows.transform`", x["transform"]),
                ("its `score` step", x["step"]),
            )
        ]
    lines += [
        "",
        *(f"Ratio of medians, {PATHS[p]}: {r:.2f}x (target <= {TARGET}x)." for p, r in ratios.items()),
    ]
    write_results("transform_vs_script", result, "\n".join(lines))


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
