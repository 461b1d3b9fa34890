"""Performance from sums (against scikit-learn), and estimated without labels: CBPE for classifiers,
DLE for regression, and their calibration on a test period."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics

from tasks.monitoring.calibration import parse_chunk
from tasks.monitoring.performance import Sums, calibrate_performance, fit_estimator, realized_sums
from tasks.tabular.featurize import FeatureSpec, model_matrix

BINARY = FeatureSpec(
    target="y",
    time_column="t",
    task="binary",
    numeric=["x"],
    categorical={},
    time_parts=[],
    classes=["no", "yes"],
)
REGRESSION = FeatureSpec(
    target="y", time_column="t", task="regression", numeric=["x"], categorical={}, time_parts=[]
)


def scored(raw: np.ndarray) -> pd.DataFrame:
    """A binary model's output frame, as the served model returns it."""
    return pd.DataFrame(
        {"prediction": np.where(raw >= 0.5, "yes", "no"), "probability_no": 1 - raw, "probability_yes": raw}
    )


def labels(y: np.ndarray) -> pd.Series:
    return pd.Series(np.where(y == 1, "yes", "no"))


def binary_data(n: int, rng, spread: float = 1.0, overconfidence: float = 2.0):
    """True P(yes) = sigmoid(2x); the model says sigmoid(2·overconfidence·x): right ranking, wrong confidence."""
    x = rng.normal(0, spread, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-2 * x))).astype(int)
    raw = 1 / (1 + np.exp(-2 * overconfidence * x))
    frame = pd.DataFrame({"x": x, "t": pd.Timestamp("2024-01-01"), "y": labels(y)})
    return frame, y, raw


def test_realized_metrics_equal_scikit_learn_and_add_up_over_partitions():
    rng = np.random.default_rng(0)
    _frame, y, raw = binary_data(6000, rng)
    parts = [
        realized_sums(labels(y[i::3]).reset_index(drop=True), scored(raw[i::3]), BINARY) for i in range(3)
    ]
    total = parts[0] + parts[1] + parts[2]
    got = total.realized("binary")
    assert got["auc"] == pytest.approx(metrics.roc_auc_score(y, raw), abs=1e-3)
    assert got["log_loss"] == pytest.approx(metrics.log_loss(y, np.column_stack([1 - raw, raw])), rel=1e-9)
    assert got["accuracy"] == pytest.approx(metrics.accuracy_score(y, raw >= 0.5))
    truth = rng.normal(100, 20, 500)
    guess = truth + rng.normal(0, 5, 500)
    sums = realized_sums(pd.Series(truth), pd.DataFrame({"prediction": guess}), REGRESSION).realized(
        "regression"
    )
    assert sums["rmse"] == pytest.approx(np.sqrt(metrics.mean_squared_error(truth, guess)))
    assert sums["mae"] == pytest.approx(metrics.mean_absolute_error(truth, guess))
    assert sums["r2"] == pytest.approx(metrics.r2_score(truth, guess))


def test_multiclass_auc_is_scikit_learns_one_vs_rest_macro_average():
    rng = np.random.default_rng(1)
    spec = BINARY.model_copy(update={"task": "multiclass", "classes": ["a", "b", "c"]})
    proba = rng.dirichlet([1, 1, 1], 3000)
    y = np.array([rng.choice(3, p=p) for p in proba])
    frame = pd.DataFrame({f"probability_{c}": proba[:, i] for i, c in enumerate("abc")})
    frame.insert(0, "prediction", np.array(list("abc"))[proba.argmax(axis=1)])
    got = realized_sums(pd.Series(np.array(list("abc"))[y]), frame, spec).realized("multiclass")
    assert got["auc"] == pytest.approx(metrics.roc_auc_score(y, proba, multi_class="ovr"), abs=1e-3)


def test_cbpe_estimates_accuracy_and_auc_without_labels_even_from_an_overconfident_model():
    """Calibrated on one sample, estimated on others: on data like the calibration sample, and on a
    batch concentrated near the decision boundary (covariate shift that hurts), the estimate without
    labels follows the realized value; the raw, overconfident probabilities would not."""
    rng = np.random.default_rng(2)
    frame, _y, raw = binary_data(20_000, rng)
    estimator = fit_estimator(model_matrix(frame, BINARY), scored(raw), frame["y"], BINARY, seed=0)
    for spread in (1.0, 0.3):
        batch, _y_batch, raw_batch = binary_data(20_000, rng, spread=spread)
        estimated = estimator.sums(model_matrix(batch, BINARY), scored(raw_batch), BINARY).estimated("binary")
        realized = realized_sums(batch["y"], scored(raw_batch), BINARY).realized("binary")
        assert estimated["accuracy"] == pytest.approx(realized["accuracy"], abs=0.015), spread
        assert estimated["auc"] == pytest.approx(realized["auc"], abs=0.015), spread
        naive = np.mean(np.maximum(raw_batch, 1 - raw_batch))  # trusting the raw probabilities
        assert abs(naive - realized["accuracy"]) > 0.05
    near = estimator.sums(model_matrix(batch, BINARY), scored(raw_batch), BINARY).estimated("binary")
    assert near["accuracy"] < 0.65  # the estimate saw accuracy fall near the boundary


def test_dle_sees_the_error_grow_where_the_champion_was_unsure():
    """The noise grows with |x|: a batch of large |x| has a larger error, and the loss model, fitted
    on ordinary data, estimates it without labels."""
    rng = np.random.default_rng(3)

    def data(n: int, spread: float):
        x = rng.normal(0, spread, n)
        y = 3 * x + rng.normal(0, 0.2 + np.abs(x), n)
        return pd.DataFrame({"x": x, "t": pd.Timestamp("2024-01-01"), "y": y}), pd.DataFrame(
            {"prediction": 3 * x}
        )

    fit, fit_out = data(5000, 1.0)
    estimator = fit_estimator(model_matrix(fit, REGRESSION), fit_out, fit["y"], REGRESSION, seed=0)
    for spread in (1.0, 2.0):
        batch, out = data(5000, spread)
        estimated = estimator.sums(model_matrix(batch, REGRESSION), out, REGRESSION).estimated("regression")
        realized = realized_sums(batch["y"], out, REGRESSION).realized("regression")
        assert estimated["mae"] == pytest.approx(realized["mae"], rel=0.15), spread
        assert estimated["rmse"] == pytest.approx(realized["rmse"], rel=0.2), spread


def test_test_period_calibration_draws_normal_batches_and_says_when_it_cannot():
    rng = np.random.default_rng(4)
    frame, _y, raw = binary_data(24 * 30, rng)
    frame["t"] = pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(len(frame)), unit="h")
    model = dict(zip(frame["t"], raw, strict=True))
    predict = lambda rows: scored(rows["t"].map(model).to_numpy())  # noqa: E731  the model, by row
    result = calibrate_performance(
        frame.sample(frac=1, random_state=0), predict, BINARY, parse_chunk("7D"), seed=0
    )
    assert result.estimator is not None and result.chunks == 200 and result.blocks == 30
    auc = result.realized["auc"]
    assert auc is not None and auc.direction == "lower-is-worse" and 0.7 < auc.mean < 0.9 and auc.sd > 0
    assert result.estimated["accuracy"] is not None and not result.notes
    short = calibrate_performance(frame.iloc[: 24 * 5], predict, BINARY, parse_chunk("7D"))
    assert short.realized == {} and "performance not calibrated" in short.notes[0]


def test_sums_of_an_empty_batch_say_nothing():
    assert Sums().realized("binary") == {} and Sums().estimated("regression") == {}
