"""The real stack, started by `python -m infra.stack up` as a user would: a Prefect server, an MLflow
server, a Dask scheduler with two workers, and the deployments server. A drift event starts a
retrain through the automation; a burst of events retrains once; a clean batch starts nothing; and
`down` then `up` loses nothing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from infra.processes import free_port
from tests.conftest import BIKE_CSV, ROOT, clean_env

pytestmark = [pytest.mark.integration, pytest.mark.servers, pytest.mark.slow]

FAST = ["--n-trials", "2", "--num-boost-round", "80", "--min-r2", "0.3"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class RunningStack:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.batches = home / "batches"  # a data root given to `up` besides the landing folder
        self.batches.mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in ("prefect", "mlflow", "dask", "dask-dashboard", "postgres")}
        self.port_args = [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
        self.env: dict[str, str] = {}

    def command(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "infra.stack",
                args[0],
                "--home",
                str(self.home),
                *self.port_args,
                *args[1:],
            ],
            cwd=ROOT,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def up(self) -> None:
        self.command(
            "up",
            "--workers",
            "2",
            "--worker-memory",
            "3GiB",
            "--data-root",
            str(self.batches),
            "--",
            "--cooldown-minutes",
            "30",
            *FAST[:2],
        )
        self.read_env()

    def read_env(self) -> None:
        """What a user's `eval "$(python -m infra.stack env)"` would set."""
        self.env = dict(re.findall(r"^export (\w+)=(.*)$", self.command("env"), re.MULTILINE))

    def run(self, module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=clean_env(**self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.env["PREFECT_API_URL"], timeout=30)

    def retrain_runs(self, model: str) -> list[dict]:
        with self.api() as http:
            deployment = http.get("/deployments/name/retrain/on-drift").json()["id"]
            runs = http.post(
                "/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment]}}, "limit": 100}
            ).json()
        return [r for r in runs if r["parameters"]["params"]["model_name"] == model]

    def wait_for_runs(self, model: str, count: int, timeout: float = 420) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                runs = self.retrain_runs(model)
            except httpx.TransportError:  # a busy 2-core machine: the server may answer slowly
                runs = []
            if len(runs) >= count and all(r["state"]["type"] in TERMINAL for r in runs):
                return runs
            assert time.monotonic() < deadline, [(r["name"], r["state"]["type"]) for r in runs]
            time.sleep(2)

    def emit_drift_events(self, model: str, count: int, payload: dict) -> list[str]:
        """`keel.drift.detected` about `model` v1, `count` times, from a new process as any client of the
        server could send it; the events' ids."""
        script = (
            "import json, sys\n"
            "from prefect.events import emit_event\n"
            "model, count, payload = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])\n"
            "for i in range(count):\n"
            "    resource = {'prefect.resource.id': f'keel.model.{model}.v1', 'keel.model.name': model,\n"
            "                'keel.model.version': '1'}\n"
            "    report = {'report_uri': f'file:///{model}/{i}.html'}\n"
            "    print(emit_event(event='keel.drift.detected', resource=resource, payload={**payload, **report}).id)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, model, str(count), json.dumps(payload)],
            env=clean_env(**self.env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    def mlflow(self):
        import mlflow

        uri = self.env["MLFLOW_TRACKING_URI"]
        return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("stack")
    landing = home / "landing"
    landing.mkdir()
    bike = pd.read_csv(BIKE_CSV)
    bike[bike.dteday < "2011-06-01"].to_parquet(landing / "2011-01-01.parquet", index=False)
    running = RunningStack(home)
    running.up()
    try:
        for model in ("stack-a", "stack-b"):
            trained = running.run(
                "flows.pipeline", "--data", str(landing), "--end", "2011-03-31", "--model-name", model, *FAST
            )
            assert trained.returncode == 0, trained.stdout + trained.stderr
        yield running
    finally:
        running.command("down", timeout=180)


def monitor(stack: RunningStack, batch: Path, model: str) -> tuple[str, str]:
    done = stack.run("flows.monitor", "--batch", str(batch), "--model-name", model)
    assert done.returncode == 0, done.stdout + done.stderr
    event, event_id = re.search(r"^Event:\s+(\S+) \((\S+)\)", done.stdout, re.MULTILINE).groups()
    return event, event_id


def test_clean_batch_starts_nothing_and_a_drift_event_retrains_through_the_automation(stack, tmp_path):
    bike = pd.read_csv(BIKE_CSV)
    outside = tmp_path / "outside.parquet"  # the stack's flows read only from its data roots
    bike.head(200).to_parquet(outside, index=False)
    refused = stack.run("flows.monitor", "--batch", str(outside), "--model-name", "stack-a")
    assert refused.returncode == 2 and "outside the allowed data roots" in refused.stderr, refused.stderr[
        -2000:
    ]

    clean = stack.batches / "clean.parquet"
    bike[bike.dteday < "2011-03-10"].sample(n=1500, random_state=4).to_parquet(clean, index=False)
    event, _ = monitor(stack, clean, "stack-a")
    assert event == "keel.drift.not-detected"
    time.sleep(10)  # an automation that wrongly fired would have created its run by now
    assert stack.retrain_runs("stack-a") == []

    drifted = stack.batches / "june-2012.parquet"
    bike[(bike.dteday >= "2012-06-04") & (bike.dteday < "2012-06-11")].to_parquet(drifted, index=False)
    event, event_id = monitor(stack, drifted, "stack-a")
    assert event == "keel.drift.detected"
    # the same batch checked again: the same verdict is the same event, which the server drops
    assert monitor(stack, drifted, "stack-a") == (event, event_id)

    [run] = stack.wait_for_runs("stack-a", 1)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    params = run["parameters"]["params"]
    assert params["event_id"] == event_id and params["drift_report"].endswith("drift/report.html")
    assert params["reason"].startswith("policy performance on v1: performance: ")
    [version] = [v for v in stack.mlflow().search_model_versions("name='stack-a'") if str(v.version) == "2"]
    assert version.tags["keel.trigger.event_id"] == event_id
    assert version.tags["keel.trigger.drift_report"] == params["drift_report"]
    assert version.tags["approval_status"] in {"Approved", "Rejected"}
    parent = stack.mlflow().get_run(version.tags["pipeline_run_id"])
    assert parent.data.tags["keel.trigger.event_id"] == event_id


def test_a_burst_of_five_drift_events_retrains_once(stack):
    ids = stack.emit_drift_events("stack-b", 5, {"drift_share": 0.9})
    assert len(ids) == 5

    with stack.api() as http:  # retrains over all models are bounded: a burst queues
        deployment = http.get("/deployments/name/retrain/on-drift").json()
    assert deployment["global_concurrency_limit"]["limit"] == 2

    runs = stack.wait_for_runs("stack-b", 5)
    assert len(runs) == 5 and {r["parameters"]["params"]["event_id"] for r in runs} == set(ids)
    assert all(r["state"]["type"] == "COMPLETED" for r in runs), [r["state"] for r in runs]
    retrained = [
        v
        for v in stack.mlflow().search_model_versions("name='stack-b'")
        if v.tags.get("keel.trigger.flow") == "retrain"
    ]
    assert len(retrained) == 1 and retrained[0].tags["keel.trigger.event_id"] in ids
    with stack.api() as http:
        ignored = http.post(
            "/artifacts/filter", json={"artifacts": {"key": {"any_": ["retrain-ignored"]}}}
        ).json()
    ignored_runs = {a["flow_run_id"] for a in ignored} & {r["id"] for r in runs}
    assert len(ignored_runs) == 4
    reasons = " ".join(a["description"] for a in ignored if a["flow_run_id"] in ignored_runs)
    assert "already running" in reasons or "cooldown" in reasons


def test_a_forged_event_about_a_model_without_a_champion_trains_nothing(stack):
    stack.emit_drift_events("forged", 1, {"policy": "performance", "reasons": ["made up"]})
    [run] = stack.wait_for_runs("forged", 1)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    with stack.api() as http:
        ignored = http.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
        ).json()
    assert any("has no champion" in (a["description"] or "") for a in ignored), ignored
    assert stack.mlflow().search_model_versions("name='forged'") == []


def test_down_then_up_loses_nothing(stack):
    client = stack.mlflow()
    versions = sorted(str(v.version) for v in client.search_model_versions("name='stack-a'"))
    finished = {"flow_runs": {"state": {"type": {"any_": sorted(TERMINAL)}}}, "limit": 200}
    with stack.api() as http:  # future scheduled runs are re-planned by the server: count finished ones
        runs = {r["id"]: r["state"]["type"] for r in http.post("/flow_runs/filter", json=finished).json()}
    stack.command("down", timeout=180)
    assert json.loads((stack.home / "stack.json").read_text())["processes"] == []
    stack.up()
    assert sorted(str(v.version) for v in stack.mlflow().search_model_versions("name='stack-a'")) == versions
    assert str(stack.mlflow().get_model_version_by_alias("stack-a", "champion").version) in versions
    with stack.api() as http:
        after = {r["id"]: r["state"]["type"] for r in http.post("/flow_runs/filter", json=finished).json()}
        assert after == runs
        names = {d["name"] for d in http.post("/deployments/filter", json={}).json()}
    assert {"scheduled", "landing-folder", "on-drift"} <= names
    status = stack.command("status")
    assert "prefect      answers" in status and "mlflow       answers" in status


def test_postgresql_keeps_mlflow_and_prefect_data_across_restarts():
    """`--db postgresql`: a PostgreSQL server from this machine's binaries, under the stack folder,
    holding MLflow's and Prefect's databases."""
    home = Path(tempfile.mkdtemp(prefix="keel-pg-"))  # reachable by the `postgres` user when run as root
    home.chmod(0o755)
    stack = RunningStack(home / "stack")
    stack.command("up", "--db", "postgresql", "--workers", "1", "--worker-memory", "2GiB")
    try:
        stack.read_env()
        client = stack.mlflow()
        experiment = client.create_experiment("on-postgres")
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "answer", 42.0)
        client.set_terminated(run.info.run_id)
        stack.command("down", timeout=180)
        assert (stack.home / "postgres" / "PG_VERSION").exists()
        stack.command("up", "--db", "postgresql", "--workers", "1", "--worker-memory", "2GiB")
        assert stack.mlflow().get_run(run.info.run_id).data.metrics == {"answer": 42.0}
        assert "postgresql://" in (stack.home / "logs" / "mlflow.log").read_text()
        with stack.api() as http:  # Prefect's database is there too: the deployments came back
            names = {d["name"] for d in http.post("/deployments/filter", json={}).json()}
        assert {"scheduled", "landing-folder", "on-drift"} <= names
        tables = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", stack.port_args[stack.port_args.index("--postgres-port") + 1],
             "-U", "keel", "-d", "prefect", "-tAc", "select count(*) from deployment"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert int(tables.stdout.strip()) >= 3
    finally:
        stack.command("down", timeout=180)
        shutil.rmtree(home, ignore_errors=True)
