"""The processing steps of the tabular pipeline: check the input, then clean, featurize and split it.

The heavy part runs on the Dask cluster with dask.dataframe: the flow process only sees counts,
time bounds and category lists, never the rows. Splits are by time (train < validation < test), and
everything learned from data (categories, classes) is learned from the training split alone.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, model_validator

if TYPE_CHECKING:
    import dask.dataframe as dd
    import pandas as pd

from tasks.steps import CacheConfig, ParamGroup, RetryPolicy, current_step, processing_step
from tasks.steps.access import DataAccess
from tasks.steps.compute import dask_client
from tasks.steps.errors import DataValidationError
from tasks.steps.refs import DatasetRef, content_digest
from tasks.tabular.data import TableSpec, check_table, read_table
from tasks.tabular.featurize import BINARY, TIME_PARTS, FeatureSpec, as_labels, model_matrix, parse_time

SPLITS = ("train", "valid", "test")
MAX_CATEGORIES = 1000  # distinct values of a text column: more is an id, not a category
# Distinct values are gathered by a tree reduction into one partition, not by Dask's default
# shuffle: they are few, and come to this process whole anyway. The shuffle (P2P on a cluster, even
# of one partition) wrote two WARNING lines into the run's log per text column and per class column.
ONE_PARTITION = 1


class SplitSpec(ParamGroup):
    """The data window and the time-ordered split (fractions of the window's time span)."""

    start: date | None = Field(default=None, description="First day of the data window (inclusive).")
    end: date | None = Field(default=None, description="Last day of the data window (inclusive).")
    window_days: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Keep only the last N days, ending at --end or the newest row.",
    )
    valid_fraction: float = Field(
        default=0.15, gt=0, lt=0.5, description="Share of the time span for validation."
    )
    test_fraction: float = Field(
        default=0.15, gt=0, lt=0.5, description="Share of the time span held out for test."
    )

    @model_validator(mode="after")
    def _window(self) -> SplitSpec:
        if self.start and self.end and self.start > self.end:
            raise ValueError(
                f"--start {self.start} is after --end {self.end}: the data window would be empty"
            )
        return self


class Splits(BaseModel):
    """The processing step's outputs: three Parquet datasets and the feature spec learned from train."""

    train: DatasetRef
    valid: DatasetRef
    test: DatasetRef
    features: FeatureSpec
    boundaries: dict[str, str] = Field(description="Time bounds of each split, ISO formatted.")


@processing_step(name="validate-input", preload=("dask.dataframe",))
def validate_input(table: TableSpec, access: DataAccess, datasets_root: str) -> DatasetRef:
    """Stop before any heavy work if the location is not allowed (`tasks.steps.access`), or the file is
    missing, unreadable, cut off, or lacks a required column; pin the copy every later step reads
    (`tasks.tabular.snapshot`). Never cached: it digests the content, which is what later keys are made of."""
    ref = check_table(table, access, datasets_root)
    current_step().log_params({"format": ref.format, "columns": list(ref.columns)})
    return ref


def _infer_task(table: TableSpec, target_dtype, n_distinct: int) -> str:
    import pandas as pd

    if table.task == "regression":
        return "regression"
    numeric = pd.api.types.is_numeric_dtype(target_dtype) and not pd.api.types.is_bool_dtype(target_dtype)
    if table.task == "auto" and numeric and n_distinct > BINARY:
        return "regression"
    return "binary" if n_distinct <= BINARY else "multiclass"


@processing_step(name="prepare", cache=CacheConfig(), retry=RetryPolicy(attempts=3))
def prepare(raw: DatasetRef, table: TableSpec, split: SplitSpec) -> Splits:
    """Clean, featurize and split the raw table on Dask; write the splits as Parquet."""
    try:
        return _prepare(raw, table, split, current_step().output_location())
    except ValueError as exc:
        if "Mismatched dtypes" not in str(exc):
            raise
        columns = mismatched_columns(str(exc))
        raise DataValidationError(
            raw.uri,
            "column types change partway through the file"
            + (f" (in {', '.join(columns)})" if columns else "")
            + "; give each column one type, or convert the table to Parquet",
            columns[0] if columns else None,
        ) from exc


def mismatched_columns(message: str) -> list[str]:
    """The column names of Dask's "Mismatched dtypes" table (the rest of its message quotes values)."""
    import re

    rows = re.findall(r"^\|\s*(.+?)\s*\|\s*\S+\s*\|\s*\S+\s*\|\s*$", message, re.MULTILINE)
    return [r for r in rows if r not in ("Column", "") and not set(r) <= set("-+")]


def _prepare(raw: DatasetRef, table: TableSpec, split: SplitSpec, output_uri: str) -> Splits:
    import dask

    dask_client()  # the cluster runs every compute below
    frame = read_table(raw).drop(columns=table.drop_columns)
    time_column, target = table.time_column, table.target
    times = frame[time_column].map_partitions(parse_time, meta=(time_column, "datetime64[ns]"))
    frame = frame.assign(**{time_column: times})
    window = _window(frame, table, split, raw.uri)
    # One pass over the input for every count and bound the checks below need.
    total, bad_times, null_targets, window_rows, t_min, t_max, n_distinct = dask.compute(
        frame.shape[0],
        times.isna().sum(),
        frame[target].isna().sum(),
        window.shape[0],
        window[time_column].min(),
        window[time_column].max(),
        window[target].nunique_approx(),
    )
    if n_distinct <= BINARY + 1:  # nunique_approx is a sketch; make small counts exact
        n_distinct = int(window[target].nunique(split_out=ONE_PARTITION).compute())
    counts = InputCounts(
        rows=total,
        bad_times=bad_times,
        null_targets=null_targets,
        window_rows=window_rows,
        targets=n_distinct,
    )
    _check_input(counts, table, split, raw.uri)
    frame = window
    t_min, t_max = _as_datetime(t_min), _as_datetime(t_max)
    task = _infer_task(table, frame[target].dtype, n_distinct)
    if task == "regression":
        frame = _numeric_target(frame, target, raw.uri)

    valid_start, test_start = split_starts(t_min, t_max, split)
    parts = {
        "train": frame[frame[time_column] < valid_start],
        "valid": frame[(frame[time_column] >= valid_start) & (frame[time_column] < test_start)],
        "test": frame[frame[time_column] >= test_start],
    }
    later_labels = [
        parts[s][target]
        .dropna()
        .map_partitions(as_labels, meta=(target, "string"))
        .unique(split_out=ONE_PARTITION)
        for s in ("valid", "test")
        if task != "regression"
    ]
    features, computed = _learn_features(
        parts["train"],
        table,
        task,
        frame.columns,
        raw.uri,
        also=[*(parts[s].shape[0] for s in SPLITS), *later_labels],
    )
    if later_labels:
        valid_labels, test_labels = (set(map(str, labels)) for labels in computed[len(SPLITS) :])
        _check_classes(features, valid_labels, test_labels, raw.uri)
    model_matrix(frame._meta, features)  # fail here, not on a worker, if the spec is unusable
    rows = dict(zip(SPLITS, (int(n) for n in computed[: len(SPLITS)]), strict=True))
    boundaries = {
        "start": t_min.isoformat(),
        "valid_start": valid_start.isoformat(),
        "test_start": test_start.isoformat(),
        "end": t_max.isoformat(),
    }
    empty = [s for s in SPLITS if rows[s] == 0]
    if empty:
        raise DataValidationError(
            raw.uri,
            f"the time split leaves {empty} empty (window {t_min} .. {t_max}, validation from {valid_start}, "
            f"test from {test_start}; rows per split {rows}): widen the window or change the fractions",
            time_column,
        )
    refs = _write_splits(parts, output_uri, rows)
    splits = Splits(**refs, features=features, boundaries=boundaries)
    _log_prepared(splits, counts)
    return splits


def _log_prepared(splits: Splits, counts: InputCounts) -> None:
    from prefect import get_run_logger

    features, rows = splits.features, {s: getattr(splits, s).rows or 0 for s in SPLITS}
    step = current_step()
    step.log_params(
        {"task": features.task, "boundaries": splits.boundaries, "features": features.feature_names}
    )
    step.log_metrics(
        {
            "rows_input": counts.rows,
            "rows_window": counts.window_rows,
            "rows_dropped_null_target": counts.null_targets,
            **{f"rows_{s}": rows[s] for s in SPLITS},
        }
    )
    get_run_logger().info(
        "prepared %s rows -> train %d / valid %d / test %d (%s task, %d features)",
        f"{counts.window_rows:,}",
        rows["train"],
        rows["valid"],
        rows["test"],
        features.task,
        len(features.feature_names),
    )


def _window(frame: dd.DataFrame, table: TableSpec, split: SplitSpec, uri: str) -> dd.DataFrame:
    """The rows with a target inside the data window (its dates, or its last `window_days`)."""
    import pandas as pd

    time_column, target = table.time_column, table.target
    window = frame
    if split.start:
        window = window[window[time_column] >= pd.Timestamp(split.start)]
    if split.end:
        window = window[window[time_column] < pd.Timestamp(split.end) + pd.Timedelta(days=1)]
    window = window[~window[target].isna()]
    if split.window_days:
        newest = window[time_column].max().compute()
        if pd.isna(newest):
            raise DataValidationError(
                uri, "no rows with a target and a time to take a window from", time_column
            )
        first = pd.Timestamp(newest).normalize() - pd.Timedelta(days=split.window_days - 1)
        window = window[window[time_column] >= first]
    return window


class InputCounts(BaseModel):
    """What one pass over the input counted, for the checks before the split."""

    rows: int
    bad_times: int  # missing or not dates/times
    null_targets: int
    window_rows: int  # rows with a target inside the data window
    targets: float  # distinct target values in the window (a sketch's estimate above a few)


def _check_input(counts: InputCounts, table: TableSpec, split: SplitSpec, uri: str) -> None:
    if counts.rows == 0:
        raise DataValidationError(uri, "the table has a header but no rows")
    if counts.bad_times:
        raise DataValidationError(
            uri,
            f"{counts.bad_times} of {counts.rows} values are missing or not dates/times",
            table.time_column,
        )
    if counts.null_targets == counts.rows:
        raise DataValidationError(uri, "every value of the target is missing", table.target)
    if counts.window_rows == 0:
        raise DataValidationError(
            uri, f"no rows with a target inside the data window {split.start}..{split.end}", table.time_column
        )
    if counts.targets < BINARY:
        raise DataValidationError(
            uri, "the target has one value in the data window: there is nothing to learn", table.target
        )


def _numeric_target(frame: dd.DataFrame, target: str, uri: str) -> dd.DataFrame:
    """A regression target as numbers; refused if any value is not one."""
    import pandas as pd

    as_number = frame[target].map_partitions(pd.to_numeric, errors="coerce", meta=(target, "float64"))
    not_numbers = int(as_number.isna().sum().compute())
    if not_numbers:
        raise DataValidationError(
            uri, f"{not_numbers} target values are not numbers (regression target)", target
        )
    return frame.assign(**{target: as_number})


def _write_splits(
    parts: dict[str, dd.DataFrame], output_uri: str, rows: dict[str, int]
) -> dict[str, DatasetRef]:
    """The splits as Parquet, written side by side on the cluster, and their references."""
    import dask

    dask.compute(
        *(
            parts[s].to_parquet(f"{output_uri}/{s}", write_index=False, compute=False, overwrite=True)
            for s in SPLITS
        )
    )
    return {
        s: DatasetRef(
            name=s,
            uri=f"{output_uri}/{s}",
            digest=content_digest(f"{output_uri}/{s}"),
            format="parquet",
            rows=rows[s],
            columns=tuple(parts[s].columns),
        )
        for s in SPLITS
    }


def _as_datetime(value) -> datetime:
    import pandas as pd

    return pd.Timestamp(value).to_pydatetime()


def split_starts(t_min: datetime, t_max: datetime, split: SplitSpec) -> tuple[datetime, datetime]:
    """Where validation and test begin: by share of the window's time span (train < valid < test)."""
    span = t_max - t_min
    return (
        t_min + span * (1 - split.valid_fraction - split.test_fraction),
        t_min + span * (1 - split.test_fraction),
    )


def _numeric(dtype) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def _check_classes(features: FeatureSpec, valid: set[str], test: set[str], uri: str) -> None:
    """Every class of the later splits was seen in training, and every trained class is in the test
    period (else the model cannot score it, or the test AUC cannot be computed and the gate never
    passes). Counts only: labels are values from the data."""
    trained = set(features.classes or [])
    unseen = (valid | test) - trained
    if unseen:
        raise DataValidationError(
            uri,
            f"{len(unseen)} class(es) appear in the validation or test period but never in the training split: "
            "move the split (--valid-fraction / --test-fraction, the window) or drop those rows",
            features.target,
        )
    absent = trained - test
    if absent:
        raise DataValidationError(
            uri,
            f"{len(absent)} of {len(trained)} classes never appear in the test period, so the test AUC cannot be "
            "computed and the quality gate could never pass: widen the window or --test-fraction",
            features.target,
        )


def _learn_features(
    train, table: TableSpec, task: str, columns, uri: str, also: list
) -> tuple[FeatureSpec, list]:
    """Feature roles from dtypes, categories and classes from the training split only (dask).

    `also`: further lazy values to compute in the same pass over the data; returned computed."""
    import dask

    candidates = [c for c in columns if c not in (table.target, table.time_column)]
    text = [c for c in candidates if not _numeric(train[c].dtype)]
    lookups = [
        train[c].map_partitions(_first_distinct, meta=(c, "object")).unique(split_out=ONE_PARTITION)
        for c in text
    ]
    labels = (
        train[table.target]
        .dropna()
        .map_partitions(as_labels, meta=(table.target, "string"))
        .unique(split_out=ONE_PARTITION)
    )
    hour_varies = (train[table.time_column].dt.hour != 0).any()
    *found, label_values, hour_varies, computed_also = dask.compute(
        *lookups, labels if task != "regression" else None, hour_varies, also
    )
    spec = feature_spec(
        table,
        task,
        candidates,
        dict(zip(text, found, strict=True)),
        label_values,
        bool(hour_varies),
        uri,
    )
    return spec, list(computed_also)


def _first_distinct(part: pd.Series) -> pd.Series:
    """A partition's distinct text values, at most MAX_CATEGORIES + 1 of them: enough to refuse an
    id-like column, so what is gathered grows with the partitions, not with the rows."""
    import pandas as pd

    return pd.Series(part.dropna().astype(str).unique()[: MAX_CATEGORIES + 1], name=part.name, dtype="object")


def learn_features(train, table: TableSpec, task: str, uri: str) -> FeatureSpec:
    """`_learn_features` for a pandas training frame (the backtest's retrains)."""
    candidates = [c for c in train.columns if c not in (table.target, table.time_column)]
    text = [c for c in candidates if not _numeric(train[c].dtype)]
    return feature_spec(
        table,
        task,
        candidates,
        {c: _first_distinct(train[c]) for c in text},
        as_labels(train[table.target].dropna()).unique() if task != "regression" else None,
        bool((train[table.time_column].dt.hour != 0).any()),
        uri,
    )


def feature_spec(
    table: TableSpec,
    task: str,
    candidates: list[str],
    text_values: dict,
    label_values,
    hour_varies: bool,
    uri: str,
) -> FeatureSpec:
    """The feature spec from what the training split holds: text columns become categories (at most
    MAX_CATEGORIES each), numeric ones stay numbers, calendar parts come from the time column."""
    categorical = {c: sorted(map(str, values)) for c, values in text_values.items()}
    too_many = [c for c, v in categorical.items() if len(v) > MAX_CATEGORIES]
    if too_many:
        raise DataValidationError(
            uri,
            f"text column has more than {MAX_CATEGORIES} distinct values ({', '.join(too_many)}): it looks "
            "like an id, not a category: drop it (--drop-columns) or encode it",
            too_many[0],
        )
    return FeatureSpec(
        target=table.target,
        time_column=table.time_column,
        task=task,
        numeric=[c for c in candidates if c not in categorical],
        categorical=categorical,
        time_parts=[p for p in TIME_PARTS if p != "hour" or hour_varies],
        classes=sorted(map(str, label_values)) if task != "regression" else None,
    )
