"""Deconvolution kernels: Högbom and Clark minor cycles (numba), restoring-beam fit, restore.

Images are 2-D arrays indexed ``[ix, iy]`` (the gridder's layout). The PSF has the
image's shape, its peak (normalised to 1) at ``(npix_x // 2, npix_y // 2)``.

Minor cycles only ever *approximate* the residual (they subtract shifted copies of the
PSF, truncated at the PSF's edge or at the Clark patch); the caller's major cycle
recomputes the exact residual from the visibilities (degrid the model, subtract, grid)
and calls the minor cycle again. Both minor cycles stop when the peak ``|residual|``
inside the mask falls below ``stop_level`` or after ``niter`` components, and return the
number of components added and the last peak.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = [
    "hogbom_minor",
    "clark_minor",
    "psf_sidelobe",
    "fit_beam",
    "gaussian_image",
    "restore",
    "robust_sigma",
]


@njit(nogil=True, cache=True)
def _peak(img, mask, use_mask):
    nx, ny = img.shape
    best = -1.0
    bx, by = -1, -1
    for i in range(nx):
        for j in range(ny):
            if use_mask and not mask[i, j]:
                continue
            a = abs(img[i, j])
            if a > best:
                best = a
                bx, by = i, j
    return bx, by, best


@njit(nogil=True, cache=True)
def hogbom_minor(residual, psf, model, gain, niter, stop_level, mask, use_mask):
    """Högbom CLEAN on the whole image, in place on ``residual`` and ``model``.

    Each iteration finds the peak ``|residual|`` (inside ``mask`` if ``use_mask``),
    adds ``gain * peak`` to the model there and subtracts the shifted PSF over the
    overlap of PSF and image. Returns ``(ncomponents, last_peak)``.
    """
    nx, ny = residual.shape
    cx, cy = nx // 2, ny // 2
    n = 0
    peak = 0.0
    while n < niter:
        px, py, peak = _peak(residual, mask, use_mask)
        if px < 0 or peak < stop_level:
            break
        c = gain * residual[px, py]
        model[px, py] += c
        x0 = max(0, px - cx)
        x1 = min(nx, px - cx + nx)
        y0 = max(0, py - cy)
        y1 = min(ny, py - cy + ny)
        for i in range(x0, x1):
            pi = i - px + cx
            for j in range(y0, y1):
                residual[i, j] -= c * psf[pi, j - py + cy]
        n += 1
    return n, peak


@njit(nogil=True, cache=True)
def _select(residual, mask, use_mask, level):
    nx, ny = residual.shape
    cnt = _count_above(residual, mask, use_mask, level)
    xs = np.empty(cnt, np.int64)
    ys = np.empty(cnt, np.int64)
    vals = np.empty(cnt, np.float64)
    k = 0
    for i in range(nx):
        for j in range(ny):
            if (not use_mask or mask[i, j]) and abs(residual[i, j]) >= level:
                xs[k] = i
                ys[k] = j
                vals[k] = residual[i, j]
                k += 1
    return xs, ys, vals


@njit(nogil=True, cache=True)
def _count_above(residual, mask, use_mask, level):
    nx, ny = residual.shape
    cnt = 0
    for i in range(nx):
        for j in range(ny):
            if (not use_mask or mask[i, j]) and abs(residual[i, j]) >= level:
                cnt += 1
    return cnt


@njit(nogil=True, cache=True)
def clark_minor(residual, psf, model, gain, niter, stop_level, mask, use_mask, patch,
                max_active):
    """Clark CLEAN minor cycle, in place on ``residual`` and ``model``.

    Pixels with ``|residual| >= stop_level`` (inside the mask) become the active set
    (at most ``max_active``: the level is raised until they fit); components are found
    and the PSF (truncated to ``|dx|, |dy| <= patch`` pixels) subtracted on the active
    set only, until its peak drops below ``stop_level``. The full residual image is then
    updated with the same truncated PSF so the caller sees the minor cycle's estimate.
    Returns ``(ncomponents, last_peak)``.
    """
    nx, ny = residual.shape
    cx, cy = nx // 2, ny // 2
    level = stop_level
    px, py, peak = _peak(residual, mask, use_mask)
    if px < 0 or peak < stop_level:
        return 0, peak
    while _count_above(residual, mask, use_mask, level) > max_active:
        level *= 1.25
    xs, ys, vals = _select(residual, mask, use_mask, level)
    na = xs.shape[0]
    cmp_x = np.empty(niter, np.int64)
    cmp_y = np.empty(niter, np.int64)
    cmp_v = np.empty(niter, np.float64)
    ncomp = 0
    last = peak
    while ncomp < niter:
        best = -1.0
        k = -1
        for a in range(na):
            v = abs(vals[a])
            if v > best:
                best = v
                k = a
        last = best
        if k < 0 or best < level:
            break
        c = gain * vals[k]
        kx, ky = xs[k], ys[k]
        cmp_x[ncomp] = kx
        cmp_y[ncomp] = ky
        cmp_v[ncomp] = c
        ncomp += 1
        for a in range(na):
            dx = xs[a] - kx
            dy = ys[a] - ky
            if -patch <= dx <= patch and -patch <= dy <= patch:
                vals[a] -= c * psf[cx + dx, cy + dy]
    # apply the components to the model and (truncated PSF) to the whole residual
    for q in range(ncomp):
        kx, ky, c = cmp_x[q], cmp_y[q], cmp_v[q]
        model[kx, ky] += c
        for i in range(max(0, kx - patch), min(nx, kx + patch + 1)):
            pi = cx + i - kx
            for j in range(max(0, ky - patch), min(ny, ky + patch + 1)):
                residual[i, j] -= c * psf[pi, cy + j - ky]
    return ncomp, last


def psf_sidelobe(psf, patch):
    """Largest ``|psf|`` outside the central ``(2 patch + 1)^2`` box (Clark's cycle limit)."""
    nx, ny = psf.shape
    cx, cy = nx // 2, ny // 2
    a = np.abs(psf).copy()
    a[max(0, cx - patch): cx + patch + 1, max(0, cy - patch): cy + patch + 1] = 0.0
    return float(a.max()) if a.size else 0.0


def fit_beam(psf, cell_x_rad, cell_y_rad=None, level=0.35, box=None):
    """Fit an elliptical Gaussian to the PSF's main lobe.

    The lobe is the connected region around the peak where the PSF exceeds ``level``
    (of the peak); ``log psf`` is fitted there by weighted least squares (a Gaussian's
    log is quadratic). Returns ``(bmaj, bmin, bpa)``: FWHMs in radians and the position
    angle in degrees east of north, for images whose first axis points west (decreasing
    RA) and second north, as the gridder lays them out here.
    """
    from scipy import ndimage

    cell_y_rad = cell_x_rad if cell_y_rad is None else cell_y_rad
    psf = np.asarray(psf, dtype=np.float64)
    nx, ny = psf.shape
    cx, cy = nx // 2, ny // 2
    peak = psf[cx, cy]
    if not peak > 0:
        raise ValueError("PSF has no positive peak at the image centre")
    h = box or min(cx, cy, 256)
    sub = psf[cx - h: cx + h + 1, cy - h: cy + h + 1] / peak
    lab, _ = ndimage.label(sub > level)
    lobe = lab == lab[h, h]
    ix, iy = np.nonzero(lobe)
    x = (ix - h) * cell_x_rad
    y = (iy - h) * cell_y_rad
    val = sub[ix, iy]
    if val.size < 6:
        raise ValueError("PSF main lobe spans fewer than 6 pixels: the cell is too large "
                         "for the resolution")
    # log G = -(a x^2 + 2 b x y + c y^2); weight by the value (noise in the tails)
    A = np.stack([x * x, 2 * x * y, y * y], axis=1)
    wts = val
    coef, *_ = np.linalg.lstsq(A * wts[:, None], -np.log(val) * wts, rcond=None)
    a, b, c = coef
    mat = np.array([[a, b], [b, c]])
    evals, evecs = np.linalg.eigh(mat)
    if not np.all(evals > 0):
        raise ValueError("the PSF main lobe is not Gaussian-like (fit not positive)")
    fw = 2.0 * math.sqrt(2.0 * math.log(2.0))
    sig = 1.0 / np.sqrt(2.0 * evals)  # evals ascending -> sig descending
    bmaj, bmin = fw * sig[0], fw * sig[1]
    ex, ey = evecs[:, 0]  # major-axis direction in (x = west, y = north)
    pa = math.degrees(math.atan2(-ex, ey))  # east of north
    pa = (pa + 90.0) % 180.0 - 90.0
    return float(bmaj), float(bmin), float(pa)


def gaussian_image(shape, bmaj, bmin, bpa_deg, cell_x_rad, cell_y_rad=None, centre=None,
                   dtype=np.float64):
    """Elliptical Gaussian of peak 1 (FWHMs ``bmaj``, ``bmin`` radians, ``bpa`` east of
    north), sampled on an ``[ix (west), iy (north)]`` grid, centred at ``centre``
    (default ``(nx // 2, ny // 2)``)."""
    cell_y_rad = cell_x_rad if cell_y_rad is None else cell_y_rad
    nx, ny = shape
    cx, cy = centre if centre is not None else (nx // 2, ny // 2)
    x = (np.arange(nx) - cx)[:, None] * cell_x_rad
    y = (np.arange(ny) - cy)[None, :] * cell_y_rad
    pa = math.radians(bpa_deg)
    # major-axis unit vector in (x west, y north): (-sin pa, cos pa)
    ux, uy = -math.sin(pa), math.cos(pa)
    s = 2.0 * math.sqrt(2.0 * math.log(2.0))
    smaj, smin = bmaj / s, bmin / s
    p = x * ux + y * uy          # along major
    q = -x * uy + y * ux         # along minor
    return np.exp(-0.5 * ((p / smaj) ** 2 + (q / smin) ** 2)).astype(dtype)


def restore(model, residual, bmaj, bmin, bpa_deg, cell_x_rad, cell_y_rad=None):
    """``model (Jy/pixel) * Gaussian beam (peak 1) + residual`` -> restored image (Jy/beam).

    The convolution uses a kernel truncated at 5 sigma (``scipy.signal.oaconvolve``).
    """
    from scipy import signal

    cell_y_rad = cell_x_rad if cell_y_rad is None else cell_y_rad
    s = 2.0 * math.sqrt(2.0 * math.log(2.0))
    hx = int(math.ceil(5.0 * bmaj / s / min(cell_x_rad, cell_y_rad))) + 1
    hx = min(hx, model.shape[0] // 2 - 1, model.shape[1] // 2 - 1)
    k = gaussian_image((2 * hx + 1, 2 * hx + 1), bmaj, bmin, bpa_deg, cell_x_rad,
                       cell_y_rad, centre=(hx, hx))
    out = residual.astype(np.float64, copy=True)
    ix, iy = np.nonzero(model)
    if ix.size * k.size < model.size:
        # a CLEAN model is a few thousand pixels: add a beam at each (CLEAN's usual
        # case, ~100x cheaper than an FFT convolution of a 2048^2 image)
        _add_beams(out, ix.astype(np.int64), iy.astype(np.int64),
                   model[ix, iy].astype(np.float64), k, hx)
    elif ix.size:
        out += signal.oaconvolve(model.astype(np.float64), k, mode="same")
    return out.astype(residual.dtype, copy=False)


@njit(nogil=True, cache=True)
def _add_beams(out, ix, iy, vals, k, h):
    """``out += vals[c] * k`` centred on each ``(ix[c], iy[c])`` (clipped at the edges),
    i.e. the model convolved with ``k`` (``(2h+1)^2``, centre ``(h, h)``)."""
    nx, ny = out.shape
    for c in range(ix.shape[0]):
        x0, y0, v = ix[c], iy[c], vals[c]
        for a in range(max(0, x0 - h), min(nx, x0 + h + 1)):
            for b in range(max(0, y0 - h), min(ny, y0 + h + 1)):
                out[a, b] += v * k[a - x0 + h, b - y0 + h]


def robust_sigma(img, mask=None):
    """Noise estimate: ``1.4826 * median(|x - median(x)|)`` (MAD) over ``mask`` (or all)."""
    x = np.asarray(img)
    x = x[mask] if mask is not None else x.ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    med = np.median(x)
    return float(1.4826 * np.median(np.abs(x - med)))
