"""Steps do not wait for Prefect's tag-limit check: the server is asked once per run, up front.

Prefect gives each task run a slot of its tags' concurrency limits (`tag:ProcessingStep`, ...) and,
when a tag has none, remembers that for 5 s. Otherwise each step asks the server again, and on a
SQLite server that request collided with the run's own log and state writes after any step longer
than 5 s (SQLITE_BUSY, answered 503, retried by Prefect's client 2 s later): 2.0-2.3 s on one step in
four of a monitor run, and on the first step of each kind. `settle_tag_limits` reads the server's
limits once when an execution starts (`lineage.pipeline_run`), and remembers for `REMEMBER_SECONDS` which of our step kinds have
none; a kind that has a limit is left to Prefect, as before. A tag limit created during a run
applies to its steps after that time (to new runs at once).
"""

from __future__ import annotations

from tasks.steps.kinds import StepKind

REMEMBER_SECONDS = 300.0
PAGE = 200


def settle_tag_limits() -> int:
    """Remember the step kinds without a tag limit on this run's Prefect server; how many."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency import services

    cache = getattr(services, "_no_limits_cache", None)  # a cachetools.TTLCache in Prefect 3.8
    if cache is None or not hasattr(cache, "ttl"):
        return 0
    limited: set[str] = set()
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_global_concurrency_limits(limit=PAGE, offset=len(limited))
            limited.update(limit.name for limit in page)
            if len(page) < PAGE:
                break
    remembered = type(cache)(maxsize=cache.maxsize, ttl=max(cache.ttl, REMEMBER_SECONDS))
    free = [f"tag:{kind.value}" for kind in StepKind if f"tag:{kind.value}" not in limited]
    for name in free:
        remembered[frozenset([name])] = True
    services._no_limits_cache = remembered
    return len(free)
