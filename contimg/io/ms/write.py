"""Writing a contract Dataset to a Measurement Set, atomically: the MS is built at a
temporary path (MAIN table, then subtables) and renamed into place."""

from __future__ import annotations

import logging
import os
import shutil
import time as _time

from contimg.io.files import finalise
from contimg.io.ms.common import ATTRS_KEYWORD
from contimg.io.ms.main_table import main_table_desc, write_main
from contimg.io.ms.plan import WritePlan
from contimg.io.ms.subtables import write_subtables
from graphs import contract

__all__ = ["write_ms"]

log = logging.getLogger(__name__)


def _warn_if_open(path):
    """Warn when this process still holds dask-ms handles on an MS being replaced.

    casacore caches open tables by name: a reader opened before the rename keeps
    seeing the old files, and so would a new ``casacore.tables.table(path)``.
    """
    try:
        from daskms.table_proxy import _table_cache
    except ImportError:  # pragma: no cover - private dask-ms detail
        return
    prefix = path.rstrip("/")
    for proxy in list(_table_cache.values()):
        if prefix in repr(proxy):
            log.warning("%s is open in this process (dask-ms); those readers keep seeing "
                        "the old MS, and casacore may serve it from its table cache. "
                        "Drop them before overwriting.", path)
            return


def _build(tmp, plan, *, submit, prefetch, flags, history):
    """Write the whole MS at ``tmp``; on any exception remove it and re-raise."""
    from casacore import tables as ct

    ms = None
    try:
        desc, dminfo = main_table_desc(plan)
        ms = ct.default_ms(tmp, desc, dminfo)
        ms.addrows(plan.nrow)
        ms.putkeyword(ATTRS_KEYWORD, plan.attrs_json)
        write_main(ms, plan, submit=submit, prefetch=prefetch, flags=flags)
        ms.flush()
        ms.close()
        ms = None
        write_subtables(tmp, plan, history)
    except BaseException:
        if ms is not None:
            try:
                ms.close()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp, path):
    """Rename ``tmp`` to ``path``; an old MS there is removed only once the new one is
    in place (and put back if the rename fails)."""
    old = None
    if os.path.lexists(path):
        _warn_if_open(path)
        old = f"{path}.old-{os.getpid()}"
        os.rename(path, old)
    try:
        os.rename(finalise(tmp), path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_ms(ds, path, *, overwrite=False, model_data=False, corrected_data=False,
             history=None, submit=None, prefetch=1, flags=None, stats=None):
    """Write a contract Dataset to a CASA Measurement Set at ``path``.

    Parameters
    ----------
    ds : xarray.Dataset
        A visibility Dataset following :mod:`graphs.contract` (numpy- or dask-backed).
        It is computed one (time chunk, frequency chunk) block at a time, in the
        Dataset's own dask chunks (numpy-backed: 48-channel, <=128 MiB blocks).
    path : str or os.PathLike
        Output MS directory.
    overwrite : bool
        Replace an existing ``path`` (only once the new MS is complete).
    model_data, corrected_data : bool or str
        Add MODEL_DATA / CORRECTED_DATA. ``True`` initialises them as CASA's
        ``clearcal`` does (MODEL_DATA = 1 on the parallel hands, CORRECTED_DATA =
        DATA); a string names a Dataset variable with the visibility dims to write.
    history : str or list of str, optional
        Extra HISTORY messages.
    submit : callable, optional
        ``submit(named, (ti, fi))`` starts computing one block's ``(column, dask
        array)`` list and returns an object with ``result()`` (see
        :func:`contimg.convert`, which pins a block's reads to the worker that holds
        its file, and :func:`contimg.io.ms.main_table.write_main`). Default:
        ``dask.compute`` in a thread.
    prefetch : int
        Blocks computed ahead of the one being written (memory: prefetch + 1 blocks).
    flags : callable, optional
        Called once the other columns are written; returns the final FLAG cube
        ``(time, baseline_id, frequency, polarization)`` (e.g. the result of a flagging
        graph that ran while the visibilities were being written), from which FLAG and
        FLAG_ROW are written instead of from ``ds.FLAG``.
    stats : dict, optional
        Filled with ``seconds`` (the whole write) and ``wait_s`` (of it, waiting for
        computed blocks).

    Returns
    -------
    str
        The path written.
    """
    path = os.path.abspath(os.fspath(path))
    contract.validate(ds, name=f"Dataset for {path}")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{path}: parent directory {parent} does not exist")
    plan = WritePlan(ds, model_data, corrected_data)
    tmp = f"{path}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp, ignore_errors=True)

    t_begin = _time.perf_counter()
    _build(tmp, plan, submit=submit, prefetch=prefetch, flags=flags, history=history)
    _move_into_place(tmp, path)
    if stats is not None:
        stats.update(seconds=_time.perf_counter() - t_begin, wait_s=plan.wait_s)
    log.info("wrote %s: %d rows x %d channels x %d correlations, %d field(s) in %.2f s "
             "(%.2f s of it waiting for data)", path, plan.nrow, plan.nchan, plan.npol,
             plan.nfield, _time.perf_counter() - t_begin, plan.wait_s)
    return path
