"""Databases prepared once per installed version and copied where a first run would build them.

A new Prefect home and a new embedded MLflow store each start by migrating an empty database: Prefect
4-8 s of its server's start here, MLflow 1.7 s of a first run (2.5 s to open a new store, 0.7 s an
existing one). `make install` runs this module: it builds, under the user's cache (outside any
clone), what is missing of `infra.prefect_home`'s and `infra.mlflow_store`'s templates; runs copy
them into a home or store that has no database yet (`copy_if_absent`). Each template's name says
which versions built it, so an upgrade builds a new one rather than trusting an old one.

    .venv/bin/python -m infra.templates      # build the templates that are missing
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from infra.processes import locked

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where templates are kept: the XDG cache, outside any clone."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "keel"


def copy_if_absent(template: Path, target: Path) -> bool:
    """Copy `template` to `target` if there is a template and `target` does not exist; True if
    copied. Never replaces a database: the copy is linked in under its name only if that name is
    still free (another process may have created it meanwhile), and no partial copy is left."""
    if target.exists() or not template.is_file():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkstemp(dir=target.parent, prefix=".seed-", suffix=".db")[1])
    try:
        shutil.copyfile(template, partial)
        os.link(partial, target)
    except FileExistsError:
        return False
    finally:
        partial.unlink(missing_ok=True)
    log.info("new database %s copied from %s", target, template)
    return True


def build_if_missing(template: Path, build: Callable[[], Path]) -> bool:
    """Build `template` with `build()` unless it exists, one process at a time (a file lock beside
    it): `make install` and first runs that find no template, side by side, build it once. True if
    this call built it."""
    if template.is_file():
        return False
    template.parent.mkdir(parents=True, exist_ok=True)
    with locked(template.with_name(f".{template.name}.lock")):
        if template.is_file():  # built by another process while this one waited
            return False
        build()
        return True


def keep_as_template(database: Path, template: Path) -> None:
    """A consistent copy of the SQLite `database` (even with a write-ahead log left behind),
    moved into place as `template` at once."""
    template.parent.mkdir(parents=True, exist_ok=True)
    partial = template.with_name(f".{template.name}.{os.getpid()}")
    with sqlite3.connect(database) as source, sqlite3.connect(partial) as copy:
        source.backup(copy)
    copy.close()
    source.close()
    os.replace(partial, template)


def main() -> int:
    from infra import mlflow_store, prefect_home

    for what, template_path, build in (
        ("Prefect database for new Prefect homes", prefect_home.template_path, prefect_home.build_template),
        ("MLflow store for new state directories", mlflow_store.template_path, mlflow_store.build_template),
    ):
        target = template_path()
        if not target.is_file():  # `make install` runs this every time: silent when there is nothing to do
            print(f"Preparing a migrated {what} (once per version): {target}", flush=True)
            build_if_missing(target, build)
    return 0


if __name__ == "__main__":
    sys.exit(main())
