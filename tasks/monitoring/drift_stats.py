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
FEW_VALUES = 5  # a numeric column with this few distinct values is compared as categories
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


def column_array(values: pd.Series, kind: Kind) -> np.ndarray:
    """A column as the tests see it: float64 with NaN for every missing or infinite value (numeric,
    as Evidently drops them before every test), or text objects with None for missing (categorical)."""
    if kind == "categorical":
        text = values.astype(str).to_numpy(dtype=object)
        text[values.isna().to_numpy()] = None
        return text
    if pd.api.types.is_bool_dtype(values.dtype):
        numbers = values.astype("float64").to_numpy()
    else:
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64")
    return np.where(np.isfinite(numbers), numbers, np.nan)


def _present(values: np.ndarray, kind: Kind) -> np.ndarray:
    """The values that are there (numeric: finite, sorted; categorical: not None)."""
    if kind == "categorical":
        return values[pd.notna(values)]
    return np.sort(values[~np.isnan(values)])


def _counts(present: np.ndarray, kind: Kind) -> dict[float | str, int] | None:
    """Exact value counts; None for a numeric column with more than MAX_DISCRETE distinct values."""
    if kind == "categorical":
        counts = pd.Series(present, dtype=object).value_counts(sort=False)
        return {str(k): int(n) for k, n in counts.items()}
    if not len(present):
        return {}
    starts = np.flatnonzero(np.concatenate([[True], present[1:] != present[:-1]]))  # present is sorted
    if len(starts) > MAX_DISCRETE:
        return None
    sizes = np.diff(np.append(starts, len(present)))
    return {float(present[i]): int(n) for i, n in zip(starts, sizes, strict=True)}


def profile_column(values: pd.Series, name: str, kind: Kind) -> ColumnProfile:
    """The reference side of one column (run where the column is: a Dask worker)."""
    array = column_array(values, kind)
    present = _present(array, kind)
    profile = ColumnProfile(name=name, kind=kind, count=len(present), missing=len(array) - len(present))
    counts = _counts(present, kind)
    if counts is not None:
        profile.values = sorted(counts.items(), key=lambda kv: kv[0])
    if kind == "numeric" and len(present):
        grid = np.unique(np.quantile(present, np.linspace(0, 1, QUANTILES + 1)))
        profile.std = float(np.std(present))
        profile.mean = float(present.mean())
        profile.min, profile.max = float(present[0]), float(present[-1])
        profile.grid = grid.tolist()
        le, lt = np.searchsorted(present, grid, side="right"), np.searchsorted(present, grid, side="left")
        profile.le, profile.lt = le.tolist(), lt.tolist()
        profile.gap_sums = _gap_sums(present, le, lt).tolist()
    return profile


def _gap_sums(array: np.ndarray, le: np.ndarray, lt: np.ndarray) -> np.ndarray:
    """Sum of the sorted values strictly between each pair of neighbouring grid points."""
    prefix = np.concatenate([[0.0], np.cumsum(array)])
    return prefix[lt[1:]] - prefix[le[:-1]]


def summarise_column(values: pd.Series, profile: ColumnProfile) -> ColumnSummary:
    """The new data's side of one column, for one partition."""
    return summarise_array(column_array(values, profile.kind), profile)


def summarise_array(values: np.ndarray, profile: ColumnProfile) -> ColumnSummary:
    """`summarise_column` for a column already in the tests' form (`column_array`): calibration
    converts each column once and summarises slices of it."""
    present = _present(values, profile.kind)
    summary = ColumnSummary(
        name=profile.name,
        count=len(present),
        missing=len(values) - len(present),
        values=_counts(present, profile.kind),
    )
    if profile.kind == "numeric" and profile.grid is not None and len(profile.grid):
        grid = np.asarray(profile.grid)
        summary.le = np.searchsorted(present, grid, side="right")
        summary.lt = np.searchsorted(present, grid, side="left")
        summary.gap_sums = _gap_sums(present, summary.le, summary.lt)
        summary.below = float((grid[0] - present[present < grid[0]]).sum())
        summary.above = float((present[present > grid[-1]] - grid[-1]).sum())
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


def without(profile: ColumnProfile, part: ColumnSummary) -> ColumnProfile:
    """The reference profile less some of its own rows (summarised on its grid): what the reference
    would be without them. Calibration scores a chunk of the training split against the rest of the
    reference, as a new batch is scored against all of it: a chunk compared with a reference it is
    part of looks closer to it than an independent batch would."""
    if part.count == 0 and part.missing == 0:
        return profile
    values = None
    if profile.values is not None:
        taken = part.values or {}
        values = [(v, n - taken.get(v, 0)) for v, n in profile.values]
        values = [(v, n) for v, n in values if n > 0]
    update: dict = {
        "count": profile.count - part.count,
        "missing": profile.missing - part.missing,
        "values": values,
    }
    if profile.grid is not None and part.le is not None and part.lt is not None and part.gap_sums is not None:
        update |= {
            "le": np.asarray(profile.le) - part.le,
            "lt": np.asarray(profile.lt) - part.lt,
            "gap_sums": np.asarray(profile.gap_sums) - part.gap_sums,
        }
    return profile.model_copy(update=update)  # arrays, not lists: a working copy, never stored


def with_arrays(profile: ColumnProfile) -> ColumnProfile:
    """A working copy whose grid counts are numpy arrays (never stored): calibration scores hundreds
    of chunks against one profile, and converting its lists for each would cost more than the tests."""
    if profile.grid is None:
        return profile
    return profile.model_copy(
        update={name: np.asarray(getattr(profile, name)) for name in ("grid", "le", "lt", "gap_sums")}
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
        - _cdf_area(grid, summary.le, summary.lt, np.asarray(summary.gap_sums), n_cur)
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
    elif (
        ref_values is not None
        and cur_values is not None
        and len(set(ref_values) | set(cur_values)) <= FEW_VALUES
    ):
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
