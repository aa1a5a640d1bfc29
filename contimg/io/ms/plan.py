"""The write plan: everything :func:`write_ms` needs, computed once from the (small)
coordinates of a contract Dataset, and the preparation of one computed block for the
MAIN table."""

from __future__ import annotations

import json
import logging

import numpy as np

from contimg.io.ms.common import DEFAULT_BLOCK_BYTES, MJD_UNIX_OFFSET_S, is_dask
from graphs.contract import VIS_DIMS
from kernels.rows import row_flag_weight

__all__ = ["WritePlan", "single_block", "prepare_ms_block", "VIS_COLUMNS"]

log = logging.getLogger(__name__)

_TILE_BYTES = 1 << 20  # ~1 MiB tiles for the complex columns

#: MAIN columns that hold visibilities (conjugated on the way in).
VIS_COLUMNS = ("DATA", "MODEL_DATA", "CORRECTED_DATA")


def _tile_rows(target: int, nbl: int) -> int:
    """Rows per tile near ``target`` that tile an integration exactly (a divisor of the
    baselines per integration, or a multiple of it when that is small), so that a reader
    of whole integrations never reads a tile twice (the MS has no tile cache); else
    ``target``. DSA-110 (4656 baselines, 768 channels): 1552 rows, 3 per integration."""
    target = max(16, int(target))
    if nbl >= target:
        divs = [d for d in range(max(16, target // 2), int(target * 1.25) + 1) if nbl % d == 0]
        return max(divs) if divs else target
    return max(nbl, (target // nbl) * nbl)


def _blockable(arr, chunks):
    """Dask arrays rechunked to ``chunks``; anything else is sliced as it is."""
    return arr.rechunk(chunks) if is_dask(arr) else arr


def _json_attrs(attrs):
    """The JSON-serialisable part of a Dataset's attrs (numpy values made plain)."""
    out = {}
    for key, val in attrs.items():
        if isinstance(val, np.ndarray):
            val = val.tolist()
        elif isinstance(val, np.generic):
            val = val.item()
        elif isinstance(val, tuple):
            val = list(val)
        try:
            json.dumps(val)
        except TypeError:
            log.debug("attribute %r is not JSON-serialisable; not stored in the MS", key)
            continue
        out[key] = val
    return out


class WritePlan:
    """Everything :func:`write_ms` needs, computed once from the (small) coordinates:
    axes and times, one FIELD per distinct phase centre, the antenna table, the blocks
    (one per Dataset chunk) and the tile shape."""

    def __init__(self, ds, model_data, corrected_data):
        self.ds = ds
        self.wait_s = 0.0   # time the writer waited for computed blocks
        self._axes(ds)
        self._fields(ds)
        self._antennas(ds)
        self.telescope_name = str(ds.attrs["telescope_name"])
        self.telescope_location = np.asarray(ds.attrs["telescope_location"], dtype=float)
        self.attrs_json = json.dumps(_json_attrs(ds.attrs))
        self._blocks(ds)
        self._columns(ds, model_data, corrected_data)

    def _axes(self, ds):
        """Times, baselines, channels and correlations; channel width, integration."""
        self.times = np.asarray(ds["time"].values, dtype=np.float64)
        self.ntime = self.times.size
        self.a1 = np.asarray(ds["baseline_antenna1_id"].values, dtype=np.int32)
        self.a2 = np.asarray(ds["baseline_antenna2_id"].values, dtype=np.int32)
        self.nbl = self.a1.size
        self.freq = np.asarray(ds["frequency"].values, dtype=np.float64)
        self.nchan = self.freq.size
        self.pols = [str(p) for p in ds["polarization"].values]
        self.npol = len(self.pols)
        self.nrow = self.ntime * self.nbl
        if self.nrow == 0 or self.nchan == 0 or self.npol == 0:
            raise ValueError(
                f"cannot write an empty Dataset (time={self.ntime}, baseline={self.nbl}, "
                f"frequency={self.nchan}, polarization={self.npol})")
        chan_width = ds["frequency"].attrs.get("channel_width")
        self.chan_width = float(chan_width) if chan_width is not None else (
            float(np.median(np.diff(self.freq))) if self.nchan > 1 else 0.0)
        if not np.isfinite(self.chan_width) or self.chan_width <= 0:
            raise ValueError(f"frequency channel_width must be > 0, got {chan_width!r}")
        integ = ds["time"].attrs.get("integration_time")
        if integ is None:
            if self.ntime < 2:
                raise ValueError("time coordinate lacks the 'integration_time' attribute "
                                 "and a single integration does not define it")
            integ = float(np.median(np.diff(self.times)))
            log.warning("time has no 'integration_time' attribute; using %.6f s", integ)
        self.integration_time = float(integ)
        self.mjd = self.times + MJD_UNIX_OFFSET_S
        # per-row integration times (baseline-dependent averaging): INTERVAL/EXPOSURE
        self.row_interval = None
        if "INTEGRATION_TIME" in ds:
            it = np.asarray(ds["INTEGRATION_TIME"].values, dtype=np.float64)
            if it.shape != (self.ntime, self.nbl):
                raise ValueError(f"INTEGRATION_TIME has shape {it.shape}, expected "
                                 f"(time, baseline_id) = {(self.ntime, self.nbl)}")
            self.row_interval = it

    def _fields(self, ds):
        """One field per distinct phase centre, numbered in order of first use; its name
        is the ``phase_center_name`` (time) coordinate at its first integration, when the
        Dataset names its centres (a centre is its position: a Dataset re-phased to one
        centre is one field whatever names its integrations carried)."""
        self.ra = np.asarray(ds["PHASE_CENTER_RA"].values, dtype=np.float64)
        self.dec = np.asarray(ds["PHASE_CENTER_DEC"].values, dtype=np.float64)
        self.pc_name = None
        if "phase_center_name" in ds.coords:
            self.pc_name = np.asarray([str(n) for n in ds["phase_center_name"].values])
        pairs = np.stack([self.ra, self.dec], axis=1)
        _, first, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)
        order = np.argsort(first)
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        self.field_of_time = rank[inverse.ravel()].astype(np.int32)
        self.field_first_time = np.sort(first)
        self.nfield = order.size

    def _antennas(self, ds):
        self.ant_pos = np.asarray(ds["ANTENNA_POSITION"].values, dtype=np.float64)
        self.ant_diam = np.asarray(ds["ANTENNA_DISH_DIAMETER"].values, dtype=np.float64)
        self.ant_name = [str(n) for n in ds["antenna_name"].values]
        self.ant_number = np.asarray(ds["antenna_number"].values, dtype=np.int32)
        self.nant = self.ant_pos.shape[0]
        if "ANTENNA_MOUNT" in ds:
            self.ant_mount = [str(m).upper() for m in ds["ANTENNA_MOUNT"].values]
        else:
            self.ant_mount = ["ALT-AZ"] * self.nant

    def _blocks(self, ds):
        """Blocks follow the Dataset's own chunks (one dask chunk = one block);
        numpy-backed (or lazily indexed) input: 48-channel, <= 128 MiB blocks. Tiles:
        all correlations, one frequency chunk, ~1 MiB of complex64."""
        vis = ds["VISIBILITY"].data
        if is_dask(vis):
            tchunks = tuple(vis.chunks[0])
            fchunks = tuple(vis.chunks[2])
        else:
            fc = 48 if self.nchan % 48 == 0 else self.nchan
            fchunks = (fc,) * (self.nchan // fc)
            per_time = self.nbl * fc * self.npol * 8
            tc = int(max(1, min(self.ntime, DEFAULT_BLOCK_BYTES // max(per_time, 1))))
            tchunks = (tc,) * (self.ntime // tc) + ((self.ntime % tc,) if self.ntime % tc else ())
        self.tchunks = tchunks
        self.fchunks = fchunks
        self.tstarts = np.concatenate([[0], np.cumsum(tchunks)]).astype(int)
        self.fstarts = np.concatenate([[0], np.cumsum(fchunks)]).astype(int)
        fc0 = int(fchunks[0])
        self.tile_chan = fc0 if all(int(c) == fc0 for c in fchunks[:-1]) else self.nchan
        self.tile_rows = _tile_rows(_TILE_BYTES // (self.npol * self.tile_chan * 8), self.nbl)

    def _columns(self, ds, model_data, corrected_data):
        """The big columns to write, in block chunks; MODEL_DATA / CORRECTED_DATA as
        asked (``"unity"``, ``"copy"`` of DATA, or ``"var"``: a Dataset variable)."""
        chunks4 = (self.tchunks, (self.nbl,), self.fchunks, (self.npol,))
        self.columns = {"DATA": _blockable(ds["VISIBILITY"].data, chunks4),
                        "FLAG": _blockable(ds["FLAG"].data, chunks4),
                        "WEIGHT_SPECTRUM": _blockable(ds["WEIGHT"].data, chunks4)}
        self.extra = {}
        for colname, request in (("MODEL_DATA", model_data),
                                 ("CORRECTED_DATA", corrected_data)):
            if request is False or request is None:
                continue
            if request is True:
                self.extra[colname] = "unity" if colname == "MODEL_DATA" else "copy"
            elif isinstance(request, str):
                if request not in ds.data_vars:
                    raise ValueError(f"{colname}: no data variable {request!r} in the Dataset")
                var = ds[request]
                if tuple(var.dims) != VIS_DIMS:
                    raise ValueError(f"{colname}: variable {request!r} has dims {var.dims}, "
                                     f"expected {VIS_DIMS}")
                self.columns[colname] = _blockable(var.data, chunks4)
                self.extra[colname] = "var"
            else:
                raise TypeError(f"{colname.lower()} must be a bool or a variable name, "
                                f"got {request!r}")
        self.uvw = _blockable(ds["UVW"].data, (self.tchunks, (self.nbl,), (3,)))

    def blocks(self):
        for ti in range(len(self.tchunks)):
            for fi in range(len(self.fchunks)):
                yield ti, fi

    def compute_block(self, ti, fi):
        """Compute one (time chunk, frequency chunk) block of every big column.

        Dask-backed variables are computed together (one ``dask.compute``, so shared
        upstream tasks such as a file read run once); others are sliced. Returned
        prepared for the MAIN table (:func:`prepare_ms_block`).
        """
        import dask

        out, lazy = self.split_block(ti, fi)
        if lazy:
            values = dask.compute(*(single_block(a) for _, a in lazy))
            out.update({name: v for (name, _), v in zip(lazy, values, strict=True)})
        return prepare_ms_block(out)

    def split_block(self, ti, fi):
        """(already-numpy columns, [(name, lazy dask block)]) of one block."""
        t0, t1 = int(self.tstarts[ti]), int(self.tstarts[ti + 1])
        c0, c1 = int(self.fstarts[fi]), int(self.fstarts[fi + 1])
        items = [(n, a, (ti, 0, fi, 0), np.s_[t0:t1, :, c0:c1, :])
                 for n, a in self.columns.items()]
        if fi == 0:
            items.append(("UVW", self.uvw, (ti, 0, 0), np.s_[t0:t1]))
        out = {}
        lazy = []
        for name, arr, block, sl in items:
            if is_dask(arr):
                lazy.append((name, arr.blocks[block]))
            else:
                out[name] = np.asarray(arr[sl])
        return out, lazy


def single_block(arr):
    """The one chunk of a single-chunk dask array as a Delayed: computing it skips
    dask's finalize step, which copies the chunk (a whole subband) once more."""
    if arr.npartitions != 1:
        return arr
    return arr.to_delayed(optimize_graph=True).ravel()[0]


def prepare_ms_block(vals: dict) -> dict:
    """Turn one computed block (contract conventions, ``(time, baseline, chan, pol)``)
    into what the MAIN table takes, off the writer's thread: visibilities conjugated
    (MS convention) into new arrays (never in place: a computed block may be a view of
    the caller's data), rows flattened, and this block's share of FLAG_ROW and of the
    WEIGHT sums."""
    if vals.get("_ms_ready"):
        return vals
    out = dict(vals)
    for name in VIS_COLUMNS:
        if name in vals:
            a = np.conj(np.asarray(vals[name], dtype=np.complex64))
            nt, nb, nc, npol = a.shape
            out[name] = a.reshape(nt * nb, nc, npol)
    flag = np.ascontiguousarray(vals["FLAG"], dtype=bool)
    wt = np.ascontiguousarray(vals["WEIGHT_SPECTRUM"], dtype=np.float32)
    nt, nb, nc, npol = flag.shape
    out["FLAG"] = flag.reshape(nt * nb, nc, npol)
    out["WEIGHT_SPECTRUM"] = wt.reshape(nt * nb, nc, npol)
    flag_row = np.ones(nt * nb, dtype=bool)
    wsum = np.zeros((nt * nb, npol), dtype=np.float64)
    row_flag_weight(out["FLAG"], out["WEIGHT_SPECTRUM"], flag_row, wsum)
    out["_flag_row"], out["_wsum"], out["_ms_ready"] = flag_row, wsum, True
    return out
