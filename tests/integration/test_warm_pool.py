"""The warm pool (`KEEL_WARM_POOL`, infra/pool.py): real runs, a real Prefect server and Dask cluster.

Runs of `python -m tests.pool_pipeline` as new processes: the first starts the pool, the next use it
(the same Prefect server, the same worker processes, run by the pool's runner); the pool shows in
`infra.stack status`, stops by itself when idle, loses nothing when it dies, and restarts its
workers and its runner when the code changed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from infra.processes import pid_running
from tests.conftest import ROOT, clean_env

pytestmark = [pytest.mark.integration, pytest.mark.servers, pytest.mark.slow]


def launch(env: dict[str, str], data: Path) -> subprocess.CompletedProcess[str]:
    """`python -m tests.pool_pipeline` as a new process."""
    return subprocess.run(
        [sys.executable, "-m", "tests.pool_pipeline", "--data", str(data)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def run(env: dict[str, str], data: Path) -> dict[str, str]:
    done = launch(env, data)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def pool_cmd(home: Path, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "infra.pool", *args, "--home", str(home)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout


def flow_runs(home: Path) -> set[str]:
    env = json.loads((home / "pool-env.json").read_text())
    user, _, password = env["PREFECT_API_AUTH_STRING"].partition(":")
    answer = httpx.post(
        f"{env['PREFECT_API_URL']}/flow_runs/filter", json={}, auth=(user, password), timeout=30
    )
    answer.raise_for_status()
    return {r["id"] for r in answer.json()}


def processes(home: Path) -> dict[str, list[int]]:
    state = json.loads((home / "stack.json").read_text())
    found: dict[str, list[int]] = {}
    for entry in state["processes"]:
        found.setdefault(entry["name"], []).append(entry["pid"])
    return found


@pytest.fixture
def pool_env(tmp_path):
    state = tmp_path / ".keel"
    data = tmp_path / "small.csv"
    data.write_text("a,b\n1,2\n")
    env = clean_env(KEEL_STATE_DIR=str(state), KEEL_WARM_POOL="25s", PREFECT_HOME=str(tmp_path / "prefect"))
    yield env, data, state / "pool"
    if (state / "pool" / "stack.json").exists():
        pool_cmd(state / "pool", "down")


def wait_for_runner(home: Path) -> None:
    """The runner takes commands once it has imported what the first run named (a few seconds)."""
    deadline = time.monotonic() + 120
    while not (home / "runner-socket").exists():
        assert time.monotonic() < deadline, (home / "logs" / "runner.log").read_text()[-3000:]
        time.sleep(0.2)


def test_runs_share_the_pool_which_shows_and_stops_when_idle(pool_env):
    env, data, home = pool_env
    first = run(env, data)
    wait_for_runner(home)
    second = run(env, data)
    workers = processes(home)
    assert first["prefect_api_url"] == second["prefect_api_url"]  # the same server, not a temporary one
    assert first["prefect_api_url"] == json.loads((home / "pool-env.json").read_text())["PREFECT_API_URL"]
    assert {first["flow_run_id"], second["flow_run_id"]} <= flow_runs(home)
    # The Dask work ran in the pool's worker processes (started by their nannies), not in the run.
    assert first["dask_pid"] != first["run_pid"] and second["dask_pid"] != second["run_pid"]
    assert {int(first["dask_pid"]), int(second["dask_pid"])} <= worker_pids(home)
    # The first run started the pool and ran itself; the pool's runner ran the second.
    assert (first["by_runner"], second["by_runner"]) == ("False", "True")
    # No flow-run heartbeats on the pool's server (nothing reads them; each cost up to 1 s at the end).
    assert (first["heartbeat_seconds"], second["heartbeat_seconds"]) == ("None", "None")
    # In its own process and in the runner's child alike, the collector runs again once the run began.
    assert (first["collector_enabled"], second["collector_enabled"]) == ("True", "True")

    status = subprocess.run(
        [sys.executable, "-m", "infra.stack", "status", "--home", str(home.parent / "stack")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"warm pool in {home}" in status and "prefect      answers" in status, status
    assert "runner       takes commands" in status, status
    assert "stops by itself in" in status

    everything = [pid for pids in workers.values() for pid in pids]
    runner_folder = Path((home / "runner-socket").read_text()).parent
    deadline = time.monotonic() + 120
    while any(pid_running(p) for p in everything) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(pid_running(p) for p in everything), "the pool did not stop after its idle time"
    assert not (home / "pool-env.json").exists()
    assert not (home / "runner-socket").exists() and not runner_folder.exists()
    assert "no warm pool running" in pool_cmd(home, "status")


def test_a_pool_that_dies_loses_nothing_and_the_next_run_starts_another(pool_env):
    env, data, home = pool_env
    first = run(env, data)
    for name in ("prefect", "scheduler"):
        for pid in processes(home)[name]:
            os.killpg(pid, signal.SIGKILL)
    second = run(env, data)
    assert second["prefect_api_url"] != first["prefect_api_url"]  # a new pool, on free ports
    assert {first["flow_run_id"], second["flow_run_id"]} <= flow_runs(home)  # the same database

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{home.parent / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`keel.pipeline` = 'pool-pipeline'"
    )
    executions = [r for r in runs if "keel.step" not in r.data.tags]  # not the step runs
    assert len(executions) == 2 and all(r.info.status == "FINISHED" for r in runs)


def test_changed_code_restarts_the_workers(pool_env):
    env, data, home = pool_env
    first = run(env, data)
    before = worker_pids(home)
    wait_for_runner(home)
    again = run(env, data)
    assert int(again["dask_pid"]) in before and again["by_runner"] == "True"  # the same code, workers
    module = ROOT / "tests" / "pool_pipeline.py"
    stat = module.stat()
    try:
        os.utime(module, ns=(stat.st_atime_ns, time.time_ns()))
        after = run(env, data)
    finally:
        os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert int(after["dask_pid"]) not in before  # the workers were restarted before the run's work
    assert after["by_runner"] == "False"  # the runner had the old code: it restarts, the run ran itself
    assert int(after["dask_pid"]) in worker_pids(home)
    assert after["prefect_api_url"] == first["prefect_api_url"]  # the same pool
    wait_for_runner(home)
    assert run(env, data)["by_runner"] == "True"  # the restarted runner, with the code on disk


def worker_pids(home: Path) -> set[int]:
    """The pool's Dask worker processes: started by the nannies, in their process groups."""
    groups = set(processes(home)["worker"])
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) not in groups:
            try:
                if os.getpgid(int(proc.name)) in groups and b"spawn_main" in (proc / "cmdline").read_bytes():
                    found.add(int(proc.name))
            except OSError:
                continue
    return found


def test_a_bad_idle_time_is_refused_before_anything_runs(tmp_path):
    env = clean_env(KEEL_STATE_DIR=str(tmp_path / ".keel"), KEEL_WARM_POOL="ten minutes")
    data = tmp_path / "small.csv"
    data.write_text("a\n1\n")
    done = launch(env, data)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "bad settings, nothing was run: KEEL_WARM_POOL" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / ".keel" / "pool").exists()
