"""The training pipeline: check -> process -> tune -> train -> (baseline, evaluate side by side) -> gate -> register or fail.

    python -m flows.pipeline --help
    python -m flows.pipeline --reuse-from RUN_ID                       # resume a failed execution
    python -m flows.pipeline --reuse-from RUN_ID --selected-steps tune train --n-trials 32
    python -m flows.pipeline --force-steps all                         # ignore every cache

SageMaker's Pipeline, as a Prefect flow: each step is a named Prefect task run with its own MLflow
child run under one parent run per execution; heavy work runs on Dask. Point `--data`, `--target`
and `--time-column` at any CSV or Parquet table: numeric targets are regressed (RMSE, MAE, R²),
text, boolean or two-valued targets are classified (AUC, log loss, accuracy).

The input is checked against the champion's data-quality constraints before any processing. The
processing, tuning, training, baseline and evaluation steps are cached by content: a re-run with
nothing changed reuses their outputs (and says so), and registers nothing new.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from tasks import lineage
from tasks.baseline import baseline
from tasks.calibration import DEFAULT_CHUNK, parse_chunk
from tasks.compute import steps_side_by_side
from tasks.data import TableSpec
from tasks.errors import DataValidationError
from tasks.evaluate import Evaluation, evaluate
from tasks.modeling import DEFAULT_OBJECTIVE, MAXIMIZE
from tasks.prepare import SplitSpec, prepare, validate_input
from tasks.project import table_defaults
from tasks.quality import QualityRules, check_quality, record_rejection, rules_of, version_constraints
from tasks.registry import comparable_champion, register
from tasks.settings import get_settings
from tasks.snapshot import reported_as
from tasks.steps import (
    Check,
    ConditionOutcome,
    ExecutionOptions,
    ParamRange,
    TuningSpec,
    condition,
    current_pipeline,
    fail,
    pipeline,
    results,
)
from tasks.steps.model import MODEL_NAME_HELP, ModelName, RegisteredVersion
from tasks.train import TrainingSpec, default_search_space, train, tune


class TableParams(BaseModel):
    """The user's table: where it is and which columns matter (the pipeline's and the backtest's).
    What is not given comes from the project's `keel.toml` (`tasks.project`); the bike demo's columns
    are assumed only for the demo data itself."""

    data: str | None = Field(
        default=None,
        description="CSV or Parquet file, or a folder of Parquet files (default: keel.toml's data, else the "
        "bike-sharing demo).",
    )
    target: str | None = Field(default=None, description="Column to predict (the demo's: cnt).")
    time_column: str | None = Field(
        default=None, description="Column that orders rows in time (the demo's: dteday)."
    )
    drop_columns: list[str] | None = Field(
        default=None,
        description="Columns never used as features, such as ids (default: none; the demo's: instant, casual, "
        "registered).",
    )
    task: Literal["auto", "regression", "classification"] = Field(
        default="auto", description="What to learn."
    )

    @model_validator(mode="before")
    @classmethod
    def _project_defaults(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        return table_defaults(values, cls.model_fields, complete=cls.completes_table())

    @classmethod
    def completes_table(cls) -> bool:
        """Whether columns not given nor in keel.toml are filled in here (`tasks.project.table_defaults`)."""
        return True

    def table(self) -> TableSpec:
        """The table as the steps read it (its columns are known once the parameters are made)."""
        if self.data is None or self.target is None or self.time_column is None:
            raise ValueError("the table's data, target and time column are not known")
        path = self.data if "://" in self.data else str(Path(self.data).expanduser().resolve())
        return TableSpec(
            path=path,
            target=self.target,
            time_column=self.time_column,
            drop_columns=self.drop_columns or [],
            task=self.task,
        )


class PipelineParams(TableParams, QualityRules, ExecutionOptions):
    """Every knob of one execution; shown and editable in the Prefect UI, and as `--flags` here."""

    key_columns: list[str] | None = Field(
        default=None,
        description="Columns that identify a row; duplicated keys are bad input (default: the time column; "
        "the demo's: dteday hr). Empty: no key.",
    )
    start: date | None = Field(default=None, description="First day of the data window.")
    end: date | None = Field(default=None, description="Last day of the data window.")
    window_days: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Train on the last N days only (ending at --end or the newest row).",
    )
    valid_fraction: float = Field(default=0.15, gt=0, lt=0.5, description="Time share for validation.")
    test_fraction: float = Field(default=0.15, gt=0, lt=0.5, description="Time share held out for test.")
    n_trials: int = Field(default=16, ge=1, le=10_000, description="Tuning trials in all.")
    parallel_trials: int = Field(default=2, ge=1, le=256, description="Tuning trials at once on the workers.")
    objective: str | None = Field(
        default=None, description="Metric the tuner minimises on validation; default rmse / log loss."
    )
    space: dict[str, ParamRange] = Field(
        default_factory=default_search_space, description="LightGBM search space, as JSON."
    )
    num_boost_round: int = Field(default=400, ge=1, le=100_000, description="Most trees a trial may grow.")
    early_stopping_rounds: int = Field(
        default=30, ge=1, description="Rounds without gain before a trial stops."
    )
    training_mode: Literal["auto", "single", "distributed"] = Field(
        default="auto", description="single worker, lightgbm.dask, or chosen by data size."
    )
    seed: int = Field(default=42, description="Seed of the tuner and of LightGBM.")
    monitoring_chunk: str = Field(
        default=DEFAULT_CHUNK,
        description="The size of the batches the model will be monitored on (a period such as 7D or 1D, or a "
        "number of rows): its drift and performance thresholds are calibrated on chunks of this size.",
    )
    min_r2: float = Field(
        default=0.6, ge=-1e9, le=1, description="Quality gate for regression: test R² at least."
    )
    min_auc: float = Field(
        default=0.7, ge=0, le=1, description="Quality gate for classification: test AUC at least."
    )
    champion_margin: float = Field(
        default=0.001, ge=0, description="A challenger must beat the champion's gate metric by at least this."
    )
    model_name: ModelName | None = Field(
        default=None,
        description=f"Registered model name in MLflow (default: keel.toml's, else the data's file name; the "
        f"demo's: bike-demand): {MODEL_NAME_HELP}.",
    )
    approval: Literal["auto", "manual"] = Field(
        default="auto",
        description="auto: a passing model is Approved and becomes champion; "
        "manual: it waits as PendingManualApproval.",
    )
    reason: str = Field(
        default="manual",
        max_length=500,
        description="Why this execution runs; recorded on the MLflow run and the model version.",
    )
    on_gate_failure: Literal["fail", "reject"] = Field(
        default="fail", description="fail: FailStep, nothing registered; reject: register as Rejected."
    )
    trigger: dict[str, str] = Field(
        default_factory=dict,
        description="What started this execution (e.g. event id, drift report URI); recorded on the run and version.",
    )

    @field_validator("monitoring_chunk")
    @classmethod
    def _chunk(cls, value: str) -> str:
        return parse_chunk(value).text

    @model_validator(mode="after")
    def _window(self) -> PipelineParams:
        if self.start and self.end and self.start > self.end:
            raise ValueError(
                f"--start {self.start} is after --end {self.end}: the data window would be empty"
            )
        return self

    def table(self) -> TableSpec:
        return super().table().model_copy(update={"key_columns": self.key_columns or []})


class PipelineResult(BaseModel):
    mlflow_run_id: str
    tracking_uri: str
    mlflow_run_link: str | None = None  # the execution's page in MLflow's UI, with a tracking server
    prefect_flow_run: dict[str, str]
    gate: ConditionOutcome
    evaluation: Evaluation
    registered: RegisteredVersion | None = None


def quality_checks(evaluation: Evaluation, params: PipelineParams) -> list[Check]:
    metric = evaluation.gate_metric
    threshold_name, threshold = ("min_r2", params.min_r2) if metric == "r2" else ("min_auc", params.min_auc)
    checks = [
        Check(
            left_name=f"test_{metric}",
            left=evaluation.metrics[metric],
            op=">=",
            right_name=threshold_name,
            right=threshold,
        )
    ]
    if evaluation.champion_metrics is not None:
        checks.append(
            Check(
                left_name=f"test_{metric}",
                left=evaluation.metrics[metric],
                op=">=",
                right_name=f"champion v{evaluation.champion_version} {metric} + margin {params.champion_margin:g}",
                right=evaluation.champion_metrics[metric] + params.champion_margin,
            )
        )
    return checks


def where_to_look(result: PipelineResult) -> str:
    settings = get_settings()
    flow_run = result.prefect_flow_run
    lines = [
        f"Prefect run:     {flow_run.get('prefect.flow_run_name')} ({flow_run.get('prefect.flow_run_id')})",
        f"MLflow run:      {result.mlflow_run_id} (tracking URI {result.tracking_uri})",
    ]
    if result.registered:
        r = result.registered
        lines.append(
            f"Model version:   {r.uri} status={r.status}"
            + (" -> alias @champion" if r.champion else "")
            + (" (this model was registered already: nothing new)" if r.existing else "")
        )
        lines.append(
            f"Load it:         mlflow.pyfunc.load_model('models:/{r.name}@champion')"
            if r.champion
            else f"Load it:         mlflow.pyfunc.load_model('{r.uri}')"
        )
    lines.append(f"Quality gate:    {result.gate.message}")
    if settings.embedded_mlflow:
        lines.append(
            f"MLflow UI:       .venv/bin/mlflow ui --backend-store-uri {settings.tracking_uri}  (or: make mlflow-ui)"
        )
    if settings.prefect_api_url:
        lines.append(f"Prefect UI:      {flow_run.get('prefect.flow_run_url') or settings.prefect_api_url}")
    else:
        lines.append(
            "Prefect UI:      .venv/bin/prefect server start  (the flow run is in Prefect's local database)"
        )
    return "\n".join(lines)


def execution_tags(params: PipelineParams) -> dict[str, str]:
    """Why the execution runs and what started it, on its MLflow run."""
    return {"keel.reason": params.reason, **{f"keel.trigger.{k}": v for k, v in params.trigger.items()}}


@pipeline(
    name="training-pipeline",
    params=PipelineParams,
    run_tags=execution_tags,
    summary=where_to_look,
    after_bad_input="nothing trained or registered",
)
def training_pipeline(params: PipelineParams) -> PipelineResult:
    """Check, process, tune, train, evaluate, gate and register one model version."""
    settings = get_settings()
    run = current_pipeline()
    client = run.client()
    table = params.table()
    split = SplitSpec(
        start=params.start,
        end=params.end,
        window_days=params.window_days,
        valid_fraction=params.valid_fraction,
        test_fraction=params.test_fraction,
    )
    training = TrainingSpec(
        num_boost_round=params.num_boost_round,
        early_stopping_rounds=params.early_stopping_rounds,
        seed=params.seed,
        mode=params.training_mode,
    )
    raw = None
    try:
        raw = validate_input(table, settings.data_access, settings.datasets_root)
        lineage.note("Input", f"{raw.location} (sha256 {raw.digest[:12]})")
        with reported_as(raw):  # errors about the pinned copy name the user's file
            quality = check_quality(
                raw,
                table.time_column,
                table.key_columns,
                version_constraints(client, params.model_name, unless_made_from=raw.digest),
                rules_of(params),
                table.drop_columns,
                not_features=table.drop_columns,
                target=table.target,
            )
            splits = prepare(raw, table, split)
        lineage.note(
            "Data",
            f"{quality.rows:,} rows checked; train {splits.train.rows or 0:,}, valid {splits.valid.rows or 0:,}, "
            f"test {splits.test.rows or 0:,} rows ({splits.boundaries['start'][:10]} .. {splits.boundaries['end'][:10]})",
        )
    except DataValidationError as exc:
        record = record_rejection(
            settings.rejected_dir, run.run_id, table.path, raw.digest if raw else None, exc
        )
        lineage.set_tags(
            client,
            run.run_id,
            {
                "keel.rejected.file": exc.file,
                "keel.rejected.column": exc.column or "",
                "keel.rejected.rule": exc.rule[:5000],
                "keel.rejected.record": str(record),
            },
        )
        print(f"input refused, the reason is kept in {record}")
        raise
    objective = params.objective or DEFAULT_OBJECTIVE[splits.features.task]
    tuning = TuningSpec(
        space=params.space,
        n_trials=params.n_trials,
        parallel=params.parallel_trials,
        objective=objective,
        direction="maximize" if objective in MAXIMIZE else "minimize",
        seed=params.seed,
    )
    best = tune(splits.train, splits.valid, splits.features, tuning, training)
    model = train(raw, splits.train, splits.valid, splits.features, best, training)
    champion = comparable_champion(client, params.model_name, model)
    with steps_side_by_side(2):  # both need only the model and the splits
        reference, evaluation = results(
            baseline.submit(model, splits, params.monitoring_chunk, params.seed),
            evaluate.submit(model, splits, params.model_name, champion),
        )
    lineage.note(
        "Tuning",
        f"best of {len(best.trials)} trials: trial {best.best_trial}, {best.objective} {best.best_value:.5g}",
    )
    gate = condition("quality-gate", quality_checks(evaluation, params))
    lineage.note("Quality gate", gate.message)
    datasets = {"raw": raw, "train": splits.train, "valid": splits.valid, "test": splits.test}
    compared = (
        (evaluation.champion_version, evaluation.champion_metrics)
        if evaluation.champion_version and evaluation.champion_metrics
        else None
    )
    registered = None
    if gate.passed or params.on_gate_failure == "reject":
        if gate.passed:
            status = "Approved" if params.approval == "auto" else "PendingManualApproval"
        else:
            status = "Rejected"
        registered = register(
            model,
            params.model_name,
            status,
            gate.message,
            evaluation.metrics,
            datasets,
            reference,
            compared,
            quality,
            splits.features,
            splits.boundaries,
        )
        lineage.note(
            "Model version",
            f"{registered.name} v{registered.version}: {registered.status}"
            + (", champion" if registered.champion else "")
            + (" (registered already)" if registered.existing else ""),
            registered.link,
        )
    else:
        lineage.note("Model version", "none registered: the quality gate failed")
        fail("quality-gate-failed", gate.message)
    return PipelineResult(
        mlflow_run_id=run.run_id,
        tracking_uri=run.tracking_uri,
        mlflow_run_link=lineage.run_link(run.tracking_uri, run.experiment_id, run.run_id),
        prefect_flow_run=lineage.prefect_flow_run_tags(),
        gate=gate,
        evaluation=evaluation,
        registered=registered,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return training_pipeline.main(argv)


if __name__ == "__main__":
    sys.exit(main())
