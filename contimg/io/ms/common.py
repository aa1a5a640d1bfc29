"""Names shared by the MS reader and writer: correlation types, telescope names,
the keyword that carries the Dataset's attributes, and the MS error."""

from __future__ import annotations

from graphs.contract import VISIBILITY_CONVENTION
from kernels.constants import MJD_UNIX_OFFSET_S

__all__ = ["MSFormatError", "CORR_TYPE", "CORR_LABEL", "MS_TELESCOPE_NAMES",
           "FROM_MS_TELESCOPE", "ATTRS_KEYWORD", "DEFAULT_BLOCK_BYTES",
           "VISIBILITY_CONVENTION", "MJD_UNIX_OFFSET_S", "is_dask"]

#: casacore Stokes enumeration (CORR_TYPE) of the polarization labels we know.
CORR_TYPE = {
    "I": 1, "Q": 2, "U": 3, "V": 4,
    "RR": 5, "RL": 6, "LR": 7, "LL": 8,
    "XX": 9, "XY": 10, "YX": 11, "YY": 12,
}
CORR_LABEL = {v: k for k, v in CORR_TYPE.items()}

#: Contract telescope name -> OBSERVATION.TELESCOPE_NAME (and back on reading).
MS_TELESCOPE_NAMES = {"DSA-110": "DSA_110"}
FROM_MS_TELESCOPE = {v: k for k, v in MS_TELESCOPE_NAMES.items()}

#: MAIN table keyword holding the Dataset's attributes (JSON).
ATTRS_KEYWORD = "CONTIMG_ATTRS"

#: Visibility bytes per block when the Dataset does not say (numpy-backed input on
#: writing, default time chunks on reading).
DEFAULT_BLOCK_BYTES = 128 << 20


class MSFormatError(ValueError):
    """An MS that :func:`open_ms` cannot represent in the contract (names the file)."""


def is_dask(arr):
    import dask.array as da

    return isinstance(arr, da.Array)
