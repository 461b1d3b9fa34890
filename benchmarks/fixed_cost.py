"""B16-B19 (issue 17): the fixed cost of a small run, cold and warm, against plain scripts.

    .venv/bin/python -m benchmarks.fixed_cost [--repeats 3]

Every command a new process, in two phases, each side by side with the plain scripts in every
repeat. First the cold runs, with nothing else running (a user's first run has no pool beside it):
- `plain monitor`: `benchmarks.plain_monitor` (load the champion, predict the week and the training
  rows, Evidently's DataDriftPreset report as HTML);
- `monitor cold` (B16): `python -m flows.monitor` on the same week (168 rows): a new Prefect home,
  no servers, as a user's first run after `make install`;
- `plain pipeline`: `benchmarks.plain_script` (pandas + Optuna + LightGBM, the demo's trials, split
  and features);
- `pipeline cold` (B18): `python -m flows.pipeline` (`make demo`) on a new state directory and a new
  Prefect home, no servers.
Then both pools are started by an untimed run each (and a second untimed run each, as the runner
imports what the first one used), and, with them up, the plain scripts again (`..., pools up`)
beside:
- `monitor warm` (B17): the same monitor with `KEEL_WARM_POOL=10m` (the pool's runner,
  `infra/runner.py`, takes each timed command);
- `pipeline warm` (B19): the same work with the warm pool: `--force-steps all` on a kept state
  directory (every step runs again; without it every step would be reused).

The champion the monitor checks is trained once before the repeats (not timed). Each run's CPU
time is measured too (`timed`): on 2 cores it bounds the wall time from below. Writes
benchmarks/results/fixed_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
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
from benchmarks.scaled_data import BIKE

MODEL = "bike-demand"  # the demo's model name
TARGETS = {"B16": 1.5, "B17": 0.5, "B18": 1.5, "B19": 1.1}
POOL = {"KEEL_WARM_POOL": "10m"}
RUNS = (
    "plain monitor",
    "monitor cold",
    "plain pipeline",
    "pipeline cold",
    "plain monitor, pools up",
    "monitor warm",
    "plain pipeline, pools up",
    "pipeline warm",
)


def week(work: Path) -> Path:
    import pandas as pd

    bike = pd.read_csv(BIKE)
    path = work / "week.csv"
    bike[(bike.dteday >= "2012-12-17") & (bike.dteday < "2012-12-24")].to_csv(path, index=False)
    return path


def training_rows(state: Path) -> Path:
    """The champion's training split, as the pipeline's prepare step wrote it."""
    [found] = sorted(state.glob("datasets/*/prepare/train"))
    return found


def commands(work: Path, state: Path) -> dict[str, list[str]]:
    batch = work / "week.csv"
    return {
        "plain monitor": ["-m", "benchmarks.plain_monitor", f"models:/{MODEL}@champion", str(training_rows(state)),
                          str(batch), str(work / "plain-report.html")],
        "monitor": ["-m", "flows.monitor", "--batch", str(batch), "--model-name", MODEL],
        "plain pipeline": ["-m", "benchmarks.plain_script"],
        "pipeline": ["-m", "flows.pipeline"],
    }  # fmt: skip


def measure(repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Two phases, each side by side with the plain scripts: the cold runs with nothing else running
    (a user's first run has no pool beside it), then the warm runs with both pools up. The wall
    seconds and the CPU seconds of every run."""
    times: dict[str, list[float]] = {name: [] for name in RUNS}
    cpu: dict[str, list[float]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        week(work)
        trained, kept = work / "trained" / ".keel", work / "kept" / ".keel"
        timed(
            [sys.executable, "-m", "flows.pipeline"], standalone_env(trained, PREFECT_HOME=str(work / "ph-t"))
        )
        cmd = {name: [sys.executable, *args] for name, args in commands(work, trained).items()}
        mlflow = {"MLFLOW_TRACKING_URI": f"sqlite:///{trained / 'mlflow.db'}"}

        def plain(name: str, repeat: int) -> tuple[list[str], dict[str, str]]:
            env = standalone_env(work / "plain", PREFECT_HOME=str(work / f"ph-{repeat}"))
            return cmd[name], {**env, **mlflow} if name == "plain monitor" else env

        def run(name: str, args: list[str], env: dict[str, str]) -> None:
            done = timed(args, env)
            times[name].append(done.seconds)
            cpu[name].append(done.cpu_seconds)

        for repeat in range(repeats):
            run("plain monitor", *plain("plain monitor", repeat))
            run(
                "monitor cold",
                cmd["monitor"],
                standalone_env(trained, PREFECT_HOME=str(work / f"ph-m{repeat}")),
            )
            run("plain pipeline", *plain("plain pipeline", repeat))
            new_state = standalone_env(
                work / f"new-{repeat}" / ".keel", PREFECT_HOME=str(work / f"ph-p{repeat}")
            )
            run("pipeline cold", cmd["pipeline"], new_state)
            print(f"cold repeat {repeat + 1}: " + _last(times), flush=True)

        warm_monitor = standalone_env(trained, PREFECT_HOME=str(work / "ph-warm"), **POOL)
        warm_pipeline = standalone_env(kept, PREFECT_HOME=str(work / "ph-warm"), **POOL)
        timed(cmd["monitor"], warm_monitor)  # starts the pool of `trained`
        timed(cmd["pipeline"], warm_pipeline)  # the state `--force-steps all` reruns; starts its pool
        # Each run teaches the pool's runner what it imported, which the runner then imports: once
        # more each, untimed, so the first timed run does not meet a runner still importing.
        timed(cmd["monitor"], warm_monitor)
        timed([*cmd["pipeline"], "--force-steps", "all"], warm_pipeline)
        try:
            for repeat in range(repeats):
                run("plain monitor, pools up", *plain("plain monitor", repeat))
                run("monitor warm", cmd["monitor"], warm_monitor)
                run("plain pipeline, pools up", *plain("plain pipeline", repeat))
                run("pipeline warm", [*cmd["pipeline"], "--force-steps", "all"], warm_pipeline)
                print(f"warm repeat {repeat + 1}: " + _last(times), flush=True)
        finally:
            for state in (trained, kept):
                timed(
                    [sys.executable, "-m", "infra.pool", "down", "--home", str(state / "pool")],
                    standalone_env(state),
                )
    return times, cpu


def _last(times: dict[str, list[float]]) -> str:
    return ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items() if v)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times, cpu = measure(args.repeats)
    s = {name: summary(values) for name, values in times.items()}
    c = {name: summary(values) for name, values in cpu.items()}
    ratios = {
        "B16": ("monitor cold", "plain monitor"),
        "B17": ("monitor warm", "plain monitor, pools up"),
        "B18": ("pipeline cold", "plain pipeline"),
        "B19": ("pipeline warm", "plain pipeline, pools up"),
    }
    what = {
        "B16": "flows.monitor, one week (168 rows), new process, embedded, cold",
        "B17": "the same with the warm pool (KEEL_WARM_POOL=10m)",
        "B18": "make demo's pipeline (17k rows), new process, new Prefect home and state",
        "B19": "the same work with the warm pool (--force-steps all on a kept state)",
    }
    rows = []
    for bench, (ours, plain) in ratios.items():
        ratio = statistics.median(times[ours]) / statistics.median(times[plain])
        rows.append(
            target_row(
                bench,
                what[bench],
                spread(s[ours]),
                f"{plain} script {spread(s[plain])}",
                f"{ratio:.2f}x",
                f"<= {TARGETS[bench]}x",
                ratio <= TARGETS[bench],
            )
        )
    result = {
        "command": f"python -m benchmarks.fixed_cost --repeats {args.repeats}",
        "machine": machine(),
        "seconds": s,
        "cpu_seconds": c,
        "runs": times,
        "cpu_runs": cpu,
        "summary": rows,
    }
    lines = [
        *heading("B16-B19: the fixed cost of a small run, cold and warm", result),
        "Every figure a new process; side by side in each repeat. Seconds: median (min-max, runs). CPU: user +",
        "system seconds of the command and of the processes it started and waited for (a cold run's temporary",
        "Prefect server, its Dask workers); a warm run's work is done by the pool's processes, which are not",
        "counted, so its CPU is the client's only. The machine has 2 cores: a run cannot take less wall time",
        "than half its CPU time.",
        "",
        "| run | seconds | CPU seconds |",
        "|---|---|---|",
        *(f"| {name} | {spread(v)} | {spread(c[name])} |" for name, v in s.items()),
        "",
        "| id | what | ours | compared with | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['id']} | {r['what']} | {r['ours']} | {r['compared']} | {r['value']} | {r['target']} | "
            f"{'yes' if r['met'] else 'no'} |"
            for r in rows
        ),
    ]
    write_results("fixed_cost", result, "\n".join(lines))


if __name__ == "__main__":
    main()
