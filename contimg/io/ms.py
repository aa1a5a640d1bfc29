"""CASA Measurement Set (MSv2) I/O for the visibility Dataset contract.

:func:`write_ms` writes a contract Dataset (numpy- or dask-backed) to a Measurement Set
with python-casacore, one chunk at a time; :func:`open_ms` opens any single-spectral-
window, single-polarization-setup MS lazily (through dask-ms) as the same contract.

Conventions, settled here and checked by ``tests/test_ms.py``
-------------------------------------------------------------

Baseline conjugation
    The Dataset follows pyuvdata/UVH5: ``uvw = x2 - x1``, ``V12 = <E1 E2*>`` and
    ``V = S exp(+2 pi i (u l + v m + w (n - 1)) / lambda)`` (the sign pyuvdata's own
    ``UVData.phase`` implies, and what ``kernels.predict`` simulates).
    The MS gets the opposite ("ant1 - ant2") convention, as pyuvdata >= 3 writes it
    (``UVData.write_ms(flip_conj=True)``, after its authors traced CASA's own
    conventions; pyuvdata issues #1355, #1540): ``MS UVW = -UVW`` and
    ``MS DATA = conj(VISIBILITY)``, i.e. ``DATA = S exp(+2 pi i UVW_ms . (l, m, n-1))``
    with ``UVW_ms = x1 - x2``. Checked by the interop test: WSClean 3.1 images our MS,
    and the MS pyuvdata writes from the same visibilities, with the source on its
    true pixel (the opposite sign, ``exp(-2 pi i ...)`` with ``uvw = x2 - x1``, puts
    it at the mirror position through the phase centre). Imaging cannot tell the two
    Hermitian forms apart, calibration can: this is the form pyuvdata's authors found
    CASA's calibration tasks to assume. pyuvdata reads our MS back into its own
    convention, bit for bit (the files carry no ``pyuvdata_flip_conj`` keyword, so
    it assumes the MS convention; interop test). :func:`open_ms` undoes the flip.

FIELD
    One FIELD row per *distinct* phase centre, in order of first use. DSA-110 data are
    phased to the meridian at every integration, so a group gives one field per
    integration, as today's pipeline writes it (``FIELD_ID`` = integration index).
    A Dataset phased to one centre (e.g. rephased to the group midpoint) gives one
    field. Imagers that take one field by default (WSClean: ``-field 0``) must be told
    which fields to use; note that WSClean images all selected fields on the first
    field's phase centre without rephasing, so drift-scan data should be rephased to
    a common centre before imaging a whole group with it. Directions are written with
    the ``ICRS`` measure reference (the contract's frame), UVW likewise.

Telescope name
    ``OBSERVATION.TELESCOPE_NAME`` is ``ds.attrs["telescope_name"]`` except that
    ``"DSA-110"`` is written as ``"DSA_110"``, the name today's pipeline writes
    (its ``PIPELINE_TELESCOPE_NAME`` default); :func:`open_ms` maps it back. The array
    centre goes in pyuvdata's non-standard ``OBSERVATION.TELESCOPE_LOCATION`` column
    (so pyuvdata and :func:`open_ms` recover it; CASA ignores it).

Times and weights
    ``TIME`` = ``TIME_CENTROID`` = unix seconds + 3506716800 (MJD seconds, UTC,
    integration centre); ``INTERVAL`` = ``EXPOSURE`` = ``time.attrs["integration_time"]``.
    Round trip of ``time`` is exact to the float64 rounding of that sum (< 1 us).
    ``WEIGHT_SPECTRUM`` is the contract's ``WEIGHT``; the row ``WEIGHT`` is its mean
    over channels and ``SIGMA = 1/sqrt(WEIGHT)`` (0 where the weight is 0, as CASA
    does); ``FLAG_ROW`` is set where every channel and correlation is flagged.

Storage
    Rows are time-major with baselines in Dataset order inside each integration.
    DATA, FLAG, WEIGHT_SPECTRUM (and MODEL_DATA/CORRECTED_DATA) use
    TiledColumnStMan with tiles of (all correlations, one Dataset frequency chunk,
    ~1 MiB of complex data in rows), so each (time chunk, frequency chunk) of the
    Dataset is one ``putcolslice`` into one column of tiles; UVW is tiled too;
    slowly varying scalar columns use IncrementalStMan. Memory: about three chunks
    (the one being written, its conjugated copy, the next one being computed).

Safety
    The MS is built at ``<path>.tmp-<pid>`` and renamed into place at the end; on any
    exception the temporary directory is removed and nothing appears at ``path``
    (a process killed outright leaves only its ``.tmp-<pid>`` directory). With
    ``overwrite=True`` the old MS is replaced only once the new one is complete.
    casacore caches open tables by name: readers of the old MS still open in this
    process (e.g. an :func:`open_ms` Dataset) keep seeing the old files, so drop them
    before overwriting (a warning is logged when dask-ms still holds one).
    All casacore calls of one write happen in the calling thread (python-casacore is
    not thread-safe); a single helper thread only *computes* the next Dataset chunk
    (dask) while the current one is written.
"""

from __future__ import annotations

import concurrent.futures as _futures
import json
import logging
import os
import shutil
import time as _time

import numpy as np

from contimg import schema
from kernels.rows import row_flag_weight
from contimg.uvw import compute_uvw

__all__ = [
    "VISIBILITY_CONVENTION",
    "write_ms",
    "open_ms",
    "compute_uvw",
    "MJD_UNIX_OFFSET_S",
    "MSFormatError",
]

log = logging.getLogger(__name__)

#: MS TIME (MJD seconds, UTC) = unix seconds + this.
MJD_UNIX_OFFSET_S = 3506716800.0

#: casacore Stokes enumeration (CORR_TYPE) of the polarization labels we know.
CORR_TYPE = {
    "I": 1, "Q": 2, "U": 3, "V": 4,
    "RR": 5, "RL": 6, "LR": 7, "LL": 8,
    "XX": 9, "XY": 10, "YX": 11, "YY": 12,
}
CORR_LABEL = {v: k for k, v in CORR_TYPE.items()}

#: The contract's sign convention (pyuvdata's; ``uvw = x2 - x1``).
VISIBILITY_CONVENTION = "V = sum S exp(+2 pi i (u l + v m + w (n - 1)) / lambda)"

#: Contract telescope name -> OBSERVATION.TELESCOPE_NAME (and back on reading).
MS_TELESCOPE_NAMES = {"DSA-110": "DSA_110"}
_FROM_MS_TELESCOPE = {v: k for k, v in MS_TELESCOPE_NAMES.items()}

_TILE_BYTES = 1 << 20  # ~1 MiB tiles for the complex columns


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
_DEFAULT_BLOCK_BYTES = 128 << 20  # numpy-backed input: visibilities per written block
_ATTRS_KEYWORD = "CONTIMG_ATTRS"


class MSFormatError(ValueError):
    """An MS that :func:`open_ms` cannot represent in the contract (names the file)."""


# ---------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------


def _receptors(pols):
    """Receptor labels and the CORR_PRODUCT (ncorr, 2) for polarization labels."""
    labels = [str(p) for p in pols]
    letters = sorted({c for p in labels if len(p) == 2 for c in p})
    if set(letters) <= {"X", "Y"} or not letters:
        receptors = ["X", "Y"]
    elif set(letters) <= {"R", "L"}:
        receptors = ["R", "L"]
    else:
        raise ValueError(f"cannot mix linear and circular polarizations: {labels}")
    product = []
    for p in labels:
        if len(p) == 2:
            product.append([receptors.index(p[0]), receptors.index(p[1])])
        else:  # Stokes parameters: nominal
            product.append([0, 0])
    return receptors, np.asarray(product, dtype=np.int32)


def _jname(ra, dec):
    """IAU-style J name of a direction (radians), e.g. ``J123456.78+543412.3``."""
    ra_h = np.degrees(np.mod(ra, 2 * np.pi)) / 15.0
    h = int(ra_h)
    m = int((ra_h - h) * 60)
    s = (ra_h - h - m / 60) * 3600
    sign = "+" if dec >= 0 else "-"
    d_deg = abs(np.degrees(dec))
    d = int(d_deg)
    dm = int((d_deg - d) * 60)
    ds_ = (d_deg - d - dm / 60) * 3600
    return f"J{h:02d}{m:02d}{s:05.2f}{sign}{d:02d}{dm:02d}{ds_:04.1f}"


def _is_dask(arr):
    import dask.array as da

    return isinstance(arr, da.Array)


def _blockable(arr, chunks):
    """Dask arrays rechunked to ``chunks``; anything else is sliced as it is."""
    return arr.rechunk(chunks) if _is_dask(arr) else arr


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


class _Plan:
    """Everything :func:`write_ms` needs, computed once from the (small) coordinates."""

    def __init__(self, ds, model_data, corrected_data):
        self.ds = ds
        self.wait_s = 0.0   # time the writer waited for computed blocks
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

        self.ra = np.asarray(ds["PHASE_CENTER_RA"].values, dtype=np.float64)
        self.dec = np.asarray(ds["PHASE_CENTER_DEC"].values, dtype=np.float64)
        pairs = np.stack([self.ra, self.dec], axis=1)
        _, first, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)
        # number fields in order of first use
        order = np.argsort(first)
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        self.field_of_time = rank[inverse.ravel()].astype(np.int32)
        self.field_first_time = np.sort(first)
        self.nfield = order.size

        self.ant_pos = np.asarray(ds["ANTENNA_POSITION"].values, dtype=np.float64)
        self.ant_diam = np.asarray(ds["ANTENNA_DISH_DIAMETER"].values, dtype=np.float64)
        self.ant_name = [str(n) for n in ds["antenna_name"].values]
        self.ant_number = np.asarray(ds["antenna_number"].values, dtype=np.int32)
        self.nant = self.ant_pos.shape[0]
        if "ANTENNA_MOUNT" in ds:
            self.ant_mount = [str(m).upper() for m in ds["ANTENNA_MOUNT"].values]
        else:
            self.ant_mount = ["ALT-AZ"] * self.nant

        self.telescope_name = str(ds.attrs["telescope_name"])
        self.telescope_location = np.asarray(ds.attrs["telescope_location"], dtype=float)
        self.attrs_json = json.dumps(_json_attrs(ds.attrs))

        # chunking: follow the Dataset's own chunks (one dask chunk = one block);
        # numpy-backed (or lazily indexed) input: 48-channel, <= 128 MiB blocks
        vis = ds["VISIBILITY"].data
        if _is_dask(vis):
            tchunks = tuple(vis.chunks[0])
            fchunks = tuple(vis.chunks[2])
        else:
            fc = 48 if self.nchan % 48 == 0 else self.nchan
            fchunks = (fc,) * (self.nchan // fc)
            per_time = self.nbl * fc * self.npol * 8
            tc = int(max(1, min(self.ntime, _DEFAULT_BLOCK_BYTES // max(per_time, 1))))
            tchunks = (tc,) * (self.ntime // tc) + ((self.ntime % tc,) if self.ntime % tc else ())
        self.tchunks = tchunks
        self.fchunks = fchunks
        self.tstarts = np.concatenate([[0], np.cumsum(tchunks)]).astype(int)
        self.fstarts = np.concatenate([[0], np.cumsum(fchunks)]).astype(int)

        chunks4 = (tchunks, (self.nbl,), fchunks, (self.npol,))
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
                if tuple(var.dims) != schema.VIS_DIMS:
                    raise ValueError(f"{colname}: variable {request!r} has dims {var.dims}, "
                                     f"expected {schema.VIS_DIMS}")
                self.columns[colname] = _blockable(var.data, chunks4)
                self.extra[colname] = "var"
            else:
                raise TypeError(f"{colname.lower()} must be a bool or a variable name, "
                                f"got {request!r}")
        self.uvw = _blockable(ds["UVW"].data, (tchunks, (self.nbl,), (3,)))

        # tile shape: all correlations, one frequency chunk, ~1 MiB of complex64
        fc0 = int(fchunks[0])
        self.tile_chan = fc0 if all(int(c) == fc0 for c in fchunks[:-1]) else self.nchan
        self.tile_rows = _tile_rows(_TILE_BYTES // (self.npol * self.tile_chan * 8), self.nbl)

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
            if _is_dask(arr):
                lazy.append((name, arr.blocks[block]))
            else:
                out[name] = np.asarray(arr[sl])
        return out, lazy


def _main_table_desc(plan):
    from casacore import tables as ct

    desc = ct.required_ms_desc("MAIN")
    shape = [plan.nchan, plan.npol]
    tile = np.array([plan.npol, plan.tile_chan, plan.tile_rows], dtype=np.int32)
    cols = []
    for name, value, comment in (
        ("DATA", np.complex64(0), "The data column"),
        ("MODEL_DATA", np.complex64(0), "The model data column"),
        ("CORRECTED_DATA", np.complex64(0), "The corrected data column"),
    ):
        if name == "DATA" or name in plan.extra:
            cols.append(ct.makearrcoldesc(
                name, value, shape=shape, valuetype="complex",
                datamanagertype="TiledColumnStMan", datamanagergroup=f"Tiled{name}",
                comment=comment))
    cols.append(ct.makearrcoldesc(
        "WEIGHT_SPECTRUM", 0.0, shape=shape, valuetype="float",
        datamanagertype="TiledColumnStMan", datamanagergroup="TiledWEIGHT_SPECTRUM",
        comment="Weight for each data point"))
    for c in cols:
        desc.update(ct.maketabdesc(c))
    # FLAG: fixed shape, tiled like DATA
    desc["FLAG"].update(shape=np.array(shape), option=5, dataManagerType="TiledColumnStMan",
                        dataManagerGroup="TiledFLAG")
    desc["UVW"].update(dataManagerType="TiledColumnStMan", dataManagerGroup="TiledUVW")
    desc["UVW"]["keywords"]["MEASINFO"] = {"type": "uvw", "Ref": "ICRS"}
    desc["WEIGHT"].update(shape=np.array([plan.npol]), option=5)
    desc["SIGMA"].update(shape=np.array([plan.npol]), option=5)
    desc["FLAG_CATEGORY"].update(dataManagerType="TiledShapeStMan",
                                 dataManagerGroup="TiledFLAG_CATEGORY")
    for key in ("ARRAY_ID", "EXPOSURE", "FEED1", "FEED2", "FIELD_ID", "INTERVAL",
                "OBSERVATION_ID", "PROCESSOR_ID", "SCAN_NUMBER", "STATE_ID", "TIME",
                "TIME_CENTROID", "DATA_DESC_ID"):
        desc[key].update(dataManagerType="IncrementalStMan", dataManagerGroup=key)
    group_spec = {
        f"Tiled{n}": {"DEFAULTTILESHAPE": tile, "MAXIMUMCACHESIZE": 0}
        for n in ("DATA", "MODEL_DATA", "CORRECTED_DATA", "WEIGHT_SPECTRUM", "FLAG")
    }
    group_spec["TiledUVW"] = {
        "DEFAULTTILESHAPE": np.array([3, max(1024, plan.tile_rows)], dtype=np.int32),
        "MAXIMUMCACHESIZE": 0}
    group_spec["TiledFLAG_CATEGORY"] = {
        "DEFAULTTILESHAPE": np.array([1, plan.npol, plan.tile_chan, 64], dtype=np.int32)}
    dminfo = ct.makedminfo(desc, group_spec)
    return desc, dminfo


def _set_direction_ref(tb, columns, ref="ICRS"):
    for col in columns:
        kw = tb.getcolkeywords(col)
        meas = dict(kw.get("MEASINFO", {"type": "direction"}))
        meas["Ref"] = ref
        tb.putcolkeyword(col, "MEASINFO", meas)


def _write_subtables(ms_path, plan, history):
    from casacore import tables as ct

    open_rw = lambda name: ct.table(f"{ms_path}/{name}", readonly=False, ack=False)  # noqa: E731
    t_start = plan.mjd[0] - plan.integration_time / 2
    t_end = plan.mjd[-1] + plan.integration_time / 2
    t_mid = 0.5 * (t_start + t_end)
    receptors, corr_product = _receptors(plan.pols)
    nrec = len(receptors)

    # ANTENNA (with pyuvdata-compatible extra column for the file's antenna numbers)
    with open_rw("ANTENNA") as tb:
        tb.addcols(ct.makescacoldesc("ANTENNA_NUMBER", 0, valuetype="int",
                                     comment="Antenna number used by the source file"))
        tb.addrows(plan.nant)
        tb.putcol("NAME", plan.ant_name)
        tb.putcol("STATION", plan.ant_name)
        tb.putcol("TYPE", ["GROUND-BASED"] * plan.nant)
        tb.putcol("MOUNT", plan.ant_mount)
        tb.putcol("POSITION", plan.ant_pos)
        tb.putcol("OFFSET", np.zeros((plan.nant, 3)))
        tb.putcol("DISH_DIAMETER", plan.ant_diam)
        tb.putcol("FLAG_ROW", np.zeros(plan.nant, dtype=bool))
        tb.putcol("ANTENNA_NUMBER", plan.ant_number)

    # FEED: one per antenna, all spectral windows
    with open_rw("FEED") as tb:
        tb.addrows(plan.nant)
        tb.putcol("ANTENNA_ID", np.arange(plan.nant, dtype=np.int32))
        tb.putcol("FEED_ID", np.zeros(plan.nant, dtype=np.int32))
        tb.putcol("SPECTRAL_WINDOW_ID", np.full(plan.nant, -1, dtype=np.int32))
        tb.putcol("TIME", np.full(plan.nant, t_mid))
        tb.putcol("INTERVAL", np.full(plan.nant, t_end - t_start))
        tb.putcol("NUM_RECEPTORS", np.full(plan.nant, nrec, dtype=np.int32))
        tb.putcol("BEAM_ID", np.full(plan.nant, -1, dtype=np.int32))
        tb.putcol("BEAM_OFFSET", np.zeros((plan.nant, nrec, 2)))
        tb.putcol("POLARIZATION_TYPE", np.array([receptors] * plan.nant))
        tb.putcol("POL_RESPONSE", np.tile(np.eye(nrec, dtype=np.complex64), (plan.nant, 1, 1)))
        tb.putcol("POSITION", np.zeros((plan.nant, 3)))
        angles = [0.0, np.pi / 2] if receptors == ["X", "Y"] else [0.0, 0.0]
        tb.putcol("RECEPTOR_ANGLE", np.tile(np.asarray(angles), (plan.nant, 1)))

    # FIELD / SOURCE: one per distinct phase centre
    fra = plan.ra[plan.field_first_time]
    fdec = plan.dec[plan.field_first_time]
    names = []
    for r, d in zip(fra, fdec, strict=True):
        name = _jname(r, d)
        while name in names:
            name += "_"
        names.append(name)
    field_time = np.array([plan.mjd[plan.field_of_time == k].mean() for k in range(plan.nfield)])
    dirs = np.stack([fra, fdec], axis=1)[:, None, :]
    with open_rw("FIELD") as tb:
        tb.addrows(plan.nfield)
        tb.putcol("NAME", names)
        tb.putcol("CODE", [""] * plan.nfield)
        tb.putcol("TIME", field_time)
        tb.putcol("NUM_POLY", np.zeros(plan.nfield, dtype=np.int32))
        for col in ("DELAY_DIR", "PHASE_DIR", "REFERENCE_DIR"):
            tb.putcol(col, dirs)
        _set_direction_ref(tb, ("DELAY_DIR", "PHASE_DIR", "REFERENCE_DIR"))
        tb.putcol("SOURCE_ID", np.arange(plan.nfield, dtype=np.int32))
        tb.putcol("FLAG_ROW", np.zeros(plan.nfield, dtype=bool))

    source_desc = ct.required_ms_desc("SOURCE")
    with ct.default_ms_subtable("SOURCE", f"{ms_path}/SOURCE", source_desc,
                                ct.makedminfo(source_desc)) as tb:
        tb.addrows(plan.nfield)
        tb.putcol("SOURCE_ID", np.arange(plan.nfield, dtype=np.int32))
        tb.putcol("TIME", np.full(plan.nfield, t_mid))
        tb.putcol("INTERVAL", np.full(plan.nfield, t_end - t_start))
        tb.putcol("SPECTRAL_WINDOW_ID", np.full(plan.nfield, -1, dtype=np.int32))
        tb.putcol("NUM_LINES", np.zeros(plan.nfield, dtype=np.int32))
        tb.putcol("NAME", names)
        tb.putcol("CALIBRATION_GROUP", np.zeros(plan.nfield, dtype=np.int32))
        tb.putcol("CODE", [""] * plan.nfield)
        tb.putcol("DIRECTION", dirs[:, 0, :])
        tb.putcol("PROPER_MOTION", np.zeros((plan.nfield, 2)))
        _set_direction_ref(tb, ("DIRECTION",))
    with ct.table(ms_path, readonly=False, ack=False) as tb:
        tb.putkeyword("SOURCE", f"Table: {ms_path}/SOURCE")

    # SPECTRAL_WINDOW (one, ascending), POLARIZATION, DATA_DESCRIPTION
    with open_rw("SPECTRAL_WINDOW") as tb:
        tb.addrows(1)
        width = np.full(plan.nchan, plan.chan_width)
        tb.putcell("CHAN_FREQ", 0, plan.freq)
        tb.putcell("CHAN_WIDTH", 0, width)
        tb.putcell("EFFECTIVE_BW", 0, width)
        tb.putcell("RESOLUTION", 0, width)
        tb.putcell("NUM_CHAN", 0, plan.nchan)
        tb.putcell("REF_FREQUENCY", 0, float(plan.freq[0]))
        tb.putcell("TOTAL_BANDWIDTH", 0, float(plan.nchan * plan.chan_width))
        tb.putcell("MEAS_FREQ_REF", 0, 5)  # TOPO
        tb.putcell("NAME", 0, "SPW0")
        tb.putcell("NET_SIDEBAND", 0, 1)
        tb.putcell("FREQ_GROUP", 0, 0)
        tb.putcell("FREQ_GROUP_NAME", 0, "")
        tb.putcell("IF_CONV_CHAIN", 0, 0)
        tb.putcell("FLAG_ROW", 0, False)
    with open_rw("POLARIZATION") as tb:
        tb.addrows(1)
        tb.putcell("NUM_CORR", 0, plan.npol)
        tb.putcell("CORR_TYPE", 0, np.array([CORR_TYPE[p] for p in plan.pols], dtype=np.int32))
        tb.putcell("CORR_PRODUCT", 0, corr_product)
        tb.putcell("FLAG_ROW", 0, False)
    with open_rw("DATA_DESCRIPTION") as tb:
        tb.addrows(1)
        tb.putcell("SPECTRAL_WINDOW_ID", 0, 0)
        tb.putcell("POLARIZATION_ID", 0, 0)
        tb.putcell("FLAG_ROW", 0, False)

    # OBSERVATION (+ pyuvdata's TELESCOPE_LOCATION column)
    with open_rw("OBSERVATION") as tb:
        tb.addcols(ct.makearrcoldesc("TELESCOPE_LOCATION", 0.0, shape=[3],
                                     valuetype="double",
                                     comment="ITRF array centre, m (pyuvdata convention)"))
        tb.addrows(1)
        tb.putcell("TELESCOPE_NAME", 0,
                   MS_TELESCOPE_NAMES.get(plan.telescope_name, plan.telescope_name))
        tb.putcell("TELESCOPE_LOCATION", 0, plan.telescope_location)
        tb.putcell("TIME_RANGE", 0, np.array([t_start, t_end]))
        tb.putcell("OBSERVER", 0, "contimg")
        tb.putcell("PROJECT", 0, "contimg")
        tb.putcell("RELEASE_DATE", 0, 0.0)
        tb.putcell("SCHEDULE_TYPE", 0, "")
        tb.putcell("LOG", 0, np.array([""]))
        tb.putcell("SCHEDULE", 0, np.array([""]))
        tb.putcell("FLAG_ROW", 0, False)

    with open_rw("STATE") as tb:
        tb.addrows(1)
        tb.putcell("SIG", 0, True)
        tb.putcell("REF", 0, False)
        tb.putcell("CAL", 0, 0.0)
        tb.putcell("LOAD", 0, 0.0)
        tb.putcell("SUB_SCAN", 0, 0)
        tb.putcell("OBS_MODE", 0, "OBSERVE_TARGET#ON_SOURCE")
        tb.putcell("FLAG_ROW", 0, False)
    with open_rw("PROCESSOR") as tb:
        tb.addrows(1)
        tb.putcell("TYPE", 0, "CORRELATOR")
        tb.putcell("SUB_TYPE", 0, plan.telescope_name)
        tb.putcell("TYPE_ID", 0, 0)
        tb.putcell("MODE_ID", 0, 0)
        tb.putcell("FLAG_ROW", 0, False)

    # POINTING: the dishes look at the phase centre of each integration (drift scan:
    # fixed az/el, not tracking), one row per antenna and integration.
    nptg = plan.nant * plan.ntime
    with open_rw("POINTING") as tb:
        tb.addrows(nptg)
        tb.putcol("ANTENNA_ID", np.tile(np.arange(plan.nant, dtype=np.int32), plan.ntime))
        ptime = np.repeat(plan.mjd, plan.nant)
        tb.putcol("TIME", ptime)
        tb.putcol("TIME_ORIGIN", ptime)
        tb.putcol("INTERVAL", np.full(nptg, plan.integration_time))
        tb.putcol("NAME", [""] * nptg)
        tb.putcol("NUM_POLY", np.zeros(nptg, dtype=np.int32))
        pdir = np.repeat(np.stack([plan.ra, plan.dec], axis=1), plan.nant, axis=0)[:, None, :]
        tb.putcol("DIRECTION", pdir)
        tb.putcol("TARGET", pdir)
        tb.putcol("TRACKING", np.zeros(nptg, dtype=bool))
        _set_direction_ref(tb, ("DIRECTION", "TARGET"))

    # HISTORY
    from contimg import __version__

    messages = [f"written by contimg {__version__} (contimg.io.ms.write_ms)"]
    src = plan.ds.attrs.get("source_files")
    if src:
        src = [src] if isinstance(src, str) else list(src)
        messages.append("source files: " + ", ".join(str(s) for s in src))
    if history:
        messages.extend([history] if isinstance(history, str) else [str(h) for h in history])
    now = _time.time() + MJD_UNIX_OFFSET_S
    with open_rw("HISTORY") as tb:
        n = len(messages)
        tb.addrows(n)
        tb.putcol("TIME", np.full(n, now))
        tb.putcol("OBSERVATION_ID", np.zeros(n, dtype=np.int32))
        tb.putcol("MESSAGE", messages)
        tb.putcol("PRIORITY", ["NORMAL"] * n)
        tb.putcol("ORIGIN", ["contimg.io.ms.write_ms"] * n)
        tb.putcol("OBJECT_ID", np.zeros(n, dtype=np.int32))
        tb.putcol("APPLICATION", ["contimg"] * n)
        for i in range(n):
            tb.putcell("CLI_COMMAND", i, np.array([""]))
            tb.putcell("APP_PARAMS", i, np.array([""]))


def single_block(arr):
    """The one chunk of a single-chunk dask array as a Delayed: computing it skips
    dask's finalize step, which copies the chunk (a whole subband) once more."""
    if arr.npartitions != 1:
        return arr
    return arr.to_delayed(optimize_graph=True).ravel()[0]


_VIS_COLUMNS = ("DATA", "MODEL_DATA", "CORRECTED_DATA")


def prepare_ms_block(vals: dict) -> dict:
    """Turn one computed block (contract conventions, ``(time, baseline, chan, pol)``)
    into what the MAIN table takes, off the writer's thread: visibilities conjugated
    (MS convention) into new arrays (never in place: a computed block may be a view of
    the caller's data), rows flattened, and this block's share of FLAG_ROW and of the
    WEIGHT sums."""
    if vals.get("_ms_ready"):
        return vals
    out = dict(vals)
    for name in _VIS_COLUMNS:
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


class _SubmittedBlock:
    """A block whose lazy columns were handed to ``submit``; ``result()`` gives the
    prepared numpy block (see :func:`prepare_ms_block`)."""

    def __init__(self, done, lazy, handle):
        self.done, self.lazy, self.handle = done, lazy, handle

    def result(self):
        vals = dict(self.done)
        if self.handle is not None:
            got = self.handle.result()
            if isinstance(got, dict):
                if got.get("_ms_ready") and self.done:
                    raise RuntimeError("submit returned a prepared block but some columns "
                                       "were not submitted")
                vals.update(got)
            else:
                vals.update({n: v for (n, _), v in zip(self.lazy, got, strict=True)})
        return prepare_ms_block(vals)

    def cancel(self):
        if self.handle is not None and hasattr(self.handle, "cancel"):
            self.handle.cancel()


def _write_main(ms, plan, submit=None, prefetch=1, flags=None):
    """Fill the MAIN table block by block; up to ``prefetch`` blocks are computed ahead.

    ``submit(named, block)`` (optional) starts computing ``named``, a list of
    ``(column, dask array)``, for block ``(ti, fi)`` and returns an object whose
    ``result()`` gives their numpy values as a list in that order, or a dict; the dict
    may already be prepared by :func:`prepare_ms_block` where it was computed (e.g. in a
    distributed task pinned to the worker that holds the block's file), which keeps the
    conjugation and row reductions off the writer's thread. The default computes one
    block ahead in a helper thread with ``dask.compute``, prepared there too.
    """
    import collections

    nbl, npol = plan.nbl, plan.npol
    a1 = plan.a1
    a2 = plan.a2
    blocks = list(plan.blocks())
    nf = len(plan.fchunks)
    with _futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ms-compute") as pool:
        if submit is None:
            def start(ti, fi):
                return pool.submit(plan.compute_block, ti, fi)
        else:
            def start(ti, fi):
                done, lazy = plan.split_block(ti, fi)
                handle = submit(lazy, (ti, fi)) if lazy else None
                return _SubmittedBlock(done, lazy, handle)
        pending = collections.deque(start(*b) for b in blocks[:max(1, prefetch)])
        nxt = len(pending)
        future = None
        try:
            flag_row = wsum = None
            for k, (ti, fi) in enumerate(blocks):
                future = pending.popleft()
                t_a = _time.perf_counter()
                vals = future.result()
                plan.wait_s += _time.perf_counter() - t_a
                future = None
                if nxt < len(blocks):
                    pending.append(start(*blocks[nxt]))
                    nxt += 1
                t0, t1 = int(plan.tstarts[ti]), int(plan.tstarts[ti + 1])
                c0, c1 = int(plan.fstarts[fi]), int(plan.fstarts[fi + 1])
                nt = t1 - t0
                r0, nr = t0 * nbl, nt * nbl
                if fi == 0:
                    _write_row_columns(ms, plan, t0, t1, vals["UVW"], a1, a2)
                    flag_row = np.ones(nr, dtype=bool)
                    wsum = np.zeros((nr, npol), dtype=np.float64)
                blc, trc = [c0, 0], [c1 - 1, npol - 1]
                for col in ("DATA", "WEIGHT_SPECTRUM") if flags else (
                        "DATA", "FLAG", "WEIGHT_SPECTRUM"):
                    ms.putcolslice(col, vals[col], blc, trc, startrow=r0, nrow=nr)
                flag_row &= vals["_flag_row"]
                wsum += vals["_wsum"]
                for col, how in plan.extra.items():
                    if how == "var":
                        arr = vals[col]
                    elif how == "copy":
                        arr = vals["DATA"]
                    else:  # unity: CASA clearcal's model (1 on parallel hands)
                        arr = np.zeros((nr, c1 - c0, npol), dtype=np.complex64)
                        for p, lab in enumerate(plan.pols):
                            if lab in ("XX", "YY", "RR", "LL", "I"):
                                arr[:, :, p] = 1.0
                    ms.putcolslice(col, arr, blc, trc, startrow=r0, nrow=nr)
                    del arr
                del vals
                if fi == nf - 1:
                    weight = (wsum / plan.nchan).astype(np.float32)
                    with np.errstate(divide="ignore"):
                        sigma = np.where(weight > 0, 1.0 / np.sqrt(weight), 0.0).astype(
                            np.float32)
                    ms.putcol("WEIGHT", weight, startrow=r0, nrow=nr)
                    ms.putcol("SIGMA", sigma, startrow=r0, nrow=nr)
                    if not flags:
                        ms.putcol("FLAG_ROW", flag_row, startrow=r0, nrow=nr)
                log.debug("wrote block time %d:%d chan %d:%d", t0, t1, c0, c1)
            if flags:
                _write_final_flags(ms, plan, flags)
        except BaseException:
            for fut in ([future] if future is not None else []) + list(pending):
                fut.cancel()
                try:
                    fut.result()
                except BaseException:  # noqa: BLE001 - the first error is the one raised
                    pass
            raise


def _write_final_flags(ms, plan, flags):
    """FLAG and FLAG_ROW from the final flag cube ``flags()``, block by block."""
    t_a = _time.perf_counter()
    cube = np.asarray(flags())
    plan.wait_s += _time.perf_counter() - t_a
    want = (plan.ntime, plan.nbl, plan.nchan, plan.npol)
    if cube.shape != want or cube.dtype != bool:
        raise ValueError(f"final flags: expected a bool array of shape {want}, got "
                         f"{cube.dtype} {cube.shape}")
    nbl, npol = plan.nbl, plan.npol
    for ti in range(len(plan.tchunks)):
        t0, t1 = int(plan.tstarts[ti]), int(plan.tstarts[ti + 1])
        r0, nr = t0 * nbl, (t1 - t0) * nbl
        for fi in range(len(plan.fchunks)):
            c0, c1 = int(plan.fstarts[fi]), int(plan.fstarts[fi + 1])
            blk = np.ascontiguousarray(cube[t0:t1, :, c0:c1, :]).reshape(nr, c1 - c0, npol)
            ms.putcolslice("FLAG", blk, [c0, 0], [c1 - 1, npol - 1], startrow=r0, nrow=nr)
        ms.putcol("FLAG_ROW", cube[t0:t1].all(axis=(2, 3)).reshape(nr), startrow=r0,
                  nrow=nr)


def _write_row_columns(ms, plan, t0, t1, uvw, a1, a2):
    nbl = plan.nbl
    nt = t1 - t0
    r0, nr = t0 * nbl, nt * nbl
    tcol = np.repeat(plan.mjd[t0:t1], nbl)
    ms.putcol("TIME", tcol, startrow=r0, nrow=nr)
    ms.putcol("TIME_CENTROID", tcol, startrow=r0, nrow=nr)
    ms.putcol("ANTENNA1", np.tile(a1, nt), startrow=r0, nrow=nr)
    ms.putcol("ANTENNA2", np.tile(a2, nt), startrow=r0, nrow=nr)
    ms.putcol("FIELD_ID", np.repeat(plan.field_of_time[t0:t1], nbl), startrow=r0, nrow=nr)
    interval = np.full(nr, plan.integration_time)
    ms.putcol("INTERVAL", interval, startrow=r0, nrow=nr)
    ms.putcol("EXPOSURE", interval, startrow=r0, nrow=nr)
    zeros = np.zeros(nr, dtype=np.int32)
    for col in ("FEED1", "FEED2", "DATA_DESC_ID", "ARRAY_ID", "OBSERVATION_ID",
                "PROCESSOR_ID", "STATE_ID"):
        ms.putcol(col, zeros, startrow=r0, nrow=nr)
    ms.putcol("SCAN_NUMBER", zeros + 1, startrow=r0, nrow=nr)
    ms.putcol("UVW", -np.asarray(uvw, dtype=np.float64).reshape(nr, 3), startrow=r0, nrow=nr)


def _warn_if_open(path):
    """Warn when this process still holds dask-ms handles on an MS being replaced.

    casacore caches open tables by name: a reader opened before the rename keeps
    seeing the old files, and so would a new ``casacore.tables.table(path)``.
    """
    try:
        from daskms.table_proxy import _table_cache
    except ImportError:  # pragma: no cover - private dask-ms detail
        return
    prefix = path.rstrip("/")
    for proxy in list(_table_cache.values()):
        if prefix in repr(proxy):
            log.warning("%s is open in this process (dask-ms); those readers keep seeing "
                        "the old MS, and casacore may serve it from its table cache. "
                        "Drop them before overwriting.", path)
            return


def write_ms(ds, path, *, overwrite=False, model_data=False, corrected_data=False,
             history=None, submit=None, prefetch=1, flags=None, stats=None):
    """Write a contract Dataset to a CASA Measurement Set at ``path``.

    Parameters
    ----------
    ds : xarray.Dataset
        A visibility Dataset following :mod:`contimg.schema` (numpy- or dask-backed).
        It is computed one (time chunk, frequency chunk) block at a time, in the
        Dataset's own dask chunks (numpy-backed: 48-channel, <=128 MiB blocks).
    path : str or os.PathLike
        Output MS directory.
    overwrite : bool
        Replace an existing ``path`` (only once the new MS is complete).
    model_data, corrected_data : bool or str
        Add MODEL_DATA / CORRECTED_DATA. ``True`` initialises them as CASA's
        ``clearcal`` does (MODEL_DATA = 1 on the parallel hands, CORRECTED_DATA =
        DATA); a string names a Dataset variable with the visibility dims to write.
    history : str or list of str, optional
        Extra HISTORY messages.
    submit : callable, optional
        ``submit(named, (ti, fi))`` starts computing one block's ``(column, dask
        array)`` list and returns an object with ``result()`` (see
        :func:`contimg.convert`, which pins a block's reads to the worker that holds
        its file, and :func:`_write_main`). Default: ``dask.compute`` in a thread.
    prefetch : int
        Blocks computed ahead of the one being written (memory: prefetch + 1 blocks).
    flags : callable, optional
        Called once the other columns are written; returns the final FLAG cube
        ``(time, baseline_id, frequency, polarization)`` (e.g. the result of a flagging
        graph that ran while the visibilities were being written), from which FLAG and
        FLAG_ROW are written instead of from ``ds.FLAG``.
    stats : dict, optional
        Filled with ``seconds`` (the whole write) and ``wait_s`` (of it, waiting for
        computed blocks).

    Returns
    -------
    str
        The path written.
    """
    from casacore import tables as ct

    path = os.path.abspath(os.fspath(path))
    schema.validate(ds, name=f"Dataset for {path}")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{path}: parent directory {parent} does not exist")
    plan = _Plan(ds, model_data, corrected_data)
    tmp = f"{path}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp, ignore_errors=True)

    t_begin = _time.perf_counter()
    ms = None
    try:
        desc, dminfo = _main_table_desc(plan)
        ms = ct.default_ms(tmp, desc, dminfo)
        ms.addrows(plan.nrow)
        ms.putkeyword(_ATTRS_KEYWORD, plan.attrs_json)
        _write_main(ms, plan, submit=submit, prefetch=prefetch, flags=flags)
        ms.flush()
        ms.close()
        ms = None
        _write_subtables(tmp, plan, history)
    except BaseException:
        if ms is not None:
            try:
                ms.close()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    # move into place: the old MS (if any) is only removed once the new one is there
    old = None
    if os.path.lexists(path):
        _warn_if_open(path)
        old = f"{path}.old-{os.getpid()}"
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if stats is not None:
        stats.update(seconds=_time.perf_counter() - t_begin, wait_s=plan.wait_s)
    log.info("wrote %s: %d rows x %d channels x %d correlations, %d field(s) in %.2f s "
             "(%.2f s of it waiting for data)", path, plan.nrow, plan.nchan, plan.npol,
             plan.nfield, _time.perf_counter() - t_begin, plan.wait_s)
    return path


# ---------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------


def _read_subtable(path, name, columns, optional=()):
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


def _direction_to_icrs(ra, dec, ref, path, column):
    """Convert directions in a casacore reference frame to ICRS (J2000/ICRS only)."""
    ref = (ref or "J2000").upper()
    if ref == "ICRS":
        return ra, dec
    if ref == "J2000":
        from astropy import units as u
        from astropy.coordinates import FK5, SkyCoord

        c = SkyCoord(ra * u.rad, dec * u.rad, frame=FK5(equinox="J2000")).icrs
        return c.ra.rad, c.dec.rad
    raise MSFormatError(f"{path}: {column} uses the {ref} frame; only J2000/ICRS "
                        "directions can be represented in the contract")


def open_ms(path, *, chunks=None, data_column="DATA"):
    """Open a Measurement Set lazily as a contract Dataset (through dask-ms).

    Parameters
    ----------
    path : str or os.PathLike
        The MS. It must use a single spectral window and polarization setup (a single
        DATA_DESC_ID in MAIN) and J2000/ICRS phase centres.
    chunks : dict, optional
        ``{"time": n, "frequency": m}``; defaults to 48 channels (one DSA-110 subband)
        per chunk and as many integrations as fit in ~128 MiB of visibilities.
    data_column : str
        The column read into ``VISIBILITY`` (``DATA``, ``CORRECTED_DATA``, ...).

    Notes
    -----
    Rows become ``(time, baseline_id)``: times are the distinct TIME values, baselines
    the distinct antenna pairs in order of first appearance (``antenna1 <=
    antenna2``; rows stored the other way
    round are conjugated, their UVW negated and cross-hands swapped). Missing
    (time, baseline) rows become zero visibilities, flagged, with zero weight and
    the UVW from :func:`compute_uvw`. The MS conjugation convention is undone (see the
    module docstring). Channels are sorted ascending.
    """
    import dask.array as da
    import xarray as xr
    from daskms import xds_from_ms

    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(os.path.join(path, "table.dat")):
        raise FileNotFoundError(f"{path}: not a casacore table (no table.dat)")
    chunks = dict(chunks or {})
    unknown = set(chunks) - {"time", "frequency"}
    if unknown:
        raise ValueError(f"chunks: unknown dimension(s) {sorted(unknown)} "
                         "(expected 'time' and/or 'frequency')")

    # --- row index (small columns) and the columns that hold data ---------------
    try:
        idx_ds, table_kw, proxy = xds_from_ms(
            path, columns=["TIME", "ANTENNA1", "ANTENNA2", "FIELD_ID", "DATA_DESC_ID",
                           "INTERVAL"],
            group_cols=[], index_cols=[], chunks={"row": 1 << 22},
            table_keywords=True, table_proxy=True)
        main_cols = set()
        present = set(proxy.colnames().result())
        for col in {data_column, "FLAG", "UVW", "WEIGHT_SPECTRUM", "WEIGHT",
                    "FLAG_ROW"} & present:
            try:  # a column "holds data" if its first cell is defined
                proxy.getcell(col, 0).result()
            except RuntimeError:
                continue
            main_cols.add(col)
    except Exception as exc:
        raise MSFormatError(f"{path}: cannot read the MAIN table ({exc})") from exc
    if len(idx_ds) != 1:
        raise MSFormatError(f"{path}: unexpected grouping of the MAIN table")
    idx = idx_ds[0].compute()
    time_col = np.asarray(idx["TIME"].values)
    ant1 = np.asarray(idx["ANTENNA1"].values).astype(np.int64)
    ant2 = np.asarray(idx["ANTENNA2"].values).astype(np.int64)
    field_col = np.asarray(idx["FIELD_ID"].values)
    ddid = np.unique(np.asarray(idx["DATA_DESC_ID"].values))
    nrow = time_col.size
    if nrow == 0:
        raise MSFormatError(f"{path}: the MAIN table has no rows")
    interval = float(np.asarray(idx["INTERVAL"].values)[0])
    if ddid.size != 1:
        raise MSFormatError(
            f"{path}: rows use {ddid.size} DATA_DESC_IDs {ddid.tolist()}; open_ms reads "
            "MSs with a single spectral window and polarization setup "
            "(split the MS per spectral window first)")
    ddid = int(ddid[0])

    # --- subtables -------------------------------------------------------------
    dd, _ = _read_subtable(path, "DATA_DESCRIPTION",
                           ["SPECTRAL_WINDOW_ID", "POLARIZATION_ID"])
    if ddid >= dd["SPECTRAL_WINDOW_ID"].size:
        raise MSFormatError(f"{path}: DATA_DESC_ID {ddid} has no DATA_DESCRIPTION row")
    spw_id = int(dd["SPECTRAL_WINDOW_ID"][ddid])
    pol_id = int(dd["POLARIZATION_ID"][ddid])
    spw, _ = _read_subtable(path, "SPECTRAL_WINDOW", ["CHAN_FREQ", "CHAN_WIDTH", "NUM_CHAN"])
    pol, _ = _read_subtable(path, "POLARIZATION", ["CORR_TYPE", "NUM_CORR"])
    freq_ms = np.asarray(spw["CHAN_FREQ"][spw_id], dtype=np.float64)
    chan_width = float(np.abs(np.asarray(spw["CHAN_WIDTH"][spw_id], dtype=np.float64))[0])
    corr_types = [int(c) for c in np.asarray(pol["CORR_TYPE"][pol_id]).ravel()]
    unknown_corr = [c for c in corr_types if c not in CORR_LABEL]
    if unknown_corr:
        raise MSFormatError(f"{path}: POLARIZATION row {pol_id} has correlation types "
                            f"{unknown_corr} that the contract does not know")
    pols = [CORR_LABEL[c] for c in corr_types]
    npol = len(pols)
    nchan = freq_ms.size
    chan_order = np.argsort(freq_ms, kind="stable")
    freq = freq_ms[chan_order]
    if nchan > 1 and not np.all(np.diff(freq) > 0):
        raise MSFormatError(f"{path}: SPECTRAL_WINDOW {spw_id} has repeated channel "
                            "frequencies")

    ant, _ = _read_subtable(path, "ANTENNA", ["NAME", "POSITION", "DISH_DIAMETER"],
                            optional=["ANTENNA_NUMBER"])
    ant_pos = np.asarray(ant["POSITION"], dtype=np.float64)
    nant = ant_pos.shape[0]
    ant_names = [str(n) for n in ant["NAME"]]
    ant_diam = np.asarray(ant["DISH_DIAMETER"], dtype=np.float64)
    ant_number = (np.asarray(ant["ANTENNA_NUMBER"], dtype=np.int32)
                  if "ANTENNA_NUMBER" in ant else np.arange(nant, dtype=np.int32))
    if ant1.size and (min(ant1.min(), ant2.min()) < 0 or max(ant1.max(), ant2.max()) >= nant):
        raise MSFormatError(f"{path}: ANTENNA1/ANTENNA2 index outside the ANTENNA "
                            f"table (0..{nant - 1})")

    field, fkw = _read_subtable(path, "FIELD", ["PHASE_DIR", "NAME"])
    phase_dir = np.asarray(field["PHASE_DIR"], dtype=np.float64)
    if phase_dir.ndim == 3 and phase_dir.shape[1] > 1:
        log.warning("%s: FIELD.PHASE_DIR has polynomial terms; using the constant term", path)
    phase_dir = phase_dir.reshape(phase_dir.shape[0], -1, 2)[:, 0, :]
    ref = fkw.get("PHASE_DIR", {}).get("MEASINFO", {}).get("Ref", "J2000")
    f_ra, f_dec = _direction_to_icrs(phase_dir[:, 0], phase_dir[:, 1], ref, path,
                                     "FIELD.PHASE_DIR")

    obs, _ = _read_subtable(path, "OBSERVATION", ["TELESCOPE_NAME"],
                            optional=["TELESCOPE_LOCATION"])
    tel_ms = str(obs["TELESCOPE_NAME"][0]) if "TELESCOPE_NAME" in obs and len(
        obs["TELESCOPE_NAME"]) else ""
    telescope_name = _FROM_MS_TELESCOPE.get(tel_ms, tel_ms)
    if "TELESCOPE_LOCATION" in obs and len(obs["TELESCOPE_LOCATION"]):
        telescope_location = np.asarray(obs["TELESCOPE_LOCATION"][0], dtype=float).ravel()
    else:
        telescope_location = ant_pos.mean(axis=0)

    # --- (time, baseline) index ------------------------------------------------
    times_mjd, t_index = np.unique(time_col, return_inverse=True)
    t_index = t_index.ravel()
    lo = np.minimum(ant1, ant2)
    hi = np.maximum(ant1, ant2)
    swapped = ant1 > ant2
    key = lo * (nant + 1) + hi
    # baselines in order of first appearance (the writer's Dataset order)
    bl_keys, bl_first, b_index = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(bl_first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    b_index = rank[b_index.ravel()]
    bl_keys = bl_keys[order]
    bl_a1 = (bl_keys // (nant + 1)).astype(np.int32)
    bl_a2 = (bl_keys % (nant + 1)).astype(np.int32)
    ntime, nbl = times_mjd.size, bl_keys.size
    pos = np.full(ntime * nbl, -1, dtype=np.int64)
    flat = t_index * nbl + b_index
    pos[flat] = np.arange(nrow)
    if np.unique(flat).size != nrow:
        raise MSFormatError(f"{path}: some (TIME, ANTENNA1, ANTENNA2) appear in more "
                            "than one row")
    missing = pos < 0
    fast = (not missing.any()) and (not swapped.any()) and np.array_equal(
        pos, np.arange(nrow))

    # phase centre per integration: the field of its first row
    first_row = np.full(ntime, nrow, dtype=np.int64)
    np.minimum.at(first_row, t_index, np.arange(nrow))
    fid = field_col[first_row]
    pc_ra, pc_dec = f_ra[fid], f_dec[fid]

    # --- chunking --------------------------------------------------------------
    fchunk = int(chunks.get("frequency", 48))
    fchunk = max(1, min(fchunk, nchan))
    if "time" in chunks:
        tchunk = int(chunks["time"])
    else:
        tchunk = _DEFAULT_BLOCK_BYTES // max(nbl * fchunk * npol * 8, 1)
    tchunk = max(1, min(tchunk, ntime))
    row_chunk = tchunk * nbl if fast else min(nrow, max(nbl, 1 << 16))

    # --- big columns, lazily ---------------------------------------------------
    for col in (data_column, "FLAG", "UVW"):
        if col not in main_cols:
            raise MSFormatError(f"{path}: no {col} column (with data) in the MAIN table")
    use_ws = "WEIGHT_SPECTRUM" in main_cols
    if not use_ws and "WEIGHT" not in main_cols:
        raise MSFormatError(f"{path}: neither WEIGHT_SPECTRUM nor WEIGHT holds data")
    cols = [data_column, "FLAG", "UVW", "WEIGHT_SPECTRUM" if use_ws else "WEIGHT"]
    if "FLAG_ROW" in main_cols:
        cols.append("FLAG_ROW")
    (main,) = xds_from_ms(path, columns=cols, group_cols=[], index_cols=[],
                          chunks={"row": row_chunk, "chan": fchunk, "corr": npol})
    data = main[data_column].data
    flag = main["FLAG"].data
    flag_row = main["FLAG_ROW"].data if "FLAG_ROW" in main else da.zeros(
        nrow, dtype=bool, chunks=data.chunks[0])
    if use_ws:
        weight = main["WEIGHT_SPECTRUM"].data
    else:
        w = main["WEIGHT"].data
        weight = da.broadcast_to(w[:, None, :], (nrow, nchan, npol),
                                 chunks=(w.chunks[0], data.chunks[1], (npol,)))
    uvw = main["UVW"].data
    if data.shape[1:] != (nchan, npol):
        raise MSFormatError(f"{path}: {data_column} cells have shape {data.shape[1:]}, "
                            f"expected (nchan={nchan}, ncorr={npol}) from the subtables")

    # MS convention -> contract convention (see module docstring)
    vis = da.conj(data).astype(np.complex64)
    uvw = -uvw.astype(np.float64)
    flag = flag.astype(bool) | flag_row.astype(bool)[:, None, None]
    weight = weight.astype(np.float32)
    if not np.array_equal(chan_order, np.arange(nchan)):
        if np.array_equal(chan_order, np.arange(nchan)[::-1]):
            vis, flag, weight = vis[:, ::-1], flag[:, ::-1], weight[:, ::-1]
        else:
            vis, flag, weight = (a[:, chan_order] for a in (vis, flag, weight))

    if fast:
        vis = vis.reshape(ntime, nbl, nchan, npol)
        flag = flag.reshape(ntime, nbl, nchan, npol)
        weight = weight.reshape(ntime, nbl, nchan, npol)
        uvw = uvw.reshape(ntime, nbl, 3)
    else:
        log.info("%s: rows are not a complete time-major grid (%d missing, %d swapped); "
                 "gathering", path, int(missing.sum()), int(swapped.sum()))
        src = np.where(missing, 0, pos)
        row_sw = swapped[src] & ~missing
        vis_sw = vis
        if row_sw.any():
            perm = [pols.index(p[::-1]) if (len(p) == 2 and p[::-1] in pols) else i
                    for i, p in enumerate(pols)]
            # a swapped row holds V21 = conj(V12) with cross-hands exchanged
            vis_sw = da.conj(vis)[:, :, perm]
        vis = vis[src]
        flag = flag[src]
        weight = weight[src]
        uvw = uvw[src]
        if row_sw.any():
            sw = da.from_array(row_sw, chunks=(vis.chunks[0],))
            vis = da.where(sw[:, None, None], vis_sw[src], vis)
            uvw = da.where(sw[:, None], -uvw, uvw)
        if missing.any():
            m = da.from_array(missing, chunks=(vis.chunks[0],))
            vis = da.where(m[:, None, None], np.complex64(0), vis)
            flag = da.where(m[:, None, None], True, flag)
            weight = da.where(m[:, None, None], np.float32(0), weight)
            fill = compute_uvw(ant_pos, bl_a1, bl_a2, times_mjd - MJD_UNIX_OFFSET_S,
                               pc_ra, pc_dec, telescope_location=telescope_location)
            uvw = da.where(m[:, None], fill.reshape(-1, 3), uvw)
        vis = vis.reshape(ntime, nbl, nchan, npol)
        flag = flag.reshape(ntime, nbl, nchan, npol)
        weight = weight.reshape(ntime, nbl, nchan, npol)
        uvw = uvw.reshape(ntime, nbl, 3)

    vchunks = (tchunk, nbl, fchunk, npol)
    vis = vis.rechunk(vchunks)
    flag = flag.rechunk(vchunks)
    weight = weight.rechunk(vchunks)
    uvw = uvw.rechunk((tchunk, nbl, 3))

    # --- attributes --------------------------------------------------------------
    attrs = {}
    if _ATTRS_KEYWORD in table_kw:
        try:
            attrs.update(json.loads(table_kw[_ATTRS_KEYWORD]))
        except (TypeError, ValueError):
            log.warning("%s: unreadable %s keyword ignored", path, _ATTRS_KEYWORD)
    attrs["telescope_name"] = telescope_name
    attrs["telescope_location"] = [float(x) for x in telescope_location]
    if "phase_center_dec" not in attrs and np.unique(pc_dec).size == 1:
        attrs["phase_center_dec"] = float(pc_dec[0])
    attrs.setdefault("source_files", [path])
    attrs.setdefault("visibility_convention", VISIBILITY_CONVENTION)
    attrs["ms_path"] = path

    times_unix = times_mjd - MJD_UNIX_OFFSET_S
    dims4 = schema.VIS_DIMS
    ds = xr.Dataset(
        data_vars={
            "VISIBILITY": (dims4, vis),
            "FLAG": (dims4, flag),
            "WEIGHT": (dims4, weight),
            "UVW": (schema.UVW_DIMS, uvw,
                    {"units": "m", "frame": "icrs", "convention": "x2 - x1"}),
            "PHASE_CENTER_RA": (("time",), np.asarray(pc_ra, dtype=np.float64),
                                {"units": "rad", "frame": "icrs"}),
            "PHASE_CENTER_DEC": (("time",), np.asarray(pc_dec, dtype=np.float64),
                                 {"units": "rad", "frame": "icrs"}),
            "ANTENNA_POSITION": (("antenna_id", "cartesian_pos_label"), ant_pos,
                                 {"units": "m", "frame": "ITRF"}),
            "ANTENNA_DISH_DIAMETER": (("antenna_id",), ant_diam, {"units": "m"}),
        },
        coords={
            "baseline_id": ("baseline_id", np.arange(nbl, dtype=np.int32)),
            "time": ("time", times_unix, {"units": "s", "scale": "utc", "format": "unix",
                                          "integration_time": interval}),
            "baseline_antenna1_id": ("baseline_id", bl_a1),
            "baseline_antenna2_id": ("baseline_id", bl_a2),
            "frequency": ("frequency", freq, {"units": "Hz", "channel_width": chan_width}),
            "polarization": ("polarization", np.asarray(pols)),
            "uvw_label": ("uvw_label", np.asarray(["u", "v", "w"])),
            "antenna_id": ("antenna_id", np.arange(nant, dtype=np.int32)),
            "antenna_name": ("antenna_id", np.asarray(ant_names)),
            "antenna_number": ("antenna_id", ant_number),
            "cartesian_pos_label": ("cartesian_pos_label", np.asarray(["x", "y", "z"])),
        },
        attrs=attrs,
    )
    schema.validate(ds, name=path)
    return ds
