"""One plane, one block: the flagging strategy over one (time, frequency) plane and over
a block of baselines and polarisations (codes OK / RFI / MISSING), missing data first.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels.flagging.background import (
    _channel_noise_inplace,
    _gauss_taps,
    _rank1_inplace,
    _smooth_linear_t,
    _smooth_to,
)
from kernels.flagging.dilation import _extend_inplace, _sir_2d_inplace
from kernels.flagging.robust import _NET_MAX, _sort_pairs
from kernels.flagging.sumthreshold import _st_workspace, _sumthreshold_2d_inplace


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
    amp_sum = 0.0
    for t in range(T):
        for f in range(F):
            if not mask[t, f]:
                n_ok += 1
                amp_sum += abs(amp[t, f])
    if n_ok == 0:
        return
    # no receiver's noise is below 1e-5 of its amplitude (autocorrelations: ~1/sqrt(B t)
    # ~ 6e-4 for one DSA-110 sample): a smaller noise estimate is float rounding of a
    # noiseless plane, whose residuals must not turn into outliers
    amp_floor = 1e-5 * amp_sum / n_ok
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
        floor = max(1e-30, amp_floor)
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
