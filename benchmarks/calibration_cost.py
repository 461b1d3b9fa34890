"""B12: what calibration adds to the baseline step, on 1M rows.

    .venv/bin/python -m benchmarks.calibration_cost [--rows 1000000] [--repeats 5]

The data is `benchmarks.scaled_data` (the bike table scaled up) as 10 Parquet files. The training
pipeline runs once (2 tuning trials: the model only has to exist) and registers a version; then, on
a 2-worker LocalCluster that is already up, the baseline step's work on the workers is timed side by
side, alternating, `--repeats` times each:

- before calibration: predict the training split file by file, profile it and draw the sample;
- now: the same, then calibrate drift on the window's chunks and performance on the test period's
  blocks (predicting the rows of the other splits these hold), fit the estimator, and take the
  model's importance.

The difference is what calibration costs; the target is at most 25% of the step before it.
Writes benchmarks/results/calibration_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    heading,
    machine,
    spread,
    standalone_env,
    summary,
    target_row,
    timed,
    write_results,
)
from benchmarks.scaled_data import write_parts

MODEL = "bike-calibration"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="Side-by-side pairs (the difference is small next to the noise of a shared machine).",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="keel-calibration-"))
    data = work / "data"
    write_parts(args.rows, data)
    state = work / "state"
    env = standalone_env(state)
    timed(
        [sys.executable, "-m", "flows.pipeline", "--data", str(data), "--target", "cnt", "--time-column", "dteday",
         "--drop-columns", "--key-columns", "--n-trials", "2", "--model-name", MODEL, "--min-r2", "0"],
        env,
    )  # fmt: skip

    import os

    os.environ.update(env)
    import dask
    from distributed import Client, LocalCluster, wait

    from tasks.monitoring import worker
    from tasks.monitoring.baseline import load_baseline
    from tasks.monitoring.calibration import parse_chunk
    from tasks.steps import lineage
    from tasks.steps.compute import QUIET_WORKERS
    from tasks.steps.refs import file_urls
    from tasks.steps.settings import get_settings
    from tasks.tabular.prepare import SPLITS

    settings = get_settings()
    client_ml = lineage.mlflow_client(settings)
    champion = load_baseline(client_ml, MODEL)
    version = client_ml.get_model_version(MODEL, champion.version)
    spec = champion.profile.features
    execution = client_ml.get_run(version.run_id)  # the version's source run: the pipeline execution
    [prepare] = client_ml.search_runs(
        [execution.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{version.run_id}' and tags.`keel.step` = 'prepare'",
    )
    files = {name: file_urls(prepare.data.tags[f"keel.output.output.{name}.uri"]) for name in SPLITS}
    location = worker.ModelLocation(
        uri=champion.model_uri, tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri
    )
    chunk = parse_chunk("7D")
    file_counts = {name: len(files[name]) for name in SPLITS}
    with dask.config.set(QUIET_WORKERS), LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:  # fmt: skip

        def step(names: tuple[str, ...], calibrate: bool) -> float:
            """The baseline step's work on the workers: the training files predicted side by side, then
            the profile (and with `calibrate` the calibration, which predicts the rows it needs of
            the other splits) on one worker."""
            started = time.perf_counter()
            predicted = [
                client.submit(worker.predict_file, f, spec, location, pure=False) for f in files["train"]
            ]
            wait(predicted)
            if calibrate:  # as the baseline step does: performance beside the profile, on another worker
                performance = client.submit(
                    worker.performance_from_files, files["test"], spec, location, chunk, 0, pure=False
                )
            drift = client.submit(
                worker.baseline_from_files,
                {n: files[n] for n in names},
                predicted,
                spec,
                location,
                chunk,
                0,
                calibrate,
                pure=False,
            )
            if calibrate:
                parts = worker.with_performance(drift.result(), performance.result(), chunk)
            else:
                parts = drift.result()
            assert (parts.calibration.drift_chunks > 0) == calibrate
            return time.perf_counter() - started

        step(("train",), False)  # warm the workers: the model is loaded once per worker process
        before, after = [], []
        for _ in range(args.repeats):
            before.append(step(("train",), False))
            after.append(step(SPLITS, True))
            print(f"baseline before calibration {before[-1]:.1f} s, with it {after[-1]:.1f} s", flush=True)
    b, a = summary(before), summary(after)
    added = statistics.median(x - y for x, y in zip(after, before, strict=True))
    share = added / b["median"]
    result = {
        "machine": machine(),
        "command": f"python -m benchmarks.calibration_cost --rows {args.rows} --repeats {args.repeats}",
        "rows": args.rows,
        "files": file_counts,
        "before": before,
        "after": after,
        "summary": [
            target_row(
                "B12",
                f"calibration cost at training time, {args.rows:,} rows",
                f"baseline with calibration {spread(a)}",
                f"before calibration {spread(b)}",
                f"+{added:.1f} s ({share:.0%} of the step before it)",
                "<= 25% of the baseline step",
                share <= 0.25,
            )
        ],
    }
    lines = heading("B12: calibration cost at training time", result)
    lines += [
        "| | seconds (median, min-max) |",
        "|---|---|",
        f"| baseline step's work before calibration | {spread(b)} |",
        f"| with calibration | {spread(a)} |",
        f"| added (median of the paired differences) | {added:.1f} s = {share:.0%} |",
    ]
    write_results("calibration_cost", result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
