"""TransformStep: batch scoring (SageMaker's batch transform) with data capture.

A registered model version (`mlflow.pyfunc`, its files verified) is applied to a table on the Dask
workers, partition by partition; each partition is written as one Parquet file holding the columns
asked to be kept, the model's output (`prediction`, and `probability_<class>` for a classifier), an
`inference_id`, the model's name and version and the scoring time. That capture is what monitoring
reuses instead of predicting again, and what late labels join on (by `inference_id`).

The output appears whole or not at all: the parts are written to a hidden folder beside it, which
is renamed into place once every partition is written (a rename within one file system is atomic).

`inference_id`: with one id column, its value as text (the id a label file will carry); with several,
or with none (then every input column), a 64-bit hash of the row's values as 16 hex digits. Numbers
are hashed as float64 and everything else as text, so the same row gets the same id from a CSV and
from a Parquet file, and in every run.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from tasks.steps.base import step_kind
from tasks.steps.errors import DataValidationError
from tasks.steps.integrity import ModelLocation
from tasks.steps.kinds import StepKind

if TYPE_CHECKING:
    import dask.dataframe as dd
    import distributed

transform_step = step_kind(StepKind.TRANSFORM)

INFERENCE_ID = "inference_id"
MODEL_NAME_COLUMN = "model_name"
MODEL_VERSION_COLUMN = "model_version"
SCORED_AT_COLUMN = "scored_at"
PREDICTION_COLUMN = "prediction"
ADDED_COLUMNS = (INFERENCE_ID, MODEL_NAME_COLUMN, MODEL_VERSION_COLUMN, SCORED_AT_COLUMN)
PART_NAME = "part-{:05d}.parquet"


class ScoringSpec(BaseModel):
    """What every partition is scored with: the same model version, columns and time."""

    model: ModelLocation
    model_name: str
    model_version: str
    input_columns: tuple[str, ...] = Field(
        default=(), description="The columns the model reads (its signature's); none: every column."
    )
    keep_columns: tuple[str, ...] = ()
    id_columns: tuple[str, ...] = Field(
        default=(), description="The columns an inference id is made of; none: every input column."
    )
    scored_at: pd.Timestamp

    model_config = {"arbitrary_types_allowed": True}


RECORD_FILE = "_scoring.json"  # beside the parts; readers and digests skip `_` files


class ScoringRecord(BaseModel):
    """What made an output, kept in it: which version scored which input (as it was then)."""

    model_name: str
    model_version: str
    source: str = Field(description="The data as the user named it.")
    source_fingerprint: str = Field(description="Names, sizes and modification times of its files.")
    input_digest: str = Field(description="sha256 of the bytes scored.")
    rows: int
    mlflow_run_id: str
    scored_at: str


def source_fingerprint(files: Sequence[str]) -> str:
    """A cheap stand-in for the content of `files`: their names, sizes and modification times (a
    changed file changes it without being read)."""
    import hashlib

    import fsspec

    digest = hashlib.sha256()
    for url in sorted(files):
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
        digest.update(
            f"{path}\0{info.get('size')}\0{info.get('mtime') or info.get('LastModified')}\n".encode()
        )
    return digest.hexdigest()


def read_record(output: Path) -> ScoringRecord | None:
    """The record of an output, or None when there is none (not written by a transform, or unreadable)."""
    try:
        return ScoringRecord.model_validate_json((output / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None


class ScoredPart(BaseModel):
    """One partition's part file (None: the partition was empty) and its rows."""

    file: str | None
    rows: int


def _hashable(column: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
        return column.astype("float64")
    return column.astype("string").fillna("\x00<NA>")


def row_ids(frame: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """Stable inference ids of the rows: one column's values as text, else a hash of the columns'
    values (in name order, each column's name hashed in)."""
    if len(columns) == 1:
        values = frame[columns[0]]
        if values.isna().any():
            raise DataValidationError(
                "the data to score", "an id column has missing values: every row needs an id", columns[0]
            )
        return values.astype("string").astype(object).rename(INFERENCE_ID)
    combined = np.zeros(len(frame), dtype="uint64")
    with np.errstate(over="ignore"):
        for name in sorted(columns):
            hashed = pd.util.hash_pandas_object(_hashable(frame[name]), index=False).to_numpy()
            salt = np.uint64(int(pd.util.hash_array(np.array([name], dtype=object))[0]))
            combined = combined * np.uint64(1_000_003) + (hashed ^ salt)
    return pd.Series(
        [f"{v:016x}" for v in combined.tolist()], index=frame.index, name=INFERENCE_ID, dtype=object
    )


def _as_frame(output: Any, index: pd.Index) -> pd.DataFrame:
    """A pyfunc's output as columns: a frame as it is, anything else as `prediction`."""
    if isinstance(output, pd.DataFrame):
        frame = output.reset_index(drop=True)
    elif isinstance(output, pd.Series):
        frame = output.reset_index(drop=True).to_frame(PREDICTION_COLUMN)
    else:
        frame = pd.DataFrame({PREDICTION_COLUMN: list(np.asarray(output))})
    frame.index = index
    return frame


def plain_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """Text columns as Python objects: Dask reads text as PyArrow strings, which MLflow's schema
    enforcement cannot convert to the signature's types (a date in text: "Can not safely convert
    string to datetime64")."""
    text = [c for c in frame.columns if isinstance(frame[c].dtype, pd.StringDtype)]
    return frame.astype(dict.fromkeys(text, object)) if text else frame


def score_frame(frame: pd.DataFrame, spec: ScoringSpec) -> pd.DataFrame:
    """One partition scored: the kept columns, the model's output, the id and what scored it."""
    ids = row_ids(frame, spec.id_columns or tuple(frame.columns))
    features = frame[list(spec.input_columns)] if spec.input_columns else frame
    predicted = _as_frame(spec.model.load().predict(plain_strings(features)), frame.index)
    clash = sorted(set(predicted.columns) & (set(spec.keep_columns) | set(ADDED_COLUMNS)))
    if clash:
        raise DataValidationError(
            "the data to score",
            f"a kept column has the name of a column the scoring adds ({', '.join(clash)}): rename it",
            clash[0],
        )
    scored = pd.concat([frame[list(spec.keep_columns)], predicted], axis=1)
    scored.insert(0, INFERENCE_ID, ids)
    scored[MODEL_NAME_COLUMN] = spec.model_name
    scored[MODEL_VERSION_COLUMN] = spec.model_version
    scored[SCORED_AT_COLUMN] = spec.scored_at
    return scored.reset_index(drop=True)


def score_partition(frame: pd.DataFrame, spec: ScoringSpec, folder: str, number: int) -> ScoredPart:
    """On a worker: score one partition and write it as `part-NNNNN.parquet` into `folder`."""
    if frame.empty:
        return ScoredPart(file=None, rows=0)
    scored = score_frame(frame, spec)
    path = f"{folder}/{PART_NAME.format(number)}"
    scored.to_parquet(path, index=False)
    return ScoredPart(file=path, rows=len(scored))


@contextmanager
def written_whole(output: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden folder beside `output` to write into; renamed to `output` when the block ends
    without error, removed when it fails. An existing output is replaced only with `overwrite`
    (kept aside until the new one is in place)."""
    if output.exists() and not overwrite:
        raise DataValidationError(str(output), "the output exists already (--overwrite replaces it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.incomplete-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = output.parent / f".{output.name}.replaced-{uuid.uuid4().hex[:12]}"
    if output.exists():
        os.replace(output, old)
    try:
        os.replace(staging, output)
    except OSError:
        if old.exists():
            os.replace(old, output)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def unreadable(exc: BaseException, number: int, location: str) -> BaseException:
    """A partition's failure as bad input when the data is at fault (a value of another type than
    the column's, a column the model cannot take), naming the partition, the column and the error's
    type, never a value (readers and MLflow quote rows in their messages)."""
    import re

    from mlflow.exceptions import MlflowException

    if isinstance(exc, DataValidationError) or not isinstance(exc, ValueError | TypeError | MlflowException):
        return exc
    text = str(exc)
    named = re.search(r"(?:for|convert) column '?([^'\s.]+)", text)  # MLflow's schema enforcement
    table = [  # Dask's table of mismatched dtypes: | column | found | expected |
        row.group(1)
        for row in re.finditer(r"^\|\s*(\S+)\s*\|\s*\S+\s*\|\s*\S+\s*\|\s*$", text, re.MULTILINE)
        if row.group(1) != "Column"
    ]
    found = named.group(1) if named else (table[0] if table else None)
    return DataValidationError(
        location,
        f"partition {number} could not be scored ({type(exc).__name__}: "
        + ("a value does not have the column's type" if "type" in text.lower() else "the model refused it")
        + ")",
        found,
    )


def score_table(
    client: distributed.Client,
    frame: dd.DataFrame,
    spec: ScoringSpec,
    folder: Path,
    location: str,
    progress: Callable[[int, int], None] | None = None,
) -> list[ScoredPart]:
    """Score every partition of `frame` (the data at `location`) on the workers into `folder`; the
    parts in order. `progress(done, total)` is called as partitions finish. A partition that cannot
    be read or scored stops the rest."""
    from distributed import as_completed

    partitions = client.compute(frame.to_delayed(optimize_graph=True))
    futures = [
        client.submit(score_partition, part, spec, str(folder), i, pure=False)
        for i, part in enumerate(partitions)
    ]
    for done, future in enumerate(as_completed(futures), start=1):
        if future.status == "error":  # stop at the first failure: the output will not be kept
            failure = future.exception()
            client.cancel([*futures, *partitions])
            raise unreadable(failure, futures.index(future), location) from failure
        if progress is not None:
            progress(done, len(futures))
    return client.gather(futures)
