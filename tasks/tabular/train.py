"""The tuning and training steps of the tabular pipeline (LightGBM on the Dask workers)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from tasks.steps import (
    CacheConfig,
    ParamRange,
    RetryPolicy,
    TuningResult,
    TuningSpec,
    current_step,
    run_trials,
    training_step,
    tuning_step,
)
from tasks.steps.compute import dask_client, threads_per_task, workers_on_loopback
from tasks.steps.integrity import record_manifest
from tasks.steps.models import quiet_model_logging
from tasks.steps.refs import DatasetRef, ModelRef, file_urls
from tasks.steps.tags import MODEL_DIGEST_TAG
from tasks.tabular import modeling
from tasks.tabular.featurize import FeatureSpec, model_matrix, parse_time, predictions_frame

SERVING_CODE = Path(__file__).with_name("serving_model.py")
FEATURIZE_CODE = Path(__file__).with_name("featurize.py")


def default_search_space() -> dict[str, ParamRange]:
    return {
        "num_leaves": ParamRange(low=15, high=255, log=True, integer=True),
        "learning_rate": ParamRange(low=0.02, high=0.3, log=True),
        "min_data_in_leaf": ParamRange(low=5, high=200, log=True, integer=True),
        "feature_fraction": ParamRange(low=0.5, high=1.0),
        "bagging_fraction": ParamRange(low=0.5, high=1.0),
        "lambda_l2": ParamRange(low=1e-3, high=10.0, log=True),
    }


class TrainingSpec(BaseModel):
    """How the final model is fit (SageMaker's Estimator settings, in short)."""

    num_boost_round: int = Field(default=400, ge=1, le=100_000, description="Most trees a trial may grow.")
    early_stopping_rounds: int = Field(
        default=30, ge=1, description="Trials stop after this many rounds without gain."
    )
    seed: int = 42
    mode: Literal["auto", "single", "distributed"] = Field(
        default="auto",
        description="single: one worker fits in memory; distributed: lightgbm.dask over all workers; "
        "auto: distributed only when the training data would take more than `distributed_share` of a worker's "
        "memory limit and the workers are not all on loopback (lightgbm.dask opens unauthenticated ports on "
        "every interface).",
    )
    distributed_share: float = Field(default=0.25, gt=0, le=1)
    threads: int = Field(
        default=0, ge=0, description="LightGBM threads for the single-worker fit; 0 = all cores."
    )


def training_bytes(rows: int, n_features: int) -> int:
    """In-memory size of the training matrix (float64 features + target), the input to the mode choice."""
    return rows * (n_features + 1) * 8


EXPOSED_PORTS = (
    "lightgbm.dask opens LightGBM's own training ports on every network interface of the workers, "
    "without authentication, for the length of the fit"
)


def choose_mode(
    spec: TrainingSpec, rows: int, n_features: int, worker_memory: int, on_loopback: bool = False
) -> tuple[str, str]:
    """single or distributed, and why. On a cluster whose workers are all on loopback (a LocalCluster,
    the local stack) `auto` never picks distributed: its ports would be reachable from the network
    though nothing there needs them (`--training-mode distributed` still can)."""
    need = training_bytes(rows, n_features)
    limit = int(worker_memory * spec.distributed_share)
    if spec.mode != "auto":
        return spec.mode, f"mode set to {spec.mode}"
    if worker_memory and need > limit:
        big = f"training matrix ~{need / 2**20:.0f} MiB > {spec.distributed_share:.0%} of a worker's {worker_memory / 2**20:.0f} MiB"
        if on_loopback:
            return "single", f"{big}, but the workers are on loopback and {EXPOSED_PORTS}"
        return "distributed", big
    bound = f"limit {limit / 2**20:.0f} MiB" if worker_memory else "the workers have no memory limit"
    return "single", f"training matrix ~{need / 2**20:.1f} MiB fits one worker ({bound})"


@tuning_step(name="tune", cache=CacheConfig(), retry=RetryPolicy(attempts=3), preload=("lightgbm", "optuna"))
def tune(
    train: DatasetRef, valid: DatasetRef, features: FeatureSpec, tuning: TuningSpec, training: TrainingSpec
) -> TuningResult:
    """Search the space with trials on the workers, early-stopped on the validation split (the test
    split is not an input: lineage shows the tuner never saw it)."""
    threads = tuning.threads_per_trial or threads_per_task(dask_client(), tuning.parallel)
    current_step().log_params({"threads_per_trial": threads})
    return run_trials(
        tuning,
        modeling.run_trial,
        train=train,
        valid=valid,
        spec=features,
        num_boost_round=training.num_boost_round,
        early_stopping_rounds=training.early_stopping_rounds,
        seed=training.seed,
        threads=threads,
    )


@training_step(name="train", cache=CacheConfig(), retry=RetryPolicy(attempts=3), preload=("lightgbm",))
def train(
    raw: DatasetRef,
    train: DatasetRef,
    valid: DatasetRef,
    features: FeatureSpec,
    tuning: TuningResult,
    training: TrainingSpec,
) -> ModelRef:
    """Fit on train + validation with the best parameters and the trees the best trial needed; log the
    model. (`raw` gives the model's input example; the test split is not an input.)"""
    from prefect import get_run_logger

    step = current_step()
    client = dask_client()
    refs = [train, valid]
    rows = sum(ref.rows or 0 for ref in refs)
    workers = client.scheduler_info().get("workers", {})  # by address
    worker_memory = min((w.get("memory_limit") or 0 for w in workers.values()), default=0)
    on_loopback = workers_on_loopback(workers)
    mode, why = choose_mode(training, rows, len(features.feature_names), worker_memory, on_loopback)
    rounds = int(tuning.best_metrics.get("best_iteration", training.num_boost_round))
    logger = get_run_logger()
    logger.info("training on %s rows, %d trees, %s (%s)", f"{rows:,}", rounds, mode, why)
    if mode == "distributed" and on_loopback:
        logger.warning(
            "%s, though these workers are all on loopback (use single to keep them closed)", EXPOSED_PORTS
        )
    step.log_params({"mode": mode, "mode_reason": why, "num_boost_round": rounds, **tuning.best_params})
    if mode == "single":
        fitted = client.submit(
            modeling.fit_single,
            tuning.best_params,
            refs,
            features,
            rounds,
            training.seed,
            training.threads,
            pure=False,
        ).result()
    else:
        fitted = modeling.fit_distributed(client, tuning.best_params, refs, features, rounds, training.seed)
    step.set_tags({k: v for k, v in fitted.items() if k.startswith("dask.")})
    step.log_metrics({"rows_trained": fitted["rows"]})
    return log_lightgbm_model(fitted["model"], features, raw)


def input_example(raw: DatasetRef, spec: FeatureSpec):
    """Five rows of the user's own file, with its own column types (the model signature's source)."""
    import fsspec
    import pandas as pd
    import pyarrow.parquet as pq

    first = file_urls(raw.uri)[0]  # with its scheme (s3 and the like), opened through fsspec
    if raw.format == "csv":
        rows = pd.read_csv(first, nrows=5, usecols=spec.input_columns)
    else:
        with fsspec.open(first, "rb") as handle:
            batch = next(pq.ParquetFile(handle).iter_batches(batch_size=5, columns=spec.input_columns))
        rows = batch.to_pandas()
    rows[spec.time_column] = parse_time(rows[spec.time_column])
    return rows[spec.input_columns]


def log_lightgbm_model(model_text: str, features: FeatureSpec, raw: DatasetRef) -> ModelRef:
    """Log LightGBM's text model + feature spec as a pyfunc model (models from code, no pickle)."""
    import importlib.metadata as md

    import lightgbm as lgb
    import mlflow
    from mlflow.models import infer_signature

    step = current_step()
    example = input_example(raw, features)
    booster = lgb.Booster(model_str=model_text)
    output = predictions_frame(booster.predict(model_matrix(example, features)), features)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.txt").write_text(model_text, encoding="utf-8")
        (Path(tmp) / "feature_spec.json").write_text(features.model_dump_json(indent=2), encoding="utf-8")
        with mlflow.start_run(run_id=step.run_id, nested=True), quiet_model_logging():  # its hint: below
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(SERVING_CODE),
                artifacts={
                    "booster": str(Path(tmp) / "model.txt"),
                    "feature_spec": str(Path(tmp) / "feature_spec.json"),
                },
                code_paths=[str(FEATURIZE_CODE)],
                signature=infer_signature(example, output),
                input_example=example,
                pip_requirements=[
                    f"{p}=={md.version(p)}" for p in ("mlflow", "lightgbm", "pandas", "pydantic", "numpy")
                ],
            )
    _note_whole_number_columns(example)
    digest = hashlib.sha256(
        "\n".join([model_text, features.model_dump_json(), example.to_json(date_format="iso")]).encode()
    ).hexdigest()
    record_manifest(info.model_id, info.model_uri)
    step.set_tags({MODEL_DIGEST_TAG: digest})
    return ModelRef(
        uri=info.model_uri,
        run_id=step.run_id,
        model_id=info.model_id,
        task=features.task,
        digest=digest,
    )


def _note_whole_number_columns(example) -> None:
    """MLflow's signature declares the input columns that held only whole numbers as integers, so a
    batch with a gap in one is refused when scored (README, batch transform); said once, in one line,
    instead of MLflow's paragraph-long warning."""
    import pandas as pd
    from prefect import get_run_logger

    whole = [c for c in example.columns if pd.api.types.is_integer_dtype(example[c])]
    if whole:
        get_run_logger().info(
            "model signature: %d input column(s) of whole numbers (%s); a batch with a gap in one of them "
            "is refused when scored",
            len(whole),
            ", ".join(whole),
        )
