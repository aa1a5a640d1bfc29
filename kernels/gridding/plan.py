"""The gridding plan: cost model, image/grid geometry, w-planes and kernel choice
(:class:`GridPlan`, :func:`make_plan`, :func:`plan_for`), and the data extents it needs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from kernels.constants import SPEED_OF_LIGHT
from kernels.gridding._es_table import ES_KERNELS
from kernels.gridding.kernel import _kernel_data, kernel_candidates
from kernels.gridding.threads import _map, _split

log = logging.getLogger(__name__)


# Cost model that picks (W, sigma), measured on an AMD EPYC (AVX2) core with this module:
# seconds per visit of one visibility to one w-plane (a fixed part plus one per tap,
# single / double precision), per element*log2(length) of the partial FFTs, and per
# image pixel and plane for the screen and accumulation.
_COST_VISIT = 20e-9


_COST_TAP = {False: 0.35e-9, True: 0.5e-9}


_COST_FFT = 0.26e-9


_COST_PIXEL = 2.5e-9


def _good_size(n):
    """Smallest even n' >= n whose half is 2^a 3^b 5^c 7^d 11^e (fast for pocketfft/ducc)."""
    import scipy.fft

    return 2 * scipy.fft.next_fast_len(int(math.ceil(n / 2)), real=False)


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


def make_plan(npix_x, npix_y, pixsize_x, pixsize_y, epsilon, *, wmin=0.0, wmax=0.0,
              umax=None, vmax=None, nvis=None, do_wstacking=True, double=True,
              sigma_min=1.1, sigma_max=2.6, nthreads=1, flip_u=False, flip_v=False,
              flip_w=False, divide_by_n=True, W=None, sigma=None):
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
        npix_x=npix_x, npix_y=npix_y, pixsize_x=float(pixsize_x), pixsize_y=float(pixsize_y),
        epsilon=float(epsilon), do_wstacking=bool(do_wstacking), double=bool(double),
        nu=int(nu), nv=int(nv), W=int(Wc), sigma=float(sig), beta=float(beta), e0=float(e0),
        eps1d=float(eps1d), tile=tile, wmin=wmin, wmax=wmax, nplanes=int(nplanes),
        wplane0=float(wplane0), dw=float(dw), nshift=float(nshift),
        umax=float(umax) if umax is not None else 0.5 / pixsize_x,
        vmax=float(vmax) if vmax is not None else 0.5 / pixsize_y,
        flip_u=bool(flip_u), flip_v=bool(flip_v), flip_w=bool(flip_w),
        divide_by_n=bool(divide_by_n))
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
