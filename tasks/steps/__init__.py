"""The pipeline framework: what a pipeline author imports.

    from tasks.steps import pipeline, processing_step, training_step, condition, Check, ...

Step kinds (SageMaker's): Processing, Training, Tuning, Transform, Condition, Model and Fail steps; `@pipeline`
makes a function of steps a Prefect flow with MLflow lineage, a Dask cluster, resume and a command
line. Steps pass references (`DatasetRef`, `ModelRef`, ...), not data: a DataFrame a step returns is
stored for it, `log_model` logs a model and returns its reference, and `load_model` gives it back.
"""

from tasks.steps.base import Step, StepRun, current_step, results, step_kind
from tasks.steps.cache import NO_CACHE, CacheConfig
from tasks.steps.compute import dask_client
from tasks.steps.condition import Check, ConditionOutcome, condition
from tasks.steps.fail import fail
from tasks.steps.kinds import StepKind
from tasks.steps.lineage import current_pipeline
from tasks.steps.model import ApprovalStatus, ModelName, RegisteredVersion, model_step, register_model
from tasks.steps.models import load_model, log_model
from tasks.steps.params import ParamGroup, Params
from tasks.steps.pipeline import ExecutionOptions, Pipeline, pipeline
from tasks.steps.processing import processing_step
from tasks.steps.refs import DatasetRef, FileRef, ModelRef, Ref
from tasks.steps.retry import NO_RETRY, RetryPolicy
from tasks.steps.training import training_step
from tasks.steps.transform import transform_step
from tasks.steps.tuning import ParamRange, TuningResult, TuningSpec, run_trials, tuning_step

__all__ = [
    "NO_CACHE",
    "NO_RETRY",
    "ApprovalStatus",
    "CacheConfig",
    "Check",
    "ConditionOutcome",
    "DatasetRef",
    "ExecutionOptions",
    "FileRef",
    "ModelName",
    "ModelRef",
    "ParamGroup",
    "ParamRange",
    "Params",
    "Pipeline",
    "Ref",
    "RegisteredVersion",
    "RetryPolicy",
    "Step",
    "StepKind",
    "StepRun",
    "TuningResult",
    "TuningSpec",
    "condition",
    "current_pipeline",
    "current_step",
    "dask_client",
    "fail",
    "load_model",
    "log_model",
    "model_step",
    "pipeline",
    "processing_step",
    "register_model",
    "results",
    "run_trials",
    "step_kind",
    "training_step",
    "transform_step",
    "tuning_step",
]
