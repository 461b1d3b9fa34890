"""The one place that decides where heavy work runs.

`DASK_SCHEDULER_ADDRESS` set: connect to that scheduler (a warm pool). Unset: start a LocalCluster
for this run and close it afterwards. Steps get the client with `dask_client()`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from tasks.settings import Settings

if TYPE_CHECKING:
    import distributed

log = logging.getLogger(__name__)


@contextmanager
def dask_cluster(settings: Settings) -> Iterator[distributed.Client]:
    """Yield a Dask client for the run, set as the process default."""
    import distributed

    if settings.dask_scheduler_address:
        client = distributed.Client(settings.dask_scheduler_address, set_as_default=True)
        log.info("Dask: connected to %s (%d workers)", client.scheduler.address, _n_workers(client))
        try:
            yield client
        finally:
            client.close()
        return

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
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def dask_client() -> distributed.Client:
    """The client opened by `dask_cluster` for this run."""
    import distributed

    try:
        return distributed.default_client()
    except ValueError as exc:
        raise RuntimeError("no Dask cluster is open: run steps inside `dask_cluster(...)`") from exc


def worker_identity() -> dict[str, str]:
    """Called on a worker: which worker and process did the work (recorded in lineage)."""
    import os
    import socket

    from distributed import get_worker

    worker = get_worker()
    return {"dask.worker": worker.address, "dask.worker_pid": str(os.getpid()), "host": socket.gethostname()}


def _n_workers(client) -> int:
    return len(client.scheduler_info().get("workers", {}))
