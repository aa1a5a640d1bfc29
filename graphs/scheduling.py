"""Where a graph runs, decided per graph and per thread, never process-wide.

Dask's configuration (``dask.config``) is one dictionary for the whole process: a stage
that sets ``scheduler="threads"`` there changes it for every other thread, and a
``config.set`` context that leaves restores what *it* saw on entry, stripping whatever
another thread set meanwhile (issue 19 item 4: a short stage leaving stripped the image
stage's setting, image graphs went to the cluster). So contimg never sets the scheduler
in ``dask.config``. Instead:

* :func:`local_threads` marks the *current thread*: until the block ends, every graph it
  computes through :func:`compute` / :func:`persist` runs on a local thread pool of ``n``
  threads, never on a distributed client (a stage running inside a Dask worker task, or
  a driver-side helper). Thread-local and nestable: two stages in one process never see
  each other's setting.
* :func:`compute` / :func:`persist` are ``dask.compute`` / ``dask.persist`` with the
  scheduler chosen for this call: ``threads=n`` (explicit) or the thread's
  :func:`local_threads` setting, else dask's own choice (the active client if any).
* :func:`rechunk_method` is what a graph builder passes to ``rechunk(method=...)``:
  ``"tasks"`` on local threads (dask picks peer-to-peer rechunking whenever a client
  exists in the process, which the threaded scheduler cannot run), else dask's choice.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

_state = threading.local()


def threads() -> int | None:
    """The local thread count set for this thread by :func:`local_threads`, else None."""
    return getattr(_state, "threads", None)


@contextmanager
def local_threads(n: int | None = None):
    """Within this thread, graphs computed by :func:`compute`/:func:`persist` run on ``n``
    local threads (default: the CPU count). Restores the thread's previous setting."""
    import os

    prev = threads()
    _state.threads = max(1, int(n or os.cpu_count() or 1))
    try:
        yield _state.threads
    finally:
        _state.threads = prev


def options(n: int | None = None) -> dict:
    """Keyword arguments for ``dask.compute``-like calls: the threaded scheduler with
    ``n`` (or this thread's :func:`local_threads`) workers, or ``{}`` (dask decides)."""
    n = n or threads()
    return {"scheduler": "threads", "num_workers": int(n)} if n else {}


def compute(*objs, threads: int | None = None, **kw):
    """``dask.compute(*objs)`` on local threads when asked (see :func:`options`)."""
    import dask

    return dask.compute(*objs, **{**options(threads), **kw})


def persist(*objs, threads: int | None = None, **kw):
    """``dask.persist(*objs)`` on local threads when asked; one object in, one out."""
    import dask

    out = dask.persist(*objs, **{**options(threads), **kw})
    return out[0] if len(objs) == 1 else out


def rechunk_method() -> str | None:
    """``"tasks"`` when this thread computes on local threads, else None (dask's choice)."""
    return "tasks" if threads() else None
