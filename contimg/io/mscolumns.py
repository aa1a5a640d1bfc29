"""Write Dataset-shaped blocks back into the columns of an existing Measurement Set.

:func:`contimg.io.ms.open_ms` reads an MS into the contract Dataset; what a stage
computes from it (new FLAGs, CORRECTED_DATA) goes back through these: the MS's row
:class:`Layout` (which MS row holds each (time, baseline), which MS channel each
ascending channel), :func:`put_block` for one computed block, and :class:`StoreTarget`
to ``da.store`` a lazy array block by block. All casacore calls run in the MS's dask-ms
table thread (:func:`ms_proxy`, :func:`run_in_table`): casacore is not thread-safe.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import numpy as np

from contimg.io.ms import MSFormatError

log = logging.getLogger(__name__)

__all__ = ["Layout", "RowTarget", "StoreTarget", "baseline_block_reads", "get_cells",
           "ms_proxy", "put_block", "put_flag_row", "read_layout", "read_proxy", "read_rows",
           "row_runs", "run_in_table"]


def ms_proxy(path):
    """A writable dask-ms TableProxy of the MS, on dask-ms's executor for this MS.

    dask-ms runs every call of every proxy with the same executor key in one thread,
    and its readers of ``path`` (:func:`open_ms`) use ``executor_key(path)``: so all
    casacore I/O on the MS in this process happens in that one thread.
    """
    from casacore import tables as ct
    from daskms.table_executor import executor_key
    from daskms.table_proxy import TableProxy

    try:
        return TableProxy(ct.table, path, ack=False, readonly=False, lockoptions="user",
                          __executor_key__=executor_key(path))
    except Exception as exc:
        raise MSFormatError(f"{path}: cannot open the MS for writing ({exc})") from exc


def run_in_table(proxy, fn, *args, write=True):
    """Run ``fn(table, *args)`` in the MS's table thread (under a write lock)."""
    from daskms.table_proxy import NOLOCK, WRITELOCK

    return proxy.submit(fn, WRITELOCK if write else NOLOCK, *args).result()


@dataclass
class Layout:
    """Where each Dataset (time, baseline) and channel lives in the MS."""

    nrow: int
    ntime: int
    nbl: int
    npol: int
    pos: np.ndarray          # (ntime * nbl,) MS row of each (time, baseline); -1: missing
    identity: bool           # pos == arange(nrow) (the layout write_ms produces)
    swapped: np.ndarray      # (ntime * nbl,) rows stored as (ant2, ant1)
    perm: np.ndarray         # polarization permutation of a swapped row
    chan_ms: np.ndarray      # (nchan,) MS channel of each (ascending) Dataset channel


def read_layout(tb, path, ds):
    """In the table thread: map the Dataset of :func:`open_ms` back to MS rows."""
    from casacore import tables as ct

    time_col = tb.getcol("TIME")
    a1 = tb.getcol("ANTENNA1").astype(np.int64)
    a2 = tb.getcol("ANTENNA2").astype(np.int64)
    ddid = int(tb.getcell("DATA_DESC_ID", 0))
    nrow = time_col.size
    with ct.table(os.path.join(path, "DATA_DESCRIPTION"), ack=False) as t:
        spw = int(t.getcell("SPECTRAL_WINDOW_ID", ddid))
    with ct.table(os.path.join(path, "SPECTRAL_WINDOW"), ack=False) as t:
        freq_ms = np.asarray(t.getcell("CHAN_FREQ", spw), dtype=np.float64)

    ntime, nbl = ds.sizes["time"], ds.sizes["baseline_id"]
    pols = [str(p) for p in ds["polarization"].values]
    chan_ms = np.argsort(freq_ms, kind="stable")
    if not np.array_equal(freq_ms[chan_ms], np.asarray(ds["frequency"].values)):
        raise MSFormatError(f"{path}: channel frequencies changed while flagging")

    times, t_index = np.unique(time_col, return_inverse=True)
    if times.size != ntime:
        raise MSFormatError(f"{path}: {times.size} distinct TIMEs, the Dataset has {ntime}")
    lo, hi = np.minimum(a1, a2), np.maximum(a1, a2)
    big = int(max(hi.max(), np.max(ds["baseline_antenna2_id"].values)) + 1)
    key = lo * big + hi
    ds_key = (np.asarray(ds["baseline_antenna1_id"].values, np.int64) * big
              + np.asarray(ds["baseline_antenna2_id"].values, np.int64))
    order = np.argsort(ds_key)
    idx = np.searchsorted(ds_key[order], key)
    idx = np.minimum(idx, nbl - 1)
    if not np.array_equal(ds_key[order][idx], key):
        raise MSFormatError(f"{path}: rows with baselines the Dataset does not have")
    b_index = order[idx]
    flat = t_index.ravel() * nbl + b_index
    pos = np.full(ntime * nbl, -1, dtype=np.int64)
    pos[flat] = np.arange(nrow)
    if np.count_nonzero(pos >= 0) != nrow:
        raise MSFormatError(f"{path}: some (TIME, ANTENNA1, ANTENNA2) appear in more "
                            "than one row")
    swapped = np.zeros(ntime * nbl, dtype=bool)
    swapped[flat] = a1 > a2
    perm = np.array([pols.index(p[::-1]) if (len(p) == 2 and p[::-1] in pols) else i
                     for i, p in enumerate(pols)], dtype=np.int64)
    identity = bool(nrow == ntime * nbl and np.array_equal(pos, np.arange(nrow)))
    return Layout(nrow=nrow, ntime=ntime, nbl=nbl, npol=len(pols), pos=pos,
                   identity=identity, swapped=swapped, perm=perm, chan_ms=chan_ms)


def row_runs(rows):
    """Contiguous runs of MS rows: [(first row, positions in ``rows``)], -1 skipped."""
    valid = np.nonzero(rows >= 0)[0]
    if valid.size == 0:
        return []
    srt = valid[np.argsort(rows[valid], kind="stable")]
    r = rows[srt]
    breaks = np.nonzero(np.diff(r) != 1)[0] + 1
    return [(int(r[s[0]]), srt[s]) for s in np.split(np.arange(r.size), breaks)]


def put_block(tb, layout, column, tsl, bsl, csl, block):
    """In the table thread: write one Dataset block (``time, baseline, frequency,
    polarization`` slices ``tsl, bsl, csl``) of ``column`` into the MS: FLAG-like
    columns as they are, visibility columns in the MS's conjugation (see
    :mod:`contimg.io.ms`: ``DATA = conj(VISIBILITY)``; a row stored as (ant2, ant1)
    holds the other baseline direction, cross-hands exchanged)."""
    nt, nb, nc = tsl.stop - tsl.start, bsl.stop - bsl.start, csl.stop - csl.start
    cplx = np.iscomplexobj(block)
    data = np.ascontiguousarray(block).reshape(nt * nb, nc, layout.npol)
    flat = (np.arange(tsl.start, tsl.stop)[:, None] * layout.nbl
            + np.arange(bsl.start, bsl.stop)[None, :]).ravel()
    rows = layout.pos[flat]
    sw = layout.swapped[flat]
    if cplx:
        data = np.conj(data)        # a copy
    if sw.any():
        data = data.copy() if not cplx else data
        data[sw] = (np.conj(data[sw]) if cplx else data[sw])[:, :, layout.perm]
    ms_ch = layout.chan_ms[csl]
    step = np.diff(ms_ch)
    if nc == 1 or np.all(step == 1):
        reverse, lo_ch = False, int(ms_ch[0])
    elif np.all(step == -1):
        reverse, lo_ch = True, int(ms_ch[-1])
    else:
        reverse, lo_ch = None, None   # scattered channels: read-modify-write cells
    if layout.identity and nb == layout.nbl:
        runs = [(int(tsl.start * layout.nbl), None)]
    else:
        runs = row_runs(rows)
    for r0, sel in runs:
        part = data if sel is None else data[sel]
        n = part.shape[0]
        if reverse is None:
            cells = tb.getcol(column, startrow=r0, nrow=n)
            cells[:, ms_ch, :] = part
            tb.putcol(column, cells, startrow=r0, nrow=n)
            continue
        if reverse:
            part = part[:, ::-1]
        tb.putcolslice(column, np.ascontiguousarray(part), [lo_ch, 0],
                       [lo_ch + nc - 1, layout.npol - 1], startrow=r0, nrow=n)


def put_flag_row(tb, layout, flag_row):
    """In the table thread: FLAG_ROW from the (time, baseline) all-flagged array."""
    if "FLAG_ROW" not in tb.colnames():
        return
    fr = np.zeros(layout.nrow, dtype=bool)
    flat = np.asarray(flag_row, dtype=bool).ravel()
    ok = layout.pos >= 0
    fr[layout.pos[ok]] = flat[ok]
    tb.putcol("FLAG_ROW", fr)
    tb.flush()


class StoreTarget:
    """``da.store`` target: hands each computed block to the MS's table thread.

    ``__setitem__`` runs in a scheduler thread and waits for its write, so at most one
    block per scheduler thread is held. After :meth:`close` no further write is
    queued (blocks of a failed compute still running in other threads are dropped),
    so a restore queued after it runs last.
    """

    def __init__(self, proxy, layout, n_blocks, progress, put, *args):
        self.proxy, self.layout = proxy, layout
        self.put, self.args = put, args
        self.n_blocks, self.progress = n_blocks, progress
        self.done = 0
        self._lock = threading.Lock()
        self._closed = False

    def close(self):
        with self._lock:
            self._closed = True

    def __setitem__(self, key, value):
        from daskms.table_proxy import WRITELOCK

        tsl, bsl, csl = (slice(*k.indices(n)) for k, n in zip(
            key[:3], (self.layout.ntime, self.layout.nbl, self.layout.chan_ms.size),
            strict=True))
        with self._lock:
            if self._closed:
                raise RuntimeError("writing was stopped")
            fut = self.proxy.submit(self.put, WRITELOCK, self.layout, *self.args, tsl,
                                    bsl, csl, value)
        fut.result()
        with self._lock:
            self.done += 1
            done = self.done
        log.debug("wrote a block time %s baseline %s channel %s (%d/%d)",
                  tsl, bsl, csl, done, self.n_blocks)
        if self.progress is not None:
            self.progress(done, self.n_blocks)


# ---------------------------------------------------------------------------------
# whole rows, in the MS's own order (contiguous runs: the fastest way through a tiled MS)
# ---------------------------------------------------------------------------------


def _getcol(tb, column, r0, n):
    return tb.getcol(column, startrow=r0, nrow=n)


def _read_in_table(proxy, column, r0, n):
    from daskms.table_proxy import NOLOCK

    return proxy.submit(_getcol, NOLOCK, column, r0, n).result()


def read_rows(proxy, column, nrow, step, cell_shape, dtype, name):
    """Lazy ``column`` of an MS, ``(row, *cell_shape)`` in chunks of ``step`` rows, each
    read in the MS's table thread (task names ``<name>-r<k>``). The caller holds the
    table's lock for the whole computation (no lock is taken per read)."""
    import dask
    import dask.array as da

    parts = []
    for k, r0 in enumerate(range(0, nrow, step)):
        n = min(step, nrow - r0)
        d = dask.delayed(_read_in_table)(proxy, column, r0, n,
                                         dask_key_name=f"{name}-r{k:03d}")
        parts.append(da.from_delayed(d, (n,) + tuple(cell_shape), dtype=dtype))
    return da.concatenate(parts, axis=0)


def _putcol(tb, column, value, r0):
    tb.putcol(column, value, startrow=r0, nrow=value.shape[0])


class RowTarget:
    """``da.store`` target of a row-major array ``(row, ...)``: each block written as
    ``putcol`` of its rows in the MS's table thread (under the caller's lock)."""

    def __init__(self, proxy, column):
        self.proxy, self.column = proxy, column

    def __setitem__(self, key, value):
        from daskms.table_proxy import NOLOCK

        rows = key[0] if isinstance(key, tuple) else key
        self.proxy.submit(_putcol, NOLOCK, self.column, np.ascontiguousarray(value),
                          int(rows.start or 0)).result()


# ---------------------------------------------------------------------------------
# baseline blocks: every integration of some baselines, one frequency chunk
# ---------------------------------------------------------------------------------


def read_proxy(path):
    """A read-only dask-ms TableProxy of the MS on the executor of its readers."""
    from casacore import tables as ct
    from daskms.table_executor import executor_key
    from daskms.table_proxy import TableProxy

    return TableProxy(ct.table, path, ack=False, readonly=True, lockoptions="user",
                      __executor_key__=executor_key(path))


def _defined(tb, column):
    return column in tb.colnames() and tb.nrows() > 0 and tb.iscelldefined(column, 0)


def get_cells(tb, layout, column, conj, bsl, csl, weights=True):
    """In the table thread: ``(VISIBILITY, FLAG, WEIGHT)`` of every integration of the
    Dataset's baselines ``bsl`` and channels ``csl`` (``(ntime, nbl, nchan, npol)``),
    exactly as :func:`contimg.io.ms.open_ms` gives them: visibilities conjugated when
    ``conj`` (the "ms" convention), FLAG_ROW folded into FLAG, WEIGHT broadcast when
    WEIGHT_SPECTRUM holds no data, channels ascending, rows stored as (ant2, ant1)
    turned round, missing rows zero, flagged and of weight 0. With ``weights=False``
    the weights are neither read nor returned (WEIGHT is None)."""
    nt, nb = layout.ntime, bsl.stop - bsl.start
    ch = layout.chan_ms[csl]
    lo, hi = int(ch.min()), int(ch.max())
    take = None if np.array_equal(ch, np.arange(lo, hi + 1)) else ch - lo
    nc, npol = ch.size, layout.npol
    flat = (np.arange(nt)[:, None] * layout.nbl
            + np.arange(bsl.start, bsl.stop)[None, :]).ravel()
    rows = layout.pos[flat]
    vis = np.zeros((nt * nb, nc, npol), np.complex64)
    flag = np.ones((nt * nb, nc, npol), bool)
    weight = np.zeros((nt * nb, nc, npol), np.float32) if weights else None
    use_ws = weights and _defined(tb, "WEIGHT_SPECTRUM")
    has_fr = _defined(tb, "FLAG_ROW")
    blc, trc = [lo, 0], [hi, npol - 1]
    for r0, sel in row_runs(rows):
        n = sel.size
        a = int(sel[0])
        if take is None and (use_ws or not weights) and sel[-1] == a + n - 1:
            # a run into consecutive cells: read straight into the blocks (no copies)
            tb.getcolslicenp(column, vis[a:a + n], blc, trc, startrow=r0, nrow=n)
            tb.getcolslicenp("FLAG", flag[a:a + n], blc, trc, startrow=r0, nrow=n)
            if weights:
                tb.getcolslicenp("WEIGHT_SPECTRUM", weight[a:a + n], blc, trc,
                                 startrow=r0, nrow=n)
            if conj:
                np.conjugate(vis[a:a + n], out=vis[a:a + n])
            if has_fr:
                flag[a:a + n] |= tb.getcol("FLAG_ROW", startrow=r0,
                                           nrow=n).astype(bool)[:, None, None]
            continue
        d = tb.getcolslice(column, blc, trc, startrow=r0, nrow=n)
        f = tb.getcolslice("FLAG", blc, trc, startrow=r0, nrow=n).astype(bool)
        if take is not None:
            d, f = d[:, take], f[:, take]
        if has_fr:
            f |= tb.getcol("FLAG_ROW", startrow=r0, nrow=n).astype(bool)[:, None, None]
        vis[sel] = np.conj(d) if conj else d
        flag[sel] = f
        del d, f
        if weights:
            w = (tb.getcolslice("WEIGHT_SPECTRUM", blc, trc, startrow=r0, nrow=n)
                 if use_ws else tb.getcol("WEIGHT", startrow=r0, nrow=n)[:, None, :])
            weight[sel] = w[:, take] if use_ws and take is not None else w
    sw = layout.swapped[flat] & (rows >= 0)
    if sw.any():          # a swapped row holds V21 = conj(V12), cross-hands exchanged
        vis[sw] = np.conj(vis[sw])[:, :, layout.perm]
    shape = (nt, nb, nc, npol)
    return (vis.reshape(shape), flag.reshape(shape),
            None if weight is None else weight.reshape(shape))


def _read_cells(proxy, layout, column, conj, bsl, csl):
    from daskms.table_proxy import READLOCK

    return proxy.submit(get_cells, READLOCK, layout, column, conj, bsl, csl).result()


def baseline_block_reads(ds, block, column="DATA"):
    """``ds`` (of :func:`contimg.io.ms.open_ms`, every row of its MS) with VISIBILITY,
    FLAG and WEIGHT read in blocks of every integration of ``block`` baselines and one
    of ``ds``'s frequency chunks (one read of the MS each, in its table thread): no task
    then needs a chunk of every baseline, whose size grows with the array. ``column``:
    the data column ``ds`` was opened with."""
    import dask
    import dask.array as da
    import xarray as xr

    path = ds.attrs["ms_path"]
    conj = ds.attrs.get("ms_conjugation", "ms") == "ms"
    proxy = read_proxy(path)
    layout = run_in_table(proxy, read_layout, path, ds, write=False)
    nt, nbl = ds.sizes["time"], ds.sizes["baseline_id"]
    npol = ds.sizes["polarization"]
    fchunks = ds.VISIBILITY.data.chunks[2] if hasattr(ds.VISIBILITY.data, "chunks") else (
        ds.sizes["frequency"],)
    tok = dask.base.tokenize(path, column, conj, nt, nbl, block, fchunks)
    rows = {"VISIBILITY": [], "FLAG": [], "WEIGHT": []}
    dtypes = {"VISIBILITY": np.complex64, "FLAG": bool, "WEIGHT": np.float32}
    for j, b0 in enumerate(range(0, nbl, block)):
        bsl = slice(b0, min(b0 + block, nbl))
        row = {k: [] for k in rows}
        c0 = 0
        for k, nfk in enumerate(fchunks):
            d = dask.delayed(_read_cells, pure=True, nout=3)(
                proxy, layout, column, conj, bsl, slice(c0, c0 + nfk),
                dask_key_name=f"ms-block-{tok}-{j:04d}-{k:04d}")
            shape = (nt, bsl.stop - bsl.start, nfk, npol)
            for i, name in enumerate(rows):
                row[name].append(da.from_delayed(d[i], shape, dtype=dtypes[name]))
            c0 += nfk
        for name in rows:
            rows[name].append(da.concatenate(row[name], axis=2))
    out = ds.copy()
    for name, parts in rows.items():
        out[name] = xr.DataArray(da.concatenate(parts, axis=1), dims=ds[name].dims,
                                 coords=ds[name].coords, attrs=ds[name].attrs)
    return out
