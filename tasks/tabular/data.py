"""The input table: where it is, which columns matter, and the checks that stop bad data early."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from tasks.steps.access import DataAccess, checked_files
from tasks.steps.errors import DataValidationError, read_failure
from tasks.steps.refs import DatasetRef, data_files, file_urls
from tasks.tabular.snapshot import pin, reported_as


class TableSpec(BaseModel):
    """A user's table: the data location, the target and the time column are all it takes."""

    path: str = Field(description="CSV or Parquet file, or a folder of Parquet files (path or fsspec URL).")
    target: str = Field(description="Column to predict.")
    time_column: str = Field(description="Column that orders the rows in time; splits are made along it.")
    drop_columns: list[str] = Field(
        default_factory=list, description="Columns never used as features (ids, leaks of the target)."
    )
    task: Literal["auto", "regression", "classification"] = Field(
        default="auto",
        description="auto: text, boolean or two-valued targets are classified, numbers are regressed.",
    )
    key_columns: list[str] = Field(
        default_factory=list, description="Columns that identify a row (e.g. day and hour); must be unique."
    )


def table_format(path: str) -> Literal["csv", "parquet"]:
    files = data_files(path)
    suffixes = {Path(f).suffix.lower() for f in files}
    if suffixes <= {".csv", ".txt"} and suffixes:
        return "csv"
    if suffixes <= {".parquet", ".pq"} and suffixes:
        return "parquet"
    raise DataValidationError(path, f"unsupported file type {sorted(suffixes)}: expected .csv or .parquet")


def read_header(path: str, fmt: Literal["csv", "parquet"]) -> list[str]:
    """The column names, read cheaply (CSV: first lines; Parquet: the schema)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = file_urls(path)[0]  # with its scheme: an s3 path without one would be read as a local file
    try:
        if fmt == "csv":
            names = list(pd.read_csv(first, nrows=5).columns)
            # pandas renames a repeated name (`temp`, `temp.1`): read the header line as it is written
            written = (
                pd.read_csv(first, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].tolist()
            )
        else:
            import fsspec

            with fsspec.open(first, "rb") as handle:  # fsspec's filesystems and credentials, not pyarrow's
                schema = pq.read_schema(handle)
            names = written = list(schema.names)
            nested = [f.name for f in schema if pa.types.is_nested(f.type)]
            if nested:
                raise DataValidationError(
                    first,
                    "nested values (list, struct or map) are not supported: flatten the column",
                    nested[0],
                )
    except DataValidationError:
        raise
    except pd.errors.EmptyDataError as exc:
        raise DataValidationError(first, "file is empty (no header, no rows)") from exc
    except Exception as exc:
        raise DataValidationError(first, f"cannot be read as {fmt} ({read_failure(exc)})") from exc
    twice = [n for i, n in enumerate(written) if n and n in written[:i]]
    if twice:
        raise DataValidationError(first, "the header names this column more than once", twice[0])
    return names


def check_csv_ends(path: str, columns: list[str]) -> None:
    """A CSV cut off mid-row (a failed copy, a full disk) reads as a short last row whose missing
    fields look like missing values; refuse it: no line end after a row with fewer fields."""
    import csv

    import fsspec

    with fsspec.open(path, "rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - 65536))
        tail = handle.read()
    if not tail or tail.endswith(b"\n"):
        return
    last = tail.rsplit(b"\n", 1)[-1].decode("utf-8", errors="replace")
    fields = next(csv.reader([last]), [])
    if len(fields) < len(columns):
        raise DataValidationError(
            path,
            f"truncated CSV: the last row has {len(fields)} of {len(columns)} fields and no line end",
            columns[len(fields)] if fields else columns[0],
        )


def pinned_table(name: str, location: str, files: list[str], datasets_root: str) -> DatasetRef:
    """The table pinned once (`tasks.tabular.snapshot`) and its header read from that copy; errors name the
    user's file. An unsupported file type is refused before anything is copied."""
    fmt = table_format(location)
    pinned = pin(location, files, datasets_root)
    ref = DatasetRef(name=name, uri=pinned.uri, digest=pinned.digest, format=fmt, source=location)
    with reported_as(ref):
        columns = read_header(pinned.uri, fmt)
    return ref.model_copy(update={"columns": tuple(columns)})


def check_table(table: TableSpec, access: DataAccess, datasets_root: str) -> DatasetRef:
    """Fail fast before any heavy work: the location is allowed (`tasks.steps.access`), exists, reads, is
    whole, and has the columns it must. Checked on the run's pinned copy (`tasks.tabular.snapshot`), which is
    what every later step reads; errors name the user's file."""
    location, files = checked_files(table.path, access)
    if not files:
        raise DataValidationError(location, "file does not exist (or the folder holds no data files)")
    ref = pinned_table("raw", location, files, datasets_root)
    columns = list(ref.columns)
    if ref.format == "csv":
        with reported_as(ref):
            for url in file_urls(ref.uri):
                check_csv_ends(url, columns)
    for role, column in (("target", table.target), ("time", table.time_column)):
        if column not in columns:
            raise DataValidationError(
                location, f"required {role} column is missing (the file has {len(columns)} columns)", column
            )
    unknown = [c for c in table.drop_columns if c not in columns]
    if unknown:
        raise DataValidationError(
            location, f"drop_columns names columns that do not exist: {unknown}", unknown[0]
        )
    unknown = [c for c in table.key_columns if c not in columns]
    if unknown:
        raise DataValidationError(location, "a key column does not exist", unknown[0])
    if table.target in table.drop_columns or table.time_column in table.drop_columns:
        raise DataValidationError(location, "drop_columns must not name the target or the time column")
    return ref


def read_table(ref: DatasetRef):
    """The table as a lazy dask.dataframe (a CSV file or folder of CSV files, or Parquet)."""
    import dask.dataframe as dd

    if ref.format == "csv":
        # Column types come from the file (the served model's signature keeps them); a larger sample
        # than Dask's default makes a late missing value in an integer column less likely to surprise.
        return dd.read_csv(file_urls(ref.uri), blocksize="64MB", sample=16_000_000)
    return dd.read_parquet(ref.uri)
