"""Applying bandpass and gain tables to a Measurement Set: any correlations, any field.

:func:`apply_ms` (re-exported by :mod:`contimg.calibrate`, where it is documented for
users) writes CORRECTED_DATA of an MS from B/G tables (ours or CASA's).

Correlations
    Solutions are per antenna and *feed* (the parallel hands solved: XX/YY, RR/LL, or
    one of them). Every correlation of the data is corrected by its two feeds' terms
    (:func:`corr_feeds`): parallel hands ``V_pp / (g_p conj(g_p))``, cross hands
    ``V_pq / (g_p conj(g_q))`` -- as CASA's ``applycal`` does with diagonal (G, B)
    Jones terms -- with :func:`kernels.jones.apply_feed_jones`. When the data hold
    exactly the solutions' correlations (XX/YY, RR/LL) and every row is corrected, the
    rows go through :func:`graphs.calibrate.apply_rows` (the correction of
    :func:`graphs.calibrate.apply`; the same numbers).

Fields
    ``field=`` (an id or a name) corrects only that field's rows; the other rows keep
    their CORRECTED_DATA (DATA when the MS has none), as ``applycal(field=...)`` does.
"""

from __future__ import annotations

import json
import logging
import os
import time as _time

import numpy as np

from contimg import caltables
from contimg.io.files import finalise
from graphs import scheduling

log = logging.getLogger(__name__)

__all__ = ["apply_ms", "corr_feeds", "parallel_hands", "ms_correlations"]


def corr_feeds(pols):
    """Feeds of correlation labels: ``(feeds, fp, fq)`` where ``feeds`` are the letters
    of the parallel hands in the data's order (``("R", "L")``) and ``fp[c]``, ``fq[c]``
    index the feeds of antenna 1 and 2 of correlation ``c``. Raises ``ValueError`` for
    Stokes parameters or a cross hand whose feeds have no parallel hand."""
    pols = [str(p) for p in pols]
    bad = [p for p in pols if len(p) != 2]
    if bad:
        raise ValueError(f"correlations {pols}: {bad} are not feed products (Stokes "
                         "data cannot be calibrated per feed)")
    feeds = [p[0] for p in pols if p[0] == p[1]]
    if not feeds:
        raise ValueError(f"correlations {pols}: no parallel hand (XX/YY, RR/LL) to "
                         "calibrate with")
    missing = sorted({x for p in pols for x in p} - set(feeds))
    if missing:
        raise ValueError(f"correlations {pols}: feed(s) {missing} have no parallel hand")
    fp = np.array([feeds.index(p[0]) for p in pols], np.int64)
    fq = np.array([feeds.index(p[1]) for p in pols], np.int64)
    return tuple(feeds), fp, fq


def parallel_hands(ds):
    """The Dataset's parallel-hand correlations only (XX/YY, RR/LL): what a diagonal
    Jones solve uses (CASA ignores the cross hands for G and B too)."""
    pols = [str(p) for p in ds.polarization.values]
    idx = [i for i, p in enumerate(pols) if len(p) == 2 and p[0] == p[1]]
    if not idx:
        raise ValueError(f"{ds.attrs.get('ms_path', 'the data')}: correlations {pols} "
                         "have no parallel hand to solve on")
    return ds if len(idx) == len(pols) else ds.isel(polarization=idx)


def ms_correlations(ms_path):
    """Correlation labels (``["RR", "RL", ...]``) of an MS's single DATA_DESCRIPTION."""
    from casacore import tables as ct

    from contimg.io.ms.common import CORR_LABEL

    with ct.table(os.path.join(ms_path, "DATA_DESCRIPTION"), ack=False) as t:
        pid = int(t.getcell("POLARIZATION_ID", 0))
    with ct.table(os.path.join(ms_path, "POLARIZATION"), ack=False) as t:
        ctype = t.getcell("CORR_TYPE", pid)
    return [CORR_LABEL.get(int(c), f"corr{int(c)}") for c in ctype]


# ---------------------------------------------------------------------------------
# the MS's table thread
# ---------------------------------------------------------------------------------

def _apply_step(tb, nchan, npol, target=64 << 20):
    """Rows per read/write of :func:`apply_ms`: ~``target`` bytes of visibilities, in
    whole tiles of DATA when it is tiled (the MS has no tile cache: a chunk that ends
    inside a tile makes the next one read and write that tile again)."""
    step = max(1, target // max(1, nchan * npol * 8))
    try:
        spec = tb.getdminfo("DATA").get("SPEC", {})
        cubes = list(spec.get("HYPERCUBES", {}).values())
        rows = int(cubes[0]["TileShape"][-1]) if cubes else 0
    except (RuntimeError, KeyError, IndexError, TypeError):
        rows = 0
    if rows > 0:
        step = max(1, round(step / rows)) * rows
    return step


_TMPCOL = "CORRECTED_DATA_CONTIMG_TMP"


def _begin_apply(tb, path, rows_per_chunk):
    """In the MS's table thread, under a write lock held until :func:`_end_apply`: the
    MS's rows, channels, antennas and fields, checked; an empty copy of DATA's column
    added as the temporary column."""
    from casacore import tables as ct

    from kernels.constants import MJD_UNIX_OFFSET_S

    tb.lock(write=True)
    with ct.table(os.path.join(path, "SPECTRAL_WINDOW"), ack=False) as t:
        if t.nrows() != 1:
            raise ValueError(f"{path}: {t.nrows()} spectral windows; one supported")
        freqs = t.getcell("CHAN_FREQ", 0)
        width = float(np.abs(t.getcell("CHAN_WIDTH", 0)).max())
    with ct.table(os.path.join(path, "ANTENNA"), ack=False) as t:
        nant = t.nrows()
    a1 = tb.getcol("ANTENNA1").astype(np.int64)
    a2 = tb.getcol("ANTENNA2").astype(np.int64)
    if max(a1.max(), a2.max()) >= nant:
        raise ValueError(f"{path}: ANTENNA1/2 beyond the ANTENNA table")
    ddid = np.unique(tb.getcol("DATA_DESC_ID"))
    if ddid.size != 1:
        raise ValueError(f"{path}: {ddid.size} DATA_DESC_IDs; one supported")
    from contimg.msfields import utc_time

    times, tidx = np.unique(utc_time(tb, path) - MJD_UNIX_OFFSET_S, return_inverse=True)
    field = tb.getcol("FIELD_ID").astype(np.int64)
    npol = tb.getcell("DATA", 0).shape[1]
    has_corrected = "CORRECTED_DATA" in tb.colnames()
    if _TMPCOL in tb.colnames():
        tb.removecols([_TMPCOL])
    desc = tb.getcoldesc("DATA")
    desc.pop("comment", None)
    dm = tb.getdminfo("DATA")
    # a data manager name not in use (an earlier run's renamed column keeps its own)
    dm = {"TYPE": dm["TYPE"], "NAME": f"CorrectedData_{os.getpid()}_{_time.time_ns()}",
          "SPEC": dm.get("SPEC", {})}
    tb.addcols(ct.maketabdesc(ct.makecoldesc(_TMPCOL, desc)), dm)
    return dict(nrow=a1.size, a1=a1, a2=a2, tidx=tidx.astype(np.int64), times=times,
                freqs=freqs, width=width, nant=nant, npol=npol, field=field,
                has_corrected=has_corrected,
                step=rows_per_chunk or _apply_step(tb, freqs.size, npol))


def _end_apply(tb, ok):
    """In the table thread: the temporary column becomes CORRECTED_DATA (``ok``) or is
    removed; the write lock of :func:`_begin_apply` is released."""
    try:
        if ok:
            if "CORRECTED_DATA" in tb.colnames():
                tb.removecols(["CORRECTED_DATA"])
            tb.renamecol(_TMPCOL, "CORRECTED_DATA")
            tb.flush()
        elif _TMPCOL in tb.colnames():
            tb.removecols([_TMPCOL])
    finally:
        tb.unlock()


# ---------------------------------------------------------------------------------
# correcting rows
# ---------------------------------------------------------------------------------

def _correct_rows(vis, flag, keep, a1, a2, tidx, sel, fp, fq, prepared):
    """Corrected ``(vis, flag)`` of MS rows: selected rows (``sel``) by
    :func:`kernels.jones.apply_feed_jones`, the others ``keep`` (their previous
    CORRECTED_DATA, or DATA) with their flags."""
    from kernels.jones import apply_feed_jones

    gt, gtf, bf, bff = prepared
    out = np.empty(vis.shape, np.complex64)
    oflag = np.empty(vis.shape, bool)
    apply_feed_jones(np.ascontiguousarray(vis, np.complex64), np.ascontiguousarray(flag),
                     np.asarray(a1, np.int64), np.asarray(a2, np.int64),
                     np.asarray(tidx, np.int64), fp, fq, gt, gtf, np.ascontiguousarray(bf),
                     np.ascontiguousarray(bff), out, oflag)
    if sel is not None and not sel.all():
        out[~sel] = keep[~sel]
        oflag[~sel] = flag[~sel]
    return out, oflag


def _apply_rows(data, flg, keep, m, sel, fp, fq, prepared):
    """Lazy corrected (vis, flag), chunked as ``data`` (task names ``apply-cal-r<k>``)."""
    import dask
    import dask.array as da

    if sel is None and np.array_equal(fp, np.arange(fp.size)) and np.array_equal(fp, fq):
        from graphs.calibrate import apply_rows

        return apply_rows(data, flg, m["a1"], m["a2"], m["tidx"], prepared)
    rch = data.chunks[0]
    edges = np.concatenate([[0], np.cumsum(rch)]).astype(int)
    vb, fb = data.to_delayed().ravel(), flg.to_delayed().ravel()
    kb = keep.to_delayed().ravel() if keep is not None else [None] * len(rch)
    out_v, out_f = [], []
    for k in range(len(rch)):
        r0, r1 = edges[k], edges[k + 1]
        res = dask.delayed(_correct_rows, pure=True, nout=2)(
            vb[k], fb[k], kb[k] if keep is not None else vb[k], m["a1"][r0:r1],
            m["a2"][r0:r1], m["tidx"][r0:r1], None if sel is None else sel[r0:r1], fp, fq,
            prepared, dask_key_name=f"apply-cal-r{k:03d}-{data.name}")
        out_v.append(da.from_delayed(res[0], (r1 - r0,) + data.shape[1:], dtype=np.complex64))
        out_f.append(da.from_delayed(res[1], (r1 - r0,) + data.shape[1:], dtype=bool))
    return da.concatenate(out_v, axis=0), da.concatenate(out_f, axis=0)


def _field_rows(ms_path, field, m):
    """Row mask of ``field`` (id or name) and its FIELD ids; (None, None) for all."""
    if field is None:
        return None, None
    from contimg.io.ms.fields import read_fields, resolve_field

    ids = resolve_field(ms_path, field, read_fields(ms_path), used_ids=np.unique(m["field"]))
    return np.isin(m["field"], ids), ids


def apply_ms(ms_path, tables, *, interp="linear", flag=True, rows_per_chunk=None,
             field=None):
    """Write CORRECTED_DATA = DATA corrected by bandpass and gain tables.

    One lazy computation, computed here on local threads: the MS's rows in contiguous,
    tile-aligned runs (read in the MS's table thread), each corrected by the solutions
    of its two antennas' feeds and written back run by run.

    Parameters
    ----------
    ms_path : str
        The MS (one spectral window; any correlations of two feeds: XX/YY, RR/LL,
        XX/XY/YX/YY, RR/RL/LR/LL, or one parallel hand).
    tables : str, list of str or dict
        At most one B and one G table (ours or CASA's), e.g. ``CalResult.tables`` or
        the ``tables`` of a registry row; their correlations are the MS's parallel
        hands (cross hands are corrected by the product of the two feeds' terms).
    interp : {"linear", "nearest"}
        Gain interpolation in time (amplitude and phase separately).
    flag : bool
        Also flag (in FLAG) the samples whose solutions are flagged, as CASA's
        ``applycal`` does (``applymode='calflag'``). Weights are not rescaled
        (CASA's ``calwt=False``).
    rows_per_chunk : int, optional
        Rows corrected per task (default ~64 MiB of visibilities, whole tiles).
    field : int or str, optional
        Correct only this field's rows (a FIELD id, or a name); the other rows keep
        their CORRECTED_DATA (DATA if the MS has none) and their flags.

    The corrected data go to a temporary column that replaces CORRECTED_DATA only when
    complete, so an interrupted run leaves the previous CORRECTED_DATA (if any).
    """
    import dask
    import dask.array as da

    from contimg.io.mscolumns import RowTarget, ms_proxy, read_rows, run_in_table
    from graphs.calibrate import _solution_arrays, prepare_solutions

    ms_path = os.path.abspath(os.fspath(ms_path))
    if not os.path.isfile(os.path.join(ms_path, "table.dat")):
        raise FileNotFoundError(f"{ms_path}: not a Measurement Set (no table.dat)")
    if isinstance(tables, str) and tables.lstrip().startswith("{"):
        tables = json.loads(tables)       # the registry's JSON column, undecoded
    if isinstance(tables, dict):
        tables = list(tables.values())
    corr = ms_correlations(ms_path)
    try:
        feeds, fp, fq = corr_feeds(corr)
    except ValueError as exc:
        raise ValueError(f"{ms_path}: {exc}") from None
    sol = caltables.read_solutions(tables, polarization=tuple(f + f for f in feeds))
    tic = _time.perf_counter()
    proxy = ms_proxy(ms_path)
    ok = False
    try:
        m = run_in_table(proxy, _begin_apply, ms_path, rows_per_chunk, write=False)
        try:
            sel, ids = _field_rows(ms_path, field, m)
            # solutions -> the MS's DATA convention (conjugated), per feed
            prepared = prepare_solutions(
                *_solution_arrays(sol), freqs=m["freqs"], times=m["times"],
                nstations=m["nant"], npol=len(feeds), channel_width=m["width"],
                interp=interp, conjugate=True)
        except ValueError as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith(ms_path) else
                             f"{ms_path} with {', '.join(map(str, tables))}: {msg}") from None
        cell = (m["freqs"].size, m["npol"])
        data = read_rows(proxy, "DATA", m["nrow"], m["step"], cell, np.complex64,
                         "apply-read-data")
        flg = read_rows(proxy, "FLAG", m["nrow"], m["step"], cell, bool, "apply-read-flag")
        keep = None
        if sel is not None and m["has_corrected"]:
            keep = read_rows(proxy, "CORRECTED_DATA", m["nrow"], m["step"], cell,
                             np.complex64, "apply-read-corrected")
        vis, new_flag = _apply_rows(data, flg, keep, m, sel, fp, fq,
                                    dask.delayed(prepared, traverse=False))
        stores = [da.store(vis, RowTarget(proxy, _TMPCOL), lock=False, compute=False)]
        if flag:
            stores.append(da.store(new_flag, RowTarget(proxy, "FLAG"), lock=False,
                                   compute=False))
        scheduling.compute(*stores, threads=scheduling.threads() or os.cpu_count())
        ok = True
    finally:
        try:
            run_in_table(proxy, _end_apply, ok, write=False)
        except Exception:  # noqa: BLE001 - the first error is the one raised
            if ok:
                raise
    finalise(ms_path)   # the column's new files: the product mode, whatever the umask
    log.info("%s: CORRECTED_DATA (%s%s) written from %s in %.2f s", ms_path, "/".join(corr),
             "" if ids is None else f", field(s) {ids.tolist()}", ", ".join(
                 map(str, tables)), _time.perf_counter() - tic)
