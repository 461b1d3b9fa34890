"""What a command that runs a flow does first, in its `if __name__ == "__main__":` block, before it
imports its libraries.

    if __name__ == "__main__":
        from infra.command import begin_command

        begin_command(__spec__)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from infra.collector import pause_collection
from infra.runner import hand_off
from infra.temporary_server import start_early

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec


def begin_command(spec: ModuleSpec | None) -> None:
    """In this order: pause the garbage collector while the command imports (`infra.collector`;
    the flow's command line resumes it once the run's imports are done); make a `PREFECT_HOME` that
    does not exist yet (`make_prefect_home`); hand the command to the warm pool's runner, which has
    the libraries imported already, if there is one (`infra.runner`; this does not return then);
    start the temporary Prefect server, so it starts while the command imports
    (`infra.temporary_server`)."""
    pause_collection()
    make_prefect_home()
    hand_off(spec)
    start_early()


def make_prefect_home() -> None:
    """Make the folder `PREFECT_HOME` names, with the folders above it. Prefect makes its home when
    first imported (0700), but not the folders above it: a new `PREFECT_HOME=~/work/new/.prefect`
    made it warn "Failed to create the Prefect home directory" at the top of the run (which then went
    on). Made here the same way, parents included; a failure is left for Prefect to report."""
    home = os.environ.get("PREFECT_HOME")
    if not home:
        return
    path = Path(home).expanduser()
    if not path.exists():
        with contextlib.suppress(OSError):
            path.mkdir(mode=0o700, parents=True)
