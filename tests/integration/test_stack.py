"""The real stack, started by `python -m infra.stack up` as a user would: a Prefect server, an MLflow
server, a Dask scheduler with two workers, and the deployments server. A drift event starts a
retrain through the automation; a burst of events retrains once; a clean batch starts nothing; and
`down` then `up` loses nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from infra.processes import free_port
from infra.stack import prefect_api
from tests.browser import basic_auth, chromium, page_text, screenshot, screenshot_folder, wait_for
from tests.conftest import BIKE_CSV, BIKE_FLAGS, ROOT, clean_env

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

    def up(self, cooldown_minutes: int = 30) -> None:
        self.command(
            "up",
            "--workers",
            "2",
            "--worker-memory",
            "3GiB",
            "--data-root",
            str(self.batches),
            "--serve-model",
            "stack-a",
            "--",
            "--cooldown-minutes",
            str(cooldown_minutes),
            *FAST[:2],
        )
        self.read_env()

    def automations(self) -> list[dict]:
        with self.api() as http:
            return http.post("/automations/filter", json={}).raise_for_status().json()

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
        return prefect_api(self.env)

    def retrain_runs(self, model: str, deployment: str = "retrain/on-drift") -> list[dict]:
        """The runs of a deployment (by default the retrain's) for a model."""
        with self.api() as http:
            found = http.get(f"/deployments/name/{deployment}").json()["id"]
            runs = http.post(
                "/flow_runs/filter", json={"deployments": {"id": {"any_": [found]}}, "limit": 100}
            ).json()
        return [r for r in runs if r["parameters"]["params"]["model_name"] == model]

    def wait_for_runs(
        self, model: str, count: int, timeout: float = 420, deployment: str = "retrain/on-drift"
    ) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                runs = self.retrain_runs(model, deployment)
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
        """A client logged in as the stack's app user (MLflow reads credentials from the environment
        only; the suite's other servers ignore them and `clean_env` keeps them from child processes)."""
        import mlflow

        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ[name] = self.env[name]
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
                "flows.pipeline",
                "--data",
                str(landing),
                "--end",
                "2011-03-31",
                "--model-name",
                model,
                *FAST,
                *BIKE_FLAGS,
            )
            assert trained.returncode == 0, trained.stdout + trained.stderr
        yield running
    finally:
        running.command("down", timeout=180)


@pytest.fixture(autouse=True)
def server_logs_on_failure(request):
    """A failed test that used the stack prints the end of each server's log: what a server was
    doing when it answered late (a CI run shows nothing else of it)."""
    yield
    report = getattr(request.node, "report_call", None)
    if "stack" not in request.fixturenames or report is None or not report.failed:
        return
    for log in sorted((request.getfixturevalue("stack").home / "logs").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-25:]
        print(f"--- the end of {log.name}", *lines, sep="\n", file=sys.stderr)


def monitor(stack: RunningStack, batch: Path, model: str, *extra: str) -> tuple[str, str]:
    done = stack.run("flows.monitor", "--batch", str(batch), "--model-name", model, *extra)
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
    # (against v1 by name: the retrain the first event started may have promoted v2 by now)
    assert monitor(stack, drifted, "stack-a", "--version", "1") == (event, event_id)

    [run] = stack.wait_for_runs("stack-a", 1)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    params = run["parameters"]["params"]
    assert params["event_id"] == event_id and params["drift_report"].endswith("drift/report.html")
    assert params["reason"].startswith("policy performance on v1: performance: ")
    [version] = [v for v in stack.mlflow().search_model_versions("name='stack-a'") if str(v.version) == "2"]
    assert version.tags["keel.trigger.event_id"] == event_id
    assert version.tags["keel.trigger.drift_report"] == params["drift_report"]
    assert version.tags["approval_status"] in {"Approved", "Rejected"}
    parent = stack.mlflow().get_run(version.run_id)
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


def test_late_labels_far_from_the_predictions_start_a_retrain_through_the_automation(stack):
    """Capture (flows.transform) -> late labels (flows.label) -> keel.quality.dropped -> retrain."""
    bike = pd.read_csv(BIKE_CSV)
    may = bike[(bike.dteday >= "2011-05-01") & (bike.dteday < "2011-05-15")]
    data, scored = stack.batches / "may-to-score.parquet", stack.batches / "scored-may"
    may.to_parquet(data, index=False)
    done = stack.run(
        "flows.transform", "--model-name", "stack-b", "--data", str(data), "--output", str(scored),
        "--id-columns", "instant",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    labels = stack.batches / "may-labels.csv"
    may.assign(cnt=may.cnt * 4 + 50)[["instant", "cnt"]].to_csv(labels, index=False)
    before = stack.retrain_runs("stack-b")
    done = stack.run(
        "flows.label", "--labels", str(labels), "--predictions", str(scored), "--model-name", "stack-b",
        "--id-column", "instant",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    event, event_id = re.search(r"^Event:\s+(\S+) \((\S+)\)", done.stdout, re.MULTILINE).groups()
    assert event == "keel.quality.dropped", done.stdout
    runs = stack.wait_for_runs("stack-b", len(before) + 1)
    [run] = [r for r in runs if r["parameters"]["params"]["event_id"] == event_id]
    assert run["state"]["type"] == "COMPLETED", run["state"]
    params = run["parameters"]["params"]
    assert params["reason"].startswith("policy performance on v") and "rmse (realized" in params["reason"]
    assert params["drift_report"].endswith("quality/report.html")


def test_a_version_pending_approval_gets_a_form_in_prefect_whose_answer_moves_the_champion(stack, tmp_path):
    """A pipeline with manual approval -> keel.model.pending-approval -> the automation starts
    await-approval/on-pending, which pauses with a form; answered in Prefect's UI in a browser, the
    version is approved, becomes champion, and keel.model.approved is emitted, which starts
    score-pending/on-approval: the batch waiting in the scoring inbox is scored by the new champion."""
    model = "stack-approval"
    bike = pd.read_csv(BIKE_CSV)
    (stack.home / "to-score").mkdir(exist_ok=True)
    waiting = bike[(bike.dteday >= "2011-04-04") & (bike.dteday < "2011-04-11")]
    waiting.to_csv(stack.home / "to-score" / "april-week.csv", index=False)
    trained = stack.run(
        "flows.pipeline", "--data", str(stack.home / "landing"), "--end", "2011-03-31", "--model-name", model,
        "--approval", "manual", *FAST, *BIKE_FLAGS,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert stack.mlflow().get_model_version(model, "1").tags["approval_status"] == "PendingManualApproval"
    deadline = time.monotonic() + 180
    with stack.api() as http:
        deployment = http.get("/deployments/name/await-approval/on-pending").json()["id"]
        while True:
            runs = _answer(
                lambda: http.post(
                    "/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment]}}, "limit": 50}
                ),
                [],
            )
            [run] = [r for r in runs if r["parameters"]["params"]["model_name"] == model] or [None]
            if (
                run
                and run["state"]["type"] == "PAUSED"
                and run["state"]["state_details"].get("run_input_keyset")
            ):
                break
            assert time.monotonic() < deadline, run
            time.sleep(1)
        assert run["parameters"]["params"]["version"] == "1"
        keyset = run["state"]["state_details"]["run_input_keyset"]
        schema = http.get(f"/flow_runs/{run['id']}/input/{keyset['schema']}").raise_for_status().json()
        assert schema["properties"]["decision"]["enum"] == ["approve", "reject"]
        answer_in_the_browser(
            stack, run["id"], "checked on the stack", "Bo", screenshot_folder(tmp_path, "stack")
        )
        while _answer(lambda: http.get(f"/flow_runs/{run['id']}"), run)["state"]["type"] not in TERMINAL:
            assert time.monotonic() < deadline
            time.sleep(1)
        assert http.get(f"/flow_runs/{run['id']}").json()["state"]["type"] == "COMPLETED"
        approved = {
            "event": {"name": ["keel.model.approved"]},
            "resource": {"id": [f"keel.model.{model}.v1"]},
        }
        events = {"filter": approved}
        while not (
            found := _answer(lambda: http.post("/events/filter", json=events), {"events": []})["events"]
        ):
            assert time.monotonic() < deadline, "no keel.model.approved event"  # persisted in batches
            time.sleep(0.5)
    [event] = found
    assert event["payload"]["reason"] == "checked on the stack" and event["payload"]["champion"] == "1"
    version = stack.mlflow().get_model_version(model, "1")
    assert version.tags["approval_status"] == "Approved" and version.tags["approval.by"].startswith("Bo ")
    assert str(stack.mlflow().get_model_version_by_alias(model, "champion").version) == "1"
    [scoring] = stack.wait_for_runs(model, 1, deployment="score-pending/on-approval")
    assert scoring["state"]["type"] == "COMPLETED", scoring["state"]
    assert scoring["parameters"]["params"]["trigger"].startswith("v1 approved: checked on the stack")
    scored = stack.home / "scored" / model / "april-week-csv"
    assert json.loads((scored / "_scoring.json").read_text())["model_version"] == "1"
    assert set(pd.read_parquet(scored)["model_version"]) == {"1"} and len(pd.read_parquet(scored)) == len(
        waiting
    )


def test_the_stack_serves_the_champion_over_http(stack):
    """`up --serve-model stack-a`: the champion's scoring server on 127.0.0.1, answering rows with
    predictions and a malformed body with a 4xx (test_transform.py compares the answers with
    mlflow.pyfunc and follows a moved champion)."""
    champion = str(stack.mlflow().get_model_version_by_alias("stack-a", "champion").version)
    port = json.loads((stack.home / "stack.json").read_text())["ports"]["serving"]
    url, record = f"http://127.0.0.1:{port}", stack.home / "serving.json"
    deadline = time.monotonic() + 180
    while not (record.exists() and json.loads(record.read_text())["version"] == champion):
        assert time.monotonic() < deadline, record.read_text() if record.exists() else "no serving.json"
        time.sleep(1)
    while not _pings(url):
        assert time.monotonic() < deadline, "the scoring server does not answer"
        time.sleep(1)
    rows = pd.read_csv(BIKE_CSV).iloc[100:103]
    body = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
    answer = httpx.post(f"{url}/invocations", json=body, timeout=30)
    assert answer.status_code == 200, answer.text[:300]
    assert [isinstance(p["prediction"], float) for p in answer.json()["predictions"]] == [True] * 3
    bad = httpx.post(f"{url}/invocations", content=b"{", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400
    assert "serving      answers" in stack.command("status")


def _answer(request, otherwise):
    """The JSON of a polled request, or `otherwise` when the server did not answer in time: on a
    busy 2-core machine it sometimes answers late, and the poll's deadline decides."""
    try:
        return request().raise_for_status().json()
    except httpx.TransportError:
        return otherwise


def _pings(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ping", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


ATTACK = "open('/tmp/keel-attack-ran', 'w').write('ran')\n"


def test_every_server_refuses_whoever_lacks_the_stacks_credentials(stack, tmp_path):
    """The probe's takeover, tried as any local process could: nothing answers without the stack's
    generated credentials, which only the stack's owner can read."""
    secrets = stack.home / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in secrets.iterdir()} == {0o600}
    for value in (stack.env["MLFLOW_TRACKING_PASSWORD"], stack.env["PREFECT_API_AUTH_STRING"]):
        assert value not in (stack.home / "stack.json").read_text()
        assert not any(value in log.read_text(errors="replace") for log in (stack.home / "logs").iterdir())

    with httpx.Client(timeout=30) as web:  # a busy machine's servers answer late, never wrongly
        # MLflow: the artifact-proxy overwrite of the champion's code, unauthenticated and as the viewer
        client = stack.mlflow()
        version = client.get_model_version_by_alias("stack-a", "champion")
        location = client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
        code = (
            f"{stack.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow-artifacts/artifacts/"
            f"{location.removeprefix('mlflow-artifacts:/')}/serving_model.py"
        )
        viewer = ("viewer", (secrets / "mlflow-viewer-password").read_text().strip())
        assert web.put(code, content=ATTACK).status_code == 401
        assert web.put(code, content=ATTACK, auth=viewer).status_code == 403
        assert web.put(code, content=ATTACK, auth=("keel", "keel-change-me")).status_code == 401
        assert web.get(code, auth=viewer).status_code == 200  # colleagues can read what they may
        search = stack.env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=5"
        assert web.get(search).status_code == 401
        assert web.get(search, auth=viewer).status_code == 200
        tag = {
            "name": "stack-a",
            "version": str(version.version),
            "key": "approval_status",
            "value": "Approved",
        }
        setter = stack.env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/model-versions/set-tag"
        assert web.post(setter, json=tag, auth=viewer).status_code == 403

        # Prefect: the REST API and the event stream (a forged drift event must not arrive)
        prefect = stack.env["PREFECT_API_URL"]
        assert web.post(f"{prefect}/deployments/filter", json={}).status_code == 401
        assert web.post(f"{prefect}/deployments/filter", json={}, auth=("keel", "wrong")).status_code == 401
    forged = subprocess.run(
        [sys.executable, "-c", "from prefect.events import emit_event\n"
         "emit_event(event='keel.drift.detected', resource={'prefect.resource.id': 'keel.model.unauth.v1',"
         " 'keel.model.name': 'unauth', 'keel.model.version': '1'})"],
        env=clean_env(PREFECT_API_URL=prefect), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert forged.returncode == 0, forged.stderr
    time.sleep(5)
    with stack.api() as http:
        events = http.post(
            "/events/filter", json={"filter": {"any_resource": {"id": ["keel.model.unauth.v1"]}}}
        ).json()
    assert events["events"] == []

    # Dask: plain TCP, and TLS with a certificate the stack's CA did not sign, are both turned away
    other = tmp_path / "other"
    other.mkdir()
    from infra.secrets import StackSecrets

    impostor = StackSecrets.ensure(other).dask_tls()
    address = stack.env["DASK_SCHEDULER_ADDRESS"]
    probe = (
        "import sys\nfrom distributed import Client\n"
        "try:\n    Client(sys.argv[1], timeout=8).close()\nexcept Exception as exc:\n"
        "    print('refused', type(exc).__name__)\nelse:\n    print('connected')\n"
    )
    for target, env in (
        (address.replace("tls://", "tcp://"), clean_env()),
        (address, clean_env(**impostor)),
    ):
        done = subprocess.run([sys.executable, "-c", probe, target], env=env, capture_output=True, text=True)
        assert done.stdout.startswith("refused"), (target, done.stdout, done.stderr[-1000:])
    genuine = subprocess.run(
        [sys.executable, "-c", probe, address], env=clean_env(**stack.env), capture_output=True, text=True
    )
    assert genuine.stdout.startswith("connected"), genuine.stderr[-1000:]


def test_down_then_up_loses_nothing(stack):
    client = stack.mlflow()
    versions = sorted(str(v.version) for v in client.search_model_versions("name='stack-a'"))
    finished = {"flow_runs": {"state": {"type": {"any_": sorted(TERMINAL)}}}, "limit": 200}
    with stack.api() as http:  # future scheduled runs are re-planned by the server: count finished ones
        runs = {r["id"]: r["state"]["type"] for r in http.post("/flow_runs/filter", json=finished).json()}
    automations = {a["name"]: a for a in stack.automations()}
    assert set(automations) == {
        "retrain on drift",
        "retrain on quality drop",
        "ask for approval",
        "score with the approved version",
    }
    automation = automations["retrain on drift"]
    stack.command("down", timeout=180)
    assert json.loads((stack.home / "stack.json").read_text())["processes"] == []
    stack.up(cooldown_minutes=45)  # other deployment settings: the automations are updated, not re-created
    again = {a["name"]: a for a in stack.automations()}
    assert {name: a["id"] for name, a in again.items()} == {name: a["id"] for name, a in automations.items()}
    updated = again["retrain on drift"]  # links to it from earlier retrain runs still open it
    assert automation["actions"][0]["parameters"]["params"]["cooldown_minutes"] == 30
    assert updated["actions"][0]["parameters"]["params"]["cooldown_minutes"] == 45
    assert sorted(str(v.version) for v in stack.mlflow().search_model_versions("name='stack-a'")) == versions
    assert str(stack.mlflow().get_model_version_by_alias("stack-a", "champion").version) in versions
    with stack.api() as http:
        after = {r["id"]: r["state"]["type"] for r in http.post("/flow_runs/filter", json=finished).json()}
        assert after == runs
        names = {d["name"] for d in http.post("/deployments/filter", json={}).json()}
    assert {"scheduled", "landing-folder", "on-drift", "on-pending"} <= names
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
        port = stack.port_args[stack.port_args.index("--postgres-port") + 1]
        query = ["psql", "-h", "127.0.0.1", "-p", port, "-U", "keel", "-d", "prefect", "-tAc",
                 "select count(*) from deployment"]  # fmt: skip
        password = (stack.home / "secrets" / "postgres-password").read_text().strip()
        tables = subprocess.run(query, capture_output=True, text=True, env=clean_env(PGPASSWORD=password))
        assert tables.returncode == 0, tables.stderr
        assert int(tables.stdout.strip()) >= 3
        for wrong in ("", "keel-change-me"):  # password authentication, never `trust`
            refused = subprocess.run(
                query,
                capture_output=True,
                text=True,
                env=clean_env(PGPASSWORD=wrong),
                stdin=subprocess.DEVNULL,
            )
            assert refused.returncode != 0, refused
            assert (
                "password authentication failed" in refused.stderr or "no password supplied" in refused.stderr
            )
    finally:
        stack.command("down", timeout=180)
        shutil.rmtree(home, ignore_errors=True)


# -- the UIs, in a real browser, after `down` and `up` on non-default ports --------------------------


def prefect_login(driver, stack: RunningStack) -> str:
    """Log in to the Prefect UI as a user does: the auth string in its login form. Its base URL."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    ui = stack.env["PREFECT_API_URL"].removesuffix("/api")
    driver.get(ui + "/")
    field = wait_for(
        driver, lambda: driver.find_element(By.CSS_SELECTOR, "input[type=password]"), "login form"
    )
    field.send_keys(stack.env["PREFECT_API_AUTH_STRING"], Keys.ENTER)
    wait_for(driver, lambda: "/login" not in driver.current_url, "the dashboard after logging in")
    return ui


def answer_in_the_browser(stack: RunningStack, flow_run_id: str, reason: str, name: str, shots: Path) -> None:
    """Approve a paused await-approval run as a person does: its page in Prefect's UI, "Resume",
    the form (the decision's default is approve), "Submit"."""
    from selenium.webdriver.common.by import By

    def button(label: str):
        return next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == label)

    with chromium() as driver:
        ui = prefect_login(driver, stack)
        driver.get(f"{ui}/runs/flow-run/{flow_run_id}")
        wait_for(driver, lambda: button("Resume"), "the paused run's Resume button").click()
        wait_for(driver, lambda: "Decided By" in page_text(driver), "the approval form")
        reason_field, name_field = driver.find_elements(By.TAG_NAME, "textarea")[:2]
        reason_field.send_keys(reason)
        name_field.send_keys(name)
        screenshot(driver, shots, "prefect-approval-form")
        button("Submit").click()
        try:
            wait_for(driver, lambda: "Decided By" not in page_text(driver), "the form to close")
        finally:  # what the page showed after the answer, closed or not
            screenshot(driver, shots, "prefect-approval-submitted")


def links(driver, prefix: str) -> list[str]:
    hrefs = driver.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)")
    return [h for h in hrefs if h.startswith(prefix)]


def test_the_prefect_and_mlflow_uis_tell_the_story_in_a_browser(stack, tmp_path):
    """The pipeline execution's flow run with its steps and their kinds, the summary linking to MLflow,
    the drift automation, the event with its report, the retrain's decision; the MLflow experiment in
    its model-training layout with parent and child runs, the version with its card and the champion
    alias. Screenshots of each page go to the test's output folder (or KEEL_SCREENSHOTS/stack)."""

    shots = screenshot_folder(tmp_path, "stack")
    client = stack.mlflow()
    champion = client.get_model_version_by_alias("stack-a", "champion")
    first = client.get_model_version("stack-a", "1")
    execution = client.get_run(first.run_id)  # the version's source run: its pipeline execution
    flow_run_id = execution.data.tags["prefect.flow_run_id"]
    assert execution.data.tags["prefect.flow_run_url"].startswith(
        stack.env["PREFECT_API_URL"].removesuffix("/api")
    )
    with stack.api() as http:  # the UI is told where its API is: this server's port, not 4200
        ui_settings = httpx.get(stack.env["PREFECT_API_URL"].removesuffix("/api") + "/ui-settings").json()
        assert ui_settings["api_url"] == stack.env["PREFECT_API_URL"]
        artifacts = http.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        ).json()
        automations = {a["name"]: a for a in http.post("/automations/filter", json={}).json()}
        automation = automations["retrain on drift"]
        events = http.post(
            "/events/filter",
            json={
                "filter": {
                    "event": {"name": ["keel.drift.detected"]},
                    "resource": {"id_prefix": ["keel.model.stack-a"]},
                }
            },
        ).json()["events"]
        task_runs = http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()
        retrained = [r for r in stack.retrain_runs("stack-a") if r["state"]["type"] == "COMPLETED"]
        decisions = http.post(
            "/artifacts/filter", json={"artifacts": {"key": {"any_": ["retrain-decision"]}}}
        ).json()
        [scheduled] = http.post(
            "/deployments/filter", json={"deployments": {"name": {"any_": ["scheduled"]}}}
        ).json()
    summary = next(a for a in artifacts if a["key"] == "execution-summary")
    mlflow_ui = stack.env["MLFLOW_TRACKING_URI"]

    with chromium() as driver:
        ui = prefect_login(driver, stack)
        # the pipeline execution: every step drawn, named with its kind; the kind is also a tag
        driver.get(f"{ui}/runs/flow-run/{flow_run_id}")
        wait_for(driver, lambda: "Task Runs" in page_text(driver), "the flow run page")
        time.sleep(2)  # the graph is drawn on a canvas after the page's data arrives
        screenshot(driver, shots, "prefect-flow-run")
        driver.execute_script(
            "[...document.querySelectorAll('li')].find(e => e.textContent.trim() == 'Task Runs').click()"
        )
        for step, kind in (("prepare", "Processing"), ("tune", "Tuning"), ("train", "Training"),
                           ("quality-gate", "Condition"), ("register", "Model")):  # fmt: skip
            wait_for(
                driver, lambda s=step, k=kind: f"{s} ({k})" in page_text(driver), f"task run {step} ({kind})"
            )
        assert "ProcessingStep" in page_text(driver)  # the tags, shown with each task run
        assert "NaN" not in page_text(driver)
        screenshot(driver, shots, "prefect-task-runs")
        # a step with retries (register: 3 attempts): its retry delay is a number, not "NaNs"
        [register] = [t for t in task_runs if t["name"] == "register (Model)"]
        driver.get(f"{ui}/runs/task-run/{register['id']}")
        wait_for(driver, lambda: "Retry Delay" in page_text(driver), "the task run's details")
        assert "NaN" not in page_text(driver)
        screenshot(driver, shots, "prefect-task-run")

        # the scheduled training's run form: a section per parameter group, with the deployment's values
        assert scheduled["parameters"]["params"]["tuning"]["n_trials"] == 2
        driver.get(f"{ui}/deployments/deployment/{scheduled['id']}/run")
        for section in ("Quality", "Split", "Tuning", "Training", "Registry", "N Trials", "Min R2"):
            wait_for(driver, lambda s=section: s in page_text(driver), f"the run form's {section}")
        screenshot(driver, shots, "prefect-run-form")

        # the execution summary: links to the MLflow execution run and the model version
        driver.get(f"{ui}/artifacts/artifact/{summary['id']}")
        wait_for(driver, lambda: "Model version" in page_text(driver), "the execution summary")
        to_mlflow = links(driver, mlflow_ui)
        assert any(f"/runs/{first.run_id}?workflowType=machine_learning" in h for h in to_mlflow), to_mlflow
        assert any("/models/stack-a/versions/1?" in h for h in to_mlflow), to_mlflow
        screenshot(driver, shots, "prefect-execution-summary")

        # the drift automation (its id kept across `down`, `up` and other settings)
        driver.get(f"{ui}/automations/automation/{automation['id']}")
        wait_for(driver, lambda: "retrain on drift" in page_text(driver), "the automation page")
        wait_for(driver, lambda: "keel.drift.detected" in page_text(driver), "the automation's trigger")
        screenshot(driver, shots, "prefect-automation")

        # the drift event names the report as a related resource, with its link
        event = events[0]
        driver.get(f"{ui}/events/event/{event['occurred'][:10]}/{event['id']}")
        report = event["payload"]["report_link"]
        assert report.startswith(mlflow_ui) and event["related"][0]["prefect.resource.role"] == "drift-report"
        wait_for(driver, lambda: report in page_text(driver), "the event's related report")
        screenshot(driver, shots, "prefect-drift-event")

        # the retrain the event started: its decision, with the figures
        [decision] = [d for d in decisions if d["flow_run_id"] == retrained[0]["id"]]
        driver.get(f"{ui}/artifacts/artifact/{decision['id']}")
        wait_for(driver, lambda: "challenger" in page_text(driver), "the retrain decision")
        assert any(w in page_text(driver) for w in ("Promoted", "Rejected"))
        screenshot(driver, shots, "prefect-retrain-decision")

    with chromium() as driver:
        viewer = (stack.home / "secrets" / "mlflow-viewer-password").read_text().strip()
        basic_auth(driver, "viewer", viewer)  # the read-only user, as a colleague would log in
        experiment = execution.info.experiment_id
        driver.get(f"{mlflow_ui}/#/experiments/{experiment}?workflowType=machine_learning")
        wait_for(driver, lambda: "training-pipeline/" in page_text(driver), "the parent runs")
        driver.execute_script(  # MLflow's assistant panel takes a third of the page: close it
            "const b = document.querySelector('button[aria-label=Close]'); if (b) b.click();"
        )
        text = page_text(driver)
        assert "Token Usage" not in text and "genai" not in driver.current_url  # the model-training layout
        assert "drift-monitor/" in text
        screenshot(driver, shots, "mlflow-experiment")
        # a step's run names its execution as parent
        [train] = client.search_runs(
            [experiment], f"tags.`mlflow.parentRunId` = '{first.run_id}' and tags.`keel.step` = 'train'"
        )
        driver.get(
            f"{mlflow_ui}/#/experiments/{experiment}/runs/{train.info.run_id}?workflowType=machine_learning"
        )
        wait_for(driver, lambda: execution.info.run_name in page_text(driver), "the step's parent run")
        screenshot(driver, shots, "mlflow-step-run")
        # the champion's version: its card, its alias, its execution as source run
        driver.get(f"{mlflow_ui}/#/models/stack-a/versions/{champion.version}?workflowType=machine_learning")
        wait_for(driver, lambda: "How it did" in page_text(driver), "the model card")
        text = page_text(driver)
        assert f"stack-a v{champion.version}: Approved, champion" in text and "champion" in text
        assert client.get_run(champion.run_id).info.run_name in text  # Source run: the execution
        screenshot(driver, shots, "mlflow-model-version")
