"""Step caching, selective execution and their lineage, on the real pipeline, a real Dask cluster and
a real MLflow store: hits when nothing changed (visible in Prefect and MLflow), misses that say why
when content changes behind an unchanged path, forced steps, and outputs that vanished."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from flows.pipeline import PipelineParams, PipelineResult, training_pipeline
from tasks.steps.tags import KEY_TAG, REASON_TAG, SOURCE_EXECUTION_TAG, SOURCE_RUN_TAG, STATUS_TAG
from tests.conftest import BIKE_CSV, BIKE_TABLE, mlflow_client

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

CACHED = ["check-quality", "prepare", "tune", "train", "baseline", "evaluate"]
FAST = {
    **BIKE_TABLE,
    "start": "2011-01-01",
    "end": "2011-06-30",
    "n_trials": 2,
    "num_boost_round": 80,
    "min_r2": 0.2,
    "model_name": "bike-cache",
}


def step_runs(result: PipelineResult) -> dict[str, dict[str, str]]:
    client = mlflow_client()
    runs = client.search_runs(["1"], f"tags.`mlflow.parentRunId` = '{result.mlflow_run_id}'")
    return {r.data.tags["keel.step"]: r.data.tags for r in runs}


def prefect_states(result: PipelineResult) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run = result.prefect_flow_run["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run])))
    return {r.name.split(" (")[0]: r.state.name for r in runs}


def status(result: PipelineResult) -> dict[str, str]:
    return {step: tags.get(STATUS_TAG, "") for step, tags in step_runs(result).items()}


def test_cache_hits_misses_forcing_and_vanished_outputs(on_cluster, tmp_path):
    data = tmp_path / "bike.csv"
    shutil.copy(BIKE_CSV, data)
    params = PipelineParams(data=str(data), **FAST)

    first = training_pipeline(params)
    assert first.registered and first.registered.version == "1"
    assert {s: status(first)[s] for s in CACHED} == dict.fromkeys(CACHED, "miss")

    # Nothing changed: every cacheable step is a hit, pointing at the run that made its outputs,
    # Prefect shows them as Cached, and the registry gets nothing new.
    second = training_pipeline(params)
    runs, made = step_runs(second), step_runs(first)
    for step in CACHED:
        assert runs[step][STATUS_TAG] == "hit", (step, runs[step].get(REASON_TAG))
        assert runs[step][SOURCE_RUN_TAG] == _run_id(first, step)
        assert runs[step][SOURCE_EXECUTION_TAG] == first.mlflow_run_id
        assert runs[step][KEY_TAG] == made[step][KEY_TAG]
    states = prefect_states(second)
    assert all(states[step] == "Cached" for step in CACHED), states
    assert second.registered and second.registered.version == "1" and second.registered.existing
    assert second.evaluation == first.evaluation
    client = mlflow_client()
    assert len(client.search_model_versions("name='bike-cache'")) == 1

    # The same path, other content (one count inside the window): the key says the input changed.
    frame = pd.read_csv(data)
    frame.loc[100, "cnt"] += 1
    frame.to_csv(data, index=False)
    third = training_pipeline(params.updated(on_gate_failure="reject"))
    runs = step_runs(third)
    for step, argument in (("check-quality", "data"), ("prepare", "raw")):
        assert runs[step][STATUS_TAG] == "miss"
        assert f"input:{argument} changed" in runs[step][REASON_TAG], runs[step][REASON_TAG]
    assert runs["tune"][STATUS_TAG] == "miss"
    assert "input:train changed" in runs["tune"][REASON_TAG]

    # Forced: only the named step runs again; the rest are hits of the third execution.
    fourth = training_pipeline(params.updated(force_steps=["tune"], on_gate_failure="reject"))
    current = status(fourth)
    assert current["tune"] == "forced"
    assert all(current[s] == "hit" for s in CACHED if s != "tune"), current

    # Outputs that vanished are not reused: prepare runs again (and writes the same splits, so the
    # steps after it are hits again).
    shutil.rmtree(runs["prepare"]["keel.output.output.train.uri"].rsplit("/", 1)[0])
    fifth = training_pipeline(params.updated(on_gate_failure="reject"))
    runs = step_runs(fifth)
    assert runs["prepare"][STATUS_TAG] == "miss"
    assert "is gone" in runs["prepare"][REASON_TAG]
    assert runs["train"][STATUS_TAG] == "hit"


def _run_id(result: PipelineResult, step: str) -> str:
    client = mlflow_client()
    runs = client.search_runs(
        ["1"], f"tags.`mlflow.parentRunId` = '{result.mlflow_run_id}' and tags.`keel.step` = '{step}'"
    )
    return runs[0].info.run_id


def test_selective_execution_reruns_the_selected_steps_and_takes_the_rest(on_cluster):
    first = training_pipeline(PipelineParams(**FAST))

    # train alone, same parameters: it makes the same model again, so the steps after it are
    # taken from the first execution too, and nothing new is registered
    same = training_pipeline.rerun(first.mlflow_run_id, ["train"])
    runs = step_runs(same)
    for step in (
        "validate-input",
        "check-quality",
        "prepare",
        "tune",
        "baseline",
        "evaluate",
        "quality-gate",
    ):
        assert runs[step][STATUS_TAG] == "reused", (step, runs[step].get(REASON_TAG))
        assert runs[step][SOURCE_EXECUTION_TAG] == first.mlflow_run_id
    assert runs["train"][STATUS_TAG] == "forced"
    assert runs["train"]["model.digest"] == step_runs(first)["train"]["model.digest"]
    assert runs["register"][STATUS_TAG] == "reused"
    assert same.registered and same.registered.version == "1"
    assert len(mlflow_client().search_model_versions("name='bike-cache'")) == 1

    # tune and train with other settings: a new model, so the steps after them run
    result = training_pipeline.rerun(
        first.mlflow_run_id, ["tune", "train"], num_boost_round=20, on_gate_failure="reject"
    )
    runs = step_runs(result)
    for step in ("validate-input", "check-quality", "prepare"):
        assert runs[step][STATUS_TAG] == "reused", (step, runs[step].get(REASON_TAG))
    assert runs["tune"][STATUS_TAG] == runs["train"][STATUS_TAG] == "forced"
    assert runs["baseline"][STATUS_TAG] == "miss"
    assert "its inputs differ" in runs["baseline"][REASON_TAG]
    parent = mlflow_client().get_run(result.mlflow_run_id)
    assert parent.data.tags["keel.reused_from"] == first.mlflow_run_id
    assert parent.data.tags["keel.selected_steps"] == "train,tune"
    assert parent.data.params["training.num_boost_round"] == "20"
    assert result.registered and result.registered.version == "2"  # Approved or Rejected, a new version
