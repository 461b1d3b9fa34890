"""Faults with real processes: Dask workers SIGKILLed mid-step, the flow process SIGKILLed and
resumed, the MLflow server stopped and started again mid-run, two executions racing for one model."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.pipeline import PipelineParams, training_pipeline
from tasks.steps.tags import REASON_TAG, STATUS_TAG
from tests.conftest import BIKE_FLAGS, BIKE_TABLE, ROOT, mlflow_client, running_dask_cluster

pytestmark = [pytest.mark.integration, pytest.mark.servers, pytest.mark.slow]

CLI_FAST = [
    "--start",
    "2011-01-01",
    "--end",
    "2011-08-31",
    "--num-boost-round",
    "150",
    "--min-r2",
    "0.2",
    *BIKE_FLAGS,
]


@pytest.fixture(scope="module")
def scaled_csv(tmp_path_factory) -> Path:
    """200,000 rows of the bike data (repeated, weather jittered): steps long enough to be hit mid-way."""
    from benchmarks.scaled_data import scaled_bike

    path = tmp_path_factory.mktemp("scaled") / "bike_200k.csv"
    scaled_bike(200_000).to_csv(path, index=False)
    return path


class WorkerKiller(threading.Thread):
    """SIGKILLs the Dask worker running a task of each named step, once per step, in order."""

    def __init__(self, address: str, tracking_uri: str, plan: list[tuple[str, str]]):
        super().__init__(daemon=True)
        self.address, self.tracking_uri, self.plan = address, tracking_uri, plan
        self.killed: list[tuple[str, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        from distributed import Client

        client = self._store_client()
        with Client(self.address) as dask:
            for step, prefix in self.plan:
                while not self.done.is_set() and not self._running(client, step):
                    time.sleep(0.05)
                while not self.done.is_set():
                    busy = {
                        worker: [str(k) for k in keys if prefix in str(k)]
                        for worker, keys in dask.processing().items()
                    }
                    busy = {w: k for w, k in busy.items() if k}
                    if busy:
                        worker, keys = next(iter(busy.items()))
                        pid = dask.run(os.getpid, workers=[worker])[worker]
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append((step, keys[0]))
                        break
                    time.sleep(0.01)

    def _store_client(self):
        """A client of the pipeline's store once the pipeline has made it (a copy of the template):
        opening the path first would create and migrate a store of our own under it, racing the
        pipeline for SQLite's lock. Opening it also writes (MLflow's default experiment): a store
        busy with the pipeline's writes is tried again."""
        import mlflow
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import OperationalError

        database = Path(self.tracking_uri.removeprefix("sqlite:///"))
        while not self.done.is_set():
            if database.exists():
                with contextlib.suppress(MlflowException, OperationalError):
                    return mlflow.MlflowClient(tracking_uri=self.tracking_uri)
            time.sleep(0.05)
        return None

    @staticmethod
    def _running(client, step: str) -> bool:
        """Whether a run of `step` is running; a store busy with the pipeline's writes answers next time."""
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import OperationalError

        try:
            return bool(
                client.search_runs(["1"], f"tags.`keel.step` = '{step}' and attributes.status = 'RUNNING'")
            )
        except (MlflowException, OperationalError):
            return False


def outputs(run_id: str) -> dict[str, str]:
    """What an execution produced, as content: split digests, best parameters, test metrics."""
    client = mlflow_client()
    steps = {
        r.data.tags["keel.step"]: r
        for r in client.search_runs(["1"], f"tags.`mlflow.parentRunId` = '{run_id}'")
    }
    found = {
        k: v
        for k, v in steps["prepare"].data.tags.items()
        if k.startswith("keel.output.") and k.endswith(".digest")
    }
    # every trial's parameters and scores, without the ids of their MLflow runs
    found.update(
        {f"train.{k}": re.sub(r'"run_id": "\w+"', "", v) for k, v in steps["train"].data.params.items()}
    )
    found.update(
        {f"evaluate.{k}": str(v) for k, v in steps["evaluate"].data.metrics.items() if k.startswith("test_")}
    )
    return found


def test_workers_killed_during_processing_and_tuning_change_nothing(
    scaled_csv, tmp_path_factory, monkeypatch, prefect_harness
):
    params = PipelineParams(
        data=str(scaled_csv),
        **{**BIKE_TABLE, "drop_columns": []},
        n_trials=6,
        num_boost_round=120,
        min_r2=0.2,
        model_name="bike-faults",
    )
    with running_dask_cluster(tmp_path_factory.mktemp("fault-dask")) as cluster:
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.address)
        monkeypatch.setenv("KEEL_STATE_DIR", str(tmp_path_factory.mktemp("undisturbed") / ".keel"))
        undisturbed = training_pipeline(params)
        expected = outputs(undisturbed.mlflow_run_id)

        state = tmp_path_factory.mktemp("disturbed") / ".keel"
        monkeypatch.setenv("KEEL_STATE_DIR", str(state))
        state.mkdir(parents=True)
        killer = WorkerKiller(
            cluster.address, f"sqlite:///{state / 'mlflow.db'}", [("prepare", ""), ("tune", "run_trial")]
        )
        killer.start()
        try:
            disturbed = training_pipeline(params)
        finally:
            killer.done.set()
            killer.join(10)

    assert [step for step, _ in killer.killed] == ["prepare", "tune"], killer.killed
    assert disturbed.registered is not None and disturbed.registered.version == "1"
    assert outputs(disturbed.mlflow_run_id) == expected


def run_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.pipeline", *args],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in {timeout} s:\n{log.read_text()[-3000:]}")


def execution_of(client, pid: int):
    runs = client.search_runs(
        ["0", "1"], f"tags.`keel.pid` = '{pid}' and tags.`mlflow.source.name` = 'training-pipeline'"
    )
    assert len(runs) == 1, runs
    return runs[0]


def tree(client, run_id: str) -> list:
    """An execution's runs: the parent, its steps and their trials."""
    found, pending = [client.get_run(run_id)], [run_id]
    while pending:
        children = client.search_runs(["0", "1"], f"tags.`mlflow.parentRunId` = '{pending.pop()}'")
        found.extend(children)
        pending.extend(c.info.run_id for c in children)
    return found


def test_a_killed_flow_resumes_with_only_its_unfinished_steps(servers, dask_cluster, tmp_path):
    env = servers.env(DASK_SCHEDULER_ADDRESS=dask_cluster.address, KEEL_STATE_DIR=str(tmp_path / ".keel"))
    model = ["--model-name", "bike-resume", "--n-trials", "8"]
    log = tmp_path / "killed.log"
    proc = run_cli([*CLI_FAST, *model], env, log)
    wait_for_line(log, "trial 2/8", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    client = servers.mlflow_client()
    killed = execution_of(client, proc.pid)
    assert killed.info.status == "RUNNING"  # nobody told MLflow

    log = tmp_path / "resumed.log"
    resumed = run_cli(["--reuse-from", killed.info.run_id], env, log)
    assert resumed.wait(600) == 0, log.read_text()[-3000:]

    runs = {
        r.data.tags.get("keel.step"): r for r in tree(client, execution_of(client, resumed.pid).info.run_id)
    }
    for step in ("validate-input", "check-quality", "prepare"):
        assert runs[step].data.tags[STATUS_TAG] == "reused", step
    for step in ("tune", "train", "baseline", "evaluate"):
        assert runs[step].data.tags[STATUS_TAG] == "miss", step
        assert f"it did not finish in execution {killed.info.run_id}" in runs[step].data.tags[REASON_TAG]
    assert [v.version for v in client.search_model_versions("name='bike-resume'")] == ["1"]
    statuses = {r.info.status for r in tree(client, killed.info.run_id)}
    assert statuses == {"FINISHED", "KILLED"}, statuses  # no run left RUNNING
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(servers.prefect_api) as prefect:
        flow_run = prefect.read_flow_run(killed.data.tags["prefect.flow_run_id"])
    assert flow_run.state.type.value == "CRASHED", flow_run.state


def test_mlflow_server_stopped_and_restarted_mid_run(servers, dask_cluster, tmp_path):
    env = servers.env(DASK_SCHEDULER_ADDRESS=dask_cluster.address, KEEL_STATE_DIR=str(tmp_path / ".keel"))
    log = tmp_path / "run.log"
    proc = run_cli(
        [*CLI_FAST, "--model-name", "bike-outage", "--n-trials", "8", "--force-steps", "all"], env, log
    )
    wait_for_line(log, "trial 1/8", proc)
    servers.stop_mlflow()
    time.sleep(8)
    servers.start_mlflow()
    code = proc.wait(600)
    output = log.read_text()

    client = servers.mlflow_client()
    execution = execution_of(client, proc.pid)
    runs = tree(client, execution.info.run_id)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    versions = client.search_model_versions("name='bike-outage'")
    if code == 0:
        assert [v.version for v in versions] == ["1"], output[-3000:]
        assert execution.info.status == "FINISHED"
    else:  # allowed, if it says why
        assert len(versions) <= 1
        assert "MLflow" in output or "API request" in output, output[-3000:]


def test_two_executions_for_one_model_at_once(servers, dask_cluster, tmp_path):
    procs = []
    for seed in ("1", "2"):
        env = servers.env(DASK_SCHEDULER_ADDRESS=dask_cluster.address, KEEL_STATE_DIR=str(tmp_path / seed))
        args = [*CLI_FAST, "--model-name", "bike-race", "--n-trials", "2", "--seed", seed]
        procs.append(run_cli([*args, "--on-gate-failure", "reject"], env, tmp_path / f"{seed}.log"))
    for seed, proc in zip(("1", "2"), procs, strict=True):
        assert proc.wait(600) == 0, (tmp_path / f"{seed}.log").read_text()[-3000:]

    client = servers.mlflow_client()
    versions = client.search_model_versions("name='bike-race'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert len({v.run_id for v in versions}) == 2
    registers = client.search_runs(
        ["0", "1"],
        "tags.`keel.step` = 'register' and attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"],
    )
    registers = [
        r
        for r in registers
        if r.data.tags.get("keel.registered_version") and _model(client, r) == "bike-race"
    ]
    approved = [r for r in registers if r.data.tags["approval_status"] == "Approved"]
    champion = client.get_model_version_by_alias("bike-race", "champion")
    assert approved, [r.data.tags for r in registers]
    assert str(champion.version) == approved[0].data.tags["keel.registered_version"]
    for version in versions:
        assert version.tags["approval_status"] in ("Approved", "Rejected")
        assert client.get_run(version.run_id).info.status == "FINISHED"


def _model(client, run) -> str:
    return client.get_run(run.data.tags["mlflow.parentRunId"]).data.params.get("model_name", "")
