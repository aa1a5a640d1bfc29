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
    nval = nchan * npol
    for r in range(nrow):
        nflag = 0
        for c in range(nchan):
            for p in range(npol):
                nflag += flag[r, c, p]      # branch-free: LLVM vectorises these loops
        if nflag < nval:
            flag_row[r] = False
        for p in range(npol):
            acc = 0.0
            for c in range(nchan):
                acc += weight[r, c, p]
            wsum[r, p] += acc
    return flag_row, wsum


_WIDE = {2: np.uint16, 4: np.uint32, 8: np.uint64, 16: np.complex128}


def reverse_channels(src, dst):
    """``dst[r, c, :] = src[r, nchan - 1 - c, :]`` for C-contiguous (nrow, nchan, npol)
    blocks, in one pass. The (npol,) samples of a channel move as one 2-16 byte word
    when they fit one (all DSA-110 cases: bool, float32 and complex64 pairs), which is
    several times faster than numpy's negative-stride copy."""
    width = src.shape[2] * src.itemsize
    if width in _WIDE and src.flags.c_contiguous and dst.flags.c_contiguous:
        w = _WIDE[width]
        _reverse_2d(src.view(w).reshape(src.shape[:2]), dst.view(w).reshape(dst.shape[:2]))
    else:
        _reverse_3d(src, dst)
    return dst


@njit(nogil=True, cache=True)
def _reverse_2d(src, dst):
    nrow, nchan = src.shape
    for r in range(nrow):
        for c in range(nchan):
            dst[r, c] = src[r, nchan - 1 - c]


@njit(nogil=True, cache=True)
def _reverse_3d(src, dst):
    nrow, nchan, npol = src.shape
    for r in range(nrow):
        for c in range(nchan):
            cc = nchan - 1 - c
            for p in range(npol):
                dst[r, c, p] = src[r, cc, p]

