"""RFI flagging kernels (numba): numpy arrays in, numpy arrays out; no I/O, no dask.

The layout is the one a baseline block of the visibility Dataset gives:
``vis[time, baseline, frequency, polarization]``. :func:`flag_block` walks the
(baseline, polarization) time-frequency planes with strides (one small per-plane
scratch of amplitudes, no repacking pass over the block) and runs, per plane:

1. **missing data**: the input FLAG, NaN/inf and exact-zero visibilities
   (:func:`flag_nonfinite_zero`). Missing samples never enter a statistic.
2. **iterations** ``k = 0 .. n_iter-1`` with a threshold factor
   ``step ** (n_iter - 1 - k)`` (e.g. 2, 1; AOFlagger's default strategy uses 4, 2, 1):

   a. a robust smooth **background** of the amplitude plane: a masked (normalised)
      separable Gaussian low-pass in time and frequency (:func:`masked_gaussian_smooth`)
      of the unflagged samples. Autocorrelations first get a rank-1 model ``G(t) B(f)``
      (:func:`rank1_background`: ``B`` by medians over time, ``G`` a clipped quadratic
      in time), which follows bandpass ripples and gain drifts where a Gaussian would
      leave residuals of many sigma (autos carry ~1e3 times more signal than noise);
      their remaining background is smoothed along time only (optionally locally
      linear in time, ``linear_mode``, which has no bias at the first/last integration
      under a drift but is levered by outliers near the edge);
   b. a **noise scale per channel**: 1.4826 x median over time of ``|residual|``,
      smoothed across frequency by a running median (:func:`channel_noise`), so a
      frequency-dependent noise level (bandpass) does not bias the thresholds;
   c. **SumThreshold** (Offringa et al. 2010) on the normalised residual
      ``z = (amp - background) / sigma(f)``, in time and in frequency, windows
      ``M = 1, 2, 4, ...`` with thresholds ``chi_M = chi_1 * factor / rho**log2(M)``
      (:func:`sumthreshold_2d`). As in AOFlagger, samples already flagged are left out
      of a window's mean, and a window whose mean of unflagged samples exceeds its
      threshold flags all its samples. Optionally (``scale_by_count``, our default in
      ``graphs.flag``) a window holding ``c`` unflagged samples is held to ``chi_c``
      rather than ``chi_M``, which stops long windows from flagging the clean samples
      next to strong RFI.

3. **MAD clipping** of the last normalised residual: ``|z| > k`` (two-sided; positive
   side only for autocorrelations, whose rank-1 bandpass can absorb a persistent line),
   where z is already in units of 1.4826 x MAD per channel (:func:`mad_clip` is the
   per-plane version, for standalone use).
4. **SIR dilation** (scale-invariant rank operator, Offringa et al. 2012) in time then
   in frequency, linear-time prefix-sum algorithm, with the missing samples left out of
   the sequences (AOFlagger's "masked" variant, so that a dead subband is not grown
   into its neighbours; :func:`sir_dilate_2d`).
5. per baseline (after OR-ing the polarisations), **whole channel / whole
   integration** flagging when their fraction of new flags among the available samples
   exceeds a threshold (:func:`extend_by_fraction`).

:func:`flag_block` returns uint8 codes (0 ok, 1 new flag, 2 missing), so that the
array-wide statistics count new flags among available data in the same pass.

Antenna-wide and array-wide decisions need every baseline and are made in
``graphs.flag`` from small per-plane statistics (:func:`plane_noise`,
:func:`antenna_flags`).

All numba functions are ``@njit(nogil=True, cache=True)``; they are serial and meant
to be run in parallel by dask threads (one baseline block per task).

Implementation and cost
-----------------------
A DSA-110 group is 9312 planes of 24 x 768; the kernels are written so that every
step gives exactly (bit for bit) the result of the plain algorithm described above,
at a fraction of its cost (~2.8x less CPU for :func:`flag_block` than the
sequence-by-sequence version; checked on a full simulated group):

* SumThreshold (:func:`_sumthreshold_2d_inplace`, :func:`_st_pass`) runs every
  sequence of a direction at once: the masked values are laid out once per call in
  (time, frequency) and (frequency, time) order, the running sum of each lane is the
  same sequence of float64 additions as one sequence at a time, and the count of
  unflagged samples of a window (hence its threshold) is updated only where a flagged
  sample enters or leaves it, so the dense loop over lanes vectorises. The frequency
  pass of M = 1 is skipped after the time pass of M = 1 (it cannot find anything
  more when the values are finite).
* Channel noise (:func:`_column_abs_medians`): the 24-sample medians of all channels
  come from one sorting network applied across channels (flagged samples as +inf);
  the band-wide median is only computed when a window needs it.
* Medians of many samples (:func:`plane_noise`) use an exact bucket select
  (:func:`_median_bucket`) instead of a quickselect over everything.
* The Gaussian background sums four taps per sweep over a row (partial sums in
  registers, same order of additions) on zero-padded rows (exact zeros), and the
  smoothed weights of a mask are reused when the next plane's first iteration has
  the same mask (the missing data, usually none).
* SIR along time runs all channels without missing samples at once.
* One set of scratch arrays per block, shared between stages that never overlap, so
  that a plane's working set stays in cache.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

MAD_TO_SIGMA = 1.482602218505602  # 1 / Phi^-1(3/4)

#: columns up to this length get their medians from a sorting network (all channels
#: at once); longer ones by quickselect per channel.
_NET_MAX = 64

__all__ = [
    "MAD_TO_SIGMA",
    "flag_nonfinite_zero",
    "sumthreshold_1d",
    "sumthreshold_2d",
    "sir_dilate_1d",
    "sir_dilate_2d",
    "mad_clip",
    "masked_gaussian_smooth",
    "rank1_background",
    "channel_noise",
    "extend_by_fraction",
    "flag_plane",
    "flag_block",
    "CODE_OK",
    "CODE_RFI",
    "CODE_MISSING",
    "plane_noise",
    "antenna_flags",
    "code_counts_baseline",
    "code_counts_tf",
    "combine_codes",
]


# ---------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------

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
def _median(buf, n):
    """Median of buf[:n] (as numpy: mean of the two middle values for even n); reorders
    buf; NaN for n == 0. No allocation."""
    if n == 0:
        return np.nan
    k = n >> 1
    hi = _select(buf, n, k)
    if n & 1:
        return hi
    # the largest of the lower part is the (k-1)-th smallest
    lo = buf[0]
    for i in range(1, k):
        if buf[i] > lo:
            lo = buf[i]
    return (lo + hi) / 2.0


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
    kk = k - base
    hi = _select(aux, m, kk)
    if n & 1:
        return hi
    lo = aux[0]
    for i in range(1, kk):
        if aux[i] > lo:
            lo = aux[i]
    return (lo + hi) / 2.0


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


# ---------------------------------------------------------------------------------
# missing data
# ---------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def flag_nonfinite_zero(vis):
    """True where a (complex or real) sample is NaN, +-inf or exactly zero. Any shape."""
    flat = vis.ravel()
    out = np.empty(flat.shape[0], dtype=np.bool_)
    for i in range(flat.shape[0]):
        v = flat[i]
        re = v.real
        im = v.imag
        out[i] = (not (np.isfinite(re) and np.isfinite(im))) or (re == 0 and im == 0)
    return out.reshape(vis.shape)


# ---------------------------------------------------------------------------------
# SumThreshold
# ---------------------------------------------------------------------------------

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
def _st_apply_new(new_idx, n_new, F, xv, xvt, rows_t, nrow_t, rows_f, nrow_f):
    """Take newly flagged samples out of both layouts of the pass inputs."""
    for i in range(n_new):
        q = new_idx[i]
        t = q // F
        f = q - t * F
        xv[t, f] = 0.0
        xvt[f, t] = 0.0
        rows_t[t, nrow_t[t]] = f
        nrow_t[t] += 1
        rows_f[f, nrow_f[f]] = t
        nrow_f[f] += 1


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
                xv[t, f] = 0.0
                xvt[f, t] = 0.0
                rows_t[t, nrow_t[t]] = f
                nrow_t[t] += 1
                rows_f[f, nrow_f[f]] = t
                nrow_f[f] += 1
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


# ---------------------------------------------------------------------------------
# scale-invariant rank (SIR) dilation
# ---------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------
# MAD clipping
# ---------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------
# background and noise
# ---------------------------------------------------------------------------------

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
            n = 0
            for t in range(T):
                if not mask[t, f] and g[t] != 0.0:
                    buf[n] = values[t, f] / g[t]
                    n += 1
            b[f] = _median(buf, n) if n > 0 else 0.0
        if rnd == 2:
            break
        # G(t): per-integration medians of x / B, then a robust quadratic in time
        for t in range(T):
            n = 0
            for f in range(F):
                if not mask[t, f] and b[f] != 0.0:
                    buf[n] = values[t, f] / b[f]
                    n += 1
            gok[t] = n > 0
            graw[t] = _median(buf, n) if n > 0 else 0.0
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


# ---------------------------------------------------------------------------------
# whole channel / whole integration
# ---------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def _extend_inplace(mask, missing, chan_frac, time_frac, col, row):
    T, F = mask.shape
    for f in range(F):
        col[f] = False
    for t in range(T):
        row[t] = False
    if chan_frac < 1.0:
        for f in range(F):
            c = 0
            n = 0
            for t in range(T):
                if not missing[t, f]:
                    n += 1
                    if mask[t, f]:
                        c += 1
            col[f] = n > 0 and c > chan_frac * n
    if time_frac < 1.0:
        for t in range(T):
            c = 0
            n = 0
            for f in range(F):
                if not missing[t, f]:
                    n += 1
                    if mask[t, f]:
                        c += 1
            row[t] = n > 0 and c > time_frac * n
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


# ---------------------------------------------------------------------------------
# one plane, one block
# ---------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def _same_mask(a, b):
    """a == b everywhere (two (T, F) bool arrays)."""
    fa = a.ravel()
    fb = b.ravel()
    diff = 0
    for i in range(fa.shape[0]):
        diff += fa[i] != fb[i]
    return diff == 0


@njit(nogil=True, cache=True)
def _plane_workspace(T, F, time_windows, freq_windows, sigma_t, sigma_f, sigma_f_auto,
                     truncate):
    """Every scratch array :func:`_flag_plane_ws` needs for (T, F) planes, allocated
    once per block (a tuple; the layout is private to this module).

    Buffers are shared between stages that never overlap, which keeps a plane's
    working set small (a few (T, F) float64 arrays, mostly in L2): ``num``/``den`` (the
    smoothing's inputs, dead once the residual is formed) are the sort scratch of the
    channel noise and the two layouts of SumThreshold's inputs; the smoothing's
    outputs are SIR's prefix sums.
    """
    n = max(T, F)
    kf = _gauss_taps(sigma_f, truncate)
    kf_auto = _gauss_taps(sigma_f_auto, truncate)
    fp = F + 2 * (max(kf.shape[0], kf_auto.shape[0]) - 1)   # a zero-padded row
    num = np.empty((T, F))
    den = np.empty((T, F))
    pad_n = np.empty((T + 1) * F)
    pad_d = np.empty((T + 1) * F)
    return (np.empty((T, F)), num, den, np.zeros((T, F)), np.empty((T, F), np.bool_),
            np.empty(T), np.empty(F), np.empty(T * F), np.empty(F), np.empty(F),
            np.empty(n, np.int64), np.empty(2 * n + 2),
            _gauss_taps(sigma_t, truncate), kf, kf_auto,
            _st_workspace(T, F, time_windows, freq_windows, num,
                          den.ravel().reshape((F, T))),
            _sort_pairs(T) if T <= _NET_MAX else np.empty((0, 2), np.int64),
            np.empty(F, np.int64),
            pad_n[:(T + 1) * F].reshape((T + 1, F)),
            pad_d[:(T + 1) * F].reshape((T + 1, F)),
            np.empty(F), np.empty(F, np.bool_), np.empty(F),
            pad_n[:T * F].reshape((T, F)), pad_d[:T * F].reshape((T, F)), np.empty(fp),
            np.empty((T, F)), np.empty((T, F), np.bool_), np.full(1, -1, np.int64))


@njit(nogil=True, cache=True)
def _flag_plane_ws(amp, mask, missing, is_auto, n_iter, step, threshold1, rho,
                   time_windows, freq_windows, two_sided, scale_by_count,
                   linear_mode, noise_half, rank1_autos, mad_k, eta_t, eta_f, ws):
    """Flag one plane in place in ``mask`` (which starts as ``missing``); ``ws`` is the
    workspace of :func:`_plane_workspace`."""
    (resid, num, den, model, scr_b, g, b, buf, s, sig, idx, w, kt, kf, kf_auto, st_ws,
     pairs, cnt, wsum, smax, pmin, colmiss, sfa, sm_n, sm_d, rowbuf, den_c, mask_c,
     cache_kind) = ws
    T, F = amp.shape
    n_ok = 0
    for t in range(T):
        for f in range(F):
            n_ok += not mask[t, f]
    if n_ok == 0:
        return
    use_rank1 = is_auto and rank1_autos
    kff = kf_auto if use_rank1 else kf
    for it in range(n_iter):
        factor = step ** (n_iter - 1 - it)
        # background
        if use_rank1:
            _rank1_inplace(amp, mask, model, g, b, buf)
        linear = linear_mode == 2 or (linear_mode == 1 and is_auto)
        # The smoothed weights depend only on the mask (and the taps): in the first
        # iteration the mask is the missing data, the same for most planes of a
        # block (often none), so they are kept and reused when the mask repeats.
        kind = 1 if use_rank1 else 0
        cached = (not linear and it == 0 and cache_kind[0] == kind
                  and _same_mask(mask, mask_c))
        for t in range(T):
            for f in range(F):
                if mask[t, f]:
                    resid[t, f] = 0.0
                    num[t, f] = 0.0
                else:
                    x = amp[t, f] - model[t, f] if use_rank1 else amp[t, f]
                    resid[t, f] = x
                    num[t, f] = x
        if not cached:
            for t in range(T):
                for f in range(F):
                    den[t, f] = 0.0 if mask[t, f] else 1.0
        if linear:
            _smooth_linear_t(num, den, kt, kff, num)   # reads num/den before writing
            for t in range(T):
                for f in range(F):
                    if not mask[t, f]:
                        resid[t, f] -= num[t, f]
        else:
            _smooth_to(num, sm_n, kt, kff, rowbuf)
            if cached:
                dd = den_c
            else:
                _smooth_to(den, sm_d, kt, kff, rowbuf)
                dd = sm_d
                if it == 0:
                    den_c[:, :] = sm_d
                    mask_c[:, :] = mask
                    cache_kind[0] = kind
            for t in range(T):
                for f in range(F):
                    if not mask[t, f]:
                        resid[t, f] -= sm_n[t, f] / dd[t, f]
        # noise per channel (num is free again: the sort scratch)
        _channel_noise_inplace(resid, mask, noise_half, sig, s, buf, pairs, num, cnt)
        floor = 1e-30
        for f in range(F):
            if np.isfinite(sig[f]) and sig[f] > floor:
                floor = max(floor, 1e-6 * sig[f])
        for f in range(F):
            sf = sig[f]
            if not (np.isfinite(sf) and sf > floor):
                sf = floor
            sfa[f] = sf
        # z = resid / sigma(f) (in place, inside SumThreshold's input pass)
        _sumthreshold_2d_inplace(resid, mask, time_windows, freq_windows,
                                 threshold1 * factor, rho, two_sided, scale_by_count,
                                 st_ws, sfa)
    if mad_k > 0.0:
        # MAD clip: z is already in units of 1.4826 x MAD (per channel, robust over
        # time and neighbouring channels), so the clip is |z| > k, two-sided.
        # Autocorrelations (rank-1 model) are clipped on the positive side only: their
        # bandpass B(f) absorbs a line present most of the group, which leaves negative
        # residuals where the line is absent (the array-wide vote flags the line).
        lo = -np.inf if use_rank1 else -mad_k
        for t in range(T):
            for f in range(F):
                if not mask[t, f]:
                    z = resid[t, f]
                    if z > mad_k or z < lo:
                        mask[t, f] = True
    if eta_t > 0.0 or eta_f > 0.0:
        _sir_2d_inplace(mask, missing, eta_t, eta_f, idx, w, scr_b, wsum, smax, pmin,
                        colmiss)


@njit(nogil=True, cache=True)
def flag_plane(amp, missing, is_auto, n_iter, step, threshold1, rho, time_windows,
               freq_windows, two_sided, scale_by_count, sigma_t, sigma_f, sigma_f_auto,
               truncate, linear_mode, noise_half, rank1_autos, mad_k, eta_t, eta_f):
    """Flag one (time, frequency) amplitude plane; returns the mask (missing | RFI).

    Parameters mirror ``graphs.flag.FlagStrategy`` (see there for meaning and defaults):
    ``n_iter`` iterations with threshold factors ``step**(n_iter-1-k)``, SumThreshold
    ``threshold1`` (chi_1 in robust sigma) and ``rho``, int64 window arrays, background
    Gaussian widths ``sigma_t``/``sigma_f`` (samples; ``sigma_f_auto`` along frequency
    for autocorrelations) truncated at ``truncate`` sigma,
    ``linear_mode`` (0: local-constant smooth; 1: local-linear in time for
    autocorrelations; 2: for all planes),
    noise running-median half width ``noise_half`` (channels), rank-1 background for
    autocorrelations, MAD clip ``mad_k`` (0: off), SIR ``eta_t``/``eta_f``.
    """
    T, F = amp.shape
    mask = missing.copy()
    for t in range(T):
        for f in range(F):
            if not np.isfinite(amp[t, f]):
                mask[t, f] = True
    miss = mask.copy()
    _flag_plane_ws(amp, mask, miss, is_auto, n_iter, step, threshold1, rho, time_windows,
                   freq_windows, two_sided, scale_by_count, linear_mode, noise_half,
                   rank1_autos, mad_k, eta_t, eta_f,
                   _plane_workspace(T, F, time_windows, freq_windows, sigma_t, sigma_f,
                                    sigma_f_auto, truncate))
    return mask


CODE_OK = 0
CODE_RFI = 1
CODE_MISSING = 2


@njit(nogil=True, cache=True)
def flag_block(vis, flag, is_auto, n_iter, step, threshold1, rho, time_windows,
               freq_windows, two_sided, scale_by_count, sigma_t, sigma_f, sigma_f_auto,
               truncate, linear_mode, noise_half,
               rank1_autos, mad_k, eta_t, eta_f, combine_pols, chan_frac, time_frac):
    """Flag a block ``vis[time, baseline, frequency, polarization]``.

    ``flag`` (same shape) marks samples already flagged; ``is_auto`` (baseline,) bool.
    Returns uint8 codes of the same shape: ``CODE_MISSING`` (2) for samples flagged on
    input or NaN/inf/zero, ``CODE_RFI`` (1) for new flags, ``CODE_OK`` (0); the new
    FLAG is ``codes != 0``, and the codes let callers count new flags among the
    available data.

    Each (baseline, polarization) plane's amplitudes are flagged by :func:`flag_plane`;
    with ``combine_pols`` a new flag in any polarisation is a new flag in all; then
    whole channels / integrations of a baseline are flagged where their fraction of new
    flags among available samples passes ``chan_frac`` / ``time_frac``
    (:func:`extend_by_fraction`).
    """
    T, B, F, P = vis.shape
    out = np.empty((T, B, F, P), dtype=np.uint8)
    amp = np.empty((T, F))
    missb = np.empty((P, T, F), np.bool_)
    mask = np.empty((T, F), np.bool_)
    comb = np.empty((T, F), np.bool_)
    allmiss = np.empty((T, F), np.bool_)
    col = np.empty(F, np.bool_)
    row = np.empty(T, np.bool_)
    ws = _plane_workspace(T, F, time_windows, freq_windows, sigma_t, sigma_f,
                          sigma_f_auto, truncate)
    for bl in range(B):
        comb[:, :] = False
        allmiss[:, :] = True
        for p in range(P):
            miss = missb[p]
            for t in range(T):
                for f in range(F):
                    v = vis[t, bl, f, p]
                    re = v.real
                    im = v.imag
                    bad = flag[t, bl, f, p] or not (np.isfinite(re) and np.isfinite(im)) \
                        or (re == 0 and im == 0)
                    miss[t, f] = bad
                    mask[t, f] = bad
                    amp[t, f] = 0.0 if bad else math.sqrt(re * re + im * im)
            _flag_plane_ws(amp, mask, miss, is_auto[bl], n_iter, step, threshold1, rho,
                           time_windows, freq_windows, two_sided, scale_by_count,
                           linear_mode, noise_half, rank1_autos, mad_k, eta_t, eta_f, ws)
            for t in range(T):
                for f in range(F):
                    mask[t, f] = mask[t, f] and not miss[t, f]   # new flags only
            if combine_pols:
                for t in range(T):
                    for f in range(F):
                        comb[t, f] = comb[t, f] or mask[t, f]
                        allmiss[t, f] = allmiss[t, f] and miss[t, f]
            else:
                _extend_inplace(mask, miss, chan_frac, time_frac, col, row)
                for t in range(T):
                    for f in range(F):
                        out[t, bl, f, p] = CODE_MISSING if miss[t, f] else (
                            CODE_RFI if mask[t, f] else CODE_OK)
        if combine_pols:
            _extend_inplace(comb, allmiss, chan_frac, time_frac, col, row)
            for p in range(P):
                for t in range(T):
                    for f in range(F):
                        out[t, bl, f, p] = CODE_MISSING if missb[p, t, f] else (
                            CODE_RFI if comb[t, f] else CODE_OK)
    return out


# ---------------------------------------------------------------------------------
# statistics for antenna-wide decisions
# ---------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def plane_noise(vis, flag):
    """Robust amplitude noise of each (baseline, polarization) plane, shape (B, P).

    ``median |a(t, f+1) - a(t, f)| / (0.6745 sqrt 2)`` over pairs of adjacent usable
    channels (not flagged, finite, non-zero): insensitive to smooth structure and to
    sparse RFI. NaN where no pair is usable. (The median is exact, by
    :func:`_median_bucket`.)
    """
    T, B, F, P = vis.shape
    out = np.empty((B, P), dtype=np.float64)
    buf = np.empty(T * max(F - 1, 1), dtype=np.float64)
    aux = np.empty(T * max(F - 1, 1), dtype=np.float64)
    cnt = np.empty(4096, dtype=np.int64)
    norm = MAD_TO_SIGMA / math.sqrt(2.0)
    for bl in range(B):
        for p in range(P):
            n = 0
            for t in range(T):
                prev_ok = False
                prev = 0.0
                for f in range(F):
                    v = vis[t, bl, f, p]
                    re = v.real
                    im = v.imag
                    ok = (not flag[t, bl, f, p]) and np.isfinite(re) and np.isfinite(im) \
                        and not (re == 0 and im == 0)
                    a = math.sqrt(re * re + im * im) if ok else 0.0
                    if ok and prev_ok:
                        buf[n] = abs(a - prev)
                        n += 1
                    prev_ok = ok
                    prev = a
            out[bl, p] = norm * _median_bucket(buf, n, cnt, aux)
    return out


@njit(nogil=True, cache=True)
def code_counts_baseline(codes):
    """Per baseline of a block of :func:`flag_block` codes (time, baseline, frequency,
    polarization): ``out[b] = (new flags, available samples)``, i.e. the number of
    ``CODE_RFI`` and of non-``CODE_MISSING`` samples; int64 (B, 2). One pass."""
    T, B, F, P = codes.shape
    out = np.zeros((B, 2), dtype=np.int64)
    for t in range(T):
        for b in range(B):
            nn = 0
            na = 0
            row = codes[t, b].ravel()
            for i in range(row.shape[0]):
                c = row[i]
                nn += c == CODE_RFI
                na += c != CODE_MISSING
            out[b, 0] += nn
            out[b, 1] += na
    return out


@njit(nogil=True, cache=True)
def code_counts_tf(codes):
    """Per (time, channel) of a block of codes, summed over baselines and
    polarisations: ``out[t, f] = (new flags, available samples)``; int64 (T, F, 2)."""
    T, B, F, P = codes.shape
    out = np.zeros((T, F, 2), dtype=np.int64)
    nn = np.empty(F * P, np.int64)
    na = np.empty(F * P, np.int64)
    for t in range(T):
        nn[:] = 0
        na[:] = 0
        for b in range(B):
            row = codes[t, b].ravel()      # (F * P,) contiguous: vectorised
            for i in range(F * P):
                c = row[i]
                nn[i] += c == CODE_RFI
                na[i] += c != CODE_MISSING
        for f in range(F):
            for p in range(P):
                out[t, f, 0] += nn[f * P + p]
                out[t, f, 1] += na[f * P + p]
    return out


@njit(nogil=True, cache=True)
def combine_codes(codes, bad_bl, bad_tf):
    """Final flags of a block: ``codes != CODE_OK`` or a bad baseline (``bad_bl`` (B,))
    or a bad (time, channel) cell (``bad_tf`` (T, F)); bool, the shape of ``codes``."""
    T, B, F, P = codes.shape
    out = np.empty((T, B, F, P), dtype=np.bool_)
    rep = np.empty(F * P, np.bool_)
    for t in range(T):
        for f in range(F):
            for p in range(P):
                rep[f * P + p] = bad_tf[t, f]
        for b in range(B):
            o = out[t, b].ravel()
            if bad_bl[b]:
                o[:] = True
                continue
            row = codes[t, b].ravel()
            for i in range(F * P):
                o[i] = rep[i] | (row[i] != CODE_OK)
    return out


def antenna_flags(noise, baseline_fraction, ant1, ant2, n_ant, noise_ratio=3.0,
                  max_fraction=0.5):
    """Antennas to flag entirely, from per-baseline statistics (numpy, small arrays).

    noise             : (nbl, npol) robust noise per plane (:func:`plane_noise`)
    baseline_fraction : (nbl,) flagged fraction of each baseline
    ant1, ant2        : (nbl,) antenna indices

    An antenna is bad when the flagged fraction over its baselines exceeds
    ``max_fraction``, or when the median over its cross-correlations of log noise
    differs from the median antenna by more than ``log(noise_ratio)`` (a garbage or
    dead input: every one of its baselines is noisier, or quieter, than the rest).
    ``noise_ratio <= 1`` disables the noise test; ``max_fraction >= 1`` the other.
    Returns a bool array (n_ant,).
    """
    noise = np.asarray(noise, dtype=np.float64)
    frac = np.asarray(baseline_fraction, dtype=np.float64)
    ant1 = np.asarray(ant1, dtype=np.int64)
    ant2 = np.asarray(ant2, dtype=np.int64)
    bad = np.zeros(n_ant, dtype=bool)
    if max_fraction < 1.0 and frac.size:
        tot = np.bincount(ant1, minlength=n_ant) + np.bincount(ant2, minlength=n_ant)
        auto = ant1 == ant2
        s = np.bincount(ant1, weights=frac, minlength=n_ant) + np.bincount(
            ant2, weights=np.where(auto, 0.0, frac), minlength=n_ant)
        tot = tot - np.bincount(ant1[auto], minlength=n_ant)
        with np.errstate(invalid="ignore", divide="ignore"):
            f_ant = np.where(tot > 0, s / np.maximum(tot, 1), 0.0)
        bad |= f_ant > max_fraction
    if noise_ratio > 1.0 and noise.size:
        cross = ant1 != ant2
        with np.errstate(invalid="ignore", divide="ignore"):
            ln = np.log(noise[cross])
        ln = np.where(np.isfinite(ln), ln, np.nan)
        lb = np.nanmedian(ln, axis=1) if ln.ndim == 2 and ln.shape[0] else np.array([])
        a1, a2 = ant1[cross], ant2[cross]
        s_ant = np.full(n_ant, np.nan)
        for i in range(n_ant):
            sel = lb[(a1 == i) | (a2 == i)]
            sel = sel[np.isfinite(sel)]
            if sel.size:
                s_ant[i] = np.median(sel)
        ok = np.isfinite(s_ant)
        if ok.sum() >= 3:
            ref = np.median(s_ant[ok])
            bad |= ok & (np.abs(s_ant - ref) > np.log(noise_ratio))
    return bad


@njit(nogil=True, cache=True)
def flag_counts(cube):
    """Flagged samples of a bool cube (time, baseline, frequency, polarization) per
    (time, baseline) and per channel, in one pass: int64 ``(T, B)`` and ``(F,)``."""
    T, B, F, P = cube.shape
    tb = np.zeros((T, B), dtype=np.int64)
    fc = np.zeros(F, dtype=np.int64)
    for t in range(T):
        for b in range(B):
            n = 0
            for f in range(F):
                k = 0
                for p in range(P):
                    if cube[t, b, f, p]:
                        k += 1
                fc[f] += k
                n += k
            tb[t, b] = n
    return tb, fc
