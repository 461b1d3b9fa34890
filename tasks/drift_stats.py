"""Data drift by Evidently's own rules, from a stored reference profile and one pass over new data.

Evidently 0.7 picks a test per column. With more than 1,000 reference rows: a numeric column with
more than 5 distinct values (reference and current together) gets the Wasserstein distance normed by
the reference's standard deviation; other numeric columns and categorical ones get the
Jensen-Shannon distance of their value frequencies. Both flag drift at a score >= 0.1. Missing and
infinite values are left out first.

Neither test needs the reference rows themselves: the Wasserstein distance is the area between the
two cumulative distributions, and the Jensen-Shannon distance needs value counts. So the baseline
keeps, per column, the reference's cumulative counts at its quantiles (exact counts of values
`<=` and `<` each grid point) and, when there are few distinct values, the exact value counts. New
data is summarised per partition (on the Dask workers) into the same counts at the same grid
points, plus the tails outside the reference's range; summaries add up. The area is then exact at
every grid point and interpolated linearly only inside a gap between two neighbouring reference
quantiles (1/`QUANTILES` of the reference each), and exact for discrete columns. Plain numpy and
pandas, no orchestrator: everything here is unit-tested against Evidently itself.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

QUANTILES = 2000  # grid points per numeric column (reference mass between two: 1/QUANTILES)
MAX_DISCRETE = 256  # up to this many distinct values, keep exact value counts
SMALL_REFERENCE = 1000  # Evidently switches to KS / chi-square / z tests at or below this
DEFAULT_THRESHOLD = 0.1

Kind = Literal["numeric", "categorical"]
Method = Literal["wasserstein", "jensenshannon"]


class ColumnProfile(BaseModel):
    """What the drift tests need to know about one reference column."""

    name: str
    kind: Kind
    count: int = Field(description="Values that are not missing or infinite.")
    missing: int = 0
    std: float | None = Field(default=None, description="Population standard deviation (numeric).")
    mean: float | None = None
    min: float | None = None
    max: float | None = None
    grid: list[float] | None = Field(default=None, description="Distinct reference quantiles (numeric).")
    le: list[int] | None = Field(default=None, description="Reference values <= each grid point.")
    lt: list[int] | None = Field(default=None, description="Reference values < each grid point.")
    gap_sums: list[float] | None = Field(
        default=None, description="Sum of the values strictly between grid points."
    )
    values: list[tuple[float | str, int]] | None = Field(
        default=None, description="Exact value counts, when there are at most MAX_DISCRETE distinct values."
    )


class ColumnSummary(BaseModel):
    """New data's counts for one column, on the reference's grid; summaries of partitions add up."""

    model_config = {"arbitrary_types_allowed": True}

    name: str
    count: int = 0
    missing: int = 0
    le: np.ndarray | None = None
    lt: np.ndarray | None = None
    gap_sums: np.ndarray | None = None
    below: float = 0.0  # sum of (grid[0] - v) over values below the reference's range
    above: float = 0.0  # sum of (v - grid[-1]) over values above it
    values: dict[float | str, int] | None = Field(default_factory=dict)  # None: too many distinct values


class ColumnDrift(BaseModel):
    """One column's verdict, as Evidently's ValueDrift would give it."""

    column: str
    kind: Kind
    method: Method
    score: float
    threshold: float
    drifted: bool
    reference_rows: int
    current_rows: int
    current_missing: int = 0


def finite(values: pd.Series) -> pd.Series:
    """Drop missing and infinite values, as Evidently does before every test."""
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        values = pd.to_numeric(values, errors="coerce").astype("float64")
        return values[np.isfinite(values.to_numpy())]
    return values.dropna()


def _value_counts(values: pd.Series, kind: Kind) -> dict[float | str, int] | None:
    counts = values.value_counts(sort=False)
    if len(counts) > MAX_DISCRETE and kind == "numeric":
        return None
    keys = counts.index.astype(str) if kind == "categorical" else counts.index.astype("float64")
    return {
        (k if kind == "categorical" else float(k)): int(n)
        for k, n in zip(keys, counts.to_numpy(), strict=True)
    }


def profile_column(values: pd.Series, name: str, kind: Kind) -> ColumnProfile:
    """The reference side of one column (run where the column is: a Dask worker)."""
    total = len(values)
    clean = finite(values) if kind == "numeric" else values.dropna().astype(str)
    profile = ColumnProfile(name=name, kind=kind, count=len(clean), missing=total - len(clean))
    counts = _value_counts(clean, kind)
    if counts is not None:
        profile.values = sorted(counts.items(), key=lambda kv: kv[0])  # type: ignore[arg-type]
    if kind == "numeric" and len(clean):
        array = np.sort(clean.to_numpy())
        grid = np.unique(np.quantile(array, np.linspace(0, 1, QUANTILES + 1)))
        profile.std = float(np.std(array))
        profile.mean = float(array.mean())
        profile.min, profile.max = float(array[0]), float(array[-1])
        profile.grid = grid.tolist()
        le, lt = np.searchsorted(array, grid, side="right"), np.searchsorted(array, grid, side="left")
        profile.le, profile.lt = le.tolist(), lt.tolist()
        profile.gap_sums = _gap_sums(array, le, lt).tolist()
    return profile


def _gap_sums(array: np.ndarray, le: np.ndarray, lt: np.ndarray) -> np.ndarray:
    """Sum of the sorted values strictly between each pair of neighbouring grid points."""
    prefix = np.concatenate([[0.0], np.cumsum(array)])
    return prefix[lt[1:]] - prefix[le[:-1]]


def summarise_column(values: pd.Series, profile: ColumnProfile) -> ColumnSummary:
    """The new data's side of one column, for one partition."""
    total = len(values)
    if profile.kind == "categorical":
        clean = values.dropna().astype(str)
        return ColumnSummary(
            name=profile.name,
            count=len(clean),
            missing=total - len(clean),
            values=_value_counts(clean, "categorical"),
        )
    clean = finite(values)
    summary = ColumnSummary(name=profile.name, count=len(clean), missing=total - len(clean))
    summary.values = _value_counts(clean, "numeric")
    if profile.grid:
        array = np.sort(clean.to_numpy())
        grid = np.asarray(profile.grid)
        summary.le = np.searchsorted(array, grid, side="right")
        summary.lt = np.searchsorted(array, grid, side="left")
        summary.gap_sums = _gap_sums(array, summary.le, summary.lt)
        summary.below = float((grid[0] - array[array < grid[0]]).sum())
        summary.above = float((array[array > grid[-1]] - grid[-1]).sum())
    return summary


def merge(a: ColumnSummary, b: ColumnSummary) -> ColumnSummary:
    """Two partitions' summaries of the same column -> one."""
    values: dict[float | str, int] | None = None
    if a.values is not None and b.values is not None:
        values = dict(a.values)
        for key, n in b.values.items():
            values[key] = values.get(key, 0) + n
        if len(values) > MAX_DISCRETE and isinstance(next(iter(values)), float):
            values = None
    return ColumnSummary(
        name=a.name,
        count=a.count + b.count,
        missing=a.missing + b.missing,
        le=None if a.le is None else a.le + b.le,
        lt=None if a.lt is None else a.lt + b.lt,
        gap_sums=None if a.gap_sums is None else a.gap_sums + b.gap_sums,
        below=a.below + b.below,
        above=a.above + b.above,
        values=values,
    )


def summarise_frame(frame: pd.DataFrame, profiles: dict[str, ColumnProfile]) -> dict[str, ColumnSummary]:
    return {name: summarise_column(frame[name], profile) for name, profile in profiles.items()}


def merge_frames(parts: list[dict[str, ColumnSummary]]) -> dict[str, ColumnSummary]:
    out = dict(parts[0])
    for part in parts[1:]:
        for name, summary in part.items():
            out[name] = merge(out[name], summary)
    return out


def _discrete_wasserstein(ref: dict, cur: dict, n_ref: int, n_cur: int) -> float:
    support = np.array(sorted(set(ref) | set(cur)), dtype="float64")
    f_ref = np.cumsum([ref.get(v, 0) for v in support]) / n_ref
    f_cur = np.cumsum([cur.get(v, 0) for v in support]) / n_cur
    return float(np.sum(np.abs(f_ref - f_cur)[:-1] * np.diff(support)))


def _cdf_area(grid: np.ndarray, le: np.ndarray, lt: np.ndarray, gap_sums: np.ndarray, n: int) -> np.ndarray:
    """The exact integral of a CDF over each gap between grid points: inside the gap (g, h) the CDF
    is (le(g) + #values <= x) / n, which integrates to (le(g) (h - g) + sum over the gap of (h - v)) / n."""
    width = np.diff(grid)
    inside = lt[1:] - le[:-1]
    return (le[:-1] * width + inside * grid[1:] - gap_sums) / n


def _gridded_wasserstein(profile: ColumnProfile, summary: ColumnSummary) -> float:
    """Area between the two CDFs. Outside the reference's range it is exact; in a gap between grid
    points where one CDF stays above the other it is exact too (the difference of their integrals);
    only in the few gaps where they clearly cross is it interpolated linearly."""
    assert profile.grid is not None and summary.le is not None and summary.lt is not None
    grid = np.asarray(profile.grid)
    n_ref, n_cur = profile.count, summary.count
    ref_le, ref_lt = np.asarray(profile.le), np.asarray(profile.lt)
    a = ref_le[:-1] / n_ref - summary.le[:-1] / n_cur  # F_ref - F_cur just after grid point i
    b = ref_lt[1:] / n_ref - summary.lt[1:] / n_cur  # ... and just before grid point i + 1
    exact = np.abs(
        _cdf_area(grid, ref_le, ref_lt, np.asarray(profile.gap_sums), n_ref)
        - _cdf_area(grid, summary.le, summary.lt, summary.gap_sums, n_cur)
    )
    width = np.diff(grid)
    # A sign change smaller than the reference's own mass in one gap is not a crossing: it is the
    # reference's step at a grid point (e.g. its maximum), and the exact difference applies.
    crossing = (a * b < 0) & (np.minimum(np.abs(a), np.abs(b)) > 1 / QUANTILES)
    linear = width * (a * a + b * b) / (2 * np.where(crossing, np.abs(a) + np.abs(b), 1.0))
    area = np.where(crossing, linear, exact)
    return float(area.sum() + (summary.below + summary.above) / n_cur)


def column_drift(
    profile: ColumnProfile, summary: ColumnSummary, threshold: float = DEFAULT_THRESHOLD
) -> ColumnDrift:
    """Evidently's verdict for one column (reference larger than SMALL_REFERENCE rows)."""
    if profile.count <= SMALL_REFERENCE:
        raise ValueError(
            f"column {profile.name!r}: the reference has {profile.count} values; Evidently's tests for "
            f"references of {SMALL_REFERENCE} or fewer need the rows themselves"
        )
    if summary.count == 0:
        raise ValueError(f"column {profile.name!r} has no values in the new data (all missing or infinite)")
    ref_values = dict(profile.values) if profile.values is not None else None
    cur_values = summary.values
    if profile.kind == "categorical":
        method: Method = "jensenshannon"
    elif ref_values is not None and cur_values is not None and len(set(ref_values) | set(cur_values)) <= 5:
        method = "jensenshannon"
    else:
        method = "wasserstein"
    if method == "jensenshannon":
        assert ref_values is not None and cur_values is not None
        from scipy.spatial import distance

        keys = sorted(set(ref_values) | set(cur_values), key=str)
        p = np.array([ref_values.get(k, 0) for k in keys]) / profile.count
        q = np.array([cur_values.get(k, 0) for k in keys]) / summary.count
        score = float(distance.jensenshannon(p, q))
    else:
        norm = max(float(profile.std or 0.0), 0.001)
        if ref_values is not None and cur_values is not None:
            score = _discrete_wasserstein(ref_values, cur_values, profile.count, summary.count) / norm
        else:
            score = _gridded_wasserstein(profile, summary) / norm
    return ColumnDrift(
        column=profile.name,
        kind=profile.kind,
        method=method,
        score=score,
        threshold=threshold,
        drifted=score >= threshold,
        reference_rows=profile.count,
        current_rows=summary.count,
        current_missing=summary.missing,
    )
