"""Lazy arrays over UVH5 files for :mod:`contimg.io.uvh5`: one file's data as an
array-like that dask's ``from_array`` slices (contiguous h5py row reads, reordering in
memory), and a fully flagged stand-in for a missing subband."""

from __future__ import annotations

import logging

import dask.array as da
import h5py
import numpy as np

from kernels.rows import reverse_channels

log = logging.getLogger("contimg.io.uvh5")

# ---------------------------------------------------------------------------------
# lazy arrays
# ---------------------------------------------------------------------------------

_DSETS = {"VISIBILITY": "visdata", "FLAG": "flags", "WEIGHT": "nsamples"}
_DTYPES = {"VISIBILITY": np.dtype("complex64"), "FLAG": np.dtype("bool"),
           "WEIGHT": np.dtype("float32")}


class _SubbandArray:
    """Array-like over one file's data: (time, baseline, frequency ascending, pol).

    ``__getitem__`` takes basic slices (what dask's ``from_array`` passes), reads the
    needed contiguous row range with one h5py slice, and reorders in memory.
    """

    def __init__(self, header, var: str):
        self.path = header.path
        self.var = var
        self.dset = _DSETS[var]
        self.dtype = _DTYPES[var]
        # the regular DSA-110 layout (time-major, our baseline order, no conjugated
        # rows) needs no index arrays: keep the pickled graph small
        rows = header.row_index
        self.regular = bool(np.array_equal(rows.reshape(-1), np.arange(rows.size))
                            and not header.conj.any())
        self.row_index = None if self.regular else rows.astype(np.int32)
        self.conj = None if self.regular else header.conj
        self.grid = rows.shape
        self.spw_axis = header.spw_axis
        self.vis_kind = header.vis_kind
        self.descending = header.nfreqs > 1 and header.freqs[1] < header.freqs[0]
        pols = header.pols
        self.pol_swap = None
        if "XY" in pols and "YX" in pols:
            p = list(range(len(pols)))
            p[pols.index("XY")], p[pols.index("YX")] = pols.index("YX"), pols.index("XY")
            self.pol_swap = np.array(p)
        if "RL" in pols and "LR" in pols:
            p = list(range(len(pols)))
            p[pols.index("RL")], p[pols.index("LR")] = pols.index("LR"), pols.index("RL")
            self.pol_swap = np.array(p)
        self.shape = (header.ntime, header.nbl, header.nfreqs, header.npols)
        self.ndim = 4

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (4 - len(key))
        tsl, bsl, fsl, psl = key
        if not all(isinstance(k, slice) for k in key):
            raise TypeError("only basic slices are supported")
        if self.regular:
            rows = np.arange(self.grid[0] * self.grid[1]).reshape(self.grid)[tsl, bsl]
            conj = np.zeros(rows.shape, bool)
        else:
            rows = self.row_index[tsl, bsl]        # (nt, nb)
            conj = self.conj[tsl, bsl]
        nf = self.shape[2]
        # frequency slice in ascending order -> file channels
        fidx = np.arange(nf)[fsl]
        file_f = (nf - 1 - fidx) if self.descending else fidx
        out_shape = rows.shape + (fidx.size, self.shape[3])
        valid = rows >= 0

        def empty():   # absent rows: zeros, flagged
            out = np.zeros(out_shape, self.dtype)
            if self.var == "FLAG":
                out[...] = True
            return out

        if rows.size == 0 or fidx.size == 0 or not valid.any():
            return empty()[..., psl]
        r0, r1 = int(rows[valid].min()), int(rows[valid].max()) + 1
        f0, f1 = int(file_f.min()), int(file_f.max()) + 1
        try:
            with h5py.File(self.path, "r") as f:
                d = f["Data"][self.dset]
                reverse = (self.descending and self.vis_kind == "complex"
                           and np.array_equal(file_f, np.arange(f1 - 1, f0 - 1, -1)))
                if reverse:
                    # descending file, ascending out: read slabs of rows and reverse
                    # them into one C-ordered block (peak: the block + one slab)
                    block = np.empty((r1 - r0, f1 - f0, d.shape[-1]), d.dtype)
                    step = max(1, (8 << 20) // max(1, block[0].nbytes))
                    slab = np.empty((min(step, r1 - r0),) + block.shape[1:], d.dtype)
                    for a in range(r0, r1, step):
                        b = min(a + step, r1)
                        s = slab[:b - a]
                        if self.spw_axis:
                            d.read_direct(s, np.s_[a:b, 0, f0:f1, :])
                        else:
                            d.read_direct(s, np.s_[a:b, f0:f1, :])
                        reverse_channels(s, block[a - r0:b - r0])
                    file_f = np.arange(f0, f1)  # now in ascending order
                elif self.spw_axis:
                    block = d[r0:r1, 0, f0:f1, :]
                else:
                    block = d[r0:r1, f0:f1, :]
        except (OSError, KeyError) as exc:
            from contimg.io.uvh5 import UVH5Error

            raise UVH5Error(f"{self.path}: cannot read Data/{self.dset} rows {r0}:{r1}: "
                            f"{exc}", culprits=[self.path]) from None
        if self.var == "WEIGHT" and np.any(block < 0):
            log.warning("%s: %d negative nsamples in rows %d:%d (flagged, weight 0)",
                        self.path, int(np.count_nonzero(block < 0)), r0, r1)
        if self.var == "VISIBILITY" and self.vis_kind == "compound":
            c = np.empty(block.shape, np.complex64)
            c.real, c.imag = block["r"], block["i"]
            block = c
        # ascending frequency: a reversed view when the slice is contiguous
        if self.descending and np.array_equal(file_f, np.arange(f1 - 1, f0 - 1, -1)):
            # one copy, here in the (parallel) read task, so consumers get C order
            block = np.ascontiguousarray(block[:, ::-1, :])
        elif not np.array_equal(file_f, np.arange(f0, f1)):
            block = block[:, file_f - f0, :]
        if valid.all() and np.array_equal(rows.reshape(-1), np.arange(r0, r1)):
            # fast path: the file is time-major in our baseline order (DSA-110 files)
            out = block.reshape(out_shape)
            if out.dtype != self.dtype:
                out = out.astype(self.dtype)
            cj = conj
            if cj.any():
                out = np.array(out)
                self._fix_conj(out, cj)
            return out[..., psl]
        vals = block[rows[valid] - r0].astype(self.dtype, copy=False)
        self._fix_conj(vals, conj[valid])
        out = empty()
        out[valid] = vals
        return out[..., psl]

    def _fix_conj(self, vals, cj):
        """Rows stored as (a2, a1): conjugate visibilities and swap the cross-hands."""
        if not cj.any():
            return
        if self.var == "VISIBILITY":
            vals[cj] = np.conj(vals[cj])
        if self.pol_swap is not None:
            vals[cj] = vals[cj][..., self.pol_swap]


class _FilledArray:
    """A fully flagged stand-in for a missing subband."""

    def __init__(self, shape, var):
        self.shape = shape
        self.ndim = 4
        self.var = var
        self.dtype = _DTYPES[var]

    def __getitem__(self, key):
        shape = tuple(len(range(*k.indices(n))) for k, n in zip(_full_key(key), self.shape))
        if self.var == "FLAG":
            return np.ones(shape, self.dtype)
        return np.zeros(shape, self.dtype)


def _full_key(key):
    if not isinstance(key, tuple):
        key = (key,)
    return key + (slice(None),) * (4 - len(key))


# ---------------------------------------------------------------------------------
# Dataset assembly
# ---------------------------------------------------------------------------------

def _time_chunks(ntime, chunks, per_time_bytes=0):
    """Integrations per chunk: ``chunks["time"]`` (None/-1/absent: all of them), or with
    ``chunks["block_bytes"]`` (and no "time") the fewest equal chunks whose
    visibilities stay within that many bytes each (``per_time_bytes``: the bytes of
    one integration of a chunk), so that a chunk's size does not grow with the
    baselines (at least one integration per chunk)."""
    chunks = chunks if isinstance(chunks, dict) else {}
    budget = chunks.get("block_bytes")
    if chunks.get("time") is None and budget and per_time_bytes > 0 and ntime > 0:
        fit = max(1, int(budget) // int(per_time_bytes))
        n = -(-ntime // fit)
        return -(-ntime // n)
    tc = chunks.get("time", ntime)
    tc = ntime if tc in (None, -1) else int(tc)
    return tc


def _subband_arrays(header, tc: int, label: str, token: str, fc: int | None = None):
    out = {}
    for var in _DSETS:
        arr = _SubbandArray(header, var)
        out[var] = da.from_array(
            arr, chunks=(tc, header.nbl, fc or header.nfreqs, header.npols), asarray=False,
            lock=False, fancy=False, name=f"uvh5-{var.lower()}-{label}-{token}",
            meta=np.empty((0, 0, 0, 0), dtype=arr.dtype),
        )
    return out


def _filled_arrays(ntime, nbl, nfreqs, npols, tc, label, token):
    out = {}
    for var in _DSETS:
        arr = _FilledArray((ntime, nbl, nfreqs, npols), var)
        out[var] = da.from_array(arr, chunks=(tc, nbl, nfreqs, npols), asarray=False,
                                 lock=False, fancy=False,
                                 name=f"missing-{var.lower()}-{label}-{token}",
                                 meta=np.empty((0, 0, 0, 0), dtype=arr.dtype))
    return out
