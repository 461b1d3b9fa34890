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

if __name__ == "__main__":  # before the imports: the collector paused, the warm pool or the Prefect server
    from infra.command import begin_command

    begin_command(__spec__)

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from tasks.monitoring.baseline import baseline
from tasks.monitoring.calibration import DEFAULT_CHUNK, parse_chunk
from tasks.steps import (
    Check,
    ConditionOutcome,
    DatasetRef,
    ExecutionOptions,
    ParamGroup,
    ParamRange,
    TuningSpec,
    condition,
    current_pipeline,
    fail,
    lineage,
    pipeline,
    results,
)
from tasks.steps.cli import exit_process
from tasks.steps.compute import steps_side_by_side
from tasks.steps.errors import DataValidationError
from tasks.steps.model import MODEL_NAME_HELP, ApprovalStatus, ModelName, RegisteredVersion
from tasks.steps.settings import get_settings
from tasks.steps.tags import (
    EXECUTION_REASON_TAG,
    FLOW_RUN_ID_TAG,
    FLOW_RUN_NAME_TAG,
    FLOW_RUN_URL_TAG,
    REJECTED_COLUMN_TAG,
    REJECTED_FILE_TAG,
    REJECTED_RECORD_TAG,
    REJECTED_RULE_TAG,
    TRIGGER_TAG_PREFIX,
)
from tasks.tabular.data import TableSpec
from tasks.tabular.evaluate import Evaluation, evaluate
from tasks.tabular.modeling import DEFAULT_OBJECTIVE, MAXIMIZE
from tasks.tabular.prepare import SplitSpec, prepare, validate_input
from tasks.tabular.project import require_model_name, table_defaults
from tasks.tabular.quality import QualityRules, check_quality, record_rejection, version_constraints
from tasks.tabular.registry import comparable_champion, register
from tasks.tabular.snapshot import reported_as
from tasks.tabular.train import TrainingSpec, default_search_space, train, tune


class TableParams(BaseModel):
    """The user's table: where it is and which columns matter (the pipeline's and the backtest's).
    What is not given comes from the project's `keel.toml` (`tasks.tabular.project`); the bike demo's columns
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
        """Whether columns not given nor in keel.toml are filled in here (`tasks.tabular.project.table_defaults`)."""
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


class TuningParams(ParamGroup):
    """The hyperparameter search (SageMaker's HyperparameterTuner)."""

    n_trials: int = Field(default=16, ge=1, le=10_000, description="Tuning trials in all.")
    parallel_trials: int = Field(default=2, ge=1, le=256, description="Tuning trials at once on the workers.")
    objective: str | None = Field(
        default=None, description="Metric the tuner minimises on validation; default rmse / log loss."
    )
    space: dict[str, ParamRange] = Field(
        default_factory=default_search_space, description="LightGBM search space, as JSON."
    )

    def spec(self, task: str, seed: int) -> TuningSpec:
        objective = self.objective or DEFAULT_OBJECTIVE[task]
        return TuningSpec(
            space=self.space,
            n_trials=self.n_trials,
            parallel=self.parallel_trials,
            objective=objective,
            direction="maximize" if objective in MAXIMIZE else "minimize",
            seed=seed,
        )


class TrainingParams(ParamGroup):
    """How each model is fit (SageMaker's Estimator settings)."""

    num_boost_round: int = Field(default=400, ge=1, le=100_000, description="Most trees a trial may grow.")
    early_stopping_rounds: int = Field(
        default=30, ge=1, description="Rounds without gain before a trial stops."
    )
    training_mode: Literal["auto", "single", "distributed"] = Field(
        default="auto", description="single worker, lightgbm.dask, or chosen by data size."
    )
    seed: int = Field(default=42, description="Seed of the tuner and of LightGBM.")

    def spec(self) -> TrainingSpec:
        return TrainingSpec(
            num_boost_round=self.num_boost_round,
            early_stopping_rounds=self.early_stopping_rounds,
            seed=self.seed,
            mode=self.training_mode,
        )


class RegistryParams(ParamGroup):
    """What may be registered (the quality gate), and with which approval status."""

    min_r2: float = Field(
        default=0.6, ge=-1e9, le=1, description="Quality gate for regression: test R² at least."
    )
    min_auc: float = Field(
        default=0.7, ge=0, le=1, description="Quality gate for classification: test AUC at least."
    )
    champion_margin: float = Field(
        default=0.001, ge=0, description="A challenger must beat the champion's gate metric by at least this."
    )
    on_gate_failure: Literal["fail", "reject"] = Field(
        default="fail", description="fail: FailStep, nothing registered; reject: register as Rejected."
    )
    approval: Literal["auto", "manual"] = Field(
        default="auto",
        description="auto: a passing model is Approved and becomes champion; "
        "manual: it waits as PendingManualApproval.",
    )


class PipelineParams(TableParams, ExecutionOptions):
    """Every knob of one execution, in groups; shown and editable in the Prefect UI (a section per
    group), and as flat `--flags` here (`--n-trials`, as `PipelineParams(n_trials=...)` also takes)."""

    key_columns: list[str] | None = Field(
        default=None,
        description="Columns that identify a row; duplicated keys are bad input (default: the time column; "
        "the demo's: dteday hr). Empty: no key.",
    )
    model_name: ModelName | None = Field(
        default=None,
        description=f"Registered model name in MLflow (default: keel.toml's, else the data's file name; the "
        f"demo's: bike-demand): {MODEL_NAME_HELP}.",
    )
    quality: QualityRules = Field(default_factory=QualityRules)
    split: SplitSpec = Field(default_factory=SplitSpec)
    tuning: TuningParams = Field(default_factory=TuningParams)
    training: TrainingParams = Field(default_factory=TrainingParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    monitoring_chunk: str = Field(
        default=DEFAULT_CHUNK,
        description="The size of the batches the model will be monitored on (a period such as 7D or 1D, or a "
        "number of rows): its drift and performance thresholds are calibrated on chunks of this size.",
    )
    reason: str = Field(
        default="manual",
        max_length=500,
        description="Why this execution runs; recorded on the MLflow run and the model version.",
    )
    trigger: dict[str, str] = Field(
        default_factory=dict,
        description="What started this execution (e.g. event id, drift report URI); recorded on the run and version.",
    )

    @field_validator("monitoring_chunk")
    @classmethod
    def _chunk(cls, value: str) -> str:
        return parse_chunk(value).text

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
    gate = params.registry
    threshold_name, threshold = ("min_r2", gate.min_r2) if metric == "r2" else ("min_auc", gate.min_auc)
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
                right_name=f"champion v{evaluation.champion_version} {metric} + margin {gate.champion_margin:g}",
                right=evaluation.champion_metrics[metric] + gate.champion_margin,
            )
        )
    return checks


def where_to_look(result: PipelineResult) -> str:
    settings = get_settings()
    flow_run = result.prefect_flow_run
    lines = [
        f"Prefect run:     {flow_run.get(FLOW_RUN_NAME_TAG)} ({flow_run.get(FLOW_RUN_ID_TAG)})",
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
        lines.append(f"Prefect UI:      {flow_run.get(FLOW_RUN_URL_TAG) or settings.prefect_api_url}")
    else:
        lines.append(
            "Prefect UI:      .venv/bin/prefect server start  (the flow run is in Prefect's local database)"
        )
    return "\n".join(lines)


def execution_tags(params: PipelineParams) -> dict[str, str]:
    """Why the execution runs and what started it, on its MLflow run."""
    return {
        EXECUTION_REASON_TAG: params.reason,
        **{f"{TRIGGER_TAG_PREFIX}{k}": v for k, v in params.trigger.items()},
    }


@pipeline(
    name="training-pipeline",
    params=PipelineParams,
    run_tags=execution_tags,
    summary=where_to_look,
    after_bad_input="nothing trained or registered",
    reads=lambda params: [params.data],
)
def training_pipeline(params: PipelineParams) -> PipelineResult:
    """Check, process, tune, train, evaluate, gate and register one model version."""
    model_name = require_model_name(params.model_name, "register")
    settings = get_settings()
    run = current_pipeline()
    client = run.client()
    table = params.table()
    training = params.training.spec()
    raw = None
    try:
        raw = validate_input(table, settings.data_access, settings.datasets_root)
        lineage.note("Input", f"{raw.location} (sha256 {raw.digest[:12]})")
        with reported_as(raw):  # errors about the pinned copy name the user's file
            quality = check_quality(
                raw,
                table.time_column,
                table.key_columns,
                version_constraints(client, model_name, unless_made_from=raw.digest),
                params.quality,
                table.drop_columns,
                not_features=table.drop_columns,
                target=table.target,
            )
            splits = prepare(raw, table, params.split)
        lineage.note(
            "Data",
            f"{quality.rows:,} rows checked; train {splits.train.rows or 0:,}, valid {splits.valid.rows or 0:,}, "
            f"test {splits.test.rows or 0:,} rows ({splits.boundaries['start'][:10]} .. {splits.boundaries['end'][:10]})",
        )
    except DataValidationError as exc:
        _keep_rejection(exc, table.path, raw)
        raise
    tuning = params.tuning.spec(splits.features.task, training.seed)
    best = tune(splits.train, splits.valid, splits.features, tuning, training)
    model = train(raw, splits.train, splits.valid, splits.features, best, training)
    champion = comparable_champion(client, model_name, model)
    with steps_side_by_side(2):  # both need only the model and the splits
        reference, evaluation = results(
            baseline.submit(model, splits, params.monitoring_chunk, training.seed),
            evaluate.submit(model, splits, model_name, champion),
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
    if gate.passed or params.registry.on_gate_failure == "reject":
        registered = register(
            model,
            model_name,
            version_status(gate.passed, params.registry.approval),
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


def version_status(passed: bool, approval: Literal["auto", "manual"]) -> ApprovalStatus:
    """A passing model is Approved (or waits for a person, with manual approval); a failing one,
    registered anyway, is Rejected."""
    if not passed:
        return "Rejected"
    return "Approved" if approval == "auto" else "PendingManualApproval"


def _keep_rejection(exc: DataValidationError, path: str, raw: DatasetRef | None) -> None:
    """Refused input: the reason kept in the rejected folder and on the execution's run."""
    settings = get_settings()
    run = current_pipeline()
    record = record_rejection(settings.rejected_dir, run.run_id, path, raw.digest if raw else None, exc)
    lineage.set_tags(
        run.client(),
        run.run_id,
        {
            REJECTED_FILE_TAG: exc.file,
            REJECTED_COLUMN_TAG: exc.column or "",
            REJECTED_RULE_TAG: exc.rule[:5000],
            REJECTED_RECORD_TAG: str(record),
        },
    )
    print(f"input refused, the reason is kept in {record}")


def main(argv: Sequence[str] | None = None) -> int:
    return training_pipeline.main(argv)


if __name__ == "__main__":
    exit_process(main())
