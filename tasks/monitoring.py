"""Drift monitoring work that runs on the Dask workers: profiling the reference, summarising new data.

The flow process only receives per-column counts (a few KB per column), a bounded row sample for
the Evidently report and a handful of sums for the quality metrics, never the data itself.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from tasks.drift_stats import ColumnProfile, ColumnSummary, merge_frames, profile_column, summarise_frame
from tasks.featurize import FeatureSpec, as_labels, encode_target, parse_time
from tasks.modeling import openmp_threads

PREDICTION = "prediction"
SAMPLE_ROWS = 20_000  # rows of reference and of new data behind the Evidently report


@functools.lru_cache(maxsize=4)
def load_model(model_uri: str, tracking_uri: str, registry_uri: str):
    """The model as a user loads it (`mlflow.pyfunc`), once per worker process."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    return mlflow.pyfunc.load_model(model_uri)


def predict(frame: pd.DataFrame, spec: FeatureSpec, model) -> pd.Series:
    """The monitored prediction: the number (regression) or the predicted label (classification)."""
    predicted = model.predict(frame[spec.input_columns])
    column = predicted[PREDICTION]
    values = column.astype("float64") if spec.task == "regression" else column.astype(str)
    return pd.Series(values.to_numpy(), index=frame.index, name=PREDICTION)


def kinds(spec: FeatureSpec) -> dict[str, str]:
    """Every monitored column and how it is tested: the features, the target and the prediction."""
    label_kind = "numeric" if spec.task == "regression" else "categorical"
    return {
        **dict.fromkeys(spec.numeric, "numeric"),
        **dict.fromkeys(spec.categorical, "categorical"),
        spec.target: label_kind,
        PREDICTION: label_kind,
    }


def monitored_values(frame: pd.DataFrame, column: str, spec: FeatureSpec) -> pd.Series:
    """A target column as the drift tests see it: numbers for regression, text labels otherwise."""
    if column == spec.target and spec.task != "regression":
        return as_labels(frame[column])
    return frame[column]


def predict_file(
    uri: str, spec: FeatureSpec, model_uri: str, tracking_uri: str, registry_uri: str
) -> np.ndarray:
    """On a worker: the monitored prediction for one file of a split. The baseline step predicts
    the training split file by file, so every worker thread takes a share of it, beside the steps
    running at the same time."""
    frame = pd.read_parquet(uri, columns=spec.input_columns)
    if frame.empty:  # a split's files can be empty: its rows are those of a time window
        return np.empty(0, dtype="float64" if spec.task == "regression" else object)
    with openmp_threads(1):
        return predict(frame, spec, load_model(model_uri, tracking_uri, registry_uri)).to_numpy()


def profile_reference(
    files: list[str], spec: FeatureSpec, predictions: list[np.ndarray], seed: int
) -> tuple[dict[str, ColumnProfile], pd.DataFrame]:
    """On a worker: profile every monitored column of the training split (its `files`, in order,
    with each file's `predict_file`), and draw the reference sample behind the Evidently report."""
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    frame[PREDICTION] = np.concatenate(predictions)
    monitored = kinds(spec)
    profiles = {
        column: profile_column(monitored_values(frame, column, spec), column, kind)  # type: ignore[arg-type]
        for column, kind in monitored.items()
    }
    sample = frame.sample(n=min(SAMPLE_ROWS, len(frame)), random_state=seed).sort_index()
    return profiles, sample[[spec.time_column, *monitored]]


class Quality(BaseModel):
    """Sums from which the quality metrics of labelled new data follow exactly; they add up."""

    rows: int = 0
    sum_y: float = 0.0
    sum_y2: float = 0.0
    sum_se: float = 0.0
    sum_ae: float = 0.0
    correct: int = 0

    def __add__(self, other: Quality) -> Quality:
        return Quality(**{k: getattr(self, k) + getattr(other, k) for k in Quality.model_fields})

    def metrics(self, task: str) -> dict[str, float]:
        if not self.rows:
            return {}
        if task != "regression":
            return {"accuracy": self.correct / self.rows}
        total = self.sum_y2 - self.sum_y**2 / self.rows
        return {
            "rmse": math.sqrt(self.sum_se / self.rows),
            "mae": self.sum_ae / self.rows,
            "r2": 1 - self.sum_se / total if total > 0 else float("nan"),
        }


class BatchSummary(BaseModel):
    """One pass over the new data: per-column summaries, bad values found, a sample and quality sums."""

    model_config = {"arbitrary_types_allowed": True}

    rows: int = 0
    columns: dict[str, ColumnSummary] = Field(default_factory=dict)
    not_numbers: dict[str, int] = Field(default_factory=dict)
    bad_times: int = 0
    quality: Quality = Field(default_factory=Quality)
    sample: Any = None  # pandas DataFrame


class ModelLocation(BaseModel):
    """Where a worker loads the monitored model from."""

    uri: str
    tracking_uri: str
    registry_uri: str


def summarise_batch(
    client,
    frame,
    profiles: dict[str, ColumnProfile],
    spec: FeatureSpec,
    model: ModelLocation | None,
    sample_rows: int = SAMPLE_ROWS,
) -> BatchSummary:
    """One pass over a dask.dataframe on the cluster: a summary per partition, merged on a worker.
    `model` None: no predictions (and no quality), the features and target only."""
    import dask

    shared = dask.delayed(profiles, pure=True)  # one copy in the graph, not one per partition
    parts = [
        dask.delayed(summarise_partition)(part, shared, spec, model, sample_rows, index)
        for index, part in enumerate(frame.to_delayed())
    ]
    return client.compute(dask.delayed(merge_summaries)(parts, sample_rows)).result()


def summarise_partition(
    frame: pd.DataFrame,
    profiles: dict[str, ColumnProfile],
    spec: FeatureSpec,
    model: ModelLocation | None,
    sample_rows: int,
    seed: int,
) -> BatchSummary:
    """On a worker: one partition of the new data -> its summary (the target only if it is there)."""
    summary = BatchSummary(rows=len(frame))
    if not len(frame):
        return summary
    frame = frame.copy()
    for column in spec.numeric:
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = int((numbers.isna() & frame[column].notna()).sum())
        if bad:
            summary.not_numbers[column] = bad
        frame[column] = numbers
    times = parse_time(frame[spec.time_column])
    summary.bad_times = int(times.isna().sum())
    if summary.bad_times or summary.not_numbers:
        return summary  # the flow reports the bad values; nothing is scored
    frame[spec.time_column] = times
    if model is not None:
        frame[PREDICTION] = predict(
            frame, spec, load_model(model.uri, model.tracking_uri, model.registry_uri)
        )
    labelled = spec.target in frame.columns
    watched = {
        c: p
        for c, p in profiles.items()
        if (c != spec.target or labelled) and (c != PREDICTION or model is not None)
    }
    summary.columns = summarise_frame(
        pd.DataFrame({c: monitored_values(frame, c, spec) for c in watched}), watched
    )
    if labelled and model is not None:
        summary.quality = _quality(frame, spec)
    keep = [spec.time_column, *[c for c in profiles if c in frame.columns]]
    summary.sample = frame[keep].sample(n=min(sample_rows, len(frame)), random_state=seed)
    return summary


def _quality(frame: pd.DataFrame, spec: FeatureSpec) -> Quality:
    known = frame[frame[spec.target].notna()]
    if spec.task == "regression":
        y = pd.to_numeric(known[spec.target], errors="coerce").to_numpy(dtype="float64")
        error = y - known[PREDICTION].to_numpy(dtype="float64")
        return Quality(
            rows=len(y),
            sum_y=float(y.sum()),
            sum_y2=float((y * y).sum()),
            sum_se=float((error * error).sum()),
            sum_ae=float(np.abs(error).sum()),
        )
    labels = as_labels(known[spec.target]).to_numpy()
    encode_target(known[spec.target], spec)  # labels never seen in training raise here
    return Quality(rows=len(labels), correct=int((labels == known[PREDICTION].to_numpy()).sum()))


def merge_summaries(parts: list[BatchSummary], sample_rows: int) -> BatchSummary:
    """Partition summaries -> one (run on a worker, as the last task of the pass); the partitions'
    samples are thinned in proportion to their sizes, so the result is a uniform sample."""
    scored = [p for p in parts if p.columns]
    out = BatchSummary(
        rows=sum(p.rows for p in parts),
        columns=merge_frames([p.columns for p in scored]) if scored else {},
        bad_times=sum(p.bad_times for p in parts),
    )
    for part in parts:
        for column, n in part.not_numbers.items():
            out.not_numbers[column] = out.not_numbers.get(column, 0) + n
        out.quality = out.quality + part.quality
    total = sum(p.rows for p in scored)
    samples = [
        p.sample.head(min(len(p.sample), round(sample_rows * p.rows / total)))
        for p in scored
        if p.sample is not None and total
    ]
    out.sample = pd.concat(samples, ignore_index=True) if samples else None
    return out
