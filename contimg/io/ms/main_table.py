"""The MAIN table of the MS :func:`write_ms` writes: its description (tiled storage) and
its filling, block by block, while the next block is being computed."""

from __future__ import annotations

import collections
import concurrent.futures as _futures
import logging
import time as _time

import numpy as np

from contimg.io.ms.plan import prepare_ms_block

__all__ = ["main_table_desc", "write_main"]

log = logging.getLogger(__name__)

#: parallel hands, set to 1 in a "unity" MODEL_DATA (CASA clearcal's model)
_PARALLEL_HANDS = ("XX", "YY", "RR", "LL", "I")


def main_table_desc(plan):
    """(table description, data-manager info) of MAIN: DATA, FLAG, WEIGHT_SPECTRUM (and
    MODEL_DATA/CORRECTED_DATA when asked) and UVW tiled, slow scalars incremental."""
    from casacore import tables as ct

    desc = ct.required_ms_desc("MAIN")
    shape = [plan.nchan, plan.npol]
    tile = np.array([plan.npol, plan.tile_chan, plan.tile_rows], dtype=np.int32)
    cols = []
    for name, value, comment in (
        ("DATA", np.complex64(0), "The data column"),
        ("MODEL_DATA", np.complex64(0), "The model data column"),
        ("CORRECTED_DATA", np.complex64(0), "The corrected data column"),
    ):
        if name == "DATA" or name in plan.extra:
            cols.append(ct.makearrcoldesc(
                name, value, shape=shape, valuetype="complex",
                datamanagertype="TiledColumnStMan", datamanagergroup=f"Tiled{name}",
                comment=comment))
    cols.append(ct.makearrcoldesc(
        "WEIGHT_SPECTRUM", 0.0, shape=shape, valuetype="float",
        datamanagertype="TiledColumnStMan", datamanagergroup="TiledWEIGHT_SPECTRUM",
        comment="Weight for each data point"))
    for c in cols:
        desc.update(ct.maketabdesc(c))
    # FLAG: fixed shape, tiled like DATA
    desc["FLAG"].update(shape=np.array(shape), option=5, dataManagerType="TiledColumnStMan",
                        dataManagerGroup="TiledFLAG")
    desc["UVW"].update(dataManagerType="TiledColumnStMan", dataManagerGroup="TiledUVW")
    desc["UVW"]["keywords"]["MEASINFO"] = {"type": "uvw", "Ref": "ICRS"}
    desc["WEIGHT"].update(shape=np.array([plan.npol]), option=5)
    desc["SIGMA"].update(shape=np.array([plan.npol]), option=5)
    desc["FLAG_CATEGORY"].update(dataManagerType="TiledShapeStMan",
                                 dataManagerGroup="TiledFLAG_CATEGORY")
    for key in ("ARRAY_ID", "EXPOSURE", "FEED1", "FEED2", "FIELD_ID", "INTERVAL",
                "OBSERVATION_ID", "PROCESSOR_ID", "SCAN_NUMBER", "STATE_ID", "TIME",
                "TIME_CENTROID", "DATA_DESC_ID"):
        desc[key].update(dataManagerType="IncrementalStMan", dataManagerGroup=key)
    group_spec = {
        f"Tiled{n}": {"DEFAULTTILESHAPE": tile, "MAXIMUMCACHESIZE": 0}
        for n in ("DATA", "MODEL_DATA", "CORRECTED_DATA", "WEIGHT_SPECTRUM", "FLAG")
    }
    group_spec["TiledUVW"] = {
        "DEFAULTTILESHAPE": np.array([3, max(1024, plan.tile_rows)], dtype=np.int32),
        "MAXIMUMCACHESIZE": 0}
    group_spec["TiledFLAG_CATEGORY"] = {
        "DEFAULTTILESHAPE": np.array([1, plan.npol, plan.tile_chan, 64], dtype=np.int32)}
    dminfo = ct.makedminfo(desc, group_spec)
    return desc, dminfo


class _SubmittedBlock:
    """A block whose lazy columns were handed to ``submit``; ``result()`` gives the
    prepared numpy block (see :func:`prepare_ms_block`)."""

    def __init__(self, done, lazy, handle):
        self.done, self.lazy, self.handle = done, lazy, handle

    def result(self):
        vals = dict(self.done)
        if self.handle is not None:
            got = self.handle.result()
            if isinstance(got, dict):
                if got.get("_ms_ready") and self.done:
                    raise RuntimeError("submit returned a prepared block but some columns "
                                       "were not submitted")
                vals.update(got)
            else:
                vals.update({n: v for (n, _), v in zip(self.lazy, got, strict=True)})
        return prepare_ms_block(vals)

    def cancel(self):
        if self.handle is not None and hasattr(self.handle, "cancel"):
            self.handle.cancel()


def _block_starter(plan, pool, submit):
    """``start(ti, fi)``: begin computing a block; returns an object with ``result()``."""
    if submit is None:
        return lambda ti, fi: pool.submit(plan.compute_block, ti, fi)

    def start(ti, fi):
        done, lazy = plan.split_block(ti, fi)
        handle = submit(lazy, (ti, fi)) if lazy else None
        return _SubmittedBlock(done, lazy, handle)
    return start


def _block_rows(plan, ti):
    """(first integration, last + 1, first row, rows) of time chunk ``ti``."""
    t0, t1 = int(plan.tstarts[ti]), int(plan.tstarts[ti + 1])
    return t0, t1, t0 * plan.nbl, (t1 - t0) * plan.nbl


def _block_chans(plan, fi):
    return int(plan.fstarts[fi]), int(plan.fstarts[fi + 1])


def _extra_column(plan, how, vals, col, nr, c0, c1):
    """The block of MODEL_DATA / CORRECTED_DATA to write (see ``WritePlan._columns``)."""
    if how == "var":
        return vals[col]
    if how == "copy":
        return vals["DATA"]
    arr = np.zeros((nr, c1 - c0, plan.npol), dtype=np.complex64)
    for p, lab in enumerate(plan.pols):
        if lab in _PARALLEL_HANDS:
            arr[:, :, p] = 1.0
    return arr


def _put_block(ms, plan, vals, ti, fi, flags):
    """The cell columns of one (time chunk, frequency chunk) block."""
    _, _, r0, nr = _block_rows(plan, ti)
    c0, c1 = _block_chans(plan, fi)
    blc, trc = [c0, 0], [c1 - 1, plan.npol - 1]
    for col in ("DATA", "WEIGHT_SPECTRUM") if flags else ("DATA", "FLAG", "WEIGHT_SPECTRUM"):
        ms.putcolslice(col, vals[col], blc, trc, startrow=r0, nrow=nr)
    for col, how in plan.extra.items():
        ms.putcolslice(col, _extra_column(plan, how, vals, col, nr, c0, c1), blc, trc,
                       startrow=r0, nrow=nr)


def _put_row_weights(ms, plan, ti, flag_row, wsum, flags):
    """WEIGHT (mean over channels), SIGMA and FLAG_ROW of a time chunk's rows."""
    _, _, r0, nr = _block_rows(plan, ti)
    weight = (wsum / plan.nchan).astype(np.float32)
    with np.errstate(divide="ignore"):
        sigma = np.where(weight > 0, 1.0 / np.sqrt(weight), 0.0).astype(np.float32)
    ms.putcol("WEIGHT", weight, startrow=r0, nrow=nr)
    ms.putcol("SIGMA", sigma, startrow=r0, nrow=nr)
    if not flags:
        ms.putcol("FLAG_ROW", flag_row, startrow=r0, nrow=nr)


def _write_row_columns(ms, plan, ti, uvw):
    """The per-row columns of a time chunk: times, antennas, field, ids, UVW."""
    t0, t1, r0, nr = _block_rows(plan, ti)
    nbl, nt = plan.nbl, t1 - t0
    tcol = np.repeat(plan.mjd[t0:t1], nbl)
    interval = (np.full(nr, plan.integration_time) if plan.row_interval is None
                else plan.row_interval[t0:t1].reshape(nr))
    zeros = np.zeros(nr, dtype=np.int32)
    columns = {
        "TIME": tcol, "TIME_CENTROID": tcol,
        "ANTENNA1": np.tile(plan.a1, nt), "ANTENNA2": np.tile(plan.a2, nt),
        "FIELD_ID": np.repeat(plan.field_of_time[t0:t1], nbl),
        "INTERVAL": interval, "EXPOSURE": interval,
        **dict.fromkeys(("FEED1", "FEED2", "DATA_DESC_ID", "ARRAY_ID", "OBSERVATION_ID",
                         "PROCESSOR_ID", "STATE_ID"), zeros),
        "SCAN_NUMBER": zeros + 1,
        "UVW": -np.asarray(uvw, dtype=np.float64).reshape(nr, 3),
    }
    for col, values in columns.items():
        ms.putcol(col, values, startrow=r0, nrow=nr)


def _write_final_flags(ms, plan, flags):
    """FLAG and FLAG_ROW from the final flag cube ``flags()``, block by block."""
    t_a = _time.perf_counter()
    cube = np.asarray(flags())
    plan.wait_s += _time.perf_counter() - t_a
    want = (plan.ntime, plan.nbl, plan.nchan, plan.npol)
    if cube.shape != want or cube.dtype != bool:
        raise ValueError(f"final flags: expected a bool array of shape {want}, got "
                         f"{cube.dtype} {cube.shape}")
    npol = plan.npol
    for ti in range(len(plan.tchunks)):
        t0, t1, r0, nr = _block_rows(plan, ti)
        for fi in range(len(plan.fchunks)):
            c0, c1 = _block_chans(plan, fi)
            blk = np.ascontiguousarray(cube[t0:t1, :, c0:c1, :]).reshape(nr, c1 - c0, npol)
            ms.putcolslice("FLAG", blk, [c0, 0], [c1 - 1, npol - 1], startrow=r0, nrow=nr)
        ms.putcol("FLAG_ROW", cube[t0:t1].all(axis=(2, 3)).reshape(nr), startrow=r0,
                  nrow=nr)


def _cancel(futures):
    """Cancel started blocks and wait for the ones already running."""
    for fut in futures:
        fut.cancel()
        try:
            fut.result()
        except BaseException:  # noqa: BLE001 - the first error is the one raised
            pass


def write_main(ms, plan, submit=None, prefetch=1, flags=None):
    """Fill the MAIN table block by block; up to ``prefetch`` blocks are computed ahead.

    ``submit(named, block)`` (optional) starts computing ``named``, a list of
    ``(column, dask array)``, for block ``(ti, fi)`` and returns an object whose
    ``result()`` gives their numpy values as a list in that order, or a dict; the dict
    may already be prepared by :func:`prepare_ms_block` where it was computed (e.g. in a
    distributed task pinned to the worker that holds the block's file), which keeps the
    conjugation and row reductions off the writer's thread. The default computes one
    block ahead in a helper thread with ``dask.compute``, prepared there too.
    """
    blocks = list(plan.blocks())
    nf = len(plan.fchunks)
    with _futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ms-compute") as pool:
        start = _block_starter(plan, pool, submit)
        pending = collections.deque(start(*b) for b in blocks[:max(1, prefetch)])
        nxt = len(pending)
        future = None
        try:
            flag_row = wsum = None
            for ti, fi in blocks:
                future = pending.popleft()
                t_a = _time.perf_counter()
                vals = future.result()
                plan.wait_s += _time.perf_counter() - t_a
                future = None
                if nxt < len(blocks):
                    pending.append(start(*blocks[nxt]))
                    nxt += 1
                if fi == 0:
                    _write_row_columns(ms, plan, ti, vals["UVW"])
                    nr = _block_rows(plan, ti)[3]
                    flag_row = np.ones(nr, dtype=bool)
                    wsum = np.zeros((nr, plan.npol), dtype=np.float64)
                _put_block(ms, plan, vals, ti, fi, flags)
                flag_row &= vals["_flag_row"]
                wsum += vals["_wsum"]
                del vals
                if fi == nf - 1:
                    _put_row_weights(ms, plan, ti, flag_row, wsum, flags)
                log.debug("wrote block time chunk %d, channel chunk %d", ti, fi)
            if flags:
                _write_final_flags(ms, plan, flags)
        except BaseException:
            _cancel(([future] if future is not None else []) + list(pending))
            raise
