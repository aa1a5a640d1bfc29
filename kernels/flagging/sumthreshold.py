"""SumThreshold (Offringa et al. 2010): 1-D and 2-D (time and frequency) passes over
running window sums, with thresholds falling as ``threshold1 / rho^log2(window)``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _sumthreshold_seq(x, mask_in, mask_out, window, thr_of_count, two_sided):
    """One SumThreshold pass of length ``window`` over a 1-D (possibly strided) sequence.

    Samples flagged in ``mask_in`` are left out of the window mean; when the mean of the
    ``c`` unflagged samples of a window exceeds ``thr_of_count[c]`` (or is below minus
    that if ``two_sided``), every sample of the window is flagged in ``mask_out``.
    AOFlagger uses one threshold per window (``thr_of_count[:] = chi_M``). Running sums
    in float64; O(n) including the flag writes.
    """
    n = x.shape[0]
    if window < 1 or window > n:
        return
    xv = np.empty(n)
    cv = np.empty(n, np.int64)
    for i in range(n):
        ok = not mask_in[i]
        xv[i] = x[i] if ok else 0.0
        cv[i] = 1 if ok else 0
    _st_row(xv, cv, mask_out, window, thr_of_count, two_sided)


@njit(nogil=True, cache=True)
def _st_row(xv, cv, mask_out, window, thr_of_count, two_sided):
    """Core of a SumThreshold pass on contiguous 1-D data: ``xv`` values with flagged
    samples zeroed, ``cv`` 1 for unflagged samples, 0 for flagged."""
    n = xv.shape[0]
    s = 0.0
    c = 0
    for i in range(window - 1):
        s += xv[i]
        c += cv[i]
    done = 0  # mask_out[:done] of the current run is already written
    for left in range(n - window + 1):
        right = left + window - 1
        s += xv[right]
        c += cv[right]
        thr = thr_of_count[c] * c   # c == 0: s == 0, never a hit
        hit = s > thr
        if two_sided:
            hit = hit or s < -thr
        if hit:
            start = left if left > done else done
            for k in range(start, right + 1):
                mask_out[k] = True
            done = right + 1
        s -= xv[left]
        c -= cv[left]


@njit(nogil=True, cache=True)
def _thr_table(window, threshold1, rho, by_count, out):
    """Fill ``out[c]`` (c = 0..window) with the threshold for c unflagged samples."""
    log_rho = math.log(rho)
    thr_m = threshold1 * math.exp(-log_rho * math.log2(window))
    out[0] = thr_m
    for c in range(1, window + 1):
        out[c] = threshold1 * math.exp(-log_rho * math.log2(c)) if by_count else thr_m


@njit(nogil=True, cache=True)
def sumthreshold_1d(x, mask, window, threshold1, rho=1.5, two_sided=False,
                    scale_by_count=False):
    """SumThreshold of one window length on a 1-D sequence; returns the new mask.

    The window's threshold on the mean is ``threshold1 / rho**log2(window)``; with
    ``scale_by_count`` it is ``threshold1 / rho**log2(c)`` for a window holding ``c``
    unflagged samples instead (see :func:`sumthreshold_2d`). Non-finite samples are
    treated as flagged.
    """
    m = mask.copy()
    for i in range(x.shape[0]):
        if not np.isfinite(x[i]):
            m[i] = True
    out = m.copy()
    tab = np.empty(max(window, 1) + 1)
    _thr_table(max(window, 1), threshold1, rho, scale_by_count, tab)
    _sumthreshold_seq(x, m, out, window, tab, two_sided)
    return out


@njit(nogil=True, cache=True)
def _in(arr, v):
    for i in range(arr.shape[0]):
        if arr[i] == v:
            return True
    return False


@njit(nogil=True, cache=True)
def _max_window(time_windows, freq_windows):
    maxw = 1
    for w in time_windows:
        maxw = max(maxw, w)
    for w in freq_windows:
        maxw = max(maxw, w)
    return maxw


@njit(nogil=True, cache=True)
def _st_pass(xv, rows, nrow, lim, window, two_sided, s, nf, lv, hit, done, mask,
             transposed, new_idx, n_new):
    """One SumThreshold pass of length ``window`` along axis 0 of ``xv`` (L, W), for
    all W lanes at once; per lane, exactly the arithmetic of :func:`_st_row` (same
    sums in the same order), so the flags are identical.

    ``xv``: values with flagged samples zeroed; ``rows[i, :nrow[i]]``: the flagged lanes
    of row i; ``lim[c]``: the hit level of a window *sum* holding ``c`` unflagged samples
    (``chi_c * c``; ``lim[0] = inf``: a window without an unflagged sample never hits,
    and flagging it would change nothing). The count of unflagged samples of each
    lane's window and its level ``lv`` change only where a flagged sample enters or
    leaves the window, so they are updated from the (few) flagged lanes of those two
    rows, and the dense loop over lanes is a branch-free add / compare / subtract that
    vectorises. Hits are written straight into ``mask`` (T, F) (``mask[lane, k]`` if
    ``transposed`` else ``mask[k, lane]``): the pass reads only ``xv``/``rows``, i.e.
    the mask before the pass; ``done[lane]`` marks how far a lane is written already.
    Newly flagged samples are appended to ``new_idx`` (as ``t * F + f``); returns the
    new count.
    """
    L, W = xv.shape
    T, F = mask.shape
    n_lanes = T if transposed else F
    if window < 1 or window > L:
        return n_new
    for w in range(W):
        s[w] = 0.0
        nf[w] = 0
    for i in range(window - 1):
        xi = xv[i]
        for w in range(W):
            s[w] += xi[w]
        for j in range(nrow[i]):
            nf[rows[i, j]] += 1
    for w in range(W):
        done[w] = 0
    for left in range(L - window + 1):
        right = left + window - 1
        for j in range(nrow[right]):
            w = rows[right, j]
            nf[w] += 1
            lv[w] = lim[window - nf[w]]
        if left == 0:
            for w in range(W):
                lv[w] = lim[window - nf[w]]
        xr = xv[right]
        xl = xv[left]
        nh = 0
        if two_sided:
            for w in range(W):
                sw = s[w] + xr[w]
                th = lv[w]
                h = (sw > th) | (sw < -th)
                hit[w] = h
                nh += h
                s[w] = sw - xl[w]
        else:
            for w in range(W):
                sw = s[w] + xr[w]
                h = sw > lv[w]
                hit[w] = h
                nh += h
                s[w] = sw - xl[w]
        if nh > 0:
            for w in range(n_lanes):
                if hit[w]:
                    d = done[w]
                    for k in range(left if left > d else d, right + 1):
                        if transposed:
                            t = w
                            f = k
                        else:
                            t = k
                            f = w
                        if not mask[t, f]:
                            mask[t, f] = True
                            new_idx[n_new] = t * F + f
                            n_new += 1
                    done[w] = right + 1
        for j in range(nrow[left]):
            w = rows[left, j]
            nf[w] -= 1
            lv[w] = lim[window - nf[w]]
    return n_new


@njit(nogil=True, cache=True)
def _take_out(t, f, xv, xvt, rows_t, nrow_t, rows_f, nrow_f):
    """Sample (t, f) out of both layouts of the pass inputs: zero there, and listed as
    flagged in its integration's and its channel's rows."""
    xv[t, f] = 0.0
    xvt[f, t] = 0.0
    rows_t[t, nrow_t[t]] = f
    nrow_t[t] += 1
    rows_f[f, nrow_f[f]] = t
    nrow_f[f] += 1


@njit(nogil=True, cache=True)
def _st_apply_new(new_idx, n_new, F, xv, xvt, rows_t, nrow_t, rows_f, nrow_f):
    """Take newly flagged samples out of both layouts of the pass inputs."""
    for i in range(n_new):
        q = new_idx[i]
        t = q // F
        f = q - t * F
        _take_out(t, f, xv, xvt, rows_t, nrow_t, rows_f, nrow_f)


@njit(nogil=True, cache=True)
def _sumthreshold_2d_inplace(values, mask, time_windows, freq_windows, threshold1, rho,
                             two_sided, scale_by_count, st_ws, scale):
    """SumThreshold on a (time, frequency) plane; ``mask`` is updated in place.

    For each window length M (ascending, the union of both lists): a pass along time
    (each channel) if M is a time window, then a pass along frequency (each
    integration) if M is a frequency window. Each pass decides on the mask as it was
    before the pass (AOFlagger's ``maskCopy`` semantics).

    Implementation: the masked values are laid out once per call in both (time,
    frequency) and (frequency, time) order, with per-row lists of the flagged samples,
    so that both directions run as :func:`_st_pass` over contiguous rows with
    independent running sums in every lane (SIMD across channels, or across
    integrations); samples a pass flags are then taken out of both layouts. Sums and
    comparisons per window are those of the sequence-by-sequence algorithm
    (:func:`_st_row`), in the same order, so the flags are identical. ``st_ws`` is the
    workspace of :func:`_st_workspace`. If ``scale`` (F,) is not empty, ``values`` are
    first divided by it per channel, in place (every sample, flagged or not).
    """
    (xv, xvt, rows_t, nrow_t, rows_f, nrow_f, s, nf, lv, hit, done, new_idx, tab,
     lim) = st_ws
    T, F = values.shape
    for t in range(T):
        nrow_t[t] = 0
    for f in range(F):
        nrow_f[f] = 0
    chk = 0.0
    scaled = scale.shape[0] > 0
    for t in range(T):
        for f in range(F):
            if scaled:
                values[t, f] = values[t, f] / scale[f]
            if mask[t, f]:
                _take_out(t, f, xv, xvt, rows_t, nrow_t, rows_f, nrow_f)
            else:
                x = values[t, f]
                xv[t, f] = x
                xvt[f, t] = x
                chk += x - x     # stays 0.0 unless some x is inf or NaN
    maxw = _max_window(time_windows, freq_windows)
    for M in range(1, maxw + 1):
        in_t = _in(time_windows, M) and M <= T
        in_f = _in(freq_windows, M) and M <= F
        if M == 1 and in_t and chk == 0.0:
            # With finite values a window of one sample is that sample (the running
            # sum is exact), so the time pass flags every unflagged sample above
            # chi_1 and leaves nothing for the frequency pass of M = 1 to find.
            in_f = False
        if not (in_t or in_f):
            continue
        _thr_table(M, threshold1, rho, scale_by_count, tab)
        lim[0] = np.inf
        for cc in range(1, M + 1):
            lim[cc] = tab[cc] * cc
        if in_t:
            n_new = _st_pass(xv, rows_t, nrow_t, lim, M, two_sided, s, nf, lv, hit, done,
                             mask, False, new_idx, 0)
            _st_apply_new(new_idx, n_new, F, xv, xvt, rows_t, nrow_t, rows_f, nrow_f)
        if in_f:
            n_new = _st_pass(xvt, rows_f, nrow_f, lim, M, two_sided, s, nf, lv, hit, done,
                             mask, True, new_idx, 0)
            _st_apply_new(new_idx, n_new, F, xv, xvt, rows_t, nrow_t, rows_f, nrow_f)


@njit(nogil=True, cache=True)
def _st_workspace(T, F, time_windows, freq_windows, xv, xvt):
    """Scratch of :func:`_sumthreshold_2d_inplace` for (T, F) planes; ``xv`` (T, F)
    and ``xvt`` (F, T) are C-contiguous float64 arrays it may overwrite (the caller's
    spare buffers)."""
    n = max(T, F)
    maxw = _max_window(time_windows, freq_windows)
    return (xv, xvt, np.empty((T, F), np.int32),
            np.empty(T, np.int64), np.empty((F, T), np.int32), np.empty(F, np.int64),
            np.empty(n), np.empty(n, np.int64), np.empty(n), np.empty(n, np.bool_),
            np.empty(n, np.int64), np.empty(T * F, np.int64), np.empty(maxw + 1),
            np.empty(maxw + 1))


@njit(nogil=True, cache=True)
def sumthreshold_2d(values, mask, time_windows, freq_windows, threshold1, rho=1.5,
                    two_sided=False, scale_by_count=False):
    """SumThreshold in time and frequency on a (time, frequency) plane.

    ``threshold1`` is chi_1, the single-sample threshold (in the units of ``values``);
    window M uses ``chi_1 / rho ** log2(M)`` on the mean of its unflagged samples
    (AOFlagger). With ``scale_by_count`` a window holding ``c`` unflagged samples uses
    ``chi_1 / rho ** log2(c)``: the few clean samples next to a flagged region are then
    not held to the low threshold of a long window (which otherwise grows every strong
    RFI region by up to M - 1 samples of noise). Windows are int64 arrays; non-finite
    samples are treated as flagged. Returns the new mask (input | new flags).
    """
    m = mask.copy()
    T, F = values.shape
    for t in range(T):
        for f in range(F):
            if not np.isfinite(values[t, f]):
                m[t, f] = True
    _sumthreshold_2d_inplace(values, m, time_windows, freq_windows, threshold1, rho,
                             two_sided, scale_by_count,
                             _st_workspace(T, F, time_windows, freq_windows,
                                           np.empty((T, F)), np.empty((F, T))),
                             np.empty(0))
    return m
