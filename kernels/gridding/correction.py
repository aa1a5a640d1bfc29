"""The image correction: the (polynomial) kernel's Fourier transform in u, v and w as
Chebyshev series, applied per image quadrant.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from kernels.gridding.kernel import _psihat_fast
from kernels.gridding.threads import _map, _split


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
