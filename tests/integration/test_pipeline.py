"""The real pipeline on a slice of the real data, a real Dask cluster (separate processes) and a
real MLflow store: registration, the quality gate, lineage, and proof the work ran on the workers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from flows.pipeline import PipelineParams, training_pipeline
from tasks.steps.errors import StepFailed
from tasks.steps.refs import content_digest
from tests.conftest import BIKE_CSV, BIKE_TABLE, mlflow_client

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

FAST = {
    "start": "2011-01-01",
    "end": "2011-10-31",
    "n_trials": 4,
    "parallel_trials": 2,
    "num_boost_round": 150,
    "early_stopping_rounds": 20,
}


def children(client, run_id: str) -> list:
    experiment = client.get_run(run_id).info.experiment_id
    return client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run_id}'")


def test_registers_a_champion_then_an_impossible_gate_fails_and_registers_nothing(on_cluster, tmp_path):
    params = PipelineParams(**FAST, model_name="bike-it", min_r2=0.3)
    result = training_pipeline(params)

    assert result.gate.passed
    assert result.registered is not None and result.registered.version == "1"
    assert result.registered.status == "Approved" and result.registered.champion
    client = mlflow_client()
    champion = client.get_model_version_by_alias("bike-it", "champion")
    assert str(champion.version) == "1"
    assert champion.tags["approval_status"] == "Approved"
    assert float(champion.tags["metric.r2"]) == pytest.approx(result.evaluation.metrics["r2"], rel=1e-5)

    # lineage: model version -> its execution (the source run) -> every step run and dataset digest
    parent_id = champion.run_id
    assert parent_id == result.mlflow_run_id
    parent = client.get_run(parent_id)
    assert parent.data.params["model_name"] == "bike-it"
    steps = {r.data.tags["keel.step"]: r for r in children(client, parent_id)}
    assert set(steps) == set(training_pipeline.steps) - {"quality-gate-failed"}  # the FailStep did not run
    for step in ("tune", "train"):  # what the step was given, and so recorded: never the test split
        contexts = {
            tag.value
            for inp in steps[step].inputs.dataset_inputs
            for tag in inp.tags
            if tag.key == "mlflow.data.context"
        }
        assert {"train", "valid"} <= contexts and not any("test" in c for c in contexts), (step, contexts)
    assert steps["register"].data.tags["keel.registered_version"] == "1"
    assert steps["validate-input"].data.tags["keel.output.output.digest"] == content_digest(str(BIKE_CSV))
    assert champion.tags["dataset.raw.digest"] == content_digest(str(BIKE_CSV))
    card = champion.description
    for split in ("train", "valid", "test"):
        uri = steps["prepare"].data.tags[f"keel.output.output.{split}.uri"]
        digest = steps["prepare"].data.tags[f"keel.output.output.{split}.digest"]
        assert digest == content_digest(uri) and f"{digest[:16]}…" in card
    logged = [d.dataset for d in steps["train"].inputs.dataset_inputs]
    train = next(d for d in logged if d.name == "train")
    assert train.digest == steps["prepare"].data.tags["keel.output.output.train.digest"][:36]
    assert {"mlflow_colspec"} == set(json.loads(train.schema)) and json.loads(train.profile)["num_rows"] > 0
    assert steps["quality-gate"].data.tags["keel.outcome"] == "passed"
    # the model card: what it is, how it did, its data, its approval; fewer tags, all read by code
    assert card.startswith("# bike-it v1: Approved, champion") and "## How it did" in card
    assert f"| r2 | {result.evaluation.metrics['r2']:.4g} |" in card
    assert client.download_artifacts(parent_id, "model_card.md", str(tmp_path)) and len(champion.tags) <= 14
    assert "The champion is **v1**" in client.get_registered_model("bike-it").description
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # tuning: one MLflow run per trial under the tuning step, each run on a Dask worker process
    trials = children(client, steps["tune"].info.run_id)
    assert len(trials) == 4 and all(t.info.status == "FINISHED" for t in trials)
    worker_pids = {str(p) for p in on_cluster.worker_pids}
    assert {t.data.tags["dask.worker_pid"] for t in trials} <= worker_pids
    assert steps["train"].data.tags["dask.worker_pid"] in worker_pids
    assert str(os.getpid()) not in worker_pids

    # the scheduler's own records: processing, trials, training and evaluation ran there
    from distributed import Client

    with Client(on_cluster.address) as dask:
        prefixes = set(dask.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
    assert {
        "read-csv",
        "parse_time",
        "toparquetdata",
        "run_trial",
        "fit_single",
        "evaluate_model",
    } <= prefixes

    # the model states its environment in requirements.txt; the uv project the run started in (this
    # repository: uv.lock, 0.8 MB, and pyproject.toml) is not copied into it
    files = {f.path for f in mlflow.artifacts.list_artifacts(artifact_uri="models:/bike-it@champion")}
    assert "requirements.txt" in files and not files & {"uv.lock", "pyproject.toml"}, files
    assert (Path.cwd() / "uv.lock").is_file()  # a uv project, which MLflow would otherwise copy

    # a plain MLflow client predicts on new raw rows
    model = mlflow.pyfunc.load_model("models:/bike-it@champion", dst_path=str(tmp_path))
    rows = pd.read_csv(BIKE_CSV).tail(24)
    rows["dteday"] = pd.to_datetime(rows["dteday"])
    predicted = model.predict(rows)
    assert len(predicted) == 24 and all(math.isfinite(v) for v in predicted["prediction"])

    # second execution: an impossible threshold fails at the gate, registers nothing
    with pytest.raises(StepFailed, match=r"test_r2 = [0-9.]+ >= min_r2 = 0\.9999: missed"):
        training_pipeline(params.updated(min_r2=0.9999))
    assert [str(v.version) for v in client.search_model_versions("name='bike-it'")] == ["1"]
    assert str(client.get_model_version_by_alias("bike-it", "champion").version) == "1"


def test_a_binary_target_trains_a_classifier(on_cluster, tmp_path):
    frame = pd.read_csv(BIKE_CSV)
    frame["busy"] = frame["cnt"] > frame["cnt"].median()
    frame["weather"] = frame["weathersit"].map({1: "clear", 2: "mist", 3: "rain", 4: "storm"})
    path = tmp_path / "busy.parquet"
    frame.drop(columns=["cnt", "casual", "registered", "weathersit"]).to_parquet(path)
    params = PipelineParams(
        **FAST,
        **{**BIKE_TABLE, "target": "busy", "drop_columns": ["instant"]},
        data=str(path),
        model_name="busy",
        min_auc=0.6,
    )
    result = training_pipeline(params)
    assert set(result.evaluation.metrics) == {"auc", "log_loss", "accuracy"}
    assert result.evaluation.metrics["auc"] > 0.8
    model = mlflow.pyfunc.load_model("models:/busy@champion", dst_path=str(tmp_path))
    sample = pd.read_parquet(path).tail(5)
    out = model.predict(sample)
    assert list(out.columns) == ["prediction", "probability_False", "probability_True"]
    assert set(out["prediction"]) <= {"True", "False"}


def test_distributed_training_with_lightgbm_dask(on_cluster):
    params = PipelineParams(
        **{**FAST, "n_trials": 2}, model_name="bike-dist", min_r2=0.3, training_mode="distributed"
    )
    result = training_pipeline(params)
    client = mlflow_client()
    version = client.get_model_version("bike-dist", result.registered.version)
    [train_run] = [r for r in children(client, version.run_id) if r.data.tags["keel.step"] == "train"]
    assert train_run.data.params["mode"] == "distributed"
    assert result.evaluation.metrics["r2"] > 0.3


def test_retrain_keeps_the_champion_when_the_challenger_is_not_better(on_cluster):
    from flows.retrain import RetrainParams, retrain

    first = training_pipeline(PipelineParams(**FAST, model_name="bike-re", min_r2=0.3))
    assert first.registered.champion
    # the same data (the champion's, found through its lineage) with far fewer trees: a challenger
    # that cannot beat the champion by the margin
    fewer_trees = {**FAST, "num_boost_round": 15}
    result = retrain(RetrainParams(**fewer_trees, model_name="bike-re", min_r2=0.3, reason="unit test"))
    again = result.pipeline
    assert result.ignored is None and not again.gate.passed
    assert again.registered.status == "Rejected" and not again.registered.champion
    client = mlflow_client()
    rejected = client.get_model_version("bike-re", again.registered.version)
    assert rejected.tags["approval_status"] == "Rejected"
    assert "- Reason: unit test" in rejected.description
    assert rejected.tags["keel.trigger.flow"] == "retrain" and rejected.tags["compared_with"] == "1"
    assert rejected.tags["dataset.raw.uri"] == first_version_data(client)
    assert "champion v1" in rejected.description and "champion v1 on the same data" in rejected.description
    assert str(client.get_model_version_by_alias("bike-re", "champion").version) == "1"

    # asked again at once: inside the cooldown, so it is ignored and says why; nothing registered
    ignored = retrain(RetrainParams(**FAST, model_name="bike-re", min_r2=0.3, cooldown_minutes=30))
    assert ignored.pipeline is None and ignored.ignored.startswith("cooldown: bike-re v2 was retrained")
    assert len(client.search_model_versions("name='bike-re'")) == 2

    # a model without a champion (a name made up in a forged event) is not trained, and no lock is made
    unknown = retrain(RetrainParams(**FAST, model_name="made-up-by-an-event", event_id="e1"))
    assert unknown.pipeline is None and "has no champion" in unknown.ignored
    assert client.search_model_versions("name='made-up-by-an-event'") == []
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        names = {limit.name for limit in prefect.read_global_concurrency_limits(limit=200)}
    assert "retrain-made-up-by-an-event" not in names and "retrain-bike-re" in names


def first_version_data(client) -> str:
    return client.get_model_version("bike-re", "1").tags["dataset.raw.uri"]


def test_distributed_fit_pairs_features_and_labels_across_many_partitions(on_cluster, tmp_path):
    from distributed import Client

    from tasks.steps.refs import DatasetRef
    from tasks.tabular import modeling
    from tasks.tabular.featurize import FeatureSpec

    frame = pd.read_csv(BIKE_CSV).drop(columns=["instant", "casual", "registered"])
    frame["dteday"] = pd.to_datetime(frame["dteday"])
    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(6):
        frame.iloc[i::6].to_parquet(folder / f"part.{i}.parquet", index=False)
    ref = DatasetRef(name="train", uri=str(folder), digest=content_digest(str(folder)), format="parquet")
    numeric = [c for c in frame.columns if c not in ("cnt", "dteday")]
    spec = FeatureSpec(
        target="cnt",
        time_column="dteday",
        task="regression",
        numeric=numeric,
        categorical={},
        time_parts=["dayofweek"],
    )
    with Client(on_cluster.address) as client:
        fitted = modeling.fit_distributed(client, {"num_leaves": 31}, [ref], spec, 20, 42)
    assert fitted["rows"] == len(frame)
    assert fitted["model"].startswith("tree")


def test_manual_approval_registers_a_pending_version_and_leaves_champion_alone(on_cluster):
    result = training_pipeline(
        PipelineParams(**{**FAST, "n_trials": 2}, model_name="bike-manual", min_r2=0.3, approval="manual")
    )
    assert result.gate.passed
    assert result.registered.status == "PendingManualApproval" and not result.registered.champion
    client = mlflow_client()
    version = client.get_model_version("bike-manual", result.registered.version)
    assert version.tags["approval_status"] == "PendingManualApproval"
    assert "champion" not in version.aliases
    from tasks.steps.model import find_champion

    assert find_champion(client, "bike-manual") is None


def test_the_baseline_predicted_file_by_file_equals_one_prediction_of_the_split(on_cluster, tmp_path):
    """The baseline step predicts the training split a file at a time on the workers: its prediction
    profile must be that of the whole split predicted at once, empty files included. (A folder of
    small files also once broke `prepare`: see `tasks.steps.compute.SAME_PARTITIONS`.)"""
    from tasks.monitoring import worker
    from tasks.monitoring.baseline import load_baseline
    from tasks.monitoring.drift_stats import profile_column
    from tasks.steps.integrity import load_verified
    from tasks.steps.refs import file_urls
    from tasks.steps.settings import get_settings

    frame = pd.read_csv(BIKE_CSV)
    folder = tmp_path / "parts"
    folder.mkdir()
    size = -(-len(frame) // 5)
    for i in range(5):  # in time order: the files after the window give the splits empty files
        frame.iloc[i * size : (i + 1) * size].to_parquet(folder / f"part-{i}.parquet", index=False)
    training_pipeline(
        PipelineParams(
            **{**FAST, **BIKE_TABLE, "n_trials": 2}, data=str(folder), model_name="bike-files", min_r2=0.0
        )
    )

    champion = load_baseline(mlflow_client(), "bike-files")
    files = file_urls(champion.profile.train.uri)
    rows = [len(pd.read_parquet(f)) for f in files]
    assert len(rows) > 1 and 0 in rows and sum(rows) == champion.profile.train.rows
    split = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    settings = get_settings()
    before = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    model = load_verified(champion.model_uri, settings.tracking_uri, settings.registry_uri)
    # Loading points MLflow's fluent API at the store, and leaves the process's settings alone (it
    # left MLFLOW_REGISTRY_URI set, which sent the next test's registry lookups to this store).
    assert {name: os.environ.get(name) for name in before} == before
    spec = champion.profile.features
    whole = worker.monitored_prediction(model.predict(split[spec.input_columns]), spec, split.index)
    expected = profile_column(whole, worker.PREDICTION, "numeric")
    assert champion.profile.columns[worker.PREDICTION] == expected
