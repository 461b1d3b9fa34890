"""ProcessingStep: data preparation whose heavy work runs on the Dask cluster."""

from tasks.steps.base import step_kind
from tasks.steps.kinds import StepKind

processing_step = step_kind(StepKind.PROCESSING)
