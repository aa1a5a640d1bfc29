"""Opening a Measurement Set lazily (through dask-ms) as a contract Dataset.

:func:`open_ms` is a sequence of named steps: read the MAIN table's row index and find
the columns that hold data; the spectral window and polarization setup; the antenna,
field and observation subtables; the (time, baseline) grid of the rows; the phase
centre of each integration; the chunking; the big columns, lazily, turned into the
contract's conventions (and gathered onto the grid when the rows are not a complete
time-major grid); the attributes; and the Dataset, built by
:func:`graphs.contract.visibility_dataset`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from contimg.io.ms.common import (
    ATTRS_KEYWORD,
    CORR_LABEL,
    DEFAULT_BLOCK_BYTES,
    FROM_MS_TELESCOPE,
    MJD_UNIX_OFFSET_S,
    VISIBILITY_CONVENTION,
    MSFormatError,
    read_subtable,
)
from contimg.io.ms.fields import read_fields, resolve_field
from contimg.io.ms.measures import ms_conjugation, time_to_utc
from contimg.uvw import compute_uvw
from graphs import contract, scheduling

__all__ = ["open_ms"]

log = logging.getLogger(__name__)

#: MAIN columns open_ms may read besides the data column
_MAIN_COLUMNS = ("FLAG", "UVW", "WEIGHT_SPECTRUM", "WEIGHT", "FLAG_ROW")


@dataclass
class _MainIndex:
    """The small columns of MAIN, one value per row, and what the table holds."""

    time: np.ndarray       # MJD seconds
    ant1: np.ndarray       # int64
    ant2: np.ndarray
    field: np.ndarray
    ddid: int
    intervals: np.ndarray  # INTERVAL, seconds
    keywords: dict         # table keywords
    time_measinfo: dict    # TIME's MEASINFO (its reference)
    columns: set           # columns that hold data

    @property
    def nrow(self):
        return self.time.size


def _read_main_index(path, data_column):
    """The row index of MAIN (TIME, antennas, field, DATA_DESC_ID, INTERVAL) and the set
    of its columns that hold data (a column does if its first cell is defined)."""
    from daskms import xds_from_ms

    try:
        idx_ds, table_kw, proxy = xds_from_ms(
            path, columns=["TIME", "ANTENNA1", "ANTENNA2", "FIELD_ID", "DATA_DESC_ID",
                           "INTERVAL"],
            group_cols=[], index_cols=[], chunks={"row": 1 << 22},
            table_keywords=True, table_proxy=True)
        main_cols = set()
        time_measinfo = proxy.getcolkeywords("TIME").result().get("MEASINFO", {})
        present = set(proxy.colnames().result())
        for col in ({data_column, *_MAIN_COLUMNS} & present):
            try:
                proxy.getcell(col, 0).result()
            except RuntimeError:
                continue
            main_cols.add(col)
    except Exception as exc:
        raise MSFormatError(f"{path}: cannot read the MAIN table ({exc})") from exc
    if len(idx_ds) != 1:
        raise MSFormatError(f"{path}: unexpected grouping of the MAIN table")
    idx = scheduling.compute(idx_ds[0])[0]
    time_col = np.asarray(idx["TIME"].values)
    if time_col.size == 0:
        raise MSFormatError(f"{path}: the MAIN table has no rows")
    ddid = np.unique(np.asarray(idx["DATA_DESC_ID"].values))
    if ddid.size != 1:
        raise MSFormatError(
            f"{path}: rows use {ddid.size} DATA_DESC_IDs {ddid.tolist()}; open_ms reads "
            "MSs with a single spectral window and polarization setup "
            "(split the MS per spectral window first)")
    return _MainIndex(
        time=time_col,
        ant1=np.asarray(idx["ANTENNA1"].values).astype(np.int64),
        ant2=np.asarray(idx["ANTENNA2"].values).astype(np.int64),
        field=np.asarray(idx["FIELD_ID"].values),
        ddid=int(ddid[0]),
        intervals=np.asarray(idx["INTERVAL"].values, dtype=np.float64),
        keywords=table_kw,
        time_measinfo=time_measinfo,
        columns=main_cols)


@dataclass
class _Spectral:
    """The spectral window and polarization setup of the rows."""

    freq: np.ndarray         # ascending
    chan_order: np.ndarray   # MS channel of each ascending channel
    chan_width: float
    pols: list

    @property
    def nchan(self):
        return self.freq.size

    @property
    def npol(self):
        return len(self.pols)


def _spectral_setup(path, ddid):
    """Frequencies (sorted ascending), channel width and polarizations of ``ddid``."""
    dd, _ = read_subtable(path, "DATA_DESCRIPTION",
                           ["SPECTRAL_WINDOW_ID", "POLARIZATION_ID"])
    if ddid >= dd["SPECTRAL_WINDOW_ID"].size:
        raise MSFormatError(f"{path}: DATA_DESC_ID {ddid} has no DATA_DESCRIPTION row")
    spw_id = int(dd["SPECTRAL_WINDOW_ID"][ddid])
    pol_id = int(dd["POLARIZATION_ID"][ddid])
    spw, _ = read_subtable(path, "SPECTRAL_WINDOW", ["CHAN_FREQ", "CHAN_WIDTH", "NUM_CHAN"])
    pol, _ = read_subtable(path, "POLARIZATION", ["CORR_TYPE", "NUM_CORR"])
    freq_ms = np.asarray(spw["CHAN_FREQ"][spw_id], dtype=np.float64)
    chan_width = float(np.abs(np.asarray(spw["CHAN_WIDTH"][spw_id], dtype=np.float64))[0])
    corr_types = [int(c) for c in np.asarray(pol["CORR_TYPE"][pol_id]).ravel()]
    unknown_corr = [c for c in corr_types if c not in CORR_LABEL]
    if unknown_corr:
        raise MSFormatError(f"{path}: POLARIZATION row {pol_id} has correlation types "
                            f"{unknown_corr} that the contract does not know")
    chan_order = np.argsort(freq_ms, kind="stable")
    freq = freq_ms[chan_order]
    if freq.size > 1 and not np.all(np.diff(freq) > 0):
        raise MSFormatError(f"{path}: SPECTRAL_WINDOW {spw_id} has repeated channel "
                            "frequencies")
    return _Spectral(freq=freq, chan_order=chan_order, chan_width=chan_width,
                     pols=[CORR_LABEL[c] for c in corr_types])


def _antenna_table(path, index):
    """ANTENNA: positions, names, dish diameters and the source file's numbers."""
    ant, _ = read_subtable(path, "ANTENNA", ["NAME", "POSITION", "DISH_DIAMETER"],
                            optional=["ANTENNA_NUMBER"])
    pos = np.asarray(ant["POSITION"], dtype=np.float64)
    nant = pos.shape[0]
    a1, a2 = index.ant1, index.ant2
    if a1.size and (min(a1.min(), a2.min()) < 0 or max(a1.max(), a2.max()) >= nant):
        raise MSFormatError(f"{path}: ANTENNA1/ANTENNA2 index outside the ANTENNA "
                            f"table (0..{nant - 1})")
    return dict(
        antenna_position=pos,
        antenna_name=[str(n) for n in ant["NAME"]],
        antenna_dish_diameter=np.asarray(ant["DISH_DIAMETER"], dtype=np.float64),
        antenna_number=(np.asarray(ant["ANTENNA_NUMBER"], dtype=np.int32)
                        if "ANTENNA_NUMBER" in ant else np.arange(nant, dtype=np.int32)))


def _select_rows(path, index, field):
    """(MAIN rows to read or None for all, selected FIELD ids, FieldTable).

    Without ``field`` every row is read (as before) and a multi-field MS says which
    fields it holds."""
    fields = read_fields(path)
    used = np.unique(index.field)
    if (used < 0).any() or (used >= fields.nfield).any():
        raise MSFormatError(f"{path}: FIELD_ID outside the FIELD table "
                            f"(0..{fields.nfield - 1})")
    if field is None:
        if used.size > 1:
            log.info("%s: rows use %d fields (%s); reading them all (select one with "
                     "field=)", path, used.size, fields.describe())
        return None, used, fields
    ids = resolve_field(path, field, fields, used_ids=used)
    rows = np.flatnonzero(np.isin(index.field, ids))
    log.info("%s: field %r -> FIELD id(s) %s, %d of %d rows", path, field, ids.tolist(),
             rows.size, index.nrow)
    return rows, ids, fields


def _telescope(path, ant_pos):
    """(contract telescope name, ITRF location): OBSERVATION's, else the antennas' mean."""
    obs, _ = read_subtable(path, "OBSERVATION", ["TELESCOPE_NAME"],
                            optional=["TELESCOPE_LOCATION"])
    tel_ms = str(obs["TELESCOPE_NAME"][0]) if "TELESCOPE_NAME" in obs and len(
        obs["TELESCOPE_NAME"]) else ""
    if "TELESCOPE_LOCATION" in obs and len(obs["TELESCOPE_LOCATION"]):
        location = np.asarray(obs["TELESCOPE_LOCATION"][0], dtype=float).ravel()
    else:
        location = ant_pos.mean(axis=0)
    return FROM_MS_TELESCOPE.get(tel_ms, tel_ms), location


@dataclass
class _RowGrid:
    """Where each (time, baseline) cell of the Dataset is in MAIN."""

    times_mjd: np.ndarray   # distinct TIME values, ascending
    t_index: np.ndarray     # per selected row: its time
    rows: np.ndarray        # the selected MAIN rows
    bl_a1: np.ndarray       # per baseline (order of first appearance), a1 <= a2
    bl_a2: np.ndarray
    pos: np.ndarray         # (ntime * nbl,) row of each cell, -1 when missing
    swapped: np.ndarray     # per row: stored as (a2, a1)
    fast: bool              # rows are exactly the time-major grid, unswapped

    @property
    def ntime(self):
        return self.times_mjd.size

    @property
    def nbl(self):
        return self.bl_a1.size

    @property
    def missing(self):
        return self.pos < 0


def _row_grid(path, index, nant, rows=None):
    """Rows -> (time, baseline) cells: distinct times, baselines in order of first
    appearance (the writer's Dataset order). ``rows``: the MAIN rows to use (all when
    None); cells point at MAIN row numbers."""
    if rows is None:
        rows = np.arange(index.nrow)
    nrow = rows.size
    times_mjd, t_index = np.unique(index.time[rows], return_inverse=True)
    t_index = t_index.ravel()
    a1, a2 = index.ant1[rows], index.ant2[rows]
    lo = np.minimum(a1, a2)
    hi = np.maximum(a1, a2)
    key = lo * (nant + 1) + hi
    bl_keys, bl_first, b_index = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(bl_first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    b_index = rank[b_index.ravel()]
    bl_keys = bl_keys[order]
    nbl = bl_keys.size
    pos = np.full(times_mjd.size * nbl, -1, dtype=np.int64)
    flat = t_index * nbl + b_index
    pos[flat] = rows
    if np.unique(flat).size != nrow:
        raise MSFormatError(f"{path}: some (TIME, ANTENNA1, ANTENNA2) appear in more "
                            "than one row")
    swapped = index.ant1 > index.ant2
    fast = (not (pos < 0).any()) and (not swapped[rows].any()) and np.array_equal(
        pos, np.arange(index.nrow))
    return _RowGrid(times_mjd=times_mjd, t_index=t_index, rows=rows,
                    bl_a1=(bl_keys // (nant + 1)).astype(np.int32),
                    bl_a2=(bl_keys % (nant + 1)).astype(np.int32),
                    pos=pos, swapped=swapped, fast=fast)


def _phase_centres(grid, index, fields):
    """ICRS (ra, dec) and name per integration: the field of its first row."""
    first_row = np.full(grid.ntime, index.nrow, dtype=np.int64)
    np.minimum.at(first_row, grid.t_index, grid.rows)
    fid = index.field[first_row]
    return fields.ra[fid], fields.dec[fid], np.asarray(fields.name, dtype=object)[fid]


def _row_intervals(path, grid, index, interval):
    """INTEGRATION_TIME (time, baseline_id) when the rows' INTERVALs differ (baseline-
    dependent averaging), else None; missing cells get ``interval``."""
    vals = index.intervals[grid.rows]
    if np.allclose(vals, interval, rtol=1e-9, atol=0):
        return None
    cells = np.where(grid.pos >= 0, index.intervals[np.maximum(grid.pos, 0)], interval)
    log.info("%s: INTERVAL varies by row (%.6g-%.6g s): per-row INTEGRATION_TIME", path,
             vals.min(), vals.max())
    return cells.reshape(grid.ntime, grid.nbl)


def _chunking(chunks, grid, spec, nrow):
    """(integrations, channels, MAIN rows) per chunk."""
    fchunk = int(chunks.get("frequency", 48))
    fchunk = max(1, min(fchunk, spec.nchan))
    if "time" in chunks:
        tchunk = int(chunks["time"])
    else:
        tchunk = DEFAULT_BLOCK_BYTES // max(grid.nbl * fchunk * spec.npol * 8, 1)
    tchunk = max(1, min(tchunk, grid.ntime))
    row_chunk = tchunk * grid.nbl if grid.fast else min(nrow, max(grid.nbl, 1 << 16))
    return tchunk, fchunk, row_chunk


def _read_columns(path, index, data_column, spec, row_chunk, fchunk, conjugation="ms"):
    """The big columns per MAIN row, lazily, in the contract's conventions: visibilities
    conjugated, UVW negated (see :mod:`contimg.io.ms`) when the MS uses the "ms"
    convention (as they are for "pyuvdata"), FLAG_ROW folded into FLAG,
    WEIGHT broadcast when there is no WEIGHT_SPECTRUM, channels ascending."""
    import dask.array as da
    from daskms import xds_from_ms

    for col in (data_column, "FLAG", "UVW"):
        if col not in index.columns:
            raise MSFormatError(f"{path}: no {col} column (with data) in the MAIN table")
    use_ws = "WEIGHT_SPECTRUM" in index.columns
    if not use_ws and "WEIGHT" not in index.columns:
        raise MSFormatError(f"{path}: neither WEIGHT_SPECTRUM nor WEIGHT holds data")
    cols = [data_column, "FLAG", "UVW", "WEIGHT_SPECTRUM" if use_ws else "WEIGHT"]
    if "FLAG_ROW" in index.columns:
        cols.append("FLAG_ROW")
    nrow, nchan, npol = index.nrow, spec.nchan, spec.npol
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
    if data.shape[1:] != (nchan, npol):
        raise MSFormatError(f"{path}: {data_column} cells have shape {data.shape[1:]}, "
                            f"expected (nchan={nchan}, ncorr={npol}) from the subtables")

    if conjugation == "ms":
        vis = da.conj(data).astype(np.complex64)
        uvw = -main["UVW"].data.astype(np.float64)
    else:
        vis = data.astype(np.complex64)
        uvw = main["UVW"].data.astype(np.float64)
    flag = flag.astype(bool) | flag_row.astype(bool)[:, None, None]
    weight = weight.astype(np.float32)
    order = spec.chan_order
    if not np.array_equal(order, np.arange(nchan)):
        if np.array_equal(order, np.arange(nchan)[::-1]):
            vis, flag, weight = vis[:, ::-1], flag[:, ::-1], weight[:, ::-1]
        else:
            vis, flag, weight = (a[:, order] for a in (vis, flag, weight))
    return vis, flag, weight, uvw


def _gather(path, grid, rows, pols, fill_uvw):
    """Rows -> the complete grid of cells, when the rows are not already one: swapped
    rows unswapped (conjugated, cross-hands exchanged, UVW negated), missing cells zero,
    flagged, weight 0, UVW from ``fill_uvw()``."""
    import dask.array as da

    vis, flag, weight, uvw = rows
    missing, swapped = grid.missing, grid.swapped
    log.info("%s: rows are not a complete time-major grid (%d missing, %d swapped); "
             "gathering", path, int(missing.sum()), int(swapped.sum()))
    src = np.where(missing, 0, grid.pos)
    row_sw = swapped[src] & ~missing
    vis_sw = vis
    if row_sw.any():
        perm = [pols.index(p[::-1]) if (len(p) == 2 and p[::-1] in pols) else i
                for i, p in enumerate(pols)]
        # a swapped row holds V21 = conj(V12) with cross-hands exchanged
        vis_sw = da.conj(vis)[:, :, perm]
    vis, flag, weight, uvw = vis[src], flag[src], weight[src], uvw[src]
    if row_sw.any():
        sw = da.from_array(row_sw, chunks=(vis.chunks[0],))
        vis = da.where(sw[:, None, None], vis_sw[src], vis)
        uvw = da.where(sw[:, None], -uvw, uvw)
    if missing.any():
        m = da.from_array(missing, chunks=(vis.chunks[0],))
        vis = da.where(m[:, None, None], np.complex64(0), vis)
        flag = da.where(m[:, None, None], True, flag)
        weight = da.where(m[:, None, None], np.float32(0), weight)
        uvw = da.where(m[:, None], fill_uvw().reshape(-1, 3), uvw)
    return vis, flag, weight, uvw


def _contiguous(grid):
    """(first, end) when the cells are MAIN rows first..end-1 in order, unswapped."""
    pos = grid.pos
    if (pos < 0).any() or grid.swapped[grid.rows].any():
        return None
    if not np.array_equal(pos, np.arange(pos[0], pos[0] + pos.size)):
        return None
    return int(pos[0]), int(pos[0] + pos.size)


def _attrs(path, keywords, pc_dec):
    """Dataset attributes: those stored by :func:`write_ms` (if any), the pointing
    declination when every integration shares it, the source, the convention."""
    attrs = {}
    if ATTRS_KEYWORD in keywords:
        try:
            attrs.update(json.loads(keywords[ATTRS_KEYWORD]))
        except (TypeError, ValueError):
            log.warning("%s: unreadable %s keyword ignored", path, ATTRS_KEYWORD)
    if "phase_center_dec" not in attrs and np.unique(pc_dec).size == 1:
        attrs["phase_center_dec"] = float(pc_dec[0])
    attrs.setdefault("source_files", [path])
    attrs.setdefault("visibility_convention", VISIBILITY_CONVENTION)
    attrs["ms_path"] = path
    return attrs


def open_ms(path, *, chunks=None, data_column="DATA", field=None, conjugation="auto"):
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
    field : int or str, optional
        Read only the rows of this field: a FIELD id, or a name (all FIELD rows of
        that name); a string of digits is the id when no field has that name. An
        unknown field (or one without rows) raises :class:`UnknownFieldError` (a
        ``ValueError``) listing the MS's fields. Default: every row (a multi-field
        MS logs its fields); :func:`ms_fields` lists them.
    conjugation : {"auto", "ms", "pyuvdata"}
        The writer's baseline conjugation: "ms" (CASA's; pyuvdata >= 3 and
        :func:`write_ms` write it), "pyuvdata" (data stored as pyuvdata holds them, as
        pyuvdata 2.x wrote MSs), or "auto": detected as pyuvdata does (its
        ``pyuvdata_flip_conj`` keyword, else a pyuvdata HISTORY row means "pyuvdata",
        else "ms"; :func:`contimg.io.ms.measures.ms_conjugation`). The decision is
        the Dataset attribute ``ms_conjugation``.

    Notes
    -----
    Rows become ``(time, baseline_id)``: times are the distinct TIME values, baselines
    the distinct antenna pairs in order of first appearance (``antenna1 <=
    antenna2``; rows stored the other way
    round are conjugated, their UVW negated and cross-hands swapped). Missing
    (time, baseline) rows become zero visibilities, flagged, with zero weight and
    the UVW from :func:`compute_uvw`. The MS conjugation convention is undone (see the
    module docstring of :mod:`contimg.io.ms`). Channels are sorted ascending.
    TIME is converted to UTC from its column's measure reference (TAI, TT, ...) and
    phase centres to ICRS from FIELD's (:mod:`contimg.io.ms.measures`).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(os.path.join(path, "table.dat")):
        raise FileNotFoundError(f"{path}: not a casacore table (no table.dat)")
    chunks = dict(chunks or {})
    unknown = set(chunks) - {"time", "frequency"}
    if unknown:
        raise ValueError(f"chunks: unknown dimension(s) {sorted(unknown)} "
                         "(expected 'time' and/or 'frequency')")

    index = _read_main_index(path, data_column)
    spec = _spectral_setup(path, index.ddid)
    ants = _antenna_table(path, index)
    sel_rows, field_ids, fields = _select_rows(path, index, field)
    telescope_name, telescope_location = _telescope(path, ants["antenna_position"])
    grid = _row_grid(path, index, ants["antenna_position"].shape[0], sel_rows)
    pc_ra, pc_dec, pc_name = _phase_centres(grid, index, fields)
    times_unix = time_to_utc(grid.times_mjd, index.time_measinfo, path) - MJD_UNIX_OFFSET_S
    conj, why = ms_conjugation(path, index.keywords, conjugation)
    log.debug("%s: %s conjugation (%s)", path, conj, why)
    tchunk, fchunk, row_chunk = _chunking(chunks, grid, spec, index.nrow)
    span = None if grid.fast else _contiguous(grid)

    rows = _read_columns(path, index, data_column, spec, row_chunk, fchunk, conj)
    if span is not None:  # one field's rows in one run: a slice, not a gather
        rows = tuple(a[span[0]:span[1]] for a in rows)
    elif not grid.fast:
        rows = _gather(path, grid, rows, spec.pols, lambda: compute_uvw(
            ants["antenna_position"], grid.bl_a1, grid.bl_a2, times_unix, pc_ra, pc_dec,
            telescope_location=telescope_location))
    cube = (grid.ntime, grid.nbl, spec.nchan, spec.npol)
    vis, flag, weight = (a.reshape(cube).rechunk((tchunk, grid.nbl, fchunk, spec.npol),
                                                 method=scheduling.rechunk_method())
                         for a in rows[:3])
    uvw = rows[3].reshape(grid.ntime, grid.nbl, 3).rechunk((tchunk, grid.nbl, 3),
                                                           method=scheduling.rechunk_method())

    attrs = _attrs(path, index.keywords, pc_dec)
    attrs["ms_conjugation"] = conj
    if field is not None:
        attrs["ms_field_id"] = [int(i) for i in field_ids]
        attrs["ms_field_name"] = fields.name[int(field_ids[0])]
    else:
        attrs.pop("ms_field_id", None)
        attrs.pop("ms_field_name", None)
    interval = float(np.median(index.intervals[grid.rows]))
    row_interval = _row_intervals(path, grid, index, interval)
    ds = contract.visibility_dataset(
        vis=vis, flag=flag, weight=weight, uvw=uvw,
        time=times_unix, integration_time=interval,
        antenna1=grid.bl_a1, antenna2=grid.bl_a2,
        frequency=spec.freq, channel_width=spec.chan_width, polarizations=spec.pols,
        phase_center_ra=pc_ra, phase_center_dec=pc_dec, **ants,
        telescope_name=telescope_name, telescope_location=telescope_location,
        attrs=attrs, name=path)
    ds = ds.assign_coords(phase_center_name=("time", [str(n) for n in pc_name]))
    if row_interval is not None:
        ds["INTEGRATION_TIME"] = (("time", "baseline_id"), row_interval)
    return ds
