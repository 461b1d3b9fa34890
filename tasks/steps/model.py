"""ModelStep: registers a model version in the MLflow registry with its approval status."""

from typing import Literal

from tasks.steps.base import step_kind
from tasks.steps.kinds import StepKind

ApprovalStatus = Literal["Approved", "PendingManualApproval", "Rejected"]
APPROVAL_TAG = "approval_status"
CHAMPION_ALIAS = "champion"

model_step = step_kind(StepKind.MODEL)
