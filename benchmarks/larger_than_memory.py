"""B6: the pipeline's processing steps on a dataset 4x larger than a Dask worker's memory limit.

    .venv/bin/python -m benchmarks.larger_than_memory [--worker-memory 1024] [--times 4.2] [--repeats 3]

A Dask cluster of 2 worker processes (1 thread, `--worker-memory` MiB each, enforced by their
nannies) runs `validate-input`, `check-quality` (per-column stats and the exact duplicate-key count)
and `prepare` (window, time split, features learned from train, three Parquet splits written) on
the scaled bike data (`benchmarks.scaled_data`), `--times` as large in memory as one worker's limit,
as 256 Parquet files. The flow runs in this process and reaches the cluster through
`DASK_SCHEDULER_ADDRESS`, as a flow on a shared cluster would.

It must complete with every row accounted for in the splits, and no worker may exceed its limit:
each worker process's peak resident memory (VmHWM) stays below the limit, and no worker was
restarted (Dask's nanny restarts a worker that reaches 95% of it).
Writes benchmarks/results/larger_than_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    go_standalone,
    heading,
    machine,
    peak_rss,
    spread,
    summary,
    target_row,
    write_results,
)
from benchmarks.scaled_data import scaled_bike

MiB = 2**20
FILES = 256


def write_dataset(folder: Path, target_bytes: int) -> dict[str, int]:
    """The scaled table, at least `target_bytes` as a pandas frame, as FILES Parquet files."""
    folder.mkdir(parents=True)
    sample = scaled_bike(100_000)
    per_row = sample.memory_usage(deep=True).sum() / len(sample)
    rows = int(target_bytes / per_row) + 1
    per_file = -(-rows // FILES)
    whole = scaled_bike(rows)
    in_memory = int(whole.memory_usage(deep=True).sum())
    for i in range(FILES):
        whole.iloc[i * per_file : (i + 1) * per_file].to_parquet(
            folder / f"part-{i:03d}.parquet", index=False
        )
    del whole
    return {
        "rows": rows,
        "in_memory_bytes": in_memory,
        "on_disk_bytes": sum(f.stat().st_size for f in folder.iterdir()),
    }


def process(data: Path) -> dict[str, int]:
    """validate-input, check-quality and prepare, as in `flows.pipeline`, in one flow run."""
    from prefect import flow

    from tasks.steps import lineage
    from tasks.steps.compute import dask_cluster
    from tasks.steps.settings import get_settings
    from tasks.tabular.data import TableSpec
    from tasks.tabular.prepare import SplitSpec, prepare, validate_input
    from tasks.tabular.quality import QualityRules, check_quality

    @flow(name="process-larger-than-memory")
    def run() -> dict[str, int]:
        settings = get_settings()
        table = TableSpec(path=str(data), target="cnt", time_column="dteday", key_columns=["dteday", "hr"])
        with (
            lineage.pipeline_run("process-larger-than-memory", {}, settings),
            dask_cluster(settings),
        ):
            raw = validate_input(table)
            check_quality(raw, table.time_column, table.key_columns, None, QualityRules(), [])
            splits = prepare(raw, table, SplitSpec())
        return {s: getattr(splits, s).rows or 0 for s in ("train", "valid", "test")}

    return run()


def measure(worker_memory_mib: int, times: float, repeats: int) -> dict:
    from distributed import Client, LocalCluster

    limit = worker_memory_mib * MiB
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        size = write_dataset(data, int(limit * times))
        for repeat in range(repeats):
            state = Path(tmp) / f"state-{repeat}"
            go_standalone(state)
            with (
                LocalCluster(
                    n_workers=2,
                    threads_per_worker=1,
                    memory_limit=limit,
                    host="127.0.0.1",
                    dashboard_address="127.0.0.1:0",
                ) as cluster,
                Client(cluster) as client,
            ):
                os.environ["DASK_SCHEDULER_ADDRESS"] = cluster.scheduler_address
                before = client.run(os.getpid)
                started = time.perf_counter()
                rows = process(data)
                seconds = time.perf_counter() - started
                after = client.run(os.getpid)
                peaks = {address: peak_rss(pid) or 0 for address, pid in after.items()}
            runs.append(
                {
                    "seconds": seconds,
                    "rows": rows,
                    "worker_peak_bytes": peaks,
                    "restarted": sorted(set(before.items()) ^ set(after.items())),
                }
            )
            print(
                f"repeat {repeat + 1}: {seconds:.1f} s, worker peaks {[round(p / MiB) for p in peaks.values()]} MiB"
            )
    return {"worker_memory_bytes": limit, "data": size, "runs": runs}


def analyse(r: dict) -> dict:
    limit = r["worker_memory_bytes"]
    peak = max(p for run in r["runs"] for p in run["worker_peak_bytes"].values())
    complete = all(sum(run["rows"].values()) == r["data"]["rows"] for run in r["runs"])
    restarts = sum(len(run["restarted"]) for run in r["runs"])
    return {
        "times_limit": r["data"]["in_memory_bytes"] / limit,
        "worker_peak_bytes": peak,
        "complete": complete,
        "restarts": restarts,
        "met": complete and restarts == 0 and peak < limit and r["data"]["in_memory_bytes"] >= 4 * limit,
    }


def markdown(result: dict) -> str:
    r, a = result["result"], result["analysis"]
    d, limit = r["data"], r["worker_memory_bytes"]
    lines = [
        *heading("B6: processing a dataset larger than a worker's memory", result),
        f"Data: {d['rows']:,} rows, {d['in_memory_bytes'] / MiB:,.0f} MiB in memory "
        f"({a['times_limit']:.1f}x a worker's {limit / MiB:.0f} MiB limit), "
        f"{d['on_disk_bytes'] / MiB:,.0f} MiB of Parquet in {FILES} files. "
        "Steps: validate-input, check-quality, prepare; 2 workers x 1 thread.",
        "",
        "| run | wall time | rows: train + valid + test | worker peak memory (VmHWM) | workers restarted |",
        "|---|---|---|---|---|",
    ]
    for i, run in enumerate(r["runs"], 1):
        rows = run["rows"]
        peaks = ", ".join(f"{p / MiB:.0f}" for p in run["worker_peak_bytes"].values())
        lines.append(
            f"| {i} | {run['seconds']:.1f} s | {rows['train']:,} + {rows['valid']:,} + {rows['test']:,} "
            f"= {sum(rows.values()):,} of {d['rows']:,} | {peaks} MiB (limit {limit / MiB:.0f}) | "
            f"{len(run['restarted']) // 2} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker-memory", type=int, default=1024, help="each worker's memory limit, MiB")
    parser.add_argument("--times", type=float, default=4.2, help="data size in memory / a worker's limit")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = {
        "command": f"python -m benchmarks.larger_than_memory --worker-memory {args.worker_memory} "
        f"--times {args.times} --repeats {args.repeats}",
        "machine": machine(),
        "result": measure(args.worker_memory, args.times, args.repeats),
    }
    a = result["analysis"] = analyse(result["result"])
    seconds = summary([run["seconds"] for run in result["result"]["runs"]])
    result["summary"] = [
        target_row(
            "B6",
            f"processing a dataset {a['times_limit']:.1f}x a worker's memory limit",
            f"{spread(seconds)}; all rows in the splits: {'yes' if a['complete'] else 'NO'}",
            f"limit {result['result']['worker_memory_bytes'] / MiB:.0f} MiB per worker",
            f"worker peak {a['worker_peak_bytes'] / MiB:.0f} MiB, {a['restarts'] // 2} restarts",
            "completes, no worker over its limit",
            a["met"],
        )
    ]
    write_results("larger_than_memory", result, markdown(result))


if __name__ == "__main__":
    main()
