"""Visibility preparation: input checks, weights and w-flip conjugation before gridding,
the n-shift phasors, and the degridded values written back (with weights) after it.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels.gridding.index import _build_index
from kernels.gridding.plan import _active_mask
from kernels.gridding.threads import _map, _split


@njit(nogil=True, cache=True, inline="always")
def _weigh_rotate(x, wt, sgn, cr, ci, rotate, forward):
    """One visibility: ``forward`` conj?(x wt) (cr + i ci) (before gridding), else
    conj?(x (cr + i ci)) wt (after degridding); ``sgn`` -1 conjugates, ``rotate`` False
    skips the phasor."""
    if forward:
        xr = x.real * wt
        xi = x.imag * wt * sgn
        if rotate:
            return complex(xr * cr - xi * ci, xr * ci + xi * cr)
        return complex(xr, xi)
    if rotate:
        yr = x.real * cr - x.imag * ci
        yi = x.real * ci + x.imag * cr
    else:
        yr = x.real
        yi = x.imag
    return complex(yr * wt, yi * wt * sgn)


@njit(nogil=True, cache=True, inline="always")
def _shift_vis(src, wgt, use_wgt, active, uvw, conj, fovc, nshift, uniform, out, lo, hi,
               forward):
    """Rows [lo, hi) of ``out``, zero where inactive: ``forward`` (before gridding)
    conj?(src * wgt) * exp(2 pi i w' nshift f/c), else (the degridding epilogue)
    conj?(src * exp(-2 pi i w' nshift f/c)) * wgt. With ``uniform`` channel spacing the
    phasor advances by one complex multiply per channel."""
    nchan = src.shape[1]
    twopi = 2.0 * np.pi
    dfc = fovc[1] - fovc[0] if nchan > 1 else 0.0
    rotate = nshift != 0.0
    for row in range(lo, hi):
        a = twopi * nshift * uvw[row, 2]
        if not forward:
            a = -a
        sgn = -1.0 if conj[row] else 1.0
        cr = 1.0
        ci = 0.0
        sr = 1.0
        si = 0.0
        ph = 0.0
        if rotate and uniform:
            ph = a * fovc[0]
            cr = np.cos(ph)
            ci = np.sin(ph)
            if nchan > 1:
                sr = np.cos(a * dfc)
                si = np.sin(a * dfc)
        for ch in range(nchan):
            if rotate and not uniform:
                ph = a * fovc[ch]
                cr = np.cos(ph)
                ci = np.sin(ph)
            if active[row, ch]:
                wt = wgt[row, ch] if use_wgt else 1.0
                out[row, ch] = _weigh_rotate(src[row, ch], wt, sgn, cr, ci, rotate, forward)
            else:
                out[row, ch] = 0.0
            if rotate and uniform:
                t = cr * sr - ci * si
                ci = cr * si + ci * sr
                cr = t


@njit(nogil=True, cache=True)
def _phasors(uvw, fovc, nshift, out, lo, hi):
    """out = exp(2 pi i w' nshift f/c) per visibility (rows [lo, hi)), for reuse."""
    nchan = fovc.shape[0]
    twopi = 2.0 * np.pi
    for row in range(lo, hi):
        a = twopi * nshift * uvw[row, 2]
        for ch in range(nchan):
            ph = a * fovc[ch]
            out[row, ch] = complex(np.cos(ph), np.sin(ph))


@njit(nogil=True, cache=True, inline="always")
def _shift_vis_ph(src, wgt, use_wgt, active, conj, ph, out, lo, hi, forward):
    """:func:`_shift_vis` with the w-shift phasors precomputed (``ph``; conjugated when
    not ``forward``)."""
    nchan = src.shape[1]
    for row in range(lo, hi):
        sgn = -1.0 if conj[row] else 1.0
        for ch in range(nchan):
            if active[row, ch]:
                wt = wgt[row, ch] if use_wgt else 1.0
                p = ph[row, ch]
                pi = p.imag if forward else -p.imag
                out[row, ch] = _weigh_rotate(src[row, ch], wt, sgn, p.real, pi, True, forward)
            else:
                out[row, ch] = 0.0


# the two directions as separate compiled kernels: ``forward`` is then a constant
# inside each (the shared bodies are inlined), so no branch is left in the loops


@njit(nogil=True, cache=True)
def _prep_vis(vis, wgt, use_wgt, active, uvw, conj, fovc, nshift, uniform, out, lo, hi):
    _shift_vis(vis, wgt, use_wgt, active, uvw, conj, fovc, nshift, uniform, out, lo, hi, True)


@njit(nogil=True, cache=True)
def _finish_vis(raw, wgt, use_wgt, active, uvw, conj, fovc, nshift, uniform, out, lo, hi):
    _shift_vis(raw, wgt, use_wgt, active, uvw, conj, fovc, nshift, uniform, out, lo, hi, False)


@njit(nogil=True, cache=True)
def _prep_vis_ph(vis, wgt, use_wgt, active, conj, ph, out, lo, hi):
    _shift_vis_ph(vis, wgt, use_wgt, active, conj, ph, out, lo, hi, True)


@njit(nogil=True, cache=True)
def _finish_vis_ph(raw, wgt, use_wgt, active, conj, ph, out, lo, hi):
    _shift_vis_ph(raw, wgt, use_wgt, active, conj, ph, out, lo, hi, False)


def _check_inputs(uvw, freq, vis_shape, plan):
    uvw = np.asarray(uvw)
    freq = np.asarray(freq)
    if uvw.ndim != 2 or uvw.shape[1] != 3:
        raise ValueError(f"uvw must be (nrow, 3), got {uvw.shape}")
    if freq.ndim != 1:
        raise ValueError(f"freq must be 1-D, got {freq.shape}")
    if vis_shape != (uvw.shape[0], freq.shape[0]):
        raise ValueError(f"vis shape {vis_shape} != (nrow, nchan) = {(uvw.shape[0], freq.size)}")
    if freq.size and not np.all(freq > 0):
        raise ValueError("frequencies must be positive")


def _prepare_gridding(uvw, freq, vis, weights, flags, plan, nthreads, act=None, idx=None):
    vis = np.asarray(vis)
    _check_inputs(uvw, freq, vis.shape, plan)
    if idx is not None:
        act = idx.active
    elif act is None:
        act = _active_mask(vis, weights, flags, vis.shape, True)
    if idx is None:
        idx = _build_index(uvw, freq, act, plan, nthreads)
    vis_eff = np.empty(vis.shape, dtype=plan.grid_dtype)
    use_w = weights is not None
    wgt = (np.ascontiguousarray(weights, dtype=plan.image_dtype) if use_w
           else np.ones((1, 1), plan.image_dtype))
    visc = np.ascontiguousarray(vis)
    nshift = plan.nshift if plan.do_wstacking else 0.0
    _shift_rows(visc, wgt, use_w, act, idx, nshift, vis_eff, True, nthreads)
    return idx, vis_eff


def _uniform(fovc):
    if fovc.size < 3:
        return True
    d = np.diff(fovc)
    return bool(np.all(np.abs(d - d[0]) <= 1e-13 * np.abs(fovc).max()))


def _finish(raw, weights, act, idx, plan, out, nthreads=1):
    if out is None:
        out = np.empty(raw.shape, dtype=plan.grid_dtype)
    use_w = weights is not None
    wgt = (np.ascontiguousarray(weights, dtype=plan.image_dtype) if use_w
           else np.ones((1, 1), plan.image_dtype))
    nshift = plan.nshift if plan.do_wstacking else 0.0
    _shift_rows(raw, wgt, use_w, act, idx, nshift, out, False, nthreads)
    return out


def _shift_rows(src, wgt, use_w, act, idx, nshift, out, forward, nthreads):
    """:func:`_prep_vis` (``forward``) or :func:`_finish_vis` (or, with the index's
    phasors, their ``_ph`` forms) over all rows, split between threads."""
    bd = _split(src.shape[0], max(1, nthreads))
    if idx.phasor is not None:
        fn = _prep_vis_ph if forward else _finish_vis_ph
        _map(nthreads, lambda i: fn(src, wgt, use_w, act, idx.conj, idx.phasor, out, bd[i],
                                    bd[i + 1]),
             list(range(len(bd) - 1)))
    else:
        fn = _prep_vis if forward else _finish_vis
        uniform = _uniform(idx.fovc)
        _map(nthreads, lambda i: fn(src, wgt, use_w, act, idx.uvw, idx.conj, idx.fovc, nshift,
                                    uniform, out, bd[i], bd[i + 1]),
             list(range(len(bd) - 1)))
