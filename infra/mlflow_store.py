"""A new embedded MLflow store starts from a database migrated once per MLflow version.

Opening a new SQLite store, MLflow runs every migration of its schema: 2.5 s here, against 0.7 s to
open an existing store, all of it on the critical path of a first run. The template is such a store
with its migrations done and MLflow's Default experiment removed: MLflow creates that experiment
itself when it opens the copy, with the artifact location it would have given it, so a copy is
what MLflow would have built. Runs copy it into a state directory that has no store yet
(`tasks.steps.lineage.mlflow_client`); MLflow still checks the copy's schema when it opens it.
"""

from __future__ import annotations

import sqlite3
import tempfile
from importlib.metadata import version
from pathlib import Path

from infra.templates import cache_dir, copy_if_absent, keep_as_template

DEFAULT_EXPERIMENT_ID = 0  # MLflow's own; created again by MLflow when it opens the copy


def template_path() -> Path:
    return cache_dir() / f"mlflow-{version('mlflow')}.db"


def seed_new_store(database: Path) -> bool:
    """Copy the template to `database` if it does not exist; True if copied."""
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
