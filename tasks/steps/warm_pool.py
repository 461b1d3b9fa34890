"""Runs join the warm pool when `KEEL_WARM_POOL` asks for one (`infra/pool.py` runs it).

`KEEL_WARM_POOL=10m` and no servers named (`PREFECT_API_URL`, `DASK_SCHEDULER_ADDRESS`): the run
uses the pool of its state directory (`<KEEL_STATE_DIR>/pool`), starting it first if none answers,
and holds a lease on it until it ends; the pool stops by itself after that long without a run.

The pool's runner (`infra/runner.py`) takes the next `python -m flows...` commands with their
libraries already imported; each run tells it at exit what it imported. Warm workers keep the
modules they imported. A run whose project code changed since the pool's
workers last ran (a newer `.py` file under `flows/`, `tasks/`, `deployments/` or the run's own
module) restarts them first, unless another run is using them; then it runs its Dask work on its own
cluster instead, and says so.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from infra.prefect_home import seed_new_home
from tasks.steps.environ import environment_restored

log = logging.getLogger(__name__)

PACKAGES = ("flows", "tasks", "deployments")


def join_warm_pool(pool_home: Path, idle: str) -> dict[str, str]:
    """The pool's variables (addresses, credentials) for this process, the pool started if it is not
    running; a lease on it is held until this process ends. The pool's folder is infra/pool.py's:
    its lock, variables and leases are read through `Pool`."""
    from infra.pool import LOCK, Pool
    from infra.processes import locked

    pool = Pool(pool_home.resolve())
    pool.home.mkdir(parents=True, exist_ok=True)
    with locked(pool.home / LOCK):  # the watchdog takes it too: no run joins a pool that is stopping
        env = pool.joinable_env()
        if env is None:
            print(
                f"Starting the warm pool in {pool.home} (KEEL_WARM_POOL={idle})", file=sys.stderr, flush=True
            )
            seed_new_home(pool.home / "prefect" / "prefect.db")
            up = [sys.executable, "-m", "infra.pool", "up", "--home", str(pool.home), "--idle", idle]
            started = subprocess.run(
                [*up, "--preload", *_main_module()],
                check=False,
                stdout=sys.stderr,
            )
            env = pool.joinable_env() if started.returncode == 0 else None
            if env is None:
                raise RuntimeError(
                    f"the warm pool in {pool.home} did not start (see {pool.logs}); unset "
                    "KEEL_WARM_POOL to run without it"
                )
        others = pool.live_leases()
        if not _workers_current(pool.home, env, busy=bool(others)):
            env.pop("DASK_SCHEDULER_ADDRESS")
        pool.leases.mkdir(exist_ok=True)
        lease = pool.leases / str(os.getpid())
        lease.touch()
    atexit.register(lease.unlink, missing_ok=True)
    atexit.register(_teach_runner, pool.home)
    log.info(
        "Warm pool: Prefect %s, Dask %s", env["PREFECT_API_URL"], env.get("DASK_SCHEDULER_ADDRESS", "(own)")
    )
    return env


@contextlib.contextmanager
def using_servers(env: dict[str, str]) -> Iterator[None]:
    """This process talks to the servers in `env` — ours, which live for one run (its temporary
    Prefect server) or for a warm pool's idle minutes: its environment (Dask's config and the workers
    it starts read it), and Prefect's settings, which Prefect read when it was imported.
    No flow-run heartbeats there, unless the user set their frequency: Prefect joins its heartbeat
    thread at each flow run's end, and that thread sleeps in 1 s steps (up to 1 s added to every run;
    1.0 s for a short one here), while nothing reads them on these servers (they are for automations
    that find crashed runs on a long-lived server; a dead run's flow run is marked Crashed by the next
    run here: `lineage.end_stale_runs`)."""
    import dask
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    try:
        with environment_restored(env):  # as it was afterwards (a run called in-process, e.g. from a test)
            os.environ.update(env)
            dask.config.refresh()
            updates = {
                PREFECT_API_URL: env["PREFECT_API_URL"],
                PREFECT_API_AUTH_STRING: env.get("PREFECT_API_AUTH_STRING"),
            }
            if "heartbeat_frequency" not in get_current_settings().flows.model_fields_set:
                updates[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = None
            with temporary_settings(updates=updates):
                yield
    finally:
        dask.config.refresh()


def _main_module() -> list[str]:
    """The module this program runs (`flows.monitor` for `python -m flows.monitor`), if any."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return [spec.name] if spec is not None and spec.name != "__main__" else []


def _teach_runner(pool_home: Path) -> None:
    """At exit: the pool's runner imports what this run imported, for the next run it takes."""
    from infra.runner import learn

    learn(pool_home, [name for name in sys.modules if not name.startswith("__main__")])


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
