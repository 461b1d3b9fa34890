"""Prefect's tag-limit check is asked once per run: step kinds without a limit are remembered, a
kind with a limit is left to Prefect (a real Prefect server: the test harness)."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency import services

from tasks.steps.kinds import StepKind
from tasks.steps.tag_limits import REMEMBER_SECONDS, settle_tag_limits

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_kinds_without_a_limit_are_remembered_and_a_limited_kind_is_not():
    limited = f"tag:{StepKind.TRAINING.value}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limited, limit=1))
        try:
            assert settle_tag_limits() == len(StepKind) - 1
        finally:
            client.delete_global_concurrency_limit_by_name(limited)
    cache = services._no_limits_cache
    assert cache.ttl >= REMEMBER_SECONDS
    assert cache.get(frozenset([f"tag:{StepKind.PROCESSING.value}"]))
    assert frozenset([limited]) not in cache
