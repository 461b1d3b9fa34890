"""Where the seconds of a cold run go (issue 17): each entry point as a user's first run makes it.

    .venv/bin/python -m benchmarks.cold_start [--repeats 3] [--entries pipeline monitor ...]

Every run is a new process with a new Prefect home (the run's temporary Prefect server starts on it,
from the migrated template `make install` keeps, as on a first run), no servers (embedded MLflow
store; Dask in the process for these small inputs):
- `pipeline`: `python -m flows.pipeline` on the bike data (the demo), on a new state directory;
- `monitor`, `transform`, `label`: one week of the bike data (168 rows) against a champion trained
  once beforehand (not timed), on that state directory; `label` judges the `transform` output;
- `retrain`: `python -m flows.retrain --force` on that state directory;
- `backtest`: `python -m flows.backtest` on five months of the bike data (120 days initial, then weekly
  batches), one policy.

The phases come from the run's own log (Prefect's timestamps) and a separate timing of the import:
`import` (a new process importing the entry point's module), `until server` (the rest up to
"Starting temporary server": parsing, settings), `server + flow run` (until "Beginning flow run":
the run's temporary server starting while the MLflow store opens and the steps' `preload` modules
are imported, then the flow run created), each step
(until its "Finished": steps that overlap count where they finish), `flow end` (until the flow run's
"Finished": the last lineage, closing the MLflow run and the Dask cluster) and `exit` (until the
process ends: the temporary server stopped, logs and events flushed). Medians with ranges. Writes
benchmarks/results/cold_start.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from benchmarks.common import ROOT, heading, machine, standalone_env, write_results
from benchmarks.scaled_data import BIKE

BIKE_FLAGS = [
    "--target", "cnt", "--time-column", "dteday", "--key-columns", "dteday", "hr",
    "--drop-columns", "instant", "casual", "registered",
]  # fmt: skip
MODEL = "cold-bike"
LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| \w+ +\| (.*)$")
ENTRIES = ("pipeline", "monitor", "transform", "label", "retrain", "backtest")
MODULES = {e: f"flows.{e}" for e in ENTRIES}


def commands(work: Path) -> dict[str, list[str]]:
    week, labels, scored = work / "week.csv", work / "labels.csv", work / "scored"
    return {
        "pipeline": ["-m", "flows.pipeline", "--data", str(BIKE), "--model-name", MODEL, *BIKE_FLAGS],
        "monitor": ["-m", "flows.monitor", "--batch", str(week), "--model-name", MODEL],
        "transform": ["-m", "flows.transform", "--model-name", MODEL, "--data", str(week), "--output",
                      str(scored), "--id-columns", "instant", "--overwrite"],
        "label": ["-m", "flows.label", "--model-name", MODEL, "--labels", str(labels), "--predictions",
                  str(scored), "--id-column", "instant"],
        "retrain": ["-m", "flows.retrain", "--model-name", MODEL, "--force", "--data", str(BIKE)],
        "backtest": ["-m", "flows.backtest", "--data", str(work / "five-months.csv"), "--target", "cnt",
                     "--time-column", "dteday", "--drop-columns", "instant", "casual", "registered",
                     "--initial-days", "120", "--batch-every", "7D", "--policies", "never", "--n-trials", "2"],
    }  # fmt: skip


def phases(log: str, started: float, ended: float) -> dict[str, float]:
    """The run's phases, in seconds, from its log's timestamps (this machine's local time)."""
    day = datetime.fromtimestamp(started).date()
    marks: list[tuple[str, float]] = []
    for line in log.splitlines():
        found = LINE.match(line)
        if not found:
            continue
        stamp = datetime.combine(day, datetime.strptime(found.group(1), "%H:%M:%S.%f").time()).timestamp()
        text = found.group(2)
        if "Starting temporary server" in text:
            marks.append(("until server", stamp))
        elif "Beginning flow run" in text and not any(m[0] == "server + flow run" for m in marks):
            marks.append(("server + flow run", stamp))
        elif text.startswith("Task run '") and " - Finished in state" in text:
            step = text.split("'")[1].split(" (")[0]
            marks.append((f"step {step}", stamp))
        elif text.startswith("Flow run '") and " - Finished in state" in text:
            marks.append(("flow end", stamp))
    out: dict[str, float] = {}
    last = started
    for name, stamp in marks:
        out[name] = out.get(name, 0.0) + max(0.0, stamp - last)
        last = stamp
    out["exit"] = max(0.0, ended - last)
    return out


def run(entry: str, args: list[str], env: dict[str, str]) -> dict[str, float]:
    started = time.time()
    done = subprocess.run(
        [sys.executable, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600
    )
    ended = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"{entry} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"total": ended - started, **phases(done.stdout + "\n" + done.stderr, started, ended)}


def import_seconds(module: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - started


def inputs(work: Path) -> None:
    import pandas as pd

    bike = pd.read_csv(BIKE)
    week = bike[(bike.dteday >= "2012-12-17") & (bike.dteday < "2012-12-24")]
    week.to_csv(work / "week.csv", index=False)
    week[["instant", "cnt"]].to_csv(work / "labels.csv", index=False)
    bike[bike.dteday < "2011-06-01"].to_csv(work / "five-months.csv", index=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--entries", nargs="+", choices=ENTRIES, default=list(ENTRIES))
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {e: [] for e in args.entries}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs(work)
        trained = work / "trained"
        base = standalone_env(trained / ".keel", PREFECT_HOME=str(work / "prefect-setup"))
        subprocess.run([sys.executable, *commands(work)["pipeline"]], cwd=ROOT, env=base, check=True,
                       capture_output=True)  # fmt: skip
        subprocess.run(
            [sys.executable, *commands(work)["transform"]],
            cwd=ROOT,
            env=base,
            check=True,
            capture_output=True,
        )  # fmt: skip  (label's predictions)
        for repeat in range(args.repeats):
            for entry in args.entries:
                home = work / f"prefect-{entry}-{repeat}"
                state = work / f"state-{repeat}" / ".keel" if entry == "pipeline" else trained / ".keel"
                env = standalone_env(state, PREFECT_HOME=str(home))
                measured = run(entry, commands(work)[entry], env)
                measured["import"] = import_seconds(MODULES[entry], env)
                runs[entry].append(measured)
                print(f"{entry} #{repeat + 1}: {measured['total']:.1f} s", flush=True)
                shutil.rmtree(home, ignore_errors=True)
    result = {
        "benchmark": "cold_start",
        "command": " ".join(["python -m benchmarks.cold_start", *sys.argv[1:]]),
        "machine": machine(),
        "runs": runs,
    }
    lines = heading("Where the seconds of a cold run go", result)
    lines += [
        "Each run a new process with a new Prefect home and no servers. `import` is timed in a process of its "
        "own and is part of `until server`. Medians (min-max) over the repeats, seconds.",
        "",
    ]
    for entry, measured in runs.items():
        names = list(dict.fromkeys(k for m in measured for k in m if k not in ("total", "import")))
        lines += [f"## {entry}", "", "| phase | seconds | share |", "|---|---|---|"]
        total = statistics.median(m["total"] for m in measured)
        for name in ["import", *names]:
            values = [m.get(name, 0.0) for m in measured]
            median = statistics.median(values)
            lines.append(
                f"| {name} | {median:.2f} ({min(values):.2f}-{max(values):.2f}) | {median / total:.0%} |"
            )
        totals = [m["total"] for m in measured]
        lines += [f"| **total** | **{total:.1f}** ({min(totals):.1f}-{max(totals):.1f}) | |", ""]
    write_results("cold_start", result, "\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
