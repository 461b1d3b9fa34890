"""TrainingStep: fits a model on a Dask worker and logs it to the step's MLflow run."""

from tasks.steps.base import step_kind

training_step = step_kind("TrainingStep")
