"""The compose file and the Kubernetes manifests cannot run here (no container engine), so they are
checked for what the code expects: they parse, use the same images, ports and variables as each
other and as the local stack, and the settings they pass are read by the code the way they mean."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from infra.stack import PORTS, Stack
from tests.conftest import ROOT

INFRA = ROOT / "infra"
SHARED = {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "DASK_SCHEDULER_ADDRESS"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose" / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((INFRA / "k8s" / "keel.yaml").read_text()))
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def containers(k8s: dict[str, dict]) -> dict[str, dict]:
    found = {}
    for key, doc in k8s.items():
        if key.split("/")[0] in {"Deployment", "StatefulSet", "Job"}:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                found[container["name"]] = container
    return found


def locked(name: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return next(p["version"] for p in lock["package"] if p["name"] == name)


def test_same_services_and_images_in_compose_and_kubernetes(compose, k8s):
    compose_images = {name: s["image"] for name, s in compose["services"].items()}
    k8s_images = {name: c["image"] for name, c in containers(k8s).items()}
    assert compose_images == k8s_images
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {compose_images[s] for s in ("mlflow", "dask-scheduler", "dask-worker", "deployments")} == {
        f"keel:{project['version']}"
    }
    assert compose_images["prefect-server"] == f"prefecthq/prefect:{locked('prefect')}-python3.11"


def test_the_project_image_is_built_from_the_lock_with_every_package():
    dockerfile = (INFRA / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    uv_version = re.search(r"UV_VERSION := (\S+)", makefile).group(1)
    assert f"ghcr.io/astral-sh/uv:{uv_version} " in dockerfile
    assert "uv sync --locked" in dockerfile and "FROM python:3.11" in dockerfile
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"][
        "wheel"
    ]
    for package in packages["packages"]:
        assert f"COPY {package} {package}" in dockerfile


def test_same_ports_as_the_local_stack(compose, k8s):
    services = compose["services"]
    assert f"--port={PORTS['mlflow']}" in services["mlflow"]["command"]
    assert ["--port", str(PORTS["prefect"])] == services["prefect-server"]["command"][-2:]
    assert str(PORTS["dask"]) in services["dask-scheduler"]["command"]
    assert f":{PORTS['dask_dashboard']}" in services["dask-scheduler"]["command"]
    k8s_ports = {
        name.split("/")[1]: {p["port"] for p in doc["spec"]["ports"]}
        for name, doc in k8s.items()
        if name.startswith("Service/")
    }
    assert PORTS["prefect"] in k8s_ports["prefect-server"] and PORTS["mlflow"] in k8s_ports["mlflow"]
    assert {PORTS["dask"], PORTS["dask_dashboard"]} <= k8s_ports["dask-scheduler"]


def test_same_variables_everywhere_and_the_code_reads_them(compose, k8s, monkeypatch):
    compose_env = compose["x-keel-env"]
    config = k8s["ConfigMap/keel-env"]["data"]
    assert {
        k: v for k, v in compose_env.items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL"
    } == config
    local = Stack(ROOT / ".keel" / "never-created").env({"ports": PORTS})
    assert set(local) >= SHARED and set(config) >= SHARED
    for variable in SHARED:  # same service, same port: only the host differs
        assert local[variable].split(":")[-1] == config[variable].split(":")[-1]
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    from tasks.settings import Settings

    settings = Settings()
    assert settings.tracking_uri == config["MLFLOW_TRACKING_URI"] and not settings.embedded_mlflow
    assert settings.dask_scheduler_address == config["DASK_SCHEDULER_ADDRESS"]
    assert settings.prefect_api_url == config["PREFECT_API_URL"]
    assert settings.datasets_root == config["KEEL_DATA_DIR"]
    # inputs only from the landing and data prefixes, over S3 only: the roots are set by default
    assert settings.data_access.roots == ("s3://keel/landing", "s3://keel/data")
    assert settings.data_access.schemes == ("s3",)
    flags = dict(
        zip(
            compose["services"]["deployments"]["command"][3::2],
            compose["services"]["deployments"]["command"][4::2],
            strict=True,
        )
    )
    assert settings.data_access.roots is not None and any(
        flags["--landing"] == r for r in settings.data_access.roots
    )
    stack = Stack(ROOT / ".keel" / "never-created")
    assert local["KEEL_DATA_ROOTS"].split(",") == [str(stack.home.resolve() / "landing"), str(ROOT / "data")]


def test_lean_mlflow_and_the_deployments_runner(compose, k8s):
    for command, env in (
        (compose["services"]["mlflow"]["command"], compose["services"]["mlflow"]["environment"]),
        (
            containers(k8s)["mlflow"]["command"],
            {e["name"]: e["value"] for e in containers(k8s)["mlflow"]["env"]},
        ),
    ):
        assert "--workers=1" in command and env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
        assert any(a.startswith("--backend-store-uri=postgresql://") for a in command)
        assert "--artifacts-destination=s3://mlflow/artifacts" in command
    from deployments.serve import ServeSettings

    for command in (compose["services"]["deployments"]["command"], containers(k8s)["deployments"]["command"]):
        assert command[:3] == ["python", "-m", "deployments.serve"]
        flags = dict(zip(command[3::2], command[4::2], strict=True))
        ServeSettings.model_validate({k.removeprefix("--").replace("-", "_"): v for k, v in flags.items()})
