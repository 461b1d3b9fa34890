"""A run without `PREFECT_API_URL` starts its temporary Prefect server itself, first thing.

Prefect starts the same server (its API app under uvicorn, on 127.0.0.1, the UI off, the home's
SQLite database) when a run first asks for a client, and to do so imports the whole server API into
the run's process first: 2.5-2.8 s of CPU here, only for the class that starts a subprocess. Here the
server is this module run as a process (`python -m infra.temporary_server`), started by `start_early`
in a command's `if __name__ == "__main__":` block before the command imports anything heavy, so its
4-5 s of start run on the other core while the run imports its libraries and opens its MLflow store.

The server process resolves Prefect's settings as the run does (same environment, same folder) and
decides on its own: with an API URL or with temporary servers disallowed it says so and exits.
Otherwise it copies the template database into a new home (`infra.prefect_home`; the copy has the
block types registered already, so it does not register them again: 1-2 s of its start here;
without a template, servers starting side by side on a new home wait for the first to create its
database), binds
a port on 127.0.0.1, prints its API URL as one JSON line on stdout, and serves until SIGTERM (once
up, it asks itself what a run asks first: `WARM_UP`). The run
(`start_temporary_server`) reads that line, waits for the health check, and stops it when the
process exits, after Prefect has sent its last logs and events, as Prefect stops its own. It runs in
a session of its own, so a Ctrl-C stops the run, not the server the run reports its end to; and it
stops by itself when the run's process is gone, however it ended.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from infra.collector import pause_collection, resume_collection
from infra.processes import http_ok, loopback_ok

log = logging.getLogger("prefect")  # Prefect logs its own temporary server here, in the same words

HOST = "127.0.0.1"
STARTUP_FAILED = 3  # uvicorn's exit code when its app does not start
# What Prefect's own temporary server is told: its API only, as the ephemeral server of one run.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


@dataclass
class TemporaryServer:
    """One Prefect server for this process, like Prefect's own: started once, reused, stopped at exit."""

    process: subprocess.Popen
    started: float
    early: bool  # started by `start_early`, before the command imported its libraries
    api_url: str | None = None

    def wait_until_ready(self, timeout: float) -> str:
        """The server's API URL once it answers its health check; RuntimeError if it exits, declines
        or does not answer within `timeout` seconds (from its start)."""
        deadline = self.started + timeout
        if self.api_url is None:
            self.api_url = _announced_url(self.process, deadline)
            log.info("Starting temporary server on %s", self.api_url.removesuffix("/api"))
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"Prefect's temporary server exited with code {code} before it answered")
            if loopback_ok(f"{self.api_url}/health"):
                return self.api_url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"Prefect's temporary server did not answer within {timeout:g} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
        )

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        if self.api_url is not None:
            log.info("Stopping temporary server on %s", self.api_url.removesuffix("/api"))
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_server: TemporaryServer | None = None


def _launch(env: dict[str, str], early: bool) -> TemporaryServer:
    global _server  # noqa: PLW0603  # one per process, as Prefect keeps its own
    # Its own session: a Ctrl-C in the terminal reaches the run, which still needs the server to
    # record how it ended (in the run's process group the server stopped first, and the run retried
    # it for minutes). Its standard input is a pipe the run never writes: when the run ends in any
    # way, even SIGKILLed, the server reads end-of-file and stops.
    process = subprocess.Popen(
        [sys.executable, "-m", __name__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    _server = TemporaryServer(process, started=time.monotonic(), early=early)
    atexit.register(_server.stop)  # registered before Prefect's log and event workers: runs after them
    return _server


def start_early() -> None:
    """Start the server process now, in a command's `__main__` block before its imports, unless the
    environment says the run will not use one (`PREFECT_API_URL`, the warm pool, `--help`).
    What Prefect's settings say beyond the environment (a profile's API URL) the server process
    finds out itself; a server the run does not use is stopped (`discard_early_server`)."""
    from infra.runner import INSIDE

    env = os.environ
    if INSIDE or _server is not None or env.get("PREFECT_API_URL") or env.get("KEEL_WARM_POOL"):
        return
    if {"-h", "--help"} & set(sys.argv[1:]):
        return
    _launch(dict(env), early=True)


def start_temporary_server() -> TemporaryServer:
    """This process's temporary server: the one `start_early` started, else one started now (with
    this process's explicit Prefect settings in its environment)."""
    if _server is not None and _server.process.poll() is None:
        return _server
    from prefect.settings import get_current_settings

    return _launch(
        {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}, early=False
    )


def running_server() -> TemporaryServer | None:
    """This process's temporary server, if it has one."""
    return _server


def discard_early_server() -> None:
    """The run uses another server: stop the one `start_early` started, if any."""
    global _server  # noqa: PLW0603
    if _server is not None:
        _server.stop()
        _server = None


def _announced_url(process: subprocess.Popen, deadline: float) -> str:
    """The API URL the server process prints first; RuntimeError if it exits or declines instead."""
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            break
        line += chunk
    process.stdout.close()
    with contextlib.suppress(ValueError):
        said = json.loads(line)
        if said.get("api_url"):
            return str(said["api_url"])
        raise RuntimeError(f"Prefect's temporary server did not start: {said.get('declined')}")
    code = process.poll()
    raise RuntimeError(f"Prefect's temporary server did not say where it listens (exit code {code})")


def _announce(**what: str) -> None:
    """One JSON line on stdout for the run, then stdout goes to stderr: the run reads that line only."""
    sys.stdout.write(json.dumps(what) + "\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def _exit(*_: object) -> None:
    raise SystemExit(0)


def _stop_when_the_run_ends() -> None:
    """End-of-file on standard input: the run that started this server has ended (however it did)."""
    with contextlib.suppress(OSError):
        while os.read(sys.stdin.fileno(), 4096):
            pass
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own way out (or `_exit` before it runs)


# What a run asks first, asked by the server itself once it is up, read-only: the first request to
# the API builds FastAPI's routes (0.3 s here), the first read of each table SQLAlchemy's loaders
# (0.2 s for flow runs). The run's imports take longer than the server's start, so this is done
# before it asks, off its critical path (`warm_up`).
WARM_UP = (
    ("/admin/version", None),
    ("/flows/filter", '{"limit": 1}'),
    ("/flow_runs/filter", '{"limit": 1}'),
    ("/task_runs/filter", '{"limit": 1}'),
)


def _once_started(server: Any, creating: int | None, api_url: str) -> None:
    """Once uvicorn has run the app's start-up (or given up): the database is migrated, so the next
    server on this home may start (`creating`: the lock it waits for, if this server created the
    database); then the warm-up, and the garbage collector runs again."""
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if creating is not None:
        os.close(creating)
    warm_up(server, api_url)
    resume_collection()  # paused by `serve` while it imported Prefect's server


def warm_up(server: Any, api_url: str) -> None:
    """Ask the started server what a run asks first (`WARM_UP`). A failure is left for the run's own
    request to meet."""
    for path, body in WARM_UP:
        if server.should_exit:
            return
        with contextlib.suppress(OSError):
            http_ok(f"{api_url}{path}", json_body=body, timeout=10)


def serve() -> int:
    """The server process: Prefect's API app on a port of 127.0.0.1, as Prefect runs its own."""
    pause_collection()  # until it is up and warmed up (`infra.collector`)
    for stop in (signal.SIGTERM, signal.SIGINT):  # until uvicorn takes them: a half-done copy is removed
        signal.signal(stop, _exit)
    if stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode):  # started by a run (not by hand)
        threading.Thread(target=_stop_when_the_run_ends, daemon=True).start()
    os.environ.update(SERVER_ENV)
    from prefect.settings import (
        PREFECT_API_BLOCKS_REGISTER_ON_START,
        PREFECT_API_URL,
        PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        temporary_settings,
    )

    from infra.prefect_home import first_start, seed_new_home

    if PREFECT_API_URL.value():
        _announce(declined="PREFECT_API_URL is set")
        return 0
    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        _announce(declined="temporary servers are disallowed (PREFECT_SERVER_ALLOW_EPHEMERAL_MODE)")
        return 0
    seeded, creating = False, None
    with contextlib.suppress(OSError):
        seeded = seed_new_home()
        creating = None if seeded else first_start()  # no template: one server at a time creates it
    sock = socket.socket()
    sock.bind((HOST, 0))
    api_url = f"http://{HOST}:{sock.getsockname()[1]}/api"
    _announce(api_url=api_url)
    import uvicorn
    from prefect.server.api.server import create_app

    from infra.prefect_sqlite import write_lock_first

    write_lock_first()  # a run's writes beside its events and logs: no "database is locked"

    # A copied home has the block types registered: not again. Nor is their registry hashed to see
    # whether they changed (the memo), which imported every Prefect collection into the server first
    # (prefect-dask: 0.5 s of its start here) only to skip the registration.
    not_again = {PREFECT_API_BLOCKS_REGISTER_ON_START: False, PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION: False}
    with temporary_settings(not_again if seeded else {}):
        server = uvicorn.Server(uvicorn.Config(create_app(), log_level="error", lifespan="on"))
        # uvicorn shuts down gracefully on SIGTERM, then raises it again: with the default action
        # the process then ends at once, as uvicorn's command line does, rather than tearing down
        # every module of Prefect's server one by one (1.6 s here, which the run's exit waited for).
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, signal.SIG_DFL)
        threading.Thread(target=_once_started, args=(server, creating, api_url), daemon=True).start()
        server.run(sockets=[sock])
    return 0 if server.started else STARTUP_FAILED


if __name__ == "__main__":
    sys.exit(serve())
