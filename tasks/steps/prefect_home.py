"""A new Prefect home starts from a database prepared once per Prefect version, not on every first run.

Without `PREFECT_API_URL`, Prefect starts a temporary server on the SQLite database in its home. On a
new home that server first runs every migration and registers Prefect's block types: 8 of the 12 s
it took to start here (benchmarks/README.md, "Where the seconds of a cold run go"). `make install`
runs this module once: it starts a server on a scratch home and keeps that database, closed and
consistent, under the user's cache (`template_path`). Before a run starts its temporary server,
`seed_new_home` copies the template into a home that has no database yet. Prefect still checks the
copy's migrations when it starts, so a template older than the installed Prefect is upgraded, not
trusted; without a template nothing changes. The copy has the block types of the installed Prefect
and Prefect collections registered (the template's name says which), so the run's temporary server
does not register them again (`tasks.steps.temporary_server`).

    .venv/bin/python -m tasks.steps.prefect_home     # build the template if it is missing
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite+aiosqlite:///"


def template_path() -> Path:
    """Where the template for the installed Prefect and Prefect collections is kept (XDG cache,
    outside any clone). The collections (e.g. prefect-dask) bring block types of their own, which the
    template has registered: another set of them is another template."""
    from importlib.metadata import entry_points

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    collections = sorted(
        f"{point.dist.name}=={point.dist.version}"
        for point in entry_points(group="prefect.collections")
        if point.dist is not None
    )
    digest = hashlib.sha256("\n".join(collections).encode()).hexdigest()[:12]
    return cache / "keel" / f"prefect-{version('prefect')}-{digest}.db"


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
    does not exist; True if copied. Never replaces a database: the copy is linked in under its name
    only if that name is still free."""
    template = template_path()
    target = target if target is not None else database_file()
    if target is None or target.exists() or not template.is_file():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkstemp(dir=target.parent, prefix=".seed-", suffix=".db")[1])
    try:
        shutil.copyfile(template, partial)
        os.link(partial, target)  # fails if another process seeded (or Prefect created) it meanwhile
    except FileExistsError:
        return False
    finally:
        partial.unlink(missing_ok=True)
    log.info("Prefect: new home's database copied from %s", template)
    return True


def build_template() -> Path:
    """Start Prefect's server once on a scratch home (migrations, block types), stop it, and keep a
    consistent copy of its database as the template."""
    target = template_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="keel-prefect-home-") as scratch:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=scratch, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        start_and_stop = (
            "from prefect.server.api.server import SubprocessASGIServer as S; s = S(); s.start(); s.stop()"
        )
        subprocess.run([sys.executable, "-c", start_and_stop], env=env, check=True, capture_output=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        with sqlite3.connect(Path(scratch) / "prefect.db") as source, sqlite3.connect(partial) as copy:
            source.backup(copy)  # consistent even if a write-ahead log was left behind
        copy.close()
        source.close()
        os.replace(partial, target)
    return target


def main() -> int:
    target = template_path()
    if target.is_file():
        return 0  # `make install` runs this every time: silent when there is nothing to do
    print(f"Preparing a migrated Prefect database for new Prefect homes (once per Prefect version): {target}")
    build_template()
    return 0


if __name__ == "__main__":
    sys.exit(main())
