"""Prefect's server on SQLite: a transaction that will write takes the write lock when it begins.

Prefect begins its transactions on SQLite as DEFERRED (a read snapshot first), unless the caller
asks for a row lock. A transaction that reads, then writes after another connection has committed,
cannot write on its old snapshot: SQLite answers "database is locked" at once, whatever the busy
timeout. The server is never idle (events are persisted every 0.5 s on the stack, logs arrive,
automations run), so this happened to people, not only to load tests:
- on the local stack, answering the approval form in Prefect's UI (the resume of a paused run
  reads the run, then writes its new state) showed "Oops. Something went wrong." and the run stayed
  paused, in two full test runs out of three;
- 40 pause-and-resume cycles beside two threads posting logs: 37 flow-run creations and 3 resumes
  answered 503 ("database is locked"), or requests hung past 20 s; with every transaction begun
  IMMEDIATE, all 40 resumed and none failed.
Here every transaction Prefect begins takes the write lock first (`BEGIN IMMEDIATE`, what Prefect
itself uses for row locks), so writers queue on the busy timeout (60 s) instead of failing. Reads
outside transactions are unchanged. Postgres is not affected.

    python -m infra.prefect_sqlite --host 127.0.0.1 --port 4200   # `prefect server start`, so patched
"""

from __future__ import annotations

import sys
from typing import Any


def write_lock_first() -> None:
    """Make every transaction of Prefect's SQLite configuration begin IMMEDIATE (idempotent)."""
    from prefect.server.database.configurations import AioSqliteConfiguration

    begin = AioSqliteConfiguration.begin_transaction
    if getattr(begin, "_keel_write_lock_first", False):
        return

    def begin_transaction(self: Any, session: Any, with_for_update: bool = False) -> Any:
        return begin(self, session, with_for_update=True)

    begin_transaction._keel_write_lock_first = True  # type: ignore[attr-defined]
    AioSqliteConfiguration.begin_transaction = begin_transaction  # type: ignore[method-assign]


def main() -> None:
    """`prefect server start` with the arguments given, in this process, patched."""
    from prefect.cli import app

    write_lock_first()
    sys.argv = ["prefect", "server", "start", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
