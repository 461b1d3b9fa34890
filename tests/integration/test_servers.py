"""The same pipeline against a real MLflow tracking server and a real Prefect server, both started
here on 127.0.0.1 and stopped by PID; only the ecosystem's environment variables change."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

import pandas as pd
import pytest

from flows.pipeline import training_pipeline
from tests.conftest import BIKE_CSV, ROOT, clean_env

pytestmark = [pytest.mark.servers, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(servers, dask_cluster) -> subprocess.CompletedProcess:
    """The pipeline, once, as a new process against the servers: `bike-served` v1 is the champion."""
    env = servers.env(DASK_SCHEDULER_ADDRESS=dask_cluster.address, KEEL_STATE_DIR=str(servers.home / "state"))
    return subprocess.run(
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


def test_pipeline_records_to_real_mlflow_and_prefect_servers(servers, served):
    proc = served
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "models:/bike-served/1 status=Approved" in proc.stdout

    import mlflow

    server = servers.mlflow_uri
    client = mlflow.MlflowClient(tracking_uri=server, registry_uri=server)  # not this process's defaults
    version = client.get_model_version_by_alias("bike-served", "champion")
    flow_run_id = client.get_run(version.run_id).data.tags["prefect.flow_run_id"]  # its execution
    assert version.tags["approval_status"] == "Approved"
    # the artifacts went through the server: a client that knows only its URL can load the model
    mlflow.set_tracking_uri(server)
    mlflow.set_registry_uri(server)
    with tempfile.TemporaryDirectory() as copy:  # MLflow keeps a download without dst_path
        model = mlflow.pyfunc.load_model("models:/bike-served@champion", dst_path=copy)
    assert model.metadata.signature is not None

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with SyncPrefectClient(servers.prefect_api) as prefect:
        flow_run = prefect.read_flow_run(flow_run_id)
        task_runs = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    assert flow_run.state.is_completed()
    assert {t.name.split(" (")[0] for t in task_runs} == set(training_pipeline.steps) - {
        "quality-gate-failed"
    }
    assert all(len(t.tags) == 1 and t.tags[0].endswith("Step") for t in task_runs)
    assert all(t.state.is_completed() for t in task_runs)


ATTACK = """from pathlib import Path
Path({marker!r}).write_text("ran")
"""


def test_a_model_file_replaced_through_the_artifact_proxy_is_refused_and_never_runs(
    servers, served, tmp_path
):
    """The probe's attack: an HTTP PUT to the server's artifact proxy replaces the model's code. Plain
    `mlflow.pyfunc.load_model` then runs it; keel's loaders refuse the model, naming the file."""
    import urllib.request

    assert served.returncode == 0, served.stdout[-3000:]
    client = servers.mlflow_client()
    version = client.get_model_version_by_alias("bike-served", "champion")
    location = client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
    assert location.startswith("mlflow-artifacts:/"), location
    marker = tmp_path / "attacker-code-ran"
    put = urllib.request.Request(
        f"{servers.mlflow_uri}/api/2.0/mlflow-artifacts/artifacts/"
        f"{location.removeprefix('mlflow-artifacts:/')}/serving_model.py",
        data=ATTACK.format(marker=str(marker)).encode(),
        method="PUT",
    )
    with urllib.request.urlopen(put, timeout=30) as answer:
        assert answer.status == 200

    env = servers.env(KEEL_STATE_DIR=str(tmp_path / "state"))
    subprocess.run(
        [sys.executable, "-c", f"import mlflow; mlflow.pyfunc.load_model('models:/bike-served@champion', dst_path={str(tmp_path)!r})"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert marker.exists(), "the attack did not reach the model: this test proves nothing"
    marker.unlink()

    batch = tmp_path / "week.csv"
    frame = pd.read_csv(BIKE_CSV)
    frame[frame.dteday.between("2011-09-05", "2011-09-11")].to_csv(batch, index=False)
    monitor = subprocess.run(
        [sys.executable, "-m", "flows.monitor", "--batch", str(batch), "--model-name", "bike-served"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = monitor.stdout + monitor.stderr
    assert monitor.returncode != 0, output[-3000:]
    assert "serving_model.py" in output and "not those that were logged" in output, output[-3000:]
    assert not marker.exists()


def test_the_manifests_mlflow_server_answers_its_service_name_and_its_probes(tmp_path):
    """Compose and Kubernetes clients call MLflow as `mlflow:5000`; MLflow refuses Host headers it does
    not know (403) while /health still answers 200. The manifests' own server arguments (stores
    swapped for local ones), their basic-auth app, probes and users job, replayed against a real server."""
    import urllib.error
    import urllib.request

    import yaml

    from infra import mlflow_auth
    from infra.processes import BIN, free_port, http_ok, start, stop, wait_until

    compose = yaml.safe_load((ROOT / "infra" / "compose" / "compose.yaml").read_text())
    kept = [
        a
        for a in compose["services"]["mlflow"]["command"][2:]
        if not a.startswith(("--host=", "--port=", "--backend-store-uri=", "--artifacts-destination="))
    ]
    assert "--app-name=basic-auth" in kept
    port = free_port()  # the users job is replayed against this port: its Host must be allowed too
    kept = [f"{a},127.0.0.1:{port}" if a.startswith("--allowed-hosts=") else a for a in kept]
    uri = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow.log"
    passwords = {name: f"test-{name.lower()}-{port}" for name in mlflow_auth.PASSWORD_VARIABLES.values()}
    config = mlflow_auth.write_config(tmp_path / "auth.ini", f"sqlite:///{tmp_path / 'auth.db'}")
    server = start(
        [
            str(BIN / "mlflow"), "server", "--host=127.0.0.1", f"--port={port}", *kept,
            f"--backend-store-uri=sqlite:///{tmp_path / 'mlflow.db'}", f"--artifacts-destination={tmp_path / 'art'}",
        ],
        log,
        env={
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": passwords["MLFLOW_AUTH_ADMIN_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-signing-key",
        },
    )  # fmt: skip
    try:
        wait_until(lambda: http_ok(f"{uri}/health"), "mlflow server", 120, [server], log)

        def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
            command = [sys.executable if c == "python" else c for c in command]
            command = [
                c.replace("http://localhost:5000", uri).replace("http://mlflow:5000", uri) for c in command
            ]
            return subprocess.run(
                command, cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=120
            )

        docs = yaml.safe_load_all((ROOT / "infra" / "k8s" / "keel.yaml").read_text())
        [deployment] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
        k8s_probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"][
            "command"
        ]
        compose_probe = compose["services"]["mlflow"]["healthcheck"]["test"][1:]
        admin = {"MLFLOW_AUTH_ADMIN_PASSWORD": passwords["MLFLOW_AUTH_ADMIN_PASSWORD"]}
        for probe in (k8s_probe, compose_probe):
            assert "mlflow:5000" in probe
            assert run(probe, **admin).returncode == 0
            assert run(probe, MLFLOW_AUTH_ADMIN_PASSWORD="wrong").returncode == 1
        users = run(compose["services"]["mlflow-users"]["command"], **passwords)
        assert users.returncode == 0 and "keel, viewer" in users.stdout, users.stderr
        assert "none (all existed)" in run(compose["services"]["mlflow-users"]["command"], **passwords).stdout

        def status(path: str, host: str, auth: tuple[str, str] | None = None) -> int:
            headers = {"Host": host}
            if auth:
                import base64

                headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
            request = urllib.request.Request(f"{uri}{path}", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    return answer.status
            except urllib.error.HTTPError as refused:
                return refused.code

        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        keel = ("keel", passwords["MLFLOW_KEEL_PASSWORD"])
        assert status(search, "mlflow:5000", keel) == 200
        assert status(search, "mlflow:5000") == 401
        assert status(search, "attacker.example", keel) == 403
        assert status("/health", "attacker.example") == 200  # why /health alone proves nothing
    finally:
        stop([server])


def readme_example() -> tuple[str, str]:
    """The README's "Write your own pipeline" example: its file name and its code, as printed."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- example: (\S+) -->\n```python\n(.*?)```\n<!-- /example -->", text, re.DOTALL)
    assert found, "the README lost its example pipeline"
    return found.group(1), found.group(2)


def test_readme_example_pipeline_runs_in_a_package_of_its_own(servers, tmp_path):
    """A user's pipeline, outside the project: written from the README, run as its README says,
    against real servers; a cached re-run; a comment that changes nothing; an edit that misses."""
    import mlflow
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    path, code = readme_example()
    project = tmp_path / "userproject"
    module = project / path
    module.parent.mkdir(parents=True)
    (module.parent / "__init__.py").write_text("")
    module.write_text(code)
    git = ["git", "-c", "user.name=u", "-c", "user.email=u@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "."], cwd=project, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "churn"], cwd=project, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True
    ).stdout.strip()
    scratch = tmp_path / "tmp"  # the runs' temporary directory
    scratch.mkdir()
    env = servers.env(
        KEEL_STATE_DIR=str(project / ".keel"), MLFLOW_EXPERIMENT_NAME="churnlab-it", TMPDIR=str(scratch)
    )
    name = module.with_suffix("").relative_to(project).as_posix().replace("/", ".")

    def run(*flags: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", name, "--model-name", "churn-it", *flags],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    client = servers.mlflow_client()
    experiment = client.get_experiment_by_name("churnlab-it")

    def last_execution() -> tuple[object, dict[str, object]]:
        experiment_id = client.get_experiment_by_name("churnlab-it").experiment_id
        runs = client.search_runs(
            [experiment_id], "tags.`keel.pipeline` = 'churn'", order_by=["attributes.start_time DESC"]
        )
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        return parent, {c.data.tags["keel.step"]: c for c in children}

    assert experiment is None  # nothing before the first run
    first = run()
    assert first.stdout.strip().endswith("models:/churn-it/1")
    copies = [
        m.parent
        for m in scratch.rglob("MLmodel")
        if not m.relative_to(scratch).parts[0].startswith("keel-process-")
    ]
    assert copies == [], "evaluate's load_model left a copy of the model behind"
    parent, steps = last_execution()
    assert parent.data.tags.get("mlflow.source.git.commit") == head, (
        parent.data.tags
    )  # the user's repository, not keel's
    assert set(steps) == {"ingest", "featurize", "train", "evaluate", "quality-gate", "register"}

    def contexts(step: str) -> set[str]:
        return {
            t.value
            for i in steps[step].inputs.dataset_inputs
            for t in i.tags
            if t.key == "mlflow.data.context"
        }

    assert contexts("featurize") == {"raw"} and contexts("train") == {"data"}
    assert contexts("evaluate") == {"data"}
    featurized = steps["featurize"].data.tags  # the DataFrames it returned, stored and passed on
    assert (
        int(featurized["keel.output.output.train.rows"]) + int(featurized["keel.output.output.test.rows"])
        == 5000
    )
    assert featurized["keel.output.output.train.uri"].endswith("/featurize/train")
    assert steps["train"].data.tags["keel.input.data.digest"] == featurized["keel.output.output.train.digest"]

    version = client.get_model_version("churn-it", "1")
    assert version.run_id == parent.info.run_id and version.tags["approval_status"] == "Approved"
    mlflow.set_tracking_uri(servers.mlflow_uri)
    mlflow.set_registry_uri(servers.mlflow_uri)
    model = mlflow.pyfunc.load_model("models:/churn-it@champion", dst_path=str(tmp_path))
    sample = pd.DataFrame({"tenure": [2, 60], "monthly_charges": [110.0, 25.0]})
    sample["charges_per_tenure_month"] = sample.monthly_charges / sample.tenure
    assert len(model.predict(sample)) == 2

    with SyncPrefectClient(servers.prefect_api) as prefect:
        flow_run_id = parent.data.tags["prefect.flow_run_id"]
        task_runs = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    assert {t.name for t in task_runs} == {
        "ingest (Processing)",
        "featurize (Processing)",
        "train (Training)",
        "evaluate (Processing)",
        "quality-gate (Condition)",
        "register (Model)",
    }

    # a comment changes nothing: every cached step is a hit, and the model keeps its version
    module.write_text(code.replace("# stands for your own source", "# where your data comes from"))
    again = run()
    assert again.stdout.strip().endswith("models:/churn-it/1")
    _, steps = last_execution()
    for step in ("ingest", "featurize", "train", "evaluate"):
        assert steps[step].data.tags["keel.cache.status"] == "hit", step

    # an edit of a step's body misses, naming the code that changed; what depends on it runs again
    module.write_text(code.replace("len(frame) * 0.8", "len(frame) * 0.75"))
    edited = run()
    assert edited.stdout.strip().endswith("models:/churn-it/2")
    _, steps = last_execution()
    assert steps["ingest"].data.tags["keel.cache.status"] == "hit"
    featurize = steps["featurize"].data.tags
    assert featurize["keel.cache.status"] == "miss"
    assert f"code:{name}.featurize changed" in featurize["keel.cache.reason"], featurize["keel.cache.reason"]
    assert "input:data changed" in steps["train"].data.tags["keel.cache.reason"]
