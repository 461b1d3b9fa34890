"""B13: batch scoring (`flows.transform`) of 1M rows on 2 workers against a plain script.

    .venv/bin/python -m benchmarks.transform_vs_script [--rows 1000000] [--repeats 3]

Starts the local stack (`infra.stack up`: Prefect and MLflow servers, a 2-worker Dask cluster) in a
temporary folder, registers a model trained on the bike data (`flows.pipeline`, 2 trials), and
writes the bike table scaled up to `--rows` rows (`benchmarks.scaled_data`, 10 Parquet files). Then,
`--repeats` times, alternating, each as a new process against the same stack:

- `benchmarks.plain_transform`: pandas reads the files, `mlflow.pyfunc` predicts (LightGBM on every
  core), the key columns and the predictions go to one Parquet file;
- `python -m flows.transform`: the same model version, the same files, the key columns kept (its
  default), plus what the script does not do: the input pinned and digested, an inference id per
  row, the output written whole or not at all, the MLflow run with both datasets.

Both are timed from process start to exit (imports included). For context, the `score` step's own
time (its MLflow run). Stops the stack. Writes benchmarks/results/transform_vs_script.{json,md}.
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
    summary,
    target_row,
    timed,
    write_results,
)
from benchmarks.scaled_data import BIKE, write_parts

TARGET = 0.8
MODEL = "b13-bike"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_stack() as (env, _):
        work = Path(tmp)
        run_env = {**os.environ, **env}
        run_env["KEEL_DATA_ROOTS"] += f",{work.resolve()}"  # the stack's roots, and this benchmark's folder
        timed(
            [sys.executable, "-m", "flows.pipeline", "--data", str(BIKE), "--model-name", MODEL,
             "--n-trials", "2", "--target", "cnt", "--time-column", "dteday", "--key-columns", "dteday", "hr",
             "--drop-columns", "instant", "casual", "registered"],
            run_env,
        )  # fmt: skip
        data = work / "data"
        write_parts(args.rows, data)
        script, ours, steps = [], [], []
        for i in range(args.repeats):
            out = work / f"script-{i}.parquet"
            script.append(
                timed(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.plain_transform",
                        f"models:/{MODEL}@champion",
                        str(data),
                        str(out),
                    ],
                    run_env,
                ).seconds
            )
            scored = work / f"scored-{i}"
            ours.append(
                timed(
                    [sys.executable, "-m", "flows.transform", "--model-name", MODEL, "--data", str(data),
                     "--output", str(scored)],
                    run_env,
                ).seconds
            )  # fmt: skip
            steps.append(score_step_seconds())
            print(f"repeat {i + 1}: script {script[-1]:.1f} s, flows.transform {ours[-1]:.1f} s", flush=True)
            shutil.rmtree(scored)
            out.unlink()
    write(summary(script), summary(ours), summary(steps), args)


def score_step_seconds() -> float:
    """The last `score` step's own time, from its MLflow run."""
    from tasks.steps.lineage import mlflow_client
    from tasks.steps.settings import get_settings

    client = mlflow_client(get_settings())
    experiments = [e.experiment_id for e in client.search_experiments()]
    [run] = client.search_runs(
        experiments, "tags.`keel.step` = 'score'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return (run.info.end_time - run.info.start_time) / 1000


def write(script: dict, ours: dict, step: dict, args: argparse.Namespace) -> None:
    ratio = ours["median"] / script["median"]
    result = {
        "command": f"python -m benchmarks.transform_vs_script --rows {args.rows} --repeats {args.repeats}",
        "machine": machine(),
        "rows": args.rows,
        "script_s": script,
        "transform_s": ours,
        "score_step_s": step,
        "ratio": ratio,
        "summary": [
            target_row(
                "B13",
                f"flows.transform, {args.rows:,} rows, 2 workers (new process, local stack)",
                spread(ours),
                f"plain script (pandas + pyfunc.predict + Parquet) {spread(script)}",
                f"{ratio:.2f}x (the score step alone: {step['median']:.1f} s)",
                f"<= {TARGET}x",
                ratio <= TARGET,
            )
        ],
    }
    lines = [
        *heading("B13: batch scoring against a plain script", result),
        "| | median | min | max | runs |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {x['median']:.1f} s | {x['min']:.1f} s | {x['max']:.1f} s | {x['runs']} |"
            for label, x in (
                ("plain script (new process)", script),
                ("`python -m flows.transform` (new process)", ours),
                ("its `score` step", step),
            )
        ),
        "",
        f"Ratio of medians: {ratio:.2f}x (target <= {TARGET}x).",
    ]
    write_results("transform_vs_script", result, "\n".join(lines))


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
