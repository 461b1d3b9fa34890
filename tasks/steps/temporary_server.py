"""A run without `PREFECT_API_URL` starts its temporary Prefect server itself, at its very start.

Prefect starts the same server (`uvicorn prefect.server.api.server:create_app`, on 127.0.0.1, the
UI off, the home's SQLite database) when a run first asks for a client, and to do so imports the
whole server API into the run's process first: 2.5-2.8 s of CPU here, spent while the run imports
its own libraries, only for the class that starts a subprocess. Started here, from this small
module, the server comes up on the other core while the run imports and opens its MLflow store; the
run then talks to it as to any server (`PREFECT_API_URL` for the run), and it is stopped when the
process exits, after Prefect has sent its last logs and events, as Prefect stops its own.

On a home whose database was just copied from the template (`tasks.steps.prefect_home`), the block
types of the installed Prefect and Prefect collections are registered already: the server is told
not to register them again (1-2 s of its start here). Prefect then notes them as registered in the
home's memo, so later starts skip them too, as after a registration of its own.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

log = logging.getLogger("prefect")  # Prefect logs its own temporary server here, in the same words

PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind


@dataclass
class TemporaryServer:
    """One Prefect server for this process, like Prefect's own: started once, reused, stopped at exit."""

    register_blocks: bool = True
    port: int = 0
    process: subprocess.Popen | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        """Start the server process; returns at once (`wait_until_ready` waits for it)."""
        import prefect
        from prefect.settings import get_current_settings

        from infra.processes import free_port

        self.port = free_port()
        env = {
            **os.environ,
            **get_current_settings().to_environment_variables(exclude_unset=True),
            "PREFECT_UI_ENABLED": "0",  # the same as Prefect's temporary server
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        if not self.register_blocks:
            env["PREFECT_SERVER_REGISTER_BLOCKS_ON_START"] = "false"
        app_dir = str(Path(prefect.__file__).parent.parent)
        log.info("Starting temporary server on http://127.0.0.1:%s", self.port)
        app = "prefect.server.api.server:create_app"
        where = ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        command = [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory", app, *where]
        self.process = subprocess.Popen(command, env=env)
        self.started = time.monotonic()

    def wait_until_ready(self, timeout: float) -> str:
        """The server's API URL once it answers its health check; RuntimeError if it exits or does
        not answer within `timeout` seconds."""
        assert self.process is not None, "start() first"
        while time.monotonic() - self.started < timeout:
            code = self.process.poll()
            if code == PORT_IN_USE:  # taken between choosing it and binding it: another port
                self.start()
                continue
            if code is not None:
                raise RuntimeError(f"Prefect's temporary server exited with code {code} before it answered")
            if _healthy(self.api_url):
                return self.api_url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"Prefect's temporary server did not answer within {timeout:g} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
        )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        log.info("Stopping temporary server on http://127.0.0.1:%s", self.port)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_server: TemporaryServer | None = None


def start_temporary_server(register_blocks: bool) -> TemporaryServer:
    """This process's temporary server, started now unless it is running already."""
    global _server  # noqa: PLW0603  # one per process, as Prefect keeps its own
    if _server is None or _server.process is None or _server.process.poll() is not None:
        _server = TemporaryServer(register_blocks=register_blocks)
        _server.start()
        atexit.register(_server.stop)  # registered before Prefect's log and event workers: runs after them
    return _server


def _healthy(api_url: str) -> bool:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with direct.open(f"{api_url}/health", timeout=2) as reply:
            return bool(reply.status == HTTPStatus.OK)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
