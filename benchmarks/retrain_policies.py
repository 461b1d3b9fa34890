"""B9, B10, B11: retrain policies on the bike data and on stationary synthetic streams, through
`python -m flows.backtest` as a user runs it (each run a new process on a fresh state directory).

    .venv/bin/python -m benchmarks.retrain_policies [--repeats 3]

- B11: the bike backtest, weekly batches, all 7 policies, label delay 0, timed `--repeats` times.
- B10: from that run and one with `--label-delay 7D`: the default policy against `always` and `never`
  (its mean weekly RMSE relative to always's, its retrains as a share of always's). For context the
  fixed-schedule frontier (schedule:2, schedule:4, schedule:8) and a hindsight oracle: the lowest mean
  error any choice of retrain batches could reach with the same number of retrains, from the error
  of every model (one per training window, the backtest's own) on every later batch. The oracle
  knows the future; a policy does not. It shows how much room a policy has, not a policy.
- B9: the default policy's alarms on batches inside the initial training window, bike weekly with
  initial windows of 90, 180 and 365 days; and its alarms on every batch of stationary synthetic
  streams (tests/streams.py, 420 days, seeds 1-3), where every alarm is false.
Writes benchmarks/results/retrain_policies.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    ROOT,
    heading,
    machine,
    spread,
    standalone_env,
    summary,
    target_row,
    timed,
    write_results,
)
from tasks.monitoring.policies import DEFAULT_POLICY
from tests.streams import stream

BIKE = ROOT / "data" / "bike_sharing_hourly.csv"
SYNTHETIC = ("--target", "y", "--time-column", "time", "--drop-columns", "--initial-days", "60")


PEAKS: list[int] = []  # the flow process's peak resident memory, per bike backtest of B11


def backtest(state: Path, *args: str) -> tuple[float, dict]:
    """One backtest as a new process; its wall time and its results.json."""
    run = timed([sys.executable, "-m", "flows.backtest", *args], standalone_env(state), timeout=3600)
    PEAKS.append(run.peak_rss)
    found = re.search(r"^Picture:\s+file://(\S+)/metric_over_time\.png", run.stdout, re.MULTILINE)
    if not found:
        raise RuntimeError(f"no results in the backtest's output:\n{run.stdout[-2000:]}")
    return run.seconds, json.loads((Path(found.group(1)) / "results.json").read_text())


def by_policy(results: dict) -> dict[str, dict]:
    return {p["policy"]: p for p in results["policies"]}


def oracle(results: dict) -> dict[int, float]:
    """The lowest mean error with at most R retrains, for every R, knowing every model's error on every
    later batch: the backtest's own windows, parameters and trees, no gate (the oracle keeps a model
    only where it pays)."""
    from datetime import timedelta

    import numpy as np
    import pandas as pd
    from distributed import Client, LocalCluster

    from tasks.monitoring.backtest import fit_window, load_table, plan_batches
    from tasks.monitoring.calibration import parse_chunk
    from tasks.monitoring.performance import realized_sums
    from tasks.monitoring.worker import BoosterModel
    from tasks.tabular.data import TableSpec
    from tasks.tabular.prepare import SplitSpec

    table = TableSpec(
        path=str(BIKE), target="cnt", time_column="dteday", drop_columns=["instant", "casual", "registered"]
    )
    frame = load_table(pd.read_csv(BIKE), table, str(BIKE))
    every = parse_chunk("7D")
    initial_end = (frame.dteday.iloc[0].normalize() + timedelta(days=90)).to_pydatetime()
    batches, _ = plan_batches(frame.dteday.to_numpy(), initial_end, every, str(BIKE), timedelta(0))
    ends = [batches[0].start] + [b.end for b in batches[:-1]]
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        shared = client.scatter(frame, broadcast=True)
        futures = [
            client.submit(
                fit_window, shared, end, None, table, "regression", SplitSpec(), results["tuned_params"],
                results["num_boost_round"], 42, every, 1, pure=False,
            )
            for end in ends
        ]  # fmt: skip
        models = client.gather(futures)
    rows = [frame.iloc[b.lo : b.hi] for b in batches]
    n = len(batches)
    error = np.full((n, n), np.nan)  # error[k, t]: model k (trained before batch k) on batch t >= k
    for k, model in enumerate(models):
        predictor = BoosterModel(model.model_text, model.spec)
        for t in range(k, n):
            sums = realized_sums(
                rows[t]["cnt"].reset_index(drop=True), predictor.predict(rows[t]), model.spec
            )
            error[k, t] = sums.realized("regression")["rmse"]
    best: dict[tuple[int, int], float] = {(0, 0): 0.0}  # (retrains, model in service) -> total error so far
    for t in range(n):
        nxt: dict[tuple[int, int], float] = {}
        for (r, k), total in best.items():
            served = total + error[k, t]
            for key in ((r, k), (r + 1, t + 1)) if t + 1 < n else ((r, k),):
                if served < nxt.get(key, np.inf):
                    nxt[key] = served
        best = nxt
    frontier: dict[int, float] = {}
    for (r, _), total in best.items():
        frontier[r] = min(frontier.get(r, np.inf), total / n)
    running = np.inf
    return {r: (running := min(running, frontier[r])) for r in sorted(frontier)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="Timed runs of the weekly bike backtest (B11)."
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="keel-policies-"))
    times, runs = [], []
    for i in range(args.repeats):
        seconds, results = backtest(work / f"bike-{i}", "--data", str(BIKE))
        times.append(seconds)
        runs.append(results)
        print(f"bike backtest {i + 1}/{args.repeats}: {seconds:.1f} s", flush=True)
    delay0 = by_policy(runs[0])
    _, delayed = backtest(work / "bike-delay", "--data", str(BIKE), "--label-delay", "7D")
    delay7 = by_policy(delayed)
    _, frontier_run = backtest(
        work / "bike-schedules", "--data", str(BIKE), "--policies", "schedule:2", "schedule:8"
    )
    schedules = {**by_policy(frontier_run), "schedule:4": delay0["schedule:4"]}
    inside = {90: (delay0[DEFAULT_POLICY]["false_alarms"], delay0[DEFAULT_POLICY]["inside_batches"])}
    for days in (180, 365):
        _, results = backtest(
            work / f"bike-{days}",
            "--data",
            str(BIKE),
            "--initial-days",
            str(days),
            "--policies",
            DEFAULT_POLICY,
        )
        policy = by_policy(results)[DEFAULT_POLICY]
        inside[days] = (policy["false_alarms"], policy["inside_batches"])
    synthetic = {}
    for seed in (1, 2, 3):
        path = work / f"stationary-{seed}.csv"
        stream("stationary", days=420, seed=seed).to_csv(path, index=False)
        _, results = backtest(
            work / f"stationary-{seed}",
            "--data",
            str(path),
            *SYNTHETIC,
            "--policies",
            DEFAULT_POLICY,
            "calibrated-drift",
            "drift",
        )
        synthetic[seed] = {
            name: (p["alarms"] + (p["false_alarms"] or 0), len(p["scores"]) + p["inside_batches"])
            for name, p in by_policy(results).items()
        }
    best = oracle(runs[0])
    always_mean = delay0["always"]["mean"]

    def ratio(p: dict) -> float:
        return p["mean"] / always_mean

    rows = []
    t = summary(times)
    peak = max(PEAKS[: args.repeats]) / 2**20
    rows.append(
        target_row(
            "B11",
            "bike backtest, weekly, all 7 policies, 2 cores (new process)",
            spread(t),
            f"the flow process's peak memory {peak:.0f} MiB (17k rows, 91 models)",
            f"{t['median']:.0f} s median",
            "<= 5 minutes",
            t["max"] <= 300,
        )
    )
    for delay, found in (("0", delay0), ("7D", delay7)):
        default, always, never = found[DEFAULT_POLICY], found["always"], found["never"]
        rel = default["mean"] / always["mean"]
        share = default["retrains"] / always["retrains"]
        rows.append(
            target_row(
                "B10",
                f"bike backtest, weekly, label delay {delay}: default policy ({DEFAULT_POLICY})",
                f"mean RMSE {default['mean']:.2f}, {default['retrains']} retrains",
                f"always {always['mean']:.2f} ({always['retrains']} retrains); never {never['mean']:.2f}",
                f"{rel:.3f}x always, {share:.0%} of its retrains, {default['mean'] / never['mean']:.3f}x never",
                "<= 1.02x always, <= 25% of its retrains, better than never",
                rel <= 1.02 and share <= 0.25 and default["mean"] < never["mean"],
            )
        )
    alarms = sum(a for a, _ in inside.values())
    batches = sum(n for _, n in inside.values())
    rows.append(
        target_row(
            "B9",
            f"false alarms of the default policy ({DEFAULT_POLICY}), bike weeks inside the initial window",
            f"{alarms} of {batches} ({alarms / batches:.1%})",
            ", ".join(f"{d}-day window: {a} of {n}" for d, (a, n) in inside.items()),
            f"{alarms / batches:.1%}",
            "<= 5%",
            alarms / batches <= 0.05,
        )
    )
    s_alarms = sum(v[DEFAULT_POLICY][0] for v in synthetic.values())
    s_batches = sum(v[DEFAULT_POLICY][1] for v in synthetic.values())
    old = sum(v["drift"][0] for v in synthetic.values())
    rows.append(
        target_row(
            "B9",
            f"false alarms of the default policy ({DEFAULT_POLICY}), stationary synthetic streams (every batch)",
            f"{s_alarms} of {s_batches} ({s_alarms / s_batches:.1%})",
            f"Evidently's fixed rule (policy drift): {old} of {s_batches} ({old / s_batches:.1%})",
            f"{s_alarms / s_batches:.1%}",
            "<= 5%",
            s_alarms / s_batches <= 0.05,
        )
    )
    result = {
        "machine": machine(),
        "command": "python -m benchmarks.retrain_policies"
        + (f" --repeats {args.repeats}" if args.repeats != 3 else ""),
        "summary": rows,
        "backtest_seconds": times,
        "backtest_peak_rss": PEAKS[: args.repeats],
        "delay0": delay0,
        "delay7": delay7,
        "schedules": {k: {"mean": v["mean"], "retrains": v["retrains"]} for k, v in schedules.items()},
        "inside": {str(k): v for k, v in inside.items()},
        "synthetic": {str(k): v for k, v in synthetic.items()},
        "oracle": {str(k): v for k, v in best.items()},
    }
    lines = heading("B9, B10, B11: retrain policies (bike data and stationary synthetic streams)", result)
    lines += ["| id | what | ours | compared with | result | target | met |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['id']} | {r['what']} | {r['ours']} | {r['compared']} | {r['value']} | {r['target']} | {'yes' if r['met'] else '**no**'} |"
        for r in rows
    ]
    lines += [
        "",
        "Every policy on the bike data, weekly (mean RMSE of the model in service, relative to always):",
        "",
    ]
    lines += [
        "| policy | label delay 0 | retrains | label delay 7D | retrains | false alarms (90-day window) |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(delay0, key=lambda p: delay0[p]["mean"]):
        a, b = delay0[name], delay7[name]
        false = "n/a" if a["false_alarms"] is None else f"{a['false_alarms']} of {a['inside_batches']}"
        lines.append(
            f"| {name} | {ratio(a):.3f} | {a['retrains']} | {b['mean'] / delay7['always']['mean']:.3f} | {b['retrains']} | {false} |"
        )
    lines += [
        "",
        "The fixed-schedule frontier and the hindsight oracle (label delay 0, relative to always):",
        "",
    ]
    lines += ["| retrains | fixed schedule | oracle (knows the future) |", "|---|---|---|"]
    for name in ("schedule:2", "schedule:4", "schedule:8"):
        r = schedules[name]["retrains"]
        lines.append(
            f"| {r} ({name}) | {schedules[name]['mean'] / always_mean:.3f} | {best[max(k for k in best if k <= r)] / always_mean:.3f} |"
        )
    r = delay0[DEFAULT_POLICY]["retrains"]
    lines.append(
        f"| {r} ({DEFAULT_POLICY}: {ratio(delay0[DEFAULT_POLICY]):.3f}) | | {best[max(k for k in best if k <= r)] / always_mean:.3f} |"
    )
    write_results("retrain_policies", result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
