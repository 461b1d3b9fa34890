"""Retry policies for steps (SageMaker's StepRetryPolicy: which failures, how often, how long between).

A policy names the kinds of failure worth another attempt; anything else fails the step at once.
Bad input and deliberate failures are never retried, whatever the policy says: running again
cannot fix the data. Attempts resume the step's one MLflow run (see `tasks.steps.base`).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.steps.errors import DataValidationError, NotInRegistry, StepFailed

Failure = Literal["worker-lost", "tracking-unavailable", "any"]
NEVER_RETRIED: tuple[type[BaseException], ...] = (DataValidationError, StepFailed, NotInRegistry)


class RetryPolicy(BaseModel):
    """How a step is retried: up to `attempts` in all, waiting `interval_seconds`, then that times
    `backoff_rate`, and so on, for the failures named in `retry_on`."""

    model_config = ConfigDict(frozen=True)

    attempts: int = Field(default=1, ge=1, le=20, description="Attempts in all (1: no retry).")
    interval_seconds: float = Field(default=2.0, ge=0, le=3600, description="Wait before the first retry.")
    backoff_rate: float = Field(default=2.0, ge=1, le=10, description="Each wait is this times the previous.")
    retry_on: tuple[Failure, ...] = Field(
        default=("worker-lost", "tracking-unavailable"),
        description="worker-lost: a Dask worker died or its connection dropped; tracking-unavailable: "
        "the MLflow server did not answer or answered 5xx; any: every failure but bad input.",
    )

    def delays(self) -> list[float]:
        """The waits before attempts 2, 3, ... (Prefect's `retry_delay_seconds`)."""
        return [self.interval_seconds * self.backoff_rate**i for i in range(self.attempts - 1)]

    def retries(self, exc: BaseException) -> bool:
        """Whether this failure is worth another attempt under this policy."""
        if isinstance(exc, NEVER_RETRIED):
            return False
        return any(_MATCHERS[failure](exc) for failure in self.retry_on)


NO_RETRY = RetryPolicy(attempts=1)


def worker_lost(exc: BaseException) -> bool:
    """A Dask worker died (KilledWorker) or a connection to the cluster dropped."""
    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError

    return isinstance(exc, KilledWorker | CommClosedError)


def tracking_unavailable(exc: BaseException) -> bool:
    """The MLflow tracking server could not be reached, timed out, or failed on its side (5xx)."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return True
    if isinstance(exc, RestException):  # the server answered, with an error of its own
        return exc.get_http_status_code() >= HTTPStatus.INTERNAL_SERVER_ERROR
    if isinstance(exc, MlflowException):  # the client gave up reaching it (after its own retries)
        message = str(exc.message)
        return message.startswith("API request to") and "failed with" in message
    return False


_MATCHERS = {
    "worker-lost": worker_lost,
    "tracking-unavailable": tracking_unavailable,
    "any": lambda exc: isinstance(exc, Exception),
}
