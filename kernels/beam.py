"""Primary beam: the Airy power pattern of a uniformly illuminated dish, averaged over a
drift scan's pointings and the band.

DSA-110 dishes are pointed at the meridian at a fixed declination: during a group the
beam centre moves with each integration's phase centre. The effective primary beam of an
image made from the whole group is the weighted mean ``sum_tf W_tf B(sep_t, f) /
sum_tf W_tf`` over integrations ``t`` and channels ``f`` (``W``: the imaging weights
summed over baselines), which is what dividing an image by it undoes exactly for a
point source (its apparent flux is the same weighted mean).
"""

from __future__ import annotations

import numpy as np

from kernels.constants import SPEED_OF_LIGHT

__all__ = ["airy_power", "mean_airy_beam", "lmn_of"]


def airy_power(sep_rad, freq_hz, diameter):
    """Power response ``(2 J1(x) / x)^2``, ``x = pi D sin(sep) / lambda`` (broadcasts)."""
    from scipy.special import j1

    x = np.pi * diameter * np.sin(np.asarray(sep_rad, dtype=np.float64)) * (
        np.asarray(freq_hz, dtype=np.float64) / SPEED_OF_LIGHT)
    x = np.asarray(x, dtype=np.float64)
    out = np.ones_like(x)
    nz = np.abs(x) > 1e-12
    out[nz] = (2.0 * j1(x[nz]) / x[nz]) ** 2
    return out


def lmn_of(ra, dec, ra0, dec0):
    """Direction cosines ``(l east, m north, n)`` of ``(ra, dec)`` about ``(ra0, dec0)``."""
    ra, dec = np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)
    dra = ra - ra0
    cd = np.cos(dec)
    l = cd * np.sin(dra)
    m = np.sin(dec) * np.cos(dec0) - cd * np.sin(dec0) * np.cos(dra)
    n = np.sin(dec) * np.sin(dec0) + cd * np.cos(dec0) * np.cos(dra)
    return l, m, n


def mean_airy_beam(l, m, point_l, point_m, freqs, weights, diameter):
    """Weighted mean Airy beam at image directions ``(l, m)`` (any shape, east/north).

    ``point_l``, ``point_m`` ``(ntime,)``: each integration's pointing in the same
    frame; ``freqs`` ``(nfreq,)`` Hz; ``weights`` ``(ntime, nfreq)`` (e.g. imaging
    weights summed over baselines; zero rows/columns are skipped). Returns an array
    shaped like ``l``.
    """
    l = np.asarray(l, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    n = np.sqrt(np.clip(1.0 - l * l - m * m, 0.0, None))
    weights = np.asarray(weights, dtype=np.float64)
    tot = weights.sum()
    if not tot > 0:
        raise ValueError("mean_airy_beam: all weights are zero")
    out = np.zeros_like(l)
    for t in range(len(point_l)):
        wt = weights[t]
        if not np.any(wt):
            continue
        lt, mt = float(point_l[t]), float(point_m[t])
        nt = np.sqrt(max(0.0, 1.0 - lt * lt - mt * mt))
        cos_sep = np.clip(l * lt + m * mt + n * nt, -1.0, 1.0)
        sep = np.arccos(cos_sep)
        for f, w in zip(freqs, wt):
            if w:
                out += w * airy_power(sep, f, diameter)
    return out / tot
