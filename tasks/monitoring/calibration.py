"""What a normal batch looks like, learned at training time: chunks, their scores and thresholds.

A fixed threshold (Evidently's 0.1 on every column) says nothing about batches of a given size from
given data: a week of hourly rows always differs from months of reference in its calendar columns,
and a small batch is noisier than a large one. So when the baseline is made, the training window is
cut into time-contiguous chunks of the size the model will be monitored at (`7D`, or a row count),
each chunk is scored exactly as a monitored batch will be (drift of every column and of the
predictions; the model's error is scored on batches drawn from the test period, `tasks.monitoring.performance`),
and each signal keeps the mean and standard deviation of its scores (`Normal`). A batch alarms on a signal when its score lies
beyond mean + k·sd (k = `DRIFT_SD`, 3 by default: NannyML's default band; for metrics where lower
is worse, mean - k·sd). k is chosen when the batch is judged, so one stored calibration serves
any sensitivity, and the backtest can compare them.

Chunks overlap: one starts every 1/`STRIDES` of the chunk size (each day, for `7D`), so a short
window still yields enough of them, and every weekly batch of the window is close to one of them.
At most `MAX_CHUNKS` are scored, evenly spread, which bounds the cost on long histories.
Plain numpy and pandas; runs on the Dask workers.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from tasks.monitoring.drift_stats import (
    SMALL_REFERENCE,
    ColumnProfile,
    column_array,
    column_drift,
    summarise_array,
    with_arrays,
    without,
)

STRIDES = 7  # a chunk starts every 1/STRIDES of the chunk size
MAX_CHUNKS = 100  # a mean and a standard deviation gain little from more (they overlap), and each costs
MIN_CHUNKS = 3  # fewer: a signal is not calibrated, and says so
DRIFT_SD = 3.0  # NannyML's default band: mean ± 3 standard deviations of the reference chunks
DEFAULT_CHUNK = "7D"

Direction = Literal["higher-is-worse", "lower-is-worse"]


class ChunkSize(BaseModel):
    """How big a monitored batch is: a period of time (`7D`, `12h`) or a number of rows (`500`)."""

    text: str
    period: timedelta | None = None
    rows: int | None = None

    def describe(self) -> str:
        return f"{self.rows:,} rows" if self.rows else f"{self.text} of time"


MIN_CHUNK_ROWS = 10  # fewer rows give no distribution worth scoring


def parse_chunk(text: str) -> ChunkSize:
    """`7D`, `1W`, `12h` (a pandas time delta) or a whole number of rows; ValueError otherwise."""
    text = str(text).strip()
    if text.isdigit():
        rows = int(text)
        if rows < MIN_CHUNK_ROWS:
            raise ValueError(
                f"a chunk of {rows} rows is too small to score a distribution (at least {MIN_CHUNK_ROWS})"
            )
        return ChunkSize(text=text, rows=rows)
    try:
        period = pd.Timedelta(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is neither a period (such as 7D, 1W, 12h) nor a number of rows") from exc
    if pd.isna(period) or period <= pd.Timedelta(0):
        raise ValueError(f"a chunk period must be positive, not {text!r}")
    return ChunkSize(text=text, period=period.to_pytimedelta())


def chunk_bounds(
    times: np.ndarray, chunk: ChunkSize, max_chunks: int = MAX_CHUNKS, overlap: bool = True
) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of the complete chunks of a frame sorted by `times`: overlapping (one
    starting every 1/STRIDES of the size), or with `overlap=False` one after the other."""
    n = len(times)
    if chunk.rows:
        if n < chunk.rows:
            return []
        stride = max(1, chunk.rows // STRIDES) if overlap else chunk.rows
        bounds = [(s, s + chunk.rows) for s in range(0, n - chunk.rows + 1, stride)]
    else:
        assert chunk.period is not None
        if n == 0:
            return []
        values = np.asarray(times, dtype="datetime64[ns]")
        distinct = np.unique(values)
        step = np.median(np.diff(distinct)) if len(distinct) > 1 else np.timedelta64(0, "ns")
        period = np.timedelta64(int(chunk.period.total_seconds() * 1e9), "ns")
        # The data's last row stands for one time step: with daily dates, a week ending on the last
        # date is complete.
        every = period // STRIDES if overlap else period
        starts = np.arange(values[0], values[-1] + step - period + np.timedelta64(1, "ns"), every)
        lows = np.searchsorted(values, starts, side="left")
        highs = np.searchsorted(values, starts + period, side="left")
        bounds = [(int(lo), int(hi)) for lo, hi in zip(lows, highs, strict=True) if hi > lo]
    if len(bounds) > max_chunks:
        picks = np.unique(np.linspace(0, len(bounds) - 1, max_chunks).round().astype(int))
        bounds = [bounds[i] for i in picks]
    return bounds


class Normal(BaseModel):
    """One signal's scores over the calibration chunks, and the threshold they give."""

    chunks: int
    mean: float
    sd: float
    min: float
    max: float
    direction: Direction = "higher-is-worse"
    scores: list[float] = Field(
        default_factory=list, description="Every chunk's score (drift: in time order; performance: per draw)."
    )

    def threshold(self, k: float) -> float:
        """mean + k·sd (mean - k·sd where lower is worse)."""
        return self.mean - k * self.sd if self.direction == "lower-is-worse" else self.mean + k * self.sd

    def alarms(self, value: float, k: float) -> bool:
        """Whether a batch's score lies beyond the threshold (strictly; NaN never alarms)."""
        if math.isnan(value):
            return False
        limit = self.threshold(k)
        return value < limit if self.direction == "lower-is-worse" else value > limit


def blocks_of(chunk: ChunkSize) -> ChunkSize:
    """The block a chunk is made of for the bootstrap: 1/STRIDES of it (a day of a 7D chunk)."""
    if chunk.rows:
        rows = max(1, chunk.rows // STRIDES)
        return ChunkSize(text=str(rows), rows=rows)
    assert chunk.period is not None
    return ChunkSize(text=f"{chunk.text}/{STRIDES}", period=chunk.period / STRIDES)


def normal_of(scores: list[float], direction: Direction = "higher-is-worse") -> Normal | None:
    """The chunk scores as a `Normal`, or None with fewer than MIN_CHUNKS finite scores."""
    finite = [float(s) for s in scores if s is not None and math.isfinite(s)]
    if len(finite) < MIN_CHUNKS:
        return None
    values = np.asarray(finite)
    return Normal(
        chunks=len(finite),
        mean=float(values.mean()),
        sd=float(values.std(ddof=1)),
        min=float(values.min()),
        max=float(values.max()),
        direction=direction,
        scores=finite,
    )


def drift_normals(
    frame: pd.DataFrame,
    profiles: dict[str, ColumnProfile],
    chunks: list[np.ndarray],
    in_reference: np.ndarray,
) -> dict[str, Normal | None]:
    """Each monitored column's drift score on every chunk (an array of row positions of `frame`, which
    holds the monitored values as the drift tests see them), with the same per-column tests as a batch.
    The chunk's rows that are part of the reference (`in_reference`) are taken out of it before the
    chunk is scored (`drift_stats.without`): it is judged as an unseen batch would be."""
    scores: dict[str, list[float]] = {name: [] for name in profiles}
    usable = {name: with_arrays(p) for name, p in profiles.items() if name in frame.columns and p.count > 0}
    arrays = {name: column_array(frame[name], p.kind) for name, p in usable.items()}  # converted once
    for rows in chunks:
        inside = rows[in_reference[rows]]
        for name, profile in usable.items():
            summary = summarise_array(arrays[name][rows], profile)
            rest = (
                without(profile, summarise_array(arrays[name][inside], profile)) if len(inside) else profile
            )
            if summary.count and rest.count > SMALL_REFERENCE:
                scores[name].append(column_drift(rest, summary).score)
    return {name: normal_of(values) for name, values in scores.items()}


def window_chunks(times: np.ndarray, chunk: ChunkSize) -> list[np.ndarray]:
    """The calibration chunks of a window whose rows are in any order: each an array of row positions,
    time-contiguous (at most MAX_CHUNKS, evenly spread)."""
    order = np.argsort(np.asarray(times, dtype="datetime64[ns]"), kind="stable")
    return [order[lo:hi] for lo, hi in chunk_bounds(np.asarray(times)[order], chunk)]


class Calibration(BaseModel):
    """Stored with the baseline: the chunk size and every signal's normal range."""

    chunk: str = Field(description="The monitored batch size the chunks were cut at, e.g. '7D' or '500'.")
    drift_chunks: int = Field(description="Chunks of the training window scored for drift.")
    drift_period: str = Field(description="Which data the drift chunks came from.")
    drift: dict[str, Normal | None] = Field(
        description="Per monitored column (features, target, prediction): drift scores of the chunks."
    )
    performance_chunks: int = Field(
        default=0, description="Batches drawn from the test period's blocks and scored for performance."
    )
    performance_period: str = ""
    performance_method: str = ""
    realized: dict[str, Normal | None] = Field(
        default_factory=dict, description="The model's metrics on chunks of its test period."
    )
    estimated: dict[str, Normal | None] = Field(
        default_factory=dict, description="The estimated metrics (no labels used) on the same chunks."
    )
    importance: dict[str, float] = Field(
        default_factory=dict,
        description="Share of the model's total gain per input column (calendar parts count toward the "
        "time column); sums to 1.",
    )
    notes: list[str] = Field(default_factory=list, description="What could not be calibrated, and why.")

    def size(self) -> ChunkSize:
        return parse_chunk(self.chunk)
