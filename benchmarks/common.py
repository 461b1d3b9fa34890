"""What every benchmark shares: summaries, the machine record, timed child processes, result files."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VERSIONS = ("prefect", "mlflow", "dask", "lightgbm", "optuna", "pandas", "pyarrow", "evidently")
SERVER_VARIABLES = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "DASK_SCHEDULER_ADDRESS")


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the number of runs: how every benchmark reports a measurement."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def spread(s: dict[str, float], unit: str = "s", digits: int = 1) -> str:
    """'12.3 s (11.0-14.2, 3 runs)'."""
    return f"{s['median']:.{digits}f} {unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f}, {s['runs']} runs)"


def machine() -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "python": platform.python_version(),
        **{p: md.version(p) for p in VERSIONS},
    }


def machine_line(m: dict) -> str:
    versions = ", ".join(f"{p} {m[p]}" for p in VERSIONS if p in m)
    return f"Machine: {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}; {versions}."


def heading(title: str, result: dict) -> list[str]:
    """The first lines of a benchmark's markdown: its title, then the machine, versions and command."""
    return ["# " + title, "", machine_line(result["machine"]) + f" Command: `{result['command']}`", ""]


def standalone_env(state: Path | str, **extra: str) -> dict[str, str]:
    """The environment of a user's first run: no servers (embedded MLflow, Prefect without a server,
    a LocalCluster), everything under `state`."""
    env = {**os.environ, "KEEL_STATE_DIR": str(state), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}
    for name in SERVER_VARIABLES:
        env.pop(name, None)
    return env


def go_standalone(state: Path | str) -> None:
    """This process's environment becomes `standalone_env(state)` (for benchmarks that run flows in-process)."""
    env = standalone_env(state)
    os.environ.clear()
    os.environ.update(env)


@dataclass
class Timed:
    seconds: float
    stdout: str
    peak_rss: int  # bytes: the highest resident set of the process itself (not its children)
    cpu_seconds: float  # user + system time of the process and of the children it waited for


def _children_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def peak_rss(pid: int) -> int | None:
    """The process's resident-set high-water mark (VmHWM), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def timed(cmd: list[str], env: dict[str, str], timeout: float = 3600) -> Timed:
    """Run a command from the project root; its wall time, output, own peak memory and CPU time
    (with its children's: a process started in the background and left running, such as a warm
    pool, is not counted). Output goes to files, not pipes: a chatty process would block on a full
    pipe while its memory is polled."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        cpu_before = _children_cpu()  # commands run one at a time: the difference is this one's
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        peak = 0
        try:
            while proc.poll() is None:
                peak = max(peak, peak_rss(proc.pid) or 0)
                if time.perf_counter() - started > timeout:
                    raise TimeoutError(f"{' '.join(cmd)} took more than {timeout:.0f} s")
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        elapsed = time.perf_counter() - started
        cpu = _children_cpu() - cpu_before
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return Timed(elapsed, stdout, peak, cpu)


def write_results(name: str, result: dict, markdown: str) -> None:
    """benchmarks/results/<name>.json and .md; the markdown is printed too."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)


def target_row(
    bench: str, what: str, ours: str, compared: str, value: str, target: str, met: bool
) -> dict[str, str | bool]:
    """One line of the summary table that `python -m benchmarks` writes."""
    return {
        "id": bench,
        "what": what,
        "ours": ours,
        "compared": compared,
        "value": value,
        "target": target,
        "met": met,
    }


def stack(home: Path, command: str, *extra: str) -> str:
    """`python -m infra.stack COMMAND --home HOME ...`; its output."""
    import sys

    return subprocess.run(
        [sys.executable, "-m", "infra.stack", command, "--home", str(home), *extra],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@contextmanager
def local_stack() -> Iterator[tuple[dict[str, str], float]]:
    """The local stack up in a temporary folder on free ports, its settings in `os.environ`: its
    environment and how long `up` took. Stopped afterwards, and `os.environ` put back (what a
    benchmark runs next must not meet a stopped stack's addresses and credentials)."""
    from infra.processes import free_port
    from infra.stack import Stack
    from tasks.steps.environ import environment_restored

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "stack"
        ports = [
            a
            for n in ("prefect", "mlflow", "dask", "dask-dashboard")
            for a in (f"--{n}-port", str(free_port()))
        ]
        started = time.perf_counter()
        stack(home, "up", *ports)
        up_seconds = time.perf_counter() - started
        env = Stack(home).recorded_env()
        with environment_restored(env):
            try:
                os.environ.update(env)
                yield env, up_seconds
            finally:
                stack(home, "down")
