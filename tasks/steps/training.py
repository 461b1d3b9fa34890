"""TrainingStep: fits a model on a Dask worker and logs it to the step's MLflow run."""

from tasks.steps.base import step_kind
from tasks.steps.kinds import StepKind

training_step = step_kind(StepKind.TRAINING)
