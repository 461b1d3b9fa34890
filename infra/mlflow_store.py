"""A new embedded MLflow store starts from a database migrated once per MLflow version.

Opening a new SQLite store, MLflow runs every migration of its schema: 2.5 s here, against 0.7 s to
open an existing store, all of it on the critical path of a first run. The template is such a store
with its migrations done and MLflow's Default experiment removed: MLflow creates that experiment
itself when it opens the copy, with the artifact location it would have given it, so a copy is
what MLflow would have built. Runs copy it into a state directory that has no store yet
(`tasks.steps.lineage.mlflow_client`), building it first if `make install` has not; MLflow still
checks the copy's schema when it opens it.

The store's connections write ahead (`write_ahead`), as Prefect runs its own SQLite database.
"""

from __future__ import annotations

import sqlite3
import tempfile
from importlib.metadata import version
from pathlib import Path

from infra.templates import build_if_missing, cache_dir, copy_if_absent, keep_as_template

DEFAULT_EXPERIMENT_ID = 0  # MLflow's own; created again by MLflow when it opens the copy

_write_ahead: set[str] = set()  # the databases `write_ahead` was asked for, resolved


def template_path() -> Path:
    return cache_dir() / f"mlflow-{version('mlflow')}.db"


def seed_new_store(database: Path) -> bool:
    """Copy the template to `database` if it does not exist; True if copied. Without a template (no
    `make install` yet) one is built first, under a lock: it costs what MLflow's own migration of
    the new store would, and two first runs side by side then each open a migrated copy. Left to
    MLflow, both migrated the same new database at once, and one failed ("table
    _alembic_tmp_experiments already exists", or "database is locked")."""
    if database.exists():
        return False
    build_if_missing(template_path(), build_template)
    return copy_if_absent(template_path(), database)


def build_template() -> Path:
    """Open a new store on a scratch database (MLflow migrates it), remove its Default experiment,
    and keep a consistent copy as the template."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    target = template_path()
    with tempfile.TemporaryDirectory(prefix="keel-mlflow-store-") as scratch:
        database = Path(scratch) / "mlflow.db"
        store = SqlAlchemyStore(f"sqlite:///{database}", Path(scratch).as_uri())
        store.engine.dispose()
        with sqlite3.connect(database) as db:
            db.execute("delete from experiments where experiment_id = ?", (DEFAULT_EXPERIMENT_ID,))
        db.close()
        keep_as_template(database, target)
    return target


def write_ahead(database: Path) -> None:
    """This process's connections to `database` (an embedded store) use SQLite's write-ahead log
    with `synchronous=NORMAL`, as Prefect sets up its own SQLite database: a commit then writes the
    log without waiting for the disk, and the disk is synced at checkpoints. A step's MLflow records
    (a commit for each write: the run, its inputs, its parameters and tags, its end) cost
    less: B1's step took 53 ms against 76 ms side by side; readers (the MLflow UI, another run) no
    longer wait for a writer. What it
    trades, in SQLite's words: a transaction committed just before a power loss or an operating-system
    crash may be rolled back; the store is never corrupted, and a process that is killed loses
    nothing. Other SQLite databases (a store the user names with MLFLOW_TRACKING_URI) are left as
    they are."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not _write_ahead:
        event.listen(Engine, "connect", _on_connect)
    _write_ahead.add(str(database.resolve()))


def _on_connect(connection: object, _record: object) -> None:
    if not isinstance(connection, sqlite3.Connection):
        return
    main = connection.execute("PRAGMA database_list").fetchone()
    if main is not None and main[2] in _write_ahead:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
