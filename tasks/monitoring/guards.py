"""Guards against retraining storms: one retrain per model at a time, across processes and machines.

The lock is a Prefect global concurrency limit of 1 named `retrain-<model>` (visible in the Prefect
UI under Concurrency). Its slot is held with a lease that the holder renews, so a retrain whose
process is killed frees the model again when the lease runs out instead of blocking it forever.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress

LEASE_SECONDS = 300
ATTEMPTS = 2  # to take the slot, when no run holds it (a slow server may time out once)


def lock_name(model_name: str) -> str:
    return "retrain-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name)


def _ensure_limit(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # another retrain created it a moment ago
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


def _slots_taken(name: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


@contextmanager
def retrain_lock(model_name: str, wait_seconds: float = 5.0) -> Iterator[str | None]:
    """Hold the model's retrain slot; yields None when held, or why not when another run holds it.
    A slot that cannot be taken although none is in use (a server too slow to answer) is an error,
    not a reason to skip the retrain."""
    from prefect.concurrency.sync import concurrency

    name = lock_name(model_name)
    _ensure_limit(name)
    stack = ExitStack()
    busy = None
    for attempt in range(1, ATTEMPTS + 1):
        try:
            stack.enter_context(
                concurrency(
                    name, occupy=1, timeout_seconds=wait_seconds, strict=True, lease_duration=LEASE_SECONDS
                )
            )
            break
        except TimeoutError as exc:
            if _slots_taken(name):
                busy = f"another flow run holds the Prefect concurrency slot {name!r}"
                break
            if attempt == ATTEMPTS:
                raise RuntimeError(
                    f"could not take the Prefect concurrency slot {name!r} within {wait_seconds:g}s twice although "
                    "no run holds it: is the Prefect server overloaded?"
                ) from exc
            # The holder let go between our timeout and our look: try once more.
    with stack:
        yield busy
