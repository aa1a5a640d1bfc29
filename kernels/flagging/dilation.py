"""Growing the flags: scale-invariant rank (SIR) dilation in 1-D and 2-D, and flagging
whole channels / integrations above a flagged fraction.
"""

from __future__ import annotations

import numpy as np
from numba import njit


_SIR_EPS = 1e-9


@njit(nogil=True, cache=True)
def _sir_seq(flags, missing, eta, out, idx, w):
    """SIR on one sequence, missing samples left out; sets ``out`` where dilated.

    A sample y is flagged when some interval [Y1, Y2) of the (missing-free) sequence
    containing y has a flagged fraction >= 1 - eta. With v_i = eta (flagged) or
    eta - 1 (not) and prefix sums W, that is
    ``max_{Y2 > y} W(Y2) - min_{Y1 <= y} W(Y1) >= 0`` (Offringa et al. 2012): one
    prefix-minimum and one suffix-maximum pass, O(n).
    """
    n = 0
    for i in range(flags.shape[0]):
        if not missing[i]:
            idx[n] = i
            n += 1
    if n == 0:
        return
    w[0] = 0.0
    for j in range(n):
        w[j + 1] = w[j] + (eta if flags[idx[j]] else eta - 1.0)
    # suffix maximum in place of a second array: walk backwards keeping the max of
    # W[j+1..n], and a forward prefix minimum stored in a first pass.
    # First pass: prefix minima into w's spare half is not available, so compute
    # suffix maxima into an extra region of w (size 2n+2 allocated by the caller).
    smax_off = n + 1
    run = w[n]
    w[smax_off + n] = run
    for j in range(n - 1, -1, -1):
        if w[j] > run:
            run = w[j]
        w[smax_off + j] = run
    pmin = w[0]
    for j in range(n):
        if w[j] < pmin:
            pmin = w[j]
        if w[smax_off + j + 1] - pmin >= -_SIR_EPS:
            out[idx[j]] = True


@njit(nogil=True, cache=True)
def sir_dilate_1d(flags, eta, missing):
    """Scale-invariant rank dilation of a 1-D flag sequence; returns the new flags.

    ``missing`` samples (e.g. the input FLAG) are removed from the sequence before the
    operator runs and keep their input value. ``eta`` in [0, 1): 0 changes nothing,
    0.2 is AOFlagger's default.
    """
    n = flags.shape[0]
    out = flags.copy()
    if eta <= 0.0:
        return out
    idx = np.empty(n, dtype=np.int64)
    w = np.empty(2 * n + 2, dtype=np.float64)
    _sir_seq(flags, missing, eta, out, idx, w)
    return out


@njit(nogil=True, cache=True)
def _sir_time_lanes(mask, missing, eta, wsum, smax, pmin, colmiss, idx, w):
    """SIR along time (axis 0) of every channel of ``mask`` (T, F), in place.

    Channels without a missing sample run together, vectorised across channels, with
    the arithmetic of :func:`_sir_seq` (prefix sums ``wsum`` (T + 1, F), suffix maxima
    ``smax`` (T + 1, F), running prefix minima ``pmin`` (F)): identical results. The
    decisions read only those sums, so they are written straight into ``mask``.
    Channels holding missing samples (``colmiss``) then run :func:`_sir_seq` on their
    own (missing samples left out of the sequence).
    """
    T, F = mask.shape
    for f in range(F):
        colmiss[f] = False
    nmiss = 0
    for t in range(T):
        for f in range(F):
            colmiss[f] |= missing[t, f]
    for f in range(F):
        nmiss += colmiss[f]
    em1 = eta - 1.0
    for f in range(F):
        wsum[0, f] = 0.0
    for t in range(T):
        for f in range(F):
            wsum[t + 1, f] = wsum[t, f] + (eta if mask[t, f] else em1)
    for f in range(F):
        smax[T, f] = wsum[T, f]
    for j in range(T - 1, -1, -1):
        for f in range(F):
            a = wsum[j, f]
            b = smax[j + 1, f]
            smax[j, f] = a if a > b else b
    for f in range(F):
        pmin[f] = wsum[0, f]
    for j in range(T):
        for f in range(F):
            a = wsum[j, f]
            p = pmin[f]
            p = a if a < p else p
            pmin[f] = p
            if smax[j + 1, f] - p >= -_SIR_EPS and not colmiss[f]:
                mask[j, f] = True
    if nmiss > 0:
        for f in range(F):
            if colmiss[f]:
                _sir_seq(mask[:, f], missing[:, f], eta, mask[:, f], idx, w)


@njit(nogil=True, cache=True)
def _sir_2d_inplace(mask, missing, eta_time, eta_freq, idx, w, scratch, wsum, smax, pmin,
                    colmiss):
    """SIR along time (:func:`_sir_time_lanes`), then along frequency, in place.
    ``wsum``/``smax``: (T + 1, F) float64; ``pmin``: (F,) float64; ``colmiss``: (F,)
    bool."""
    T, F = mask.shape
    if eta_time > 0.0:
        _sir_time_lanes(mask, missing, eta_time, wsum, smax, pmin, colmiss, idx, w)
    if eta_freq > 0.0:
        scratch[:, :] = mask
        for t in range(T):
            _sir_seq(mask[t, :], missing[t, :], eta_freq, scratch[t, :], idx, w)
        mask[:, :] = scratch


@njit(nogil=True, cache=True)
def sir_dilate_2d(flags, eta_time, eta_freq, missing):
    """SIR dilation of a (time, frequency) mask: along time first, then along frequency
    on the time-dilated mask (sequential, as AOFlagger's operator). Returns a new mask."""
    T, F = flags.shape
    out = flags.copy()
    n = max(T, F)
    idx = np.empty(n, dtype=np.int64)
    w = np.empty(2 * n + 2, dtype=np.float64)
    scratch = np.empty((T, F), dtype=np.bool_)
    _sir_2d_inplace(out, missing, eta_time, eta_freq, idx, w, scratch,
                    np.empty((T + 1, F)), np.empty((T + 1, F)), np.empty(F),
                    np.empty(F, np.bool_))
    return out


@njit(nogil=True, cache=True)
def _over_fraction(mask, missing, frac, out):
    """out[i] = more than ``frac`` of row i's samples that are not missing are flagged."""
    for i in range(mask.shape[0]):
        c = 0
        n = 0
        for j in range(mask.shape[1]):
            if not missing[i, j]:
                n += 1
                if mask[i, j]:
                    c += 1
        out[i] = n > 0 and c > frac * n


@njit(nogil=True, cache=True)
def _extend_inplace(mask, missing, chan_frac, time_frac, col, row):
    T, F = mask.shape
    for f in range(F):
        col[f] = False
    for t in range(T):
        row[t] = False
    if chan_frac < 1.0:
        _over_fraction(mask.T, missing.T, chan_frac, col)
    if time_frac < 1.0:
        _over_fraction(mask, missing, time_frac, row)
    for t in range(T):
        for f in range(F):
            if col[f] or row[t]:
                mask[t, f] = True


@njit(nogil=True, cache=True)
def extend_by_fraction(mask, chan_frac, time_frac, missing):
    """Flag whole channels (columns) whose flagged fraction is > ``chan_frac`` and whole
    integrations (rows) whose fraction is > ``time_frac``. Fractions count flagged
    samples among the samples that are not ``missing`` (data flagged or absent before
    flagging), both taken from the input mask. A threshold >= 1 disables that axis.
    Returns a new mask."""
    out = mask.copy()
    T, F = mask.shape
    _extend_inplace(out, missing, chan_frac, time_frac, np.empty(F, np.bool_),
                    np.empty(T, np.bool_))
    return out
