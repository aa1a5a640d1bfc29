"""Names shared by the MS reader and writer: correlation types, telescope names,
the keyword that carries the Dataset's attributes, and the MS error."""

from __future__ import annotations

import numpy as np

from graphs.contract import VISIBILITY_CONVENTION
from kernels.constants import MJD_UNIX_OFFSET_S

__all__ = ["MSFormatError", "CORR_TYPE", "CORR_LABEL", "MS_TELESCOPE_NAMES",
           "FROM_MS_TELESCOPE", "ATTRS_KEYWORD", "DEFAULT_BLOCK_BYTES",
           "VISIBILITY_CONVENTION", "MJD_UNIX_OFFSET_S", "is_dask",
           "UnknownFieldError", "read_subtable"]

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


class UnknownFieldError(ValueError):
    """A field selection that matches no FIELD row with data (names the MS and lists
    its fields)."""


def is_dask(arr):
    import dask.array as da

    return isinstance(arr, da.Array)


def read_subtable(path, name, columns, optional=()):
    """Small subtable -> (dict of numpy arrays, column keywords), via dask-ms.

    Only named columns are read (dask-ms logs a warning, with the exception and so a
    live table handle attached, for every column it cannot read; asking only for
    what we need keeps that from happening). ``optional`` columns are read when they
    exist and hold data.
    """
    from daskms import xds_from_table

    try:
        dsets, ckw, proxy = xds_from_table(f"{path}::{name}", columns=list(columns),
                                           column_keywords=True, table_proxy=True)
        out = {}
        if dsets:
            out = {k: np.asarray(v.values) for k, v in dsets[0].compute().data_vars.items()}
        present = set(proxy.colnames().result())
        for col in optional:
            if col in present and proxy.nrows().result() > 0:
                try:
                    out[col] = np.asarray(proxy.getcol(col).result())
                except RuntimeError:  # column without data
                    pass
    except MSFormatError:
        raise
    except Exception as exc:
        raise MSFormatError(f"{path}: cannot read the {name} subtable ({exc})") from exc
    missing = [c for c in columns if c not in out]
    if missing and dsets:
        raise MSFormatError(f"{path}: {name} subtable lacks column(s) {missing}")
    return out, ckw
