"""Shared test harness: a Prefect test server for the session, a real Dask cluster of separate
processes for integration tests, and a fresh MLflow store and state directory per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.processes import BIN, free_port, start, stop, wait_until

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
ROOT = Path(__file__).resolve().parent.parent
BIKE_CSV = ROOT / "data" / "bike_sharing_hourly.csv"
SERVER_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "DASK_SCHEDULER_ADDRESS",
    "PREFECT_API_URL",
    "MLFLOW_EXPERIMENT_NAME",
)
for name in SERVER_VARIABLES:
    os.environ.pop(name, None)  # the suite decides where everything goes


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Flows in tests record to a temporary Prefect server with its own database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@dataclass
class DaskCluster:
    address: str
    worker_pids: list[int]


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory) -> Iterator[DaskCluster]:
    """A scheduler and two workers as separate processes, as on a real cluster."""
    logs = tmp_path_factory.mktemp("dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start(
        [
            str(BIN / "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            "127.0.0.1:0",
        ],
        logs / "scheduler.log",
    )
    workers = [
        start(
            [
                str(BIN / "dask"),
                "worker",
                address,
                "--host",
                "127.0.0.1",
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--memory-limit",
                "3GiB",
                "--dashboard-address",
                "127.0.0.1:0",
                "--name",
                f"test-worker-{i}",
            ],
            logs / f"worker-{i}.log",
        )
        for i in range(2)
    ]
    procs = [scheduler, *workers]
    try:
        from distributed import Client

        def two_workers() -> bool:
            with Client(address, timeout=5) as client:
                return len(client.scheduler_info()["workers"]) == 2

        wait_until(two_workers, "dask cluster", 90, procs, logs / "scheduler.log")
        with Client(address) as client:
            pids = list(client.run(os.getpid).values())
        yield DaskCluster(address, pids)
    finally:
        stop(procs)


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    """A fresh embedded MLflow store and state directory for one test."""
    monkeypatch.setenv("KEEL_STATE_DIR", str(tmp_path / ".keel"))  # hidden, like the default
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / ".keel"


@pytest.fixture
def on_cluster(state, dask_cluster, monkeypatch) -> DaskCluster:
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", dask_cluster.address)
    return dask_cluster


def clean_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process: none of the server variables that MLflow's own setters
    leave in `os.environ` after in-process runs, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in SERVER_VARIABLES}
    return {**env, **overrides}


def mlflow_client():
    import mlflow

    from tasks.settings import get_settings

    uri = get_settings().tracking_uri
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
