"""Policies: parsing, decisions on signals, and the verdict that makes the signals from a batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from tasks.monitoring import drift_stats
from tasks.monitoring.calibration import Calibration, normal_of
from tasks.monitoring.policies import (
    DATA_DRIFT,
    EVIDENTLY_SHARE,
    PERFORMANCE,
    PREDICTION_DRIFT,
    PolicyContext,
    PolicySettings,
    Signal,
    decide,
    parse_policy,
)
from tasks.monitoring.verdict import judge
from tasks.tabular.featurize import FeatureSpec


@pytest.mark.parametrize(
    ("text", "name", "batches", "days"),
    [
        ("performance", "performance", None, None),
        ("schedule:4", "schedule", 4, None),
        ("schedule:14D", "schedule", None, 14.0),
    ],
)
def test_policies_parse(text, name, batches, days):
    policy = parse_policy(text)
    assert (policy.name, policy.every_batches, policy.every_days, policy.text) == (name, batches, days, text)


@pytest.mark.parametrize(
    "text", ["sometimes", "schedule", "schedule:0", "schedule:x", "drift:3", "schedule:-2D"]
)
def test_unknown_policies_are_refused_naming_the_choices(text):
    with pytest.raises(ValueError, match=r"policy|schedule"):
        parse_policy(text)
    with pytest.raises(ValidationError):
        PolicySettings(policy=text)


def test_an_unknown_performance_metric_is_refused_naming_the_metrics():
    """A typo would leave the performance signal with nothing to measure, and the policy blind."""
    assert PolicySettings(performance_metric="mae").performance_metric == "mae"
    with pytest.raises(ValidationError, match=r"unknown metric 'rsme'.*regression: rmse, mae, r2"):
        PolicySettings(performance_metric="rsme")


def signals(**fired: bool) -> dict[str, Signal]:
    names = (EVIDENTLY_SHARE, DATA_DRIFT, PREDICTION_DRIFT, PERFORMANCE)
    return {
        n: Signal(name=n, value=1.0, threshold=0.5, fired=fired.get(n.replace("-", "_"), False), basis="t")
        for n in names
    }


def test_each_policy_listens_to_its_own_signals():
    quiet, drifted = PolicyContext(), signals(data_drift=True)
    assert not decide(parse_policy("never"), signals(performance=True), quiet).retrain
    assert decide(parse_policy("always"), signals(), quiet).retrain
    assert decide(parse_policy("drift"), signals(evidently_share=True), quiet).retrain
    assert not decide(parse_policy("calibrated-drift"), signals(evidently_share=True), quiet).retrain
    assert decide(parse_policy("calibrated-drift"), drifted, quiet).retrain
    assert not decide(parse_policy("performance"), drifted, quiet).retrain
    both = decide(parse_policy("drift-and-performance"), signals(data_drift=True, performance=True), quiet)
    assert both.retrain and len(both.reasons) == 2
    assert not decide(parse_policy("drift-and-performance"), drifted, quiet).retrain  # drift only proposes
    assert not decide(parse_policy("drift-and-performance"), signals(performance=True), quiet).retrain
    decision = decide(parse_policy("performance"), signals(performance=True), quiet)
    assert decision.policy == "performance" and [s.name for s in decision.signals] == [PERFORMANCE]


def test_schedules_count_batches_or_days_since_training():
    assert not decide(parse_policy("schedule:4"), {}, PolicyContext(batches_since_training=3)).retrain
    due = decide(parse_policy("schedule:4"), {}, PolicyContext(batches_since_training=4))
    assert due.retrain and due.signals[0].value == 4
    assert decide(parse_policy("schedule:14D"), {}, PolicyContext(days_since_training=14.5)).retrain


SPEC = FeatureSpec(
    target="y",
    time_column="t",
    task="regression",
    numeric=["big", "small", "other"],
    categorical={},
    time_parts=[],
)


def verdict_for(
    batch: pd.DataFrame, settings: PolicySettings, realized=None, estimated=None, calibrated=True
):
    """Judge `batch` against a reference of N(0, 1) columns, thresholds calibrated on reference-like weeks."""
    rng = np.random.default_rng(0)
    reference = pd.DataFrame({c: rng.normal(0, 1, 5000) for c in [*SPEC.numeric, "y", "prediction"]})
    profiles = {c: drift_stats.profile_column(reference[c], c, "numeric") for c in reference}
    weeks = [pd.DataFrame({c: rng.normal(0, 1, 168) for c in reference}) for _ in range(40)]
    calibration = Calibration(
        chunk="7D",
        drift_chunks=40,
        drift_period="test",
        drift={
            c: normal_of(
                [
                    drift_stats.column_drift(
                        profiles[c], drift_stats.summarise_column(w[c], profiles[c])
                    ).score
                    for w in weeks
                ]
            )
            for c in profiles
        },
        realized={"rmse": normal_of([1.0, 1.1, 0.9, 1.05, 0.95])},
        estimated={"rmse": normal_of([1.0, 1.2, 0.8, 1.1, 0.9])},
        importance={"big": 0.7, "small": 0.05, "other": 0.25, "t": 0.0},
    )
    summaries = {c: drift_stats.summarise_column(batch[c], profiles[c]) for c in batch}
    return judge(
        summaries,
        profiles,
        SPEC,
        calibration if calibrated else None,
        realized or {},
        estimated or {},
        len(batch) if realized else 0,
        {"r2": 0.9},
        settings,
    )


def batch_of(**shift: float) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        {c: rng.normal(shift.get(c, 0.0), 1, 168) for c in ["big", "small", "other", "prediction"]}
    )


def test_drift_of_an_input_the_model_barely_uses_stays_quiet_while_the_old_rule_fires():
    settings = PolicySettings(drift_share=0.3)
    verdict = verdict_for(batch_of(small=3.0), settings)
    small = verdict.column("small")
    assert small is not None and small.drift and small.evidently_drift and small.model_input
    assert small.importance == 0.05 and small.threshold is not None and small.threshold < small.score
    assert verdict.signals[EVIDENTLY_SHARE].fired  # 1 of 3 feature columns >= 0.1
    assert not verdict.signals[DATA_DRIFT].fired and verdict.weighted_share == pytest.approx(0.05)
    loud = verdict_for(batch_of(big=1.0), settings)
    assert loud.signals[DATA_DRIFT].fired and loud.weighted_share == pytest.approx(0.7)


def test_ignored_columns_are_shown_but_never_count():
    verdict = verdict_for(batch_of(big=1.0), PolicySettings(ignore_columns=["big"]))
    big = verdict.column("big")
    assert big is not None and big.ignored and big.drift  # still scored and reported
    assert verdict.weighted_share == 0 and not verdict.signals[DATA_DRIFT].fired
    assert (
        "of 2 feature columns" in verdict.signals[EVIDENTLY_SHARE].basis
    )  # big left out of the old rule too


def test_predictions_and_target_never_count_toward_data_drift():
    verdict = verdict_for(batch_of(prediction=2.0), PolicySettings())
    prediction = verdict.column("prediction")
    assert prediction is not None and not prediction.model_input and prediction.importance is None
    assert verdict.weighted_share == 0 and verdict.signals[PREDICTION_DRIFT].fired
    assert (
        not verdict_for(batch_of(prediction=2.0), PolicySettings(prediction_drift=False))
        .signals[PREDICTION_DRIFT]
        .fired
    )


def test_performance_is_realized_with_labels_else_estimated_against_its_range():
    settings = PolicySettings(performance_sd=3)
    realized = verdict_for(batch_of(), settings, realized={"rmse": 2.0}, estimated={"rmse": 1.0})
    signal = realized.signals[PERFORMANCE]
    assert signal.fired and signal.value == 2.0 and "realized" in signal.basis
    assert signal.threshold == pytest.approx(1.0 + 3 * np.std([1.0, 1.1, 0.9, 1.05, 0.95], ddof=1))
    estimated = verdict_for(batch_of(), settings, estimated={"rmse": 1.1}).signals[PERFORMANCE]
    assert not estimated.fired and "estimated" in estimated.basis and "no labels used" in estimated.basis
    uncalibrated = verdict_for(batch_of(big=1.0), settings, calibrated=False)
    assert not uncalibrated.signals[PERFORMANCE].fired and not uncalibrated.signals[DATA_DRIFT].fired
    assert (
        uncalibrated.column("big").threshold is None
        and "not calibrated" in uncalibrated.signals[DATA_DRIFT].basis
    )


def test_a_policy_says_when_it_could_not_judge_a_batch():
    """A signal without a threshold can never fire: the decision names it, so the monitor and the
    backtest can say the policy was blind there instead of reporting a quiet batch."""
    settings, quiet = PolicySettings(), PolicyContext()
    calibrated = verdict_for(batch_of(), settings, realized={"rmse": 1.0}).signals
    uncalibrated = verdict_for(batch_of(), settings, realized={"rmse": 1.0}, calibrated=False).signals
    unlabelled = verdict_for(batch_of(), settings).signals  # no labels, no estimate
    for name in ("never", "always", "schedule:4", "drift", "calibrated-drift", "performance"):
        assert decide(parse_policy(name), calibrated, quiet).could_not_judge == [], name
    for name in ("never", "always", "schedule:4", "drift"):
        assert decide(parse_policy(name), uncalibrated, quiet).could_not_judge == [], name
    blind = decide(parse_policy("performance"), uncalibrated, quiet)
    assert [s.name for s in blind.could_not_judge] == [PERFORMANCE] and not blind.retrain
    assert blind.blind_reason().startswith("policy performance could not judge this batch: performance: ")
    assert "not calibrated" in blind.unjudged()
    assert {
        s.name for s in decide(parse_policy("calibrated-drift"), uncalibrated, quiet).could_not_judge
    } >= {
        DATA_DRIFT,
        PREDICTION_DRIFT,
    }
    both = decide(parse_policy("drift-and-performance"), uncalibrated, quiet).could_not_judge
    assert PERFORMANCE in {s.name for s in both}
    no_labels = decide(parse_policy("performance"), unlabelled, quiet)
    assert "no labels and no estimate" in no_labels.unjudged()
    # drift still judged, performance not: drift-and-performance cannot confirm, so it is blind
    half = decide(parse_policy("drift-and-performance"), unlabelled, quiet).could_not_judge
    assert [s.name for s in half] == [PERFORMANCE]
    assert decide(parse_policy("calibrated-drift"), unlabelled, quiet).could_not_judge == []


def test_the_columns_table_escapes_values_from_data():
    from tasks.monitoring.drift import DriftCheck, drift_table
    from tasks.monitoring.policies import decide as decide_
    from tasks.steps.refs import DatasetRef

    hostile = "<img src=x onerror=alert(1)>|[link](javascript:x)"
    spec = SPEC.model_copy(update={"numeric": [hostile]})
    rng = np.random.default_rng(0)
    profile = drift_stats.profile_column(pd.Series(rng.normal(0, 1, 5000)), hostile, "numeric")
    summary = drift_stats.summarise_column(pd.Series(rng.normal(0, 1, 168)), profile)
    verdict = judge(
        {hostile: summary, "prediction": summary},
        {hostile: profile, "prediction": profile},
        spec,
        None,
        {},
        {},
        0,
        {},
        PolicySettings(),
    )
    ref = DatasetRef(name="b", uri="/tmp/<b>.csv", digest="0", format="csv")
    check = DriftCheck(
        model_name="m",
        version="1",
        batch=ref,
        rows=168,
        verdict=verdict,
        decision=decide_(parse_policy("drift"), verdict.signals, PolicyContext()),
        sample=ref,
    )
    table = drift_table(check)
    assert "<img" not in table and "&lt;img src=x onerror=alert(1)&gt;\\|\\[link\\](javascript:x)" in table
