"""ConditionStep: compares values against thresholds as a recorded step, not a hidden `if`.

The compared values, operators and the outcome go to the step's MLflow run and to a Prefect
markdown artifact; the flow then runs only the branch the outcome chose.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Literal

from pydantic import BaseModel, Field

from tasks.steps.base import Step, current_step
from tasks.steps.kinds import StepKind
from tasks.steps.tags import OUTCOME_MESSAGE_TAG, OUTCOME_TAG

_OPERATORS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


_POSITIONAL = ("left_name", "left", "op", "right_name", "right")


class Check(BaseModel):
    """One comparison: `left op right`, e.g. `Check("test_auc", metrics["auc"], ">=", "min_auc", 0.7)`."""

    left_name: str
    left: float
    op: Literal[">=", ">", "<=", "<"]
    right_name: str
    right: float

    def __init__(self, *args: Any, **data: Any) -> None:
        """Positional (left_name, left, op, right_name, right) or by keyword."""
        if len(args) > len(_POSITIONAL):
            raise TypeError(f"Check takes at most {len(_POSITIONAL)} positional arguments, got {len(args)}")
        super().__init__(**dict(zip(_POSITIONAL, args, strict=False)), **data)

    @property
    def passed(self) -> bool:
        return bool(_OPERATORS[self.op](self.left, self.right))

    def describe(self) -> str:
        verdict = "passed" if self.passed else "missed"
        return f"{self.left_name} = {self.left:.4g} {self.op} {self.right_name} = {self.right:.4g}: {verdict}"


class ConditionOutcome(BaseModel):
    """What a ConditionStep decided, and why."""

    name: str
    passed: bool
    checks: list[Check] = Field(default_factory=list)

    @property
    def message(self) -> str:
        failed = [c.describe() for c in self.checks if not c.passed]
        if self.passed:
            return f"{self.name} passed: " + "; ".join(c.describe() for c in self.checks)
        return f"{self.name} failed: " + "; ".join(failed)


def _artifact_key(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "condition"


def _evaluate(checks: list[Check]) -> ConditionOutcome:
    from prefect.artifacts import create_markdown_artifact

    run = current_step()
    outcome = ConditionOutcome(name=run.step, passed=all(c.passed for c in checks), checks=checks)
    for index, check in enumerate(checks):
        run.log_params({f"check.{index}": f"{check.left_name} {check.op} {check.right_name}"})
        run.log_metrics({f"check.{index}.left": check.left, f"check.{index}.right": check.right})
    run.set_tags(
        {OUTCOME_TAG: "passed" if outcome.passed else "failed", OUTCOME_MESSAGE_TAG: outcome.message}
    )
    rows = "\n".join(
        f"| {c.left_name} | {c.left:.4f} | `{c.op}` | {c.right_name} | {c.right:.4f} | "
        f"{'passed' if c.passed else '**missed**'} |"
        for c in checks
    )
    table = "| value | observed | op | threshold | required | result |\n|---|---|---|---|---|---|\n" + rows
    run.log_text(f"# {outcome.message}\n\n{table}\n", "condition.md")
    create_markdown_artifact(
        key=_artifact_key(run.step),
        markdown=f"### ConditionStep `{run.step}`: {'passed' if outcome.passed else 'failed'}\n\n{table}\n",
        description=outcome.message,
    )
    return outcome


def condition(name: str, checks: list[Check]) -> ConditionOutcome:
    """Run a ConditionStep named `name` that passes when every check passes."""
    return Step(_evaluate, StepKind.CONDITION, name)(checks)
