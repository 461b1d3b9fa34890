"""The whole stack on 127.0.0.1, started and stopped with one command each.

    python -m infra.stack up       # Prefect server, MLflow server, Dask scheduler + workers, deployments
    python -m infra.stack status   # what runs, where, and whether it answers
    python -m infra.stack env      # the variables (addresses, credentials) for flows: eval "$(... env)"
    python -m infra.stack down     # stop everything by PID, newest first; nothing is lost
    python -m infra.stack up -- --cooldown-minutes 5   # flags after `--` go to deployments.serve
    python -m infra.stack up --serve-model bike-demand # also its champion over HTTP (127.0.0.1:5601)

Everything lives under one folder (`--home`, default `.keel/stack`): the Prefect database
(`prefect/`), the MLflow store and artifacts (`mlflow/`), the landing folder for new data
(`landing/`), batches waiting to be scored (`to-score/`) and their outputs (`scored/`), pipeline
outputs (`state/`), every process's log (`logs/`) and `stack.json` (ports and
PIDs), and `secrets/` (0600: the generated credentials every server requires, see infra/secrets.py).
Each part is started only after the previous one answers its health check. `down` sends
SIGTERM to each process group (the deployments server first, so no flow run is cut off mid-write by
a vanishing server, then the workers, the scheduler, MLflow, Prefect, and PostgreSQL last, with its
fast-shutdown SIGINT), waits for each to exit and only then uses SIGKILL; the databases are closed
cleanly, so `up` again finds every run, model and deployment.

MLflow and Prefect use SQLite by default; `--db postgresql` starts a PostgreSQL server from this
machine's binaries (initdb, postgres) under the stack folder and keeps both databases there. Lean MLflow settings: one worker, no job runner (2 processes, ~0.5 GB, see infra/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from infra import mlflow_auth
from infra.processes import BIN, http_ok, pid_running, start, wait_until
from infra.secrets import StackSecrets, write_private

PROJECT = Path(__file__).resolve().parent.parent  # the checkout: its data/ folder holds the demo data
PORTS = {
    "prefect": 4200,
    "mlflow": 5000,
    "dask": 8786,
    "dask_dashboard": 8787,
    "postgres": 5433,
    "serving": 5601,  # with --serve-model: the champion's scoring server
}
# tasks.steps.compute.QUIET_WORKERS as environment variables: no 10 ms self-profiling or 20 ms event-loop
# tick in the workers, which cost CPU-bound tasks ~20% on a 2-core machine.
QUIET_WORKERS = {
    "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
    "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "1s",
    "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "2s",
}
DEPLOYMENTS = {"scheduled", "landing-folder", "on-drift", "on-pending", "hourly", "on-approval"}
# What the deployments look after when neither the flags after `--` nor the project's config
# (keel.toml, [tool.keel]) name a model: the bike demo, its columns said out loud.
DEMO_SERVE_ARGS = [
    "--model-name", "bike-demand", "--target", "cnt", "--time-column", "dteday",
    "--key-columns", "dteday", "hr", "--drop-columns", "instant", "casual", "registered",
]  # fmt: skip


def serve_args_or_demo(serve_args: list[str], folder: Path | None = None) -> list[str]:
    """The flags for `deployments.serve`: the demo's first, unless a model is named (later flags win)."""
    folder = folder or Path.cwd()
    pyproject = folder / "pyproject.toml"
    configured = (folder / "keel.toml").is_file() or (
        pyproject.is_file() and "[tool.keel]" in pyproject.read_text(encoding="utf-8", errors="replace")
    )
    if "--model-name" in serve_args or configured:
        return serve_args
    return [*DEMO_SERVE_ARGS, *serve_args]


STOP_ORDER = [
    "watchdog",
    "runner",
    "serving",
    "deployments",
    "worker",
    "scheduler",
    "mlflow",
    "prefect",
    "postgres",
]
# PostgreSQL's "fast" shutdown (SIGINT): a clean checkpoint without waiting for idle clients.
STOP_SIGNAL = {"postgres": signal.SIGINT}


def _tcp_ok(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return True


class Stack:
    def __init__(self, home: Path) -> None:
        self.home = home.resolve()
        self.logs = self.home / "logs"
        self.state_file = self.home / "stack.json"

    # -- what is recorded -------------------------------------------------------------------------
    def load(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def save(self, state: dict) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        write_private(self.state_file, json.dumps(state, indent=1).encode())  # whole or not at all

    def recorded_env(self) -> dict[str, str]:
        """The variables for the stack recorded in this folder (what `env` prints)."""
        state = self.load()
        if not state:
            raise SystemExit(f"no stack recorded in {self.home}")
        return self.env(state)

    def env(self, state: dict) -> dict[str, str]:
        """The ecosystem's own variables, pointing at this stack, with its credentials."""
        return {**self.addresses(state), **StackSecrets.load(self.home).client_env()}

    def addresses(self, state: dict) -> dict[str, str]:
        """Where the stack's parts are and what flows may read (no credentials)."""
        ports = state["ports"]
        return {
            "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
            "DASK_SCHEDULER_ADDRESS": f"tls://127.0.0.1:{ports['dask']}",
            "KEEL_STATE_DIR": str(self.home / "state"),
            # Flows that the stack runs (scheduled, event-triggered) read only from here.
            "KEEL_DATA_ROOTS": ",".join(state.get("data_roots") or self.default_data_roots()),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }

    def default_data_roots(self) -> list[str]:
        """The landing folder, the scoring inbox and outbox, and the project's data folder."""
        return [str(self.home.resolve() / f) for f in ("landing", "to-score", "scored")] + [
            str(PROJECT / "data")
        ]

    # -- up -----------------------------------------------------------------------------------------
    def up(
        self,
        ports: dict[str, int],
        workers: int,
        worker_memory: str,
        db: str,
        serve_args: list[str],
        data_roots: Sequence[str] = (),
        serve_model: str | None = None,
    ) -> dict:
        state = self.load()
        alive = {name: pid for name, pid in _pids(state) if pid_running(pid)}
        if alive:
            raise SystemExit(f"the stack in {self.home} is already running ({alive}); `down` it first")
        self.logs.mkdir(parents=True, exist_ok=True)
        state = {
            "ports": ports,
            "processes": [],
            "home": str(self.home),
            "data_roots": self.default_data_roots() + [str(Path(r).resolve()) for r in data_roots],
            "serve_model": serve_model,
        }
        self.save(state)
        secrets = StackSecrets.ensure(self.home)
        env = {**self.addresses(state), **secrets.client_env()}  # what `self.env(state)` reads back
        try:
            backend, prefect_db, db_env = self._start_databases(state, db, secrets)
            self._start_prefect(state, env, secrets, prefect_db, db_env)
            self._start_mlflow(state, env, secrets, backend, db_env)
            self._start_dask(state, env, secrets, workers, worker_memory)
            self._start_deployments(state, env, serve_args)
            if serve_model:
                self._start_serving(state, {**self.addresses(state), **secrets.viewer_env()}, serve_model)
        except BaseException:
            self.down()
            raise
        return state

    def _start_prefect(
        self,
        state: dict,
        env: dict[str, str],
        secrets: StackSecrets,
        prefect_db: str | None,
        db_env: dict[str, str],
    ) -> None:
        """The Prefect server (API and UI), behind its auth string."""
        ports = state["ports"]
        self._start(
            state,
            "prefect",
            [
                str(BIN / "python"),
                "-m",
                "infra.prefect_sqlite",  # `prefect server start`, its SQLite transactions locked first
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["prefect"]),
            ],
            {
                "PREFECT_HOME": str(self.home / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_API_AUTH_STRING": secrets.prefect_auth_string,
                # Where the UI in the browser finds the API; its default is port 4200, whatever
                # port the server is on (a dead UI, or another server's data).
                "PREFECT_UI_API_URL": env["PREFECT_API_URL"],
                # Events are written to the database every 5 s by default: an approval or a drift
                # event then takes seconds to show in the UI and the API. Automations do not wait
                # for it (they read the event stream); people and scripts do.
                "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5",
                **({"PREFECT_API_DATABASE_CONNECTION_URL": prefect_db} if prefect_db else {}),
                **db_env,
            },
            lambda: http_ok(f"http://127.0.0.1:{ports['prefect']}/api/health"),
            120,
        )

    def _start_mlflow(
        self, state: dict, env: dict[str, str], secrets: StackSecrets, backend: str, db_env: dict[str, str]
    ) -> None:
        """The MLflow tracking server with its basic-auth app and the stack's users."""
        ports = state["ports"]
        (self.home / "mlflow").mkdir(exist_ok=True)
        self._start(
            state,
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--app-name",
                "basic-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["mlflow"]),
                "--workers",
                "1",
                "--backend-store-uri",
                backend,
                "--artifacts-destination",
                str(self.home / "mlflow" / "artifacts"),
            ],
            {
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                **self._mlflow_auth_env(secrets),
                **db_env,
            },
            lambda: http_ok(f"http://127.0.0.1:{ports['mlflow']}/health"),
            120,
        )
        mlflow_auth.ensure_users(env["MLFLOW_TRACKING_URI"], secrets.mlflow_passwords())

    def _start_dask(
        self, state: dict, env: dict[str, str], secrets: StackSecrets, workers: int, worker_memory: str
    ) -> None:
        """The Dask scheduler and its workers, over TLS; returns once every worker has joined."""
        ports = state["ports"]
        self._start(
            state,
            "scheduler",
            [
                str(BIN / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["dask"]),
                "--protocol",
                "tls",
                *secrets.dask_tls_flags(),
                "--dashboard-address",
                f"127.0.0.1:{ports['dask_dashboard']}",
            ],
            {},
            lambda: _tcp_ok(ports["dask"]),
            60,
        )
        for index in range(workers):
            self._start(
                state,
                "worker",
                [
                    str(BIN / "dask"),
                    "worker",
                    env["DASK_SCHEDULER_ADDRESS"],
                    "--host",
                    "127.0.0.1",
                    *secrets.dask_tls_flags(),
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    worker_memory,
                    "--dashboard-address",
                    "127.0.0.1:0",
                    "--name",
                    f"worker-{index}",
                ],
                {**env, **QUIET_WORKERS},
                None,
                0,
                log_name=f"worker-{index}",
            )
        wait_until(
            lambda: _dask_workers(env) >= workers,
            f"{workers} Dask workers",
            120,
            [],
            self.logs / "worker-0.log",
        )

    def _start_deployments(self, state: dict, env: dict[str, str], serve_args: list[str]) -> None:
        """`python -m deployments.serve`: the deployments, served until the stack stops."""
        serving_since = datetime.now(UTC) - timedelta(seconds=1)  # the server's clock is this one
        self._start(
            state,
            "deployments",
            [
                str(BIN / "python"),
                "-m",
                "deployments.serve",
                "--landing",
                str(self.home / "landing"),
                *serve_args_or_demo(serve_args),
            ],
            {**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
            lambda: _deployments_ready(env, since=serving_since),
            180,
        )

    def _start_serving(self, state: dict, env: dict[str, str], model_name: str) -> None:
        """`python -m deployments.serving`: the champion over HTTP on 127.0.0.1, moved to each new
        champion (an approval, a promoted retrain), as MLflow's read-only `viewer` (it reads the
        registry and the model, and can change neither). Not waited for: there may be no champion yet."""
        self._start(
            state,
            "serving",
            [
                str(BIN / "python"),
                "-m",
                "deployments.serving",
                "--model-name",
                model_name,
                "--port",
                str(state["ports"]["serving"]),
                "--poll-seconds",
                "5",
                "--state-file",
                str(self.serving_file),
            ],
            env,
            None,
            0,
        )

    @property
    def serving_file(self) -> Path:
        return self.home / "serving.json"

    def _mlflow_auth_env(self, secrets: StackSecrets) -> dict[str, str]:
        """MLflow's basic-auth app, its users in `mlflow/auth.db` (infra/mlflow_auth.py)."""
        config = mlflow_auth.write_config(
            self.home / "mlflow" / "auth.ini", f"sqlite:///{self.home / 'mlflow' / 'auth.db'}"
        )
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.read("mlflow-admin-password"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.read("mlflow-flask-secret"),
        }

    def _start_databases(
        self, state: dict, db: str, secrets: StackSecrets
    ) -> tuple[str, str | None, dict[str, str]]:
        """MLflow's backend store URI, Prefect's database URL (None: Prefect's own SQLite) and the
        environment their servers need to log in (the password never appears in a command line)."""
        if db == "sqlite":
            (self.home / "mlflow").mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}", None, {}
        pg_bin = _postgres_bin()
        data = self.home / "postgres"
        port = state["ports"]["postgres"]
        as_owner = _postgres_user(data)
        password = secrets.read("postgres-password")
        login = {"PGPASSWORD": password}
        if not (data / "PG_VERSION").exists():
            _initdb(pg_bin, data, as_owner, password, self.logs / "postgres-initdb.log")
        _refuse_trust(data)
        self._start(
            state,
            "postgres",
            [
                *as_owner,
                str(pg_bin / "postgres"),
                "-D",
                str(data),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-k",
                str(data),
            ],
            {},
            lambda: (
                subprocess.run(
                    [str(pg_bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                    capture_output=True,
                    env={**os.environ, **login},
                    check=False,  # not ready yet is an answer
                ).returncode
                == 0
            ),
            60,
        )
        for database in ("mlflow", "prefect"):
            created = subprocess.run(
                [str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "keel", database],
                capture_output=True,
                text=True,
                env={**os.environ, **login},
                check=False,  # "already exists" is fine
            )
            if created.returncode and "already exists" not in created.stderr:
                raise RuntimeError(f"createdb {database} failed: {created.stderr}")
        return (
            f"postgresql://keel@127.0.0.1:{port}/mlflow",
            f"postgresql+asyncpg://keel@127.0.0.1:{port}/prefect",
            login,
        )

    def _start(self, state, name, args, env, ready, timeout, log_name=None) -> None:
        log = self.logs / f"{log_name or name}.log"
        with log.open("ab") as handle:
            handle.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(args)}\n".encode())
        proc = start(args, log, env, append=True)
        state["processes"].append({"name": name, "pid": proc.pid, "log": str(log)})
        self.save(state)
        print(f"  started {log_name or name:<12} pid {proc.pid:<8} log {log}", flush=True)
        if ready is not None:
            wait_until(ready, name, timeout, [proc], log)
            print(f"  {name} answers", flush=True)

    # -- down -------------------------------------------------------------------------------------
    def down(self, timeout: float = 60) -> list[str]:
        """Signal every recorded process group in STOP_ORDER, wait for it, SIGKILL what is left."""
        state = self.load()
        stopped = []
        by_name = sorted(_pids(state), key=lambda item: STOP_ORDER.index(item[0]))
        for group in STOP_ORDER:
            pids = [pid for name, pid in by_name if name == group and pid_running(pid)]
            for pid in pids:
                _signal_group(pid, STOP_SIGNAL.get(group, signal.SIGTERM))
            deadline = time.monotonic() + timeout
            for pid in pids:
                while pid_running(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if pid_running(pid):
                    _signal_group(pid, signal.SIGKILL)
                    stopped.append(f"{group} {pid} (killed after {timeout:g}s)")
                else:
                    stopped.append(f"{group} {pid}")
        if state:
            state["processes"] = []
            self.save(state)
        return stopped

    def status(self) -> list[str]:
        state = self.load()
        if not state:
            return [f"no stack recorded in {self.home}"]
        lines = []
        for entry in state.get("processes", []):
            lines.append(
                f"{entry['name']:<12} pid {entry['pid']:<8} {'running' if pid_running(entry['pid']) else 'stopped'}"
            )
        env = self.env(state)
        checks = {
            "prefect": lambda: _deployments_ready(env, names=set()),
            "mlflow": lambda: mlflow_auth.api_answers(
                env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
            ),
            "dask": lambda: _dask_workers(env) >= 0,
        }
        if state.get("serve_model"):
            checks["serving"] = lambda: http_ok(f"http://127.0.0.1:{state['ports']['serving']}/ping")
        for name, check in checks.items():
            lines.append(f"{name:<12} {'answers' if answers(check) else 'does not answer'}")
        return lines


def answers(check: Callable[[], bool]) -> bool:
    """A health check's verdict; one that fails to connect (or raises) does not answer."""
    try:
        return check()
    except Exception:
        return False


def _pids(state: dict) -> list[tuple[str, int]]:
    return [(p["name"], int(p["pid"])) for p in state.get("processes", [])]


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _dask_workers(env: dict[str, str]) -> int:
    """How many workers the scheduler has, asked over mutual TLS with the stack's certificate."""
    from distributed import Client
    from distributed.security import Security

    tls = Security(
        tls_ca_file=env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"],
        tls_client_cert=env["DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT"],
        tls_client_key=env["DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"],
        require_encryption=True,
    )
    with Client(env["DASK_SCHEDULER_ADDRESS"], security=tls, timeout=5) as client:
        return len(client.scheduler_info().get("workers", {}))


PREFECT_API_ATTEMPTS = 5


def prefect_api(env: dict[str, str], timeout: float = 30):
    """An HTTP client of the stack's Prefect API, logged in with the stack's basic-auth string. Like
    Prefect's own client, it retries a 503: the server's answer to a retryable database error (SQLite
    busy with another writer), sent for the client to try again."""
    from http import HTTPStatus

    import httpx

    class RetryUnavailable(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            attempt = 0
            while True:
                response = super().handle_request(request)
                attempt += 1
                if response.status_code != HTTPStatus.SERVICE_UNAVAILABLE or attempt == PREFECT_API_ATTEMPTS:
                    return response
                response.close()
                time.sleep(0.2 * 2**attempt)

    user, _, password = env["PREFECT_API_AUTH_STRING"].partition(":")
    return httpx.Client(
        base_url=env["PREFECT_API_URL"], auth=(user, password), timeout=timeout, transport=RetryUnavailable()
    )


def _deployments_ready(
    env: dict[str, str], names: set[str] = DEPLOYMENTS, since: datetime | None = None
) -> bool:
    """The API answers our credentials; the deployments and the automation are there — applied
    `since` then, when given: ones left from an earlier `up` do not show that this one's settings
    were applied (a deployments server that failed would pass for ready)."""

    def fresh(item: dict) -> bool:
        return since is None or datetime.fromisoformat(item["updated"].replace("Z", "+00:00")) >= since

    with prefect_api(env, timeout=5) as http:
        deployments = http.post("/deployments/filter", json={}).raise_for_status().json()
        automations = http.post("/automations/filter", json={}).raise_for_status().json()
    found = {d["name"] for d in deployments if fresh(d)}
    return names <= found and (not names or any(fresh(a) for a in automations))


def _initdb(pg_bin: Path, data: Path, as_owner: list[str], password: str, log: Path) -> None:
    """A cluster with SCRAM passwords. The password goes through a file only its owner can read,
    deleted at once (as root, initdb runs as `postgres`, which may not open root's stdin)."""
    import secrets

    data.parent.mkdir(parents=True, exist_ok=True)
    pwfile = data.parent / f".initdb-{secrets.token_hex(8)}"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        if as_owner:
            shutil.chown(pwfile, data.stat().st_uid, data.stat().st_gid)
        with log.open("wb") as output:
            subprocess.run(
                [*as_owner, str(pg_bin / "initdb"), "-D", str(data), "-U", "keel",
                 "--auth=scram-sha-256", f"--pwfile={pwfile}"],
                check=True, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
    finally:
        pwfile.unlink(missing_ok=True)


def _refuse_trust(data: Path) -> None:
    """A cluster initialised before passwords (`--auth=trust`) would let any local user in."""
    hba = data / "pg_hba.conf"
    with contextlib.suppress(PermissionError):
        rules = [line.split() for line in hba.read_text().splitlines() if line.strip()]
        if any(rule[-1] == "trust" for rule in rules if not rule[0].startswith("#")):
            raise SystemExit(
                f"{hba} lets anyone connect without a password (`trust`): set its methods to "
                "scram-sha-256, give the `keel` role the password in secrets/postgres-password, "
                "or delete the postgres folder to start afresh"
            )


def _postgres_user(data: Path) -> list[str]:
    """PostgreSQL refuses to run as root: then run it as the `postgres` system user, which must own
    the data folder and be able to reach it (the stack folder's parents must be world-searchable)."""
    if os.geteuid() != 0:
        return []
    import pwd

    try:
        owner = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise SystemExit(
            "PostgreSQL cannot run as root and there is no `postgres` user to run it as"
        ) from exc
    data.mkdir(parents=True, exist_ok=True)
    os.chown(data, owner.pw_uid, owner.pw_gid)
    data.chmod(0o700)
    blocked = [p for p in data.parents if p.exists() and not p.stat().st_mode & 0o001]
    if blocked:
        raise SystemExit(
            f"the postgres user cannot reach {data}: {blocked[0]} is not searchable by others; "
            "use a stack folder it can reach (--home), or run as another user than root"
        )
    # setpriv execs PostgreSQL itself (runuser would stay in between and SIGKILL it on SIGTERM)
    return ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--init-groups", "--"]


def _postgres_bin() -> Path:
    found = shutil.which("pg_ctl")
    if found:  # the real folder (pg_isready, createdb beside it), not a folder of symlinks to some
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not candidates:
        raise SystemExit("--db postgresql needs PostgreSQL's server binaries (initdb, postgres)")
    return candidates[-1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--home", type=Path, default=Path(".keel/stack"), help="Folder for data, logs, PIDs.")
    for name, port in PORTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}-port", type=int, default=port, dest=f"port_{name}")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes.")
    parser.add_argument(
        "--data-root",
        action="append",
        default=[],
        dest="data_roots",
        metavar="DIR",
        help="Another folder the stack's flows may read input data from (repeatable); always allowed: "
        "the landing folder and the project's data folder (KEEL_DATA_ROOTS).",
    )
    parser.add_argument("--worker-memory", default="4GiB", help="Memory limit of each Dask worker.")
    parser.add_argument(
        "--serve-model",
        metavar="NAME",
        help="Also serve NAME's champion over HTTP on 127.0.0.1 (--serving-port), following the champion.",
    )
    parser.add_argument(
        "--db", choices=["sqlite", "postgresql"], default="sqlite", help="Database of MLflow and Prefect."
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args = argv[argv.index("--") + 1 :] if "--" in argv else []  # for `python -m deployments.serve`
    args = parser.parse_args(argv[: len(argv) - len(serve_args) - (1 if serve_args else 0)])
    stack = Stack(args.home)
    if args.command == "up":
        ports = {name: getattr(args, f"port_{name}") for name in PORTS}
        print(f"starting the stack in {stack.home}", flush=True)
        state = stack.up(
            ports, args.workers, args.worker_memory, args.db, serve_args, args.data_roots, args.serve_model
        )
        env = stack.env(state)
        home = shlex.quote(str(args.home))
        secrets = stack.home / "secrets"
        print(
            "\nThe stack is up. Point flows at it (its addresses and credentials) with:\n\n"
            f'    eval "$(python -m infra.stack env --home {home})"\n\n'
            f"Prefect UI: {env['PREFECT_API_URL'].removesuffix('/api')}  (log in with "
            f"keel:$(cat {secrets}/prefect-auth-token))\n"
            f"MLflow UI:  {env['MLFLOW_TRACKING_URI']}  (user viewer, read-only: "
            f"{secrets}/mlflow-viewer-password; user admin: {secrets}/mlflow-admin-password)\n"
            f"Dask dashboard: http://127.0.0.1:{ports['dask_dashboard']}   "
            f"stop: python -m infra.stack down --home {home}"
        )
        if args.serve_model:
            print(
                f"Model server: http://127.0.0.1:{ports['serving']}/invocations ({args.serve_model}@champion "
                f"once there is one; {stack.serving_file} says which version)"
            )
    elif args.command == "down":
        for line in stack.down():
            print(f"  stopped {line}")
    elif args.command == "status":
        from infra.pool import Pool
        from infra.runner import default_home

        print("\n".join(stack.status()))
        print("\n".join(Pool(default_home()).status()))
    else:
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in stack.recorded_env().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
