"""A tuning trial's metrics come from LightGBM's own validation evaluation, not a second prediction:
they must equal `score` on the best iteration's predictions, with the same trees and stopping point
as a trial that watches only the objective's default metric (as the plain script does)."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from tasks.steps.refs import DatasetRef
from tasks.tabular.featurize import FeatureSpec, encode_target, model_matrix
from tasks.tabular.modeling import booster_params, run_trial, score

PARAMS = {"num_leaves": 15, "learning_rate": 0.1, "min_data_in_leaf": 20, "bagging_fraction": 0.8}


def table(task: str, rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    signal = x[:, 0] * 3 + np.sin(x[:, 1] * 2) + rng.normal(scale=1.5, size=rows)
    target = {
        "regression": signal * 10 + 0.123,  # not integers: float32 labels round them
        "binary": np.where(signal > 0.4, "yes", "no"),
        "multiclass": np.digitize(signal, [-1.0, 1.0]).astype(str),
    }[task]
    times = pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(rows), unit="h")
    return pd.DataFrame({"t": times, "a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": target})


def spec_for(task: str) -> FeatureSpec:
    classes = {"binary": ["no", "yes"], "multiclass": ["0", "1", "2"]}.get(task)
    return FeatureSpec(
        target="y",
        time_column="t",
        task=task,
        numeric=["a", "b", "c"],
        categorical={},
        time_parts=[],
        classes=classes,
    )


def stored(frame: pd.DataFrame, path, name: str) -> DatasetRef:
    frame.to_parquet(path, index=False)
    return DatasetRef(name=name, uri=str(path), digest=f"{name}-{path.stat().st_size}", format="parquet")


@pytest.mark.parametrize("task", ["regression", "binary", "multiclass"])
def test_trial_metrics_equal_a_prediction_on_the_same_trees(task, tmp_path):
    train, valid, spec = table(task, 3000, 1), table(task, 800, 2), spec_for(task)
    result = run_trial(
        PARAMS,
        stored(train, tmp_path / "train.parquet", "train"),
        stored(valid, tmp_path / "valid.parquet", "valid"),
        spec,
        num_boost_round=300,
        early_stopping_rounds=10,
        seed=7,
    )

    # The plain way: fresh Datasets, the objective's default metric only, predict, then `score`.
    (x_train, y_train), (x_valid, y_valid) = (
        (model_matrix(f, spec), encode_target(f["y"], spec)) for f in (train, valid)
    )
    booster = lgb.train(
        booster_params(spec, PARAMS, 7, 1),
        lgb.Dataset(x_train, y_train),
        num_boost_round=300,
        valid_sets=[lgb.Dataset(x_valid, y_valid)],
        callbacks=[lgb.early_stopping(10, verbose=False)],
    )
    expected = score(task, y_valid, booster.predict(x_valid, num_iteration=booster.best_iteration))

    assert 10 < booster.best_iteration < 300  # early stopping did stop the trial
    assert result["best_iteration"] == booster.best_iteration
    assert set(expected) <= set(result)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-6), name
