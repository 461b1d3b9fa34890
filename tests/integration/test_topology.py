"""The compose topology, each component a host of its own (a network namespace, `tests/topology.py`),
started with the compose file's own commands and environment, and used as a cluster is: a training
pipeline, a monitor check and the event-triggered retrain, run by the deployments host, with every
byte of data and every artifact in an S3 store, every server asking for credentials, Dask over TLS.

What differs from `docker compose up`, and why:
- no container engine image: the commands run from this checkout's environment (`python`, `mlflow`,
  `dask`, `prefect` from .venv; `/app/` is the checkout, `/run/secrets/` the generated secrets);
- MinIO's server is not installable here (not on PyPI, npm or Debian, and no image registry is
  reachable), so the S3 store is moto's S3 server (PyPI) with its IAM enforcement on: the same
  policy documents (infra/minio/*.json) are given to users `keel` and `mlflow`, and moto refuses
  what they do not allow. moto generates access key ids, so those replace the names `keel` and
  `mlflow` that MinIO uses as key ids; the bucket and user set-up is infra/minio/setup.sh's, in
  boto3 calls, since MinIO's `mc` is not installable either;
- PostgreSQL is this machine's, initialised as the postgres image's entrypoint does it (SCRAM for
  network connections, the databases of initdb.sql);
- the deployments server gets `--n-trials 2` and the retrain a short cooldown, to keep the test short.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from deployments.serve import SCORING, SCORING_ON_APPROVAL
from infra.processes import BIN
from infra.stack import DEPLOYMENTS
from tests.conftest import BIKE_CSV, BIKE_TABLE, ROOT
from tests.topology import Topology, available, interpolate

# the scoring deployments need outputs on a file system the workers share: not with an S3 landing
SERVED = DEPLOYMENTS - {SCORING, SCORING_ON_APPROVAL}

pytestmark = [pytest.mark.integration, pytest.mark.servers, pytest.mark.slow, pytest.mark.timeout(1800)]

COMPOSE = yaml.safe_load((ROOT / "infra" / "compose" / "compose.yaml").read_text())
HOSTS = [
    "postgres",
    "minio",
    "minio-setup",
    "prefect-server",
    "mlflow",
    "mlflow-users",
    "dask-scheduler",
    "dask-worker-1",
    "dask-worker-2",
    "deployments",
    "client",
]
FAST = {"n_trials": 2, "num_boost_round": 80, "min_r2": 0.3, **BIKE_TABLE}


def s3_setup_script() -> str:
    """infra/minio/setup.sh in boto3 calls, against moto: buckets, users with their policies, keys."""
    return r"""
import json, sys
import boto3
endpoint, folder = sys.argv[1], sys.argv[2]
def client(kind, key="bootstrap", secret="bootstrap"):
    return boto3.client(kind, endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name="us-east-1")
iam = client("iam")  # the first three calls are unauthenticated (INITIAL_NO_AUTH_ACTION_COUNT=3)
iam.create_user(UserName="root")
iam.put_user_policy(UserName="root", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
root = iam.create_access_key(UserName="root")["AccessKey"]
keys = {"root": [root["AccessKeyId"], root["SecretAccessKey"]]}
iam = client("iam", *keys["root"])
s3 = client("s3", *keys["root"])
for bucket in ("mlflow", "keel"):
    s3.create_bucket(Bucket=bucket)
for user, policy in (("keel", "keel-data"), ("mlflow", "mlflow-artifacts")):
    document = open(f"{folder}/{policy}.json").read()
    arn = iam.create_policy(PolicyName=policy, PolicyDocument=document)["Policy"]["Arn"]
    iam.create_user(UserName=user)
    iam.attach_user_policy(UserName=user, PolicyArn=arn)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    keys[user] = [key["AccessKeyId"], key["SecretAccessKey"]]
print(json.dumps(keys))
"""


CLIENT = r"""
import json, sys, time
action, args = sys.argv[1], json.loads(sys.argv[2])
if action == "upload":  # the operator drops data where the flows read it (root keys: flows cannot write there)
    import boto3, os
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    for key, path in args.items():
        s3.upload_file(path, "keel", key)
    print("{}")
elif action == "run":  # a deployment run, as anyone with the Prefect auth string starts one
    from prefect.deployments import run_deployment
    run = run_deployment(args["name"], parameters={"params": args["params"]}, timeout=1500)
    print(json.dumps({"id": str(run.id), "state": run.state.type.value, "message": run.state.message}))
elif action == "retrains":
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["on-drift"])))
    print(json.dumps([{"id": str(r.id), "state": r.state.type.value, "params": r.parameters["params"]} for r in runs]))
elif action == "registry":
    import mlflow
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{args['model']}'")
    experiment = client.get_experiment_by_name("keel").experiment_id
    steps = client.search_runs([experiment], "tags.`keel.step` = 'train'", max_results=5)
    print(json.dumps({
        "versions": {str(v.version): v.tags for v in versions},
        "workers": sorted({r.data.tags.get("dask.worker", "") for r in steps}),
    }))
"""


@pytest.fixture(scope="module")
def cluster():
    why = available()
    if why:
        pytest.skip(why)
    home = Path(tempfile.mkdtemp(prefix="keel-topology-"))
    home.chmod(0o755)  # PostgreSQL runs as the postgres user, which must reach its data folder
    topology = Topology(HOSTS, home / "logs")
    try:
        yield Cluster(topology, home)
    finally:
        topology.close()
        if not os.environ.get("KEEL_KEEP_TOPOLOGY"):  # set it to read the hosts' logs afterwards
            shutil.rmtree(home, ignore_errors=True)


class Cluster:
    def __init__(self, topology: Topology, home: Path) -> None:
        self.net = topology
        self.home = home
        self.secrets = home / "secrets"
        generated = subprocess.run(
            [sys.executable, "-m", "infra.secrets", "cluster", str(self.secrets)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        assert ".env" in generated.stdout
        self.variables = dict(
            line.split("=", 1)
            for line in (self.secrets / ".env").read_text().splitlines()
            if line and not line.startswith("#")
        )
        self.s3_keys: dict[str, list[str]] = {}

    # -- the compose file, as this machine runs it ---------------------------------------------------
    def host_dir(self, host: str) -> Path:
        folder = self.home / "hosts" / host  # each host its own disk: nothing shared but the network
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def translate(self, value: str) -> str:
        value = interpolate(str(value), self.variables)
        return value.replace("/run/secrets/", f"{self.secrets}/").replace("/app/", f"{ROOT}/")

    def env(self, service: str, host: str, **extra: str) -> dict[str, str]:
        environment = COMPOSE["services"][service].get("environment", {})
        env = {k: self.translate(v) for k, v in environment.items()}
        user = env.get("AWS_ACCESS_KEY_ID")
        if user in self.s3_keys:  # moto's generated key for the user MinIO would name by its key id
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = self.s3_keys[user]
        return {
            "PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.host_dir(host)),
            "AWS_DEFAULT_REGION": "us-east-1",  # moto signs per region; MinIO takes any
            "PREFECT_HOME": str(self.host_dir(host) / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **env,
            **extra,
        }

    def command(self, service: str) -> list[str]:
        command = COMPOSE["services"][service]["command"]
        program = {"python": sys.executable, "mlflow": str(BIN / "mlflow"), "dask": str(BIN / "dask"),
                    "prefect": str(BIN / "prefect")}  # fmt: skip
        return [program.get(command[0], command[0]), *(self.translate(a) for a in command[1:])]

    def start(self, service: str, host: str | None = None, extra: list[str] = ()) -> None:
        host = host or service
        self.net.run(host, [*self.command(service), *extra], self.env(service, host), cwd=self.host_dir(host))

    def wait(self, what: str, check, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                logs = {p.name: p.read_text()[-1500:] for p in self.net.logs.iterdir()}
                raise AssertionError(f"{what} not ready after {timeout}s: {json.dumps(logs, indent=1)}")
            time.sleep(1)

    def client(self, action: str, args: dict, timeout: float = 1800) -> object:
        env = self.env("deployments", "client")  # a user of the cluster: the flows' credentials
        done = self.net.call("client", [sys.executable, "-c", CLIENT, action, json.dumps(args)], env, timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def probe(self, host: str, code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return self.net.call(host, [sys.executable, "-c", code], env or self.env("deployments", host), 60)

    # -- bring-up, in compose's dependency order ------------------------------------------------------
    def up(self) -> None:
        self.start_postgres()
        self.net.run("minio", [str(BIN / "moto_server"), "-H", "0.0.0.0", "-p", "9000"],
                     {"PATH": f"{BIN}:/usr/bin:/bin", "INITIAL_NO_AUTH_ACTION_COUNT": "3",
                      "HOME": str(self.host_dir("minio"))})  # fmt: skip
        self.wait(
            "S3 store", lambda: self.probe("minio-setup", TCP.format(host="minio", port=9000)).returncode == 0
        )
        setup = self.net.call(
            "minio-setup",
            [sys.executable, "-c", s3_setup_script(), "http://minio:9000", str(ROOT / "infra" / "minio")],
            {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(self.host_dir("minio-setup"))},
        )
        assert setup.returncode == 0, setup.stderr[-3000:]
        self.s3_keys = json.loads(setup.stdout)
        self.start("prefect-server")
        self.start("mlflow")
        healthcheck = self.translate_list(COMPOSE["services"]["mlflow"]["healthcheck"]["test"][1:])
        self.wait(
            "MLflow (compose healthcheck)",
            lambda: self.net.call("mlflow", healthcheck, self.env("mlflow", "mlflow"), 60).returncode == 0,
        )
        users = self.net.call(
            "mlflow-users", self.command("mlflow-users"), self.env("mlflow-users", "mlflow-users"), 300
        )
        assert users.returncode == 0 and "keel, viewer" in users.stdout, users.stderr[-2000:]
        self.wait("Prefect", lambda: self.probe("client", PREFECT_HEALTH).returncode == 0)
        self.start("dask-scheduler")
        for worker in ("dask-worker-1", "dask-worker-2"):
            self.start("dask-worker", worker)
        self.wait("two Dask workers", lambda: self.probe("client", DASK_WORKERS).stdout.strip() == "2")
        self.start("deployments", extra=["--n-trials", "2", "--cooldown-minutes", "1"])
        self.wait(
            "the deployments",
            lambda: self.probe("client", DEPLOYMENTS).stdout.strip() == str(len(SERVED)),
            300,
        )

    def translate_list(self, args: list[str]) -> list[str]:
        return [sys.executable if a == "python" else self.translate(a) for a in args]

    def start_postgres(self) -> None:
        """As the postgres image's entrypoint: initdb with the password, SCRAM for the network, then
        initdb.sql; the server listens on its host's address only."""
        import pwd

        pg_bin = Path(shutil.which("initdb") or "/usr/lib/postgresql/15/bin/initdb").resolve().parent
        data = self.host_dir("postgres") / "data"
        owner = pwd.getpwnam("postgres")
        data.mkdir()
        data.chmod(0o700)
        shutil.chown(data, owner.pw_uid, owner.pw_gid)
        as_postgres = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--init-groups", "--"]
        pwfile = self.host_dir("postgres") / "pwfile"
        pwfile.write_text(self.variables["POSTGRES_PASSWORD"] + "\n")
        shutil.chown(pwfile, owner.pw_uid, owner.pw_gid)
        initdb = subprocess.run(
            [*as_postgres, str(pg_bin / "initdb"), "-D", str(data), "-U", "keel", "--auth-local=trust",
             "--auth-host=scram-sha-256", f"--pwfile={pwfile}"],
            text=True, capture_output=True,
        )  # fmt: skip
        pwfile.unlink()
        assert initdb.returncode == 0, initdb.stdout + initdb.stderr
        with (data / "pg_hba.conf").open("a") as hba:  # what the image's entrypoint adds
            hba.write("host all all all scram-sha-256\n")
        self.net.run("postgres", [*as_postgres, str(pg_bin / "postgres"), "-D", str(data), "-h", "0.0.0.0",
                                  "-p", "5432", "-k", str(data)], {"PATH": "/usr/bin:/bin"})  # fmt: skip
        ready = [str(pg_bin / "pg_isready"), "-h", "postgres", "-p", "5432"]
        self.wait(
            "PostgreSQL",
            lambda: self.net.call("client", ready, {"PATH": "/usr/bin:/bin"}, 30).returncode == 0,
        )
        init = self.net.call(
            "postgres",
            [str(pg_bin / "psql"), "-h", str(data), "-U", "keel", "-d", "mlflow", "-v", "ON_ERROR_STOP=1", "-f",
             str(ROOT / "infra" / "compose" / "initdb.sql")],
            {"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        if init.returncode:  # the image creates POSTGRES_DB first; so does this
            created = self.net.call(
                "postgres",
                [str(pg_bin / "createdb"), "-h", str(data), "-U", "keel", "mlflow"],
                {"PATH": "/usr/bin:/bin"},
            )
            assert created.returncode == 0, created.stderr
            init = self.net.call(
                "postgres",
                [str(pg_bin / "psql"), "-h", str(data), "-U", "keel", "-d", "mlflow", "-v", "ON_ERROR_STOP=1",
                 "-f", str(ROOT / "infra" / "compose" / "initdb.sql")],
                {"PATH": "/usr/bin:/bin"},
            )  # fmt: skip
        assert init.returncode == 0, init.stderr


TCP = "import socket; socket.create_connection(({host!r}, {port}), timeout=2).close()"
PREFECT_HEALTH = (
    "import urllib.request; urllib.request.urlopen('http://prefect-server:4200/api/health', timeout=5)"
)
DASK_WORKERS = (
    "from distributed import Client\n"
    "with Client('tls://dask-scheduler:8786', timeout=10) as c: print(len(c.scheduler_info()['workers']))"
)
DEPLOYMENTS = (
    "from prefect.client.orchestration import get_client\n"
    "with get_client(sync_client=True) as c: print(len(c.read_deployments()))"
)


def test_pipeline_monitor_and_event_triggered_retrain_across_the_compose_topology(cluster, tmp_path):
    cluster.up()
    bike = pd.read_csv(BIKE_CSV)
    landing, batch = tmp_path / "landing.parquet", tmp_path / "june-2012.parquet"
    bike[bike.dteday < "2011-06-01"].to_parquet(landing, index=False)
    bike[(bike.dteday >= "2012-06-04") & (bike.dteday < "2012-06-11")].to_parquet(batch, index=False)
    operator = {  # the operator's upload: MinIO's root user (moto's), which flows never get
        **cluster.env("deployments", "client"),
        "AWS_ACCESS_KEY_ID": cluster.s3_keys["root"][0],
        "AWS_SECRET_ACCESS_KEY": cluster.s3_keys["root"][1],
    }
    files = {"landing/2011-01-01.parquet": str(landing), "data/june-2012.parquet": str(batch)}
    upload = cluster.net.call("client", [sys.executable, "-c", CLIENT, "upload", json.dumps(files)], operator)
    assert upload.returncode == 0, upload.stderr[-2000:]

    from flows.monitor import MonitorParams
    from flows.pipeline import PipelineParams

    training = PipelineParams(
        data="s3://keel/landing",
        end="2011-03-31",
        model_name="topo",
        on_quality_violation="fail-on-broken",
        **FAST,
    )
    run = cluster.client(
        "run", {"name": "training-pipeline/scheduled", "params": training.model_dump(mode="json")}
    )
    assert run["state"] == "COMPLETED", (run, (cluster.net.logs / "deployments.log").read_text()[-5000:])
    registry = cluster.client("registry", {"model": "topo"})
    assert list(registry["versions"]) == ["1"]
    v1 = registry["versions"]["1"]
    assert v1["dataset.raw.uri"] == "s3://keel/landing"
    assert v1["dataset.raw.pinned"].startswith("s3://keel/datasets/inputs/")
    worker_hosts = {cluster.net.address["dask-worker-1"], cluster.net.address["dask-worker-2"]}
    assert {w.split("://")[1].split(":")[0] for w in registry["workers"]} <= worker_hosts, registry["workers"]

    check = MonitorParams(batch="s3://keel/data/june-2012.parquet", model_name="topo")
    run = cluster.client(
        "run", {"name": "drift-monitor/landing-folder", "params": check.model_dump(mode="json")}
    )
    assert run["state"] == "COMPLETED", (run, (cluster.net.logs / "deployments.log").read_text()[-5000:])

    deadline = time.monotonic() + 1200
    while True:
        retrains = [r for r in cluster.client("retrains", {}) if r["params"]["model_name"] == "topo"]
        if retrains and all(r["state"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} for r in retrains):
            break
        assert time.monotonic() < deadline, retrains
        time.sleep(5)
    [retrain] = retrains
    assert retrain["state"] == "COMPLETED", (cluster.net.logs / "deployments.log").read_text()[-5000:]
    versions = cluster.client("registry", {"model": "topo"})["versions"]
    assert sorted(versions) == ["1", "2"]
    assert versions["2"]["keel.trigger.event_id"] == retrain["params"]["event_id"]
    assert versions["2"]["keel.trigger.flow"] == "retrain"

    # what the cluster refuses: a host without the credentials, and the flows' own keys where they
    # have no business (the landing folder is the operator's; the MLflow bucket is MLflow's)
    bare = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)}
    prefect = {**bare, "PREFECT_API_URL": "http://prefect-server:4200/api"}
    refused = cluster.probe("client", DEPLOYMENTS, prefect)
    assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr[-2000:]
    no_auth = cluster.probe(
        "client",
        "import urllib.request, urllib.error\ntry:\n    urllib.request.urlopen('http://mlflow:5000/api/2.0/mlflow/"
        "experiments/search?max_results=1')\nexcept urllib.error.HTTPError as e:\n    print(e.code)",
        bare,
    )
    assert no_auth.stdout.strip() == "401"
    assert cluster.probe("client", DASK_WORKERS, bare).returncode != 0  # no certificate, no Dask
    flows_keys = cluster.probe(
        "client",
        "import boto3, botocore, os\ns3 = boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL'])\n"
        "for bucket, key in (('keel', 'landing/forged.parquet'), ('mlflow', 'artifacts/forged.py')):\n"
        "    try:\n        s3.put_object(Bucket=bucket, Key=key, Body=b'x'); print('written', key)\n"
        "    except botocore.exceptions.ClientError as e:\n        print(e.response['Error']['Code'])",
    )
    assert flows_keys.stdout.split() == ["AccessDenied", "AccessDenied"], flows_keys
