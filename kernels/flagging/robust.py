"""Order statistics and robust scale: selection and medians (quickselect, bucket medians,
sorting networks over columns) and MAD clipping.
"""

from __future__ import annotations

import numpy as np
from numba import njit


MAD_TO_SIGMA = 1.482602218505602  # 1 / Phi^-1(3/4)


#: columns up to this length get their medians from a sorting network (all channels
#: at once); longer ones by quickselect per channel.
_NET_MAX = 64


@njit(nogil=True, cache=True)
def _select(buf, n, k):
    """k-th smallest of buf[:n] (0-based) by in-place quickselect (reorders buf)."""
    lo = 0
    hi = n - 1
    while hi > lo:
        # median-of-three pivot
        mid = (lo + hi) >> 1
        a = buf[lo]
        b = buf[mid]
        c = buf[hi]
        if a > b:
            a, b = b, a
        if b > c:
            b = c
            if a > b:
                b = a
        pivot = b
        i = lo
        j = hi
        while i <= j:
            while buf[i] < pivot:
                i += 1
            while buf[j] > pivot:
                j -= 1
            if i <= j:
                tmp = buf[i]
                buf[i] = buf[j]
                buf[j] = tmp
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return buf[k]
    return buf[k]


@njit(nogil=True, cache=True)
def _middle(buf, n, k, odd):
    """Median from buf[:n] whose k-th smallest is the upper middle value: that value
    (``odd``), else its mean with the largest of the k values below it. Reorders buf."""
    hi = _select(buf, n, k)
    if odd:
        return hi
    # after the selection buf[:k] holds the k smallest: the lower middle is their max
    lo = buf[0]
    for i in range(1, k):
        if buf[i] > lo:
            lo = buf[i]
    return (lo + hi) / 2.0


@njit(nogil=True, cache=True)
def _median(buf, n):
    """Median of buf[:n] (as numpy: mean of the two middle values for even n); reorders
    buf; NaN for n == 0. No allocation."""
    if n == 0:
        return np.nan
    return _middle(buf, n, n >> 1, n & 1)


@njit(nogil=True, cache=True)
def _median_bucket(buf, n, cnt, aux):
    """Median of buf[:n], the same value as :func:`_median` (exact), in O(n) with
    predictable branches: one pass for the range, one counting pass into up to
    ``cnt.shape[0]`` equal-width buckets (order-preserving: the bucket index is a
    monotone function of the value), then a quickselect among the few samples of the
    bucket(s) that hold the middle rank(s), copied to ``aux`` (length >= n). For large
    n (thousands of samples) this is several times faster than a quickselect over
    everything, whose compares mispredict. Falls back to :func:`_median` (which
    reorders buf) for small n or non-finite data; otherwise buf is left unchanged."""
    nb_max = cnt.shape[0]
    if n < 256 or nb_max < 2:
        return _median(buf, n)
    mn = buf[0]
    mx = buf[0]
    tot = 0.0
    for i in range(n):
        v = buf[i]
        mn = v if v < mn else mn
        mx = v if v > mx else mx
        tot += v
    if not (np.isfinite(mn) and np.isfinite(mx)) or not np.isfinite(mx - mn):
        return _median(buf, n)     # NaN / inf somewhere: the plain path
    k = n >> 1
    if mx == mn:
        return mn if n & 1 else (mn + mn) / 2.0
    # Bucket range [mn, top]; larger values share the last bucket (still in order).
    # For non-negative data the median is <= 2 x mean (Markov), so top = 2 x mean
    # keeps the buckets narrow around the median even when a few outliers (RFI) set
    # the maximum; any top is correct, a poor one only slower.
    top = mx
    if mn >= 0.0:
        top = min(mx, 2.0 * (tot / n))
    nb = min(nb_max, max(2, n >> 4))
    scale = nb / (top - mn)
    if not (np.isfinite(scale) and scale > 0.0):
        return _median(buf, n)
    for b in range(nb):
        cnt[b] = 0
    for i in range(n):
        b = int((buf[i] - mn) * scale)
        cnt[min(b, nb - 1)] += 1
    # buckets holding ranks k - 1 (even n) and k
    r_lo = k - 1 if (n & 1) == 0 else k
    cum = 0
    b_lo = -1
    base = 0
    b_hi = nb - 1
    for b in range(nb):
        c = cnt[b]
        if b_lo < 0 and r_lo < cum + c:
            b_lo = b
            base = cum
        if k < cum + c:
            b_hi = b
            break
        cum += c
    m = 0
    for i in range(n):
        v = buf[i]
        b = min(int((v - mn) * scale), nb - 1)
        if b >= b_lo and b <= b_hi:
            aux[m] = v
            m += 1
    return _middle(aux, m, k - base, n & 1)


@njit(nogil=True, cache=True)
def _sort_pairs(n):
    """Comparators (i, j), i < j, of Batcher's odd-even merge sort of n inputs, shape
    (m, 2): the network of the next power of two without the comparators that touch an
    index >= n (padding with +inf there would make them no-ops). Applying
    ``x[i], x[j] = min, max`` for each row in order sorts x[:n] ascending."""
    p2 = 1
    while p2 < n:
        p2 <<= 1
    out = np.empty((max(1, p2 * p2), 2), np.int64)   # generous upper bound
    m = 0
    p = 1
    while p < p2:
        k = p
        while k >= 1:
            j = k % p
            while j + k < p2:
                for i in range(min(k, p2 - j - k)):
                    a = i + j
                    b = i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        out[m, 0] = a
                        out[m, 1] = b
                        m += 1
                j += 2 * k
            k >>= 1
        p <<= 1
    return out[:m].copy()


@njit(nogil=True, cache=True)
def _sort_columns(work, pairs):
    """Sort every column of ``work`` (L, W) ascending in place with the comparator
    network ``pairs`` (:func:`_sort_pairs` of L); branch-free and vectorised across the
    W columns. No NaN allowed (+inf is fine)."""
    W = work.shape[1]
    for p in range(pairs.shape[0]):
        ri = work[pairs[p, 0]]
        rj = work[pairs[p, 1]]
        for w in range(W):
            a = ri[w]
            b = rj[w]
            ri[w] = a if a < b else b
            rj[w] = b if a < b else a


@njit(nogil=True, cache=True)
def _mad_clip_inplace(values, mask, k, buf):
    T, F = values.shape
    n = 0
    for t in range(T):
        for f in range(F):
            v = values[t, f]
            if not mask[t, f] and np.isfinite(v):
                buf[n] = v
                n += 1
    if n == 0:
        for t in range(T):
            for f in range(F):
                if not np.isfinite(values[t, f]):
                    mask[t, f] = True
        return
    med = _median(buf, n)
    for i in range(n):
        buf[i] = abs(buf[i] - med)
    mad = _median(buf, n)
    lim = k * MAD_TO_SIGMA * mad
    for t in range(T):
        for f in range(F):
            if mask[t, f]:
                continue
            v = values[t, f]
            if not np.isfinite(v):
                mask[t, f] = True
            elif mad > 0.0 and abs(v - med) > lim:
                mask[t, f] = True


@njit(nogil=True, cache=True)
def mad_clip(values, mask, k):
    """Flag ``|x - median| > k * 1.4826 * MAD`` over the unflagged samples of a 2-D plane.

    Statistics in float64 over the unflagged finite samples; non-finite samples are
    flagged; when MAD is 0 (more than half the samples identical) nothing is clipped.
    Returns the new mask.
    """
    out = mask.copy()
    buf = np.empty(values.size, dtype=np.float64)
    _mad_clip_inplace(values, out, k, buf)
    return out
