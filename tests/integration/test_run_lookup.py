"""The cache's lookup of earlier runs (`tasks.steps.run_lookup`): the direct query on a SQLite store
answers exactly what MLflow's own search answers, on a real store holding the runs that must not
be found (failed, running, deleted, in another experiment, without the tag, too old), and a store
the query cannot read falls back to the search with the same answer."""

from __future__ import annotations

import logging
import time

import pytest

from tasks.steps import run_lookup

pytestmark = [pytest.mark.integration]

KEY, PRODUCED, STEP, SOURCE = "keel.cache.key", "keel.cache.produced", "keel.step", "keel.cache.source_run_id"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store with runs of every kind; their ids by what they are, oldest first."""
    from mlflow import MlflowClient

    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    mine = client.create_experiment("mine", artifact_location=(tmp_path / "art").as_uri())
    other = client.create_experiment("other", artifact_location=(tmp_path / "other").as_uri())
    made: dict[str, str] = {}
    started = int(time.time() * 1000) - 100_000

    def run(name: str, tags: dict[str, str], status: str = "FINISHED", experiment: str = mine, at: int = 0):
        created = client.create_run(experiment, start_time=started + at, tags=tags, run_name=name)
        if status != "RUNNING":
            client.set_terminated(created.info.run_id, status)
        made[name] = created.info.run_id

    produced = {PRODUCED: "true", STEP: "prepare"}
    run("old", {**produced, KEY: "k1"}, at=0)
    run("reused", {KEY: "k1", STEP: "prepare", SOURCE: "abc"}, at=1000)  # a hit: not produced
    run("newer", {**produced, KEY: "k1", SOURCE: "src"}, at=2000)
    run("failed", {**produced, KEY: "k1"}, status="FAILED", at=3000)
    run("running", {**produced, KEY: "k1"}, status="RUNNING", at=4000)
    run("deleted", {**produced, KEY: "k1"}, at=5000)
    client.delete_run(made["deleted"])
    run("elsewhere", {**produced, KEY: "k1"}, experiment=other, at=6000)
    run("other-key", {**produced, KEY: "k2"}, at=7000)
    run("same-time-a", {**produced, KEY: "k3"}, at=8000)
    run("same-time-b", {**produced, KEY: "k3"}, at=8000)  # ties are ordered by run id, as MLflow does
    run("quoted", {**produced, KEY: "it's"}, at=9000)
    return client, mine, made, started


QUESTIONS = [
    ({KEY: "k1", PRODUCED: "true"}, 5, None),
    ({KEY: "k1"}, 5, None),
    ({KEY: "k1", PRODUCED: "true"}, 1, None),
    ({KEY: "k1", PRODUCED: "true"}, 5, 1500),  # only runs started since: "newer"
    ({KEY: "k3"}, 5, None),
    ({STEP: "prepare", PRODUCED: "true"}, 1, None),
    ({STEP: "prepare"}, 20, None),
    ({KEY: "nothing"}, 5, None),
]


@pytest.mark.parametrize(("having", "limit", "since"), QUESTIONS)
def test_the_direct_query_answers_what_mlflow_search_answers(store, having, limit, since):
    client, experiment, _, started = store
    since_ms = None if since is None else started + since
    read = (KEY, SOURCE, "mlflow.runName")
    direct = run_lookup.finished_runs(
        client, experiment, having, limit=limit, since_ms=since_ms, read_tags=read
    )
    searched = run_lookup._search(client, experiment, having, limit, since_ms, read)
    assert direct == searched
    assert run_lookup._sqlite_engine(client.tracking_uri) is not None  # the direct path was taken


def test_what_is_found_and_what_is_not(store):
    client, experiment, made, started = store
    ids = {v: k for k, v in made.items()}
    found = run_lookup.finished_runs(
        client, experiment, {KEY: "k1", PRODUCED: "true"}, limit=5, read_tags=(SOURCE,)
    )
    assert [ids[r.run_id] for r in found] == ["newer", "old"]
    assert found[0].tags == {SOURCE: "src"} and found[1].tags == {}
    assert found[0].start_time == started + 2000 and found[0].artifact_uri.endswith(
        f"{made['newer']}/artifacts"
    )
    ties = run_lookup.finished_runs(client, experiment, {KEY: "k3"}, limit=5)
    assert [r.run_id for r in ties] == sorted([made["same-time-a"], made["same-time-b"]])
    # A value is a bound parameter of the query, never part of its text.
    assert [ids[r.run_id] for r in run_lookup.finished_runs(client, experiment, {KEY: "it's"}, limit=5)] == [
        "quoted"
    ]


def test_a_store_the_query_cannot_read_is_asked_through_mlflow(store, monkeypatch, caplog, request):
    client, experiment, made, _ = store

    def built_again() -> None:  # the statements are built once per process
        for built in (run_lookup._tables, run_lookup._runs_statement, run_lookup._tags_statement):
            built.cache_clear()

    monkeypatch.setattr(run_lookup, "TAGS_TABLE", "tags_of_another_schema")
    monkeypatch.setattr(run_lookup, "_unreadable", set())
    built_again()
    request.addfinalizer(built_again)
    with caplog.at_level(logging.WARNING, logger=run_lookup.__name__):
        found = run_lookup.finished_runs(client, experiment, {KEY: "k1", PRODUCED: "true"}, limit=5)
    assert [r.run_id for r in found] == [made["newer"], made["old"]]
    assert "through MLflow's API from now on" in caplog.text
    assert run_lookup._sqlite_engine(client.tracking_uri) is None  # not tried again in this process


def test_a_process_keeps_the_connections_of_its_newest_stores_only(tmp_path):
    uris = [f"sqlite:///{tmp_path / f's{i}.db'}" for i in range(run_lookup._ENGINES_KEPT + 3)]
    engines = [run_lookup._sqlite_engine(uri) for uri in uris]
    kept = {uri for _, uri in run_lookup._engines}
    assert set(uris[-run_lookup._ENGINES_KEPT :]) <= kept and not kept & set(uris[:3])
    assert run_lookup._sqlite_engine(uris[-1]) is engines[-1]  # reused, not made again
    assert run_lookup._sqlite_engine("http://127.0.0.1:5000") is None  # a server: MLflow's API
