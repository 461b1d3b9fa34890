"""A new embedded MLflow store starts from the migrated template (`infra.mlflow_store`): built by
MLflow itself, copied only where there is no store, and what MLflow opens on the copy is what it
would have built: its Default experiment, where it would have put it, and runs and models as usual."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from infra import mlflow_store

pytestmark = [pytest.mark.integration]


def default_experiment(database: Path) -> tuple:
    with sqlite3.connect(database) as db:
        found = db.execute(
            "select experiment_id, name, artifact_location, lifecycle_stage from experiments"
        ).fetchall()
    db.close()
    return tuple(found)


def test_a_copied_store_is_what_mlflow_would_have_built(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # MLflow puts the Default experiment's artifacts under the working folder
    template = mlflow_store.build_template()
    assert template == mlflow_store.template_path() and template.is_relative_to(tmp_path / "cache")
    assert default_experiment(template) == ()  # MLflow creates it when it opens a copy

    built, copied = tmp_path / "built" / "mlflow.db", tmp_path / "copied" / "mlflow.db"
    built.parent.mkdir()
    assert mlflow_store.seed_new_store(copied)
    assert not list(copied.parent.glob(".seed-*"))  # no partial copy left behind
    for database in (built, copied):
        uri = f"sqlite:///{database}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.create_experiment("mine", artifact_location=(database.parent / "art").as_uri())
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "rmse", 1.5)
        client.set_terminated(run.info.run_id)
        client.create_registered_model("model")
        assert experiment == "1"
        assert client.get_run(run.info.run_id).data.metrics == {"rmse": 1.5}

    def without_locations(database: Path) -> list[tuple]:
        return [row[:2] + row[3:] for row in default_experiment(database)]

    assert without_locations(copied) == without_locations(built)
    assert default_experiment(copied)[0][2] == default_experiment(built)[0][2]  # the Default experiment's


def test_an_existing_store_is_never_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mlflow_store.build_template()
    existing = tmp_path / "mine" / "mlflow.db"
    existing.parent.mkdir()
    existing.write_bytes(b"a store of its own")
    assert not mlflow_store.seed_new_store(existing)
    assert existing.read_bytes() == b"a store of its own"


FIRST_RUN = """
import sys
from pathlib import Path

from tasks.steps.lineage import mlflow_client
from tasks.steps.settings import Settings

client = mlflow_client(Settings(state_dir=Path(sys.argv[1])))
run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
client.set_terminated(run.info.run_id)
print(run.info.run_id)
"""


def test_without_a_template_first_runs_side_by_side_build_one_and_each_opens_a_migrated_store(
    tmp_path, monkeypatch
):
    """Without `make install`'s template, three first runs at once (two of them on one new state
    directory): the template is built once, under its lock, and every run writes to a migrated
    store. Left to MLflow, two processes migrated one new database at once and one failed."""
    from mlflow import MlflowClient

    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(XDG_CACHE_HOME=str(cache), PYTHONPATH=str(Path(__file__).parents[2]))
    shared, other = tmp_path / "shared" / ".keel", tmp_path / "other" / ".keel"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_RUN, str(state)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        for state in (shared, shared, other)
    ]  # fmt: skip
    results = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, results, strict=True):
        assert run.returncode == 0, err[-3000:]
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert [p.name for p in cache.glob("keel/mlflow-*")] == [mlflow_store.template_path().name]
    for state, wanted in ((shared, results[:2]), (other, results[2:])):
        uri = f"sqlite:///{state / 'mlflow.db'}"
        found = {r.info.run_id for r in MlflowClient(uri).search_runs(["0"])}
        assert found == {out.strip() for out, _ in wanted}


def journal_mode(database: Path) -> str:
    with sqlite3.connect(database) as db:
        [(mode,)] = db.execute("pragma journal_mode").fetchall()
    db.close()
    return mode


def test_the_embedded_store_writes_ahead_and_a_store_the_user_names_is_left_as_it_is(tmp_path, monkeypatch):
    from sqlalchemy import text

    from tasks.steps.lineage import mlflow_client
    from tasks.steps.settings import Settings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    embedded = Settings(state_dir=tmp_path / ".keel")
    assert embedded.embedded_mlflow
    client = mlflow_client(embedded)
    client.search_experiments(max_results=1)  # opens the store
    store = client._tracking_client.store  # MLflow's SqlAlchemyStore: its own connections
    with store.engine.connect() as connection:
        assert connection.execute(text("pragma synchronous")).scalar() == 1  # NORMAL
    assert journal_mode(embedded.mlflow_database) == "wal"
    run = client.create_run(client.create_experiment("wal"))
    client.set_terminated(run.info.run_id)
    with sqlite3.connect(embedded.mlflow_database) as other:  # another process's view: committed
        [(status,)] = other.execute("select status from runs where run_uuid = ?", (run.info.run_id,))
    other.close()
    assert status == "FINISHED"

    named = tmp_path / "theirs.db"
    uri = f"sqlite:///{named}"
    theirs = mlflow_client(Settings(state_dir=tmp_path / ".keel", mlflow_tracking_uri=uri))
    theirs.search_experiments(max_results=1)
    assert journal_mode(named) == "delete"  # SQLite's default, as MLflow leaves it
