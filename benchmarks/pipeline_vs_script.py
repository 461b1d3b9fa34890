"""B2, B3, B8: the training pipeline on 1M rows against a plain script doing the same modelling work.

    .venv/bin/python -m benchmarks.pipeline_vs_script [--rows 1000000] [--repeats 3]

The data is `benchmarks.scaled_data` (the bike table scaled up, distributions kept) as 10 Parquet
files; everything trains on the window from the second file on. In each repeat, one after another,
each as a new process from a fresh state directory (Prefect without a server, embedded MLflow, a
2-worker LocalCluster, as a user's first run):

- `benchmarks.plain_script`: pandas + Optuna + LightGBM, trials one after another on every core;
- `flows.pipeline --parallel-trials 1`: the same trials one after another, on every core;
- `flows.pipeline` (2 trials at once, one core each), then the same command again with nothing
  changed (B3: every cacheable step must be a hit);
- `flows.pipeline` on the 17k-row demo table (B8: how much of the flow process's memory grows
  with the data).

After the repeats: one file `touch`ed (same bytes) and one value changed outside the window, to
show which steps re-run. B8 reads the flow process's own peak resident memory (VmHWM, polled every
0.1 s); the Dask workers and Prefect's temporary server are other processes.
Writes benchmarks/results/pipeline_vs_script.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    Timed,
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

CACHEABLE = ("check-quality", "prepare", "tune", "train", "baseline", "evaluate")
STEPS = ("validate-input", *CACHEABLE, "quality-gate", "register")
MiB = 2**20


def executions(state: Path) -> list[dict]:
    """Every pipeline execution in a state directory's MLflow store, oldest first: per step, its
    cache status and seconds; the test metrics."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    parents = client.search_runs(
        ["1"], "tags.`mlflow.source.name` = 'training-pipeline'", order_by=["attributes.start_time ASC"]
    )
    found = []
    for parent in parents:
        steps = client.search_runs(["1"], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        by_step = {r.data.tags.get("keel.step"): r for r in steps}
        evaluation = by_step.get("evaluate")
        trials = []
        if "tune" in by_step and by_step["tune"].data.tags.get("keel.cache.status") != "hit":
            runs = client.search_runs(["1"], f"tags.`mlflow.parentRunId` = '{by_step['tune'].info.run_id}'")
            for run in sorted(runs, key=lambda r: int(r.data.tags["keel.step"].rsplit("-", 1)[1])):
                trials.append({k: float(v) for k, v in run.data.params.items()})
        found.append(
            {
                "status": {s: r.data.tags.get("keel.cache.status", "") for s, r in by_step.items()},
                "step_seconds": {s: _seconds(r) for s, r in by_step.items()},
                "test_r2": evaluation.data.metrics.get("test_r2") if evaluation else None,
                "trials": trials,
            }
        )
    return found


def _seconds(run) -> float | None:
    """A run's time from its start to its end, as MLflow records it (None while it runs)."""
    return (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None


def pipeline(args: list[str], state: Path) -> tuple[Timed, dict]:
    run = timed([sys.executable, "-m", "flows.pipeline", *args], standalone_env(state))
    return run, executions(state)[-1]


def data_size(folder: Path) -> dict[str, int]:
    import pandas as pd

    frame = pd.read_parquet(folder)
    return {
        "rows": len(frame),
        "in_memory_bytes": int(frame.memory_usage(deep=True).sum()),
        "on_disk_bytes": sum(f.stat().st_size for f in folder.iterdir()),
    }


def measure(rows: int, repeats: int) -> dict:
    runs: dict[str, list] = {k: [] for k in ("plain", "sequential", "parallel", "warm", "demo")}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "parts"
        start = write_parts(rows, data)
        size = data_size(data)
        window = [
            "--data", str(data), "--drop-columns", "--start", start,
            "--target", "cnt", "--time-column", "dteday", "--key-columns", "dteday", "hr",
        ]  # fmt: skip
        for repeat in range(repeats):
            base = Path(tmp) / f"repeat-{repeat}"
            plain = timed(
                [sys.executable, "-m", "benchmarks.plain_script", *window], standalone_env(base / "plain")
            )
            runs["plain"].append(
                {**json.loads(plain.stdout), "seconds": plain.seconds, "peak_rss": plain.peak_rss}
            )
            for name, extra in (("sequential", ["--parallel-trials", "1"]), ("parallel", [])):
                run, execution = pipeline([*window, *extra], base / name)
                runs[name].append({"seconds": run.seconds, "peak_rss": run.peak_rss, **execution})
                print(
                    f"repeat {repeat + 1}: {name} {run.seconds:.1f} s, plain {plain.seconds:.1f} s",
                    flush=True,
                )
            run, execution = pipeline(window, base / "parallel")
            runs["warm"].append({"seconds": run.seconds, "peak_rss": run.peak_rss, **execution})
            run, execution = pipeline([], base / "demo")
            runs["demo"].append({"seconds": run.seconds, "peak_rss": run.peak_rss, **execution})

        state = Path(tmp) / "repeat-0" / "parallel"
        oldest = data / "part-00.parquet"
        os.utime(oldest)  # a new time stamp, the same bytes
        touched, touched_execution = pipeline(window, state)
        import pandas as pd

        frame = pd.read_parquet(oldest)
        frame.loc[0, "cnt"] += 1  # outside the window, which starts with the second file
        frame.to_parquet(oldest, index=False)
        changed, changed_execution = pipeline(window, state)
    return {
        "rows": rows,
        "start": start,
        "data": size,
        "runs": runs,
        "touched": {"seconds": touched.seconds, **touched_execution},
        "changed_outside_window": {"seconds": changed.seconds, **changed_execution},
    }


def seconds(runs: list[dict]) -> dict[str, float]:
    return summary([r["seconds"] for r in runs])


def peaks(runs: list[dict]) -> dict[str, float]:
    return summary([r["peak_rss"] / MiB for r in runs])


def analyse(r: dict) -> dict:
    runs = r["runs"]
    plain, sequential, parallel = (
        statistics.median(x["seconds"] for x in runs[k]) for k in ("plain", "sequential", "parallel")
    )
    warm = statistics.median(x["seconds"] for x in runs["warm"])
    flow_peak = max(x["peak_rss"] for k in ("sequential", "parallel") for x in runs[k])
    demo_peak = statistics.median(x["peak_rss"] for x in runs["demo"])
    return {
        # Identical work: the pipeline's sequential trials are the script's, and so is its model.
        "sequential_same_as_plain": all(
            p["trials"] == s["trials"] and p["r2"] == s["test_r2"]
            for p, s in zip(runs["plain"], runs["sequential"], strict=True)
        ),
        "sequential_ratio": sequential / plain,
        "parallel_ratio": parallel / plain,
        "warm_ratio": warm / parallel,
        "warm_all_hits": all(all(x["status"].get(s) == "hit" for s in CACHEABLE) for x in runs["warm"]),
        "flow_peak_bytes": flow_peak,
        "flow_growth_bytes": flow_peak - demo_peak,
        "data_bytes": r["data"]["in_memory_bytes"],
    }


def markdown(result: dict) -> str:
    r, a = result["result"], result["analysis"]
    runs = r["runs"]
    d = r["data"]
    lines = [
        *heading("B2, B3, B8: the pipeline on 1M rows vs a plain pandas + LightGBM script", result),
        f"Data: {d['rows']:,} rows (`benchmarks/scaled_data.py`), {d['on_disk_bytes'] / MiB:.0f} MiB of Parquet, "
        f"{d['in_memory_bytes'] / MiB:.0f} MiB as one pandas frame; trained on the window from {r['start']}; "
        "16 trials of up to 400 trees with early stopping, then the final fit.",
        "",
        "| run | wall time | vs plain script | test R² | process peak memory |",
        "|---|---|---|---|---|",
    ]
    plain = statistics.median(x["seconds"] for x in runs["plain"])
    labels = {
        "plain": "plain script (trials one after another, every core)",
        "sequential": "`flows.pipeline --parallel-trials 1` (trials one after another, every core)",
        "parallel": "`flows.pipeline` (2 trials at once, a core each)",
        "warm": "`flows.pipeline` again, nothing changed (B3)",
        "demo": "`flows.pipeline` on the 17k-row demo table (B8's reference)",
    }
    for key, label in labels.items():
        s = seconds(runs[key])
        r2 = [x.get("test_r2") or x.get("r2") for x in runs[key]]
        r2_text = f"{statistics.median(r2):.4f}" if all(v is not None for v in r2) else "-"
        ratio = f"{s['median'] / plain:.3f}x" if key in ("sequential", "parallel") else ""
        lines.append(
            f"| {label} | {spread(s)} | {ratio} | {r2_text} | {spread(peaks(runs[key]), 'MiB', 0)} |"
        )
    same = "yes" if a["sequential_same_as_plain"] else "**no**"
    lines += [
        "",
        f"The pipeline with `--parallel-trials 1` tried the plain script's 16 parameter sets and made its "
        f"model (the same test R² to the last digit) in every repeat: {same}.",
        "",
        "Seconds per step (median over the repeats; each step's MLflow run, from its start to its end):",
        "",
        "| run | " + " | ".join(STEPS) + " |",
        "|---|" + "---|" * len(STEPS),
    ]
    for key in ("sequential", "parallel", "warm"):
        cells = []
        for step in STEPS:
            values = [x["step_seconds"][step] for x in runs[key] if x["step_seconds"].get(step) is not None]
            cells.append(f"{statistics.median(values):.1f}" if values else "")
        lines.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cache status per step after the repeats, on the first repeat's state:",
        "",
        "| run | wall time | " + " | ".join(STEPS) + " |",
        "|---|---|" + "---|" * len(STEPS),
    ]
    for label, run in (
        ("nothing changed (last repeat)", runs["warm"][-1]),
        ("`touch` of one file (same bytes)", r["touched"]),
        ("one value changed outside the window", r["changed_outside_window"]),
    ):
        lines.append(
            f"| {label} | {run['seconds']:.1f} s | "
            + " | ".join(run["status"].get(s, "") for s in STEPS)
            + " |"
        )
    lines += [
        "",
        f"B8: the flow process peaked at {a['flow_peak_bytes'] / MiB:.0f} MiB on 1M rows, "
        f"{a['flow_growth_bytes'] / MiB:+.0f} MiB against its peak on the 17k-row demo; the data is "
        f"{a['data_bytes'] / MiB:.0f} MiB in memory. The plain script, which holds it, peaked at "
        f"{statistics.median(x['peak_rss'] for x in runs['plain']) / MiB:.0f} MiB.",
    ]
    return "\n".join(lines)


def summary_rows(result: dict) -> list[dict]:
    r, a = result["result"], result["analysis"]
    runs = r["runs"]
    plain = f"plain script {spread(seconds(runs['plain']))}"
    return [
        target_row(
            "B2",
            "whole training pipeline, 1M rows, trials one after another",
            spread(seconds(runs["sequential"])),
            plain,
            f"{a['sequential_ratio']:.3f}x; the script's trials and model: "
            + ("yes" if a["sequential_same_as_plain"] else "**no**"),
            "<= 1.15x, identical work",
            a["sequential_ratio"] <= 1.15 and a["sequential_same_as_plain"],
        ),
        target_row(
            "B2",
            "whole training pipeline, 1M rows, 2 trials at once",
            spread(seconds(runs["parallel"])),
            plain,
            f"{a['parallel_ratio']:.3f}x",
            "< 1.0x",
            a["parallel_ratio"] < 1.0,
        ),
        target_row(
            "B3",
            "B2 again with nothing changed (a new process)",
            spread(seconds(runs["warm"])),
            f"cold run {spread(seconds(runs['parallel']))}",
            f"{a['warm_ratio']:.1%}" + ("" if a["warm_all_hits"] else " (not all hits)"),
            "<= 10%",
            a["warm_ratio"] <= 0.10 and a["warm_all_hits"],
        ),
        target_row(
            "B8",
            "peak memory of the flow process during B2",
            f"{a['flow_peak_bytes'] / MiB:.0f} MiB ({a['flow_growth_bytes'] / MiB:+.0f} MiB vs the 17k-row demo)",
            f"the data: {a['data_bytes'] / MiB:.0f} MiB in memory",
            f"growth {a['flow_growth_bytes'] / a['data_bytes']:.0%} of the data",
            "never holds the full dataset",
            a["flow_growth_bytes"] < a["data_bytes"],
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = {
        "command": f"python -m benchmarks.pipeline_vs_script --rows {args.rows} --repeats {args.repeats}",
        "machine": machine(),
        "result": measure(args.rows, args.repeats),
    }
    result["analysis"] = analyse(result["result"])
    result["summary"] = summary_rows(result)
    write_results("pipeline_vs_script", result, markdown(result))


if __name__ == "__main__":
    main()
