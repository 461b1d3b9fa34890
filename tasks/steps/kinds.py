"""The step kinds, named once: SageMaker's names, also the Prefect task-run tags and MLflow tags."""

from __future__ import annotations

from enum import StrEnum


class StepKind(StrEnum):
    PROCESSING = "ProcessingStep"
    TRAINING = "TrainingStep"
    TUNING = "TuningStep"
    CONDITION = "ConditionStep"
    MODEL = "ModelStep"
    FAIL = "FailStep"
    TRANSFORM = "TransformStep"
    TUNING_TRIAL = "TuningTrial"  # a trial's MLflow run under its TuningStep (not a Prefect task)

    @property
    def label(self) -> str:
        """The short name shown next to a step in Prefect's graph: Processing, Training, ..."""
        return self.value.removesuffix("Step")


def task_run_name(step: str, kind: StepKind) -> str:
    """What Prefect's graph draws for a step: its name and its kind."""
    return f"{step} ({kind.label})"  # canvas fonts lack some glyphs: plain ASCII
