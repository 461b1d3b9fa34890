"""LightGBM on the Dask workers: the trial objective, the final fit and the metrics.

These functions run on workers. They read the splits from storage by reference (cached per worker
process by content digest, so a worker reads each split once however many trials it runs) and send
back numbers and the model text, never the data.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from tasks.steps.integrity import load_verified
from tasks.steps.refs import DatasetRef
from tasks.tabular.featurize import BINARY, FeatureSpec, encode_target, model_matrix

OBJECTIVES = {"regression": "regression", "binary": "binary", "multiclass": "multiclass"}
# The metric names `score` reports: the tuner's default objective per task, and those to maximise.
DEFAULT_OBJECTIVE = {"regression": "rmse", "binary": "log_loss", "multiclass": "log_loss"}
MAXIMIZE = {"r2", "auc", "accuracy"}


@contextmanager
def openmp_threads(n: int) -> Iterator[None]:
    """Let LightGBM use `n` threads in this task, for training and prediction. Dask starts workers with
    OMP_NUM_THREADS=1, so that tasks side by side do not fight over cores; a task that has cores to
    itself (the flow says how many) would otherwise be held to one, even with `num_threads` set."""
    with _thread_pools().limit(limits=max(1, n), user_api="openmp"):
        yield


@functools.cache
def _thread_pools():
    """The process's native thread pools, found once: threadpoolctl scans the loaded libraries each
    time it is asked (7 ms a call here, 16 calls and more per tuning step). LightGBM is imported
    first, so that its OpenMP runtime is among them."""
    import lightgbm  # noqa: F401  # loads the OpenMP runtime the limit is for
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@functools.lru_cache(maxsize=8)
def _read_parquet(uri: str, digest: str):
    import pandas as pd

    return pd.read_parquet(uri)


# LightGBM parameters that shape a Dataset's bins: a tuned one means the Dataset cannot be reused.
DATASET_PARAMS = frozenset(
    {
        "max_bin",
        "max_bin_by_feature",
        "min_data_in_bin",
        "bin_construct_sample_cnt",
        "use_missing",
        "zero_as_missing",
        "linear_tree",
        "categorical_feature",
    }
)
_trial_datasets: dict[tuple, tuple[Any, Any, Any, np.ndarray]] = {}
_KEPT = 8  # the latest trials' datasets a worker keeps for the next trials


def trial_datasets(train: DatasetRef, valid: DatasetRef, spec: FeatureSpec, params: dict[str, Any]):
    """The train and validation `lgb.Dataset`s of a tuning job (and the validation features and target,
    for the tasks that score a prediction), binned once per worker thread and reused by every trial it
    runs: binning is a fixed cost of each trial otherwise. Trees are the same as with fresh Datasets,
    because the bins depend only on the data, the seed and the parameters in DATASET_PARAMS (which key
    the cache), and `feature_pre_filter` is off, so a trial's `min_data_in_leaf` is not baked into
    the bins."""
    import lightgbm as lgb

    shaping = tuple(sorted((k, repr(v)) for k, v in params.items() if k in DATASET_PARAMS))
    key = (
        train.digest,
        valid.digest,
        spec.model_dump_json(),
        params.get("seed"),
        shaping,
        threading.get_ident(),
    )
    if key not in _trial_datasets:
        x_train, y_train = load_xy(train, spec)
        x_valid, y_valid = load_xy(valid, spec)
        train_set = lgb.Dataset(
            x_train, y_train, params={**params, "feature_pre_filter": False}, free_raw_data=False
        )
        train_set.construct()
        # Binned with the training set's bins and its parameters, given here as LightGBM would take
        # them from the reference anyway (without them it warns "Overriding the parameters").
        valid_set = lgb.Dataset(
            x_valid, y_valid, reference=train_set, params=train_set.get_params(), free_raw_data=False
        ).construct()
        if len(_trial_datasets) >= _KEPT:
            _trial_datasets.pop(next(iter(_trial_datasets)))
        _trial_datasets[key] = (train_set, valid_set, x_valid, y_valid)
    return _trial_datasets[key]


def load_xy(ref: DatasetRef, spec: FeatureSpec) -> tuple[Any, np.ndarray]:
    frame = _read_parquet(ref.uri, ref.digest)
    return model_matrix(frame, spec), encode_target(frame[spec.target], spec)


def booster_params(spec: FeatureSpec, params: dict[str, Any], seed: int, threads: int) -> dict[str, Any]:
    base: dict[str, Any] = {
        "objective": OBJECTIVES[spec.task],
        "verbosity": -1,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": threads,
    }
    if spec.task == "multiclass":
        base["num_class"] = len(spec.classes or [])
    tuned = dict(params)
    for name in ("num_leaves", "min_data_in_leaf", "max_depth", "bagging_freq", "max_bin"):
        if name in tuned:
            tuned[name] = round(tuned[name])
    if "bagging_fraction" in tuned and "bagging_freq" not in tuned:
        tuned["bagging_freq"] = 1
    return {**base, **tuned}


def score(task: str, y_true: np.ndarray, output: ArrayLike) -> dict[str, float]:
    """Regression: rmse, mae, r2. Classification: auc, log loss, accuracy (raw = probabilities)."""
    raw = np.asarray(output)
    from sklearn import metrics

    if task == "regression":
        return {
            "rmse": float(np.sqrt(metrics.mean_squared_error(y_true, raw))),
            "mae": float(metrics.mean_absolute_error(y_true, raw)),
            "r2": float(metrics.r2_score(y_true, raw)),
        }
    proba = np.column_stack([1 - raw, raw]) if raw.ndim == 1 else raw
    labels = list(range(proba.shape[1]))
    present = np.unique(y_true)
    if len(present) < BINARY:
        auc = float("nan")
    elif proba.shape[1] == BINARY:
        auc = float(metrics.roc_auc_score(y_true, proba[:, 1]))
    else:
        auc = float(metrics.roc_auc_score(y_true, proba, multi_class="ovr", labels=labels))
    return {
        "auc": auc,
        "log_loss": float(metrics.log_loss(y_true, np.clip(proba, 1e-15, 1), labels=labels)),
        "accuracy": float(metrics.accuracy_score(y_true, proba.argmax(axis=1))),
    }


def _worker() -> dict[str, str]:
    from tasks.steps.compute import worker_identity

    try:
        return worker_identity()
    except ValueError:  # called outside a worker (plain-script benchmark, unit test)
        return {"dask.worker": "none", "dask.worker_pid": str(os.getpid())}


def run_trial(
    params: dict[str, Any],
    train: DatasetRef,
    valid: DatasetRef,
    spec: FeatureSpec,
    num_boost_round: int,
    early_stopping_rounds: int,
    seed: int,
    threads: int = 1,
) -> dict[str, Any]:
    """One tuning trial: fit on train, stop early on valid, report validation metrics."""
    import lightgbm as lgb

    settings = {**booster_params(spec, params, seed, threads), "feature_pre_filter": False}
    evaluated = VALIDATION_METRICS.get(spec.task)
    if evaluated:
        settings["metric"] = evaluated
    with openmp_threads(threads):
        train_set, valid_set, x_valid, y_valid = trial_datasets(train, valid, spec, settings)
        booster = lgb.train(
            settings,
            train_set,
            num_boost_round=num_boost_round,
            valid_sets=[valid_set],
            callbacks=[lgb.early_stopping(early_stopping_rounds, first_metric_only=True, verbose=False)],
            keep_training_booster=True,  # the trial's trees are not kept: no copy through model text
        )
        if evaluated:
            metrics = scores_from_evaluation(spec.task, dict(booster.best_score["valid_0"]), y_valid)
        else:
            metrics = score(
                spec.task, y_valid, booster.predict(x_valid, num_iteration=booster.best_iteration)
            )
    return {**metrics, "best_iteration": int(booster.best_iteration or num_boost_round), **_worker()}


# LightGBM evaluates these on the validation set as the trees grow (the first is the objective's
# default metric, which early stopping watches, as without this list). `score`'s metrics follow from
# them at the best iteration, so a trial need not predict the validation set again: that prediction
# was an eighth of a trial's time on the 1M-row benchmark. Multiclass predicts instead, because
# LightGBM has no one-vs-rest AUC.
VALIDATION_METRICS = {"regression": ["l2", "l1"], "binary": ["binary_logloss", "auc", "binary_error"]}


def scores_from_evaluation(task: str, evaluated: dict[str, float], y_true: np.ndarray) -> dict[str, float]:
    """`score`'s metrics from LightGBM's own evaluation (VALIDATION_METRICS) of the same predictions.
    They agree with `score` up to float rounding: LightGBM keeps labels as float32."""
    if task == "regression":
        mse, variance = float(evaluated["l2"]), float(np.var(y_true))
        r2 = 1.0 - mse / variance if variance > 0 else float(mse == 0)  # as sklearn's r2_score
        return {"rmse": float(np.sqrt(mse)), "mae": float(evaluated["l1"]), "r2": r2}
    auc = float(evaluated["auc"]) if len(np.unique(y_true)) == BINARY else float("nan")
    return {
        "auc": auc,
        "log_loss": float(evaluated["binary_logloss"]),
        "accuracy": 1.0 - float(evaluated["binary_error"]),
    }


def fit_single(
    params: dict[str, Any],
    refs: list[DatasetRef],
    spec: FeatureSpec,
    num_boost_round: int,
    seed: int,
    threads: int,
) -> dict[str, Any]:
    """Final fit on one worker, on the concatenation of `refs`; returns LightGBM's model text."""
    import pandas as pd

    pairs = [load_xy(ref, spec) for ref in refs]
    x = pd.concat([p[0] for p in pairs], ignore_index=True)
    y = np.concatenate([p[1] for p in pairs])
    return {
        "model": fit_matrix(params, x, y, spec, num_boost_round, seed, threads),
        "rows": len(y),
        **_worker(),
    }


def fit_matrix(
    params: dict[str, Any], x, y: np.ndarray, spec: FeatureSpec, num_boost_round: int, seed: int, threads: int
) -> str:
    """One LightGBM fit with fixed parameters and trees (the train step's and every backtest retrain's)."""
    import lightgbm as lgb

    threads = threads or os.cpu_count() or 1
    with openmp_threads(threads):
        booster = lgb.train(
            booster_params(spec, params, seed, threads), lgb.Dataset(x, y), num_boost_round=num_boost_round
        )
    return booster.model_to_string()


def importance(booster, spec: FeatureSpec) -> dict[str, float]:
    """Each input column's share of the model's total split gain (LightGBM's "gain" importance,
    normalised to sum to 1); the calendar parts of the time column count toward the time column."""
    gains = booster.feature_importance(importance_type="gain")
    names = spec.feature_names  # by position: LightGBM rewrites some names (spaces, punctuation)
    if len(names) != len(gains):
        raise ValueError(f"the model has {len(gains)} features, its feature spec {len(names)}")
    parts = {f"{spec.time_column}_{p}": spec.time_column for p in spec.time_parts}
    shares = dict.fromkeys(spec.input_columns, 0.0)
    for name, gain in zip(names, gains, strict=True):
        column = parts.get(name, name)
        if column in shares:
            shares[column] += float(gain)
    total = sum(shares.values())
    return {c: (g / total if total > 0 else 0.0) for c, g in shares.items()}


LABEL = "__label__"


def _matrix_with_label(frame, spec: FeatureSpec):
    """Features and encoded label of one partition, side by side."""
    matrix = model_matrix(frame, spec)
    matrix[LABEL] = encode_target(frame[spec.target], spec).astype("float64")
    return matrix


def fit_distributed(
    client, params: dict[str, Any], refs: list[DatasetRef], spec: FeatureSpec, num_boost_round: int, seed: int
) -> dict[str, Any]:
    """Final fit with lightgbm.dask, data-parallel over the workers (for data too big for one)."""
    import dask.dataframe as dd
    import lightgbm as lgb

    frame = dd.concat([dd.read_parquet(ref.uri) for ref in refs])
    meta = model_matrix(frame._meta, spec).assign(**{LABEL: np.float64()})
    # One frame, persisted on the workers: features and label must keep identical partitions, and
    # dask-expr would otherwise fuse the Parquet parts differently for a wide and a one-column read.
    matrix = frame.map_partitions(_matrix_with_label, spec, meta=meta).persist()
    x, y = matrix.drop(columns=[LABEL]), matrix[LABEL]
    estimator_cls = lgb.DaskLGBMRegressor if spec.task == "regression" else lgb.DaskLGBMClassifier
    params = booster_params(spec, params, seed, threads=1)
    params.pop("num_class", None)
    estimator = estimator_cls(client=client, n_estimators=num_boost_round, **params)
    estimator.fit(x, y)
    booster = estimator.to_local().booster_
    return {
        "model": booster.model_to_string(),
        "rows": int(y.shape[0].compute()),
        "dask.worker": "distributed",
    }


def evaluate_model(
    model_uri: str,
    tracking_uri: str,
    registry_uri: str,
    test: DatasetRef,
    spec: FeatureSpec,
    threads: int = 1,
) -> dict[str, Any]:
    """Score a logged model exactly as a user would load it (`mlflow.pyfunc`, its files verified), on
    the test split."""
    import pandas as pd

    frame = _read_parquet(test.uri, test.digest)
    model = load_verified(model_uri, tracking_uri, registry_uri)
    with openmp_threads(threads):
        predicted = model.predict(frame.drop(columns=[spec.target]))
    y = encode_target(frame[spec.target], spec)
    extra: dict[str, Any] = {}
    if spec.task == "regression":
        raw = predicted["prediction"].to_numpy(dtype="float64")
        days = frame[spec.time_column].dt.strftime("%Y-%m-%d").to_numpy()
        daily = pd.DataFrame({"day": days, "actual": y, "predicted": raw}).groupby("day").mean()
        extra["daily"] = {day: [float(r.actual), float(r.predicted)] for day, r in daily.iterrows()}
    else:
        raw = predicted[[f"probability_{c}" for c in spec.classes or []]].to_numpy(dtype="float64")
    return {**score(spec.task, y, raw), "rows": len(y), **extra, **_worker()}
