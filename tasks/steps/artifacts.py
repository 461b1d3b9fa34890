"""Values a step returns that are not references yet: stored for the author, passed on as references.

A pandas or Dask DataFrame returned by a step is written as Parquet under the execution's output
location for that step (`<outputs>/<execution>/<step>/<name>`), digested, and handed to the next
step as a `DatasetRef` — never pickled through the orchestrator. A `dict` of DataFrames gives a dict
of references. Everything else a step returns must be JSON-serialisable (references, pydantic
models, plain values): it is stored with the step's run for reuse.
"""

from __future__ import annotations

import typing
from typing import Any

from tasks.steps.refs import DatasetRef, content_digest, data_files

FRAME_PACKAGES = ("pandas", "dask")


def is_frame_type(annotation: Any) -> bool:
    """A pandas or Dask DataFrame class (judged by name: importing Dask to ask is not worth it)."""
    return (
        isinstance(annotation, type)
        and annotation.__name__ == "DataFrame"
        and annotation.__module__.split(".")[0] in FRAME_PACKAGES
    )


def is_frame(value: Any) -> bool:
    return is_frame_type(type(value)) or any(is_frame_type(base) for base in type(value).__mro__)


def stored_type(annotation: Any) -> Any:
    """The type a step's callers receive for its return annotation: DataFrames become `DatasetRef`."""
    if is_frame_type(annotation):
        return DatasetRef
    origin = typing.get_origin(annotation)
    if origin is dict:
        key, value = typing.get_args(annotation) or (str, Any)
        return dict[key, stored_type(value)]  # type: ignore[misc, valid-type]  # a type made at run time
    return annotation


def store_frames(value: Any, name: str, location: str) -> Any:
    """`value` with every DataFrame (top level, or the values of a dict) written under `location` and
    replaced by its reference."""
    if is_frame(value):
        return write_parquet(value, name, f"{location.rstrip('/')}/{name}")
    if isinstance(value, dict) and any(is_frame(v) for v in value.values()):
        return {
            k: write_parquet(v, str(k), f"{location.rstrip('/')}/{k}") if is_frame(v) else v
            for k, v in value.items()
        }
    return value


def write_parquet(frame: Any, name: str, folder: str) -> DatasetRef:
    """Write a DataFrame as a folder of Parquet files (what a retry wrote before is replaced) and
    return its reference: rows and columns from the files' footers, digest of their bytes."""
    import fsspec
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(folder)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if type(frame).__module__.split(".")[0] == "dask":
        from tasks.steps.compute import dask_client

        dask_client()  # written by the execution's cluster (opened now if no step opened it yet)
        frame.to_parquet(folder, write_metadata_file=False)
    else:
        fs.makedirs(path, exist_ok=True)
        frame.to_parquet(f"{folder}/part.0.parquet")
    rows = 0
    for file in data_files(folder):
        with fs.open(file, "rb") as handle:
            rows += pq.ParquetFile(handle).metadata.num_rows
    return DatasetRef(
        name=name,
        uri=folder,
        digest=content_digest(folder),
        format="parquet",
        rows=rows,
        columns=tuple(str(c) for c in frame.columns),
    )
