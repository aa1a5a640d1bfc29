"""Per-row reductions used when writing MS rows (one pass, no temporaries)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def row_flag_weight(flag, weight, flag_row, wsum):
    """For (nrow, nchan, npol) blocks: ``flag_row &= all(flag)``, ``wsum += sum(weight)``.

    flag_row : (nrow,) bool, updated in place
    wsum     : (nrow, npol) float64, updated in place
    """
    nrow, nchan, npol = flag.shape
    for r in range(nrow):
        allf = True
        for c in range(nchan):
            for p in range(npol):
                if not flag[r, c, p]:
                    allf = False
                wsum[r, p] += weight[r, c, p]
        if not allf:
            flag_row[r] = False
    return flag_row, wsum


@njit(nogil=True, cache=True)
def reverse_channels(src, dst):
    """``dst[r, c, :] = src[r, nchan - 1 - c, :]`` for (nrow, nchan, npol) blocks: one
    pass (numpy's negative-stride copy of the same is 3x slower)."""
    nrow, nchan, npol = src.shape
    for r in range(nrow):
        for c in range(nchan):
            cc = nchan - 1 - c
            for p in range(npol):
                dst[r, c, p] = src[r, cc, p]
    return dst

