"""The compose file and the Kubernetes manifests cannot run here (no container engine), so they are
checked for what the code expects: they parse, use the same images, ports and variables as each
other and as the local stack, and the settings they pass are read by the code the way they mean."""

from __future__ import annotations

import json
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
    local = Stack(ROOT / ".keel" / "never-created").addresses({"ports": PORTS})
    assert set(local) >= SHARED and set(config) >= SHARED
    for variable in SHARED:  # same service, same port: only the host differs
        assert local[variable].split(":")[-1] == config[variable].split(":")[-1]
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    from tasks.steps.settings import Settings

    settings = Settings()
    assert settings.tracking_uri == config["MLFLOW_TRACKING_URI"] and not settings.embedded_mlflow
    assert settings.dask_scheduler_address == config["DASK_SCHEDULER_ADDRESS"]
    assert settings.prefect_api_url == config["PREFECT_API_URL"]
    assert settings.datasets_root == config["KEEL_DATA_DIR"]
    # inputs only from the landing and data prefixes, over S3 only: the roots are set by default
    assert settings.data_access.roots == ("s3://keel/landing", "s3://keel/data")
    assert settings.data_access.schemes == ("s3",)
    command = compose["services"]["deployments"]["command"]
    landing = command[command.index("--landing") + 1]
    assert settings.data_access.roots is not None and landing in settings.data_access.roots

    stack = Stack(ROOT / ".keel" / "never-created")
    assert local["KEEL_DATA_ROOTS"].split(",") == [
        *(str(stack.home.resolve() / f) for f in ("landing", "to-score", "scored")),
        str(ROOT / "data"),
    ]


def test_lean_mlflow_and_the_deployments_runner(compose, k8s):
    for command, env in (
        (compose["services"]["mlflow"]["command"], compose["services"]["mlflow"]["environment"]),
        (
            containers(k8s)["mlflow"]["command"],
            {e["name"]: e.get("value") for e in containers(k8s)["mlflow"]["env"]},
        ),
    ):
        assert "--workers=1" in command and env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
        assert any(a.startswith("--backend-store-uri=postgresql://") for a in command)
        assert "--artifacts-destination=s3://mlflow/artifacts" in command
    from deployments.serve import ServeSettings
    from tasks.steps.cli import parse_params

    for command in (compose["services"]["deployments"]["command"], containers(k8s)["deployments"]["command"]):
        assert command[:3] == ["python", "-m", "deployments.serve"]
        parse_params(ServeSettings, command[3:], "serve", "")  # the flags serve takes, checked by it


# -- secrets and who reaches what (issue 13) -------------------------------------------------------
REQUIRED = re.compile(r"\$\{(\w+):\?[^}]+\}")


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return [str(node)]


def test_no_credential_is_committed_and_a_missing_secret_stops_with_its_name(compose, k8s):
    from infra.secrets import CLUSTER_SECRETS

    text = (INFRA / "compose" / "compose.yaml").read_text()
    assert ":-" not in text, "a silent default: use ${NAME:?message}"
    assert "change-me" not in text and "change-me" not in (INFRA / "k8s" / "keel.yaml").read_text()
    assert set(REQUIRED.findall(text)) == set(CLUSTER_SECRETS)  # every one generated, every one used
    assert not re.search(r"\$\{\w+\}", text), "a bare ${NAME} is empty when unset"
    assert not [key for key in k8s if key.startswith("Secret/")]  # created from the generated .env
    referenced = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for c in containers(k8s).values()
        for e in c.get("env", [])
        if "valueFrom" in e
    }
    assert referenced == set(CLUSTER_SECRETS)
    for container in containers(k8s).values():  # a key each, never the whole secret
        assert all("secretRef" not in source for source in container.get("envFrom", []))


def test_minio_root_credentials_reach_only_minio_and_its_setup_job(compose, k8s):
    holders = {n for n, s in compose["services"].items() if "MINIO_ROOT_PASSWORD" in str(s)}
    assert holders == {"minio", "minio-setup"}
    holders = {n for n, c in containers(k8s).items() if "MINIO_ROOT_PASSWORD" in str(c.get("env"))}
    assert holders == {"minio", "minio-setup"}
    setup = k8s["ConfigMap/minio-setup"]["data"]
    for name in ("setup.sh", "keel-data.json", "mlflow-artifacts.json"):
        assert setup[name] == (INFRA / "minio" / name).read_text()
    # each S3 user's keys: `keel` for flows (workers, deployments), `mlflow` for the MLflow server
    services = compose["services"]
    assert services["mlflow"]["environment"]["AWS_ACCESS_KEY_ID"] == "mlflow"
    for name in ("dask-worker", "deployments"):
        assert services[name]["environment"]["AWS_ACCESS_KEY_ID"] == "keel"
    policy = json.loads((INFRA / "minio" / "keel-data.json").read_text())
    writable = [r for s in policy["Statement"] if "s3:PutObject" in s["Action"] for r in s["Resource"]]
    assert writable == ["arn:aws:s3:::keel/datasets/*"]  # flows never write the landing or data folders


def test_the_prefect_ui_is_told_the_api_address_the_browser_reaches(compose, k8s):
    """Without PREFECT_UI_API_URL the UI calls port 4200 of the browser's machine, whatever was published."""
    prefect = compose["services"]["prefect-server"]
    published = prefect["ports"][0].rsplit(":", 1)[0]  # 127.0.0.1:4200
    assert prefect["environment"]["PREFECT_UI_API_URL"] == f"http://{published}/api"
    env = {e["name"]: e.get("value") for e in containers(k8s)["prefect-server"]["env"]}
    assert (
        env["PREFECT_UI_API_URL"] == "http://localhost:4200/api"
    )  # `kubectl port-forward svc/prefect-server 4200`


def test_every_server_requires_credentials(compose, k8s):
    services = compose["services"]
    assert "--app-name=basic-auth" in services["mlflow"]["command"]
    assert services["mlflow"]["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/app/infra/mlflow_auth.ini"
    assert "default_permission = NO_PERMISSIONS" in (INFRA / "mlflow_auth.ini").read_text()
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    assert services["deployments"]["environment"]["PREFECT_API_AUTH_STRING"].startswith("keel:${")
    for name in ("dask-scheduler", "dask-worker"):
        command = services[name]["command"]
        assert {"--tls-ca-file", "--tls-cert", "--tls-key"} <= set(command)
    assert compose["x-keel-env"]["DASK_SCHEDULER_ADDRESS"].startswith("tls://")
    assert "POSTGRES_INITDB_ARGS" in services["postgres"]["environment"]
    for name, service in services.items():  # no password in a command line (`ps` shows those)
        assert not re.search(r"://\w+:[^@/]+@", " ".join(map(str, service.get("command", [])))), name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    for name in ("dask-worker", "deployments"):  # artifacts through MLflow, never presigned S3 URLs
        assert services[name]["environment"]["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false"
        env = {e["name"]: e.get("value") for e in containers(k8s)[name]["env"]}
        assert env["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false"
    k8s_commands = {n: " ".join(c.get("command", []) + c.get("args", [])) for n, c in containers(k8s).items()}
    assert "--app-name=basic-auth" in k8s_commands["mlflow"]
    assert "--protocol tls" in k8s_commands["dask-scheduler"]
    assert all(not re.search(r"://\w+:[^@/]+@", c) for c in k8s_commands.values())


SERVICE_PORTS = {
    "postgres": 5432,
    "minio": 9000,
    "prefect-server": 4200,
    "mlflow": 5000,
    "dask-scheduler": 8786,
}


def test_network_policies_let_only_the_components_that_need_a_service_reach_it(k8s):
    """Deny by default; each service is reachable only from the pods whose configuration names it."""
    assert k8s["NetworkPolicy/default-deny-ingress"]["spec"]["podSelector"] == {}
    shared = " ".join(_strings(k8s["ConfigMap/keel-env"]["data"]))
    uses: dict[str, set[str]] = {service: set() for service in SERVICE_PORTS}
    for name, container in containers(k8s).items():
        text = " ".join(_strings({k: v for k, v in container.items() if k != "name"}))
        if any(s.get("configMapRef", {}).get("name") == "keel-env" for s in container.get("envFrom", [])):
            text += " " + shared
        for service, port in SERVICE_PORTS.items():
            if f"{service}:{port}" in text and name != service:
                uses[service].add(name)
    # Dask workers get the shared ConfigMap, but nothing on a worker talks to Prefect (the
    # topology test in tests/integration runs pipeline, monitor and retrain with that enforced).
    uses["prefect-server"].discard("dask-worker")
    for service, port in SERVICE_PORTS.items():
        policy = k8s[f"NetworkPolicy/{service}-ingress"]["spec"]
        [rule] = policy["ingress"]
        allowed = {source["podSelector"]["matchLabels"]["app"] for source in rule["from"]}
        assert allowed == uses[service], service
        assert [p["port"] for p in rule["ports"]] == [port]
    workers = k8s["NetworkPolicy/dask-worker-ingress"]["spec"]["ingress"][0]
    assert {s["podSelector"]["matchLabels"]["app"] for s in workers["from"]} == {
        "dask-scheduler",
        "dask-worker",
        "deployments",
    }


def test_every_long_running_container_has_memory_limits(compose, k8s):
    for name, container in containers(k8s).items():
        assert container.get("resources", {}).get("limits", {}).get("memory"), name
    for name, service in compose["services"].items():
        if name not in {"minio-setup", "mlflow-users"}:
            assert service["deploy"]["resources"]["limits"]["memory"], name


def test_the_model_server_answers_only_token_holders_and_reads_as_viewer(compose, k8s):
    """Beyond loopback the scoring server sits behind the token gateway; it reads MLflow as `viewer`."""
    from deployments.serving import parser

    service = compose["services"]["serving"]
    container = containers(k8s)["serving"]
    k8s_env = {e["name"]: e.get("value") or e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]}
    for command, env in ((service["command"], service["environment"]), (container["command"], k8s_env)):
        assert command[:3] == ["python", "-m", "deployments.serving"]
        args = parser().parse_args(command[3:])  # the flags serving takes
        assert args.host == "0.0.0.0" and args.port == PORTS["serving"]
        assert "KEEL_SERVING_TOKEN" in env and env["MLFLOW_TRACKING_USERNAME"] == "viewer"
        assert (
            set(env) & {"AWS_SECRET_ACCESS_KEY", "PREFECT_API_AUTH_STRING", "MLFLOW_KEEL_PASSWORD"} == set()
        )
    assert service["ports"] == [f"127.0.0.1:{PORTS['serving']}:{PORTS['serving']}"]
    assert k8s_env["KEEL_SERVING_TOKEN"] == "KEEL_SERVING_TOKEN"  # from the secret, never a value
    assert [p["port"] for p in k8s["Service/serving"]["spec"]["ports"]] == [PORTS["serving"]]
    [rule] = k8s["NetworkPolicy/serving-ingress"]["spec"]["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"keel.serving/client": "true"}}}
    ]


def test_secrets_added_since_are_appended_to_an_existing_env_file(tmp_path):
    from infra.secrets import CLUSTER_SECRETS, write_cluster_secrets

    folder = tmp_path / "secrets"
    folder.mkdir()
    (folder / ".env").write_text("# an older version's\nPOSTGRES_PASSWORD=kept-as-it-was\n")
    write_cluster_secrets(folder)
    env = dict(line.split("=", 1) for line in (folder / ".env").read_text().splitlines() if "=" in line)
    assert set(env) == set(CLUSTER_SECRETS) and env["POSTGRES_PASSWORD"] == "kept-as-it-was"
    assert (folder / ".env").stat().st_mode & 0o777 == 0o600
