"""Diagonal (per antenna, per polarisation) complex gain solvers, numba.

Model: ``V_pq = g_p conj(g_q) M_pq`` per polarisation (XX, YY), with ``g`` constant
inside a *solution cell* (a range of integrations x a range of channels).

Two steps, so that the expensive part touches each visibility once:

1. :func:`accumulate` reduces the data of every cell to three sums per baseline,
   ``A_pq = sum w conj(P_pq M_pq) V_pq``, ``B_pq = sum w |P_pq M_pq|^2`` and
   ``C_pq = sum w |V_pq|^2`` (plus the sample count), where ``P_pq = p_p conj(p_q)``
   is a *prior* correction already known (a bandpass when solving gains, a
   time-variable phase when solving the bandpass). Partial sums of different data
   chunks simply add.
2. :func:`stefcal` solves one cell from its sums by StEFCal (Salvini & Wijnholds
   2014: alternating least squares with every other iterate averaged). With the gains
   constant inside a cell the least-squares update of antenna p only needs
   ``A`` and ``B``: ``g_p = sum_q g_q A_pq / sum_q |g_q|^2 B_pq``. The weighted
   chi^2 follows exactly from the sums too:
   ``chi2 = sum_pq C - 2 Re(conj(g_p conj(g_q)) A) + |g_p g_q|^2 B``.

Noise and SNR: with ``w`` proportional to inverse variance, ``sigma^2 = chi2 / (N -
n_ant)`` (complex samples minus complex unknowns); the variance of ``g_p`` (both
components together) is ``sigma^2 / sum_q |g_q|^2 B_pq`` and its SNR is
``|g_p| / sqrt(var)``. Autocorrelations never enter.

:func:`apply_jones` divides visibilities by ``g_p conj(g_q) b_p conj(b_q)``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels.jones import _correct_rows, _inverse_bandpass

# fastmath without "nnan"/"ninf": the accumulators test for NaN/inf, which those would
# let the compiler assume away
_FAST_FINITE = {"nsz", "arcp", "contract", "afn", "reassoc"}


@njit(nogil=True, cache=True, inline="always")
def _solvable(p, q):
    """A cross-correlation between two antennas that are solved for."""
    return p != q and p >= 0 and q >= 0


@njit(nogil=True, cache=True, inline="always")
def _usable(flag, weight, t, b, f, c):
    """(sample (t, b, f, c) is used, its weight): not flagged and a positive weight."""
    w = weight[t, b, f, c]
    return (not flag[t, b, f, c]) and w > 0.0, w


@njit(nogil=True, cache=True, inline="always")
def _finite(v):
    """Both parts of a visibility finite (NaN/inf ones are masked like flags)."""
    return np.isfinite(v.real) and np.isfinite(v.imag)


@njit(nogil=True, cache=True, inline="always")
def _terms(w, m, v):
    """The sums' terms of one sample: w conj(m) v, w |m|^2, w |v|^2."""
    return (w * (np.conj(m) * v), w * (m.real * m.real + m.imag * m.imag),
            w * (v.real * v.real + v.imag * v.imag))


@njit(nogil=True, cache=True, inline="always")
def _sample(w, m, v):
    """(the sample counts, its terms): a zero model or a NaN/inf visibility is masked
    like a flag; the terms as :func:`_terms`."""
    ta, tb, tc = _terms(w, m, v)
    return m != 0 and _finite(v), ta, tb, tc


@njit(nogil=True, cache=True)
def accumulate(vis, model, flag, weight, a1, a2, tbin, fbin, prior_t, prior_f,
               A, B, C, N):
    """Add the cell sums of one data chunk into ``A, B, C, N`` (in place).

    vis, model : (ntime, nbl, nchan, npol) complex64
    flag       : (ntime, nbl, nchan, npol) bool (True = bad)
    weight     : (ntime, nbl, nchan, npol) float32 (<= 0 = unused)
    a1, a2     : (nbl,) int64 compact antenna indices (0..nant-1; -1 = not solved for)
    tbin       : (ntime,) int64 solution-cell index of each integration
    fbin       : (nchan,) int64 solution-cell index of each channel
    prior_t    : (ntime, nant, npol) complex128 prior per integration
    prior_f    : (nant, nchan, npol) complex128 prior per channel
    A          : (ncell_t, ncell_f, npol, nbl) complex128
    B, C       : (ncell_t, ncell_f, npol, nbl) float64
    N          : (ncell_t, ncell_f, npol, nbl) int64
    """
    ntime, nbl, nchan, npol = vis.shape
    for t in range(ntime):
        ct = tbin[t]
        for c in range(npol):  # baselines innermost but for channels, as in A, B, C, N
            for b in range(nbl):
                p = a1[b]
                q = a2[b]
                if not _solvable(p, q):
                    continue
                pt = prior_t[t, p, c] * np.conj(prior_t[t, q, c])
                for f in range(nchan):
                    ok, w = _usable(flag, weight, t, b, f, c)
                    if not ok:
                        continue
                    cf = fbin[f]
                    m = (pt * prior_f[p, f, c] * np.conj(prior_f[q, f, c])
                         * model[t, b, f, c])
                    use, ta, tb, tc = _sample(w, m, vis[t, b, f, c])
                    if not use:
                        continue
                    A[ct, cf, c, b] += ta
                    B[ct, cf, c, b] += tb
                    C[ct, cf, c, b] += tc
                    N[ct, cf, c, b] += 1
    return A, B, C, N


@njit(nogil=True, cache=True, fastmath=_FAST_FINITE)
def accumulate_bandpass(vis, model, flag, weight, a1, a2, prior_t, A, B, C, N):
    """:func:`accumulate` specialised for a bandpass: one cell per channel, all
    integrations of the chunk together, a prior per integration only.

    A, B, C, N : (npol, nbl, nchan) -- channel innermost, so that reads and writes run
    along memory (transpose to :func:`accumulate`'s cell layout afterwards).
    """
    ntime, nbl, nchan, npol = vis.shape
    for t in range(ntime):
        for b in range(nbl):
            p = a1[b]
            q = a2[b]
            if not _solvable(p, q):
                continue
            for c in range(npol):
                pt = prior_t[t, p, c] * np.conj(prior_t[t, q, c])
                if pt == 0:
                    continue
                for f in range(nchan):
                    ok, w = _usable(flag, weight, t, b, f, c)
                    if not ok:
                        continue
                    m = pt * model[t, b, f, c]
                    use, ta, tb, tc = _sample(w, m, vis[t, b, f, c])
                    if not use:
                        continue
                    A[c, b, f] += ta
                    B[c, b, f] += tb
                    C[c, b, f] += tc
                    N[c, b, f] += 1
    return A, B, C, N


@njit(nogil=True, cache=True, inline="always")
def _channel_sums(vis, model, flag, weight, prior_f, p, q, t, b, c):
    """Sums over the channels of one (integration, baseline, polarisation), with the
    bandpass ``prior_f`` applied to the model: (A, B, C, N) terms as :func:`accumulate`."""
    sa = 0.0 + 0.0j
    sb = 0.0
    sc = 0.0
    n = 0
    for f in range(vis.shape[2]):
        ok, w = _usable(flag, weight, t, b, f, c)
        if not ok:
            continue
        m = prior_f[p, f, c] * np.conj(prior_f[q, f, c]) * model[t, b, f, c]
        use, ta, tb, tc = _sample(w, m, vis[t, b, f, c])
        if not use:
            continue
        sa += ta
        sb += tb
        sc += tc
        n += 1
    return sa, sb, sc, n


@njit(nogil=True, cache=True, fastmath=_FAST_FINITE)
def accumulate_gains(vis, model, flag, weight, a1, a2, tbin, prior_f, A, B, C, N):
    """:func:`accumulate` specialised for gains: one cell per time interval ``tbin``,
    all channels of the chunk together, a prior per channel (the bandpass) only.

    A, B, C, N : (ncell_t, npol, nbl)
    """
    ntime, nbl, nchan, npol = vis.shape
    for t in range(ntime):
        ct = tbin[t]
        for b in range(nbl):
            if _solvable(a1[b], a2[b]):
                for c in range(npol):
                    sa, sb, sc, n = _channel_sums(vis, model, flag, weight, prior_f, a1[b],
                                                  a2[b], t, b, c)
                    A[ct, c, b] += sa
                    B[ct, c, b] += sb
                    C[ct, c, b] += sc
                    N[ct, c, b] += n
    return A, B, C, N


@njit(nogil=True, cache=True)
def stefcal(A, B, a1, a2, nant, g0, max_iter, tol, phase_only):
    """Solve one cell: returns ``(g, n_iter, converged)``.

    A, B   : (nbl,) cell sums (see :func:`accumulate`)
    a1, a2 : (nbl,) compact antenna indices
    g0     : (nant,) complex128 starting point (ones is fine)
    Antennas without data get ``g = 0``. ``phase_only`` keeps ``|g| = 1``.
    """
    nbl = A.shape[0]
    g = g0.copy()
    num = np.zeros(nant, np.complex128)
    den = np.zeros(nant, np.float64)
    gnew = np.zeros(nant, np.complex128)
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        num[:] = 0.0
        den[:] = 0.0
        for b in range(nbl):
            p = a1[b]
            q = a2[b]
            if p == q or p < 0 or q < 0 or B[b] <= 0.0:
                continue
            gp = g[p]
            gq = g[q]
            num[p] += gq * A[b]
            den[p] += (gq.real * gq.real + gq.imag * gq.imag) * B[b]
            num[q] += gp * np.conj(A[b])
            den[q] += (gp.real * gp.real + gp.imag * gp.imag) * B[b]
        for a in range(nant):
            if den[a] > 0.0:
                x = num[a] / den[a]
                if phase_only:
                    ax = abs(x)
                    x = x / ax if ax > 0.0 else 1.0 + 0.0j
                gnew[a] = x
            else:
                gnew[a] = 0.0
        if it % 2 == 0:  # StEFCal: average every other iterate
            for a in range(nant):
                x = 0.5 * (gnew[a] + g[a])
                if phase_only:
                    ax = abs(x)
                    x = x / ax if ax > 0.0 else 1.0 + 0.0j
                gnew[a] = x
        dnum = 0.0
        dden = 0.0
        for a in range(nant):
            d = gnew[a] - g[a]
            dnum += d.real * d.real + d.imag * d.imag
            dden += gnew[a].real * gnew[a].real + gnew[a].imag * gnew[a].imag
            g[a] = gnew[a]
        if dden == 0.0:
            break
        if dnum <= tol * tol * dden:
            converged = True
            break
    return g, it, converged


@njit(nogil=True, cache=True)
def cell_statistics(A, B, C, N, a1, a2, g):
    """chi^2, number of complex samples and per-antenna Fisher sums of one cell.

    Returns ``(chi2, n, fisher)`` with ``fisher[p] = sum_q |g_q|^2 B_pq``.
    """
    nbl = A.shape[0]
    nant = g.shape[0]
    chi2 = 0.0
    n = 0
    fisher = np.zeros(nant, np.float64)
    for b in range(nbl):
        p = a1[b]
        q = a2[b]
        if p == q or p < 0 or q < 0 or N[b] == 0:
            continue
        gg = g[p] * np.conj(g[q])
        agg = gg.real * gg.real + gg.imag * gg.imag
        chi2 += C[b] - 2.0 * (np.conj(gg) * A[b]).real + agg * B[b]
        n += N[b]
        aq = g[q].real * g[q].real + g[q].imag * g[q].imag
        ap = g[p].real * g[p].real + g[p].imag * g[p].imag
        fisher[p] += aq * B[b]
        fisher[q] += ap * B[b]
    return max(chi2, 0.0), n, fisher


@njit(nogil=True, cache=True)
def solve_cells(A, B, C, N, a1, a2, nant, max_iter, tol, phase_only, g_out, err_out,
                niter_out, conv_out, chi2_out, nsamp_out):
    """Solve every cell of ``A[ct, cf, pol, nbl]`` (see :func:`accumulate`).

    Outputs (filled in place): ``g_out`` (ct, cf, pol, nant) complex128 gains,
    ``err_out`` (same, float64) standard deviation of each gain (both components
    together), ``niter_out``/``conv_out``/``chi2_out``/``nsamp_out`` (ct, cf, pol).
    Gains are *not* referenced to an antenna here.
    """
    nct, ncf, npol = A.shape[0], A.shape[1], A.shape[2]
    g0 = np.ones(nant, np.complex128)
    for i in range(nct):
        for j in range(ncf):
            for c in range(npol):
                g, it, conv = stefcal(A[i, j, c], B[i, j, c], a1, a2, nant, g0, max_iter,
                                      tol, phase_only)
                chi2, n, fisher = cell_statistics(A[i, j, c], B[i, j, c], C[i, j, c],
                                                  N[i, j, c], a1, a2, g)
                nact = 0
                for a in range(nant):
                    if fisher[a] > 0.0:
                        nact += 1
                dof = n - nact
                s2 = chi2 / dof if dof > 0 else np.inf
                for a in range(nant):
                    g_out[i, j, c, a] = g[a]
                    err_out[i, j, c, a] = np.sqrt(s2 / fisher[a]) if fisher[a] > 0.0 else np.inf
                niter_out[i, j, c] = it
                conv_out[i, j, c] = conv
                chi2_out[i, j, c] = chi2
                nsamp_out[i, j, c] = n
    return g_out


@njit(nogil=True, cache=True)
def apply_jones(vis, flag, a1, a2, tidx, gt, gt_flag, bf, bf_flag, out, out_flag):
    """Corrected visibilities ``V / (g_p conj(g_q) b_p conj(b_q))``, row by row.

    vis, out       : (nrow, nchan, npol) complex64
    flag, out_flag : (nrow, nchan, npol) bool; a sample is flagged on output when it
                     was flagged or any solution it needs is flagged or zero (its
                     corrected value is then 0)
    a1, a2         : (nrow,) antenna indices into the solution arrays
    tidx           : (nrow,) index into ``gt`` of each row's integration
    gt, gt_flag    : (ntime, nant, npol) gains at each integration
    bf, bf_flag    : (nant, nchan, npol) bandpass per channel
    """
    # inverse bandpass once per antenna: a row then needs multiplications only
    ib, ibad = _inverse_bandpass(bf, bf_flag)
    hands = np.arange(vis.shape[2])             # correlation c: feed c of both antennas
    _correct_rows(vis, flag, a1, a2, tidx, hands, hands, gt, gt_flag, ib, ibad, out, out_flag)
    return out, out_flag
