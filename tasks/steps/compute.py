"""The one place that decides where heavy work runs.

`DASK_SCHEDULER_ADDRESS` set: connect to that scheduler (the stack's, or a warm pool's). Unset: a
run whose input data is smaller than `KEEL_DASK_IN_PROCESS_BELOW` (16 MiB) runs its Dask work on
threads of its own process, since worker processes cost seconds to start and to import into (about
3 s here) for work that takes less; a larger run starts a LocalCluster of worker processes and
closes it afterwards. Steps get the client with `dask_client()` either way (the same code, the same
Dask API); the cluster is opened on that first call, so a run whose steps are all reused never
starts one.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.steps.settings import Settings

if TYPE_CHECKING:
    import distributed

log = logging.getLogger(__name__)

# Dask's workers wake every 10 ms to profile themselves and every 20 ms to check their event loop.
# On a small machine that costs CPU-bound tasks dearly: a 2-thread LightGBM trial ran ~20% slower in
# a worker than in a plain process on 2 cores, and as fast with these (README: Performance). The
# workers in the run's own process get them too: there the profiling's `sys._current_frames()` also
# deadlocked a run on CPython 3.11 before 3.11.9 (a garbage collection inside it let another thread
# take the interpreter lock while it held the thread list's lock; python/cpython#106883), and its
# profile is shown nowhere (no dashboard).
QUIET_WORKERS = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}

# dask-expr fuses small Parquet files into fewer partitions, by how many of their columns an
# expression reads. A row count reads none and can get other partitions than a column read of the
# same files, so a filter on a folder of small files failed ("boolean index did not match indexed
# array", dask/dask-expr#1118). Our computations run with that fusion off.
SAME_PARTITIONS = {"optimization.tune.active": False}


_open_cluster: ContextVar[Callable[[], distributed.Client] | None] = ContextVar("keel_dask", default=None)


def local_size(paths: Iterable[str | None]) -> int | None:
    """Bytes of the local files and folders named (None if one is a URL, absent, or not given): the
    size of a run's input, as `dask_cluster` weighs it."""
    total = 0
    for item in paths:
        if not item or "://" in item:
            return None
        path = Path(item).expanduser()
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        else:
            return None
    return total


def runs_in_process(settings: Settings, input_bytes: int | None) -> bool:
    """Whether a run's Dask work stays in its own process: no scheduler to connect to, and input
    data known to be smaller than the threshold (unknown size, e.g. a remote URL: worker processes)."""
    if settings.dask_scheduler_address or input_bytes is None:
        return False
    return input_bytes < settings.in_process_below_bytes


@contextmanager
def dask_cluster(settings: Settings, input_bytes: int | None = None) -> Iterator[None]:
    """Make a Dask cluster available to the steps of a run: connected to (or started) when a step
    first asks for `dask_client()`, so an execution whose steps are all cached never pays for it;
    closed at the end. `input_bytes`: the size of the data the run reads, if known
    (`runs_in_process`)."""
    opened: list[Any] = []
    lock = threading.Lock()  # steps side by side may ask at once: one cluster
    in_process = runs_in_process(settings, input_bytes)

    def open_client() -> distributed.Client:
        with lock:
            if not opened:
                opened.extend(_in_process(settings, input_bytes or 0) if in_process else _connect(settings))
            return opened[0]

    import dask

    token = _open_cluster.set(open_client)
    try:
        with dask.config.set(SAME_PARTITIONS):
            yield
    finally:
        _open_cluster.reset(token)
        for item in opened:
            if item is not None:
                item.close()


def _connect(settings: Settings) -> tuple[distributed.Client, distributed.LocalCluster | None]:
    import dask
    import distributed

    if settings.dask_scheduler_address:
        client = distributed.Client(settings.dask_scheduler_address, set_as_default=True)
        log.info("Dask: connected to %s (%d workers)", client.scheduler.address, _n_workers(client))
        return client, None
    with dask.config.set(QUIET_WORKERS):  # the nannies hand this to the workers they start
        cluster = distributed.LocalCluster(
            n_workers=settings.dask_local_workers,
            threads_per_worker=settings.dask_threads_per_worker,
            memory_limit=settings.dask_worker_memory,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        )
    client = distributed.Client(cluster, set_as_default=True)
    log.info(
        "Dask: started LocalCluster %s, %d workers x %d threads, dashboard %s",
        cluster.scheduler_address,
        settings.dask_local_workers,
        settings.dask_threads_per_worker,
        client.dashboard_link,
    )
    return client, cluster


def _in_process(settings: Settings, input_bytes: int) -> tuple[distributed.Client, distributed.LocalCluster]:
    """A scheduler and one worker on threads of this process, over Dask's in-process transport
    (nothing listens on a port): as many threads as the LocalCluster would have had."""
    import dask
    import distributed

    threads = settings.dask_local_workers * settings.dask_threads_per_worker
    with dask.config.set(QUIET_WORKERS):
        cluster = distributed.LocalCluster(
            n_workers=1, threads_per_worker=threads, processes=False, dashboard_address=None, memory_limit=0
        )
    client = distributed.Client(cluster, set_as_default=True)
    log.info(
        "Dask: %d threads in this process (input %.1f MiB < %s; more, or DASK_SCHEDULER_ADDRESS: workers)",
        threads,
        input_bytes / 2**20,
        settings.dask_in_process_below,
    )
    return client, cluster


def dask_client() -> distributed.Client:
    """The run's client (opening the cluster on first use); also the default for `dask.compute`."""
    open_client = _open_cluster.get()
    if open_client is None:
        raise RuntimeError("no Dask cluster is open: run steps inside `dask_cluster(...)`")
    return open_client()


def worker_identity() -> dict[str, str]:
    """Called on a worker: which worker and process did the work (recorded in lineage)."""
    import os
    import socket

    from distributed import get_worker

    worker = get_worker()
    return {"dask.worker": worker.address, "dask.worker_pid": str(os.getpid()), "host": socket.gethostname()}


_steps_side_by_side: ContextVar[int] = ContextVar("keel_steps_side_by_side", default=1)


@contextmanager
def steps_side_by_side(n: int) -> Iterator[None]:
    """Steps submitted inside this block run at the same time as `n` - 1 others: they share the
    cluster's threads out (`threads_per_task`) instead of each taking all of them."""
    token = _steps_side_by_side.set(max(1, n))
    try:
        yield
    finally:
        _steps_side_by_side.reset(token)


def threads_per_task(client: distributed.Client, tasks_at_once: int) -> int:
    """Threads each of `tasks_at_once` concurrent tasks of a step may use: the cluster's worker
    threads, shared out among them and the steps running beside it (so one trial at a time uses
    every core, as LightGBM would in a plain script)."""
    workers = client.scheduler_info().get("workers", {}).values()
    total = sum(w.get("nthreads", 1) for w in workers)
    return max(1, total // (tasks_at_once * _steps_side_by_side.get()))


def _n_workers(client) -> int:
    return len(client.scheduler_info().get("workers", {}))


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address; any other name may resolve to any interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def workers_on_loopback(addresses: Iterable[str]) -> bool:
    """Whether every worker (`tcp://127.0.0.1:40123`, `inproc://…`) is reachable on this machine's
    loopback only: then nothing a step opens needs to be reachable from the network."""
    found = False
    for address in addresses:
        found = True
        scheme, _, rest = address.partition("://")
        if scheme != "inproc" and not is_loopback(rest.rsplit(":", 1)[0].strip("[]")):
            return False
    return found
