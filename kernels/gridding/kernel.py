"""The gridding kernel: the ES kernel table, its polynomial approximation, its Fourier
transform (the image correction) and the aliasing error that picks (W, sigma).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from kernels.gridding._es_table import ES_KERNELS


def _es(z, beta, e0):
    """The kernel ``exp(beta ((1 - z^2)^e0 - 1))`` on ``|z| <= 1``, zero outside."""
    z = np.asarray(z, dtype=np.float64)
    out = np.zeros_like(z)
    inside = np.abs(z) < 1.0
    out[inside] = np.exp(beta * ((1.0 - z[inside] ** 2) ** e0 - 1.0))
    return out


@functools.lru_cache(maxsize=64)
def _gl_nodes(n):
    return np.polynomial.legendre.leggauss(n)


def psihat(xi, W, beta, e0, nquad=None):
    """Fourier transform of the kernel in grid units, by Gauss-Legendre quadrature.

    ``psi(y) = phi(2 y / W)`` for ``|y| < W/2`` (y in cells); returns
    ``int psi(y) exp(-2 pi i y xi) dy`` (real: psi is even) at the frequencies ``xi``
    (cycles per cell).
    """
    xi = np.asarray(xi, dtype=np.float64)
    if nquad is None:
        nquad = int(max(200, 4 * W * (np.max(np.abs(xi)) + 1) + 100)) if xi.size else 200
    z, wq = _gl_nodes(nquad)
    phi = _es(z, beta, e0) * wq
    flat = xi.ravel()
    out = np.empty(flat.shape, dtype=np.float64)
    step = max(1, 2_000_000 // nquad)
    for i in range(0, flat.size, step):
        out[i : i + step] = np.cos(np.pi * W * np.outer(flat[i : i + step], z)) @ phi
    return (0.5 * W * out).reshape(xi.shape)


def kernel_error(W, sigma, beta, e0, nxi=48, nalias=10, worst=False):
    """Relative 1-D aliasing error of a kernel at oversampling ``sigma``.

    With ``E(xi) = sqrt(sum_{m != 0} psihat(xi + m)^2) / |psihat(xi)|`` the relative
    error of an image pixel at frequency ``xi`` for randomly phased data, returns its
    RMS over ``|xi| <= 1/(2 sigma)`` (Gauss-Legendre: ``E^2`` grows steeply towards the
    edge, which a uniform rule undersamples), or its maximum with ``worst``. The
    relative L2 error of a d-dimensional (de)gridding is ``sqrt(d)`` times the RMS
    (checked against direct Fourier transforms to within ~15 %).
    """
    if worst:
        xi = np.linspace(0.0, 0.5 / sigma, 4 * nxi)
        wq = None
    else:
        t, wq = _gl_nodes(nxi)
        xi = (t + 1.0) * (0.25 / sigma)
        wq = 0.5 * wq
    m = np.concatenate([np.arange(-nalias, 0), np.arange(1, nalias + 1)])
    main = psihat(xi, W, beta, e0)
    alias = psihat(xi[:, None] + m[None, :], W, beta, e0)
    e = np.sqrt(np.sum(alias**2, axis=1)) / np.abs(main)
    return float(np.max(e) if worst else np.sqrt(np.sum(wq * e**2)))


@dataclass(frozen=True)
class _KernelData:
    """Arrays derived from (W, beta, e0): polynomial coefficients and correction fit."""

    coeffs: np.ndarray  # (D+1, Wp) float64, highest power first, zero-padded columns
    degree: int
    poly_error: float
    corr_cheb: np.ndarray  # Chebyshev coefficients of psihat on [0, 0.5]


def _poly_fit(W, beta, e0, D):
    """Per-tap polynomials in s in [-1/2, 1/2]: tap i covers z = (2 s + W - 1 - 2 i) / W."""
    from numpy.polynomial import chebyshev as C
    from numpy.polynomial import polynomial as P

    wp = ((W + 3) // 4) * 4
    coeffs = np.zeros((D + 1, wp))
    for i in range(W):
        # Chebyshev interpolation in t = 2 s in [-1, 1]
        c = C.chebinterpolate(lambda t, i=i: _es((t + W - 1 - 2 * i) / W, beta, e0), D)
        mono_t = np.zeros(D + 1)
        tmp = C.cheb2poly(c)  # in powers of t (trailing zeros trimmed)
        mono_t[: tmp.size] = tmp
        mono_s = mono_t * 2.0 ** np.arange(D + 1)  # t = 2 s
        coeffs[:, i] = mono_s[::-1]
    # measure the error on a dense grid
    s = np.linspace(-0.5, 0.5, 401)
    err = 0.0
    for i in range(W):
        approx = P.polyval(s, coeffs[::-1, i])
        exact = _es((2 * s + W - 1 - 2 * i) / W, beta, e0)
        err = max(err, float(np.max(np.abs(approx - exact))))
    return coeffs, err


@functools.lru_cache(maxsize=32)
def _kernel_data(W, sigma, beta, e0, eps1d):
    """Polynomial coefficients and the correction's Chebyshev fit for one kernel.

    The gridder evaluates the kernel as one polynomial per tap interval; the correction
    is the Fourier transform of that piecewise polynomial (Gauss-Legendre quadrature per
    interval), so only the polynomial kernel's own aliasing error matters. The degree is
    the smallest whose aliasing error (RMS, as in :func:`kernel_error`) stays within
    10 % of the exact kernel's ``eps1d``.
    """
    from numpy.polynomial import chebyshev as C

    for D in range(max(W - 3, 3), W + 6):
        coeffs, err = _poly_fit(W, beta, e0, D)
        if _poly_alias_error(coeffs, W, sigma) <= 1.1 * eps1d:
            break
    # psihat of the piecewise polynomial on [0, 0.5], as a Chebyshev series
    cheb = C.chebinterpolate(lambda t: _psihat_poly(0.25 * (t + 1.0), coeffs, W), 48)
    keep = np.flatnonzero(np.abs(cheb) > 1e-14 * np.abs(cheb[0]))
    cheb = cheb[: keep[-1] + 1]  # drop orders below rounding (faster evaluation)
    return _KernelData(coeffs=coeffs, degree=D, poly_error=err, corr_cheb=cheb)


def _poly_alias_error(coeffs, W, sigma, nxi=48, nalias=10):
    """:func:`kernel_error` (RMS) of the piecewise-polynomial kernel."""
    t, wq = _gl_nodes(nxi)
    xi = (t + 1.0) * (0.25 / sigma)
    m = np.concatenate([np.arange(-nalias, 0), np.arange(1, nalias + 1)])
    main = _psihat_poly(xi, coeffs, W)
    alias = _psihat_poly(xi[:, None] + m[None, :], coeffs, W)
    e = np.sqrt(np.sum(alias**2, axis=1)) / np.abs(main)
    return float(np.sqrt(np.sum(0.5 * wq * e**2)))


def _psihat_poly(xi, coeffs, W):
    """Fourier transform (grid units) of the piecewise-polynomial kernel ``coeffs``."""
    nd = coeffs.shape[0]
    xg, wg = _gl_nodes(nd // 2 + 24 + int(6 * np.max(np.abs(xi), initial=0.0)))
    s = 0.5 * xg  # local coordinate in [-1/2, 1/2]
    out = np.zeros(np.shape(xi))
    xi = np.asarray(xi, dtype=np.float64)
    for i in range(W):
        val = np.zeros_like(s)
        for d in range(nd):  # Horner, highest power first
            val = val * s + coeffs[d, i]
        y = s + 0.5 * (W - 1) - i  # cell offset of the tap from the visibility
        # psihat(xi) = int psi(y) cos(2 pi y xi) dy; dy = ds; interval length 1 -> weights/2
        out += np.cos(2 * np.pi * np.multiply.outer(xi, y)) @ (0.5 * wg * val)
    return out


def _psihat_fast(xi, kd):
    from numpy.polynomial import chebyshev as C

    return C.chebval(4.0 * np.abs(xi) - 1.0, kd.corr_cheb)


# predicted relative L2 error = sqrt(ndim) * eps1d (within ~15 % of measurements);
# a kernel qualifies when that prediction times this margin is at most epsilon
_ERROR_MARGIN = 2.0


def kernel_candidates(epsilon, ndim, sigma_min=1.1, sigma_max=2.6, single=False):
    """Table rows ``(W, sigma, eps1d, beta, e0)`` accurate enough for ``epsilon``."""
    out = []
    for W, sigma, eps1d, beta_w, e0 in ES_KERNELS:
        if not (sigma_min <= sigma <= sigma_max):
            continue
        if single and W > 8:
            continue
        if _ERROR_MARGIN * math.sqrt(ndim) * eps1d <= epsilon:
            out.append((W, sigma, eps1d, beta_w * W, e0))
    return out
