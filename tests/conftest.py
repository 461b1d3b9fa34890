"""Shared test harness: a Prefect test server for the session, a real Dask cluster of separate
processes for integration tests, and a fresh MLflow store and state directory per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.processes import BIN, free_port, http_ok, start, stop, wait_until

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
ROOT = Path(__file__).resolve().parent.parent
BIKE_CSV = ROOT / "data" / "bike_sharing_hourly.csv"
# The demo's columns, for copies of the bike data elsewhere (only the demo file itself assumes them).
BIKE_TABLE = {
    "target": "cnt",
    "time_column": "dteday",
    "drop_columns": ["instant", "casual", "registered"],
    "key_columns": ["dteday", "hr"],
}
BIKE_FLAGS = [
    "--target", "cnt", "--time-column", "dteday", "--drop-columns", "instant", "casual", "registered",
    "--key-columns", "dteday", "hr",
]  # fmt: skip
SERVER_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "DASK_SCHEDULER_ADDRESS",
    "PREFECT_API_URL",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "PREFECT_API_AUTH_STRING",
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


@contextmanager
def running_dask_cluster(logs: Path, workers: int = 2) -> Iterator[DaskCluster]:
    """A scheduler and workers as separate processes, as on a real cluster; each worker runs under
    a nanny, which restarts it if it dies."""
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
    procs = [scheduler]
    for i in range(workers):
        procs.append(
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
        )
    try:
        from distributed import Client

        def all_workers() -> bool:
            with Client(address, timeout=5) as client:
                return len(client.scheduler_info()["workers"]) == workers

        wait_until(all_workers, "dask cluster", 90, procs, logs / "scheduler.log")
        with Client(address) as client:
            pids = list(client.run(os.getpid).values())
        yield DaskCluster(address, pids)
    finally:
        stop(procs)


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory) -> Iterator[DaskCluster]:
    with running_dask_cluster(tmp_path_factory.mktemp("dask")) as cluster:
        yield cluster


class Servers:
    """A real MLflow tracking server and a real Prefect server on 127.0.0.1; MLflow can be stopped
    and started again on the same port and store (fault tests)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.mlflow_port, self.prefect_port = free_port(), free_port()
        self.mlflow_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.prefect_api = f"http://127.0.0.1:{self.prefect_port}/api"
        self.mlflow = None
        self.prefect = start(
            [
                str(BIN / "python"),
                "-m",
                "infra.prefect_sqlite",  # `prefect server start`, as the stack runs it
                "--host",
                "127.0.0.1",
                "--port",
                str(self.prefect_port),
            ],
            home / "prefect.log",
            env={
                "PREFECT_HOME": str(home / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_URL": "",
                "PREFECT_UI_API_URL": self.prefect_api,
            },
        )
        self.start_mlflow()
        wait_until(
            lambda: http_ok(f"{self.prefect_api}/health"),
            "prefect server",
            120,
            [self.prefect],
            home / "prefect.log",
        )

    def start_mlflow(self) -> None:
        log = self.home / "mlflow.log"
        self.mlflow = start(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.home / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.home / "artifacts"),
            ],
            log,
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PATH": f"{BIN}:{os.environ['PATH']}"},
            append=True,
        )
        wait_until(lambda: http_ok(f"{self.mlflow_uri}/health"), "mlflow server", 120, [self.mlflow], log)

    def stop_mlflow(self) -> None:
        stop([self.mlflow])

    def env(self, **overrides: str) -> dict[str, str]:
        return clean_env(MLFLOW_TRACKING_URI=self.mlflow_uri, PREFECT_API_URL=self.prefect_api, **overrides)

    def mlflow_client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.mlflow_uri, registry_uri=self.mlflow_uri)

    def close(self) -> None:
        stop([p for p in (self.mlflow, self.prefect) if p is not None])


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[Servers]:
    running = Servers(tmp_path_factory.mktemp("servers"))
    try:
        yield running
    finally:
        running.close()


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

    from tasks.steps.settings import get_settings

    uri = get_settings().tracking_uri
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


SCORING_MODEL = "bike-transform"


@pytest.fixture(scope="session")
def scoring_store(tmp_path_factory, dask_cluster, prefect_harness) -> Iterator[Path]:
    """Two versions of SCORING_MODEL, trained on January-March and January-April 2011, in their own
    state directory: what the scoring, serving and late-label tests score with."""
    from flows.pipeline import PipelineParams, training_pipeline

    state = tmp_path_factory.mktemp("scoring") / ".keel"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEEL_STATE_DIR", str(state))
        patch.setenv("DASK_SCHEDULER_ADDRESS", dask_cluster.address)
        for name in (
            "MLFLOW_TRACKING_URI",
            "MLFLOW_REGISTRY_URI",
        ):  # an earlier test's server: not this store
            patch.delenv(name, raising=False)
        for end in ("2011-03-31", "2011-04-30"):
            result = training_pipeline(
                PipelineParams(
                    data=str(BIKE_CSV),
                    end=end,
                    n_trials=2,
                    num_boost_round=60,
                    model_name=SCORING_MODEL,
                    min_r2=0.3,
                )
            )
            assert result.registered and result.registered.champion
    yield state


@pytest.fixture
def scoring_env(scoring_store, dask_cluster, monkeypatch) -> Path:
    """The scoring store as the current one (MLflow store, state directory, Dask cluster)."""
    monkeypatch.setenv("KEEL_STATE_DIR", str(scoring_store))
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", dask_cluster.address)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return scoring_store


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each phase's report on the test item (`item.report_call`): fixtures that add
    diagnostics on failure read it in their teardown."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report
