"""A new Prefect home starts from a database prepared once per Prefect version, not on every first run.

Without `PREFECT_API_URL`, a run starts a temporary Prefect server on the SQLite database in its home.
On a new home that server first runs every migration and registers Prefect's block types: 8 of the
12 s it took to start here (benchmarks/README.md, "Where the seconds of a cold run go").
`make install` builds the template once (`infra.templates`): a server started on a scratch home, its
database kept, closed and consistent, under the user's cache. Before the run's temporary server
starts, `seed_new_home` copies the template into a home that has no database yet. Prefect still
checks the copy's migrations when it starts, so a template older than the installed Prefect is
upgraded, not trusted; without a template nothing changes. The copy has the block types of the
installed Prefect and Prefect collections registered (the template's name says which), so the
run's temporary server does not register them again (`infra.temporary_server`).

Without a template each server that finds no database migrates a new one, and two doing so at once
on one home failed ("Online migration expected to match one row", 1 start in 9 of three side by
side here): `first_start` makes the others wait until the first has migrated it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from infra.templates import cache_dir, copy_if_absent, keep_as_template

SQLITE_PREFIX = "sqlite+aiosqlite:///"


def template_path() -> Path:
    """Where the template for the installed Prefect and Prefect collections is kept. The collections
    (e.g. prefect-dask) bring block types of their own, which the template has registered: another
    set of them is another template."""
    from importlib.metadata import entry_points

    collections = sorted(
        f"{point.dist.name}=={point.dist.version}"
        for point in entry_points(group="prefect.collections")
        if point.dist is not None
    )
    digest = hashlib.sha256("\n".join(collections).encode()).hexdigest()[:12]
    return cache_dir() / f"prefect-{version('prefect')}-{digest}.db"


def database_file() -> Path | None:
    """The SQLite file Prefect's server would use (None: another database, e.g. PostgreSQL)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    text = url.get_secret_value() if url is not None else ""
    if not text.startswith(SQLITE_PREFIX) or ":memory:" in text:
        return None
    return Path(text.removeprefix(SQLITE_PREFIX).split("?", 1)[0])


def seed_new_home(target: Path | None = None) -> bool:
    """Copy the template to `target` (default: the database of this process's Prefect home) if it
    does not exist; True if copied."""
    target = target if target is not None else database_file()
    return target is not None and copy_if_absent(template_path(), target)


def first_start(database: Path | None = None) -> int | None:
    """Before a server starts on `database` (default: this Prefect home's SQLite file): if it does
    not exist, a lock (an open file descriptor) that keeps every other server starting on it waiting
    until this one has created and migrated it (close it then, or exit); None if it exists, after
    waiting for a server that is creating it, or if the database is not SQLite."""
    database = database if database is not None else database_file()
    if database is None:
        return None
    database.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(database.with_name(f".{database.name}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    if database.exists():
        os.close(descriptor)
        return None
    return descriptor


def build_template() -> Path:
    """Start Prefect's server once on a scratch home (migrations, block types), stop it, and keep a
    consistent copy of its database as the template."""
    target = template_path()
    with tempfile.TemporaryDirectory(prefix="keel-prefect-home-") as scratch:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=scratch, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        start_and_stop = (
            "from prefect.server.api.server import SubprocessASGIServer as S; s = S(); s.start(); s.stop()"
        )
        subprocess.run([sys.executable, "-c", start_and_stop], env=env, check=True, capture_output=True)
        keep_as_template(Path(scratch) / "prefect.db", target)
    return target
