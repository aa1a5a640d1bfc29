"""The index of runs: visibilities sorted by (uv tile, first w-plane) into blocks, and the
work items (tile rows) threads take without ever writing the same grid cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from kernels.gridding._loops import pix as _pix
from kernels.gridding.plan import SPEED_OF_LIGHT, _w_range_active
from kernels.gridding.threads import _map, _split


@njit(nogil=True, cache=True)
def _key_at(u0, v0, w0, f, pixx, pixy, nu, nv, hw, hw1, T, nsafe, do_w, wplane0, inv_dw, ntv, nkp):
    iu0, _s = _pix(u0 * f, pixx, nu, hw, hw1)
    iv0, _t = _pix(v0 * f, pixy, nv, hw, hw1)
    tu = (iu0 + nsafe) // T
    tv = (iv0 + nsafe) // T
    p0 = 0
    if do_w:
        y = (w0 * f - wplane0) * inv_dw
        p0 = int(np.floor(y + 1.0 - hw))
        if p0 < 0:
            p0 = 0
        if p0 > nkp - 1:
            p0 = nkp - 1
    return (tu * ntv + tv) * nkp + p0


@njit(nogil=True, cache=True)
def _runs(uvw, fovc, active, row_lo, row_hi, fill, offs, run_row, run_c0, run_c1, run_key,
          counts, pixx, pixy, nu, nv, hw, hw1, T, nsafe, do_w, wplane0, inv_dw, ntv, nkp,
          monotone):
    """Split each row's active channels into runs of equal (tile u, tile v, plane0) key.

    With ``fill`` False only counts runs per row into ``counts``; with ``fill`` True
    writes them from ``offs[row]`` on. ``monotone``: the key is monotone in channel
    (no uv wrap-around, ascending frequencies), so a binary search finds run ends.
    """
    nchan = fovc.shape[0]
    for row in range(row_lo, row_hi):
        u0 = uvw[row, 0]
        v0 = uvw[row, 1]
        w0 = uvw[row, 2]
        pos = offs[row] if fill else 0
        n = 0
        ch = 0
        while ch < nchan:
            while ch < nchan and not active[row, ch]:
                ch += 1
            if ch >= nchan:
                break
            e = ch + 1
            while e < nchan and active[row, e]:
                e += 1
            c = ch
            while c < e:
                k = _key_at(u0, v0, w0, fovc[c], pixx, pixy, nu, nv, hw, hw1, T, nsafe,
                            do_w, wplane0, inv_dw, ntv, nkp)
                if e - c == 1:  # one channel left (e.g. averaged rows): a run of one
                    c2 = e
                elif monotone:
                    if _key_at(u0, v0, w0, fovc[e - 1], pixx, pixy, nu, nv, hw, hw1, T,
                               nsafe, do_w, wplane0, inv_dw, ntv, nkp) == k:
                        c2 = e
                    else:
                        lo = c
                        hi = e - 1
                        while hi - lo > 1:
                            mid = (lo + hi) // 2
                            if _key_at(u0, v0, w0, fovc[mid], pixx, pixy, nu, nv, hw, hw1,
                                       T, nsafe, do_w, wplane0, inv_dw, ntv, nkp) == k:
                                lo = mid
                            else:
                                hi = mid
                        c2 = hi
                else:
                    c2 = c + 1
                    while c2 < e and _key_at(u0, v0, w0, fovc[c2], pixx, pixy, nu, nv, hw,
                                             hw1, T, nsafe, do_w, wplane0, inv_dw, ntv,
                                             nkp) == k:
                        c2 += 1
                if fill:
                    run_row[pos] = row
                    run_c0[pos] = c
                    run_c1[pos] = c2
                    run_key[pos] = k
                    pos += 1
                n += 1
                c = c2
            ch = e
        if not fill:
            counts[row] = n


@njit(nogil=True, cache=True)
def _counting_sort(key, a, b, c, nkeys):
    """Stable sort of ``key`` (integers in [0, nkeys)) carrying ``a``, ``b``, ``c``."""
    n = key.shape[0]
    start = np.zeros(nkeys + 1, dtype=np.int64)
    for i in range(n):
        start[key[i] + 1] += 1
    for k in range(nkeys):
        start[k + 1] += start[k]
    ko = np.empty_like(key)
    ao = np.empty_like(a)
    bo = np.empty_like(b)
    co = np.empty_like(c)
    for i in range(n):
        j = start[key[i]]
        start[key[i]] = j + 1
        ko[j] = key[i]
        ao[j] = a[i]
        bo[j] = b[i]
        co[j] = c[i]
    return ko, ao, bo, co


@dataclass
class _Index:
    uvw: np.ndarray  # (nrow, 3) flipped so that w >= 0
    conj: np.ndarray  # (nrow,) bool: row was flipped
    fovc: np.ndarray  # (nchan,) freq / c
    active: np.ndarray  # (nrow, nchan) bool
    run_row: np.ndarray
    run_c0: np.ndarray
    run_c1: np.ndarray
    blk_tv: np.ndarray
    blk_p0: np.ndarray
    blk_rstart: np.ndarray
    blk_csum: np.ndarray  # (nblk + 1,) cumulative visibility count over blocks
    gkey: np.ndarray  # (nblk,) tile number * nkp + first plane (ascending)
    tile_tu: np.ndarray  # per uv tile holding data: tile row, column, block range
    tile_tv: np.ndarray
    tile_bstart: np.ndarray
    tile_bend: np.ndarray
    nkp: int
    nvis: int
    urange: tuple  # (lo, hi) grid rows that can hold data (centred layout)
    vrange: tuple
    plane_ranges: list  # per w-plane (urange, vrange) of the tiles it uses, or None if empty
    phasor: np.ndarray = None  # (nrow, nchan) exp(2 pi i w' nshift f/c), when precomputed


def _build_index(uvw, freq, active, plan, nthreads):
    uvw = np.asarray(uvw, dtype=np.float64)
    freq = np.asarray(freq, dtype=np.float64)
    if uvw.ndim != 2 or uvw.shape[1] != 3:
        raise ValueError(f"uvw must have shape (nrow, 3), got {uvw.shape}")
    nrow, nchan = active.shape
    sgn = np.array([-1.0 if plan.flip_u else 1.0, -1.0 if plan.flip_v else 1.0,
                    -1.0 if plan.flip_w else 1.0])
    ub = uvw * sgn
    if not plan.do_wstacking:
        conj = np.zeros(nrow, dtype=np.bool_)
    else:
        conj = ub[:, 2] < 0
        ub[conj] *= -1.0
    ub = np.ascontiguousarray(ub)
    fovc = np.ascontiguousarray(freq / SPEED_OF_LIGHT)
    W, T = plan.W, plan.tile
    nsafe = W // 2 + 1
    nu, nv = plan.nu, plan.nv
    ntv = (nv - 1 + nsafe) // T + 1
    nkp = max(plan.nplanes - W + 1, 1) if plan.do_wstacking else 1
    inv_dw = 1.0 / plan.dw if plan.do_wstacking else 0.0
    hw, hw1 = 0.5 * W, 0.5 * (W - 1)
    fmax = float(fovc.max()) if nchan else 0.0
    umax = float(np.abs(ub[:, 0]).max() * fmax) if nrow else 0.0
    vmax = float(np.abs(ub[:, 1]).max() * fmax) if nrow else 0.0
    monotone = bool(
        nchan < 2 or np.all(np.diff(fovc) > 0)
    ) and umax * plan.pixsize_x < 0.5 - 1e-9 and vmax * plan.pixsize_y < 0.5 - 1e-9
    if plan.do_wstacking:
        lo, hi = _w_range_active(ub, freq, active, nthreads)
        tol = 1e-9 * max(1.0, plan.wmax)
        if hi >= lo and (lo < plan.wmin - tol or hi > plan.wmax + tol):
            raise ValueError(
                f"|w| range of the data [{lo:.6g}, {hi:.6g}] lies outside the plan's "
                f"[{plan.wmin:.6g}, {plan.wmax:.6g}] wavelengths"
            )
    args = (nu, nv, hw, hw1, T, nsafe, plan.do_wstacking, plan.wplane0, inv_dw, ntv, nkp,
            monotone)
    counts = np.zeros(nrow, dtype=np.int64)
    dummy_i = np.zeros(1, dtype=np.int32)
    dummy_k = np.zeros(1, dtype=np.int64)
    bounds = _split(nrow, max(1, min(nthreads, nrow)))
    pixx, pixy = plan.pixsize_x, plan.pixsize_y

    def count(i):
        _runs(ub, fovc, active, bounds[i], bounds[i + 1], False, counts, dummy_i, dummy_i,
              dummy_i, dummy_k, counts, pixx, pixy, *args)

    if nchan == 1:  # one run per active row: nothing to count
        counts[:] = active[:, 0]
    else:
        _map(nthreads, count, list(range(len(bounds) - 1)))
    offs = np.zeros(nrow + 1, dtype=np.int64)
    np.cumsum(counts, out=offs[1:])
    nruns = int(offs[-1])
    run_row = np.empty(nruns, dtype=np.int32)
    run_c0 = np.empty(nruns, dtype=np.int32)
    run_c1 = np.empty(nruns, dtype=np.int32)
    run_key = np.empty(nruns, dtype=np.int64)

    def fill(i):
        _runs(ub, fovc, active, bounds[i], bounds[i + 1], True, offs, run_row, run_c0, run_c1,
              run_key, counts, pixx, pixy, *args)

    _map(nthreads, fill, list(range(len(bounds) - 1)))
    nkeys = ((nu - 1 + nsafe) // T + 1) * ntv * nkp
    if nruns and nkeys <= max(1 << 22, 4 * nruns):
        # keys are small integers: a stable counting sort, O(n), scattering in place
        run_key, run_row, run_c0, run_c1 = _counting_sort(run_key, run_row, run_c0, run_c1,
                                                          nkeys)
    else:
        order = np.argsort(run_key, kind="stable")
        run_key = run_key[order]
        run_row = run_row[order]
        run_c0 = run_c0[order]
        run_c1 = run_c1[order]
    nch = (run_c1 - run_c0).astype(np.int64)
    if nruns:
        starts = np.flatnonzero(np.r_[True, run_key[1:] != run_key[:-1]])
    else:
        starts = np.zeros(0, dtype=np.int64)
    bkey = run_key[starts]
    blk_rstart = np.r_[starts, nruns].astype(np.int64)
    blk_p0 = (bkey % nkp).astype(np.int64)
    btile = bkey // nkp
    blk_tu = btile // ntv
    blk_tv = (btile % ntv).astype(np.int64)
    csum = np.r_[0, np.cumsum(nch)]
    blk_csum = csum[blk_rstart]  # visibilities before each block, and the total
    tstart = np.flatnonzero(np.r_[True, btile[1:] != btile[:-1]]) if btile.size else btile
    tile_bstart = tstart.astype(np.int64)
    tile_bend = np.r_[tstart[1:], btile.size].astype(np.int64)
    tile_of_blk = np.repeat(np.arange(tstart.size), tile_bend - tile_bstart)
    gkey = tile_of_blk.astype(np.int64) * nkp + blk_p0
    # grid rows / columns that can hold data (centred layout)
    ulim = int(math.ceil(umax * pixx * nu)) + W + 2
    vlim = int(math.ceil(vmax * pixy * nv)) + W + 2
    urange = (0, nu) if 2 * ulim >= nu else (nu // 2 - ulim, nu // 2 + ulim)
    vrange = (0, nv) if 2 * vlim >= nv else (nv // 2 - vlim, nv // 2 + vlim)
    plane_ranges = []
    su, sv = T + W + 1, T + ((W + 3) // 4) * 4 + 1
    for j in range(plan.nplanes if plan.do_wstacking else 1):
        sel = (blk_p0 <= j) & (blk_p0 > j - W) if plan.do_wstacking else slice(None)
        tus, tvs = blk_tu[sel], blk_tv[sel]
        if tus.size == 0:
            plane_ranges.append(None)
            continue
        plane_ranges.append((_tile_span(tus, T, nsafe, su, nu), _tile_span(tvs, T, nsafe, sv, nv)))
    return _Index(
        uvw=ub, conj=conj, fovc=fovc, active=active, run_row=run_row, run_c0=run_c0,
        run_c1=run_c1, blk_tv=blk_tv, blk_p0=blk_p0, blk_rstart=blk_rstart,
        blk_csum=blk_csum.astype(np.int64), gkey=gkey, tile_tu=blk_tu[tile_bstart].astype(np.int64),
        tile_tv=blk_tv[tile_bstart], tile_bstart=tile_bstart, tile_bend=tile_bend, nkp=nkp,
        nvis=int(nch.sum()),
        urange=urange, vrange=vrange, plane_ranges=plane_ranges,
    )


def _tile_span(tiles, T, nsafe, size, n):
    """Grid lines covered by the buffers of tiles (first tile line = t*T - nsafe - 1)."""
    lo = int(tiles.min()) * T - nsafe - 1
    hi = int(tiles.max()) * T - nsafe - 1 + size
    if lo < 0 or hi > n:
        return (0, n)
    return (lo, hi)


def _work_items(idx, plan, plane, nthreads, gridding):
    """Work for one plane: a list of passes, each a list of item arrays (one per task).

    An item is one uv tile (tile row, first block, end block) restricted to the blocks
    whose w-support covers ``plane``. Gridding runs four passes (tile row parity x tile
    column parity: tiles of one pass never share grid cells) plus a serial pass for
    tiles whose buffer wraps around the grid edge; degridding (read-only) runs one.
    Each pass is cut into ~4 tasks per thread of balanced load for the thread pool.
    """
    W, T = plan.W, plan.tile
    nkp = idx.nkp
    if idx.tile_tu.size == 0:
        return []
    base = np.arange(idx.tile_tu.size, dtype=np.int64) * nkp
    if plan.do_wstacking:
        blo = np.searchsorted(idx.gkey, base + max(0, plane - W + 1))
        bhi = np.searchsorted(idx.gkey, base + min(plane, nkp - 1) + 1)
    else:
        blo, bhi = idx.tile_bstart, idx.tile_bend
    load = idx.blk_csum[bhi] - idx.blk_csum[blo]
    sel = np.flatnonzero(load)
    if sel.size == 0:
        return []
    tu, tv = idx.tile_tu[sel], idx.tile_tv[sel]
    items = np.stack([tu, blo[sel], bhi[sel]], axis=1).astype(np.int64)
    load = load[sel]
    ntask = max(1, 4 * nthreads) if nthreads > 1 else 1

    def tasks(mask):
        it, ld = items[mask], load[mask]
        if it.shape[0] == 0:
            return []
        if ntask == 1 or it.shape[0] == 1:
            return [np.ascontiguousarray(it)]
        c = np.cumsum(ld)
        cuts = np.unique(np.searchsorted(c, c[-1] * np.arange(1, ntask) / ntask))
        return [np.ascontiguousarray(p) for p in np.split(it, cuts) if p.shape[0]]

    if not gridding:
        return [tasks(np.ones(sel.size, dtype=bool))]
    nsafe = W // 2 + 1
    su, sv = T + W + 1, T + ((W + 3) // 4) * 4 + 1
    bu0, bv0 = tu * T - nsafe - 1, tv * T - nsafe - 1
    wraps = (bu0 < 0) | (bu0 + su > plan.nu) | (bv0 < 0) | (bv0 + sv > plan.nv)
    passes = [tasks(~wraps & (tu % 2 == a) & (tv % 2 == b)) for a in (0, 1) for b in (0, 1)]
    if wraps.any():
        passes.append([np.ascontiguousarray(items[wraps])])
    return [p for p in passes if p]
