"""ProcessingStep: data preparation whose heavy work runs on the Dask cluster."""

from tasks.steps.base import step_kind

processing_step = step_kind("ProcessingStep")
