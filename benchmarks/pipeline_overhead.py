"""Issue #2's measurements: the whole demo vs a plain script, and the cost of one orchestrated step.

    make bench                      # or: .venv/bin/python -m benchmarks.pipeline_overhead --repeats 3

1. `python -m flows.pipeline` (defaults, fresh state each time, as a user runs it: Prefect without a
   server, a 2-worker LocalCluster started for the run) against `benchmarks/plain_script.py`, the
   same work in plain pandas + Optuna + LightGBM; both as new processes, alternating, same machine.
2. One step with everything it does (Prefect task run, MLflow child run, parameters, lineage of a
   dataset input) against calling the bare function, in one flow, many times.
Writes benchmarks/results/pipeline_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout


def whole_pipeline(repeats: int) -> dict:
    pipeline, plain, r2 = [], [], {}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as state:
            env = {**os.environ, "KEEL_STATE_DIR": state, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
            for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "DASK_SCHEDULER_ADDRESS"):
                env.pop(name, None)
            seconds, out = timed([sys.executable, "-m", "flows.pipeline"], env)
            pipeline.append(seconds)
            seconds, out = timed([sys.executable, "-m", "benchmarks.plain_script"], env)
            plain.append(seconds)
            r2["plain"] = json.loads(out)["r2"]
    return {
        "pipeline_s": summary(pipeline),
        "plain_script_s": summary(plain),
        "ratio_median": statistics.median(pipeline) / statistics.median(plain),
        "plain_r2": r2["plain"],
    }


def step_overhead(n: int) -> dict:
    with tempfile.TemporaryDirectory() as state:
        os.environ["KEEL_STATE_DIR"] = state
        from prefect import flow

        from tasks import lineage
        from tasks.refs import DatasetRef, content_digest
        from tasks.settings import get_settings
        from tasks.steps import processing_step

        source = Path(state) / "input.csv"
        source.write_text("a,b\n1,2\n")
        ref = DatasetRef(name="input", uri=str(source), digest=content_digest(str(source)), format="csv")

        def count_rows(data: DatasetRef, factor: int) -> int:
            return len(Path(data.uri).read_text().splitlines()) * factor

        step = processing_step(name="count-rows")(count_rows)

        @flow(name="step-overhead")
        def measure() -> tuple[list[float], list[float]]:
            bare, orchestrated = [], []
            with lineage.pipeline_run("step-overhead", {}, get_settings()):
                step(ref, 1)  # warm-up: imports, first API calls
                for _ in range(n):
                    started = time.perf_counter()
                    count_rows(ref, 1)
                    bare.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    step(ref, 1)
                    orchestrated.append(time.perf_counter() - started)
            return bare, orchestrated

        bare, orchestrated = measure()
    return {
        "bare_ms": summary([b * 1000 for b in bare]),
        "step_ms": summary([o * 1000 for o in orchestrated]),
        "overhead_ms_median": (statistics.median(orchestrated) - statistics.median(bare)) * 1000,
        "n": n,
    }


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def machine() -> dict:
    import importlib.metadata as md

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "python": platform.python_version(),
        **{p: md.version(p) for p in ("prefect", "mlflow", "dask", "lightgbm", "optuna", "pandas")},
    }


def markdown(result: dict) -> str:
    w, s = result["whole_pipeline"], result["step"]
    m = result["machine"]
    return "\n".join(
        [
            f"Machine: {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}; prefect {m['prefect']}, "
            f"mlflow {m['mlflow']}, dask {m['dask']}, lightgbm {m['lightgbm']}. Command: `{result['command']}`",
            "",
            "| measurement | median | min | max | runs |",
            "|---|---|---|---|---|",
            f"| `python -m flows.pipeline` (demo defaults), s | {w['pipeline_s']['median']:.1f} | "
            f"{w['pipeline_s']['min']:.1f} | {w['pipeline_s']['max']:.1f} | {w['pipeline_s']['runs']} |",
            f"| plain pandas + Optuna + LightGBM script, same work, s | {w['plain_script_s']['median']:.1f} | "
            f"{w['plain_script_s']['min']:.1f} | {w['plain_script_s']['max']:.1f} | {w['plain_script_s']['runs']} |",
            f"| ratio pipeline / plain script | {w['ratio_median']:.2f}x | | | |",
            f"| one step (Prefect task + MLflow run + lineage), ms | {s['step_ms']['median']:.1f} | "
            f"{s['step_ms']['min']:.1f} | {s['step_ms']['max']:.1f} | {s['n']} |",
            f"| the bare function, ms | {s['bare_ms']['median']:.3f} | {s['bare_ms']['min']:.3f} | "
            f"{s['bare_ms']['max']:.3f} | {s['n']} |",
            f"| per-step orchestration overhead, ms | {s['overhead_ms_median']:.1f} | | | |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of the whole pipeline and of the script")
    parser.add_argument("--steps", type=int, default=30, help="orchestrated step calls to time")
    args = parser.parse_args()
    result = {
        "command": f"python -m benchmarks.pipeline_overhead --repeats {args.repeats} --steps {args.steps}",
        "machine": machine(),
        "whole_pipeline": whole_pipeline(args.repeats),
        "step": step_overhead(args.steps),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline_overhead.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "pipeline_overhead.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
