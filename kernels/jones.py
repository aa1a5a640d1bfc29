"""Per-feed Jones terms on any correlations, and CASA's solution errors (numba/numpy).

:func:`apply_feed_jones` corrects visibilities of any correlation products (RR/LL,
RR/RL/LR/LL, XX/XY/YX/YY, ...) by diagonal per-feed gains: correlation ``c`` of a
row ``(p, q)`` is the product of feed ``fp[c]`` of antenna p and feed ``fq[c]`` of
antenna q, and is divided by ``g[p, fp[c]] conj(g[q, fq[c]]) b[p, fp[c]]
conj(b[q, fq[c]])``. With ``fp = fq = (0, 1, ...)`` it is
:func:`kernels.solvers.apply_jones`.

:func:`casa_errors` turns the per-polarisation errors of :mod:`kernels.solvers` into
CASA's (``VisCalSolver2::getErrors``): CASA solves the parallel hands of a cell
*together*, so its reduced chi^2 (the noise estimate) is pooled over them:
``k2 = sum_pol chi2 / (2 sum_pol (n_pol - n_par,pol))`` and
``err = 1 / sqrt(hess / k2 / 2)`` with ``hess`` our Fisher sum -- i.e. ours with
``sigma^2`` pooled over the polarisations instead of per polarisation. CASA's SNR is
``|g| / err``, a solution kept when ``SNR > minsnr``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["apply_feed_jones", "casa_errors"]


@njit(inline="always", nogil=True, cache=True)
def _inverse_bandpass(bf, bf_flag):
    """``1 / b`` of each antenna, channel and feed (once, so that a row needs
    multiplications only) and whether ``b`` is flagged or zero (``1 / b`` then 0)."""
    nant, nchan, nfeed = bf.shape
    ib = np.zeros((nant, nchan, nfeed), np.complex64)
    ibad = np.empty((nant, nchan, nfeed), np.bool_)
    for a in range(nant):
        for f in range(nchan):
            for c in range(nfeed):
                b = bf[a, f, c]
                ibad[a, f, c] = bf_flag[a, f, c] or b == 0
                if not ibad[a, f, c]:
                    ib[a, f, c] = 1.0 / b
    return ib, ibad


@njit(inline="always", nogil=True, cache=True)
def _correct_rows(vis, flag, a1, a2, tidx, fp, fq, gt, gt_flag, ib, ibad, out, out_flag):
    """The row loop of :func:`apply_feed_jones` and :func:`kernels.solvers.apply_jones`
    given the inverse bandpass of :func:`_inverse_bandpass`."""
    nrow, nchan, ncorr = vis.shape
    ig = np.zeros(ncorr, np.complex64)
    gbad = np.empty(ncorr, np.bool_)
    for r in range(nrow):
        p = a1[r]
        q = a2[r]
        t = tidx[r]
        for c in range(ncorr):
            x = fp[c]
            y = fq[c]
            gg = gt[t, p, x] * np.conj(gt[t, q, y])
            gbad[c] = gt_flag[t, p, x] or gt_flag[t, q, y] or gg == 0
            ig[c] = 0.0 if gbad[c] else 1.0 / gg
        for f in range(nchan):
            for c in range(ncorr):
                x = fp[c]
                y = fq[c]
                if gbad[c] or ibad[p, f, x] or ibad[q, f, y]:
                    out[r, f, c] = 0.0
                    out_flag[r, f, c] = True
                else:
                    out[r, f, c] = vis[r, f, c] * (ig[c] * ib[p, f, x] * np.conj(ib[q, f, y]))
                    out_flag[r, f, c] = flag[r, f, c]


@njit(nogil=True, cache=True)
def apply_feed_jones(vis, flag, a1, a2, tidx, fp, fq, gt, gt_flag, bf, bf_flag, out,
                     out_flag):
    """Corrected visibilities, row by row (see the module docstring).

    vis, out       : (nrow, nchan, ncorr) complex64
    flag, out_flag : (nrow, nchan, ncorr) bool; flagged on output when flagged on input
                     or when a solution it needs is flagged or zero (value then 0)
    a1, a2, tidx   : (nrow,) antenna indices and integration index into ``gt``
    fp, fq         : (ncorr,) feed index of antenna 1 and antenna 2 of each correlation
    gt, gt_flag    : (ntime, nant, nfeed) gains at each integration
    bf, bf_flag    : (nant, nchan, nfeed) bandpass per channel
    """
    ib, ibad = _inverse_bandpass(bf, bf_flag)
    _correct_rows(vis, flag, a1, a2, tidx, fp, fq, gt, gt_flag, ib, ibad, out, out_flag)
    return out, out_flag


def casa_errors(err, chi2, nsamp):
    """CASA's errors from per-polarisation ones (numpy; see the module docstring).

    err   : (..., nant, npol) standard deviation of each gain, ``sqrt(s2_pol / F)``
            with ``s2_pol = chi2_pol / (n_pol - nact_pol)`` (inf: no data)
    chi2  : (..., npol) weighted chi^2 of each cell and polarisation
    nsamp : (..., npol) complex samples of each cell and polarisation

    Returns errors of ``err``'s shape with ``s2`` pooled over the polarisations of a
    cell: ``sqrt(s2_pool / F)``. Cells where a polarisation has no noise estimate
    (no degrees of freedom, or a noise-free fit) keep their error.
    """
    err = np.asarray(err, np.float64)
    chi2 = np.asarray(chi2, np.float64)
    n = np.asarray(nsamp, np.float64)
    nact = np.sum(np.isfinite(err) & (err > 0), axis=-2)        # (..., npol)
    dof = n - nact
    ok = (dof > 0) & (chi2 > 0)
    pooled = (np.sum(np.where(ok, chi2, 0.0), axis=-1, keepdims=True)
              / np.maximum(np.sum(np.where(ok, dof, 0.0), axis=-1, keepdims=True), 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(ok, np.sqrt(pooled / np.where(ok, chi2 / np.where(ok, dof, 1.0),
                                                        1.0)), 1.0)
    return err * np.expand_dims(scale, -2)
