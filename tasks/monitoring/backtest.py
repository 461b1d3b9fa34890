"""The backtest: replay a table through time and show which retrain policy pays on it.

The first champion trains on the first `initial_days`. The rest of the table is walked in batches
(`batch_every`: a period such as 7D, or a row count). At each batch, every policy checks it against
its own champion exactly as the monitor would (the same summaries, calibrated thresholds, signals
and decision functions), the champion in service is scored on the batch's labels, and when the
policy says so the model is retrained on the data seen so far (`window_days`: a sliding window;
default: everything) and promoted if it beats the champion on its own test period, as the retrain
flow does. Batches of the same size inside the initial window are checked too: a data-driven policy
that fires on them raises a false alarm.

Labels arrive `label_delay` after a row's time. At a batch's check (its end) a policy sees the
batch's features, and the labels that have arrived: a retrain trains on those rows only, and the
performance signal is realized on the newest batch-sized span of labelled rows that the champion did
not train on (with no delay: the batch itself), else estimated from the batch without labels.

Every retrain uses the same LightGBM parameters and number of trees (tuned once, on the initial
window), so policies differ only in when they retrain. One model is trained per distinct training
window, on the Dask workers, with the pipeline's own split, feature, fit and baseline functions;
policies that retrain at the same batch share it, and signals are computed once per model and batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from tasks.monitoring import worker
from tasks.monitoring.calibration import ChunkSize
from tasks.monitoring.drift_stats import ColumnProfile
from tasks.monitoring.performance import PRIMARY, Estimator, realized_sums
from tasks.monitoring.policies import Policy, PolicyContext, Signal, SignalSettings, decide
from tasks.monitoring.verdict import judge
from tasks.steps.errors import DataValidationError
from tasks.tabular.data import TableSpec
from tasks.tabular.evaluate import GATE_METRIC
from tasks.tabular.featurize import FeatureSpec, encode_target, model_matrix, parse_time
from tasks.tabular.modeling import fit_matrix
from tasks.tabular.prepare import SplitSpec, learn_features, split_starts

MIN_BATCHES = 3
DATA_DRIVEN = ("drift", "calibrated-drift", "performance", "drift-and-performance")


class Batch(BaseModel):
    """One batch: its rows [lo, hi) of the time-sorted table, its span and when it is checked."""

    index: int
    lo: int
    hi: int
    start: datetime
    end: datetime  # the check happens here: the batch is complete
    inside_initial: bool = False


class ReplayModel(BaseModel):
    """A model of the backtest: what the monitor would load from the registry, and its test scores."""

    model_config = {"arbitrary_types_allowed": True}

    key: str  # the end of its training data, ISO
    trained_until: datetime
    rows: int
    model_text: str
    spec: FeatureSpec
    profiles: dict[str, ColumnProfile]
    calibration: Any  # tasks.monitoring.calibration.Calibration
    estimator: Estimator | None = None
    test_metrics: dict[str, float]
    test_lo: datetime
    test_hi: datetime


def parse_delay(text: str) -> timedelta:
    """`0`, `0D`, `7D`, `36h` -> a time delta (ValueError otherwise)."""
    text = str(text).strip()
    if text in ("", "0"):
        return timedelta(0)
    try:
        delay = pd.Timedelta(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a time delta such as 0, 7D or 36h") from exc
    if pd.isna(delay) or delay < pd.Timedelta(0):
        raise ValueError(f"a label delay cannot be negative: {text!r}")
    return delay.to_pytimedelta()


def load_table(frame: pd.DataFrame, table: TableSpec, uri: str) -> pd.DataFrame:
    """The table as the backtest walks it: columns dropped, times parsed, rows in time order."""
    frame = frame.drop(columns=[c for c in table.drop_columns if c in frame.columns])
    times = parse_time(frame[table.time_column])
    bad = int(times.isna().sum())
    if bad:
        raise DataValidationError(
            uri, f"{bad} of {len(frame)} values are missing or not dates/times", table.time_column
        )
    frame = frame.assign(**{table.time_column: times})
    order = np.argsort(frame[table.time_column].to_numpy(), kind="stable")
    return frame.iloc[order].reset_index(drop=True)


def plan_batches(
    times: np.ndarray,
    initial_end: datetime,
    every: ChunkSize,
    uri: str,
    delay: timedelta,
) -> tuple[list[Batch], list[Batch]]:
    """The batches after the initial window, and those of the same size inside it. Refuses (bad input,
    naming the parameter) when fewer than MIN_BATCHES follow the window or labels never arrive."""
    values = np.asarray(times, dtype="datetime64[ns]")
    first, last = pd.Timestamp(values[0]), pd.Timestamp(values[-1])
    distinct = np.unique(values)
    step = pd.Timedelta(np.median(np.diff(distinct))) if len(distinct) > 1 else pd.Timedelta(0)
    end_of_data = last + step
    initial_end_ts = pd.Timestamp(initial_end)
    if initial_end_ts >= end_of_data:
        raise DataValidationError(
            uri,
            f"--initial-days: the initial window ends on {initial_end_ts.date()}, at or after the data's end "
            f"({last.date()}): nothing is left to replay",
        )
    if delay >= (end_of_data - initial_end_ts):
        raise DataValidationError(
            uri,
            f"--label-delay {pd.Timedelta(delay)} is longer than the data after the initial window "
            f"({initial_end_ts.date()} .. {last.date()}): no label would ever arrive",
        )

    def cut(lo_time: pd.Timestamp, hi_time: pd.Timestamp, inside: bool) -> list[Batch]:
        out: list[Batch] = []
        if every.rows:
            lo = int(np.searchsorted(values, np.datetime64(lo_time), side="left"))
            hi_all = int(np.searchsorted(values, np.datetime64(hi_time), side="left"))
            for start in range(lo, hi_all - every.rows + 1, every.rows):
                stop = start + every.rows
                end = pd.Timestamp(values[stop]) if stop < len(values) else end_of_data
                out.append(_batch(len(out), start, stop, pd.Timestamp(values[start]), end, inside))
            return out
        assert every.period is not None
        period = pd.Timedelta(every.period)
        at = lo_time
        while at + period <= hi_time:
            lo = int(np.searchsorted(values, np.datetime64(at), side="left"))
            hi = int(np.searchsorted(values, np.datetime64(at + period), side="left"))
            if hi > lo:
                out.append(_batch(len(out), lo, hi, at, at + period, inside))
            at = at + period
        return out

    replay = cut(initial_end_ts, end_of_data, False)
    inside = cut(first.normalize(), initial_end_ts, True)
    if len(replay) < MIN_BATCHES:
        raise DataValidationError(
            uri,
            f"--initial-days / --batch-every: {len(replay)} complete batches of {every.describe()} follow the "
            f"initial window ({initial_end_ts.date()} .. {last.date()}); the backtest needs at least {MIN_BATCHES}",
        )
    return replay, inside


def _batch(index: int, lo: int, hi: int, start, end, inside: bool) -> Batch:
    return Batch(
        index=index,
        lo=lo,
        hi=hi,
        start=pd.Timestamp(start).to_pydatetime(),
        end=pd.Timestamp(end).to_pydatetime(),
        inside_initial=inside,
    )


def fit_window(  # noqa: PLR0913, PLR0917  # a worker call: each argument is shipped with it
    table: pd.DataFrame,
    until: datetime,
    window_days: int | None,
    spec_of: TableSpec,
    task: str,
    split: SplitSpec,
    params: dict[str, Any],
    rounds: int,
    seed: int,
    chunk: ChunkSize,
    threads: int,
) -> ReplayModel:
    """On a worker: split the labelled rows before `until` (the last `window_days` of them) by time as
    the pipeline does, learn the features from the training split, fit on train + validation with the
    fixed parameters, and build the calibrated baseline; score the test split for the gate."""

    times = table[spec_of.time_column]
    window = table[(times < pd.Timestamp(until)) & table[spec_of.target].notna()]
    if window_days:
        newest = window[spec_of.time_column].max()
        window = window[
            window[spec_of.time_column] >= newest.normalize() - pd.Timedelta(days=window_days - 1)
        ]
    t_min, t_max = window[spec_of.time_column].min(), window[spec_of.time_column].max()
    valid_start, test_start = split_starts(t_min, t_max, split)
    parts = {
        "train": window[window[spec_of.time_column] < valid_start],
        "valid": window[
            (window[spec_of.time_column] >= valid_start) & (window[spec_of.time_column] < test_start)
        ],
        "test": window[window[spec_of.time_column] >= test_start],
    }
    empty = [name for name, part in parts.items() if part.empty]
    if empty:
        raise DataValidationError(
            spec_of.path,
            f"the training window until {pd.Timestamp(until)} leaves the {empty} split(s) empty: widen "
            "--initial-days or --window-days, or change --valid-fraction / --test-fraction",
            spec_of.time_column,
        )
    if task == "regression":
        parts = {
            k: v.assign(**{spec_of.target: pd.to_numeric(v[spec_of.target], errors="coerce")})
            for k, v in parts.items()
        }
    spec = learn_features(parts["train"], spec_of, task, spec_of.path)
    fitted = pd.concat([parts["train"], parts["valid"]], ignore_index=True)
    model_text = fit_matrix(
        params,
        model_matrix(fitted, spec),
        encode_target(fitted[spec.target], spec),
        spec,
        rounds,
        seed,
        threads,
    )
    model = worker.BoosterModel(model_text, spec)
    train, valid, test = (parts[name].reset_index(drop=True) for name in ("train", "valid", "test"))
    baseline = worker.build_baseline(
        train, model.predict(train), valid, test, spec, model, model.booster, chunk, seed
    )
    test_metrics = realized_sums(test[spec.target], model.predict(test), spec).realized(task)
    return ReplayModel(
        key=pd.Timestamp(until).isoformat(),
        trained_until=pd.Timestamp(until).to_pydatetime(),
        rows=len(fitted),
        model_text=model_text,
        spec=spec,
        profiles=baseline.profiles,
        calibration=baseline.calibration,
        estimator=baseline.estimator,
        test_metrics=test_metrics,
        test_lo=pd.Timestamp(test_start).to_pydatetime(),
        test_hi=pd.Timestamp(t_max).to_pydatetime(),
    )


class Check(BaseModel):
    """One model on one batch: the signals every policy decides on, and the model's score."""

    signals: dict[str, Signal]
    score: float
    labelled: int


class PolicyRun(BaseModel):
    """One policy's replay."""

    policy: str
    scores: list[float] = Field(default_factory=list, description="The champion's metric on each batch.")
    alarms: list[int] = Field(
        default_factory=list, description="Batches where the policy called for a retrain."
    )
    retrains: list[int] = Field(default_factory=list, description="Batches after which a model was trained.")
    promoted: list[int] = Field(default_factory=list, description="... and the challenger became champion.")
    inside_alarms: list[int] = Field(
        default_factory=list,
        description="Batches inside the initial window the policy fired on (false alarms).",
    )
    reasons: dict[int, list[str]] = Field(default_factory=dict)
    blind: list[int] = Field(
        default_factory=list,
        description="Batches the policy could not judge: a signal it needs had no threshold, so it could not fire.",
    )
    blind_reason: str = Field(default="", description="Why, on the first of them.")
    champions: list[str] = Field(default_factory=list, description="The champion's training end, per batch.")

    def mean(self) -> float:
        finite = [s for s in self.scores if not math.isnan(s)]
        return float(np.mean(finite)) if finite else math.nan


class Replay:
    """The replay of one table for many policies, sharing models and checks between them."""

    def __init__(  # noqa: PLR0913, PLR0917  # the replay's whole set-up, made once
        self,
        table: pd.DataFrame,
        spec_of: TableSpec,
        task: str,
        batches: list[Batch],
        inside: list[Batch],
        delay: timedelta,
        settings: SignalSettings,
        metric: str,
        champion_margin: float,
        train: Callable[[list[datetime]], dict[str, ReplayModel]],
    ) -> None:
        self.table = table
        self.spec_of = spec_of
        self.task = task
        self.batches = batches
        self.inside = inside
        self.delay = delay
        self.settings = settings
        self.metric = metric
        self.margin = champion_margin
        self._train = train
        self.models: dict[str, ReplayModel] = {}
        self._predictors: dict[str, worker.BoosterModel] = {}
        self._checks: dict[tuple[str, int, bool], Check] = {}
        self._gates: dict[tuple[str, str], dict[str, float]] = {}
        self.times = table[spec_of.time_column].to_numpy(dtype="datetime64[ns]")

    # --- models -------------------------------------------------------------------------------
    def model(self, until: datetime) -> ReplayModel:
        key = pd.Timestamp(until).isoformat()
        if key not in self.models:
            self.models.update(self._train([until]))
        return self.models[key]

    def prefetch(self, ends: list[datetime]) -> None:
        """Train these windows now, side by side on the workers (a policy will need every one)."""
        wanted = [e for e in ends if pd.Timestamp(e).isoformat() not in self.models]
        if wanted:
            self.models.update(self._train(wanted))

    def predictor(self, model: ReplayModel) -> worker.BoosterModel:
        if model.key not in self._predictors:
            self._predictors[model.key] = worker.BoosterModel(model.model_text, model.spec)
        return self._predictors[model.key]

    def label_horizon(self, batch: Batch) -> datetime:
        """Rows before this time have their labels at the batch's check."""
        return batch.end - self.delay

    # --- checks -------------------------------------------------------------------------------
    def check(self, model: ReplayModel, batch: Batch) -> Check:
        """The monitor's work for one model and batch, as at the batch's check (labels that arrived)."""
        key = (model.key, batch.index, batch.inside_initial)
        if key in self._checks:
            return self._checks[key]
        target = self.spec_of.target
        rows = self.table.iloc[batch.lo : batch.hi]
        horizon = pd.Timestamp(self.label_horizon(batch))
        arrived = rows[self.spec_of.time_column] < horizon
        seen = rows.assign(**{target: rows[target].where(arrived)})
        if not seen[target].notna().any():
            seen = seen.drop(columns=[target])
        predictor = self.predictor(model)
        summary = worker.summarise_frame_in_one(seen, model.profiles, model.spec, predictor, model.estimator)
        realized, labelled = summary.performance.realized(model.spec.task), summary.performance.rows
        if self.delay and not labelled:
            realized, labelled = self._late_labels(model, horizon, batch.end - batch.start, predictor)
        verdict = judge(
            summary.columns,
            model.profiles,
            model.spec,
            model.calibration,
            realized,
            summary.performance.estimated(model.spec.task),
            labelled,
            model.test_metrics,
            self.settings,
        )
        score = self._score(rows, predictor, model.spec)
        self._checks[key] = Check(signals=verdict.signals, score=score, labelled=labelled)
        return self._checks[key]

    def _late_labels(
        self, model: ReplayModel, horizon: pd.Timestamp, size: timedelta, predictor: worker.BoosterModel
    ) -> tuple[dict[str, float], int]:
        """Realized metrics on the newest batch-sized span of rows labelled by now that the model did
        not train on: the delayed labels of an earlier batch."""
        lo_time = max(pd.Timestamp(model.trained_until), horizon - pd.Timedelta(size))
        lo = int(np.searchsorted(self.times, np.datetime64(lo_time), side="left"))
        hi = int(np.searchsorted(self.times, np.datetime64(horizon), side="left"))
        rows = self.table.iloc[lo:hi]
        rows = rows[rows[self.spec_of.target].notna()]
        if rows.empty:
            return {}, 0
        sums = realized_sums(
            rows[self.spec_of.target].reset_index(drop=True), predictor.predict(rows), model.spec
        )
        return sums.realized(model.spec.task), sums.rows

    def _score(self, rows: pd.DataFrame, predictor: worker.BoosterModel, spec: FeatureSpec) -> float:
        """The champion's metric on the batch's labels (all of them: scoring is after the fact)."""
        labelled = rows[rows[self.spec_of.target].notna()]
        if labelled.empty:
            return math.nan
        try:
            sums = realized_sums(
                labelled[self.spec_of.target].reset_index(drop=True), predictor.predict(labelled), spec
            )
        except ValueError as exc:  # a class the champion never saw
            first = labelled[self.spec_of.time_column].iloc[0]
            raise DataValidationError(
                self.spec_of.path,
                f"the batch from {first} has {exc}: the backtest scores every champion on every batch, so every "
                "class must appear in the initial window (widen --initial-days)",
                self.spec_of.target,
            ) from exc
        return sums.realized(spec.task).get(self.metric, math.nan)

    def beats(self, challenger: ReplayModel, champion: ReplayModel) -> bool:
        """The retrain flow's gate: the challenger's gate metric on its own test period beats the
        champion's on the same rows by the margin."""
        metric = GATE_METRIC[challenger.spec.task]
        key = (champion.key, challenger.key)
        if key not in self._gates:
            times = self.table[self.spec_of.time_column]
            rows = self.table[
                (times >= pd.Timestamp(challenger.test_lo))
                & (times <= pd.Timestamp(challenger.test_hi))
                & self.table[self.spec_of.target].notna()
            ]
            try:
                self._gates[key] = realized_sums(
                    rows[self.spec_of.target].reset_index(drop=True),
                    self.predictor(champion).predict(rows),
                    champion.spec,
                ).realized(challenger.spec.task)
            except ValueError:  # labels the old champion never saw: it cannot compete
                self._gates[key] = {}
        theirs = self._gates[key].get(metric, math.nan)
        ours = challenger.test_metrics.get(metric, math.nan)
        return math.isnan(theirs) or (not math.isnan(ours) and ours >= theirs + self.margin)

    # --- the replay ---------------------------------------------------------------------------
    def run(
        self, policies: list[Policy], progress: Callable[[int, int], None] | None = None
    ) -> list[PolicyRun]:
        first = self.model(self.batches[0].start)
        if any(p.name == "always" or (p.name == "schedule" and p.every_batches == 1) for p in policies):
            self.prefetch([b.end - self.delay for b in self.batches[:-1]])
        runs = {p.text: PolicyRun(policy=p.text) for p in policies}
        for policy in policies:
            if policy.name in DATA_DRIVEN:
                for batch in self.inside:
                    if decide(policy, self.check(first, batch).signals, PolicyContext()).retrain:
                        runs[policy.text].inside_alarms.append(batch.index)
        state = {p.text: _Service(champion=first, trained=first.trained_until) for p in policies}
        for batch in self.batches:
            for policy in policies:
                self._serve(policy, batch, state[policy.text], runs[policy.text])
            if progress:
                progress(batch.index + 1, len(self.batches))
        return [runs[p.text] for p in policies]

    def _serve(self, policy: Policy, batch: Batch, service: _Service, run: PolicyRun) -> None:
        """One batch under one policy: score the champion, decide, retrain and promote as it says."""
        check = self.check(service.champion, batch)
        run.scores.append(check.score)
        run.champions.append(service.champion.key)
        service.since += 1
        days = (batch.end - service.trained).total_seconds() / 86400
        decision = decide(
            policy,
            check.signals,
            PolicyContext(batches_since_training=service.since, days_since_training=days),
        )
        if decision.could_not_judge:
            run.blind.append(batch.index)
            run.blind_reason = run.blind_reason or decision.unjudged()
        if not decision.retrain:
            return
        run.alarms.append(batch.index)
        run.reasons[batch.index] = decision.reasons
        until = self.label_horizon(batch)
        last = batch.index == len(self.batches) - 1  # no batch left to serve
        if last or pd.Timestamp(until) <= pd.Timestamp(service.trained):
            return
        challenger = self.model(until)
        run.retrains.append(batch.index)
        service.since, service.trained = 0, until
        if self.beats(challenger, service.champion):
            service.champion = challenger
            run.promoted.append(batch.index)


class _Service(BaseModel):
    """A policy's model in service: the champion, batches checked since the last retrain, and the end
    of the last training window."""

    champion: ReplayModel
    since: int = 0
    trained: datetime


def detection_delays(run: PolicyRun, batches: list[Batch], change_points: list[datetime]) -> list[int | None]:
    """Per known change point: batches from the first batch that ends after it to the first alarm then
    (None: never detected)."""
    delays: list[int | None] = []
    for point in change_points:
        first = next((b.index for b in batches if pd.Timestamp(b.end) > pd.Timestamp(point)), None)
        alarm = next((a for a in run.alarms if first is not None and a >= first), None)
        delays.append(None if first is None or alarm is None else alarm - first)
    return delays


def metric_for(task: str, settings: SignalSettings) -> str:
    return settings.performance_metric or PRIMARY[task]
