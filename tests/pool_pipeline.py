"""A one-step pipeline for the warm-pool tests: where did its Dask work and its flow run go?

    python -m tests.pool_pipeline --data FILE

Prints, as its summary, JSON: this process's PID, the PID of the process that ran its Dask task,
the Prefect API it recorded to, its flow run's id, whether the pool's runner ran it, whether
the module its step declares as `preload` was imported before the step began, whether its
temporary Prefect server (if any) started before its imports, its flow run's heartbeat interval, and
whether the garbage collector runs in its step and how many objects it froze. Its first lines are
what a user's pipeline module adds (infra/command.py): to be taken by the pool's runner
(infra/runner.py), to start that server first (infra/temporary_server.py) and to pause the collector
while it imports (infra/collector.py).
"""

from __future__ import annotations

if __name__ == "__main__":
    from infra.command import begin_command

    begin_command(__spec__)

import json
import os

from pydantic import Field

from tasks.steps import pipeline, processing_step
from tasks.steps.cli import exit_process
from tasks.steps.compute import dask_client
from tasks.steps.params import Params


class PoolParams(Params):
    data: str = Field(description="Any file: its size decides where the Dask work runs.")


def _pid() -> int:
    return os.getpid()


PRELOADED = "wave"  # a standard module nothing else here imports


@processing_step(name="where", preload=(PRELOADED,))
def where(data: str) -> dict[str, str]:
    import gc
    import sys

    from prefect.context import get_run_context
    from prefect.settings import PREFECT_API_URL, get_current_settings

    from infra.runner import INSIDE
    from infra.temporary_server import running_server

    flow_run = get_run_context().task_run.flow_run_id  # type: ignore[union-attr]
    return {
        "run_pid": str(os.getpid()),
        "dask_pid": str(dask_client().submit(_pid, pure=False).result()),
        "prefect_api_url": str(PREFECT_API_URL.value()),
        "flow_run_id": str(flow_run),
        "by_runner": str(INSIDE),
        "preloaded": str(PRELOADED in sys.modules),
        "server_started_early": str(getattr(running_server(), "early", None)),
        "heartbeat_seconds": str(get_current_settings().flows.heartbeat_frequency),
        "collector_enabled": str(gc.isenabled()),
        "collector_frozen": str(gc.get_freeze_count()),
    }


@pipeline(name="pool-pipeline", params=PoolParams, summary=json.dumps, reads=lambda params: [params.data])
def pool_pipeline(params: PoolParams) -> dict[str, str]:
    return where(params.data)


if __name__ == "__main__":
    exit_process(pool_pipeline.main())
