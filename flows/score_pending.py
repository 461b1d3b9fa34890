"""Score the batches waiting in an inbox folder with the champion: the flow of the scoring
deployments (on a schedule, and on approval: SageMaker's "deploy the approved model").

    python -m flows.score_pending --model-name bike-demand --inbox to-score/ --outbox scored/

Each entry of the inbox (a CSV or Parquet file, or a folder of Parquet parts) is a batch. Its
output is `OUTBOX/MODEL/NAME` (the entry's name with its dots as dashes: `week-12.csv` ->
`week-12-csv`), written by `flows.transform`, which records in it the version that scored it and
the input's fingerprint (names, sizes, modification times). A batch is pending while its output
is missing, was scored by another version than the champion, or was made from the batch as it was
before a change. So a new champion (an approval, a retrain) rescores the inbox; an unchanged inbox
scores nothing. At most `--max-batches` per run, in name order; the rest wait for the next run.
Keeping batches in the inbox is the user's choice: remove those that need no more scoring.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports: the collector paused, the warm pool or the Prefect server
    from infra.command import begin_command

    begin_command(__spec__)

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field, model_validator

from flows.transform import TransformParams, TransformResult, transform
from tasks.steps.access import checked_files, checked_local_path
from tasks.steps.cli import exit_process, run_flow_cli
from tasks.steps.errors import DataValidationError
from tasks.steps.model import MODEL_NAME_HELP, ModelName, find_champion
from tasks.steps.settings import get_settings
from tasks.steps.transform import read_record, source_fingerprint
from tasks.tabular.project import configured_model_name, require_model_name

PROG = "python -m flows.score_pending"
DATA_SUFFIXES = (".csv", ".parquet", ".pq")


class ScorePendingParams(BaseModel):
    """Which model scores which inbox, into which outbox."""

    model_name: ModelName | None = Field(
        default=None,
        description=f"Registered model whose champion scores (default: keel.toml's): {MODEL_NAME_HELP}.",
    )
    inbox: str = Field(
        min_length=1, description="Folder whose files (or sub-folders) are the batches to score."
    )
    outbox: str = Field(min_length=1, description="Folder the outputs go to, as OUTBOX/MODEL/BATCH.")
    keep_inputs: bool = Field(
        default=True, description="Keep every input column (what the monitor needs to check an output)."
    )
    id_columns: list[str] = Field(default_factory=list, description="Columns that identify a row.")
    max_batches: int = Field(default=20, ge=1, le=1000, description="Batches scored per run at most.")
    trigger: str = Field(default="", max_length=500, description="What started the run, for the record.")

    @model_validator(mode="before")
    @classmethod
    def _project_model(cls, values: Any) -> Any:
        return configured_model_name(values)

    @model_validator(mode="after")
    def _model_named(self) -> ScorePendingParams:
        require_model_name(self.model_name, "score with")
        return self


class ScorePendingResult(BaseModel):
    model_name: str
    champion: str | None
    scored: list[TransformResult] = Field(default_factory=list)
    current: list[str] = Field(
        default_factory=list, description="Batches whose output is the champion's already."
    )
    waiting: list[str] = Field(default_factory=list, description="Pending batches left for the next run.")
    refused: dict[str, str] = Field(
        default_factory=dict, description="Batches refused as bad input, and why."
    )


def output_name(batch: Path) -> str:
    """A batch's output folder name: its name with dots as dashes (never read as a file type)."""
    return batch.name.replace(".", "-")


def batches(inbox: Path) -> list[Path]:
    """The inbox's batches, by name: data files and folders, not hidden ones."""
    return sorted(
        p
        for p in inbox.iterdir()
        if not p.name.startswith((".", "_")) and (p.is_dir() or p.suffix.lower() in DATA_SUFFIXES)
    )


def is_current(batch: Path, output: Path, model_name: str, champion: str, access) -> bool:
    """The output exists, was scored by the champion, and from the batch as it is now."""
    record = read_record(output)
    if record is None or record.model_name != model_name or record.model_version != champion:
        return False
    _, files = checked_files(str(batch), access)
    return bool(files) and record.source_fingerprint == source_fingerprint(files)


@flow(name="score-pending", log_prints=False)
def score_pending(params: ScorePendingParams) -> ScorePendingResult:
    """Score every batch of the inbox whose output is not the champion's yet."""
    from tasks.steps.lineage import mlflow_client

    logger = get_run_logger()
    settings = get_settings()
    name = require_model_name(params.model_name, "score with")
    access = settings.data_access
    inbox = checked_local_path(params.inbox, access, "the inbox must be a folder on this machine")
    outbox = checked_local_path(params.outbox, access, "the outbox must be a folder on this machine")
    if not inbox.is_dir():
        raise DataValidationError(params.inbox, "the inbox is not a folder")
    found = find_champion(mlflow_client(settings), name)
    result = ScorePendingResult(model_name=name, champion=str(found.version) if found else None)
    if found is None:
        logger.warning("%s has no champion: nothing scored (%s)", name, params.trigger or "no trigger")
        return result
    champion = str(found.version)
    pending = []
    for batch in batches(inbox):
        if is_current(batch, outbox / name / output_name(batch), name, champion, access):
            result.current.append(batch.name)
        else:
            pending.append(batch)
    result.waiting = [b.name for b in pending[params.max_batches :]]
    logger.info(
        "%s v%s: %d batches to score, %d current, %d left for the next run%s",
        name,
        champion,
        min(len(pending), params.max_batches),
        len(result.current),
        len(result.waiting),
        f" ({params.trigger})" if params.trigger else "",
    )
    for number, batch in enumerate(pending[: params.max_batches], start=1):
        logger.info("batch %d of %d: %s", number, min(len(pending), params.max_batches), batch.name)
        try:
            result.scored.append(
                transform(
                    TransformParams(
                        model_name=name,
                        version=champion,
                        data=str(batch),
                        output=str(outbox / name / output_name(batch)),
                        keep_inputs=params.keep_inputs,
                        id_columns=params.id_columns,
                        overwrite=True,
                    )
                )
            )
        except DataValidationError as exc:  # a bad batch does not hold up the others
            result.refused[batch.name] = str(exc)
    if result.refused:  # the run ends Failed, naming them, after the others were scored
        raise DataValidationError(
            str(inbox),
            f"{len(result.refused)} batches refused, the others scored: "
            + "; ".join(f"{k}: {v}" for k, v in result.refused.items())[:2000],
        )
    return result


def summarise(result: ScorePendingResult) -> str:
    lines = [
        f"{result.model_name} v{result.champion or '-'}: {len(result.scored)} scored, {len(result.current)} current"
    ]
    lines += [f"  {r.input.location} -> {r.output.uri} ({r.output.rows or 0:,} rows)" for r in result.scored]
    if result.waiting:
        lines.append(f"  left for the next run: {', '.join(result.waiting)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run_flow_cli(
        score_pending,
        ScorePendingParams,
        argv,
        PROG,
        __doc__ or "",
        summarise,
        after_bad_input="nothing more scored",
    )


if __name__ == "__main__":
    exit_process(main())
