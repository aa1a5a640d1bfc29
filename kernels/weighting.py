"""Stokes I, re-phasing and imaging weights (natural, uniform, Briggs) in numba.

Every function works on one chunk of rows ``(nrow, nchan[, npol])`` (a row is one
(time, baseline)); nothing here allocates more than the chunk or one uv density grid.

Conventions
-----------
* Visibilities follow the Dataset convention ``V = sum S exp(+2 pi i (u l + v m +
  w (n - 1)) / lambda)`` with ``uvw = x2 - x1`` towards the row's phase centre.
* Stokes I from the two linear feeds: ``I = (XX + YY) / 2``; its weight is the inverse
  variance of that mean, ``4 / (1/w_XX + 1/w_YY)``. A visibility whose XX or YY is
  flagged (or has zero weight) is dropped from I (weight 0), as WSClean does.
* The uv density grid used by uniform and Briggs weighting has the image's Fourier
  cell ``du = 1 / (npix_x * cell_x)``; a visibility falls in the nearest cell after
  folding onto the ``u >= 0`` half plane (``(u, v) -> (-u, -v)``: the image is real, so
  a visibility and its conjugate fill the same pair of cells).
* Briggs (robust ``R``, as in WSClean / CASA): ``w_img = w / (1 + f2 D)`` with
  ``D`` the summed natural weight of the visibility's cell and
  ``f2 = (5 * 10**-R)**2 / (sum_cells D**2 / sum w)``; uniform: ``w_img = w / D``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels.constants import SPEED_OF_LIGHT

__all__ = [
    "stokes_i",
    "rephase",
    "density_grid",
    "briggs_f2",
    "imaging_weights",
    "WEIGHTINGS",
]

WEIGHTINGS = ("natural", "uniform", "briggs")


@njit(nogil=True, cache=True)
def stokes_i(vis, flag, weight):
    """``(nrow, nchan, 2)`` XX/YY -> Stokes I ``(nrow, nchan)`` complex64, weight float32.

    Flagged or zero-weight XX or YY -> weight 0 and visibility 0.
    """
    nrow, nchan, _ = vis.shape
    out = np.zeros((nrow, nchan), dtype=np.complex64)
    wout = np.zeros((nrow, nchan), dtype=np.float32)
    for r in range(nrow):
        for c in range(nchan):
            wx = weight[r, c, 0]
            wy = weight[r, c, 1]
            if flag[r, c, 0] or flag[r, c, 1] or not (wx > 0.0) or not (wy > 0.0):
                continue
            v = 0.5 * (vis[r, c, 0] + vis[r, c, 1])
            if not (math.isfinite(v.real) and math.isfinite(v.imag)):
                continue
            out[r, c] = v
            wout[r, c] = 4.0 / (1.0 / wx + 1.0 / wy)
    return out, wout


@njit(nogil=True, cache=True)
def rephase(vis, w_old, w_new, freq):
    """Re-phase rows to a new phase centre, in place: ``V *= exp(2 pi i (w_old - w_new) / lambda)``.

    ``vis`` ``(nrow, nchan)``; ``w_old``/``w_new`` ``(nrow,)`` metres (the w coordinate
    of each row towards its old and its new phase centre; exact, no small-field
    approximation); ``freq`` ``(nchan,)`` Hz. Returns ``vis``.
    """
    nrow, nchan = vis.shape
    for r in range(nrow):
        dw = (w_old[r] - w_new[r]) / SPEED_OF_LIGHT
        if dw == 0.0:
            continue
        for c in range(nchan):
            ph = 2.0 * math.pi * dw * freq[c]
            rot = complex(math.cos(ph), math.sin(ph))
            vis[r, c] = vis[r, c] * rot
    return vis


@njit(nogil=True, cache=True)
def _cell(u, v, du, dv, nu, nv):
    if u < 0.0 or (u == 0.0 and v < 0.0):
        u = -u
        v = -v
    iu = int(math.floor(u / du + 0.5)) + nu // 2
    iv = int(math.floor(v / dv + 0.5)) + nv // 2
    return iu, iv


@njit(nogil=True, cache=True)
def density_grid(uvw, freq, weight, nu, nv, du, dv):
    """Sum of natural weights per uv cell: ``(nu, nv)`` float64 (``u = v = 0`` at the centre).

    ``uvw`` ``(nrow, 3)`` metres, ``freq`` ``(nchan,)`` Hz, ``weight`` ``(nrow, nchan)``
    (0 = not used); ``du``, ``dv`` cell sizes in wavelengths. Visibilities outside the
    grid are ignored (they are outside the image's uv coverage too).
    """
    grid = np.zeros((nu, nv), dtype=np.float64)
    nrow, nchan = weight.shape
    for r in range(nrow):
        for c in range(nchan):
            w = weight[r, c]
            if w == 0.0:
                continue
            f = freq[c] / SPEED_OF_LIGHT
            iu, iv = _cell(uvw[r, 0] * f, uvw[r, 1] * f, du, dv, nu, nv)
            if 0 <= iu < nu and 0 <= iv < nv:
                grid[iu, iv] += w
    return grid


def briggs_f2(grid, sum_weight, robust):
    """Briggs' ``f^2 = (5 * 10**-robust)**2 / (sum_cells D**2 / sum_weight)``."""
    s2 = float(np.sum(np.square(grid)))
    if s2 <= 0.0 or sum_weight <= 0.0:
        return 0.0
    return (5.0 * 10.0 ** (-float(robust))) ** 2 / (s2 / float(sum_weight))


@njit(nogil=True, cache=True)
def _weights(uvw, freq, weight, grid, du, dv, mode, f2):
    nrow, nchan = weight.shape
    nu, nv = grid.shape
    out = np.zeros((nrow, nchan), dtype=np.float32)
    for r in range(nrow):
        for c in range(nchan):
            w = weight[r, c]
            if w == 0.0:
                continue
            if mode == 0:
                out[r, c] = w
                continue
            f = freq[c] / SPEED_OF_LIGHT
            iu, iv = _cell(uvw[r, 0] * f, uvw[r, 1] * f, du, dv, nu, nv)
            if not (0 <= iu < nu and 0 <= iv < nv):
                continue
            d = grid[iu, iv]
            if d <= 0.0:
                continue
            if mode == 1:
                out[r, c] = w / d
            else:
                out[r, c] = w / (1.0 + f2 * d)
    return out


def imaging_weights(uvw, freq, weight, weighting, grid=None, du=None, dv=None, f2=0.0):
    """Imaging weights ``(nrow, nchan)`` float32 from natural weights.

    ``weighting``: ``"natural"`` (the weights as they are), ``"uniform"`` (divided by the
    cell's density) or ``"briggs"`` (``w / (1 + f2 D)``, ``f2`` from :func:`briggs_f2`).
    ``grid``/``du``/``dv``: the density grid of *all* the data being imaged (summed over
    chunks) and its cell sizes; not needed for natural weighting.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    mode = WEIGHTINGS.index(weighting)
    uvw = np.ascontiguousarray(uvw, dtype=np.float64)
    freq = np.ascontiguousarray(freq, dtype=np.float64)
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if mode == 0:
        grid, du, dv = np.zeros((1, 1)), 1.0, 1.0
    elif grid is None or du is None or dv is None:
        raise ValueError(f"{weighting} weighting needs the density grid and its cell size")
    return _weights(uvw, freq, weight, np.ascontiguousarray(grid, dtype=np.float64),
                    float(du), float(dv), mode, float(f2))
