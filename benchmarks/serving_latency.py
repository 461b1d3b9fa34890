"""B14: the champion's scoring server (`deployments.serving`), one row per request, against
`mlflow.pyfunc` predicting the same row in process; and batch throughput.

    .venv/bin/python -m benchmarks.serving_latency [--requests 300] [--batch-rows 1000] [--batches 20]

In a fresh state directory (embedded MLflow), trains a model on the bike data (`flows.pipeline`, 2
trials), starts `python -m deployments.serving` on a free port and waits for `/ping`. Then, one
after another over one keep-alive HTTP connection, `--requests` requests of one row (the same
row, as `dataframe_split`), each timed from send to parsed answer; and in this process the same
row through `mlflow.pyfunc.load_model(...).predict` as many times. Then `--batches` requests of
`--batch-rows` rows, and the same frames in process: rows per second. Stops the server.
Writes benchmarks/results/serving_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, heading, machine, standalone_env, target_row, timed, write_results
from benchmarks.scaled_data import BIKE

MODEL = "b14-bike"
P50_MS, P99_MS, RATIO = 20.0, 100.0, 5.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--batch-rows", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    import httpx
    import pandas as pd

    from infra.processes import free_port

    with tempfile.TemporaryDirectory() as tmp:
        env = standalone_env(Path(tmp) / "state")
        timed(
            [sys.executable, "-m", "flows.pipeline", "--data", str(BIKE), "--model-name", MODEL, "--n-trials", "2",
             "--target", "cnt", "--time-column", "dteday", "--key-columns", "dteday", "hr",
             "--drop-columns", "instant", "casual", "registered"],
            env,
        )  # fmt: skip
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "deployments.serving", "--model-name", MODEL, "--port", str(port)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=url, timeout=60) as http:
                deadline = time.monotonic() + 180
                while True:
                    try:
                        if http.get("/ping").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError("the scoring server did not answer")
                    time.sleep(0.5)
                bike = pd.read_csv(BIKE)
                row = bike.iloc[[5000]]
                batch = bike.sample(args.batch_rows, random_state=0, replace=len(bike) < args.batch_rows)

                def body(frame: pd.DataFrame) -> dict:
                    return {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}

                one = body(row)
                http.post("/invocations", json=one).raise_for_status()  # warm
                served = []
                for _ in range(args.requests):
                    started = time.perf_counter()
                    http.post("/invocations", json=one).raise_for_status().json()
                    served.append((time.perf_counter() - started) * 1000)
                many = body(batch)
                started = time.perf_counter()
                for _ in range(args.batches):
                    http.post("/invocations", json=many).raise_for_status().json()
                served_rows_s = args.batches * len(batch) / (time.perf_counter() - started)
            in_process, in_process_rows_s = local_figures(env, row, batch, args)
        finally:
            server.terminate()
            server.wait(60)
    write(served, in_process, served_rows_s, in_process_rows_s, args)


def local_figures(env: dict[str, str], row, batch, args) -> tuple[list[float], float]:
    """The same row and batches through mlflow.pyfunc in this process."""
    import mlflow

    os.environ.update({k: v for k, v in env.items() if k.startswith("KEEL_")})
    from tasks.steps.lineage import mlflow_client
    from tasks.steps.settings import get_settings

    mlflow_client(get_settings())
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    model.predict(row)
    times = []
    for _ in range(args.requests):
        started = time.perf_counter()
        model.predict(row)
        times.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    for _ in range(args.batches):
        model.predict(batch)
    return times, args.batches * len(batch) / (time.perf_counter() - started)


def write(served: list[float], local: list[float], served_rows_s: float, local_rows_s: float, args) -> None:
    p50, p99, local_p50 = percentile(served, 50), percentile(served, 99), statistics.median(local)
    ratio = p50 / local_p50
    result = {
        "command": f"python -m benchmarks.serving_latency --requests {args.requests} "
        f"--batch-rows {args.batch_rows} --batches {args.batches}",
        "machine": machine(),
        "served_ms": {
            "p50": p50,
            "p99": p99,
            "min": min(served),
            "max": max(served),
            "requests": len(served),
        },
        "in_process_ms": {"p50": local_p50, "p99": percentile(local, 99)},
        "served_rows_per_s": served_rows_s,
        "in_process_rows_per_s": local_rows_s,
        "summary": [
            target_row(
                "B14",
                "scoring server, 1 row, sequential requests (deployments.serving, keep-alive)",
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(served)} requests)",
                f"in-process pyfunc.predict p50 {local_p50:.1f} ms; batches of {args.batch_rows:,}: "
                f"{served_rows_s:,.0f} rows/s served, {local_rows_s:,.0f} in process",
                f"p50 {ratio:.1f}x in-process",
                f"p50 <= {P50_MS:.0f} ms and <= {RATIO:.0f}x, p99 <= {P99_MS:.0f} ms",
                p50 <= P50_MS and ratio <= RATIO and p99 <= P99_MS,
            )
        ],
    }
    lines = [
        *heading("B14: the scoring server against in-process predictions", result),
        "| | p50 | p99 | min | max |",
        "|---|---|---|---|---|",
        f"| one row over HTTP | {p50:.1f} ms | {p99:.1f} ms | {min(served):.1f} ms | {max(served):.1f} ms |",
        f"| one row, pyfunc.predict in process | {local_p50:.1f} ms | {percentile(local, 99):.1f} ms | "
        f"{min(local):.1f} ms | {max(local):.1f} ms |",
        "",
        f"Batches of {args.batch_rows:,} rows: {served_rows_s:,.0f} rows/s over HTTP, "
        f"{local_rows_s:,.0f} rows/s in process.",
    ]
    write_results("serving_latency", result, "\n".join(lines))


if __name__ == "__main__":
    main()
