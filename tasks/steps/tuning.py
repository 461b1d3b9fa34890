"""TuningStep: hyperparameter trials in parallel on the Dask workers (Optuna ask/tell).

Up to `parallel` trials run at once as Dask tasks. Results are told to Optuna in the order the
trials were asked, and a trial is asked only at a fixed point of that order, so a seeded tuning job
gives the same trials and the same best parameters however the workers interleave:

- the first `STARTUP_TRIALS` are the sampler's random start-up; they depend on no result, so a
  worker that finishes one starts the next at once;
- later trial n is asked right after trial n - `parallel` is told: TPE sees every result but the
  `parallel` - 1 still running. A worker idles only while an earlier trial it must wait for runs.

With `parallel=1` this is plain sequential Optuna. With `strategy="random"` every trial is like a
start-up trial, so the trials are the same at any parallelism. Each trial is an MLflow run nested
under the step's run; progress shows as a Prefect progress artifact and log lines with counts.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast
from uuid import UUID

from pydantic import BaseModel, Field, model_validator

from tasks.steps import lineage
from tasks.steps.base import current_step, step_kind
from tasks.steps.cache import NOT_KEYED
from tasks.steps.compute import dask_client
from tasks.steps.kinds import StepKind
from tasks.steps.tags import BEST_TRIAL_RUN_TAG, ERROR_TAG, STEP_KIND_TAG, STEP_TAG

tuning_step = step_kind(StepKind.TUNING)
STARTUP_TRIALS = 10  # Optuna's TPE default: random trials before it models the results


class ParamRange(BaseModel):
    """A numeric hyperparameter range."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> ParamRange:
        if not self.low <= self.high:
            raise ValueError(f"low {self.low} must not exceed high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class TuningSpec(BaseModel):
    """What to search and how hard (SageMaker's HyperparameterTuner, in short)."""

    space: dict[str, ParamRange]
    n_trials: int = Field(default=16, ge=1, le=10_000, description="Trials in all.")
    parallel: int = Field(default=2, ge=1, le=256, description="Trials running at once on the workers.")
    strategy: Literal["bayesian", "random"] = Field(
        default="bayesian",
        description="bayesian: Optuna's TPE after its random start-up trials; random: every trial random "
        "(the trials then do not depend on each other's results).",
    )
    threads_per_trial: int = Field(
        default=0, ge=0, le=256, description="Threads each trial may use; 0: the workers' threads shared out."
    )
    objective: str = Field(description="Metric the trials report and the tuner optimises, e.g. 'rmse'.")
    direction: Literal["minimize", "maximize"] = "minimize"
    seed: int = 42


class TrialRecord(BaseModel):
    number: int = Field(ge=1, description="1 for the first trial asked, as the log and the table count.")
    params: dict[str, float | int]
    metrics: dict[str, float] = Field(default_factory=dict)
    state: Literal["complete", "failed"]
    run_id: str = Field(json_schema_extra={NOT_KEYED: True}, description="The trial's MLflow run.")
    error: str | None = None


class TuningResult(BaseModel):
    best_params: dict[str, float | int]
    best_value: float
    best_trial: int = Field(ge=1, description="Its number, counted from 1.")
    best_metrics: dict[str, float]
    objective: str
    trials: list[TrialRecord]


def optuna_distributions(space: Mapping[str, ParamRange]) -> dict[str, Any]:
    import optuna

    return {
        name: optuna.distributions.IntDistribution(int(r.low), int(r.high), log=r.log)
        if r.integer
        else optuna.distributions.FloatDistribution(r.low, r.high, log=r.log)
        for name, r in space.items()
    }


def run_trials(
    tuning: TuningSpec, trial_fn: Callable[..., dict[str, Any]], **trial_kwargs: Any
) -> TuningResult:
    """Run `trial_fn(params, **trial_kwargs)` on the workers for each trial; return the best.

    `trial_fn` runs on a Dask worker and returns a dict of metrics that includes `tuning.objective`
    (other str values, such as the worker's address, are recorded as tags of the trial's run).
    """
    from distributed import as_completed
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    step = current_step()
    pipeline = lineage.current_pipeline()
    client = dask_client()
    study = _new_study(tuning)
    startup = STARTUP_TRIALS if tuning.strategy == "bayesian" else tuning.n_trials
    distributions = optuna_distributions(tuning.space)
    progress = create_progress_artifact(progress=0.0, description=f"{step.step}: {tuning.n_trials} trials")
    records: list[TrialRecord] = []
    started = time.perf_counter()
    step.log_params({"n_trials": tuning.n_trials, "parallel": tuning.parallel, "objective": tuning.objective})

    asked: dict[int, tuple[Any, str]] = {}  # trial number -> (Optuna trial, MLflow run id)
    outcomes: dict[int, dict[str, Any] | BaseException] = {}  # finished, not told yet
    running = as_completed()
    numbers: dict[object, int] = {}  # Dask key -> trial number

    def ask_allowed() -> None:
        """Ask and submit every trial the schedule (module docstring) allows now."""
        while len(asked) < tuning.n_trials and running.count() < tuning.parallel:
            number = len(asked)
            if number >= startup and number - len(records) >= tuning.parallel:
                return  # waits for trial number - parallel to be told
            trial = study.ask(distributions)
            future = client.submit(
                trial_fn,
                trial.params,
                **trial_kwargs,
                pure=False,
                key=f"{trial_fn.__name__}-{trial.number}-{uuid.uuid4().hex[:12]}",
            )
            numbers[future.key] = trial.number
            running.add(future)
            asked[trial.number] = (
                trial,
                lineage.create_child_run(
                    step.client,
                    pipeline.experiment_id,
                    step.run_id,
                    f"trial-{trial.number + 1}",
                    {
                        STEP_TAG: f"{step.step}/trial-{trial.number + 1}",
                        STEP_KIND_TAG: StepKind.TUNING_TRIAL,
                    },
                ).info.run_id,
            )

    ask_allowed()
    for future in running:
        try:
            outcomes[numbers[future.key]] = future.result()
        except Exception as exc:  # one bad trial does not end the tuning job
            outcomes[numbers[future.key]] = exc
        ask_allowed()  # a start-up trial can take the free worker at once
        while len(records) in outcomes:  # tell in ask order, asking what each tell allows
            trial, run_id = asked[len(records)]
            record, tags = _tell(study, trial, outcomes.pop(trial.number), run_id, tuning)
            records.append(record)
            ask_allowed()
            _log_trial(step.client, record, tags)  # while the workers compute
            value = record.metrics.get(tuning.objective)
            logger.info(
                "trial %d/%d %s: %s=%s (best so far %s=%.5g)",
                len(records),
                tuning.n_trials,
                record.state,
                tuning.objective,
                f"{value:.5g}" if value is not None else "-",
                tuning.objective,
                _best_value(study),
            )
        update_progress_artifact(cast(UUID, progress), progress=100.0 * len(records) / tuning.n_trials)

    return _result(study, records, tuning, time.perf_counter() - started)


def _new_study(tuning: TuningSpec):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        direction=tuning.direction,
        sampler=optuna.samplers.TPESampler(seed=tuning.seed, n_startup_trials=STARTUP_TRIALS)
        if tuning.strategy == "bayesian"
        else optuna.samplers.RandomSampler(seed=tuning.seed),
    )


def _result(study, records: list[TrialRecord], tuning: TuningSpec, elapsed: float) -> TuningResult:
    """The best trial, recorded on the step's run (metrics, its trial's run, the trials' table) and
    as a Prefect table artifact; every trial failing fails the step."""
    from prefect.artifacts import create_table_artifact

    step = current_step()
    complete = [r for r in records if r.state == "complete"]
    if not complete:
        raise RuntimeError(f"all {len(records)} tuning trials failed; first error: {records[0].error}")
    best = study.best_trial
    best_record = next(r for r in records if r.number == best.number + 1)
    step.log_metrics(
        {
            f"best_{tuning.objective}": _best_value(study),
            "trials_failed": len(records) - len(complete),
            "tuning_seconds": elapsed,
        }
    )
    step.set_tags({BEST_TRIAL_RUN_TAG: best_record.run_id})
    table = trials_table(records, tuning.objective, best_record.number)
    step.client.log_table(step.run_id, data=_frame(table), artifact_file="tuning/trials.json")
    create_table_artifact(
        key=f"{step.step}-trials",
        table=table,
        description=f"{len(complete)}/{len(records)} trials complete in {elapsed:.1f}s; "
        f"best: trial {best_record.number}, {tuning.objective} {best.value:.5g}",
    )
    return TuningResult(
        best_params=dict(best.params),
        best_value=_best_value(study),
        best_trial=best_record.number,
        best_metrics=best_record.metrics,
        objective=tuning.objective,
        trials=records,
    )


def trials_table(records: list[TrialRecord], objective: str, best: int) -> list[dict[str, Any]]:
    """One row a trial, for people: numbered from 1, the best marked, numbers to 5 significant digits."""
    return [
        {
            "trial": r.number,
            "best": "best" if r.number == best else "",
            "state": r.state,
            objective: _short(r.metrics.get(objective)),
            **{name: _short(value) for name, value in r.params.items()},
            "mlflow run": r.run_id,
        }
        for r in sorted(records, key=lambda r: r.number)
    ]


def _short(value: float | int | None) -> float | int | None:
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.5g}")
    return value


def _frame(rows: list[dict[str, Any]]):
    import pandas as pd

    return pd.DataFrame(rows)


def _best_value(study) -> float:
    try:
        return float(study.best_value)
    except ValueError:
        return math.nan


def _tell(study, trial, outcome, run_id: str, spec: TuningSpec) -> tuple[TrialRecord, dict[str, str]]:
    """Tell Optuna how a trial went; no I/O, so the next batch can be asked at once."""
    import optuna

    base = {"number": trial.number + 1, "params": trial.params, "run_id": run_id}
    if isinstance(outcome, BaseException):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return TrialRecord(**base, state="failed", error=f"{type(outcome).__name__}: {outcome}"), {}
    metrics = {
        k: float(v) for k, v in outcome.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    tags = {k: v for k, v in outcome.items() if isinstance(v, str)}
    value = metrics.get(spec.objective)
    if value is None or not math.isfinite(value):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        error = f"objective {spec.objective!r} missing or not finite in {sorted(metrics)}"
        return TrialRecord(**base, metrics=metrics, state="failed", error=error), tags
    study.tell(trial, value)
    return TrialRecord(**base, metrics=metrics, state="complete"), tags


def _log_trial(client, record: TrialRecord, tags: dict[str, str]) -> None:
    """One batch write (params, metrics, tags) and the end state of a trial's MLflow run."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    if record.error:
        tags = {**tags, ERROR_TAG: record.error[:5000]}
    client.log_batch(
        record.run_id,
        metrics=[Metric(k, v, now, 0) for k, v in record.metrics.items()],
        params=[Param(k, str(v)) for k, v in record.params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(record.run_id, "FINISHED" if record.state == "complete" else "FAILED")
