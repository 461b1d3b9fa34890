"""What a command that runs a flow does first, in its `if __name__ == "__main__":` block, before it
imports its libraries.

    if __name__ == "__main__":
        from infra.command import begin_command

        begin_command(__spec__)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from infra.collector import pause_collection
from infra.runner import hand_off
from infra.temporary_server import start_early

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec


def begin_command(spec: ModuleSpec | None) -> None:
    """In this order: pause the garbage collector while the command imports (`infra.collector`;
    the flow's command line resumes it once the run's imports are done); hand the command to the
    warm pool's runner, which has the libraries imported already, if there is one (`infra.runner`;
    this does not return then); start the temporary Prefect server, so it starts while the command
    imports (`infra.temporary_server`)."""
    pause_collection()
    hand_off(spec)
    start_early()
