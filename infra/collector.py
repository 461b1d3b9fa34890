"""Python's cyclic garbage collector, paused while a command imports its libraries.

A run imports about 800,000 objects that live as long as the process (Prefect, MLflow, pandas, Dask,
LightGBM, their classes and functions), and almost none of them are garbage. With the default
thresholds the collector ran over 1,000 times while they were created, and each full collection
walked all of them again: 0.8-0.9 s before a cold pipeline run's flow began here, most of it in 7-8
full collections (importing what the run imports took 3.7-3.9 s with the collector on, 3.0-3.2 s
with it off). Dask's own `dask worker` command raises the thresholds for the same reason
(dask/distributed#1653).

So a command pauses the collector first thing (`pause_collection`) and, once its imports are done,
moves what exists to the collector's permanent generation (`gc.freeze`) and turns it back on
(`resume_collection`): later collections walk only what the run itself creates (0.1 s in all over
a cold pipeline run, where they took about 1.0 s with the imports in them). The cost: the little
cyclic garbage the imports left (about 10,000 objects here, 4 MB by `sys.getsizeof`) is kept until
the process ends. A user who turned the collector off keeps it off.
"""

from __future__ import annotations

import gc

_paused = False  # by `pause_collection`, in this process, and not resumed yet


def pause_collection() -> None:
    """Stop automatic collection until `resume_collection` (nothing to do if it is off already)."""
    global _paused  # noqa: PLW0603  # one state per process, as the collector's own
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_collection() -> None:
    """After the imports: freeze what exists, then collect automatically again. Only undoes this
    module's pause; without one (a library's process, a test) it does nothing."""
    global _paused  # noqa: PLW0603
    if not _paused:
        return
    _paused = False
    gc.freeze()
    gc.enable()
