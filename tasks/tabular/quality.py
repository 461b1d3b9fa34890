"""The data quality step (SageMaker's QualityCheckStep): a constraints baseline, and violations against it.

At training time the step profiles the input table in one pass on the Dask workers (per column: kind,
missing share, range, sign, categories) and stores that as `quality/constraints.json` in its MLflow
run; the registered version points at it (`quality.uri`). New data — a retrain's input, a monitored
batch — is checked against the champion's constraints before anything else. Some rules need no
baseline and always apply: a column with no values, infinite numbers, duplicated keys, times that
do not parse. Violations come out as a table (column, rule, observed, expected); by switch they fail
the run or only warn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from tasks.steps import CacheConfig, ParamGroup, RetryPolicy, current_step, markdown, processing_step
from tasks.steps.compute import dask_client
from tasks.steps.errors import DataValidationError, read_failure
from tasks.steps.model import find_champion
from tasks.steps.refs import DatasetRef, file_urls
from tasks.steps.tags import (
    QUALITY_AGAINST_TAG,
    QUALITY_RUN_TAG,
    QUALITY_TAG,
    QUALITY_VIOLATIONS_TAG,
    RAW_DIGEST_TAG,
)
from tasks.tabular.featurize import parse_time

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

ARTIFACT_DIR = "quality"
MAX_CATEGORIES = 1000


OnViolation = Literal["fail", "fail-on-broken", "warn"]
ON_VIOLATION_HELP = (
    "fail: any violation stops the run; fail-on-broken: broken data stops it (missing columns, wrong "
    "types, empty or infinite values, bad dates, duplicate keys, more missing values, negatives where "
    "there were none) but data that moved (values beyond the range, unseen categories) only warns, "
    "as when retraining on new data; warn: report and go on."
)
MOVED = frozenset({"range", "categories"})  # the data moved; not broken


class QualityRules(ParamGroup):
    """How strict the data-quality check is, and what a violation does."""

    on_quality_violation: OnViolation = Field(default="fail", description=ON_VIOLATION_HELP)
    missing_tolerance: float = Field(
        default=0.0, ge=0, le=1, description="Allowed rise of a column's missing share over the baseline's."
    )
    range_tolerance: float = Field(
        default=0.5,
        ge=0,
        description="Allowed distance beyond the baseline's min/max, as a share of its range.",
    )
    max_rows: int = Field(
        default=100_000_000, ge=1, description="More rows than this are refused (whatever the policy)."
    )
    max_columns: int = Field(
        default=2_000, ge=1, description="More columns than this are refused, before the data is read."
    )
    max_category_length: int = Field(
        default=1_000,
        ge=1,
        description="A text value longer than this (characters) is refused: categories are labels, "
        "and they travel into constraints, reports and the model.",
    )


class ColumnStats(BaseModel):
    """One column of one partition (or of the table, once merged)."""

    rows: int = 0
    missing: int = 0
    not_numbers: int = 0
    not_times: int = 0
    infinite: int = 0
    negative: int = 0
    min: float | None = None
    max: float | None = None
    values: list[str] | None = Field(
        default=None, description="Distinct text values, up to MAX_CATEGORIES+1."
    )
    not_number_examples: list[str] = Field(
        default_factory=list, description="A few values that are not numbers."
    )
    longest: int = Field(default=0, description="Characters in the longest value that is not a number.")

    @property
    def kind(self) -> str:
        if self.rows == self.missing:
            return "empty"
        return "numeric" if self.not_numbers == 0 else "text"

    def merge(self, other: ColumnStats) -> ColumnStats:
        values = None
        if self.values is not None or other.values is not None:
            values = sorted(set(self.values or []) | set(other.values or []))[: MAX_CATEGORIES + 1]
        return ColumnStats(
            rows=self.rows + other.rows,
            missing=self.missing + other.missing,
            not_numbers=self.not_numbers + other.not_numbers,
            not_times=self.not_times + other.not_times,
            infinite=self.infinite + other.infinite,
            negative=self.negative + other.negative,
            min=_pick(min, self.min, other.min),
            max=_pick(max, self.max, other.max),
            values=values,
            not_number_examples=sorted(set(self.not_number_examples) | set(other.not_number_examples))[:5],
            longest=max(self.longest, other.longest),
        )


def _pick(fn, a: float | None, b: float | None) -> float | None:
    present = [v for v in (a, b) if v is not None]
    return fn(present) if present else None


class ColumnConstraint(BaseModel):
    kind: Literal["numeric", "text", "time", "empty"]
    missing_share: float
    min: float | None = None
    max: float | None = None
    non_negative: bool = False
    categories: list[str] | None = None


class Constraints(BaseModel):
    """constraints.json: the baseline new data is held to."""

    source: DatasetRef
    rows: int
    time_column: str
    columns: dict[str, ColumnConstraint]


class ConstraintsRef(BaseModel):
    """A stored baseline: which model version's, and where (an MLflow run's artifacts are immutable)."""

    model_name: str
    version: str
    run_id: str
    uri: str


class Violation(BaseModel):
    column: str | None
    rule: str
    observed: str = Field(description="Counts and bounds: what an error message may say.")
    expected: str
    examples: str = Field(
        default="",
        description="Values from the data: shown (escaped) in the violations table, never in errors or records.",
    )


class QualityReport(BaseModel):
    """The step's output: the input's own constraints (the next baseline) and what it broke."""

    uri: str
    run_id: str
    data: DatasetRef
    checked_against: ConstraintsRef | None
    violations: list[Violation]
    rows: int


# --- worker side ----------------------------------------------------------------------------------


def partition_stats(frame: pd.DataFrame, time_column: str) -> dict[str, ColumnStats]:
    """Counts and bounds of one partition; runs on a Dask worker."""
    import numpy as np
    import pandas as pd

    stats = {}
    for column in frame.columns:
        values = frame[column]
        present = values.notna()
        numbers = (
            values.astype("float64")
            if pd.api.types.is_bool_dtype(values)
            else pd.to_numeric(values, errors="coerce")
        )
        not_numbers = int((present & numbers.isna()).sum())
        finite = numbers[np.isfinite(numbers)]
        text, examples, longest = None, [], 0
        if not_numbers:
            distinct = values[present & numbers.isna()].astype(str).unique()
            longest = int(max(map(len, distinct)))
            text = sorted(map(str, values[present].unique()))[: MAX_CATEGORIES + 1]
            examples = sorted(distinct[:5])
        not_times = 0
        if column == time_column:
            not_times = int((present & parse_time(values).isna()).sum())
        stats[column] = ColumnStats(
            rows=len(values),
            missing=int((~present).sum()),
            not_numbers=not_numbers,
            not_times=not_times,
            infinite=int(np.isinf(numbers).sum()),
            negative=int((finite < 0).sum()),
            min=float(finite.min()) if len(finite) else None,
            max=float(finite.max()) if len(finite) else None,
            values=text,
            not_number_examples=examples,
            longest=longest,
        )
    return stats


def key_hashes(frame: pd.DataFrame, key: list[str]) -> pd.Series:
    import pandas as pd

    # The columns' own types: text copies of them took more memory than the partition itself.
    return pd.util.hash_pandas_object(frame[key], index=False)


def duplicated_count(hashes: pd.Series) -> pd.Series:
    """Repeats within one partition of key hashes; after a shuffle on the hash, all repeats of a key
    are in the same partition."""
    import pandas as pd

    return pd.Series([int(hashes.duplicated().sum())], dtype="int64")


def table_stats(data: DatasetRef, time_column: str, key: list[str]) -> tuple[dict[str, ColumnStats], int]:
    """Every column's stats and the number of duplicated keys, in one pass on the workers. CSV is read
    as text, so a stray value anywhere in a column is counted, not a reason for Dask to stop."""
    import dask
    import dask.dataframe as dd
    import pandas as pd

    dask_client()  # the cluster runs the computes below
    if data.format == "csv":
        frame = dd.read_csv(file_urls(data.uri), dtype=str, blocksize="64MB", keep_default_na=True)
    else:
        frame = dd.read_parquet(data.uri)
    parts = [dask.delayed(partition_stats)(p, time_column) for p in frame.to_delayed()]
    duplicates = 0
    try:
        if key:
            # Shuffled on the hash, not gathered: the keys of a table larger than a worker's memory
            # never meet in one place (a `nunique` did, and overran 512 MiB workers on 2 GiB of data).
            # One partition holds every key already: no shuffle (150 ms of a 17k-row check here).
            hashes = frame.map_partitions(key_hashes, key, meta=("key", "uint64")).to_frame()
            if frame.npartitions > 1:
                hashes = hashes.shuffle("key", npartitions=frame.npartitions)
            repeats = hashes["key"].map_partitions(duplicated_count, meta=("key", "int64")).sum()
            # One kind of collection in one compute (Dask warns when delayed and expressions mix).
            per_part, duplicates = dask.compute(parts, repeats.to_delayed())
        else:
            (per_part,) = dask.compute(parts)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise DataValidationError(data.uri, f"cannot be parsed ({read_failure(exc)})") from exc
    merged: dict[str, ColumnStats] = {}
    for part in per_part:
        for column, stats in part.items():
            merged[column] = merged[column].merge(stats) if column in merged else stats
    return merged, int(duplicates)


# --- rules ----------------------------------------------------------------------------------------


def constraints_from(data: DatasetRef, stats: dict[str, ColumnStats], time_column: str) -> Constraints:
    columns = {}
    for name, s in stats.items():
        kind = "time" if name == time_column else s.kind
        text = kind == "text" and s.values is not None and len(s.values) <= MAX_CATEGORIES
        columns[name] = ColumnConstraint(
            kind=kind,
            missing_share=s.missing / s.rows if s.rows else 0.0,
            min=s.min if kind == "numeric" else None,
            max=s.max if kind == "numeric" else None,
            non_negative=kind == "numeric" and s.negative == 0,
            categories=s.values if text else None,
        )
    rows = max((s.rows for s in stats.values()), default=0)
    return Constraints(source=data, rows=rows, time_column=time_column, columns=columns)


def _share(n: int, rows: int) -> str:
    return f"{n:,} of {rows:,} ({n / rows:.2%})" if rows else f"{n:,}"


def violations(  # noqa: PLR0913, PLR0917  # the check's inputs, each with its own role
    stats: dict[str, ColumnStats],
    duplicates: int,
    key: list[str],
    time_column: str,
    baseline: Constraints | None,
    rules: QualityRules,
    optional: list[str],
    required: list[str] | None = None,
    not_features: Sequence[str] = (),
    target: str | None = None,
) -> list[Violation]:
    """Rules that need no baseline, then the baseline's (only for columns the baseline knows).
    A baseline column may be absent if it is `optional`, or if `required` is given and omits it.
    The baseline's rules (completeness, type, sign, range, categories) hold for the columns the model
    reads, not for `not_features` (ids, leaky columns) nor, when `required` is given, for columns it
    omits: an id that grows is not bad data. The `target` is held to all but range and categories:
    labels that moved are what a retrain is for, labels that are not numbers are broken."""
    rows = max((s.rows for s in stats.values()), default=0)
    if rows == 0:
        return [Violation(column=None, rule="not empty", observed="0 rows", expected="at least 1 row")]
    found = [v for name, seen in stats.items() for v in _always(name, seen, time_column)]
    if duplicates:
        found.append(
            Violation(
                column=",".join(key),
                rule="unique key",
                observed=f"{duplicates:,} duplicated rows",
                expected="one row per key",
            )
        )
    if baseline is None:
        return found
    for name, want in baseline.columns.items():
        seen = stats.get(name)
        if seen is None:
            if name not in optional and (required is None or name in required):
                found.append(
                    Violation(
                        column=name, rule="present", observed="missing", expected=f"a {want.kind} column"
                    )
                )
            continue
        exempt = name in not_features or (required is not None and name not in required)
        if (name == target or not exempt) and seen.missing < seen.rows:  # all missing: said above
            found += _against_baseline(name, want, seen, rules, is_target=name == target)
    return found


def _always(name: str, seen: ColumnStats, time_column: str) -> list[Violation]:
    """What no column may do, baseline or not: be empty, hold infinities, or (the time) not be times."""
    found = []
    if seen.missing == seen.rows:
        found.append(
            Violation(column=name, rule="not all missing", observed="every value missing", expected="values")
        )
    if seen.infinite:
        found.append(
            Violation(
                column=name,
                rule="finite",
                observed=f"{_share(seen.infinite, seen.rows)} infinite",
                expected="no inf",
            )
        )
    if name == time_column and seen.not_times:
        found.append(
            Violation(
                column=name,
                rule="time",
                observed=f"{_share(seen.not_times, seen.rows)} not dates/times",
                expected="dates/times",
            )
        )
    return found


def _against_baseline(
    name: str, want: ColumnConstraint, seen: ColumnStats, rules: QualityRules, is_target: bool
) -> list[Violation]:
    """One column against its baseline: completeness, then its kind's rules (a target's range and
    categories may move)."""
    found = []
    share = seen.missing / seen.rows
    if share > want.missing_share + rules.missing_tolerance + 1e-12:
        found.append(
            Violation(
                column=name,
                rule="completeness",
                observed=f"{_share(seen.missing, seen.rows)} missing",
                expected=f"at most {want.missing_share + rules.missing_tolerance:.2%} missing",
            )
        )
    if want.kind == "numeric":
        found += _numeric(name, want, seen, rules, is_target)
    elif want.kind == "text" and want.categories is not None and seen.values is not None and not is_target:
        unseen = sorted(set(seen.values) - set(want.categories))
        if unseen:
            found.append(
                Violation(
                    column=name,
                    rule="categories",
                    observed=f"{len(unseen)} unseen",
                    expected=f"one of {len(want.categories)} seen in training",
                    examples=", ".join(map(repr, unseen[:5])),
                )
            )
    return found


def _numeric(
    name: str, want: ColumnConstraint, seen: ColumnStats, rules: QualityRules, is_target: bool
) -> list[Violation]:
    """A numeric column's type, sign and range rules."""
    if seen.not_numbers:
        sample = ", ".join(repr(v) for v in seen.not_number_examples[:3])
        return [
            Violation(
                column=name,
                rule="type",
                observed=f"{_share(seen.not_numbers, seen.rows)} not numbers",
                expected="numbers",
                examples=sample,
            )
        ]
    found = []
    if want.non_negative and seen.negative:
        found.append(
            Violation(
                column=name,
                rule="non-negative",
                observed=f"{_share(seen.negative, seen.rows)} negative (min {seen.min:g})",
                expected=">= 0",
            )
        )
    if want.min is None or want.max is None or seen.min is None or seen.max is None or is_target:
        return found
    slack = rules.range_tolerance * (want.max - want.min)
    low, high = want.min - slack, want.max + slack
    if want.non_negative:  # a count never was negative: its range does not reach below 0
        low = max(low, 0.0)
    below = seen.min < low and not (want.non_negative and seen.negative)  # said by the sign rule
    if below or seen.max > high:
        found.append(
            Violation(
                column=name,
                rule="range",
                observed=f"{seen.min:g} .. {seen.max:g}",
                expected=f"{low:g} .. {high:g} (baseline {want.min:g} .. {want.max:g} ± {rules.range_tolerance:g} of its range)",
            )
        )
    return found


def violations_table(found: list[Violation]) -> str:
    """Markdown; column names and observed values come from the data, so every cell is escaped."""
    rows = [[v.column or "(table)", v.rule, v.observed, v.examples, v.expected] for v in found]
    return markdown.table(["column", "rule", "observed", "examples", "expected"], rows)


# --- the step -------------------------------------------------------------------------------------


def check_caps(data: DatasetRef, stats: dict[str, ColumnStats], rules: QualityRules) -> None:
    """Sizes no policy lets through: too many rows, or a text value too long to be a category."""
    rows = max((s.rows for s in stats.values()), default=0)
    if rows > rules.max_rows:
        raise DataValidationError(
            data.location, f"{rows:,} rows, over the limit of {rules.max_rows:,} (--max-rows)"
        )
    for column, s in stats.items():
        if s.longest > rules.max_category_length:
            raise DataValidationError(
                data.location,
                f"a text value is {s.longest:,} characters long, over the limit of "
                f"{rules.max_category_length:,} (--max-category-length)",
                column,
            )


@processing_step(name="check-quality", cache=CacheConfig(), retry=RetryPolicy(attempts=3))
def check_quality(  # noqa: PLR0913, PLR0917  # a step's inputs are what its lineage and cache key record
    data: DatasetRef,
    time_column: str,
    key_columns: list[str],
    against: ConstraintsRef | None,
    rules: QualityRules,
    optional: list[str],
    required: list[str] | None = None,
    not_features: Sequence[str] = (),
    target: str | None = None,
) -> QualityReport:
    """Profile the data into constraints, check it against `against` (a version's baseline), report;
    with `on_quality_violation="fail"` a violation ends the run as bad input (file, column, rule).
    Columns of the baseline may be absent if `optional`, or not in `required` when that is given;
    the baseline's rules skip `not_features` and hold the `target` only to its kind (see `violations`)."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact

    step = current_step()
    logger = get_run_logger()
    missing_key = [c for c in key_columns if c not in data.columns]
    if missing_key:
        raise DataValidationError(data.location, "a key column is missing", missing_key[0])
    if len(data.columns) > rules.max_columns:
        raise DataValidationError(
            data.location,
            f"{len(data.columns):,} columns, over the limit of {rules.max_columns:,} (--max-columns)",
        )
    stats, duplicates = table_stats(data, time_column, key_columns)
    check_caps(data, stats, rules)
    baseline = load_constraints(step.client, against) if against else None
    found = violations(
        stats,
        duplicates,
        key_columns,
        time_column,
        baseline,
        rules,
        optional,
        required,
        list(not_features),
        target,
    )
    constraints = constraints_from(data, stats, time_column)
    table = violations_table(found)
    _log_check(constraints, found, table)
    against_text = f"{against.model_name} v{against.version}" if against else "no baseline (first model)"
    step.log_metrics({"rows_checked": constraints.rows, "violations": len(found)})
    step.set_tags({QUALITY_AGAINST_TAG: against_text, QUALITY_VIOLATIONS_TAG: len(found)})
    if found:
        create_markdown_artifact(
            key="quality-violations",
            markdown=f"### {len(found)} data quality violations in {markdown.text(data.location)}\n\n"
            f"Against {markdown.text(against_text)}.\n\n{table}\n",
            description=f"{len(found)} violations ({rules.on_quality_violation})",
        )
        logger.warning("%d data quality violations in %s:\n%s", len(found), data.location, table)
        _stop_if_called_for(found, rules, data.location)
    else:
        logger.info(
            "data quality: %s rows x %d columns pass (against %s)",
            f"{constraints.rows:,}",
            len(stats),
            against_text,
        )
    return QualityReport(
        uri=step.artifact_uri(ARTIFACT_DIR),
        run_id=step.run_id,
        data=data,
        checked_against=against,
        violations=found,
        rows=constraints.rows,
    )


def _log_check(constraints: Constraints, found: list[Violation], table: str) -> None:
    """The input's constraints (the next baseline) and its violations, as the step run's artifacts."""
    import tempfile

    step = current_step()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / ARTIFACT_DIR
        folder.mkdir()
        (folder / "constraints.json").write_text(constraints.model_dump_json(indent=1))
        (folder / "violations.json").write_text(json.dumps([v.model_dump() for v in found], indent=1))
        (folder / "violations.md").write_text(table + "\n")
        step.client.log_artifacts(step.run_id, str(folder), ARTIFACT_DIR)


def _stop_if_called_for(found: list[Violation], rules: QualityRules, location: str) -> None:
    """End the run as bad input when the policy says a violation stops it: any (`fail`), or one
    that is broken data rather than data that moved (`fail-on-broken`)."""
    stopping = [
        v
        for v in found
        if rules.on_quality_violation == "fail"
        or (rules.on_quality_violation == "fail-on-broken" and v.rule not in MOVED)
    ]
    if stopping:
        first = stopping[0]
        more = f" (and {len(found) - 1} more violations, see the table)" if len(found) > 1 else ""
        raise DataValidationError(
            location, f"{first.rule}: {first.observed}, expected {first.expected}{more}", first.column
        )


# --- baselines in the registry, and rejected inputs -------------------------------------------------


def version_constraints(
    client: MlflowClient, model_name: str, version: str | None = None, unless_made_from: str | None = None
) -> ConstraintsRef | None:
    """The constraints stored with a version (default: the champion), or None if it has none, or if
    they were made from the data with digest `unless_made_from` (data always meets its own baseline)."""
    found = (
        find_champion(client, model_name)
        if version is None
        else client.get_model_version(model_name, version)
    )
    if found is None or not found.tags.get(QUALITY_RUN_TAG):
        return None
    if unless_made_from and found.tags.get(RAW_DIGEST_TAG) == unless_made_from:
        return None
    return ConstraintsRef(
        model_name=model_name,
        version=str(found.version),
        run_id=found.tags[QUALITY_RUN_TAG],
        uri=found.tags[QUALITY_TAG],
    )


def load_constraints(client: MlflowClient, ref: ConstraintsRef) -> Constraints:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(ref.run_id, f"{ARTIFACT_DIR}/constraints.json", tmp)
        return Constraints.model_validate_json(Path(path).read_text())


class Rejection(BaseModel):
    """Why an input was refused; written next to the state, the input itself is left where it is."""

    input: str
    digest: str | None
    file: str
    column: str | None
    rule: str
    execution: str
    at: str


def record_rejection(
    folder: Path, execution: str, source: str, digest: str | None, exc: DataValidationError
) -> Path:
    """Keep the reason an input was refused (`<folder>/<execution>.json`); never touch the input."""
    record = Rejection(
        input=source,
        digest=digest,
        file=exc.file,
        column=exc.column,
        rule=exc.rule,
        execution=execution,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{execution}.json"
    # Only the owner reads it: the rule names files and columns of data that may be private.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(record.model_dump_json(indent=1))
    os.chmod(path, 0o600)  # an older record of the same execution may have had wider rights
    return path
