"""The same pipeline against a real MLflow tracking server and a real Prefect server, both started
here on 127.0.0.1 and stopped by PID; only the ecosystem's environment variables change."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.pipeline import STEPS
from tests.conftest import ROOT

pytestmark = [pytest.mark.servers, pytest.mark.slow]


def test_pipeline_records_to_real_mlflow_and_prefect_servers(servers, dask_cluster):
    env = servers.env(DASK_SCHEDULER_ADDRESS=dask_cluster.address, KEEL_STATE_DIR=str(servers.home / "state"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.pipeline",
            "--start",
            "2011-01-01",
            "--end",
            "2011-08-31",
            "--n-trials",
            "2",
            "--num-boost-round",
            "80",
            "--model-name",
            "bike-served",
            "--min-r2",
            "0.2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "models:/bike-served/1 status=Approved" in proc.stdout

    import mlflow

    server = servers.mlflow_uri
    client = mlflow.MlflowClient(tracking_uri=server, registry_uri=server)  # not this process's defaults
    version = client.get_model_version_by_alias("bike-served", "champion")
    flow_run_id = version.tags["prefect.flow_run_id"]
    assert version.tags["approval_status"] == "Approved"
    # the artifacts went through the server: a client that knows only its URL can load the model
    mlflow.set_tracking_uri(server)
    mlflow.set_registry_uri(server)
    model = mlflow.pyfunc.load_model("models:/bike-served@champion")
    assert model.metadata.signature is not None

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with SyncPrefectClient(servers.prefect_api) as prefect:
        flow_run = prefect.read_flow_run(flow_run_id)
        task_runs = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    assert flow_run.state.is_completed()
    assert {t.name for t in task_runs} == set(STEPS)
    assert all(t.state.is_completed() for t in task_runs)
