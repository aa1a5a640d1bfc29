"""The stages of one group after conversion, as functions a Dask worker runs.

Each takes and returns plain values (paths, dicts), so the streaming service, backfill
and a Jupyter user can submit them to any cluster. Every stage is idempotent: it may be
re-run after a worker died half-way (outputs are written to a temporary path and
renamed; flagging recovers an interrupted run), which is what lets Dask re-schedule it.

A stage whose implementation is not installed in this version, or that has nothing to
do (no calibrator transits, no valid calibration set), returns
``{"status": "skipped", "reason": ...}`` instead of failing the group.

Stages: ``flag`` → ``calibrate`` (only when a calibrator transits) → ``apply`` (the
valid calibration set nearest in time) → ``image``.
"""

from __future__ import annotations

import functools
import gc
import importlib
import logging
import os
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STAGES = ("convert", "flag", "calibrate", "apply", "image")


def _available(module: str, *names: str) -> bool:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return all(hasattr(mod, n) for n in names)


def stage_available(stage: str) -> bool:
    """Whether this installation implements ``stage``."""
    if stage in ("convert", "flag"):
        return True
    if stage == "calibrate":
        return _available("contimg.calibrate", "calibrate_ms", "find_calibrator")
    if stage == "apply":
        return _available("contimg.calibrate", "apply_ms")
    if stage == "image":
        return _available("contimg.imaging", "image_ms")
    raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")


def _plain(obj):
    """A JSON-friendly copy of a result (dataclass, numpy scalars, paths)."""
    import numpy as np

    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 64 else f"array{obj.shape}"
    if isinstance(obj, Path):
        return str(obj)
    return obj


@contextmanager
def local_dask():
    """Inside a Dask worker task, graphs built and computed by a stage run on local
    threads: without this, dask would pick the worker's distributed client at graph
    construction (P2P rechunks, tasks scheduled back onto the busy cluster) and then fail
    or deadlock when the stage computes with the threaded scheduler."""
    import dask

    # dask's configuration is process-wide and ``config.set`` restores what it saw on
    # entry: two worker threads running stages at once would unset it under each
    # other's feet and leave it set for good. The first stage in sets it, the last out
    # restores it.
    global _LOCAL_USERS, _LOCAL_CFG
    with _LOCAL_LOCK:
        if _LOCAL_USERS == 0:
            _LOCAL_CFG = dask.config.set({"scheduler": "threads",
                                          "array.rechunk.method": "tasks"})
        _LOCAL_USERS += 1
    try:
        yield
    finally:
        with _LOCAL_LOCK:
            _LOCAL_USERS -= 1
            if _LOCAL_USERS == 0:
                _LOCAL_CFG.__exit__(None, None, None)
                _LOCAL_CFG = None


_LOCAL_LOCK = threading.Lock()
_LOCAL_USERS = 0
_LOCAL_CFG = None


def _worker_threads() -> int:
    """Threads of the Dask worker running this task (the CPU share a stage may use)."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return os.cpu_count() or 1


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


class StageError(RuntimeError):
    """A stage failed on a worker. Carries the original error as text only: no
    traceback, so nothing the stage opened stays alive after it (see ``_stage``)."""


def open_tables(path) -> list[str]:
    """dask-ms table proxies this process still holds on ``path`` (tables or subtables)."""
    try:
        from daskms.table_proxy import _table_cache
    except ImportError:  # pragma: no cover - private dask-ms detail
        return []
    prefix = os.path.abspath(str(path)).rstrip("/")
    return [repr(p) for p in list(_table_cache.values()) if prefix in repr(p)]


def _stage(fn):
    """Run a stage so that it leaves nothing open behind it, whether it succeeds or not.

    dask-ms keeps a table proxy (and casacore its table cache entry) alive for as long
    as anything references it. A failed task's exception and traceback are kept by the
    Dask worker, and the traceback's frames reference the stage's Datasets: a retry of
    the group in the same worker process would then see the old tables through
    casacore's cache. So the failure is re-raised as a :class:`StageError` that holds
    only text (the full traceback goes to this worker's log), and reference cycles are
    collected before the stage returns.
    """

    @functools.wraps(fn)
    def run(ms_path, *args, **kw):
        failure = None
        try:
            return fn(ms_path, *args, **kw)
        except Exception as exc:  # noqa: BLE001 - re-raised below, as text
            # as text: a log record holding exc_info would keep the frames alive
            log.error("%s(%s) failed:\n%s", fn.__name__, ms_path, traceback.format_exc())
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            gc.collect()
            left = open_tables(ms_path)
            if left:
                log.warning("%s(%s): %d dask-ms table(s) still open after the stage",
                            fn.__name__, ms_path, len(left))
        raise StageError(failure)

    return run


@_stage
def stage_flag(ms_path: str, strategy=None) -> dict:
    """RFI-flag the MS in place (``contimg.flagging.flag_ms``); the flag fraction."""
    from contimg.flagging import default_summary_path, flag_ms

    t0 = time.perf_counter()
    with local_dask():
        s = flag_ms(ms_path, strategy=strategy, backup=False,
                    summary_path=default_summary_path(ms_path))
    return {"status": "ok", "seconds": time.perf_counter() - t0,
            "flagged_before": s["before"]["overall"], "flagged": s["after"]["overall"]}


@_stage
def stage_calibrate(ms_path: str, *, db_path: str, cal_dir: str, name: str,
                    catalog=None, refant=None) -> dict:
    """Solve bandpass and gains if a calibrator transits in the MS; the solutions are
    written as CASA tables in ``cal_dir`` and registered in the state database. A solve
    that fails its quality checks is registered as rejected (by ``calibrate_ms``) and
    reported here as ``status="rejected"``: it is not a failure of the group."""
    if not stage_available("calibrate"):
        return skipped("calibration is not available in this installation")
    from contimg import calibrate

    with local_dask():
        matches = calibrate.find_calibrator(ms_path, catalog=catalog)
    if not matches:
        return skipped("no calibrator transits in the primary beam")
    os.makedirs(cal_dir, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with local_dask():
            res = calibrate.calibrate_ms(ms_path, out_dir=cal_dir, catalog=catalog,
                                         refant=refant, db=db_path, name=name)
    except calibrate.CalibrationError as exc:
        log.warning("%s: calibration rejected: %s", ms_path, exc)
        return {"status": "rejected", "reason": f"{type(exc).__name__}: {exc}",
                "seconds": time.perf_counter() - t0}
    out = _plain(res)
    out.update(status="ok", seconds=time.perf_counter() - t0)
    return out


@_stage
def stage_apply(ms_path: str, *, db_path: str, t_mid: float) -> dict:
    """Apply the valid calibration set nearest in time (CORRECTED_DATA)."""
    if not stage_available("apply"):
        return skipped("calibration is not available in this installation")
    from contimg import calibrate
    from contimg.state import StateDB

    with StateDB(db_path) as db:
        cs = db.find_calset(t_mid)
    if cs is None:
        return skipped("no valid calibration set in the database")
    if not cs["in_window"]:
        log.warning("%s: no calibration set valid at this time; using the nearest, %s "
                    "(transit %.0f s away)", ms_path, cs["name"], abs(cs["t_transit"] - t_mid))
    t0 = time.perf_counter()
    with local_dask():
        calibrate.apply_ms(ms_path, cs["tables"])
    return {"status": "ok", "seconds": time.perf_counter() - t0, "calset_id": cs["id"],
            "calset": cs["name"], "in_window": bool(cs["in_window"])}


@_stage
def stage_image(ms_path: str, *, prefix: str, options: dict | None = None) -> dict:
    """Image the MS (CORRECTED_DATA when present) to FITS files ``<prefix>-*.fits``."""
    if not stage_available("image"):
        return skipped("imaging is not available in this installation")
    from contimg import imaging

    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    options = dict(options or {})
    # one gridding task per thread of this worker, each single-threaded: the stage
    # computes on local threads (see local_dask), not on the cluster's scheduler
    options.setdefault("grid_tasks", _worker_threads())
    options.setdefault("nthreads", 1)
    # the quick-look image: one major cycle fewer than the library's 0.8 (see
    # contimg.imaging.image_dataset's mgain), same residual noise on a full group
    options.setdefault("mgain", 0.9)
    t0 = time.perf_counter()
    with local_dask():
        res = imaging.image_ms(ms_path, prefix, **options)
    out = _plain(res)
    out.update(status="ok", seconds=time.perf_counter() - t0)
    return out
