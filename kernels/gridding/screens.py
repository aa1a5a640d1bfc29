"""w-screens ``exp(-2 pi i w_plane (n - 1 + nshift))`` and the image side of w-stacking:
accumulating planes into the image (gridding) and filling planes from it (degridding).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels.gridding.correction import _apply_correction, _quadrant_lm
from kernels.gridding.fft import (
    _fft_order,
    _grid_fft_backward,
    _grid_fft_forward,
    _zero_cols,
    _zero_touched,
)
from kernels.gridding.threads import _map, _split


@njit(nogil=True, cache=True)
def _screen_init(scr, x, w, lo, hi):
    """scr = exp(-2 pi i w x) for quadrant rows [lo, hi)."""
    twopi = 2.0 * np.pi
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            ph = -twopi * w * x[i, j]
            scr[i, j] = complex(np.cos(ph), np.sin(ph))


@njit(nogil=True, cache=True, inline="always")
def _screen_at(scr, step, i, j, use_scr, advance):
    """(re, im) of the screen at quadrant pixel (i, j), 1 without one; with ``advance``
    the screen moves on to the next plane's value."""
    if not use_scr:
        return 1.0, 0.0
    s = scr[i, j]
    if advance:
        scr[i, j] = s * step[i, j]
    return s.real, s.imag


@njit(nogil=True, cache=True, inline="always")
def _halves(img, gridf):
    """(nx // 2, ny // 2) of the image, (nu, nv) of the grid (float view (nu, 2 nv))."""
    return img.shape[0] // 2, img.shape[1] // 2, gridf.shape[0], gridf.shape[1] // 2


@njit(nogil=True, cache=True, inline="always")
def _mirror_rows(i, hx, nu):
    """Rows of quadrant row i: (image row hx + i exists, hx - i exists, grid rows
    i mod nu, -i mod nu)."""
    return i < hx, i > 0, i % nu, (nu - i) % nu


@njit(nogil=True, cache=True, inline="always")
def _mirror_cols(j, hy, nv):
    """Columns of quadrant column j: (hy + j exists, hy - j exists, their float offsets
    2 (j mod nv), 2 (-j mod nv) in the grid's float view)."""
    return j < hy, j > 0, 2 * (j % nv), 2 * ((nv - j) % nv)


@njit(nogil=True, cache=True)
def _accum_quadrant(dirty, gridf, scr, step, use_scr, advance, zero_rows, i_lo, i_hi):
    """dirty += Re(grid * screen) for the <= 4 pixels (+-i, +-j) of quadrant rows [lo, hi).

    Pixel (ix, iy) = (nx/2 + p, ny/2 + q) reads grid[p mod nu, q mod nv] and uses the
    screen at (|p|, |q|). With ``advance`` the screen is multiplied by ``step`` after use
    (it then holds the next plane's); with ``zero_rows`` the grid rows read are zeroed.
    """
    hx, hy, nu, nv = _halves(dirty, gridf)
    for i in range(i_lo, i_hi):
        has1, has2, g1, g2 = _mirror_rows(i, hx, nu)
        for j in range(hy + 1):
            sr, si = _screen_at(scr, step, i, j, use_scr, advance)
            c1, c2, k1, k2 = _mirror_cols(j, hy, nv)
            if has1:
                if c1:
                    dirty[hx + i, hy + j] += gridf[g1, k1] * sr - gridf[g1, k1 + 1] * si
                if c2:
                    dirty[hx + i, hy - j] += gridf[g1, k2] * sr - gridf[g1, k2 + 1] * si
            if has2:
                if c1:
                    dirty[hx - i, hy + j] += gridf[g2, k1] * sr - gridf[g2, k1 + 1] * si
                if c2:
                    dirty[hx - i, hy - j] += gridf[g2, k2] * sr - gridf[g2, k2 + 1] * si
        if zero_rows:
            if has1:
                gridf[g1, :] = 0.0
            if has2:
                gridf[g2, :] = 0.0


@njit(nogil=True, cache=True)
def _fill_quadrant(gridf, img, scr, step, use_scr, advance, i_lo, i_hi):
    """Adjoint of _accum_quadrant: grid rows +-i = img * conj(screen), rest of row zero."""
    hx, hy, nu, nv = _halves(img, gridf)
    for i in range(i_lo, i_hi):
        has1, has2, g1, g2 = _mirror_rows(i, hx, nu)
        if has1:
            gridf[g1, :] = 0.0
        if has2:
            gridf[g2, :] = 0.0
        for j in range(hy + 1):
            sr, si = _screen_at(scr, step, i, j, use_scr, advance)
            if use_scr:
                si = -si  # conj(screen)
            c1, c2, k1, k2 = _mirror_cols(j, hy, nv)
            if has1:
                if c1:
                    d = img[hx + i, hy + j]
                    gridf[g1, k1] = d * sr
                    gridf[g1, k1 + 1] = d * si
                if c2:
                    d = img[hx + i, hy - j]
                    gridf[g1, k2] = d * sr
                    gridf[g1, k2 + 1] = d * si
            if has2:
                if c1:
                    d = img[hx - i, hy + j]
                    gridf[g2, k1] = d * sr
                    gridf[g2, k1 + 1] = d * si
                if c2:
                    d = img[hx - i, hy - j]
                    gridf[g2, k2] = d * sr
                    gridf[g2, k2 + 1] = d * si


def _screen_x(plan):
    nm1, _ = _quadrant_lm(plan)
    return np.ascontiguousarray(nm1 + plan.nshift)


class _Screens:
    """Quadrant w-screens ``exp(-2 pi i w_plane (n - 1 + nshift))``, one plane at a time.

    Consecutive planes use the recurrence ``screen *= exp(-2 pi i dw x)``, applied by
    the image kernels right after they used the screen (one complex multiply per
    quadrant pixel instead of a sincos).
    """

    def __init__(self, plan, nthreads):
        self.plan = plan
        self.nthreads = nthreads
        self.scr = None
        self.step = None
        self.valid_for = None
        nq = plan.npix_x // 2 + 1
        self.qb = _split(nq, max(1, min(nthreads, nq)))
        self.items = list(range(len(self.qb) - 1))
        self.dummy = np.zeros((1, 1), dtype=np.complex128)

    def get(self, plane):
        """(screen for ``plane``, step); the caller's kernel advances it to plane + 1."""
        p = self.plan
        if not p.do_wstacking:
            return self.dummy, self.dummy
        if self.valid_for != plane:
            qb = self.qb
            x = _screen_x(p)
            w = p.wplane0 + plane * p.dw
            if self.scr is None:
                self.scr = np.empty(x.shape, dtype=np.complex128)
                self.step = np.empty(x.shape, dtype=np.complex128)
                _map(self.nthreads,
                     lambda i: _screen_init(self.step, x, p.dw, qb[i], qb[i + 1]), self.items)
            _map(self.nthreads,
                 lambda i: _screen_init(self.scr, x, w, qb[i], qb[i + 1]), self.items)
        self.valid_for = plane + 1
        return self.scr, self.step


class _ImageAccumulator:
    """Turns w-planes (grids) one at a time into the image; corrections at the end."""

    def __init__(self, plan, nthreads):
        self.plan = plan
        self.nthreads = nthreads
        self.acc = np.zeros((plan.npix_x, plan.npix_y), dtype=plan.image_dtype)
        self.screens = _Screens(plan, nthreads)

    def add(self, grid, plane, urange, vrange, zero_after=False):
        p = self.plan
        _grid_fft_backward(grid, p, urange, vrange, self.nthreads)
        scr, step = self.screens.get(plane)
        gridf = grid.view(p.image_dtype)
        order_a = _fft_order(p, urange, vrange) == "a"
        fused_zero = zero_after and order_a
        qb = self.screens.qb
        _map(self.nthreads,
             lambda i: _accum_quadrant(self.acc, gridf, scr, step, p.do_wstacking, True,
                                       fused_zero, qb[i], qb[i + 1]),
             self.screens.items)
        if fused_zero:  # the needed rows are zeroed; the columns with data remain
            _zero_cols(grid, p, vrange, self.nthreads)
        elif zero_after:
            _zero_touched(grid, p, urange, vrange, self.nthreads)

    def result(self):
        return _apply_correction(self.acc, self.plan, self.nthreads, out=self.acc)


class _ImageFiller:
    """Adjoint of _ImageAccumulator: corrected image -> one w-plane grid at a time."""

    def __init__(self, plan, dirty, nthreads):
        dirty = np.asarray(dirty)
        if dirty.shape != (plan.npix_x, plan.npix_y):
            raise ValueError(f"dirty shape {dirty.shape} != {(plan.npix_x, plan.npix_y)}")
        self.plan = plan
        self.nthreads = nthreads
        self.img = _apply_correction(np.ascontiguousarray(dirty), plan, nthreads)
        self.screens = _Screens(plan, nthreads)

    def fill(self, grid, plane, urange, vrange):
        p = self.plan
        order_a = _fft_order(p, urange, vrange) == "a"
        if order_a:  # the fill zeroes the image rows itself
            _zero_cols(grid, p, vrange, self.nthreads)
        else:
            _zero_touched(grid, p, urange, vrange, self.nthreads)
        scr, step = self.screens.get(plane)
        gridf = grid.view(p.image_dtype)
        qb = self.screens.qb
        _map(self.nthreads,
             lambda i: _fill_quadrant(gridf, self.img, scr, step, p.do_wstacking, True,
                                      qb[i], qb[i + 1]),
             self.screens.items)
        _grid_fft_forward(grid, p, urange, vrange, self.nthreads)
