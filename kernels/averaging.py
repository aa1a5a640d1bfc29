"""Baseline-dependent averaging (BDA) of Stokes I visibilities for imaging.

Averaging visibilities over a time x frequency bin places their weighted mean at the
bin's mean uv point. A source at angular distance ``theta`` from the phase centre has
fringe phase ``2 pi (u l + v m)``; across a bin that spans ``D`` wavelengths of uv, its
phase spreads by ``2 pi D theta`` and the averaged amplitude drops (box average) by
``sinc(pi D theta)`` with ``sinc(x) = sin(x) / x``. Two spans add up:

* frequency: ``ff`` channels of width ``dnu`` stretch the uv point radially by
  ``D_f = |uv| ff dnu / c`` (``|uv|`` metres, the baseline's largest projected length);
* time: ``tf`` integrations move it along the uv track by ``D_t = tf |d uv| / lambda_min``
  (``|d uv|`` metres, the baseline's largest step between integrations, measured on the
  re-phased UVW, so Earth rotation and the change of phase centre are both in it).

The loss at radius ``theta`` is ``1 - sinc(pi D_f theta) sinc(pi D_t theta)``.
:func:`bda_factors` gives each baseline the bin (``tf`` integrations x ``ff``
channels) with the fewest output visibilities whose loss stays within ``max_loss``;
long baselines keep their resolution, short ones (most of DSA-110's T) are averaged
hard. The w coordinate is averaged like u and v; the phase error that leaves, ``2 pi
dw (n - 1)``, is below 1e-3 rad for DSA-110 (``|n - 1| < 1e-3`` over the primary beam).

:func:`bda_average` averages one chunk ``(time, baseline, channel)`` into a flat list
of visibilities with uvw in wavelengths (the gridders take them with one "channel" of
frequency c): weighted means of visibility and uvw, summed weights, and the (time,
channel) indices of each bin's middle (to weight the primary beam). Bins whose weights
are all zero keep weight 0 (the gridders skip them).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels.constants import SPEED_OF_LIGHT

__all__ = ["bda_factors", "bda_count", "bda_average", "bda_stokes_i", "smearing_loss",
           "SPEED_OF_LIGHT"]


def _sinc(x):
    x = np.asarray(x, dtype=np.float64)
    out = np.ones_like(x)
    nz = x != 0.0
    out[nz] = np.sin(x[nz]) / x[nz]
    return out


def smearing_loss(uv_max_m, duv_m, chan_width_hz, freq_max_hz, theta_rad, tf, ff):
    """Fractional amplitude loss at radius ``theta_rad`` of averaging ``tf`` integrations
    x ``ff`` channels on baselines with largest projected length ``uv_max_m`` and
    largest uv step per integration ``duv_m`` (metres; arrays broadcast)."""
    d_f = np.asarray(uv_max_m, np.float64) * ff * chan_width_hz / SPEED_OF_LIGHT
    d_t = np.asarray(duv_m, np.float64) * tf * freq_max_hz / SPEED_OF_LIGHT
    return 1.0 - _sinc(np.pi * d_f * theta_rad) * _sinc(np.pi * d_t * theta_rad)


def bda_count(nt, nf, tf, ff):
    """Output visibilities per baseline: ``ceil(nt / tf) * ceil(nf / ff)``."""
    tf = np.asarray(tf, dtype=np.int64)
    ff = np.asarray(ff, dtype=np.int64)
    return ((nt + tf - 1) // tf) * ((nf + ff - 1) // ff)


def bda_factors(uvw, freq, chan_width_hz, theta_rad, max_loss, nf_chunk, *,
                max_tf=None, max_ff=None):
    """Per-baseline averaging factors ``(tf, ff)`` (int32 arrays of ``nbaseline``).

    ``uvw``: ``(ntime, nbaseline, 3)`` metres, towards the image's phase centre;
    ``freq``: channel frequencies (Hz); ``chan_width_hz``: channel width; ``theta_rad``:
    the radius where the loss is budgeted (e.g. the primary beam's half-power radius);
    ``max_loss``: largest fractional amplitude loss there (e.g. 0.01); ``nf_chunk``:
    channels per chunk (frequency bins never cross a chunk). Of all bins within the
    budget, each baseline gets the one with the fewest output visibilities per chunk
    (ties: the smaller bin). ``max_loss <= 0`` gives ``tf = ff = 1``.
    """
    uvw = np.asarray(uvw, dtype=np.float64)
    if uvw.ndim != 3 or uvw.shape[2] != 3:
        raise ValueError(f"uvw must be (ntime, nbaseline, 3), got {uvw.shape}")
    nt, nb = uvw.shape[:2]
    tf_out = np.ones(nb, dtype=np.int32)
    ff_out = np.ones(nb, dtype=np.int32)
    if max_loss <= 0 or nb == 0:
        return tf_out, ff_out
    if not (0 < max_loss < 1):
        raise ValueError(f"max_loss must be in (0, 1), got {max_loss}")
    if not theta_rad > 0:
        raise ValueError(f"theta_rad must be positive, got {theta_rad}")
    fmax = float(np.max(freq))
    uvlen = np.hypot(uvw[..., 0], uvw[..., 1])
    uv_max = uvlen.max(axis=0)
    if nt > 1:
        duv = np.sqrt((np.diff(uvw, axis=0) ** 2).sum(axis=2)).max(axis=0)
    else:
        duv = np.zeros(nb)
    mt = nt if max_tf is None else max(1, min(nt, int(max_tf)))
    mf = nf_chunk if max_ff is None else max(1, min(nf_chunk, int(max_ff)))
    tfs = np.arange(1, mt + 1)
    ffs = np.arange(1, mf + 1)
    # candidates sorted by (output count, bin size): the first within budget wins
    cand = [(int(bda_count(nt, nf_chunk, t, f)), int(t * f), int(t), int(f))
            for t in tfs for f in ffs]
    cand.sort()
    best_tf = np.zeros(nb, dtype=np.int32)
    best_ff = np.zeros(nb, dtype=np.int32)
    todo = np.ones(nb, dtype=bool)
    for _, _, t, f in cand:
        if not todo.any():
            break
        ok = todo & (smearing_loss(uv_max, duv, chan_width_hz, fmax, theta_rad, t, f)
                     <= max_loss)
        best_tf[ok] = t
        best_ff[ok] = f
        todo &= ~ok
    # (1, 1) always qualifies as "no averaging" even if the data already smear more
    best_tf[todo] = 1
    best_ff[todo] = 1
    return best_tf, best_ff


@njit(nogil=True, cache=True)
def _store(k, b, t0, t1, f0, f1, chan0, sw, sr, si, su, sv, sz, uvw, freq,
           out_vis, out_w, out_uvw, out_t, out_f):
    """Write bin k of baseline b from its weighted sums (weight 0: the bin's middle uvw)."""
    if sw > 0.0:
        out_vis[k] = complex(sr / sw, si / sw)
        out_w[k] = sw
        out_uvw[k, 0] = su / sw
        out_uvw[k, 1] = sv / sw
        out_uvw[k, 2] = sz / sw
    else:
        tm = (t0 + t1 - 1) // 2
        fm = (f0 + f1 - 1) // 2
        s = freq[fm] / SPEED_OF_LIGHT
        out_vis[k] = 0.0
        out_w[k] = 0.0
        out_uvw[k, 0] = uvw[tm, b, 0] * s
        out_uvw[k, 1] = uvw[tm, b, 1] * s
        out_uvw[k, 2] = uvw[tm, b, 2] * s
    out_t[k] = (t0 + t1 - 1) // 2
    out_f[k] = chan0 + (f0 + f1 - 1) // 2


@njit(nogil=True, cache=True)
def bda_average(vis, wgt, uvw, freq, tf, ff, start, chan0,
                out_vis, out_w, out_uvw, out_t, out_f):
    """Average one chunk; see the module docstring.

    ``vis`` ``(nt, nb, nf)`` complex64 Stokes I, ``wgt`` ``(nt, nb, nf)`` float32 (0:
    flagged), ``uvw`` ``(nt, nb, 3)`` float64 metres, ``freq`` ``(nf,)`` Hz, ``tf``/``ff``
    ``(nb,)`` factors, ``start`` ``(nb,)`` int64 first output index of each baseline
    (``bda_count`` cumulated), ``chan0`` the chunk's first channel index in the band.
    Fills ``out_vis`` complex64, ``out_w`` float32, ``out_uvw`` float64 wavelengths
    ``(n, 3)``, ``out_t``/``out_f`` int32 (time index and band channel index of each bin's
    middle). Output order: baseline, then time bin, then channel bin.
    """
    nt, nb, nf = vis.shape
    no4 = np.empty((0, 0, 0, 2), dtype=np.float32)
    _average_bins(False, vis, wgt, no4, no4 != 0, no4, uvw[:, :, 2], uvw, freq, tf[:0] == 0,
                  0.0, 0.0, True, 0.0, tf, ff, start, chan0, out_vis, out_w, out_uvw,
                  out_t, out_f)


@njit(nogil=True, cache=True)
def _average_bins(xxyy, vis, wgt, vis4, flag4, weight4, w_old, uvw, freq, cross, uv_min,
                  uv_max, uniform, df, tf, ff, start, chan0,
                  out_vis, out_w, out_uvw, out_t, out_f):
    """The loop over the bins of a chunk in output order (baseline, time bin, channel
    bin) shared by :func:`bda_average` (Stokes I ``vis``/``wgt``) and, with ``xxyy``,
    :func:`bda_stokes_i` (``vis4``/``flag4``/``weight4`` and the rest of its arguments)."""
    nt = uvw.shape[0]
    nb = uvw.shape[1]
    nf = freq.shape[0]
    for b in range(nb):
        k = start[b]
        tfb = tf[b]
        ffb = ff[b]
        for t0 in range(0, nt, tfb):
            t1 = min(nt, t0 + tfb)
            for f0 in range(0, nf, ffb):
                f1 = min(nf, f0 + ffb)
                if not xxyy:
                    sw, sr, si, su, sv, sz = _sum_bin(vis, wgt, uvw, freq, b, t0, t1, f0, f1)
                elif cross[b]:
                    sw, sr, si, su, sv, sz = _sum_bin_xxyy(
                        vis4, flag4, weight4, w_old, uvw, freq, uv_min, uv_max, uniform, df,
                        b, t0, t1, f0, f1)
                else:
                    sw = sr = si = su = sv = sz = 0.0
                _store(k, b, t0, t1, f0, f1, chan0, sw, sr, si, su, sv, sz, uvw, freq,
                       out_vis, out_w, out_uvw, out_t, out_f)
                k += 1


@njit(nogil=True, cache=True, inline="always")
def _sum_bin(vis, wgt, uvw, freq, b, t0, t1, f0, f1):
    """Weighted sums (w, w Re V, w Im V, w u/lambda, w v/lambda, w w/lambda) of a bin."""
    sw = sr = si = su = sv = sz = 0.0
    for t in range(t0, t1):
        u = uvw[t, b, 0]
        v = uvw[t, b, 1]
        z = uvw[t, b, 2]
        for f in range(f0, f1):
            w = wgt[t, b, f]
            if w > 0.0:
                s = w * freq[f] / SPEED_OF_LIGHT
                x = vis[t, b, f]
                sw += w
                sr += w * x.real
                si += w * x.imag
                su += s * u
                sv += s * v
                sz += s * z
    return sw, sr, si, su, sv, sz


@njit(nogil=True, cache=True)
def bda_stokes_i(vis, flag, weight, w_old, uvw, freq, cross, uv_min, uv_max, tf, ff,
                 start, chan0, out_vis, out_w, out_uvw, out_t, out_f):
    """Stokes I, re-phasing and :func:`bda_average` in one pass over XX/YY data.

    ``vis``/``flag``/``weight`` ``(nt, nb, nf, 2)`` (XX, YY); ``w_old`` ``(nt, nb)`` the
    w (metres) towards each row's own phase centre, ``uvw`` ``(nt, nb, 3)`` towards the
    image's (the visibilities are rotated by ``exp(2 pi i (w_old - w) f / c)``, the exact
    re-phasing of :func:`kernels.weighting.rephase`); ``cross`` ``(nb,)`` bool (False:
    autocorrelation, left out); ``uv_min``/``uv_max``: projected length range kept
    (wavelengths). Stokes I and its weight follow :func:`kernels.weighting.stokes_i`
    (``(XX + YY) / 2``, weight ``4 / (1/w_XX + 1/w_YY)``, a sample with either feed
    flagged, zero-weight or not finite left out). The rest as :func:`bda_average`.
    """
    nt, nb, nf, _ = vis.shape
    uniform = True
    if nf > 2:
        d0 = freq[1] - freq[0]
        for f in range(2, nf):
            if abs((freq[f] - freq[f - 1]) - d0) > 1e-9 * abs(freq[f]):
                uniform = False
    df = freq[1] - freq[0] if nf > 1 else 0.0
    no3 = np.empty((0, 0, 0), dtype=np.complex64)
    _average_bins(True, no3, no3.real, vis, flag, weight, w_old, uvw, freq, cross, uv_min,
                  uv_max, uniform, df, tf, ff, start, chan0, out_vis, out_w, out_uvw,
                  out_t, out_f)


@njit(nogil=True, cache=True, inline="always")
def _sum_bin_xxyy(vis, flag, weight, w_old, uvw, freq, uv_min, uv_max, uniform, df, b, t0,
                  t1, f0, f1):
    """:func:`_sum_bin` of Stokes I from XX/YY, re-phased (see :func:`bda_stokes_i`)."""
    twopi_c = 2.0 * math.pi / SPEED_OF_LIGHT
    sw = sr = si = su = sv = sz = 0.0
    for t in range(t0, t1):
        u = uvw[t, b, 0]
        v = uvw[t, b, 1]
        z = uvw[t, b, 2]
        uvlen = math.sqrt(u * u + v * v)
        a = twopi_c * (w_old[t, b] - z)
        cr = math.cos(a * freq[f0])
        ci = math.sin(a * freq[f0])
        stc = math.cos(a * df)
        sts = math.sin(a * df)
        for f in range(f0, f1):
            if not uniform:
                cr = math.cos(a * freq[f])
                ci = math.sin(a * freq[f])
            wx = weight[t, b, f, 0]
            wy = weight[t, b, f, 1]
            ok = not (flag[t, b, f, 0] or flag[t, b, f, 1]) and wx > 0.0 \
                and wy > 0.0
            if ok:
                x = 0.5 * (vis[t, b, f, 0] + vis[t, b, f, 1])
                xr = x.real
                xi = x.imag
                ok = math.isfinite(xr) and math.isfinite(xi)
            if ok:
                s = freq[f] / SPEED_OF_LIGHT
                lam_len = uvlen * s
                ok = lam_len >= uv_min and lam_len <= uv_max
            if ok:
                w = 4.0 / (1.0 / wx + 1.0 / wy)
                sw += w
                sr += w * (xr * cr - xi * ci)
                si += w * (xr * ci + xi * cr)
                ws = w * s
                su += ws * u
                sv += ws * v
                sz += ws * z
            if uniform:
                tmp = cr * stc - ci * sts
                ci = cr * sts + ci * stc
                cr = tmp
    return sw, sr, si, su, sv, sz
