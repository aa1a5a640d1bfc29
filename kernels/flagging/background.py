"""Background and noise: masked Gaussian smoothing, a rank-1 (time x frequency)
background, robust quadratic fits and per-channel noise of the residual.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels.flagging.robust import (
    MAD_TO_SIGMA,
    _NET_MAX,
    _median,
    _sort_columns,
    _sort_pairs,
)


@njit(nogil=True, cache=True)
def _gauss_taps(sigma, truncate):
    if sigma <= 0.0:
        k = np.ones(1, dtype=np.float64)
        return k
    h = int(math.ceil(truncate * sigma))
    k = np.empty(h + 1, dtype=np.float64)
    for i in range(h + 1):
        k[i] = math.exp(-0.5 * (i / sigma) ** 2)
    return k


@njit(nogil=True, cache=True)
def _axpy2(on, od, inn, ind, g):
    """on += g * inn; od += g * ind (1-D, same length; a loop from 0 that LLVM vectorises)."""
    for k in range(on.shape[0]):
        on[k] += g * inn[k]
        od[k] += g * ind[k]


@njit(nogil=True, cache=True)
def _taps4(o, i0, i1, i2, i3, g0, g1, g2, g3):
    """o += g0 i0 + g1 i1 + g2 i2 + g3 i3, added in that order (four successive
    axpys, with the partial sums kept in registers rather than stored in between)."""
    for k in range(o.shape[0]):
        o[k] = (((o[k] + g0 * i0[k]) + g1 * i1[k]) + g2 * i2[k]) + g3 * i3[k]


@njit(nogil=True, cache=True)
def _smooth_time_row(src, t, k, o):
    """``o = sum_dt k[|dt|] src[t + dt]`` over the rows that exist, dt ascending,
    accumulated from 0.0: exactly the sums of successive axpys, with four taps per
    sweep over the row (partial sums stay in registers)."""
    T = src.shape[0]
    h = k.shape[0] - 1
    o[:] = 0.0
    d0 = max(-h, -t)
    d1 = min(h, T - 1 - t)
    d = d0
    while d + 3 <= d1:
        _taps4(o, src[t + d], src[t + d + 1], src[t + d + 2], src[t + d + 3],
               k[abs(d)], k[abs(d + 1)], k[abs(d + 2)], k[abs(d + 3)])
        d += 4
    while d <= d1:
        _axpy1(o, src[t + d], k[abs(d)])
        d += 1


@njit(nogil=True, cache=True)
def _smooth_freq_row(row, k, o):
    """``o[f] = sum_df k[|df|] row[h + f + df]`` for a row zero-padded by h = len(k) - 1
    on either side, df ascending, four taps per sweep. The zeros add exact zeros, so
    the sums equal those over the channels that exist (the per-tap axpys of the plain
    form)."""
    F = o.shape[0]
    h = k.shape[0] - 1
    o[:] = 0.0
    d = -h
    while d + 3 <= h:
        _taps4(o, row[h + d:h + d + F], row[h + d + 1:h + d + 1 + F],
               row[h + d + 2:h + d + 2 + F], row[h + d + 3:h + d + 3 + F],
               k[abs(d)], k[abs(d + 1)], k[abs(d + 2)], k[abs(d + 3)])
        d += 4
    while d <= h:
        _axpy1(o, row[h + d:h + d + F], k[abs(d)])
        d += 1


@njit(nogil=True, cache=True)
def _smooth_to(src, dst, kt, kf, rowbuf):
    """Separable Gaussian of ``src`` (T, F) into ``dst`` (T, F): along time, then along
    frequency, row by row (the intermediate row, zero-padded by hf = len(kf) - 1
    channels in ``rowbuf``, length >= F + 2 hf, stays in L1). Each output sample is
    the sum of its taps in ascending offset order, along time, then along frequency:
    the same sums as the plain two-pass separable filter."""
    T, F = src.shape
    hf = kf.shape[0] - 1
    row = rowbuf[:F + 2 * hf]
    row[:hf] = 0.0
    row[hf + F:] = 0.0
    mid = row[hf:hf + F]
    for t in range(T):
        _smooth_time_row(src, t, kt, mid)
        _smooth_freq_row(row, kf, dst[t])


@njit(nogil=True, cache=True)
def _smooth_inplace(num, den, kt, kf, tmp):
    """Separable Gaussian of ``num`` (= w * x) and ``den`` (= w): results in num, den
    (see :func:`_smooth_to`). ``tmp``: flat scratch of at least T F + F + 2 hf
    elements (hf = len(kf) - 1)."""
    T, F = num.shape
    hf = kf.shape[0] - 1
    out = tmp[:T * F].reshape((T, F))
    rowbuf = tmp[T * F:T * F + F + 2 * hf]
    _smooth_to(num, out, kt, kf, rowbuf)
    num[:, :] = out
    _smooth_to(den, out, kt, kf, rowbuf)
    den[:, :] = out


@njit(nogil=True, cache=True)
def _axpy1(o, i, g):
    for k in range(o.shape[0]):
        o[k] += g * i[k]


@njit(nogil=True, cache=True)
def _smooth_linear_t(wx, w, kt, kf, out):
    """Local-linear in time, local-constant in frequency, Gaussian-weighted fit of the
    samples ``x`` with weights ``w`` (given as ``wx = w x`` and ``w``); result in
    ``out`` (NaN where no weight). Unlike the normalised (local-constant) smooth it has
    no bias at the first/last integrations under a linear drift."""
    T, F = w.shape
    ht = kt.shape[0] - 1
    hf = kf.shape[0] - 1
    # time pass: moments S0, S1, S2 of w and T0, T1 of w x
    mt = np.zeros((5, T, F))
    for t in range(T):
        for dt in range(-ht, ht + 1):
            tt = t + dt
            if tt < 0 or tt >= T:
                continue
            g0 = kt[abs(dt)]
            g1 = g0 * dt
            g2 = g1 * dt
            _axpy2(mt[0, t], mt[3, t], w[tt], wx[tt], g0)
            _axpy2(mt[1, t], mt[4, t], w[tt], wx[tt], g1)
            _axpy1(mt[2, t], w[tt], g2)
    mf = np.zeros((5, T, F))
    for j in range(5):
        for t in range(T):
            for df in range(-hf, hf + 1):
                f0 = max(0, -df)
                f1 = min(F, F - df)
                if f1 <= f0:
                    continue
                _axpy1(mf[j, t, f0:f1], mt[j, t, f0 + df:f1 + df], kf[abs(df)])
    for t in range(T):
        for f in range(F):
            s0 = mf[0, t, f]
            s1 = mf[1, t, f]
            s2 = mf[2, t, f]
            t0 = mf[3, t, f]
            t1 = mf[4, t, f]
            if s0 <= 1e-12:
                out[t, f] = np.nan
                continue
            det = s0 * s2 - s1 * s1
            if det > 1e-9 * s0 * s2 and det > 0.0:
                out[t, f] = (s2 * t0 - s1 * t1) / det
            else:
                out[t, f] = t0 / s0


@njit(nogil=True, cache=True)
def masked_gaussian_smooth(values, mask, sigma_t, sigma_f, truncate=3.0, linear_time=False):
    """Gaussian-weighted smooth of the unflagged samples of a (time, frequency) plane.

    Default: normalised (Nadaraya-Watson) ``G * (w x) / G * w`` with ``w = ~mask`` and a
    separable Gaussian ``G`` of widths ``sigma_t`` (samples along axis 0) and
    ``sigma_f`` (axis 1), truncated at ``truncate`` sigma. ``linear_time``: a local
    linear fit along time instead (no edge bias under a drift). NaN where no unflagged
    sample is within reach.
    """
    T, F = values.shape
    num = np.zeros((T, F), dtype=np.float64)
    den = np.zeros((T, F), dtype=np.float64)
    for t in range(T):
        for f in range(F):
            if not mask[t, f] and np.isfinite(values[t, f]):
                num[t, f] = values[t, f]
                den[t, f] = 1.0
    kt = _gauss_taps(sigma_t, truncate)
    kf = _gauss_taps(sigma_f, truncate)
    out = np.empty((T, F), dtype=np.float64)
    if linear_time:
        _smooth_linear_t(num, den, kt, kf, out)
        return out
    tmp = np.empty(T * F + F + 2 * (kf.shape[0] - 1), dtype=np.float64)
    _smooth_inplace(num, den, kt, kf, tmp)
    for t in range(T):
        for f in range(F):
            out[t, f] = num[t, f] / den[t, f] if den[t, f] > 1e-12 else np.nan
    return out


@njit(nogil=True, cache=True)
def _robust_quadratic(y, ok, out):
    """Fit ``y[t] ~ c0 + c1 t + c2 t^2`` to the ``ok`` points with 3-sigma clipping (MAD),
    three rounds; write the fit into ``out``. Fewer than 3 usable points: their median."""
    n = y.shape[0]
    use = ok.copy()
    tc = 0.5 * (n - 1)
    scale = max(tc, 1.0)
    for rnd in range(4):
        m = 0
        for i in range(n):
            if use[i]:
                m += 1
        if m < 3:
            # constant: median of usable points (or of all ok ones)
            vals = np.empty(n)
            k = 0
            for i in range(n):
                if use[i] or (m == 0 and ok[i]):
                    vals[k] = y[i]
                    k += 1
            c = np.median(vals[:k]) if k > 0 else 0.0
            for i in range(n):
                out[i] = c
            return
        a = np.zeros((3, 3))
        rhs = np.zeros(3)
        for i in range(n):
            if use[i]:
                x = (i - tc) / scale
                p0, p1, p2 = 1.0, x, x * x
                a[0, 0] += 1.0
                a[0, 1] += p1
                a[0, 2] += p2
                a[1, 2] += p1 * p2
                a[2, 2] += p2 * p2
                rhs[0] += y[i]
                rhs[1] += p1 * y[i]
                rhs[2] += p2 * y[i]
        a[1, 0] = a[0, 1]
        a[1, 1] = a[0, 2]
        a[2, 0] = a[0, 2]
        a[2, 1] = a[1, 2]
        c = np.linalg.solve(a, rhs)
        for i in range(n):
            x = (i - tc) / scale
            out[i] = c[0] + c[1] * x + c[2] * x * x
        if rnd == 3:
            return
        # clip
        dev = np.empty(m)
        k = 0
        for i in range(n):
            if use[i]:
                dev[k] = abs(y[i] - out[i])
                k += 1
        lim = 3.0 * MAD_TO_SIGMA * np.median(dev)
        if lim <= 0.0:
            return
        for i in range(n):
            use[i] = ok[i] and abs(y[i] - out[i]) <= lim


@njit(nogil=True, cache=True, inline="always")
def _ratio_median(x, skip, d, buf):
    """(median of x[i] / d[i] over the i not skipped with d[i] != 0, their number);
    0 when there are none."""
    n = 0
    for i in range(x.shape[0]):
        if not skip[i] and d[i] != 0.0:
            buf[n] = x[i] / d[i]
            n += 1
    return (_median(buf, n) if n > 0 else 0.0), n


@njit(nogil=True, cache=True)
def _rank1_inplace(values, mask, model, g, b, buf):
    """Rank-1 robust model ``G(t) B(f)``: ``B`` per channel by medians over time,
    ``G`` a clipped quadratic in time through the per-integration medians (a gain
    drift is smooth; a broadband burst in one integration must not move it)."""
    T, F = values.shape
    graw = np.empty(T)
    gok = np.empty(T, np.bool_)
    for t in range(T):
        g[t] = 1.0
    for rnd in range(3):
        # B(f) = median_t x / G
        for f in range(F):
            b[f], _ = _ratio_median(values[:, f], mask[:, f], g, buf)
        if rnd == 2:
            break
        # G(t): per-integration medians of x / B, then a robust quadratic in time
        for t in range(T):
            graw[t], n = _ratio_median(values[t], mask[t], b, buf)
            gok[t] = n > 0
        _robust_quadratic(graw, gok, g)
    for t in range(T):
        for f in range(F):
            model[t, f] = g[t] * b[f]


@njit(nogil=True, cache=True)
def rank1_background(values, mask):
    """Robust separable model ``G(t) B(f)`` of a plane (medians over unflagged samples).

    Suited to autocorrelations (gain drift x bandpass); 0 where a whole row/column is
    flagged.
    """
    T, F = values.shape
    model = np.empty((T, F), dtype=np.float64)
    g = np.empty(T, dtype=np.float64)
    b = np.empty(F, dtype=np.float64)
    buf = np.empty(max(T, F), dtype=np.float64)
    _rank1_inplace(values, mask, model, g, b, buf)
    return model


@njit(nogil=True, cache=True)
def _column_abs_medians(resid, mask, s, buf, pairs, work, cnt):
    """``s[f] = median_t |resid[t, f]|`` over the unflagged samples (NaN if none).

    For short columns (T <= :data:`_NET_MAX`, ``pairs`` = :func:`_sort_pairs` (T)) all
    channels are sorted at once by a comparator network, vectorised across channels,
    with flagged samples set to +inf (they sort last); the median is then read at
    the middle rank(s) of the ``cnt[f]`` unflagged samples: the same order statistics,
    hence the same value, as a quickselect per channel (``work``: (T, F) scratch,
    ``cnt``: (F,) int64). Otherwise (or with NaN residuals) a quickselect per channel.
    """
    T, F = resid.shape
    if T <= _NET_MAX:
        for f in range(F):
            cnt[f] = 0
        nan = False
        for t in range(T):
            for f in range(F):
                if mask[t, f]:
                    work[t, f] = np.inf
                else:
                    v = abs(resid[t, f])
                    work[t, f] = v
                    cnt[f] += 1
                    nan |= v != v
        if not nan:
            _sort_columns(work, pairs)
            for f in range(F):
                n = cnt[f]
                k = n >> 1
                if n == 0:
                    s[f] = np.nan
                elif n & 1:
                    s[f] = work[k, f]
                else:
                    s[f] = (work[k - 1, f] + work[k, f]) / 2.0
            return
    for f in range(F):
        n = 0
        for t in range(T):
            if not mask[t, f]:
                buf[n] = abs(resid[t, f])
                n += 1
        s[f] = _median(buf, n)


@njit(nogil=True, cache=True)
def _channel_noise_inplace(resid, mask, half_window, sig, s, buf, pairs, work, cnt):
    """:func:`channel_noise` into ``sig`` with workspace (see
    :func:`_column_abs_medians`; ``buf``: max(T, F) float64)."""
    T, F = resid.shape
    _column_abs_medians(resid, mask, s, buf, pairs, work, cnt)
    nall = 0
    for f in range(F):
        nall += np.isfinite(s[f])
    if nall == 0:
        for f in range(F):
            sig[f] = np.nan
        return
    glob = np.nan    # the band-wide median, computed when a window first needs it
    # running median over 2h+1 channels, evaluated every `stride` channels (and at the
    # last one) and interpolated linearly in between: the noise level of a band
    # changes on scales of many channels.
    stride = max(1, half_window // 2)
    prev_f = -1
    prev_v = 0.0
    f = 0
    while True:
        n = 0
        for ff in range(max(0, f - half_window), min(F, f + half_window + 1)):
            if np.isfinite(s[ff]):
                buf[n] = s[ff]
                n += 1
        if n == 0 and not np.isfinite(glob):
            for ff in range(F):
                if np.isfinite(s[ff]):
                    buf[n] = s[ff]
                    n += 1
            glob = _median(buf, n)
            n = 0
        v = MAD_TO_SIGMA * (_median(buf, n) if n > 0 else glob)
        sig[f] = v
        if prev_f >= 0:
            for k in range(prev_f + 1, f):
                x = (k - prev_f) / (f - prev_f)
                sig[k] = prev_v + x * (v - prev_v)
        prev_f = f
        prev_v = v
        if f == F - 1:
            break
        f = min(f + stride, F - 1)


@njit(nogil=True, cache=True)
def channel_noise(resid, mask, half_window):
    """Robust noise scale per channel of a residual plane (time, frequency).

    ``1.4826 * median_t |r|`` per channel, then a running median over
    ``2 * half_window + 1`` channels (skipping fully flagged channels; the band-wide
    median where a whole window is flagged), evaluated every ``max(1, half_window//2)``
    channels and at the last channel, linearly interpolated in between. NaN everywhere
    if all is flagged.
    """
    T, F = resid.shape
    sig = np.empty(F, dtype=np.float64)
    s = np.empty(F, dtype=np.float64)
    buf = np.empty(max(T, F), dtype=np.float64)
    pairs = _sort_pairs(T) if T <= _NET_MAX else np.empty((0, 2), np.int64)
    _channel_noise_inplace(resid, mask, half_window, sig, s, buf, pairs,
                           np.empty((T, F)), np.empty(F, np.int64))
    return sig
