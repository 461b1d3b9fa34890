"""Drift monitoring work that runs on the Dask workers: the baseline with its calibration, and the
one-pass summary of new data.

The flow process only receives per-column counts (a few KB per column), performance sums, a bounded
row sample for the Evidently report and the calibration, never the data itself. The backtest calls
the same functions on frames it holds (`build_baseline`, `summarise_partition`).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from tasks.monitoring.calibration import (
    MIN_CHUNKS,
    Calibration,
    ChunkSize,
    blocks_of,
    drift_normals,
    window_chunks,
)
from tasks.monitoring.drift_stats import (
    ColumnProfile,
    ColumnSummary,
    merge_frames,
    profile_column,
    summarise_frame,
)
from tasks.monitoring.performance import (
    Estimator,
    PerformanceCalibration,
    Sums,
    calibrate_performance,
    realized_sums,
)
from tasks.steps.integrity import ModelLocation
from tasks.tabular.featurize import FeatureSpec, as_labels, model_matrix, parse_time, predictions_frame
from tasks.tabular.modeling import importance, openmp_threads

PREDICTION = "prediction"
SAMPLE_ROWS = 20_000  # rows of reference and of new data behind the Evidently report


class Predictor(Protocol):
    """What monitoring needs of a model: raw rows in, the served model's output frame out."""

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame: ...


class BoosterModel:
    """A LightGBM model text and its feature spec, predicting as the served model does (the backtest's
    models are never logged)."""

    def __init__(self, model_text: str, spec: FeatureSpec) -> None:
        import lightgbm as lgb

        self.booster = lgb.Booster(model_str=model_text)
        self.spec = spec

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return predictions_frame(self.booster.predict(model_matrix(frame, self.spec)), self.spec)


def monitored_prediction(predicted: pd.DataFrame, spec: FeatureSpec, index: pd.Index) -> pd.Series:
    """The monitored prediction: the number (regression) or the predicted label (classification)."""
    column = predicted[PREDICTION]
    values = column.astype("float64") if spec.task == "regression" else column.astype(str)
    return pd.Series(values.to_numpy(), index=index, name=PREDICTION)


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


def predict_file(uri: str, spec: FeatureSpec, model: ModelLocation) -> pd.DataFrame:
    """On a worker: the model's output for one file of a split. The baseline step predicts the splits
    file by file, so every worker thread takes a share of it, beside the steps running at the same time."""
    frame = pd.read_parquet(uri, columns=spec.input_columns)
    if frame.empty:  # a split's files can be empty: its rows are those of a time window
        return pd.DataFrame()
    with openmp_threads(1):
        return model.load().predict(frame).reset_index(drop=True)


def _read(files: list[str]) -> pd.DataFrame:
    frames = [pd.read_parquet(f) for f in files]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


class BaselineParts(BaseModel):
    """What the baseline holds besides the feature spec: profiles, the report's sample, calibration."""

    model_config = {"arbitrary_types_allowed": True}

    profiles: dict[str, ColumnProfile]
    sample: Any  # pandas DataFrame: the reference rows behind the Evidently report
    calibration: Calibration
    estimator: Estimator | None = None


def baseline_from_files(
    splits: dict[str, list[str]],
    train_predicted: list[pd.DataFrame],
    spec: FeatureSpec,
    model: ModelLocation,
    chunk: ChunkSize,
    seed: int,
    calibrate: bool = True,
) -> BaselineParts:
    """On a worker: `build_baseline` without the performance calibration (`performance_from_files`
    runs it beside this, on another worker), for the splits' files (in order) with each training
    file's `predict_file`; the model predicts what drift calibration needs of the other splits."""
    outputs = [p for p in train_predicted if len(p)]
    train_out = pd.concat(outputs, ignore_index=True) if outputs else pd.DataFrame()
    served = model.load()
    return build_baseline(
        _read(splits["train"]),
        train_out,
        _read(splits.get("valid", [])),
        _read(splits.get("test", [])),
        spec,
        served,
        served.unwrap_python_model().booster,
        chunk,
        seed,
        calibrate,
        performance=False,
    )


def performance_from_files(
    test_files: list[str], spec: FeatureSpec, model: ModelLocation, chunk: ChunkSize, seed: int
) -> PerformanceCalibration:
    """On a worker: the performance calibration of the test split's files (`calibrate_performance`)."""
    served = model.load()
    return calibrate_performance(_read(test_files), _predictor(served, spec), spec, chunk, seed)


def _predictor(model: Predictor, spec: FeatureSpec):
    def predict(rows: pd.DataFrame) -> pd.DataFrame:
        with openmp_threads(1):
            return model.predict(rows[spec.input_columns]).reset_index(drop=True)

    return predict


def build_baseline(  # noqa: PLR0913, PLR0917  # a worker call: each argument is shipped with it
    train: pd.DataFrame,
    train_out: pd.DataFrame,
    valid: pd.DataFrame,
    test: pd.DataFrame,
    spec: FeatureSpec,
    model: Predictor,
    booster,
    chunk: ChunkSize,
    seed: int,
    calibrate: bool = True,
    performance: bool = True,
) -> BaselineParts:
    """The monitoring baseline of one model from its splits (`train_out`: the model's output for the
    training rows; the other splits are predicted here, only the rows calibration uses):

    - the reference profile of every monitored column on the training split, and a row sample;
    - the drift calibration: chunks of the whole window (train, then validation and test, which the
      reference did not see) scored against the reference, for every monitored column;
    - with `performance`, the performance calibration on blocks of the test period (realized and
      estimated) and the estimator of performance without labels (`with_performance` adds one made
      elsewhere);
    - each input's share of the model's gain.
    `calibrate=False`: the profile and sample alone, as baselines were before calibration (the
    calibration benchmark, B12, measures the difference)."""
    monitored = kinds(spec)
    reference = _monitored_frame(train, train_out, spec)
    profiles = {
        column: profile_column(reference[column], column, kind)  # type: ignore[arg-type]
        for column, kind in monitored.items()
    }
    sample = reference.sample(n=min(SAMPLE_ROWS, len(reference)), random_state=seed).sort_index()
    sample = sample[[spec.time_column, *monitored]]
    if not calibrate:
        empty = Calibration(chunk=chunk.text, drift_chunks=0, drift_period="", drift={})
        return BaselineParts(profiles=profiles, sample=sample, calibration=empty)
    predict = _predictor(model, spec)
    splits = [train, valid, test]
    times = np.concatenate(
        [parse_time(part[spec.time_column]).to_numpy(dtype="datetime64[ns]") for part in splits if len(part)]
    )
    chunks = window_chunks(times, chunk)
    notes, drift = [], {}
    if len(chunks) >= MIN_CHUNKS:
        needed = np.unique(np.concatenate(chunks))  # positions in train, then valid, then test
        rows, outputs = [], []
        offset = 0
        for index, part in enumerate(splits):
            mine = needed[(needed >= offset) & (needed < offset + len(part))] - offset
            if len(mine):
                rows.append(part.iloc[mine])
                outputs.append(train_out.iloc[mine] if index == 0 else predict(part.iloc[mine]))
            offset += len(part)
        chosen = pd.concat(rows, ignore_index=True)
        scored = _monitored_frame(chosen, pd.concat(outputs, ignore_index=True), spec)
        position = np.full(len(times), -1)
        position[needed] = np.arange(len(needed))
        drift = drift_normals(scored, profiles, [position[c] for c in chunks], needed < len(train))
    else:
        notes.append(
            f"drift not calibrated: the window holds {len(chunks)} complete chunks of {chunk.describe()} "
            f"(at least {MIN_CHUNKS}); only Evidently's fixed thresholds apply"
        )
    calibration = Calibration(
        chunk=chunk.text,
        drift_chunks=len(chunks),
        drift_period=f"train, validation and test splits, {_day(times.min() if len(times) else None)} .. "
        f"{_day(times.max() if len(times) else None)}",
        drift=drift,
        importance=importance(booster, spec),
        notes=notes,
    )
    parts = BaselineParts(profiles=profiles, sample=sample, calibration=calibration)
    if performance:
        parts = with_performance(parts, calibrate_performance(test, predict, spec, chunk, seed), chunk)
    return parts


def with_performance(
    parts: BaselineParts, performance: PerformanceCalibration, chunk: ChunkSize
) -> BaselineParts:
    """The baseline with its performance calibration and estimator."""
    calibration = parts.calibration.model_copy(
        update={
            "performance_chunks": performance.chunks,
            "performance_period": performance.period,
            "performance_method": f"{performance.chunks} batches of {chunk.describe()} drawn from the test "
            f"period's {performance.blocks} blocks of {blocks_of(chunk).text} (block bootstrap)",
            "realized": performance.realized,
            "estimated": performance.estimated,
            "notes": parts.calibration.notes + performance.notes,
        }
    )
    return parts.model_copy(update={"calibration": calibration, "estimator": performance.estimator})


def _day(value) -> str:
    return "?" if value is None or pd.isna(value) else str(pd.Timestamp(value).date())


def _monitored_frame(rows: pd.DataFrame, predicted: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """The time column and every monitored column as the drift tests see it (prediction included)."""
    frame = rows.reset_index(drop=True)
    out = {spec.time_column: parse_time(frame[spec.time_column])}
    for column in kinds(spec):
        if column == PREDICTION:
            out[column] = monitored_prediction(predicted, spec, frame.index)
        elif column in frame.columns:
            out[column] = monitored_values(frame, column, spec)
    return pd.DataFrame(out)


class BatchSummary(BaseModel):
    """One pass over the new data: per-column summaries, bad values found, a sample and performance sums."""

    model_config = {"arbitrary_types_allowed": True}

    rows: int = 0
    columns: dict[str, ColumnSummary] = Field(default_factory=dict)
    not_numbers: dict[str, int] = Field(default_factory=dict)
    bad_times: int = 0
    bad_labels: str | None = None
    performance: Sums = Field(default_factory=Sums)
    sample: Any = None  # pandas DataFrame


def summarise_batch(
    client,
    frame,
    profiles: dict[str, ColumnProfile],
    spec: FeatureSpec,
    model: ModelLocation | CapturedOutput | None,
    estimator: Estimator | None = None,
    sample_rows: int = SAMPLE_ROWS,
) -> BatchSummary:
    """One pass over a dask.dataframe on the cluster: a summary per partition, merged on a worker.
    `model` None: no predictions (and no performance), the features and target only; a
    CapturedOutput: the predictions are the batch's own columns."""
    import dask

    shared = dask.delayed((profiles, estimator), pure=True)  # one copy in the graph, not one per partition
    parts = [
        dask.delayed(_summarise_part)(part, shared, spec, model, sample_rows, index)
        for index, part in enumerate(frame.to_delayed())
    ]
    return client.compute(dask.delayed(merge_summaries)(parts, sample_rows)).result()


class CapturedOutput(BaseModel):
    """The batch is a scoring output (`flows.transform`): these of its columns are the model's
    output for its rows, used instead of predicting again."""

    columns: tuple[str, ...]


class _Replay:
    """A Predictor that answers with the output captured next to the rows."""

    def __init__(self, frame: pd.DataFrame, columns: tuple[str, ...]) -> None:
        self.output = frame[list(columns)].reset_index(drop=True)

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        if len(frame) != len(self.output):  # never: the rows asked for are the partition's, in order
            raise RuntimeError("captured output and rows differ in length")
        return self.output


def _summarise_part(
    frame, shared, spec, model: ModelLocation | CapturedOutput | None, sample_rows: int, seed: int
):
    profiles, estimator = shared
    if isinstance(model, CapturedOutput):
        predictor: Predictor | None = _Replay(frame, model.columns)
    else:
        predictor = model.load() if model else None
    return summarise_partition(frame, profiles, spec, predictor, sample_rows, seed, estimator)


def summarise_partition(
    frame: pd.DataFrame,
    profiles: dict[str, ColumnProfile],
    spec: FeatureSpec,
    model: Predictor | None,
    sample_rows: int,
    seed: int,
    estimator: Estimator | None = None,
) -> BatchSummary:
    """One partition of the new data -> its summary (the target only if it is there); performance is
    realized on the rows with a label and estimated on every row (when there is an estimator)."""
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
    predicted = None
    if model is not None:
        with openmp_threads(1):
            predicted = model.predict(frame[spec.input_columns]).reset_index(drop=True)
        frame[PREDICTION] = monitored_prediction(predicted, spec, frame.index)
    labelled = spec.target in frame.columns
    watched = {
        c: p
        for c, p in profiles.items()
        if (c != spec.target or labelled) and (c != PREDICTION or model is not None)
    }
    summary.columns = summarise_frame(
        pd.DataFrame({c: monitored_values(frame, c, spec) for c in watched}), watched
    )
    if predicted is not None:
        if labelled:
            try:
                summary.performance = realized_sums(
                    frame[spec.target].reset_index(drop=True), predicted, spec
                )
            except ValueError as exc:  # labels the model never saw
                summary.bad_labels = str(exc)
        if estimator is not None:
            matrix = model_matrix(frame.reset_index(drop=True), spec)
            summary.performance = summary.performance + estimator.sums(matrix, predicted, spec)
    keep = [spec.time_column, *[c for c in profiles if c in frame.columns]]
    summary.sample = frame[keep].sample(n=min(sample_rows, len(frame)), random_state=seed)
    return summary


def merge_summaries(parts: list[BatchSummary], sample_rows: int) -> BatchSummary:
    """Partition summaries -> one (run on a worker, as the last task of the pass); the partitions'
    samples are thinned in proportion to their sizes, so the result is a uniform sample."""
    scored = [p for p in parts if p.columns]
    out = BatchSummary(
        rows=sum(p.rows for p in parts),
        columns=merge_frames([p.columns for p in scored]) if scored else {},
        bad_times=sum(p.bad_times for p in parts),
        bad_labels=next((p.bad_labels for p in parts if p.bad_labels), None),
    )
    for part in parts:
        for column, n in part.not_numbers.items():
            out.not_numbers[column] = out.not_numbers.get(column, 0) + n
        out.performance = out.performance + part.performance
    total = sum(p.rows for p in scored)
    samples = [
        p.sample.head(min(len(p.sample), round(sample_rows * p.rows / total)))
        for p in scored
        if p.sample is not None and total
    ]
    out.sample = pd.concat(samples, ignore_index=True) if samples else None
    return out


def summarise_frame_in_one(
    frame: pd.DataFrame,
    profiles: dict[str, ColumnProfile],
    spec: FeatureSpec,
    model: Predictor,
    estimator: Estimator | None,
) -> BatchSummary:
    """A batch held in memory, as one partition (the backtest's batches)."""
    return merge_summaries([summarise_partition(frame, profiles, spec, model, 0, 0, estimator)], 0)
