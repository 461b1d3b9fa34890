"""The bad-input corpus (tests/bad_inputs): every file stops the pipeline before training, with an
error naming the file, the column and the rule, exit code 2, the champion and the registry as they
were, and the input left untouched with the reason written down."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from flows.pipeline import main
from tests.conftest import BIKE_FLAGS, ROOT, mlflow_client

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

CORPUS = ROOT / "tests" / "bad_inputs"
CASES = json.loads((CORPUS / "cases.json").read_text())
MODEL = "bike-corpus"
FAST = ["--n-trials", "2", "--num-boost-round", "60", "--model-name", MODEL, "--min-r2", "0.2", *BIKE_FLAGS]
LATER_STEPS = {"prepare", "tune", "train", "baseline", "evaluate", "quality-gate", "register"}


@pytest.fixture(scope="module")
def champion(tmp_path_factory, dask_cluster, prefect_harness):
    """v1 trained on good.csv, with its data-quality constraints, under data roots = the corpus."""
    state = tmp_path_factory.mktemp("corpus") / ".keel"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEEL_STATE_DIR", str(state))
        patch.setenv("DASK_SCHEDULER_ADDRESS", dask_cluster.address)
        patch.setenv("KEEL_DATA_ROOTS", str(CORPUS))
        assert main([*FAST, "--data", str(CORPUS / "good.csv")]) == 0
        client = mlflow_client()
        assert client.get_model_version(MODEL, "1").tags["quality.uri"]
        yield state


def test_the_corpus_has_at_least_twelve_bad_inputs():
    assert len(CASES) >= 12
    for name in CASES:
        assert (CORPUS / name).exists(), name


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_stops_before_training(name, champion, dask_cluster, monkeypatch, capsys, tmp_path):
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    # This run's Prefect results only (the default folder is the user's, shared with any other run).
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        _bad_input_stops_before_training(name, champion, dask_cluster, monkeypatch, capsys)


def _bad_input_stops_before_training(name, champion, dask_cluster, monkeypatch, capsys):
    monkeypatch.setenv("KEEL_STATE_DIR", str(champion))
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", dask_cluster.address)
    monkeypatch.setenv("KEEL_DATA_ROOTS", str(CORPUS))
    case = CASES[name]
    path = CORPUS / name  # not resolved: the `..` in a path is the point of one case
    before = digest(path)
    started = time.time()

    code = main([*FAST, *case.get("args", []), "--data", str(path)])

    err = capsys.readouterr().err
    assert code == 2, err
    assert "bad input, nothing trained or registered" in err
    assert str(path.resolve()) in err, err  # the file, as read (links and `..` resolved)
    assert case["rule"] in err, err
    if case["column"]:
        assert f"column {case['column']!r}" in err, err
    client = mlflow_client()
    assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    execution = client.search_runs(
        ["1"],
        "tags.`mlflow.source.name` = 'training-pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    assert execution.info.status == "FAILED"
    assert execution.data.tags["keel.rejected.column"] == (case["column"] or "")
    assert case["rule"] in execution.data.tags["keel.rejected.rule"]
    steps = {
        r.data.tags["keel.step"]
        for r in client.search_runs(["1"], f"tags.`mlflow.parentRunId` = '{execution.info.run_id}'")
    }
    assert not steps & (LATER_STEPS - {case.get("step")}), steps  # refused where the case says, no later
    assert digest(path) == before  # kept as it was
    record = json.loads((champion / "rejected" / f"{execution.info.run_id}.json").read_text())
    assert record["input"] == str(path.resolve()) and case["rule"] in record["rule"]
    assert record["column"] == case["column"]
    # Prefect keeps the flow's failure: as JSON (naming the rule), not as a pickle
    from prefect.settings import get_current_settings

    storage = Path(get_current_settings().results.local_storage_path)
    stored = [json.loads(f.read_text()) for f in storage.iterdir() if f.stat().st_mtime >= started]
    failures = [s if "__exc_type__" in s else json.loads(s["result"]) for s in stored]  # bare, or a record
    assert failures and all(
        f["__exc_type__"] == "tasks.steps.errors.DataValidationError" for f in failures
    ), stored
