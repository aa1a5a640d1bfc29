"""Point-source model visibilities straight into the contract layout, numba.

Same physics and sign convention as :func:`kernels.predict.predict_uniform` (which the
simulator uses): ``V = sum_s S_s(t, nu) exp(+2 pi i (u l + v m + w (n - 1)) nu / c)``
with ``uvw = x2 - x1`` in metres, exact w term, per-integration direction cosines and
an apparent flux per (integration, source, channel) (spectrum x primary beam). The
channel loop uses the exact double-precision phase recurrence on a uniform channel
grid. The difference: the result is written as complex64 ``(time, baseline, channel,
polarization)`` with the same (unpolarised) value in every polarization, so a
calibration model needs no complex128 temporary and no broadcast copy.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels.predict import add_points


@njit(nogil=True, cache=True)
def predict_points(uvw, lmn, flux, f0, df, out):
    """Fill ``out`` (ntime, nbl, nchan, npol) complex64 with the model (overwrites).

    uvw  : (ntime, nbl, 3) float64 metres
    lmn  : (ntime, nsrc, 3) float64 direction cosines (l, m, n - 1)
    flux : (ntime, nsrc, nchan) float64 apparent flux density, Jy
    f0, df : first channel frequency and channel step, Hz
    """
    ntime, nbl = uvw.shape[0], uvw.shape[1]
    nchan, npol = out.shape[2], out.shape[3]
    acc = np.zeros(nchan, np.complex128)
    for t in range(ntime):
        for b in range(nbl):
            acc[:] = 0.0
            add_points(acc, uvw[t, b], lmn[t], flux[t], f0, df)
            for k in range(nchan):
                val = np.complex64(acc[k])
                for p in range(npol):
                    out[t, b, k, p] = val
    return out
