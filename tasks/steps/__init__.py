"""The SageMaker step kinds: Processing, Training, Tuning, Condition, Model and Fail steps."""

from tasks.steps.base import Step, StepRun, current_step, results, step_kind
from tasks.steps.cache import NO_CACHE, CacheConfig
from tasks.steps.condition import Check, ConditionOutcome, condition
from tasks.steps.fail import fail
from tasks.steps.kinds import StepKind
from tasks.steps.model import model_step
from tasks.steps.processing import processing_step
from tasks.steps.retry import NO_RETRY, RetryPolicy
from tasks.steps.training import training_step
from tasks.steps.tuning import ParamRange, TuningResult, TuningSpec, run_trials, tuning_step

__all__ = [
    "NO_CACHE",
    "NO_RETRY",
    "CacheConfig",
    "Check",
    "ConditionOutcome",
    "ParamRange",
    "RetryPolicy",
    "Step",
    "StepKind",
    "StepRun",
    "TuningResult",
    "TuningSpec",
    "condition",
    "current_step",
    "fail",
    "model_step",
    "processing_step",
    "results",
    "run_trials",
    "step_kind",
    "training_step",
    "tuning_step",
]
