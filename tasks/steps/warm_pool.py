"""Runs join the warm pool when `KEEL_WARM_POOL` asks for one (`infra/pool.py` runs it).

`KEEL_WARM_POOL=10m` and no servers named (`PREFECT_API_URL`, `DASK_SCHEDULER_ADDRESS`): the run
uses the pool of its state directory (`<KEEL_STATE_DIR>/pool`), starting it first if none answers,
and holds a lease on it until it ends; the pool stops by itself after that long without a run.

Warm workers keep the modules they imported. A run whose project code changed since the pool's
workers last ran (a newer `.py` file under `flows/`, `tasks/`, `deployments/` or the run's own
module) restarts them first, unless another run is using them; then it runs its Dask work on its own
cluster instead, and says so.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tasks.steps.prefect_home import seed_new_home

log = logging.getLogger(__name__)

DURATION = re.compile(r"^\d+(\.\d+)?\s*(s|m|h)$")  # infra/pool.py reads the same form
PACKAGES = ("flows", "tasks", "deployments")


def join_warm_pool(pool_home: Path, idle: str) -> dict[str, str]:
    """The pool's variables (addresses, credentials) for this process, the pool started if it is not
    running; a lease on it is held until this process ends."""
    pool_home = pool_home.resolve()
    pool_home.mkdir(parents=True, exist_ok=True)
    with _locked(pool_home / ".lock"):
        env = _live_env(pool_home)
        if env is None:
            print(
                f"Starting the warm pool in {pool_home} (KEEL_WARM_POOL={idle})", file=sys.stderr, flush=True
            )
            seed_new_home(pool_home / "prefect" / "prefect.db")
            started = subprocess.run(
                [sys.executable, "-m", "infra.pool", "up", "--home", str(pool_home), "--idle", idle],
                check=False,
                stdout=sys.stderr,
            )
            env = _live_env(pool_home) if started.returncode == 0 else None
            if env is None:
                raise RuntimeError(
                    f"the warm pool in {pool_home} did not start (see {pool_home / 'logs'}); unset "
                    "KEEL_WARM_POOL to run without it"
                )
        others = _live_leases(pool_home)
        if not _workers_current(pool_home, env, busy=bool(others)):
            env.pop("DASK_SCHEDULER_ADDRESS")
        lease = pool_home / "leases" / str(os.getpid())
        lease.parent.mkdir(exist_ok=True)
        lease.touch()
    atexit.register(lease.unlink, missing_ok=True)
    log.info(
        "Warm pool: Prefect %s, Dask %s", env["PREFECT_API_URL"], env.get("DASK_SCHEDULER_ADDRESS", "(own)")
    )
    return env


@contextlib.contextmanager
def using_servers(env: dict[str, str]) -> Iterator[None]:
    """This process talks to the servers in `env`: its environment (Dask's config and the workers it
    starts read it), and Prefect's settings, which Prefect read when it was imported."""
    import dask
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    dask.config.refresh()
    updates = {
        PREFECT_API_URL: env["PREFECT_API_URL"],
        PREFECT_API_AUTH_STRING: env.get("PREFECT_API_AUTH_STRING"),
    }
    try:
        with temporary_settings(updates=updates):
            yield
    finally:  # the environment as it was (a run called in-process, e.g. from a test)
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        dask.config.refresh()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process at a time looks for, starts or stops the pool (infra/pool.py's watchdog takes
    the same `.lock` before it stops the pool, so no run joins a pool that is stopping)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _live_env(pool_home: Path) -> dict[str, str] | None:
    """The pool's variables if its Prefect server and Dask scheduler answer now."""
    import socket

    import httpx

    try:
        env = json.loads((pool_home / "pool-env.json").read_text())
        user, _, password = env["PREFECT_API_AUTH_STRING"].partition(":")
        answer = httpx.get(f"{env['PREFECT_API_URL']}/health", auth=(user, password), timeout=2)
        host, port = env["DASK_SCHEDULER_ADDRESS"].removeprefix("tls://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            pass
    except (OSError, ValueError, KeyError, httpx.HTTPError):
        return None
    return env if answer.is_success else None


def _live_leases(pool_home: Path) -> list[int]:
    pids = []
    for lease in (pool_home / "leases").glob("*"):
        if lease.name.isdigit():
            try:
                os.kill(int(lease.name), 0)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass
            pids.append(int(lease.name))
    return pids


def code_stamp() -> str:
    """The newest modification time of the project's code and of the running program's module."""
    files: list[Path] = []
    for name in PACKAGES:
        module = sys.modules.get(name)
        if module is not None and module.__file__:
            files.extend(Path(module.__file__).parent.rglob("*.py"))
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main:
        files.append(Path(main))
    return str(max((f.stat().st_mtime_ns for f in files if f.is_file()), default=0))


def _workers_current(pool_home: Path, env: dict[str, str], busy: bool) -> bool:
    """Whether the pool's workers may run this code: they last ran the same code, or they were
    restarted now (not while another run uses them: False)."""
    stamp_file = pool_home / "code-stamp"
    stamp = code_stamp()
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return True
    if busy:
        log.warning(
            "Warm pool: the project's code changed and another run uses the workers; this run starts its own"
        )
        return False
    import dask
    import distributed

    with (
        dask.config.set(_tls_config(env)),
        distributed.Client(env["DASK_SCHEDULER_ADDRESS"], timeout=30) as client,
    ):
        if stamp_file.exists():
            log.info("Warm pool: the project's code changed; restarting the workers")
            client.restart()
    stamp_file.write_text(stamp)
    return True


def _tls_config(env: dict[str, str]) -> dict[str, str]:
    """Dask's TLS settings from the pool's variables (`DASK_DISTRIBUTED__COMM__TLS__...`)."""
    prefix = "DASK_DISTRIBUTED__COMM__TLS__"
    return {
        "distributed.comm.tls." + k.removeprefix(prefix).lower().replace("__", "."): v
        for k, v in env.items()
        if k.startswith(prefix)
    }
