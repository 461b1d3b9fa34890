"""The process's environment, changed for a while and put back: libraries that write their settings
into `os.environ` (MLflow's setters) and runs that point this process at servers for their length
must not leave them behind for what the process does next (a test session, a long-lived worker,
child processes)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def environment_restored(names: Iterable[str]) -> Iterator[None]:
    """On leaving, each variable in `names` has the value it had on entering, or is unset again."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
