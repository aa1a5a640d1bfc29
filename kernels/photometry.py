"""Forced photometry of point sources at known positions: numba kernels.

Images are 2-D ``img[y, x]`` arrays (FITS order: ``x`` the first FITS axis); positions
are 0-based pixel coordinates (floats). The restoring beam is an elliptical Gaussian
``g(dx, dy) = exp(-(qa dx^2 + qb dx dy + qc dy^2))`` (peak 1); :func:`beam_quadratic`
turns FWHMs and a position angle into ``(qa, qb, qc)``.

* :func:`source_mask` paints a disc around every catalogue source, so that the noise
  of one source is never measured on another.
* :func:`local_rms` — a robust (MAD) rms in an annulus around each source that skips
  masked pixels, NaNs and, by one clip at 5 sigma, sources that are not in the catalogue.
* :func:`beam_fit` — the amplitude of the beam fitted (least squares) to the pixels
  within the beam's half-power ellipse around the known position (Condon 1997's
  point-source case: position and shape fixed, the peak free), and the factor that
  turns the local rms into its error when the noise is correlated like the beam:
  ``err = rms * sqrt(g^T R g) / (g^T g)`` with ``R_ij = g(x_i - x_j)``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = ["beam_quadratic", "source_mask", "local_rms", "beam_fit"]

_FOUR_LN2 = 4.0 * math.log(2.0)


def beam_quadratic(bmaj_pix, bmin_pix, bpa_deg, x_east_sign=-1.0):
    """``(qa, qb, qc)`` of the Gaussian beam with FWHMs ``bmaj_pix``/``bmin_pix`` (pixels)
    and position angle ``bpa_deg`` (east of north). ``x_east_sign`` is the sign of east
    along +x (-1 for the usual RA axis that increases to the east, CDELT1 < 0)."""
    pa = math.radians(bpa_deg)
    # unit vectors of the major and minor axes in pixel coordinates (x, y)
    ax, ay = x_east_sign * math.sin(pa), math.cos(pa)
    bx, by = x_east_sign * math.cos(pa), -math.sin(pa)
    ka, kb = _FOUR_LN2 / bmaj_pix ** 2, _FOUR_LN2 / bmin_pix ** 2
    qa = ka * ax * ax + kb * bx * bx
    qb = 2.0 * (ka * ax * ay + kb * bx * by)
    qc = ka * ay * ay + kb * by * by
    return qa, qb, qc


@njit(nogil=True, cache=True)
def source_mask(ny, nx, xs, ys, radius):
    """Boolean ``(ny, nx)`` mask, True within ``radius`` pixels of any ``(xs, ys)``."""
    mask = np.zeros((ny, nx), dtype=np.bool_)
    r2 = radius * radius
    for k in range(xs.size):
        x0, y0 = xs[k], ys[k]
        if not (np.isfinite(x0) and np.isfinite(y0)):
            continue
        ya = max(0, int(math.floor(y0 - radius)))
        yb = min(ny - 1, int(math.ceil(y0 + radius)))
        xa = max(0, int(math.floor(x0 - radius)))
        xb = min(nx - 1, int(math.ceil(x0 + radius)))
        for j in range(ya, yb + 1):
            dy = j - y0
            for i in range(xa, xb + 1):
                dx = i - x0
                if dx * dx + dy * dy <= r2:
                    mask[j, i] = True
    return mask


@njit(nogil=True, cache=True)
def _mad_rms(vals, n):
    v = vals[:n].copy()
    med = np.median(v)
    for t in range(n):
        v[t] = abs(v[t] - med)
    return med, 1.482602218505602 * np.median(v)


@njit(nogil=True, cache=True, parallel=True)
def local_rms(img, mask, xs, ys, r_in, r_out, min_pixels, step, nthreads):
    """Robust rms in the annulus ``r_in <= r < r_out`` around each source.

    The annulus is sampled on the pixels whose indices are multiples of ``step`` (the
    noise is correlated over a beam, so a step of 2 loses little and is 4x cheaper).
    Pixels that are masked (near a catalogue source), NaN, or more than 5 rms from the
    median (one clip) are skipped. Returns ``(rms, npix, truncated)``: ``rms`` is NaN
    when fewer than ``min_pixels`` remain; ``truncated`` is True when the annulus runs
    off the image.
    """
    ny, nx = img.shape
    n = xs.size
    rms = np.full(n, np.nan)
    npix = np.zeros(n, dtype=np.int64)
    trunc = np.zeros(n, dtype=np.bool_)
    r_in2, r_out2 = r_in * r_in, r_out * r_out
    side = 2 * int(math.ceil(r_out)) + 1
    nchunk = max(1, min(nthreads, n))
    for c in prange(nchunk):
        buf = np.empty(side * side)
        for k in range(c, n, nchunk):
            x0, y0 = xs[k], ys[k]
            if not (np.isfinite(x0) and np.isfinite(y0)):
                continue
            ya, yb = int(math.floor(y0 - r_out)), int(math.ceil(y0 + r_out))
            xa, xb = int(math.floor(x0 - r_out)), int(math.ceil(x0 + r_out))
            if ya < 0 or xa < 0 or yb >= ny or xb >= nx:
                trunc[k] = True
            ja = max(0, ya)
            ja += (step - ja % step) % step
            ia = max(0, xa)
            ia += (step - ia % step) % step
            m = 0
            for j in range(ja, min(ny - 1, yb) + 1, step):
                dy = j - y0
                for i in range(ia, min(nx - 1, xb) + 1, step):
                    dx = i - x0
                    d2 = dx * dx + dy * dy
                    if d2 < r_in2 or d2 >= r_out2 or mask[j, i]:
                        continue
                    v = img[j, i]
                    if np.isfinite(v):
                        buf[m] = v
                        m += 1
            if m < min_pixels:
                npix[k] = m
                continue
            med, s = _mad_rms(buf, m)
            if s > 0:   # one clip at 5 sigma (sources missing from the catalogue)
                q = 0
                for t in range(m):
                    if abs(buf[t] - med) <= 5.0 * s:
                        buf[q] = buf[t]
                        q += 1
                m = q
                if m < min_pixels:
                    npix[k] = m
                    continue
                med, s = _mad_rms(buf, m)
            rms[k] = s
            npix[k] = m
    return rms, npix, trunc


@njit(nogil=True, cache=True, parallel=True)
def beam_fit(img, xs, ys, qa, qb, qc, level, nthreads):
    """Least-squares amplitude of the beam centred on each ``(xs, ys)``.

    Pixels where the beam is above ``level`` (0.5: the half-power ellipse) are fitted.
    Returns ``(amp, err_factor, npix, edge)``: ``err_factor * rms`` is the amplitude's
    error for noise correlated like the beam; ``edge`` is True when part of the fit
    region is off the image or NaN (those pixels are left out; NaN amplitude when none
    remain).
    """
    ny, nx = img.shape
    n = xs.size
    amp = np.full(n, np.nan)
    fac = np.full(n, np.nan)
    npx = np.zeros(n, dtype=np.int64)
    edge = np.zeros(n, dtype=np.bool_)
    # half-extent of the ellipse g = level along x and y
    lnl = -math.log(level)
    det = 4.0 * qa * qc - qb * qb
    hx = math.sqrt(4.0 * qc * lnl / det) + 1.0
    hy = math.sqrt(4.0 * qa * lnl / det) + 1.0
    side = (2 * int(math.ceil(hx)) + 1) * (2 * int(math.ceil(hy)) + 1)
    nchunk = max(1, min(nthreads, n))
    for c in prange(nchunk):
        gx = np.empty(side, dtype=np.int64)
        gy = np.empty(side, dtype=np.int64)
        gv = np.empty(side)
        for k in range(c, n, nchunk):
            x0, y0 = xs[k], ys[k]
            if not (np.isfinite(x0) and np.isfinite(y0)):
                continue
            m = 0
            sdg = 0.0
            sgg = 0.0
            for j in range(int(math.floor(y0 - hy)), int(math.ceil(y0 + hy)) + 1):
                dy = j - y0
                for i in range(int(math.floor(x0 - hx)), int(math.ceil(x0 + hx)) + 1):
                    dx = i - x0
                    g = math.exp(-(qa * dx * dx + qb * dx * dy + qc * dy * dy))
                    if g < level:
                        continue
                    if j < 0 or i < 0 or j >= ny or i >= nx or not np.isfinite(img[j, i]):
                        edge[k] = True
                        continue
                    gx[m], gy[m], gv[m] = i, j, g
                    sdg += img[j, i] * g
                    sgg += g * g
                    m += 1
            npx[k] = m
            if m == 0:
                continue
            amp[k] = sdg / sgg
            var = 0.0
            for a in range(m):
                for b in range(m):
                    dx = float(gx[a] - gx[b])
                    dy = float(gy[a] - gy[b])
                    var += gv[a] * gv[b] * math.exp(-(qa * dx * dx + qb * dx * dy
                                                      + qc * dy * dy))
            fac[k] = math.sqrt(var) / sgg
    return amp, fac, npx, edge
