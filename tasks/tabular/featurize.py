"""Feature building, in plain pandas, shared by processing, training and the served model.

One function turns raw rows into the model's matrix wherever it runs (a Dask partition, a training
worker, `mlflow.pyfunc` at serving time), so training and serving cannot drift apart. Every feature
is computed from its own row only: nothing looks at other rows, least of all future ones.

This module imports nothing from the project: MLflow copies it into each logged model.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from pydantic import BaseModel, Field

BINARY = 2  # classes of a binary target
TIME_PARTS = {
    "hour": lambda t: t.dt.hour,
    "dayofweek": lambda t: t.dt.dayofweek,
    "dayofyear": lambda t: t.dt.dayofyear,
    "month": lambda t: t.dt.month,
}

Task = Literal["regression", "binary", "multiclass"]


class FeatureSpec(BaseModel):
    """What the model sees, learned from the training split only."""

    target: str
    time_column: str
    task: Task
    numeric: list[str] = Field(description="Raw numeric columns used as they are.")
    categorical: dict[str, list[str]] = Field(description="Text columns and the categories seen in training.")
    time_parts: list[str] = Field(description="Calendar parts derived from the time column.")
    classes: list[str] | None = Field(default=None, description="Target labels, for classifiers.")

    @property
    def feature_names(self) -> list[str]:
        return [*self.numeric, *self.categorical, *(f"{self.time_column}_{p}" for p in self.time_parts)]

    @property
    def input_columns(self) -> list[str]:
        """The raw columns a caller passes to the served model."""
        return [self.time_column, *self.numeric, *self.categorical]


def parse_time(values: pd.Series) -> pd.Series:
    """Times as naive datetimes; times with a zone or offset are converted to UTC (one clock for
    every row, comparable with the naive bounds of splits and windows). Unparseable: NaT."""
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_dtype(values.dtype):
        return values
    parsed = pd.to_datetime(values, errors="coerce", utc=True)
    return parsed.dt.tz_localize(None)


def model_matrix(frame: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """Raw rows -> the model's features, in a fixed order, with fixed categories."""
    missing = [c for c in spec.input_columns if c not in frame.columns]
    if missing:
        raise KeyError(f"input is missing columns {missing}; the model needs {spec.input_columns}")
    out = pd.DataFrame(index=frame.index)
    for column in spec.numeric:
        out[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column, categories in spec.categorical.items():
        out[column] = pd.Categorical(frame[column].astype("string"), categories=categories)
    times = parse_time(frame[spec.time_column])
    for part in spec.time_parts:
        out[f"{spec.time_column}_{part}"] = TIME_PARTS[part](times).astype("float64")
    out.columns = matrix_names(spec)
    return out


_NOT_IN_LIGHTGBM_NAMES = re.compile(r'[",:\[\]{}]')


def matrix_names(spec: FeatureSpec) -> list[str]:
    """The feature names LightGBM gets, in `feature_names` order. Its JSON model format refuses `"`,
    `,`, `:`, brackets and braces in a name: those become `_`, and a name that then repeats another
    gets its position. The spec keeps the user's names; reports use them."""
    names: list[str] = []
    for position, name in enumerate(spec.feature_names):
        safe = _NOT_IN_LIGHTGBM_NAMES.sub("_", name)
        names.append(f"{safe}_{position}" if safe in names else safe)
    return names


def as_labels(values: pd.Series) -> pd.Series:
    """Class labels as text; whole numbers read from CSV as floats become '1', not '1.0'."""
    if pd.api.types.is_float_dtype(values.dtype):
        finite = values.dropna()
        if (finite == finite.round()).all():
            return values.astype("Int64").astype("string")
    return values.astype("string")


def encode_target(values: pd.Series, spec: FeatureSpec) -> np.ndarray:
    """Regression: floats. Classification: class indices (labels unseen in training raise)."""
    if spec.task == "regression":
        return pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64")
    assert spec.classes is not None
    labels = as_labels(values)
    codes = pd.Categorical(labels, categories=spec.classes).codes
    if (codes < 0).any():
        unseen = sorted(set(labels[codes < 0].dropna().unique()))[:5]
        raise ValueError(f"target labels not seen in training: {unseen}")
    return codes.astype("int32")


def predictions_frame(output: ArrayLike, spec: FeatureSpec) -> pd.DataFrame:
    """Booster output -> `prediction` (+ `probability_<label>` per class for classifiers)."""
    raw = np.asarray(output)
    if spec.task == "regression":
        return pd.DataFrame({"prediction": raw})
    assert spec.classes is not None
    proba = np.column_stack([1 - raw, raw]) if spec.task == "binary" else np.asarray(raw)
    frame = pd.DataFrame({"prediction": np.asarray(spec.classes, dtype=object)[proba.argmax(axis=1)]})
    for index, label in enumerate(spec.classes):
        frame[f"probability_{label}"] = proba[:, index]
    return frame
