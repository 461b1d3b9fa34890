"""FailStep: ends the pipeline execution as Failed with a message, recorded like any other step."""

from __future__ import annotations

from tasks.steps.base import Step, current_step
from tasks.steps.errors import StepFailed
from tasks.steps.kinds import StepKind
from tasks.steps.tags import FAIL_MESSAGE_TAG


def _fail(message: str) -> None:
    current_step().set_tags({FAIL_MESSAGE_TAG: message[:5000]})
    raise StepFailed(message)


def fail(name: str, message: str) -> None:
    """Run a FailStep named `name`: its MLflow run records the message, then the flow run fails."""
    Step(_fail, StepKind.FAIL, name)(message)
