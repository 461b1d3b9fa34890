"""Finding a step's earlier runs by their tags: what the cache asks on every step.

MLflow's `search_runs` parses its filter text with sqlparse and loads every tag, parameter, metric
and dataset input of each run it finds: 5-6 ms to find nothing, 8-10 ms to find one run, twice per
cache miss (the lookup by key, then the newest run of the step to say what changed), about a third
of a step's bookkeeping (B1). On a SQLite store (the embedded one, or one the user names) the same
question is one query on MLflow's `runs` and `tags` tables (and one for the tags read of the runs
found), 0.3 ms in B1, through a connection of our own. Other stores (an MLflow server, another
database) are asked through MLflow's API. If the query fails (a store whose tables are not
as expected), the process falls back to the API for that store, with a log line, and the answer
is the same: the tests hold both paths to it.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from sqlalchemy import Select, TableClause
    from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

RUNS_TABLE = "runs"
TAGS_TABLE = "tags"


@dataclass(frozen=True)
class FoundRun:
    """What the cache needs of an earlier run: where its artifacts are, when it began, some tags."""

    run_id: str
    artifact_uri: str
    start_time: int  # ms since the epoch, as MLflow keeps it
    tags: Mapping[str, str]


def finished_runs(
    client: MlflowClient,
    experiment_id: str,
    having: Mapping[str, str],
    *,
    limit: int,
    since_ms: int | None = None,
    read_tags: Sequence[str] = (),
) -> list[FoundRun]:
    """The newest finished, not deleted runs of the experiment that carry every tag in `having`
    (name -> exact value), started at or after `since_ms` if given; newest first (MLflow's order:
    start time, then run id), at most `limit`, each with the `read_tags` it has."""
    engine = _sqlite_engine(client.tracking_uri)
    if engine is not None:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return _query(engine, int(experiment_id), having, limit, since_ms, read_tags)
        except SQLAlchemyError as exc:
            log.warning(
                "finding earlier runs in %s through MLflow's API from now on: the direct query failed (%s)",
                client.tracking_uri,
                exc.__class__.__name__,
            )
            _unreadable.add(client.tracking_uri)
    return _search(client, experiment_id, having, limit, since_ms, read_tags)


def _search(
    client: MlflowClient,
    experiment_id: str,
    having: Mapping[str, str],
    limit: int,
    since_ms: int | None,
    read_tags: Sequence[str],
) -> list[FoundRun]:
    """The same question through MLflow's API (its default order is the one asked for)."""
    clauses = [f"tags.`{name}` = '{value}'" for name, value in having.items()]
    clauses.append("attributes.status = 'FINISHED'")
    if since_ms is not None:
        clauses.append(f"attributes.start_time >= {since_ms}")
    runs = client.search_runs([experiment_id], " and ".join(clauses), max_results=limit)
    return [
        FoundRun(
            run_id=run.info.run_id,
            artifact_uri=run.info.artifact_uri or "",
            start_time=run.info.start_time or 0,
            tags={name: run.data.tags[name] for name in read_tags if name in run.data.tags},
        )
        for run in runs
    ]


def _query(
    engine: Engine,
    experiment_id: int,
    having: Mapping[str, str],
    limit: int,
    since_ms: int | None,
    read_tags: Sequence[str],
) -> list[FoundRun]:
    values: dict[str, Any] = {"experiment": experiment_id, "limit": limit, "since": since_ms}
    values |= {f"name_{i}": name for i, name in enumerate(having)}
    values |= {f"value_{i}": value for i, value in enumerate(having.values())}
    with engine.connect() as connection:
        rows = connection.execute(_runs_statement(len(having), since_ms is not None), values).all()
        read: dict[str, dict[str, str]] = {row.run_uuid: {} for row in rows}
        if rows and read_tags:
            asked = {"runs": list(read), "names": list(read_tags)}
            for run_id, name, value in connection.execute(_tags_statement(), asked):
                read[run_id][name] = value
    return [
        FoundRun(
            run_id=row.run_uuid,
            artifact_uri=row.artifact_uri or "",
            start_time=row.start_time or 0,
            tags=read[row.run_uuid],
        )
        for row in rows
    ]


@functools.cache
def _tables() -> tuple[TableClause, TableClause]:
    from sqlalchemy import column, table

    runs = table(
        RUNS_TABLE,
        column("run_uuid"),
        column("artifact_uri"),
        column("start_time"),
        column("experiment_id"),
        column("status"),
        column("lifecycle_stage"),
    )
    return runs, table(TAGS_TABLE, column("run_uuid"), column("key"), column("value"))


@functools.cache
def _runs_statement(tag_count: int, since: bool) -> Select:
    """Runs with `tag_count` tags of given names and values (bound, never in the query's text),
    started since a time if `since`. Built once per shape: building it took longer than running it."""
    from sqlalchemy import and_, bindparam, select

    runs, tags = _tables()
    found = select(runs.c.run_uuid, runs.c.artifact_uri, runs.c.start_time).select_from(runs)
    for i in range(tag_count):
        tag = tags.alias(f"tag_{i}")
        found = found.join(
            tag,
            and_(
                tag.c.run_uuid == runs.c.run_uuid,
                tag.c.key == bindparam(f"name_{i}"),
                tag.c.value == bindparam(f"value_{i}"),
            ),
        )
    found = found.where(
        runs.c.experiment_id == bindparam("experiment"),
        runs.c.status == "FINISHED",
        runs.c.lifecycle_stage == "active",
    )
    if since:
        found = found.where(runs.c.start_time >= bindparam("since"))
    return found.order_by(runs.c.start_time.desc(), runs.c.run_uuid).limit(bindparam("limit"))


@functools.cache
def _tags_statement() -> Select:
    from sqlalchemy import bindparam, select

    _, tags = _tables()
    return select(tags.c.run_uuid, tags.c.key, tags.c.value).where(
        tags.c.run_uuid.in_(bindparam("runs", expanding=True)),
        tags.c.key.in_(bindparam("names", expanding=True)),
    )


_engines: dict[tuple[int, str], Engine] = {}
_ENGINES_KEPT = 8  # a process that opens many stores (a test session) keeps the newest ones' connections
_unreadable: set[str] = set()
_lock = threading.Lock()


def _sqlite_engine(tracking_uri: str) -> Engine | None:
    """An engine of this process (a forked child makes its own) for a SQLite tracking store."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri in _unreadable:
        return None
    key = (os.getpid(), tracking_uri)
    with _lock:
        engine = _engines.pop(key, None)
        if engine is None:
            from sqlalchemy import create_engine

            engine = create_engine(tracking_uri)
            while len(_engines) >= _ENGINES_KEPT:
                oldest = next(iter(_engines))
                _engines.pop(oldest).dispose(close=oldest[0] == os.getpid())
        _engines[key] = engine  # the newest used last
        return engine
