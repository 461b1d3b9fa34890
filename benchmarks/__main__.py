"""Every benchmark (B1-B8 of issue 5, B9-B12 of issue 12, B13-B15 of issue 16, B16-B19 of issue 17) on this machine, one after another; one table of the results.

    make bench                          # = .venv/bin/python -m benchmarks
    .venv/bin/python -m benchmarks --only step_overhead drift_check
    .venv/bin/python -m benchmarks --table-only      # rebuild the table from the stored results

Each benchmark runs as its own process (so none inherits another's imports, memory or settings)
and writes benchmarks/results/<name>.{json,md} with its details. This writes the summary,
benchmarks/results/bench.{md,json}: per target, our figure, what it is compared with (measured
side by side in the same run), the ratio, the target and whether it is met. The whole run takes
about an hour and a half on 2 cores; B2 (three repeats of the 1M-row pipeline runs and the script) takes half of it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime

from benchmarks.common import RESULTS, ROOT, machine, machine_line, write_results

TIMEOUT_S = 3600
BENCHMARKS = {  # module -> the targets it measures
    "step_overhead": "B1",
    "pipeline_vs_script": "B2, B3, B8",
    "drift_check": "B4",
    "event_latency": "B5",
    "larger_than_memory": "B6",
    "parallel_trials": "B7",
    "retrain_policies": "B9, B10, B11",
    "calibration_cost": "B12",
    "transform_vs_script": "B13",
    "serving_latency": "B14",
    "approval_latency": "B15",
    "fixed_cost": "B16, B17, B18, B19",
}


def run(names: list[str]) -> dict[str, float | str]:
    """Run each benchmark module; its wall time, or the end of its error output if it failed."""
    outcome: dict[str, float | str] = {}
    for name in names:
        print(f"== {name} ({BENCHMARKS[name]})", flush=True)
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", f"benchmarks.{name}"],
                cwd=ROOT,
                stderr=subprocess.PIPE,
                text=True,
                timeout=TIMEOUT_S,
                check=False,  # a failed benchmark is reported in the table, the others still run
            )
        except subprocess.TimeoutExpired:
            outcome[name] = f"failed: no result within {TIMEOUT_S} s"
            continue
        if proc.returncode == 0:
            outcome[name] = time.perf_counter() - started
        else:
            outcome[name] = f"failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
            print(proc.stderr[-3000:], file=sys.stderr)
    return outcome


def table(outcome: dict[str, float | str]) -> tuple[str, dict]:
    rows, commands = [], {}
    for name, bench_id in BENCHMARKS.items():
        path = RESULTS / f"{name}.json"
        if isinstance(outcome.get(name), str) or not path.exists():
            why = outcome.get(name, "not run yet")
            rows.append(
                {
                    "id": bench_id,
                    "what": name,
                    "ours": why,
                    "compared": "",
                    "value": "",
                    "target": "",
                    "met": False,
                }
            )
            continue
        stored = json.loads(path.read_text())
        rows += stored["summary"]
        commands[name] = stored["command"]
    lines = [
        "# Benchmarks",
        "",
        machine_line(machine())
        + f" Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python -m benchmarks`.",
        "Medians of several runs, min-max in brackets. Details: `benchmarks/results/<name>.md`.",
        "",
        "| id | what | ours | compared with | result | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['id']} | {r['what']} | {r['ours']} | {r['compared']} | {r['value']} | {r['target']} | "
            f"{'yes' if r['met'] else '**no**'} |"
        )
    lines += ["", "Commands (each writes its own details):", ""]
    lines += [f"- {BENCHMARKS[name]}: `{command}`" for name, command in commands.items()]
    return "\n".join(lines), {"machine": machine(), "rows": rows, "commands": commands, "outcome": outcome}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--table-only", action="store_true", help="only rebuild bench.md from stored results")
    args = parser.parse_args()
    outcome = {} if args.table_only else run(args.only)
    markdown, result = table(outcome)
    write_results("bench", result, markdown)
    return 0 if all(r["met"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
