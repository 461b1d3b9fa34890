"""Batch scoring with capture (SageMaker's batch transform): a registered model version applied to a
file or folder, on the Dask workers, written as partitioned Parquet.

    python -m flows.transform --model-name bike-demand --data landing/week.csv --output scored/week
    python -m flows.transform --model-name churn --version 3 --data customers/ --output scored/customers \\
        --id-columns customer_id --keep-columns customer_id region

Every row of the output holds the columns kept (`--keep-columns`; default: the key columns the
version was trained with), the model's output (`prediction`, and `probability_<class>` for a
classifier), an `inference_id` (the `--id-columns` value; else a hash of the row, the same for the
same row in every run), the model's name and version and the scoring time. The version is fixed at
the start (`--alias` is resolved once), so every partition is scored by the same one. The output
appears whole or not at all; an existing one is replaced only with `--overwrite`. One MLflow run
records the input and output datasets (digests) and the logged model it used, and is tagged with
the version: the version's scoring runs are found by those tags (`python -m flows.lineage`).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports: the collector paused, the warm pool or the Prefect server
    from infra.command import begin_command

    begin_command(__spec__)

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, model_validator

from tasks.monitoring.drift import batch_files
from tasks.steps import DatasetRef, Params, current_pipeline, current_step, dask_client, lineage, pipeline
from tasks.steps.access import checked_local_path
from tasks.steps.cli import exit_process
from tasks.steps.errors import DataValidationError
from tasks.steps.integrity import ModelLocation, logged_model_id
from tasks.steps.model import MODEL_NAME_HELP, ModelName, checked_model_name
from tasks.steps.refs import content_digest
from tasks.steps.settings import get_settings
from tasks.steps.tags import MODEL_NAME_TAG, MODEL_VERSION_TAG, SCORED_ROWS_TAG, SCORING_PIPELINE
from tasks.steps.transform import (
    ADDED_COLUMNS,
    PREDICTION_COLUMN,
    RECORD_FILE,
    ScoringRecord,
    ScoringSpec,
    score_table,
    source_fingerprint,
    transform_step,
    written_whole,
)
from tasks.tabular.data import pinned_table, read_table
from tasks.tabular.project import configured_model_name, require_model_name

ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,62}$"


class TransformParams(Params):
    """Which model version scores which data, and where the output goes."""

    model_name: ModelName | None = Field(
        default=None, description=f"Registered model (default: keel.toml's): {MODEL_NAME_HELP}."
    )
    version: str | None = Field(
        default=None, pattern=r"^[1-9][0-9]{0,9}$", description="Version to score with (not with --alias)."
    )
    alias: str | None = Field(
        default=None, pattern=ALIAS_PATTERN, description="Alias to score with (default: champion)."
    )
    data: str = Field(min_length=1, description="CSV or Parquet file, or a folder of them, to score.")
    output: str = Field(min_length=1, description="Folder to write the scored Parquet parts to (local).")
    keep_columns: list[str] | None = Field(
        default=None, description="Input columns to copy to the output (default: the version's key columns)."
    )
    keep_inputs: bool = Field(
        default=False,
        description="Keep every input column too: the capture the monitor checks (flows.monitor --batch OUT).",
    )
    id_columns: list[str] = Field(
        default_factory=list,
        description="Columns that identify a row: its inference_id (default: a hash of every input column).",
    )
    overwrite: bool = Field(default=False, description="Replace an existing output.")

    @model_validator(mode="before")
    @classmethod
    def _project_model(cls, values: Any) -> Any:
        return configured_model_name(values)

    @model_validator(mode="after")
    def _one_version(self) -> TransformParams:
        require_model_name(self.model_name, "score with")
        if self.version and self.alias:
            raise ValueError("give --version or --alias, not both")
        return self


class TransformResult(BaseModel):
    model_name: str
    version: str
    input: DatasetRef
    output: DatasetRef
    parts: int
    prediction_columns: list[str]
    mlflow_run_id: str
    prefect_flow_run: dict[str, str]


def summarise(result: TransformResult) -> str:
    return "\n".join(
        [
            f"Scored:       {result.input.rows or 0:,} rows of {result.input.location} "
            f"with {result.model_name} v{result.version}",
            f"Output:       {result.output.uri} ({result.parts} Parquet file{'s' if result.parts != 1 else ''}, sha256 {result.output.digest[:12]})",
            f"Columns:      {', '.join(result.output.columns)}",
            f"MLflow run:   {result.mlflow_run_id}",
        ]
    )


def resolve_version(client, name: str, version: str | None, alias: str | None):
    """The model version to score with, fixed once; bad names refused as bad input."""
    from mlflow.exceptions import MlflowException

    checked_model_name(name)
    try:
        if version:
            return client.get_model_version(name, version)
        return client.get_model_version_by_alias(name, alias or "champion")
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise
        which = f"version {version}" if version else f"alias @{alias or 'champion'}"
        raise DataValidationError(
            f"--model-name {name}", f"the registry has no {which} of this model"
        ) from exc


def model_inputs(model_uri: str) -> list[str]:
    """The columns the model's signature asks for (none when it has no signature)."""
    import mlflow

    signature = mlflow.models.get_model_info(model_uri).signature
    return list(signature.inputs.input_names()) if signature is not None and signature.inputs else []


def default_keep_columns(client, run_id: str | None) -> list[str]:
    """The key columns the version's training execution used, or none if it recorded none."""
    if not run_id:
        return []
    try:
        params = lineage.execution_params(client, run_id)
    except LookupError:
        return []
    return [str(c) for c in params.get("key_columns") or []]


def check_columns(batch: DatasetRef, keep: list[str], ids: list[str], inputs: list[str]) -> None:
    """Every column named exists in the data, and none kept has a name the scoring adds (bad input
    otherwise, naming the flag and the column)."""
    taken = [c for c in keep if c in (*ADDED_COLUMNS, PREDICTION_COLUMN)]
    if taken:
        raise DataValidationError(
            batch.location,
            "a kept column has the name of a column the scoring adds: rename it first",
            taken[0],
        )
    for what, columns in (
        ("--keep-columns names", keep),
        ("--id-columns names", ids),
        ("the model needs", inputs),
    ):
        missing = [c for c in columns if c not in batch.columns]
        if missing:
            raise DataValidationError(
                batch.location,
                f"{what} a column the data does not have (it has {list(batch.columns)})",
                missing[0],
            )


@transform_step(name="score")
def score(batch: DatasetRef, spec: ScoringSpec, output: str, overwrite: bool, fingerprint: str) -> DatasetRef:
    """Score the batch on the workers into `output`, whole or not at all, with its record
    (`_scoring.json`: the version, and the input's fingerprint as it was)."""
    from prefect import get_run_logger

    logger = get_run_logger()
    step = current_step()
    step.set_tags({MODEL_NAME_TAG: spec.model_name, MODEL_VERSION_TAG: spec.model_version})
    frame = read_table(batch)

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            logger.info("scored partition %d of %d", done, total)

    target = Path(output)
    with written_whole(target, overwrite) as staging:
        parts = score_table(dask_client(), frame, spec, staging, batch.location, progress)
        if not any(p.file for p in parts):
            raise DataValidationError(batch.location, "the data has no rows to score")
        record = ScoringRecord(
            model_name=spec.model_name,
            model_version=spec.model_version,
            source=batch.location,
            source_fingerprint=fingerprint,
            input_digest=batch.digest,
            rows=sum(p.rows for p in parts),
            mlflow_run_id=current_pipeline().run_id,
            scored_at=spec.scored_at.isoformat(),
        )
        (staging / RECORD_FILE).write_text(record.model_dump_json(indent=1))
    rows = record.rows
    columns = pq.read_schema(next(target.glob("part-*.parquet"))).names
    scored = DatasetRef(
        name="scored",
        uri=str(target),
        digest=content_digest(str(target)),
        format="parquet",
        rows=rows,
        columns=tuple(columns),
    )
    step.set_tags({SCORED_ROWS_TAG: str(rows)})
    step.log_metrics({"rows": rows, "parts": sum(1 for p in parts if p.file)})
    return scored


@pipeline(
    name=SCORING_PIPELINE,
    params=TransformParams,
    run_tags=lambda params: {MODEL_NAME_TAG: params.model_name or ""},
    summary=summarise,
    after_bad_input="nothing written",
    reads=lambda params: [params.data],
)
def transform(params: TransformParams) -> TransformResult:
    """Score a file or folder with a registered model version, capturing every prediction."""
    from mlflow.entities import LoggedModelInput

    settings = get_settings()
    name = require_model_name(params.model_name, "score with")
    run = current_pipeline()
    client = run.client()
    version = resolve_version(client, name, params.version, params.alias)
    number = str(version.version)
    output = str(
        checked_local_path(
            params.output,
            settings.data_access,
            "the output must be a local folder (an object store has no atomic rename)",
        )
    )
    location, files = batch_files(params.data, False, settings.data_access)
    target, source = Path(output).resolve(), Path(location.removeprefix("file://")).resolve()
    if target.is_relative_to(source) or any(
        Path(f.removeprefix("file://")).resolve().is_relative_to(target) for f in files
    ):
        raise DataValidationError(
            params.output, "the output must not be the data, lie inside it or hold any of its files"
        )
    if Path(output).exists() and not params.overwrite:
        raise DataValidationError(params.output, "the output exists already (--overwrite replaces it)")
    batch = pinned_table("data", location, files, settings.datasets_root)
    model_uri = f"models:/{name}/{number}"
    keep = (
        params.keep_columns
        if params.keep_columns is not None
        else default_keep_columns(client, version.run_id)
    )
    if params.keep_inputs:  # the kept columns first, then the rest in the data's order
        keep = [*keep, *(c for c in batch.columns if c not in keep)]
    inputs = model_inputs(model_uri)
    check_columns(batch, keep, params.id_columns, inputs)
    spec = ScoringSpec(
        model=ModelLocation(uri=model_uri, tracking_uri=run.tracking_uri, registry_uri=run.registry_uri),
        model_name=name,
        model_version=number,
        input_columns=tuple(inputs),
        keep_columns=tuple(keep),
        id_columns=tuple(params.id_columns),
        scored_at=pd.Timestamp(datetime.now(UTC)),
    )
    scored = score(batch, spec, output, params.overwrite, source_fingerprint(files))
    lineage.set_tags(
        client,
        run.run_id,
        {
            MODEL_VERSION_TAG: number,
            SCORED_ROWS_TAG: str(scored.rows),
            **batch.lineage_tags("data", "input"),
            **scored.lineage_tags("scored", "output"),
        },
    )
    lineage.log_dataset_inputs(client, run.run_id, {"data": batch, "scored": scored})
    client.log_inputs(run.run_id, models=[LoggedModelInput(logged_model_id(model_uri))])
    lineage.note("Model version", f"{name} v{number}", lineage.version_link(run.tracking_uri, name, number))
    lineage.note("Input", f"{batch.location} ({scored.rows:,} rows, sha256 {batch.digest[:12]})")
    lineage.note("Output", f"{scored.uri} (sha256 {scored.digest[:12]})")
    prediction_columns = [c for c in scored.columns if c not in (*keep, *ADDED_COLUMNS)]
    return TransformResult(
        model_name=name,
        version=number,
        input=batch.model_copy(update={"rows": scored.rows}),
        output=scored,
        parts=len(list(Path(scored.uri).glob("part-*.parquet"))),
        prediction_columns=prediction_columns,
        mlflow_run_id=run.run_id,
        prefect_flow_run=lineage.prefect_flow_run_tags(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    return transform.main(argv)


if __name__ == "__main__":
    exit_process(main())
