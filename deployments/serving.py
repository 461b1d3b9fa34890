"""The champion over HTTP (SageMaker's real-time endpoint): MLflow's own scoring server on a verified
copy of the version, moved to the new version when the champion moves.

    python -m deployments.serving --model-name bike-demand --port 5601
    curl -s 127.0.0.1:5601/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_records": [{"dteday": "2012-06-01", "hr": 8, ...}]}'

The version (`models:/NAME@champion`, or `--version N` to pin one) is resolved in the registry,
its files copied to a private folder and checked against the manifest recorded when it was logged
(`tasks/steps/integrity.py`: a file changed in the artifact store stops it, nothing of it runs),
and `mlflow models serve` runs on that copy in this environment (`--env-manager local`, the lock
file's versions) on 127.0.0.1 only: the scoring server has no authentication. With
`KEEL_SERVING_TOKEN` set, a gateway (`deployments/gateway.py`) answers at `--host`:`--port` instead
and passes on only requests that carry the token (`Authorization: Bearer <token>`), the scoring
server moving to a private loopback port; an address beyond loopback without a token is refused.
Every `--poll-seconds` the registry is asked again: when the champion moved (an approval, a
promoted retrain), the new version's copy is verified and the server restarted on it (requests
fail for the few seconds that takes; a pinned version never moves), and a server (or the gateway)
that died is started again. What is served, since when, is logged and written to `--state-file`.
Stop with SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from infra.processes import free_port, loopback_ok
from infra.secrets import write_private

PROG = "python -m deployments.serving"
HOST = "127.0.0.1"  # the scoring server authenticates nobody: never beyond loopback
READY_TIMEOUT = 120.0  # seconds a scoring server may take to answer /ping after it starts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-name", required=True, help="Registered model to serve.")
    p.add_argument("--version", help="Serve this version and never move (default: follow @champion).")
    p.add_argument(
        "--host",
        default=HOST,
        help="Address to answer on (default: %(default)s); beyond loopback only with KEEL_SERVING_TOKEN set.",
    )
    p.add_argument("--port", type=int, default=5601, help="Port to answer on (default: %(default)s).")
    p.add_argument("--poll-seconds", type=float, default=10, help="How often the champion is looked up.")
    p.add_argument("--state-file", type=Path, help="Where to write what is served (JSON).")
    return p


def wanted_version(client, name: str, pinned: str | None) -> str | None:
    """The version to serve: the pinned one, else the champion (None: there is none yet)."""
    from tasks.steps.model import find_champion

    if pinned:
        return str(client.get_model_version(name, pinned).version)
    champion = find_champion(client, name)
    return str(champion.version) if champion is not None else None


def verified_model(name: str, version: str, into: Path) -> Path:
    """The version's files, copied into `into` and checked against their manifest: the folder to serve."""
    from tasks.steps.integrity import logged_model_id, verified_copy

    return verified_copy(logged_model_id(f"models:/{name}/{version}"), into)


def start_server(model: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
         "--host", HOST, "--port", str(port), "--workers", "1"],
        start_new_session=True,
        # MLflow starts `uvicorn` by name: this environment's, also when it is not on PATH
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )  # fmt: skip


def start_gateway(upstream_port: int, host: str, port: int) -> subprocess.Popen:
    """The token gateway (`deployments.gateway`, which reads KEEL_SERVING_TOKEN) in front of the
    scoring server."""
    return subprocess.Popen(
        [sys.executable, "-m", "deployments.gateway", "--upstream", f"http://{HOST}:{upstream_port}",
         "--host", host, "--port", str(port)],
        start_new_session=True,
    )  # fmt: skip


def answers(port: int) -> bool:
    """Whether something accepts connections on the loopback port."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


def stop_server(server: subprocess.Popen | None, port: int | None = None, timeout: float = 20) -> None:
    """SIGTERM the process group; with `port`, also wait until nothing answers there any more.

    `mlflow models serve` is a parent whose child (`uvicorn`) is the server: the parent exits at
    once on SIGTERM while the child still answers for a moment, so a version served next would
    otherwise be reported while the old one answers, then nothing (connection refused)."""
    if server is None:
        return
    deadline = time.monotonic() + timeout
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    while port is not None and answers(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(max(0.1, deadline - time.monotonic()))
    if server.poll() is None or (port is not None and answers(port)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def ready(server: subprocess.Popen, port: int, timeout: float, stopping: Callable[[], bool]) -> bool:
    """Wait until the scoring server answers /ping (False: it exited, time ran out, or we stop)."""
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline and not stopping():
        if loopback_ok(f"http://{HOST}:{port}/ping"):
            return True
        time.sleep(0.2)
    return False


class Served:
    """What runs: the version, its scoring server and its verified copy; moved by `serve`."""

    def __init__(
        self, args: argparse.Namespace, log: logging.Logger, port: int, stopping: Callable[[], bool]
    ) -> None:
        self.args, self.log, self.port = args, log, port  # port: the scoring server's
        self.stopping = stopping
        self.version: str | None = None
        self.server: subprocess.Popen | None = None
        self.copy: Path | None = None
        self.refused: set[str] = set()  # versions whose files failed verification: never served

    def serve(self, wanted: str) -> None:
        """Serve `wanted` if it is not served (or its server died); a version whose files fail
        verification is refused, and what runs stays."""
        died = self.server is not None and self.server.poll() is not None
        if wanted in self.refused or (wanted == self.version and not died):
            return
        from tasks.steps.process_folders import process_folder, release

        fresh = process_folder("keel-serving")  # removed even if this process is killed
        try:
            model = verified_model(self.args.model_name, wanted, fresh)
        except Exception as exc:
            self.log.error("%s v%s is not served: %s", self.args.model_name, wanted, exc)
            self.refused.add(wanted)
            release(fresh)
            return
        self.stop()
        self.copy, self.server = fresh, start_server(model, self.port)
        what = "restarted (it had stopped):" if died and wanted == self.version else "serving"
        self.version = wanted
        if not ready(self.server, self.port, READY_TIMEOUT, self.stopping):
            if not self.stopping():
                code = self.server.poll()
                why = f"exited with {code}" if code is not None else f"no /ping within {READY_TIMEOUT:.0f} s"
                self.log.error("%s v%s did not start (%s): tried again at the next poll",
                               self.args.model_name, wanted, why)  # fmt: skip
                self.stop()
                self.version = None
            return
        self.log.info(
            "%s %s v%s on http://%s:%d", what, self.args.model_name, wanted, self.args.host, self.args.port
        )
        if self.args.state_file:  # whole or not at all: others read it while it is replaced
            record = {
                "model_name": self.args.model_name,
                "version": wanted,
                "url": f"http://{self.args.host}:{self.args.port}",
                "token_required": self.port != self.args.port,
                "pid": self.server.pid,
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            write_private(self.args.state_file, json.dumps(record).encode())

    def stop(self) -> None:
        stop_server(self.server, self.port)
        if self.copy is not None:
            from tasks.steps.process_folders import release

            release(self.copy)
        self.server = self.copy = None


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from tasks.steps.cli import configure_logging
    from tasks.steps.compute import is_loopback
    from tasks.steps.lineage import mlflow_client
    from tasks.steps.model import checked_model_name
    from tasks.steps.settings import get_settings

    configure_logging()
    log = logging.getLogger("keel.serving")
    from deployments.gateway import TOKEN_VARIABLE, token_from_env

    try:
        checked_model_name(args.model_name)
        token = token_from_env()
    except ValueError as exc:
        parser().error(str(exc))
    if token is None and not is_loopback(args.host):
        parser().error(
            f"--host {args.host} is beyond loopback and the scoring server authenticates nobody: "
            f"set {TOKEN_VARIABLE} (a token gateway then answers there), or serve on 127.0.0.1"
        )
    client = mlflow_client(get_settings())
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    upstream = free_port() if token else args.port
    gateway: subprocess.Popen | None = None
    served = Served(args, log, upstream, lambda: stopping)
    said_none = False
    try:
        while not stopping:
            if token and (gateway is None or gateway.poll() is not None):
                if gateway is not None:
                    log.warning("the token gateway stopped (exit %s): started again", gateway.returncode)
                gateway = start_gateway(upstream, args.host, args.port)
            try:
                wanted = wanted_version(client, args.model_name, args.version) or served.version
            except Exception as exc:  # the registry is away for a moment: keep serving what runs
                log.warning(
                    "cannot ask the registry (%s): still serving v%s", type(exc).__name__, served.version
                )
                wanted = served.version
            if wanted is not None:
                served.serve(wanted)
            elif not said_none:
                log.info("%s has no champion yet: nothing served", args.model_name)
                said_none = True
            deadline = time.monotonic() + args.poll_seconds
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        served.stop()
        stop_server(gateway)
    return 0


if __name__ == "__main__":
    sys.exit(main())
