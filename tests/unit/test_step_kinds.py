"""The step kinds against a real Prefect server (test harness) and a real MLflow store."""

from __future__ import annotations

import contextlib
import time
import uuid
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from tasks.steps import (
    CacheConfig,
    Check,
    RetryPolicy,
    condition,
    current_step,
    fail,
    lineage,
    processing_step,
    training_step,
)
from tasks.steps.errors import DataValidationError, StepFailed
from tasks.steps.refs import DatasetRef, content_digest
from tasks.steps.settings import get_settings
from tasks.steps.tags import REASON_TAG, SOURCE_EXECUTION_TAG, STATUS_TAG, STEP_KIND_TAG, STEP_TAG
from tests.conftest import mlflow_client

pytestmark = pytest.mark.usefixtures("prefect_harness", "state")

CALLS: dict[str, int] = {}


def file_ref(path: Path, name: str) -> DatasetRef:
    return DatasetRef(name=name, uri=str(path), digest=content_digest(str(path)), format="csv")


@processing_step(name="copy-upper")
def copy_upper(source: DatasetRef, suffix: str) -> DatasetRef:
    out = Path(source.uri).with_name(f"upper{suffix}.csv")
    out.write_text(Path(source.uri).read_text().upper())
    current_step().log_metrics({"bytes": out.stat().st_size})
    return file_ref(out, "upper")


@training_step(name="flaky", retry=RetryPolicy(attempts=3, interval_seconds=0, retry_on=("any",)))
def flaky(key: str) -> int:
    CALLS[key] = CALLS.get(key, 0) + 1
    if CALLS[key] < 2:
        raise ConnectionError("worker lost")
    return CALLS[key]


@training_step(name="bad-data", retry=RetryPolicy(attempts=4, interval_seconds=0, retry_on=("any",)))
def bad_data(key: str) -> None:
    CALLS[key] = CALLS.get(key, 0) + 1
    raise DataValidationError("input.csv", "values must be positive", "amount")


@flow(name="unit-pipeline")
def unit_pipeline(source: str, key: str, threshold: float, fail_on_miss: bool = True) -> str:
    with lineage.pipeline_run("unit-pipeline", {"threshold": threshold}, get_settings()) as run:
        upper = copy_upper(file_ref(Path(source), "raw"), "-1")
        attempts = flaky(key)
        outcome = condition(
            "gate",
            [Check(left_name="attempts", left=attempts, op=">=", right_name="threshold", right=threshold)],
        )
        if not outcome.passed and fail_on_miss:
            fail("gate-failed", outcome.message)
        assert Path(upper.uri).exists()
        return run.run_id


def step_runs(parent_run_id: str) -> dict[str, object]:
    client = mlflow_client()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {run.data.tags[STEP_TAG]: run for run in runs}


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "raw.csv"
    path.write_text("a,b\n1,x\n2,y\n")
    return path


def test_steps_are_named_task_runs_with_one_mlflow_child_run_each(source):
    key = uuid.uuid4().hex
    state = unit_pipeline(str(source), key, 1.0, return_state=True)
    parent_id = state.result()
    with get_client(sync_client=True) as client:
        flow_run_id = state.state_details.flow_run_id
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    # the graph draws each step's kind beside its name; the kind is also a tag to filter by
    assert sorted(t.name for t in task_runs) == [
        "copy-upper (Processing)",
        "flaky (Training)",
        "gate (Condition)",
    ]
    assert {t.name: t.tags for t in task_runs}["copy-upper (Processing)"] == ["ProcessingStep"]
    assert {t.name: t.empirical_policy.retry_delay for t in task_runs}["flaky (Training)"] == 0  # a number

    runs = step_runs(parent_id)
    assert set(runs) == {"copy-upper", "flaky", "gate"}
    assert runs["copy-upper"].data.tags[STEP_KIND_TAG] == "ProcessingStep"
    assert runs["gate"].data.tags[STEP_KIND_TAG] == "ConditionStep"
    assert all(r.info.status == "FINISHED" for r in runs.values())
    parent = mlflow_client().get_run(parent_id)
    assert parent.data.tags["prefect.flow_run_id"] == str(flow_run_id)
    assert len(parent.data.tags["mlflow.source.git.commit"]) in (40, len("unknown"))
    assert parent.data.params["threshold"] == "1.0"


def test_inputs_are_logged_with_digest_and_outputs_tagged(source):
    parent_id = unit_pipeline(str(source), uuid.uuid4().hex, 1.0)
    run = step_runs(parent_id)["copy-upper"]
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "raw"
    assert dataset_input.dataset.digest == content_digest(str(source))[:36]
    assert str(source) in dataset_input.dataset.source
    assert run.data.tags["keel.input.source.digest"] == content_digest(str(source))
    out = run.data.tags["keel.output.output.uri"]
    assert run.data.tags["keel.output.output.digest"] == content_digest(out)
    assert run.data.params["suffix"] == "-1"
    assert run.data.metrics["bytes"] > 0


def test_a_retried_step_leaves_one_run_with_its_attempts(source):
    parent_id = unit_pipeline(str(source), uuid.uuid4().hex, 1.0)
    flaky_runs = [r for r in step_runs(parent_id).values() if r.data.tags[STEP_TAG] == "flaky"]
    client = mlflow_client()
    all_flaky = client.search_runs(
        [flaky_runs[0].info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`keel.step` = 'flaky'",
    )
    assert len(all_flaky) == 1
    assert all_flaky[0].data.tags["keel.attempts"] == "2"
    assert all_flaky[0].info.status == "FINISHED"


def test_bad_input_is_never_retried(source):
    key = uuid.uuid4().hex

    @flow
    def run_bad() -> None:
        with lineage.pipeline_run("unit-bad", {}, get_settings()):
            bad_data(key)

    with pytest.raises(DataValidationError, match=r"column 'amount' of input\.csv: values must be positive"):
        run_bad()
    assert CALLS[key] == 1


def test_condition_records_values_operator_and_outcome(source):
    state = unit_pipeline(str(source), uuid.uuid4().hex, 2.0, return_state=True)
    parent_id = state.result()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    (artifact,) = [a for a in artifacts if a.key == "gate"]
    assert artifact.type == "markdown"
    assert "| attempts | 2.0000 | `>=` | threshold | 2.0000 | passed |" in artifact.data
    gate = step_runs(parent_id)["gate"]
    assert gate.data.tags["keel.outcome"] == "passed"
    assert gate.data.params["check.0"] == "attempts >= threshold"
    assert gate.data.metrics["check.0.left"] == 2.0
    assert gate.data.metrics["check.0.right"] == 2.0


def test_fail_step_fails_the_flow_with_its_message_and_only_the_chosen_branch_runs(source):
    key = uuid.uuid4().hex
    state = unit_pipeline(str(source), key, 5.0, return_state=True)
    assert state.is_failed()
    with pytest.raises(StepFailed, match=r"gate failed: attempts = 2 >= threshold = 5: missed"):
        state.result()
    client = mlflow_client()
    (parent,) = client.search_runs(
        [client.get_experiment_by_name(get_settings().experiment_name).experiment_id],
        f"tags.`prefect.flow_run_id` = '{state.state_details.flow_run_id}'",
    )
    assert parent.info.status == "FAILED"
    runs = step_runs(parent.info.run_id)
    assert runs["gate"].data.tags["keel.outcome"] == "failed"
    assert runs["gate-failed"].info.status == "FAILED"
    assert "threshold = 5" in runs["gate-failed"].data.tags["keel.fail_message"]


def test_no_fail_branch_when_the_condition_passes(source):
    parent_id = unit_pipeline(str(source), uuid.uuid4().hex, 1.0)
    assert "gate-failed" not in step_runs(parent_id)


def test_a_step_outside_a_pipeline_execution_says_so(source):
    @flow
    def no_pipeline() -> None:
        copy_upper(file_ref(source, "raw"), "-x")

    with pytest.raises(RuntimeError, match="inside a pipeline execution"):
        no_pipeline()


@processing_step(
    name="loses-a-worker", retry=RetryPolicy(attempts=3, interval_seconds=0, retry_on=("worker-lost",))
)
def loses_a_worker(key: str) -> int:
    from distributed import KilledWorker

    CALLS[key] = CALLS.get(key, 0) + 1
    if CALLS[key] == 1:
        raise KilledWorker("prepare-part-3", SimpleNamespace(address="tcp://127.0.0.1:40001"), 3)
    return CALLS[key]


@processing_step(
    name="has-a-bug", retry=RetryPolicy(attempts=3, interval_seconds=0, retry_on=("worker-lost",))
)
def has_a_bug(key: str) -> None:
    CALLS[key] = CALLS.get(key, 0) + 1
    raise KeyError("a bug, not a lost worker")


def test_a_policy_retries_the_failures_it_names_and_no_others():
    lost, bug = uuid.uuid4().hex, uuid.uuid4().hex

    @flow
    def run_both() -> tuple[int, str]:
        with lineage.pipeline_run("unit-retry-policy", {}, get_settings()) as run:
            attempts = loses_a_worker(lost)
            with contextlib.suppress(KeyError):
                has_a_bug(bug)
            return attempts, run.run_id

    attempts, parent_id = run_both()
    assert attempts == 2 and CALLS[lost] == 2
    assert CALLS[bug] == 1  # a KeyError is not a lost worker: no second attempt
    runs = step_runs(parent_id)
    assert runs["loses-a-worker"].data.tags["keel.attempts"] == "2"
    assert runs["loses-a-worker"].info.status == "FINISHED" and runs["has-a-bug"].info.status == "FAILED"
    # What the machinery records is written with the run's end, a failed end included.
    failed = runs["has-a-bug"].data
    assert failed.params == {"key": bug}
    assert failed.tags["keel.error"] == "KeyError: 'a bug, not a lost worker'"
    assert failed.tags["keel.cache.status"] == "off" and "keel.produced" not in failed.tags


@processing_step(name="count-lines", cache=CacheConfig(expire_after=timedelta(seconds=8)))
def count_lines(source: DatasetRef) -> int:
    CALLS["count-lines"] = CALLS.get("count-lines", 0) + 1
    return len(Path(source.uri).read_text().splitlines())


@flow(name="cached-pipeline")
def cached_pipeline(source: str) -> tuple[int, str]:
    with lineage.pipeline_run("cached-pipeline", {}, get_settings()) as run:
        return count_lines(file_ref(Path(source), "raw")), run.run_id


def test_a_cached_step_expires(source):

    CALLS.pop("count-lines", None)
    _, first = cached_pipeline(str(source))
    _, second = cached_pipeline(str(source))
    assert CALLS["count-lines"] == 1
    hit = step_runs(second)["count-lines"].data.tags
    assert hit[STATUS_TAG] == "hit" and hit[SOURCE_EXECUTION_TAG] == first
    time.sleep(8.5)  # long enough apart that a busy machine still hits the second time
    _, third = cached_pipeline(str(source))
    assert CALLS["count-lines"] == 2
    miss = step_runs(third)["count-lines"].data.tags
    assert miss[STATUS_TAG] == "miss" and "are older than 0:00:08" in miss[REASON_TAG]


ATTEMPTS: dict[str, list[float]] = {}


@processing_step(
    name="backs-off", retry=RetryPolicy(attempts=3, interval_seconds=0.1, backoff_rate=6, retry_on=("any",))
)
def backs_off(key: str) -> int:
    ATTEMPTS.setdefault(key, []).append(time.monotonic())
    if len(ATTEMPTS[key]) < 3:
        raise RuntimeError("not yet")
    return len(ATTEMPTS[key])


def test_retries_wait_as_the_policy_says_while_prefect_shows_one_delay():
    """Waits of 0.1 s then 0.6 s: Prefect holds one number (its UI cannot show a list), the step
    sleeps the rest of the backoff itself."""
    key = uuid.uuid4().hex

    @flow
    def run_backoff() -> int:
        with lineage.pipeline_run("unit-backoff", {}, get_settings()):
            return backs_off(key)

    assert run_backoff() == 3
    first, second, third = ATTEMPTS[key]
    assert second - first >= 0.1 and third - second >= 0.6
