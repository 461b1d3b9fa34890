"""Late labels (Model Monitor's ground-truth merge): labels that arrive after the predictions, joined
to the captured predictions (`flows.transform`'s outputs) by inference id, and the model's realized
metric per time window for the version that made each prediction, judged against that version's
calibrated range (the `performance` signal the monitor uses).

Nothing is dropped without a word: a label without an id or a value, an id given twice, an id that
matches no prediction, or a value the version cannot be scored on (text for a regression, a class
it never saw) becomes a row of the bad-labels table, with its problem, and is counted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from tasks.monitoring.calibration import Calibration
from tasks.monitoring.performance import realized_sums
from tasks.monitoring.policies import Signal, SignalSettings
from tasks.monitoring.verdict import performance_signal
from tasks.steps.errors import DataValidationError
from tasks.steps.transform import (
    INFERENCE_ID,
    MODEL_VERSION_COLUMN,
    PREDICTION_COLUMN,
    RECORD_FILE,
    SCORED_AT_COLUMN,
    read_record,
)
from tasks.tabular.featurize import FeatureSpec, as_labels

LABEL = "label"  # the joined data's label column, whatever the label file calls it
ROW = "label_row"  # the label's row in the label file (1 = the first row after a CSV header)
WINDOW_START = "window_start"
PROBLEM = "problem"

MISSING_ID = "no id"
MISSING_LABEL = "no label"
DUPLICATED = "id given again with the same label (the first is used)"
CONFLICTING = "id given more than once with different labels (none is used)"
UNMATCHED = "no captured prediction has this id"
TOO_OLD = "its prediction is older than --within"
NOT_A_NUMBER = "not a finite number (the model is a regression)"
UNSEEN_CLASS = "a class the version was not trained on"


class CapturedPredictions(BaseModel):
    """The predictions of one model found under a folder: its scoring outputs and their rows."""

    model_config = {"arbitrary_types_allowed": True}

    outputs: list[str] = Field(description="The scoring outputs read (folders with a scoring record).")
    frame: pd.DataFrame
    rescored: int = Field(default=0, description="Rows captured twice by one version: the latest is used.")


def scoring_outputs(folder: Path) -> list[Path]:
    """Every scoring output at or under `folder` (a folder holding a scoring record), in name order;
    hidden folders (a transform's staging) are skipped."""
    found = [folder] if (folder / RECORD_FILE).is_file() else []
    for record in sorted(folder.rglob(RECORD_FILE)):
        parent = record.parent
        relative = parent.relative_to(folder).parts
        if parent != folder and not any(p.startswith(".") for p in relative):
            found.append(parent)
    return found


def captured_predictions(folder: Path, model_name: str, time_column: str) -> CapturedPredictions:
    """The predictions `model_name` made in the scoring outputs under `folder`: id, version, scoring
    time, the time column asked for, prediction and class probabilities. Only those columns are read."""
    import pyarrow.parquet as pq

    outputs, frames = [], []
    root = folder.resolve()
    for output in scoring_outputs(folder):
        record = read_record(output)
        parts = sorted(output.glob("part-*.parquet"))
        outside = [p for p in [output, *parts] if not p.resolve().is_relative_to(root)]
        if outside:  # a link out of the folder the data-access check allowed
            raise DataValidationError(
                str(outside[0]), "resolves outside --predictions (a link?); nothing was read"
            )
        if record is None or record.model_name != model_name or not parts:
            continue
        names = pq.read_schema(parts[0]).names
        wanted = [INFERENCE_ID, MODEL_VERSION_COLUMN, SCORED_AT_COLUMN, PREDICTION_COLUMN, time_column]
        columns = list(dict.fromkeys([*wanted, *(c for c in names if c.startswith("probability_"))]))
        missing = [c for c in columns if c not in names]
        if missing:
            raise KeyError(f"{output} has no column {missing[0]!r}")
        frames.append(pd.concat([pd.read_parquet(p, columns=columns) for p in parts], ignore_index=True))
        outputs.append(str(output))
    if not frames:
        return CapturedPredictions(outputs=[], frame=pd.DataFrame())
    frame = pd.concat(frames, ignore_index=True)
    frame[INFERENCE_ID] = frame[INFERENCE_ID].astype(str)
    frame[MODEL_VERSION_COLUMN] = frame[MODEL_VERSION_COLUMN].astype(str)
    frame = frame.sort_values(SCORED_AT_COLUMN, kind="stable")
    kept = frame.drop_duplicates([INFERENCE_ID, MODEL_VERSION_COLUMN], keep="last")
    return CapturedPredictions(
        outputs=outputs, frame=kept.reset_index(drop=True), rescored=len(frame) - len(kept)
    )


def bad_rows(frame: pd.DataFrame, problem: str, version: str = "") -> pd.DataFrame:
    """Label rows with their problem, as the bad-labels table lists them."""
    return pd.DataFrame(
        {
            ROW: frame[ROW].to_numpy(),
            INFERENCE_ID: frame[INFERENCE_ID].astype("string").to_numpy(),
            LABEL: frame[LABEL].astype("string").to_numpy(),
            MODEL_VERSION_COLUMN: version,
            PROBLEM: problem,
        }
    )


def usable_labels(labels: pd.DataFrame) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """The labels one id each (columns ROW, INFERENCE_ID, LABEL), and the rows left out: no id, no
    label, an id given twice (the same label: the first is used; different ones: none is)."""
    bad = []
    no_id = labels[INFERENCE_ID].isna() | (labels[INFERENCE_ID].astype("string").str.strip() == "")
    bad.append(bad_rows(labels[no_id], MISSING_ID))
    labels = labels[~no_id]
    no_label = labels[LABEL].isna()
    bad.append(bad_rows(labels[no_label], MISSING_LABEL))
    labels = labels[~no_label]
    repeated = labels[INFERENCE_ID].duplicated(keep=False)
    if repeated.any():
        text = labels[LABEL].astype("string")
        distinct = text[repeated].groupby(labels.loc[repeated, INFERENCE_ID]).transform("nunique")
        conflicting = pd.Series(False, index=labels.index)
        conflicting[distinct.index] = distinct > 1
        again = labels[INFERENCE_ID].duplicated(keep="first") & ~conflicting
        bad.append(bad_rows(labels[conflicting], CONFLICTING))
        bad.append(bad_rows(labels[again], DUPLICATED))
        labels = labels[~conflicting & ~again]
    return labels.reset_index(drop=True), bad


def scorable(labels: pd.Series, spec: FeatureSpec) -> np.ndarray:
    """Which labels the version can be scored on: finite numbers for a regression, a class it was
    trained on for a classifier."""
    if spec.task == "regression":
        numbers = pd.to_numeric(labels, errors="coerce").to_numpy(dtype="float64")
        return np.isfinite(numbers)
    return as_labels(labels).isin(spec.classes or []).to_numpy(dtype=bool)


def window_of(times: pd.Series, window: pd.Timedelta) -> pd.Series:
    """The start of each row's window: windows of `window` one after another from the midnight
    (UTC) before the earliest time, so the first window starts with the data."""
    try:
        stamps = pd.to_datetime(times, utc=True)
    except (ValueError, TypeError):  # one format in the column is the rule; several, the exception
        try:
            stamps = pd.to_datetime(times, utc=True, format="mixed")
        except (ValueError, TypeError) as exc:
            raise DataValidationError(
                "the predictions", "the time column holds values that are not times", str(times.name)
            ) from exc
    origin = stamps.min().floor("D")
    return origin + ((stamps - origin) // window) * window


class WindowQuality(BaseModel):
    """One version's realized metrics on the labelled predictions of one window, and its signal."""

    version: str
    start: str
    end: str
    rows: int
    metrics: dict[str, float]
    signal: Signal | None = Field(default=None, description="None: too few labels to judge.")

    @property
    def judged(self) -> bool:
        return self.signal is not None and self.signal.value is not None and self.signal.threshold is not None

    @property
    def dropped(self) -> bool:
        return self.signal is not None and self.signal.fired


def window_quality(
    joined: pd.DataFrame,
    version: str,
    spec: FeatureSpec,
    calibration: Calibration | None,
    window: pd.Timedelta,
    min_rows: int,
    settings: SignalSettings,
) -> list[WindowQuality]:
    """Per window (in time order) of one version's joined rows: its realized metrics, and, with at
    least `min_rows` labels, the performance signal against the version's calibrated range."""
    out = []
    for start, rows in joined.groupby(WINDOW_START, sort=True):
        sums = realized_sums(rows[LABEL], rows.reset_index(drop=True), spec)
        realized = {k: float(v) for k, v in sums.realized(spec.task).items()}
        signal = (
            performance_signal(realized, {}, len(rows), spec, calibration, settings)
            if len(rows) >= min_rows
            else None
        )
        begin = pd.Timestamp(cast(Any, start))
        out.append(
            WindowQuality(
                version=version,
                start=begin.isoformat(),
                end=(begin + window).isoformat(),
                rows=len(rows),
                metrics={k: (v if math.isfinite(v) else math.nan) for k, v in realized.items()},
                signal=signal,
            )
        )
    return out


def join_labels(
    labels: pd.DataFrame, predictions: pd.DataFrame, within: pd.Timedelta | None, now: pd.Timestamp
) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """Each usable label joined to every captured prediction of its id (one per version that made
    one), and the label rows left out, with their problem. `within`: predictions scored longer ago
    than that are not joined."""
    usable, bad = usable_labels(labels)
    if within is not None:
        recent = pd.to_datetime(predictions[SCORED_AT_COLUMN], utc=True) >= now - within
        older = set(predictions.loc[~recent, INFERENCE_ID]) - set(predictions.loc[recent, INFERENCE_ID])
        too_old = usable[INFERENCE_ID].isin(older)
        bad.append(bad_rows(usable[too_old], TOO_OLD))
        usable, predictions = usable[~too_old], predictions[recent]
    joined = usable.merge(predictions, on=INFERENCE_ID, how="inner")
    bad.append(bad_rows(usable[~usable[INFERENCE_ID].isin(joined[INFERENCE_ID])], UNMATCHED))
    return joined, bad


def bad_table(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The bad-label rows of every check, in the label file's order."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=[ROW, INFERENCE_ID, LABEL, MODEL_VERSION_COLUMN, PROBLEM])
    return pd.concat(parts, ignore_index=True).sort_values(ROW, kind="stable").reset_index(drop=True)


class Versions(BaseModel):
    """What judging a version's predictions needs: its feature spec and calibrated ranges."""

    specs: dict[str, FeatureSpec]
    calibrations: dict[str, Calibration | None]


def judge_windows(  # the data, the versions and the three knobs
    joined: pd.DataFrame,
    versions: Versions,
    time_column: str,
    window: pd.Timedelta,
    min_rows: int,
    settings: SignalSettings,
) -> tuple[pd.DataFrame, list[WindowQuality], list[pd.DataFrame]]:
    """The joined rows each version can be scored on (with their window), every version's windows
    in time order, and the rows it cannot be scored on (a bad-label table part per version)."""
    windows: list[WindowQuality] = []
    kept, bad = [], []
    joined = joined.assign(**{WINDOW_START: window_of(joined[time_column], window)})
    for version, spec in versions.specs.items():
        rows = joined[joined[MODEL_VERSION_COLUMN] == version]
        ok = scorable(rows[LABEL], spec)
        bad.append(bad_rows(rows[~ok], NOT_A_NUMBER if spec.task == "regression" else UNSEEN_CLASS, version))
        kept.append(rows[ok])
        windows += window_quality(
            rows[ok], version, spec, versions.calibrations.get(version), window, min_rows, settings
        )
    return pd.concat(kept, ignore_index=True), windows, bad
