"""Statistics for antenna-wide decisions: per-plane noise, new-flag counts per baseline
and per (time, channel), antenna flags from them, and combining the decisions.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels.flagging.plane import CODE_MISSING, CODE_OK, CODE_RFI
from kernels.flagging.robust import MAD_TO_SIGMA, _median_bucket


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
def _combine(src, packed, T, B, F, P, bad_bl, bad_tf):
    """Final flags of a block ``(T, B, F, P)`` from ``src``, flat uint8: the codes
    (flagged where ``!= CODE_OK``) or, ``packed``, their bits (:func:`pack_codes`); or a
    bad baseline (``bad_bl`` (B,)) or a bad (time, channel) cell (``bad_tf`` (T, F))."""
    out = np.empty((T, B, F, P), dtype=np.bool_)
    FP = F * P
    rep = np.empty(FP, np.bool_)
    for t in range(T):
        for f in range(F):
            for p in range(P):
                rep[f * P + p] = bad_tf[t, f]
        for b in range(B):
            o = out[t, b].ravel()
            if bad_bl[b]:
                o[:] = True
                continue
            i0 = (t * B + b) * FP
            for i in range(FP):
                k = i0 + i
                if packed:
                    hit = ((src[k >> 3] >> (7 - (k & 7))) & 1) != 0
                else:
                    hit = src[k] != CODE_OK
                o[i] = rep[i] | hit
    return out


@njit(nogil=True, cache=True)
def combine_codes(codes, bad_bl, bad_tf):
    """Final flags of a block: ``codes != CODE_OK`` or a bad baseline (``bad_bl`` (B,))
    or a bad (time, channel) cell (``bad_tf`` (T, F)); bool, the shape of ``codes``."""
    T, B, F, P = codes.shape
    return _combine(np.ascontiguousarray(codes).ravel(), False, T, B, F, P, bad_bl, bad_tf)


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


@njit(nogil=True, cache=True)
def pack_codes(codes):
    """``codes != CODE_OK`` of a block of :func:`flag_block` codes, one bit per sample
    (C order, most significant bit first: ``np.packbits`` of the flattened block), so
    that the flags can be kept until the array-wide decisions at 1/8 of the codes'
    memory; uint8 ``(ceil(codes.size / 8),)``."""
    flat = codes.ravel()
    n = flat.shape[0]
    out = np.zeros((n + 7) // 8, dtype=np.uint8)
    full = n // 8
    for k in range(full):
        i = 8 * k
        b = 0
        for j in range(8):
            b = (b << 1) | (1 if flat[i + j] != CODE_OK else 0)
        out[k] = b
    if n > 8 * full:
        b = 0
        for j in range(8):
            i = 8 * full + j
            b = (b << 1) | (1 if (i < n and flat[i] != CODE_OK) else 0)
        out[full] = b
    return out


@njit(nogil=True, cache=True)
def combine_packed(bits, T, B, F, P, bad_bl, bad_tf):
    """:func:`combine_codes` of a block whose codes were packed by :func:`pack_codes`:
    a set bit or a bad baseline (``bad_bl`` (B,)) or a bad (time, channel) cell
    (``bad_tf`` (T, F)); bool ``(T, B, F, P)``, the same as ``combine_codes`` gives."""
    return _combine(bits, True, T, B, F, P, bad_bl, bad_tf)
