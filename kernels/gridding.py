"""w-stacking gridder and degridder (numba), accuracy chosen by one parameter epsilon.

Conventions (identical to ``ducc0.wgridder.vis2dirty`` / ``dirty2vis`` so the two can be
compared 1:1):

* image pixel ``(ix, iy)`` sits at ``l = (ix - npix_x/2) * pixsize_x``,
  ``m = (iy - npix_y/2) * pixsize_y``; ``n - 1 = -(l^2 + m^2) / (sqrt(1 - l^2 - m^2) + 1)``;
* ``vis2dirty``:  ``I(l, m) = sum_k wgt_k Re[V_k exp(+2 pi i (u_k l + v_k m - w_k (n-1)))] / n``
  (u, v, w in wavelengths = metres * freq / c; the ``/ n`` only with w-stacking and
  ``divide_by_n``; without w-stacking the w term is dropped and n = 1);
* ``dirty2vis`` is the exact adjoint:
  ``V_k = wgt_k sum_lm I(l, m) exp(-2 pi i (u_k l + v_k m - w_k (n-1))) / n``.

``flip_u/flip_v/flip_w`` negate the corresponding coordinate, as in ducc0; with
``flip_w=True`` the phase reads ``u l + v m + w (n-1)``, the convention
``kernels.predict`` uses for the pipeline's data (``V = sum S exp(+2 pi i (ul+vm+w(n-1)))``).

Algorithm (Arras et al. 2021, "Efficient wide-field radio interferometry response";
Ye et al. 2021 "improved w-stacking"):

* a "generalised exponential of semicircle" kernel
  ``phi(z) = exp(beta ((1 - z^2)^e0 - 1))`` on ``|z| < 1`` (``e0 = 1/2`` is the classic ES
  kernel of Barnett et al. 2019; letting ``e0`` float to ~0.52 buys a factor 2-3 in
  accuracy at the same support). Support ``W``, oversampling ``sigma``, ``beta`` and
  ``e0`` come from a table optimised offline (``kernels/_es_table.py``, made by
  ``bench/make_es_table.py``) that lists each kernel's RMS 1-D aliasing error; the
  relative L2 error of the image is ``sqrt(ndim)`` times it (ndim = 3 with w-stacking;
  checked against direct transforms to ~15 %), and a kernel is eligible when twice that
  is at most ``epsilon``. Among eligible kernels a cost model (gridding ~ nvis W^3,
  FFT ~ nplanes * grid log grid) picks the cheapest;
* the kernel is evaluated as one polynomial per tap interval (Horner, all taps at once,
  degree ~W-2, the lowest that keeps the polynomial kernel's own aliasing error within
  10 % of the exact kernel's); the tap loops are generated per lane count
  (``kernels/_gridding_loops.py``) and compiled with LLVM's SLP vectoriser (AVX2);
* w-stacking treats w as a third NUFFT dimension: each visibility is spread over ``W``
  w-planes with the same kernel, each plane is FFT'd (only the columns that carry data
  in that plane, then only the rows the image needs), multiplied by the screen
  ``exp(-2 pi i w_plane (n - 1 + nshift))`` and accumulated; the image is then divided by
  the Fourier transform of the (polynomial) kernel in u, v and w (the latter at
  ``dw (n - 1 + nshift)``), evaluated numerically by Gauss-Legendre quadrature per tap
  interval and stored as a Chebyshev series, and by ``n``;
* visibilities with ``w < 0`` are replaced by their conjugates at ``(-u, -v, -w)`` (the
  image is real), which halves the w range; ``nshift`` re-centres ``n - 1`` so the
  screens oscillate as slowly as possible, halving the number of planes again;
* visibilities are traversed tile by tile: (row, channel-range) runs are sorted by
  (uv tile, first w-plane), each tile is accumulated in a small local buffer and added
  to the grid once; threads take whole tile rows, even rows then odd rows, so no two
  threads ever write the same grid cells (no locks, deterministic results).

Memory grows with the image (one grid of ``nu x nv`` in flight: vis2dirty/dirty2vis grid
and transform one w-plane at a time), not with the number of visibilities, beyond one
working copy of the chunk's visibilities and the index of runs. :func:`grid_chunk`
returns the whole stack ``(nplanes, nu, nv)`` (or a range of planes, ``planes=``), so a
graph can trade memory against passes over the data.

Lower-level API for distributed imaging: :func:`make_plan` fixes every parameter from
global quantities (image geometry, epsilon, the |w| range and uv extent of all the data),
:func:`grid_chunk` grids one chunk onto a stack of w-planes, stacks from chunks add up,
and :func:`grid_to_image` turns a (summed) stack into the dirty image. Their adjoints are
:func:`image_to_grid` and :func:`degrid_chunk`.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit

from kernels._es_table import ES_KERNELS
from kernels._gridding_loops import LOOPS as _LOOPS
from kernels._gridding_loops import pix as _pix
from kernels.constants import SPEED_OF_LIGHT

log = logging.getLogger(__name__)

try:  # ducc0's FFT is faster than pocketfft-in-scipy for the strided partial transforms
    import ducc0.fft as _ducc_fft
except ImportError:  # pragma: no cover - exercised only without ducc0
    _ducc_fft = None

__all__ = [
    "GridPlan",
    "make_plan",
    "plan_for",
    "w_range",
    "uv_extent",
    "grid_chunk",
    "grid_to_image",
    "image_to_grid",
    "degrid_chunk",
    "vis2dirty",
    "dirty2vis",
    "make_index",
    "kernel_candidates",
]

# ---------------------------------------------------------------------------------
# kernel: table, polynomial approximation, Fourier transform (correction)
# ---------------------------------------------------------------------------------

# Cost model that picks (W, sigma), measured on an AMD EPYC (AVX2) core with this module:
# seconds per visit of one visibility to one w-plane (a fixed part plus one per tap,
# single / double precision), per element*log2(length) of the partial FFTs, and per
# image pixel and plane for the screen and accumulation.
_COST_VISIT = 20e-9
_COST_TAP = {False: 0.35e-9, True: 0.5e-9}
_COST_FFT = 0.26e-9
_COST_PIXEL = 2.5e-9


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


def _good_size(n):
    """Smallest even n' >= n whose half is 2^a 3^b 5^c 7^d 11^e (fast for pocketfft/ducc)."""
    import scipy.fft

    return 2 * scipy.fft.next_fast_len(int(math.ceil(n / 2)), real=False)


# ---------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridPlan:
    """Every parameter of a gridding job, fixed from global quantities.

    Small and picklable: a Dask graph ships it to every chunk. The uv-grid has shape
    ``(nu, nv)`` with u = v = 0 at index ``(nu/2, nv/2)``; plane ``j`` of the w-stack
    sits at ``w = wplane0 + j * dw`` (wavelengths, after the ``w >= 0`` flip).
    """

    npix_x: int
    npix_y: int
    pixsize_x: float
    pixsize_y: float
    epsilon: float
    do_wstacking: bool
    double: bool
    nu: int
    nv: int
    W: int
    sigma: float
    beta: float
    e0: float
    eps1d: float
    tile: int
    wmin: float
    wmax: float
    nplanes: int
    wplane0: float
    dw: float
    nshift: float
    umax: float  # max |u| (wavelengths) the plan was made for
    vmax: float
    flip_u: bool = False
    flip_v: bool = False
    flip_w: bool = False
    divide_by_n: bool = True

    @property
    def grid_dtype(self):
        return np.dtype(np.complex128 if self.double else np.complex64)

    @property
    def image_dtype(self):
        return np.dtype(np.float64 if self.double else np.float32)

    @property
    def kernel(self):
        return _kernel_data(self.W, self.sigma, self.beta, self.e0, self.eps1d)

    def describe(self):
        return (
            f"image {self.npix_x}x{self.npix_y}, grid {self.nu}x{self.nv}"
            f"{'x%d planes' % self.nplanes if self.do_wstacking else ''}, W={self.W}, "
            f"sigma={self.sigma:.2f}, beta={self.beta:.3f}, e0={self.e0:.4f}, "
            f"poly degree {self.kernel.degree}, eps={self.epsilon:g}, "
            f"w=[{self.wmin:.1f}, {self.wmax:.1f}] dw={self.dw:.2f} nshift={self.nshift:.3e}"
        )


def _nm1_range(npix_x, npix_y, pixsize_x, pixsize_y):
    xmin, xmax = -0.5 * npix_x * pixsize_x, (0.5 * npix_x - 1) * pixsize_x
    ymin, ymax = -0.5 * npix_y * pixsize_y, (0.5 * npix_y - 1) * pixsize_y
    xs = [xmin, xmax, 0.0]
    ys = [ymin, ymax, 0.0]
    vals = []
    for x in xs:
        for y in ys:
            r2 = x * x + y * y
            vals.append(math.sqrt(1.0 - r2) - 1.0 if r2 <= 1.0 else -math.sqrt(r2 - 1.0) - 1.0)
    return min(vals), max(vals)


def make_plan(
    npix_x,
    npix_y,
    pixsize_x,
    pixsize_y,
    epsilon,
    *,
    wmin=0.0,
    wmax=0.0,
    umax=None,
    vmax=None,
    nvis=None,
    do_wstacking=True,
    double=True,
    sigma_min=1.1,
    sigma_max=2.6,
    nthreads=1,
    flip_u=False,
    flip_v=False,
    flip_w=False,
    divide_by_n=True,
    W=None,
    sigma=None,
):
    """Choose kernel, grid size and w-planes for an image and data described globally.

    ``wmin``/``wmax``: range of ``|w|`` in wavelengths over all visibilities to be
    gridded with this plan; ``umax``/``vmax``: largest ``|u|``, ``|v|`` (wavelengths)
    (defaults: the whole grid); ``nvis``: number of visibilities (for the cost model).
    ``W``/``sigma`` force a table kernel (tests, benchmarks).
    """
    npix_x, npix_y = int(npix_x), int(npix_y)
    if npix_x % 2 or npix_y % 2 or npix_x < 16 or npix_y < 16:
        raise ValueError("npix_x and npix_y must be even and at least 16")
    if not (pixsize_x > 0 and pixsize_y > 0):
        raise ValueError("pixel sizes must be positive")
    if not double and epsilon < 1e-5:
        raise ValueError(f"epsilon={epsilon:g} needs double precision (single: >= 1e-5)")
    if epsilon < 1e-12:
        raise ValueError(f"epsilon={epsilon:g} below what the kernel table supports (1e-12)")
    wmin, wmax = float(wmin), float(wmax)
    if wmax < wmin:
        raise ValueError("wmax < wmin")
    ndim = 3 if do_wstacking else 2
    if W is None and sigma is None:
        cands = kernel_candidates(epsilon, ndim, sigma_min, sigma_max, single=not double)
    else:  # forced kernel (tests, benchmarks): ignore epsilon
        cands = [
            (Wk, s, e, b * Wk, e0)
            for Wk, s, e, b, e0 in ES_KERNELS
            if (W is None or Wk == W) and (sigma is None or abs(s - sigma) < 1e-9)
        ]
    if not cands:
        raise ValueError(
            f"no kernel reaches epsilon={epsilon:g} with sigma in [{sigma_min}, {sigma_max}]"
            + ("" if double else " in single precision")
        )
    if do_wstacking:
        nm1min, nm1max = _nm1_range(npix_x, npix_y, pixsize_x, pixsize_y)
        nshift = -0.5 * (nm1max + nm1min)
        xmax = max(abs(nm1max + nshift), abs(nm1min + nshift), 1e-300)
    else:
        nshift, xmax = 0.0, 1.0
    nvis_eff = float(nvis) if nvis else 1e6
    best = None
    for Wc, sig, eps1d, beta, e0 in cands:
        nu = max(_good_size(npix_x * sig), 16)
        nv = max(_good_size(npix_y * sig), 16)
        if do_wstacking:
            dw = 0.5 / sig / xmax
            nplanes = int(math.ceil((wmax - wmin) / dw)) + Wc
            visits = Wc
        else:
            dw, nplanes, visits = 0.0, 1, 1
        wp = ((Wc + 3) // 4) * 4
        t_grid = nvis_eff * visits * (_COST_VISIT + _COST_TAP[bool(double)] * Wc * wp)
        t_grid /= nthreads
        urows = _data_lines(umax, pixsize_x, nu, Wc)
        vcols = _data_lines(vmax, pixsize_y, nv, Wc)
        work = min(vcols * nu * math.log2(nu) + npix_x * nv * math.log2(nv),
                   urows * nv * math.log2(nv) + npix_y * nu * math.log2(nu))
        t_fft = nplanes * (_COST_FFT * work + _COST_PIXEL * npix_x * npix_y)
        t_fft /= 1 + 0.8 * (nthreads - 1)
        cost = t_grid + t_fft
        if best is None or cost < best[0]:
            best = (cost, Wc, sig, eps1d, beta, e0, nu, nv, dw, nplanes)
    _, Wc, sig, eps1d, beta, e0, nu, nv, dw, nplanes = best
    tile = 16 if (double and Wc + 1 <= 16) else 32
    if do_wstacking:
        wplane0 = 0.5 * (wmin + wmax) - 0.5 * (nplanes - 1) * dw
    else:
        wplane0 = 0.0
    plan = GridPlan(
        npix_x=npix_x,
        npix_y=npix_y,
        pixsize_x=float(pixsize_x),
        pixsize_y=float(pixsize_y),
        epsilon=float(epsilon),
        do_wstacking=bool(do_wstacking),
        double=bool(double),
        nu=int(nu),
        nv=int(nv),
        W=int(Wc),
        sigma=float(sig),
        beta=float(beta),
        e0=float(e0),
        eps1d=float(eps1d),
        tile=tile,
        wmin=wmin,
        wmax=wmax,
        nplanes=int(nplanes),
        wplane0=float(wplane0),
        dw=float(dw),
        nshift=float(nshift),
        umax=float(umax) if umax is not None else 0.5 / pixsize_x,
        vmax=float(vmax) if vmax is not None else 0.5 / pixsize_y,
        flip_u=bool(flip_u),
        flip_v=bool(flip_v),
        flip_w=bool(flip_w),
        divide_by_n=bool(divide_by_n),
    )
    log.debug("gridding plan: %s", plan.describe())
    return plan


def _data_lines(umax, pixsize, n, W):
    """Number of grid lines (of n) that can hold data for |u| <= umax (centred grid)."""
    if umax is None:
        return n
    lim = int(math.ceil(umax * pixsize * n)) + W + 2
    return n if 2 * lim >= n else 2 * lim


def _active_mask(vis, weights, flags, shape, gridding):
    act = np.ones(shape, dtype=np.bool_)
    if flags is not None:
        act &= ~np.asarray(flags, dtype=np.bool_)
    if weights is not None:
        act &= np.asarray(weights) != 0
    if gridding and vis is not None:
        act &= np.asarray(vis) != 0
    return act


def w_range(uvw, freq, flags=None, weights=None):
    """``(min |w|, max |w|)`` in wavelengths over the unflagged visibilities."""
    uvw = np.asarray(uvw, dtype=np.float64)
    freq = np.asarray(freq, dtype=np.float64)
    act = _active_mask(None, weights, flags, (uvw.shape[0], freq.size), False)
    return _w_range_active(uvw, freq, act)


def _w_range_active(uvw, freq, act, nthreads=1):
    if uvw.shape[0] == 0 or freq.size == 0:
        return 0.0, 0.0
    aw = np.ascontiguousarray(np.abs(uvw[:, 2]))
    fovc = np.ascontiguousarray(freq / SPEED_OF_LIGHT)
    bd = _split(uvw.shape[0], max(1, nthreads))
    parts = _map(nthreads, lambda i: _wminmax(aw, fovc, act, bd[i], bd[i + 1]),
                 list(range(len(bd) - 1)))
    lo = min(p[0] for p in parts)
    hi = max(p[1] for p in parts)
    return (0.0, 0.0) if hi < lo else (float(lo), float(hi))


@njit(nogil=True, cache=True)
def _wminmax(aw, fovc, act, lo, hi):
    wmin = np.inf
    wmax = -np.inf
    for r in range(lo, hi):
        for c in range(fovc.shape[0]):
            if act[r, c]:
                w = aw[r] * fovc[c]
                if w < wmin:
                    wmin = w
                if w > wmax:
                    wmax = w
    return wmin, wmax


def uv_extent(uvw, freq):
    """``(max |u|, max |v|)`` in wavelengths."""
    uvw = np.asarray(uvw, dtype=np.float64)
    if uvw.shape[0] == 0:
        return 0.0, 0.0
    fmax = float(np.max(freq)) / SPEED_OF_LIGHT
    return float(np.abs(uvw[:, 0]).max() * fmax), float(np.abs(uvw[:, 1]).max() * fmax)


def plan_for(
    uvw,
    freq,
    npix_x,
    npix_y,
    pixsize_x,
    pixsize_y,
    epsilon,
    *,
    flags=None,
    weights=None,
    vis=None,
    do_wstacking=True,
    double=True,
    nthreads=1,
    **kw,
):
    """:func:`make_plan` with the w range, uv extent and count taken from the data."""
    uvw = np.asarray(uvw, dtype=np.float64)
    freq = np.asarray(freq, dtype=np.float64)
    act = _active_mask(vis, weights, flags, (uvw.shape[0], freq.size), vis is not None)
    return _plan_active(uvw, freq, act, npix_x, npix_y, pixsize_x, pixsize_y, epsilon,
                        do_wstacking=do_wstacking, double=double, nthreads=nthreads, **kw)


def _plan_active(uvw, freq, act, npix_x, npix_y, pixsize_x, pixsize_y, epsilon, *,
                 do_wstacking, double, nthreads, **kw):
    nvis = int(np.count_nonzero(act))
    wmin, wmax = _w_range_active(uvw, freq, act, nthreads) if do_wstacking else (0.0, 0.0)
    umax, vmax = uv_extent(uvw, freq)
    return make_plan(npix_x, npix_y, pixsize_x, pixsize_y, epsilon, wmin=wmin, wmax=wmax,
                     umax=umax, vmax=vmax, nvis=max(nvis, 1), do_wstacking=do_wstacking,
                     double=double, nthreads=nthreads, **kw)


# ---------------------------------------------------------------------------------
# numba kernels
# ---------------------------------------------------------------------------------


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
def _prep_vis(vis, wgt, use_wgt, active, uvw, conj, fovc, nshift, uniform, out, lo, hi):
    """out = conj?(vis * wgt) * exp(2 pi i w' nshift), zero where inactive (rows [lo, hi))."""
    nchan = vis.shape[1]
    twopi = 2.0 * np.pi
    dfc = fovc[1] - fovc[0] if nchan > 1 else 0.0
    for row in range(lo, hi):
        a = twopi * nshift * uvw[row, 2]
        sgn = -1.0 if conj[row] else 1.0
        cr = 1.0
        ci = 0.0
        sr = 1.0
        si = 0.0
        ph = 0.0
        if nshift != 0.0 and uniform:
            ph = a * fovc[0]
            cr = np.cos(ph)
            ci = np.sin(ph)
            if nchan > 1:
                sr = np.cos(a * dfc)
                si = np.sin(a * dfc)
        for ch in range(nchan):
            if nshift != 0.0:
                if not uniform:
                    ph = a * fovc[ch]
                    cr = np.cos(ph)
                    ci = np.sin(ph)
            if active[row, ch]:
                x = vis[row, ch]
                wt = wgt[row, ch] if use_wgt else 1.0
                xr = x.real * wt
                xi = x.imag * wt * sgn
                if nshift != 0.0:
                    out[row, ch] = complex(xr * cr - xi * ci, xr * ci + xi * cr)
                else:
                    out[row, ch] = complex(xr, xi)
            else:
                out[row, ch] = 0.0
            if nshift != 0.0 and uniform:
                t = cr * sr - ci * si
                ci = cr * si + ci * sr
                cr = t


@njit(nogil=True, cache=True)
def _finish_vis(raw, wgt, use_wgt, active, uvw, conj, fovc, nshift, uniform, out, lo, hi):
    """Degridding epilogue: out = conj?(raw * exp(-2 pi i w' nshift)) * wgt, rows [lo, hi)."""
    nchan = raw.shape[1]
    twopi = 2.0 * np.pi
    dfc = fovc[1] - fovc[0] if nchan > 1 else 0.0
    for row in range(lo, hi):
        a = -twopi * nshift * uvw[row, 2]
        sgn = -1.0 if conj[row] else 1.0
        cr = 1.0
        ci = 0.0
        sr = 1.0
        si = 0.0
        ph = 0.0
        if nshift != 0.0 and uniform:
            ph = a * fovc[0]
            cr = np.cos(ph)
            ci = np.sin(ph)
            if nchan > 1:
                sr = np.cos(a * dfc)
                si = np.sin(a * dfc)
        for ch in range(nchan):
            if nshift != 0.0:
                if not uniform:
                    ph = a * fovc[ch]
                    cr = np.cos(ph)
                    ci = np.sin(ph)
            if active[row, ch]:
                x = raw[row, ch]
                if nshift != 0.0:
                    yr = x.real * cr - x.imag * ci
                    yi = x.real * ci + x.imag * cr
                else:
                    yr = x.real
                    yi = x.imag
                wt = wgt[row, ch] if use_wgt else 1.0
                out[row, ch] = complex(yr * wt, yi * wt * sgn)
            else:
                out[row, ch] = 0.0
            if nshift != 0.0 and uniform:
                t = cr * sr - ci * si
                ci = cr * si + ci * sr
                cr = t


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


@njit(nogil=True, cache=True)
def _prep_vis_ph(vis, wgt, use_wgt, active, conj, ph, out, lo, hi):
    """_prep_vis with the w-shift phasors precomputed (``ph``)."""
    nchan = vis.shape[1]
    for row in range(lo, hi):
        sgn = -1.0 if conj[row] else 1.0
        for ch in range(nchan):
            if active[row, ch]:
                x = vis[row, ch]
                wt = wgt[row, ch] if use_wgt else 1.0
                xr = x.real * wt
                xi = x.imag * wt * sgn
                p = ph[row, ch]
                out[row, ch] = complex(xr * p.real - xi * p.imag, xr * p.imag + xi * p.real)
            else:
                out[row, ch] = 0.0


@njit(nogil=True, cache=True)
def _finish_vis_ph(raw, wgt, use_wgt, active, conj, ph, out, lo, hi):
    """_finish_vis with the w-shift phasors precomputed (``ph``, conjugated here)."""
    nchan = raw.shape[1]
    for row in range(lo, hi):
        sgn = -1.0 if conj[row] else 1.0
        for ch in range(nchan):
            if active[row, ch]:
                x = raw[row, ch]
                p = ph[row, ch]
                yr = x.real * p.real + x.imag * p.imag
                yi = x.imag * p.real - x.real * p.imag
                wt = wgt[row, ch] if use_wgt else 1.0
                out[row, ch] = complex(yr * wt, yi * wt * sgn)
            else:
                out[row, ch] = 0.0


@njit(nogil=True, cache=True)
def _screen_init(scr, x, w, lo, hi):
    """scr = exp(-2 pi i w x) for quadrant rows [lo, hi)."""
    twopi = 2.0 * np.pi
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            ph = -twopi * w * x[i, j]
            scr[i, j] = complex(np.cos(ph), np.sin(ph))


@njit(nogil=True, cache=True)
def _accum_quadrant(dirty, gridf, scr, step, use_scr, advance, zero_rows, i_lo, i_hi):
    """dirty += Re(grid * screen) for the <= 4 pixels (+-i, +-j) of quadrant rows [lo, hi).

    Pixel (ix, iy) = (nx/2 + p, ny/2 + q) reads grid[p mod nu, q mod nv] and uses the
    screen at (|p|, |q|). With ``advance`` the screen is multiplied by ``step`` after use
    (it then holds the next plane's); with ``zero_rows`` the grid rows read are zeroed.
    """
    nx, ny = dirty.shape
    nu = gridf.shape[0]
    nv = gridf.shape[1] // 2
    hx = nx // 2
    hy = ny // 2
    for i in range(i_lo, i_hi):
        has1 = i < hx  # row hx + i exists
        has2 = i > 0  # row hx - i exists
        g1 = i % nu
        g2 = (nu - i) % nu
        for j in range(hy + 1):
            sr = 1.0
            si = 0.0
            if use_scr:
                s = scr[i, j]
                sr = s.real
                si = s.imag
                if advance:
                    scr[i, j] = s * step[i, j]
            c1 = j < hy
            c2 = j > 0
            k1 = 2 * (j % nv)
            k2 = 2 * ((nv - j) % nv)
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
    nx, ny = img.shape
    nu = gridf.shape[0]
    nv = gridf.shape[1] // 2
    hx = nx // 2
    hy = ny // 2
    for i in range(i_lo, i_hi):
        has1 = i < hx
        has2 = i > 0
        g1 = i % nu
        g2 = (nu - i) % nu
        if has1:
            gridf[g1, :] = 0.0
        if has2:
            gridf[g2, :] = 0.0
        for j in range(hy + 1):
            sr = 1.0
            si = 0.0
            if use_scr:
                s = scr[i, j]
                sr = s.real
                si = -s.imag
                if advance:
                    scr[i, j] = s * step[i, j]
            c1 = j < hy
            c2 = j > 0
            k1 = 2 * (j % nv)
            k2 = 2 * ((nv - j) % nv)
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


@njit(nogil=True, cache=True)
def _clenshaw(t, c):
    b1 = 0.0
    b2 = 0.0
    for k in range(c.shape[0] - 1, 0, -1):
        b0 = 2.0 * t * b1 - b2 + c[k]
        b2 = b1
        b1 = b0
    return t * b1 - b2 + c[0]


@njit(nogil=True, cache=True)
def _corr_quadrant(q, cu, cv, nm1, cheb, dw, nshift, do_w, divide_by_n, lo, hi):
    """q[i, j] = cu[i] cv[j] / psihat(dw (nm1 + nshift)) / n  (w terms only if do_w)."""
    for i in range(lo, hi):
        for j in range(q.shape[1]):
            f = cu[i] * cv[j]
            if do_w:
                x = nm1[i, j]
                cw = _clenshaw(4.0 * abs(dw * (x + nshift)) - 1.0, cheb)
                if x < -1.0:  # beyond the horizon
                    f = 0.0 if divide_by_n else f / cw
                else:
                    f = f / cw
                    if divide_by_n:
                        f = f / (x + 1.0)
            q[i, j] = f


@njit(nogil=True, cache=True)
def _apply_quadrant(img, q, out, lo, hi):
    """out[ix, iy] = img[ix, iy] * q[|p|, |q|] * (-1)^(p+q), p = ix - nx/2, q = iy - ny/2."""
    nx, ny = img.shape
    hx = nx // 2
    hy = ny // 2
    for ix in range(lo, hi):
        p = ix - hx
        qi = abs(p)
        for iy in range(ny):
            qq = iy - hy
            f = q[qi, abs(qq)]
            if (p + qq) % 2 != 0:
                f = -f
            out[ix, iy] = img[ix, iy] * f


# ---------------------------------------------------------------------------------
# index of runs
# ---------------------------------------------------------------------------------


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


def _split(x, n):
    return [(i * x) // n for i in range(n + 1)]


@functools.lru_cache(maxsize=8)
def _pool(nthreads):
    return ThreadPoolExecutor(max_workers=nthreads, thread_name_prefix="contimg-grid")


def _map(nthreads, fn, items):
    """Run ``fn`` over ``items`` on ``nthreads`` threads (the numba kernels drop the GIL)."""
    if nthreads <= 1 or len(items) <= 1:
        return [fn(it) for it in items]
    return list(_pool(int(nthreads)).map(fn, items))


_COMPILE_LOCK = threading.Lock()
_READY = set()


def _compiled(fn, args):
    """``fn`` compiled for ``args``' types with LLVM's SLP vectoriser switched on.

    numba leaves SLP vectorisation off by default; the generated tap loops of
    ``kernels._gridding_loops`` need it (2-4x faster). The switch is flipped only while
    this one signature is compiled (or loaded from numba's on-disk cache), under a lock.
    """
    if not hasattr(fn, "compile"):  # NUMBA_DISABLE_JIT: plain Python
        return fn
    key = (fn, tuple(numba.typeof(a) for a in args))
    if key in _READY:
        return fn
    with _COMPILE_LOCK:
        if key not in _READY:
            old = numba.config.SLP_VECTORIZE
            numba.config.SLP_VECTORIZE = 1
            try:
                fn.compile(key[1])
            finally:
                numba.config.SLP_VECTORIZE = old
            _READY.add(key)
    return fn


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


# ---------------------------------------------------------------------------------
# FFT and image-domain pieces
# ---------------------------------------------------------------------------------


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


def _quadrant_lm(plan):
    hx, hy = plan.npix_x // 2, plan.npix_y // 2
    l2 = (np.arange(hx + 1) * plan.pixsize_x) ** 2
    m2 = (np.arange(hy + 1) * plan.pixsize_y) ** 2
    r2 = l2[:, None] + m2[None, :]
    tmp = 1.0 - r2
    with np.errstate(invalid="ignore"):
        nm1 = np.where(tmp >= 0, -r2 / (np.sqrt(np.maximum(tmp, 0)) + 1.0),
                       -np.sqrt(np.maximum(-tmp, 0)) - 1.0)
    return nm1, tmp >= 0


def _screen_x(plan):
    nm1, _ = _quadrant_lm(plan)
    return np.ascontiguousarray(nm1 + plan.nshift)


@functools.lru_cache(maxsize=4)
def _correction_quadrant(plan, nthreads=1):
    """(npix_x/2+1, npix_y/2+1) correction: 1/psihat in u, v (and w), and 1/n."""
    kd = plan.kernel
    hx, hy = plan.npix_x // 2, plan.npix_y // 2
    cu = 1.0 / _psihat_fast(np.arange(hx + 1) / plan.nu, kd)
    cv = 1.0 / _psihat_fast(np.arange(hy + 1) / plan.nv, kd)
    q = np.empty((hx + 1, hy + 1))
    nm1 = _quadrant_lm(plan)[0] if plan.do_wstacking else np.zeros((1, 1))
    bd = _split(hx + 1, max(1, min(nthreads, hx + 1)))
    _map(nthreads, lambda i: _corr_quadrant(q, cu, cv, nm1, kd.corr_cheb, plan.dw, plan.nshift,
                                            plan.do_wstacking, plan.divide_by_n, bd[i],
                                            bd[i + 1]),
         list(range(len(bd) - 1)))
    q.setflags(write=False)
    return q


def _apply_correction(img, plan, nthreads, out=None):
    """img * correction (incl. the (-1)^(p+q) of the centred grid), into ``out``."""
    q = _correction_quadrant(plan, nthreads)
    if out is None:
        out = np.empty(img.shape, dtype=plan.image_dtype)
    bd = _split(plan.npix_x, max(1, nthreads))
    _map(nthreads, lambda i: _apply_quadrant(img, q, out, bd[i], bd[i + 1]),
         list(range(len(bd) - 1)))
    return out


# ---------------------------------------------------------------------------------
# public: plan-level building blocks
# ---------------------------------------------------------------------------------


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
    uniform = _uniform(idx.fovc)
    bd = _split(vis.shape[0], max(1, nthreads))
    if idx.phasor is not None:
        _map(nthreads, lambda i: _prep_vis_ph(visc, wgt, use_w, act, idx.conj, idx.phasor,
                                              vis_eff, bd[i], bd[i + 1]),
             list(range(len(bd) - 1)))
        return idx, vis_eff
    _map(nthreads, lambda i: _prep_vis(visc, wgt, use_w, act, idx.uvw, idx.conj, idx.fovc,
                                       nshift, uniform, vis_eff, bd[i], bd[i + 1]),
         list(range(len(bd) - 1)))
    return idx, vis_eff


def _uniform(fovc):
    if fovc.size < 3:
        return True
    d = np.diff(fovc)
    return bool(np.all(np.abs(d - d[0]) <= 1e-13 * np.abs(fovc).max()))


def _grid_plane(gridf, idx, vis_eff, plan, plane, coeffs, nthreads):
    W, T = plan.W, plan.tile
    nsafe = W // 2 + 1
    inv_dw = 1.0 / plan.dw if plan.do_wstacking else 0.0
    fn = _LOOPS[coeffs.shape[1]][0]
    for tasks in _work_items(idx, plan, plane, nthreads, True):
        def work(items):
            args = (gridf, items, plane, idx.blk_tv, idx.blk_p0, idx.blk_rstart, idx.run_row,
                    idx.run_c0, idx.run_c1, idx.uvw, idx.fovc, vis_eff, coeffs, W, T, nsafe,
                    plan.pixsize_x, plan.pixsize_y, plan.do_wstacking, plan.wplane0, inv_dw)
            _compiled(fn, args)(*args)

        _map(nthreads, work, tasks)


def _degrid_plane(gridf, idx, raw, plan, plane, coeffs, nthreads):
    W, T = plan.W, plan.tile
    nsafe = W // 2 + 1
    inv_dw = 1.0 / plan.dw if plan.do_wstacking else 0.0
    fn = _LOOPS[coeffs.shape[1]][1]
    for tasks in _work_items(idx, plan, plane, nthreads, False):
        def work(items):
            args = (gridf, items, plane, idx.blk_tv, idx.blk_p0, idx.blk_rstart, idx.run_row,
                    idx.run_c0, idx.run_c1, idx.uvw, idx.fovc, raw, coeffs, W, T, nsafe,
                    plan.pixsize_x, plan.pixsize_y, plan.do_wstacking, plan.wplane0, inv_dw)
            _compiled(fn, args)(*args)

        _map(nthreads, work, tasks)


def _planes_arg(plan, planes):
    if planes is None:
        return range(plan.nplanes)
    if isinstance(planes, slice):
        return range(plan.nplanes)[planes]
    lo, hi = int(planes[0]), int(planes[1])
    if not 0 <= lo <= hi <= plan.nplanes:
        raise ValueError(f"planes {planes} outside [0, {plan.nplanes}]")
    return range(lo, hi)


def _coeffs(plan):
    return np.ascontiguousarray(plan.kernel.coeffs.astype(plan.image_dtype))


def grid_chunk(uvw, freq, vis, plan, weights=None, flags=None, planes=None, nthreads=1,
               out=None):
    """Grid one chunk of visibilities onto the w-stack (or a range of its planes).

    Returns a complex array ``(nsel, nu, nv)`` (``plan.grid_dtype``), ``nsel`` = number of
    selected planes (1 without w-stacking). Stacks from different chunks gridded with the
    same plan add up; :func:`grid_to_image` turns the sum into the dirty image.
    ``planes``: ``None`` (all), a ``slice`` or ``(start, stop)``. ``out``: an existing
    stack to accumulate into.
    """
    sel = _planes_arg(plan, planes)
    idx, vis_eff = _prepare_gridding(uvw, freq, vis, weights, flags, plan, nthreads)
    _check_extent(idx, plan)
    if out is None:
        out = np.zeros((len(sel), plan.nu, plan.nv), dtype=plan.grid_dtype)
    elif out.shape != (len(sel), plan.nu, plan.nv) or out.dtype != plan.grid_dtype:
        raise ValueError("out has the wrong shape or dtype")
    coeffs = _coeffs(plan)
    for k, pl in enumerate(sel):
        gridf = out[k].view(plan.image_dtype)
        _grid_plane(gridf, idx, vis_eff, plan, pl, coeffs, nthreads)
    return out


def _check_extent(idx, plan):
    fmax = float(idx.fovc.max()) if idx.fovc.size else 0.0
    if idx.uvw.shape[0]:
        um = float(np.abs(idx.uvw[:, 0]).max() * fmax)
        vm = float(np.abs(idx.uvw[:, 1]).max() * fmax)
        if um > plan.umax * (1 + 1e-9) or vm > plan.vmax * (1 + 1e-9):
            raise ValueError(
                f"uv extent of the data ({um:.6g}, {vm:.6g}) exceeds the plan's "
                f"({plan.umax:.6g}, {plan.vmax:.6g}) wavelengths"
            )


def _plan_ranges(plan):
    W = plan.W
    ulim = int(math.ceil(plan.umax * plan.pixsize_x * plan.nu)) + W + 2
    vlim = int(math.ceil(plan.vmax * plan.pixsize_y * plan.nv)) + W + 2
    nu, nv = plan.nu, plan.nv
    urange = (0, nu) if 2 * ulim >= nu else (nu // 2 - ulim, nu // 2 + ulim)
    vrange = (0, nv) if 2 * vlim >= nv else (nv // 2 - vlim, nv // 2 + vlim)
    return urange, vrange


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


def _zero_cols(grid, plan, vrange, nthreads):
    """Zero columns ``vrange`` of the grid rows outside the image's rows."""
    hx = plan.npix_x // 2
    gridf = grid.view(plan.image_dtype)
    none = np.zeros(2, dtype=np.int64)
    ca = np.array(vrange, dtype=np.int64)
    bd = [hx + b for b in _split(plan.nu - 2 * hx, max(1, nthreads))]
    _map(nthreads, lambda i: _zero_region(gridf, none, none, ca, none, bd[i], bd[i + 1]),
         list(range(len(bd) - 1)))


def grid_to_image(grids, plan, planes=None, nthreads=1, overwrite=False):
    """FFT + screens + corrections: a (summed) w-stack -> the dirty image.

    ``grids``: ``(nsel, nu, nv)`` from :func:`grid_chunk` (summed over chunks) for the
    planes ``planes`` (default all). Images of disjoint plane ranges add up. The stack
    is used as FFT workspace, so it is copied unless ``overwrite``.
    """
    sel = _planes_arg(plan, planes)
    grids = np.asarray(grids)
    if grids.ndim == 2:
        grids = grids[None]
    if grids.shape != (len(sel), plan.nu, plan.nv):
        raise ValueError(f"grids shape {grids.shape} != {(len(sel), plan.nu, plan.nv)}")
    inplace = overwrite and grids.dtype == plan.grid_dtype and grids.flags.c_contiguous
    work = None if inplace else np.empty((plan.nu, plan.nv), dtype=plan.grid_dtype)
    acc = _ImageAccumulator(plan, nthreads)
    for k, pl in enumerate(sel):
        if inplace:
            g = grids[k]
        else:  # one plane of workspace at a time, not a copy of the stack
            work[...] = grids[k]
            g = work
        ext = _nonzero_extent(g, plan, nthreads)
        if ext is not None:
            acc.add(g, pl, ext[0], ext[1])
    return acc.result()


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


def image_to_grid(dirty, plan, planes=None, nthreads=1):
    """Adjoint of :func:`grid_to_image`: image -> w-stack ``(nsel, nu, nv)``.

    Exact inside the uv region the plan was made for (``|u| <= plan.umax``,
    ``|v| <= plan.vmax`` plus the kernel support), which is all :func:`degrid_chunk`
    reads; outside it the partial FFTs leave intermediate values.
    """
    sel = _planes_arg(plan, planes)
    urange, vrange = _plan_ranges(plan)
    out = np.zeros((len(sel), plan.nu, plan.nv), dtype=plan.grid_dtype)
    filler = _ImageFiller(plan, dirty, nthreads)
    for k, pl in enumerate(sel):
        filler.fill(out[k], pl, urange, vrange)
    return out


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


def degrid_chunk(grids, uvw, freq, plan, weights=None, flags=None, planes=None, nthreads=1,
                 out=None):
    """Adjoint of :func:`grid_chunk`: w-stack -> visibilities ``(nrow, nchan)``.

    ``grids`` holds the planes ``planes`` (default all); the visibilities predicted from
    disjoint plane ranges add up to those of the whole stack.
    """
    sel = _planes_arg(plan, planes)
    grids = np.asarray(grids)
    if grids.ndim == 2:
        grids = grids[None]
    if grids.shape != (len(sel), plan.nu, plan.nv):
        raise ValueError(f"grids shape {grids.shape} != {(len(sel), plan.nu, plan.nv)}")
    grids = np.ascontiguousarray(grids, dtype=plan.grid_dtype)
    uvw = np.asarray(uvw, dtype=np.float64)
    freq = np.asarray(freq, dtype=np.float64)
    shape = (uvw.shape[0], freq.size)
    _check_inputs(uvw, freq, shape, plan)
    act = _active_mask(None, weights, flags, shape, False)
    idx = _build_index(uvw, freq, act, plan, nthreads)
    _check_extent(idx, plan)
    raw = np.zeros(shape, dtype=plan.grid_dtype)
    coeffs = _coeffs(plan)
    for k, pl in enumerate(sel):
        _degrid_plane(grids[k].view(plan.image_dtype), idx, raw, plan, pl, coeffs, nthreads)
    return _finish(raw, weights, act, idx, plan, out, nthreads)


def _finish(raw, weights, act, idx, plan, out, nthreads=1):
    if out is None:
        out = np.empty(raw.shape, dtype=plan.grid_dtype)
    use_w = weights is not None
    wgt = (np.ascontiguousarray(weights, dtype=plan.image_dtype) if use_w
           else np.ones((1, 1), plan.image_dtype))
    nshift = plan.nshift if plan.do_wstacking else 0.0
    uniform = _uniform(idx.fovc)
    bd = _split(raw.shape[0], max(1, nthreads))
    if idx.phasor is not None:
        _map(nthreads, lambda i: _finish_vis_ph(raw, wgt, use_w, act, idx.conj, idx.phasor,
                                                out, bd[i], bd[i + 1]),
             list(range(len(bd) - 1)))
        return out
    _map(nthreads, lambda i: _finish_vis(raw, wgt, use_w, act, idx.uvw, idx.conj, idx.fovc,
                                         nshift, uniform, out, bd[i], bd[i + 1]),
         list(range(len(bd) - 1)))
    return out


# ---------------------------------------------------------------------------------
# public: ducc0.wgridder-shaped API
# ---------------------------------------------------------------------------------


def make_index(uvw, freq, plan, weights=None, flags=None, nthreads=1):
    """The sort of visibilities into uv tiles and w-planes that every (de)gridding call
    builds first, built once to be passed as ``index=`` to :func:`vis2dirty` and
    :func:`dirty2vis` with the same ``uvw``, ``freq`` and ``plan``.

    Visibilities with a zero weight or a flag are left out (as in the calls). Worth it
    when the same data are (de)gridded many times, as in CLEAN's major cycles: on
    DSA-110 data building the index costs about as much as one gridding pass. The index
    also keeps the w-shift phasor of every visibility (one complex number each), so
    the calls that use it compute no trigonometric functions per visibility.
    """
    uvw = np.asarray(uvw, dtype=np.float64)
    freq = np.asarray(freq, dtype=np.float64)
    shape = (uvw.shape[0], freq.size)
    _check_inputs(uvw, freq, shape, plan)
    act = _active_mask(None, weights, flags, shape, False)
    idx = _build_index(uvw, freq, act, plan, nthreads)
    _check_extent(idx, plan)
    if plan.do_wstacking and plan.nshift != 0.0:
        # the w-shift phasor of every visibility, once (8 or 16 bytes per visibility)
        ph = np.empty(shape, dtype=plan.grid_dtype)
        bd = _split(shape[0], max(1, nthreads))
        _map(nthreads, lambda i: _phasors(idx.uvw, idx.fovc, plan.nshift, ph, bd[i],
                                          bd[i + 1]), list(range(len(bd) - 1)))
        idx.phasor = ph
    return idx


def _check_index(index, uvw, freq, plan):
    if plan is None:
        raise ValueError("index= needs the plan it was built with (plan=)")
    if index.active.shape != (np.shape(uvw)[0], np.size(freq)):
        raise ValueError(f"index built for {index.active.shape} visibilities, got "
                         f"{(np.shape(uvw)[0], np.size(freq))}")


def _check_plan(plan, double, npix_x, npix_y, pixsize_x, pixsize_y):
    if plan.double != double:
        raise ValueError("the plan's precision does not match the data's dtype")
    if (npix_x, npix_y) != (plan.npix_x, plan.npix_y) or not (
        math.isclose(pixsize_x, plan.pixsize_x, rel_tol=1e-12)
        and math.isclose(pixsize_y, plan.pixsize_y, rel_tol=1e-12)
    ):
        raise ValueError("the plan was made for another image geometry")


def _dtype_of(vis):
    if vis.dtype == np.complex64:
        return False
    if vis.dtype == np.complex128:
        return True
    raise TypeError(f"vis must be complex64 or complex128, got {vis.dtype}")


def vis2dirty(uvw, freq, vis, weights=None, flags=None, *, npix_x, npix_y, pixsize_x,
              pixsize_y, epsilon, do_wstacking=True, nthreads=1, flip_u=False, flip_v=False,
              flip_w=False, divide_by_n=True, sigma_min=1.1, sigma_max=2.6, plan=None,
              index=None):
    """Visibilities -> dirty image, ducc0.wgridder.vis2dirty conventions (see module doc).

    uvw (nrow, 3) metres; freq (nchan,) Hz; vis (nrow, nchan) complex64/128 (sets the
    precision); weights (nrow, nchan) real or None; flags (nrow, nchan) bool, True =
    flagged, or None. Returns (npix_x, npix_y) float32/float64. ``plan`` (from
    :func:`make_plan`/:func:`plan_for`) fixes kernel, grid and w-planes instead of
    choosing them from the data; it must describe the same image geometry. ``index``
    (:func:`make_index` with the same uvw, freq and plan) skips building the index;
    its mask replaces ``weights``/``flags`` as the choice of visibilities.
    """
    vis = np.asarray(vis)
    uvw = np.asarray(uvw, dtype=np.float64)
    freq = np.asarray(freq, dtype=np.float64)
    double = _dtype_of(vis)
    _check_inputs(uvw, freq, vis.shape, None)
    if index is not None:
        _check_index(index, uvw, freq, plan)
        act = index.active
    else:
        act = _active_mask(vis, weights, flags, vis.shape, True)
    if plan is None:
        plan = _plan_active(uvw, freq, act, npix_x, npix_y, pixsize_x, pixsize_y, epsilon,
                            do_wstacking=do_wstacking, double=double, sigma_min=sigma_min,
                            sigma_max=sigma_max, nthreads=nthreads, flip_u=flip_u,
                            flip_v=flip_v, flip_w=flip_w, divide_by_n=divide_by_n)
    else:
        _check_plan(plan, double, npix_x, npix_y, pixsize_x, pixsize_y)
    idx, vis_eff = _prepare_gridding(uvw, freq, vis, weights, flags, plan, nthreads, act,
                                     idx=index)
    if idx.nvis == 0:
        return np.zeros((plan.npix_x, plan.npix_y), dtype=plan.image_dtype)
    coeffs = _coeffs(plan)
    grid = np.zeros((plan.nu, plan.nv), dtype=plan.grid_dtype)
    gridf = grid.view(plan.image_dtype)
    acc = _ImageAccumulator(plan, nthreads)
    for pl in range(plan.nplanes):
        rng = idx.plane_ranges[pl if plan.do_wstacking else 0]
        if rng is None:  # no visibility touches this plane
            continue
        _grid_plane(gridf, idx, vis_eff, plan, pl, coeffs, nthreads)
        acc.add(grid, pl, rng[0], rng[1], zero_after=True)
    return acc.result()


def dirty2vis(uvw, freq, dirty, weights=None, flags=None, *, pixsize_x, pixsize_y, epsilon,
              do_wstacking=True, nthreads=1, flip_u=False, flip_v=False, flip_w=False,
              divide_by_n=True, sigma_min=1.1, sigma_max=2.6, plan=None, index=None):
    """Dirty image -> visibilities: the exact adjoint of :func:`vis2dirty` (``index``:
    as there).

    dirty (npix_x, npix_y) float32/float64 (sets the precision). Returns (nrow, nchan)
    complex64/complex128; flagged or zero-weight visibilities are 0.
    """
    dirty = np.asarray(dirty)
    if dirty.dtype not in (np.float32, np.float64):
        raise TypeError(f"dirty must be float32 or float64, got {dirty.dtype}")
    double = dirty.dtype == np.float64
    uvw = np.asarray(uvw, dtype=np.float64)
    freq = np.asarray(freq, dtype=np.float64)
    shape = (uvw.shape[0], freq.size)
    _check_inputs(uvw, freq, shape, None)
    if index is not None:
        _check_index(index, uvw, freq, plan)
        act = index.active
    else:
        act = _active_mask(None, weights, flags, shape, False)
    if plan is None:
        plan = _plan_active(uvw, freq, act, dirty.shape[0], dirty.shape[1], pixsize_x,
                            pixsize_y, epsilon, do_wstacking=do_wstacking, double=double,
                            sigma_min=sigma_min, sigma_max=sigma_max, nthreads=nthreads,
                            flip_u=flip_u, flip_v=flip_v, flip_w=flip_w,
                            divide_by_n=divide_by_n)
    else:
        _check_plan(plan, double, dirty.shape[0], dirty.shape[1], pixsize_x, pixsize_y)
    idx = index if index is not None else _build_index(uvw, freq, act, plan, nthreads)
    raw = np.zeros(shape, dtype=plan.grid_dtype)
    if idx.nvis:
        coeffs = _coeffs(plan)
        grid = np.zeros((plan.nu, plan.nv), dtype=plan.grid_dtype)
        gridf = grid.view(plan.image_dtype)
        filler = _ImageFiller(plan, dirty, nthreads)
        for pl in range(plan.nplanes):
            rng = idx.plane_ranges[pl if plan.do_wstacking else 0]
            if rng is None:
                continue
            filler.fill(grid, pl, rng[0], rng[1])
            _degrid_plane(gridf, idx, raw, plan, pl, coeffs, nthreads)
    return _finish(raw, weights, act, idx, plan, None, nthreads)
