"""Partial FFTs of a grid (only the rows/columns with data, then only those the image
needs) and zeroing/extent helpers of the grid.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels.gridding.threads import _map, _split


try:  # ducc0's FFT is faster than pocketfft-in-scipy for the strided partial transforms
    import ducc0.fft as _ducc_fft
except ImportError:  # pragma: no cover - exercised only without ducc0
    _ducc_fft = None


@njit(nogil=True, cache=True)
def _zero_region(gridf, rows_a, rows_b, cols_a, cols_b, lo, hi):
    """Zero, for grid rows [lo, hi), whole rows inside ``rows_a``/``rows_b`` and the
    columns ``cols_a``/``cols_b`` (half-open (start, stop) pairs) of the other rows."""
    nv2 = gridf.shape[1]
    for i in range(lo, hi):
        if (rows_a[0] <= i < rows_a[1]) or (rows_b[0] <= i < rows_b[1]):
            for j in range(nv2):
                gridf[i, j] = 0.0
        else:
            for j in range(2 * cols_a[0], 2 * cols_a[1]):
                gridf[i, j] = 0.0
            for j in range(2 * cols_b[0], 2 * cols_b[1]):
                gridf[i, j] = 0.0


@njit(nogil=True, cache=True)
def _extent(gridf, lo, hi):
    """Row span [r0, r1) and column span [c0, c1) (complex columns) of nonzero cells."""
    nv2 = gridf.shape[1]
    r0 = gridf.shape[0]
    r1 = -1
    c0 = nv2
    c1 = -1
    for i in range(lo, hi):
        first = -1
        for j in range(nv2):
            if gridf[i, j] != 0.0:
                first = j
                break
        if first < 0:
            continue
        last = first
        for j in range(nv2 - 1, first - 1, -1):
            if gridf[i, j] != 0.0:
                last = j
                break
        if i < r0:
            r0 = i
        r1 = i + 1
        if first < c0:
            c0 = first
        if last > c1:
            c1 = last
    return r0, r1, c0 // 2, c1 // 2 + 1


def _c2c(view, axis, forward, nthreads):
    if view.size == 0:
        return
    if _ducc_fft is not None:
        _ducc_fft.c2c(view, axes=(axis,), forward=forward, inorm=0, out=view,
                      nthreads=nthreads)
    else:
        import scipy.fft

        if forward:
            view[...] = scipy.fft.fft(view, axis=axis, norm="backward", workers=nthreads)
        else:
            view[...] = scipy.fft.ifft(view, axis=axis, norm="forward", workers=nthreads)


def _fft_order(plan, urange, vrange):
    nu, nv, nx, ny = plan.nu, plan.nv, plan.npix_x, plan.npix_y
    cost_a = (vrange[1] - vrange[0]) * nu * math.log(nu) + nx * nv * math.log(nv)
    cost_b = (urange[1] - urange[0]) * nv * math.log(nv) + ny * nu * math.log(nu)
    return "a" if cost_a <= cost_b else "b"


def _grid_fft_backward(grid, plan, urange, vrange, nthreads):
    """In place: grid -> the rows/columns of its 2-D backward FFT the image needs."""
    nu, nv, hx, hy = plan.nu, plan.nv, plan.npix_x // 2, plan.npix_y // 2
    if _fft_order(plan, urange, vrange) == "a":
        _c2c(grid[:, vrange[0]:vrange[1]], 0, False, nthreads)
        _c2c(grid[:hx, :], 1, False, nthreads)
        _c2c(grid[nu - hx:, :], 1, False, nthreads)
    else:
        _c2c(grid[urange[0]:urange[1], :], 1, False, nthreads)
        _c2c(grid[:, :hy], 0, False, nthreads)
        _c2c(grid[:, nv - hy:], 0, False, nthreads)


def _grid_fft_forward(grid, plan, urange, vrange, nthreads):
    """In place: grid holding the image's rows/columns only -> the uv region with data."""
    nu, nv, hx, hy = plan.nu, plan.nv, plan.npix_x // 2, plan.npix_y // 2
    if _fft_order(plan, urange, vrange) == "a":
        _c2c(grid[:hx, :], 1, True, nthreads)
        _c2c(grid[nu - hx:, :], 1, True, nthreads)
        _c2c(grid[:, vrange[0]:vrange[1]], 0, True, nthreads)
    else:
        _c2c(grid[:, :hy], 0, True, nthreads)
        _c2c(grid[:, nv - hy:], 0, True, nthreads)
        _c2c(grid[urange[0]:urange[1], :], 1, True, nthreads)


def _zero_touched(grid, plan, urange, vrange, nthreads=1):
    """Zero what the partial FFTs of one plane wrote (the rest of the grid is still 0)."""
    nu, nv, hx, hy = plan.nu, plan.nv, plan.npix_x // 2, plan.npix_y // 2
    gridf = grid.view(plan.image_dtype)
    none = np.zeros(2, dtype=np.int64)
    if _fft_order(plan, urange, vrange) == "a":
        ra, rb = np.array([0, hx]), np.array([nu - hx, nu])
        ca, cb = np.array(vrange), none
    else:
        ra, rb = np.array(urange), none
        ca, cb = np.array([0, hy]), np.array([nv - hy, nv])
    bd = _split(nu, max(1, nthreads))
    _map(nthreads, lambda i: _zero_region(gridf, ra, rb, ca, cb, bd[i], bd[i + 1]),
         list(range(len(bd) - 1)))


def _zero_cols(grid, plan, vrange, nthreads):
    """Zero columns ``vrange`` of the grid rows outside the image's rows."""
    hx = plan.npix_x // 2
    gridf = grid.view(plan.image_dtype)
    none = np.zeros(2, dtype=np.int64)
    ca = np.array(vrange, dtype=np.int64)
    bd = [hx + b for b in _split(plan.nu - 2 * hx, max(1, nthreads))]
    _map(nthreads, lambda i: _zero_region(gridf, none, none, ca, none, bd[i], bd[i + 1]),
         list(range(len(bd) - 1)))


def _nonzero_extent(grid, plan, nthreads):
    """((row lo, hi), (col lo, hi)) spanning the nonzero cells of a grid, None if all 0."""
    gridf = grid.view(plan.image_dtype)
    bd = _split(plan.nu, max(1, nthreads))
    parts = _map(nthreads, lambda i: _extent(gridf, bd[i], bd[i + 1]), list(range(len(bd) - 1)))
    r0 = min(p[0] for p in parts)
    if r0 >= plan.nu:
        return None
    r1 = max(p[1] for p in parts)
    c0 = min(p[2] for p in parts)
    c1 = max(p[3] for p in parts)
    return (r0, r1), (c0, c1)
