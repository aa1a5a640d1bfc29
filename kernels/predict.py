"""Point-source visibility prediction (direct Fourier transform), numba.

Convention (the UVH5/pyuvdata one, which the visibility contract follows):
``uvw = x2 - x1`` and ``V = sum_s S_s exp(+2 pi i (u l + v m + w (n - 1)) / lambda)``.

The channel loop uses an exact phase recurrence on a uniform channel grid:
``exp(i phi_k) = exp(i phi_0) * exp(i dphi)**k`` evaluated in double precision, so a
(time, baseline, source) triple costs two sincos and one complex multiply per channel.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels.constants import SPEED_OF_LIGHT as C


@njit(nogil=True, cache=True)
def predict_uniform(uvw, lmn, flux, f0, df, out, bl_start, bl_stop):
    """Accumulate point-source visibilities into ``out`` for baselines [start, stop).

    uvw   : (ntime, nbl, 3) float64 metres
    lmn   : (ntime, nsrc, 3) float64 direction cosines (l, m, n - 1) per integration
    flux  : (ntime, nsrc, nchan) float64 apparent flux (beam x spectrum), Jy
    f0, df: first channel frequency and channel step (Hz; df may be negative)
    out   : (ntime, nbl, nchan) complex128, accumulated in place
    """
    for t in range(uvw.shape[0]):
        for b in range(bl_start, bl_stop):
            add_points(out[t, b], uvw[t, b], lmn[t], flux[t], f0, df)
    return out


@njit(nogil=True, cache=True, inline="always")
def add_points(acc, uvw, lmn, flux, f0, df):
    """``acc`` (nchan,) complex128 += the sources' visibilities on one row: ``uvw`` (3,)
    metres, ``lmn`` (nsrc, 3), ``flux`` (nsrc, nchan); channels f0 + k df (recurrence)."""
    two_pi_over_c = 2.0 * np.pi / C
    u = uvw[0]
    v = uvw[1]
    w = uvw[2]
    for s in range(lmn.shape[0]):
        delay = u * lmn[s, 0] + v * lmn[s, 1] + w * lmn[s, 2]
        ph0 = two_pi_over_c * delay * f0
        dph = two_pi_over_c * delay * df
        z = complex(np.cos(ph0), np.sin(ph0))
        step = complex(np.cos(dph), np.sin(dph))
        for k in range(acc.shape[0]):
            acc[k] += flux[s, k] * z
            z *= step


@njit(nogil=True, cache=True)
def predict_dft(uvw, lmn, flux, freq, out):
    """Brute-force reference: one exp per (time, baseline, source, channel)."""
    ntime, nbl = uvw.shape[0], uvw.shape[1]
    nsrc = lmn.shape[1]
    nchan = freq.shape[0]
    for t in range(ntime):
        for b in range(nbl):
            for s in range(nsrc):
                delay = (uvw[t, b, 0] * lmn[t, s, 0] + uvw[t, b, 1] * lmn[t, s, 1]
                         + uvw[t, b, 2] * lmn[t, s, 2])
                for k in range(nchan):
                    ph = 2.0 * np.pi * delay * freq[k] / C
                    out[t, b, k] += flux[t, s, k] * complex(np.cos(ph), np.sin(ph))
    return out


@njit(nogil=True, cache=True)
def apply_gains(model, gains_t, bandpass, ant1, ant2, pol_index, out, bl_start, bl_stop):
    """``out[t, b, k, p] = g_a1 * conj(g_a2) * model[t, b, k]`` for baselines [start, stop).

    gains_t  : (ntime, nant, npol) complex128, slowly varying gains
    bandpass : (nant, nchan, npol) complex128
    model    : (ntime, nbl, nchan) complex128 (unpolarised: same for XX and YY)
    out      : (ntime, nbl, nchan, npol) complex64 (noise already in it is scaled too)
    """
    ntime = model.shape[0]
    nchan = model.shape[2]
    npol = out.shape[3]
    for t in range(ntime):
        for b in range(bl_start, bl_stop):
            p = ant1[b]
            q = ant2[b]
            for c in range(npol):
                pc = pol_index[c]
                gg = gains_t[t, p, pc] * np.conj(gains_t[t, q, pc])
                for k in range(nchan):
                    g = gg * bandpass[p, k, pc] * np.conj(bandpass[q, k, pc])
                    out[t, b, k, c] = g * (model[t, b, k] + out[t, b, k, c])
    return out
