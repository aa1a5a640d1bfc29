"""UVH5 → lazy, dask-backed visibility Dataset (the contract in :mod:`graphs.contract`).

* :func:`read_header` reads and checks one file's header (small arrays only).
* :func:`open_any` opens either (a group or one file of any telescope);
  :func:`find_inputs` lists what ``contimg convert`` converts.
* :func:`open_uvh5` opens one file; :func:`open_group` opens the subband files of one
  DSA-110 group and validates them as a group (16 distinct subbands, same antennas,
  same times, contiguous frequencies); a missing subband is an error or, with
  ``allow_missing=True``, filled with fully flagged data.

Reads use h5py slices only (contiguous row ranges; never h5py fancy indexing); the
reordering of rows into (time, baseline) happens in memory, inside one chunk. Each
chunk is one subband along frequency (and, optionally, a block of integrations), so
memory grows with the chunk, not with the group. Any valid UVH5 is accepted: other
telescopes, other polarisation sets, ascending or descending channels, any
baseline-time order and conjugation, compressed datasets.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from contimg import telescope as tel  # noqa: E402
from contimg.io.uvh5_arrays import (  # noqa: E402  (the lazy arrays)
    _filled_arrays,
    _subband_arrays,
    _time_chunks,
)
from graphs import contract  # noqa: E402
from kernels.constants import SECONDS_PER_DAY, UNIX_JD0  # noqa: E402

log = logging.getLogger(__name__)


class UVH5Error(ValueError):
    """A UVH5 file (or a group of them) is unreadable or inconsistent; names the file.

    ``culprits``: the file(s) at fault, as data (the message may name a reference file
    too); a caller setting files aside uses these, never a search of the message."""

    def __init__(self, msg, *, culprits=()):
        super().__init__(msg)
        self.culprits = tuple(str(p) for p in culprits)


class GroupError(UVH5Error):
    """The files do not form a valid group."""


# ---------------------------------------------------------------------------------
# header
# ---------------------------------------------------------------------------------

@dataclass
class Header:
    path: str
    nblts: int
    nfreqs: int
    npols: int
    freqs: np.ndarray            # file order
    channel_width: float
    pols: list[str]
    times_unix: np.ndarray       # unique, ascending
    integration_time: float
    antenna_numbers: np.ndarray  # telescope antennas
    antenna_names: list[str]
    antenna_positions: np.ndarray  # absolute ITRF metres
    antenna_diameters: np.ndarray
    telescope_name: str
    telescope_location: np.ndarray
    bl_ant1: np.ndarray          # canonical baselines, antenna *indices*, a1 <= a2
    bl_ant2: np.ndarray
    row_index: np.ndarray        # (ntime, nbl) row of the file, -1 when absent
    conj: np.ndarray             # (ntime, nbl) bool: file has the baseline as (a2, a1)
    uvw: np.ndarray              # (ntime, nbl, 3) canonical orientation
    phase_center_ra: np.ndarray | None  # (ntime,) ICRS radians (None: not read)
    phase_center_dec: np.ndarray | None
    extra_keywords: dict = field(default_factory=dict)
    integration_times: np.ndarray | None = None  # (ntime, nbl) when rows differ
    phase_center_name: list | None = None  # (ntime,) catalogue names, None: unnamed
    spw_axis: bool = False       # old UVH5 layout (Nblts, 1, Nfreqs, Npols)
    vis_kind: str = "complex"    # "complex" or "compound"

    @property
    def ntime(self):
        return self.row_index.shape[0]

    @property
    def nbl(self):
        return self.row_index.shape[1]


def _str(x):
    if isinstance(x, bytes):
        return x.decode("utf8")
    if isinstance(x, np.ndarray) and x.shape == ():
        return _str(x[()])
    return str(x)


def _need(h, name, path):
    if name not in h:
        raise UVH5Error(f"{path}: missing Header/{name}")
    return h[name][()]


def read_header(path, *, phase_centres: bool = True) -> Header:
    """Read and check one UVH5 file's header; raise :class:`UVH5Error` naming the file.
    ``phase_centres=False`` skips the phase-centre catalogue (``open_group`` needs it
    from one file of the group only)."""
    path = str(path)
    if not os.path.exists(path):
        raise UVH5Error(f"{path}: no such file", culprits=[path])
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UVH5Error(f"{path}: cannot open as HDF5 (truncated or corrupt?): {exc}",
                        culprits=[path]) from None
    try:
        with f:
            return _read_header(f, path, phase_centres)
    except UVH5Error as exc:
        exc.culprits = exc.culprits or (path,)
        raise
    except (KeyError, OSError, ValueError, TypeError) as exc:
        raise UVH5Error(f"{path}: unreadable UVH5 header: {exc}", culprits=[path]) from None


def check_written(path, header: Header | None = None):
    """Raise :class:`UVH5Error` (the file its culprit) unless the data of ``path`` look
    completely written, as a correlator writes them: the header first, with the data
    datasets created at full shape (HDF5 allocates them; unwritten parts read as
    zeros), then the integrations in time order. So: every dataset's storage is
    allocated (each chunk of a chunked one) and lies inside the file, and the last
    integration does not read as all zeros (visibilities and sample counts both)."""
    path = str(path)
    h = header or read_header(path, phase_centres=False)
    try:
        size = os.path.getsize(path)
        with h5py.File(path, "r") as f:
            data = f["Data"]
            for name in ("visdata", "flags", "nsamples"):
                d = data[name]
                if d.chunks:
                    want = int(np.prod([-(-n // c) for n, c in zip(d.shape, d.chunks)]))
                    have = d.id.get_num_chunks()
                    if have < want:
                        raise UVH5Error(f"{path}: Data/{name} has {have} of its {want} "
                                        "chunks written: still being written?",
                                        culprits=[path])
                    continue
                end = (d.id.get_offset() or 0) + d.id.get_storage_size()
                if d.id.get_storage_size() < d.nbytes or end > size:
                    raise UVH5Error(f"{path}: Data/{name} needs {d.nbytes} bytes up to byte "
                                    f"{end} of a {size}-byte file: still being written?",
                                    culprits=[path])
            rows = h.row_index[-1]
            rows = rows[rows >= 0]
            if rows.size:
                r0, r1 = int(rows.min()), int(rows.max()) + 1
                vis, ns = data["visdata"][r0:r1], data["nsamples"][r0:r1]
                zero = (not np.any(ns) and not np.any(vis.view(np.uint8)))
                if zero:
                    raise UVH5Error(f"{path}: the last integration (rows {r0}:{r1}) reads "
                                    "as zeros: data still being written?", culprits=[path])
    except (OSError, KeyError) as exc:
        raise UVH5Error(f"{path}: cannot read its data: {exc}", culprits=[path]) from None


def _read_header(f, path, phase_centres=True) -> Header:
    if "Header" not in f:
        raise UVH5Error(f"{path}: not a UVH5 file (no 'Header' group)")
    h = f["Header"]
    for name in ("visdata", "flags", "nsamples"):
        if "Data" not in f or name not in f["Data"]:
            raise UVH5Error(f"{path}: missing Data/{name}")
    nblts = int(_need(h, "Nblts", path))
    nfreqs = int(_need(h, "Nfreqs", path))
    npols = int(_need(h, "Npols", path))
    vis = f["Data/visdata"]
    if vis.shape == (nblts, nfreqs, npols):
        spw_axis = False
    elif vis.shape == (nblts, 1, nfreqs, npols):
        spw_axis = True
    else:
        raise UVH5Error(f"{path}: Data/visdata has shape {vis.shape}, header says "
                        f"(Nblts, Nfreqs, Npols) = {(nblts, nfreqs, npols)}")
    for name in ("flags", "nsamples"):
        if f["Data"][name].shape != vis.shape:
            raise UVH5Error(f"{path}: Data/{name} has shape {f['Data'][name].shape}, "
                            f"expected {vis.shape}")
    if vis.dtype.kind == "c":
        vis_kind = "complex"
    elif vis.dtype.names and {"r", "i"} <= set(vis.dtype.names):
        vis_kind = "compound"
    else:
        raise UVH5Error(f"{path}: Data/visdata has unsupported dtype {vis.dtype}")

    freqs = np.asarray(_need(h, "freq_array", path), dtype=float).reshape(-1)
    if freqs.size != nfreqs:
        raise UVH5Error(f"{path}: freq_array has {freqs.size} values, Nfreqs = {nfreqs}")
    cw = np.abs(np.asarray(_need(h, "channel_width", path), dtype=float)).reshape(-1)
    channel_width = float(cw[0])
    if nfreqs > 1:
        d = np.diff(freqs)
        if not (np.all(d > 0) or np.all(d < 0)):
            raise UVH5Error(f"{path}: freq_array is not monotonic")
    pol_codes = np.asarray(_need(h, "polarization_array", path)).reshape(-1)
    try:
        pols = [tel.AIPS_POL[int(p)] for p in pol_codes]
    except KeyError:
        raise UVH5Error(f"{path}: unknown polarization codes {pol_codes.tolist()}") from None

    time_jd = np.asarray(_need(h, "time_array", path), dtype=float)
    ant1 = np.asarray(_need(h, "ant_1_array", path)).astype(np.int64)
    ant2 = np.asarray(_need(h, "ant_2_array", path)).astype(np.int64)
    uvw = np.asarray(_need(h, "uvw_array", path), dtype=float)
    for name, arr, shape in (("time_array", time_jd, (nblts,)), ("ant_1_array", ant1, (nblts,)),
                             ("ant_2_array", ant2, (nblts,)), ("uvw_array", uvw, (nblts, 3))):
        if arr.shape != shape:
            raise UVH5Error(f"{path}: Header/{name} has shape {arr.shape}, expected {shape}")
    if not np.all(np.isfinite(time_jd)):
        raise UVH5Error(f"{path}: Header/time_array has non-finite values")
    if not np.all(np.isfinite(uvw)):
        raise UVH5Error(f"{path}: Header/uvw_array has non-finite values")
    it = np.asarray(_need(h, "integration_time", path), dtype=float).reshape(-1)

    # telescope
    tname = _str(h["telescope_name"][()]) if "telescope_name" in h else "unknown"
    lat = float(_need(h, "latitude", path))
    lon = float(_need(h, "longitude", path))
    alt = float(_need(h, "altitude", path))
    loc = _geodetic_to_itrf(lat, lon, alt)
    ant_numbers = np.asarray(_need(h, "antenna_numbers", path)).astype(np.int64)
    ant_names = [_str(x) for x in _need(h, "antenna_names", path)]
    ant_pos = np.asarray(_need(h, "antenna_positions", path), dtype=float)
    if ant_pos.shape != (ant_numbers.size, 3) or len(ant_names) != ant_numbers.size:
        raise UVH5Error(f"{path}: antenna_numbers/antenna_names/antenna_positions disagree "
                        f"in length ({ant_numbers.size}, {len(ant_names)}, {ant_pos.shape})")
    if "antenna_diameters" in h:
        diam = np.asarray(h["antenna_diameters"][()], dtype=float).reshape(-1)
    else:
        diam = np.full(ant_numbers.size, tel.DISH_DIAMETER_M if "DSA" in tname.upper() else 0.0)

    index_of = {int(n): i for i, n in enumerate(ant_numbers)}
    unknown = set(np.unique(np.concatenate([ant1, ant2])).tolist()) - set(index_of)
    if unknown:
        raise UVH5Error(f"{path}: baselines use antennas {sorted(unknown)[:10]} that are not "
                        "in antenna_numbers")
    lut = np.full(int(ant_numbers.max()) + 1, -1, np.int64)
    lut[ant_numbers] = np.arange(ant_numbers.size)
    i1, i2 = lut[ant1], lut[ant2]
    conj_row = i1 > i2
    a = np.where(conj_row, i2, i1)
    b = np.where(conj_row, i1, i2)

    nant = ant_numbers.size
    ut, ukey, row_index, conj, uvw_c, t_idx = _row_layout(time_jd, a * nant + b, conj_row,
                                                          uvw, path)
    ntime = ut.size

    extra = {}
    if "extra_keywords" in h:
        for k, v in h["extra_keywords"].items():
            val = v[()]
            extra[k] = _str(val) if isinstance(val, bytes) else (
                val.item() if isinstance(val, np.generic) else val)

    if phase_centres:
        ra0, dec0, pc_name = _phase_centres(h, path, time_jd, t_idx, ntime, lat, lon, alt)
    else:
        ra0 = dec0 = pc_name = None
    integ = float(np.median(it))
    it_grid = None
    if it.size == nblts and not np.allclose(it, integ, rtol=1e-9, atol=0):
        # baseline-dependent averaging: keep every row's integration time
        it_grid = np.where(row_index >= 0, it[np.maximum(row_index, 0)], integ)
    return Header(
        path=path, nblts=nblts, nfreqs=nfreqs, npols=npols, freqs=freqs,
        channel_width=channel_width, pols=pols,
        times_unix=(ut - UNIX_JD0) * SECONDS_PER_DAY, integration_time=integ,
        antenna_numbers=ant_numbers, antenna_names=ant_names,
        antenna_positions=ant_pos + loc, antenna_diameters=diam,
        telescope_name=tname, telescope_location=loc,
        bl_ant1=(ukey // nant).astype(np.int32), bl_ant2=(ukey % nant).astype(np.int32),
        row_index=row_index, conj=conj, uvw=uvw_c,
        phase_center_ra=ra0, phase_center_dec=dec0, extra_keywords=extra,
        integration_times=it_grid, phase_center_name=pc_name,
        spw_axis=spw_axis, vis_kind=vis_kind,
    )


def _row_layout(time_jd, key, conj_row, uvw, path, fast=True):
    """Map rows to (time, baseline): unique times, unique baseline keys (ascending),
    ``row_index`` (ntime, nbl) (-1: absent), ``conj`` (ntime, nbl), ``uvw`` (ntime, nbl,
    3) with conjugated rows flipped, and each row's time index. DSA-110 files are
    time-major with the same ascending baseline order in every integration: that case is
    recognised in a few vectorised comparisons; any other layout takes the general path.
    """
    n = time_jd.size
    if fast and n:
        nbl = int(np.argmax(time_jd != time_jd[0])) or n
        if n % nbl == 0:
            T = time_jd.reshape(-1, nbl)
            K = key.reshape(-1, nbl)
            k0 = K[0]
            if (np.all(T == T[:, :1]) and np.all(np.diff(T[:, 0]) > 0)
                    and np.all(np.diff(k0) > 0) and np.all(K == k0)):
                ntime = n // nbl
                return (T[:, 0].copy(), k0.copy(), np.arange(n).reshape(ntime, nbl),
                        conj_row.reshape(ntime, nbl).copy(),
                        np.where(conj_row[:, None], -uvw, uvw).reshape(ntime, nbl, 3),
                        np.repeat(np.arange(ntime), nbl))
    ut, t_idx = np.unique(time_jd, return_inverse=True)
    ukey, bl_idx = np.unique(key, return_inverse=True)
    ntime, nbl = ut.size, ukey.size
    row_index = np.full((ntime, nbl), -1, np.int64)
    flat = t_idx * nbl + bl_idx
    if np.unique(flat).size != flat.size:
        raise UVH5Error(f"{path}: duplicate (time, baseline) rows in the file")
    row_index.reshape(-1)[flat] = np.arange(n)
    conj = np.zeros((ntime, nbl), bool)
    conj.reshape(-1)[flat] = conj_row
    uvw_c = np.zeros((ntime, nbl, 3))
    uvw_c.reshape(-1, 3)[flat] = np.where(conj_row[:, None], -uvw, uvw)
    return ut, ukey, row_index, conj, uvw_c, t_idx


def _geodetic_to_itrf(lat_deg, lon_deg, alt_m):
    return np.array(_itrf_cached(lat_deg, lon_deg, alt_m))


@functools.lru_cache(maxsize=64)
def _itrf_cached(lat_deg, lon_deg, alt_m):
    from astropy import units as u
    from astropy.coordinates import EarthLocation

    loc = EarthLocation.from_geodetic(lon_deg * u.deg, lat_deg * u.deg, alt_m * u.m)
    return (loc.x.to_value(u.m), loc.y.to_value(u.m), loc.z.to_value(u.m))


def _phase_centres(h, path, time_jd, t_idx, ntime, lat, lon, alt):
    """Per-integration ICRS phase centre (radians) and name (None when unnamed)."""
    first_row = np.zeros(ntime, np.int64)
    first_row[t_idx[::-1]] = np.arange(t_idx.size)[::-1]
    if "phase_center_catalog" in h and "phase_center_id_array" in h:
        ids = np.asarray(h["phase_center_id_array"][()])[first_row]
        cat = {}
        pcc = h["phase_center_catalog"]
        wanted = {int(i) for i in np.unique(ids)}
        for key in pcc:
            if int(key) in wanted:   # only the fields we use (big catalogs are slow to read)
                grp = pcc[key]
                cat[int(key)] = {k: grp[k][()] for k in
                                 ("cat_type", "cat_frame", "cat_lon", "cat_lat", "cat_name")
                                 if k in grp}
        ra = np.zeros(ntime)
        dec = np.zeros(ntime)
        todo = np.zeros(ntime, bool)
        names = []
        for i, cid in enumerate(ids):
            entry = cat.get(int(cid))
            if entry is None:
                raise UVH5Error(f"{path}: phase_center_id {cid} not in phase_center_catalog")
            names.append(_str(entry["cat_name"]) if "cat_name" in entry else "")
            ctype = _str(entry.get("cat_type", b"sidereal"))
            frame = _str(entry.get("cat_frame", b"icrs")).lower()
            if ctype == "sidereal" and frame == "icrs":
                ra[i], dec[i] = float(entry["cat_lon"]), float(entry["cat_lat"])
            else:
                todo[i] = True
        if todo.any():
            if "phase_center_app_ra" not in h:
                raise UVH5Error(f"{path}: phase centre not in ICRS and no apparent coordinates")
            app_ra = np.asarray(h["phase_center_app_ra"][()])[first_row]
            app_dec = np.asarray(h["phase_center_app_dec"][()])[first_row]
            r, d = _app_to_icrs(time_jd[first_row][todo], app_ra[todo], app_dec[todo],
                                lat, lon, alt)
            ra[todo], dec[todo] = r, d
        return ra, dec, (names if any(names) else None)
    # UVH5 < 1.0: phase_type "drift" (zenith) or "phased" (one phase centre)
    ptype = _str(h["phase_type"][()]) if "phase_type" in h else "drift"
    if ptype == "phased":
        ra = np.full(ntime, float(h["phase_center_ra"][()]))
        dec = np.full(ntime, float(h["phase_center_dec"][()]))
        name = _str(h["object_name"][()]) if "object_name" in h else ""
        return ra, dec, ([name] * ntime if name else None)
    from astropy import units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.time import Time

    loc = EarthLocation.from_geodetic(lon * u.deg, lat * u.deg, alt * u.m)
    t = Time(time_jd[first_row], format="jd", scale="utc")
    zen = SkyCoord(alt=np.full(ntime, 90.0) * u.deg, az=np.zeros(ntime) * u.deg,
                   frame=AltAz(obstime=t, location=loc)).icrs
    return zen.ra.rad, zen.dec.rad, None


def _app_to_icrs(time_jd, app_ra, app_dec, lat, lon, alt):
    from astropy import units as u
    from astropy.coordinates import EarthLocation
    from pyuvdata.utils import phasing

    loc = EarthLocation.from_geodetic(lon * u.deg, lat * u.deg, alt * u.m)
    ra, dec = phasing.calc_sidereal_coords(time_array=time_jd, app_ra=app_ra,
                                           app_dec=app_dec, telescope_loc=loc,
                                           coord_frame="icrs")
    return np.asarray(ra, float).reshape(-1), np.asarray(dec, float).reshape(-1)


def _token(headers):
    import hashlib

    hsh = hashlib.sha1()
    for h in headers:
        st = os.stat(h.path)
        hsh.update(f"{os.path.abspath(h.path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return hsh.hexdigest()[:12]


def _build_dataset(ref: Header, parts, freqs_asc, files, extra_attrs):
    vis = da.concatenate([p["VISIBILITY"] for p in parts], axis=2)
    attrs = dict(source_files=[str(f) for f in files], **extra_attrs)
    if "phase_center_dec" in ref.extra_keywords:
        attrs["phase_center_dec"] = float(ref.extra_keywords["phase_center_dec"])
    flag = da.concatenate([p["FLAG"] for p in parts], axis=2)
    weight = da.concatenate([p["WEIGHT"] for p in parts], axis=2)
    # negative nsamples (a writer's fault): flagged, weight 0 (the read warns)
    neg = weight < 0
    flag, weight = flag | neg, da.where(neg, np.float32(0), weight)
    ds = contract.visibility_dataset(
        vis=vis, flag=flag, weight=weight,
        uvw=da.from_array(ref.uvw, chunks=(vis.chunks[0][0], ref.nbl, 3)),
        time=ref.times_unix, integration_time=ref.integration_time,
        antenna1=ref.bl_ant1, antenna2=ref.bl_ant2,
        frequency=freqs_asc, channel_width=ref.channel_width, polarizations=ref.pols,
        phase_center_ra=ref.phase_center_ra, phase_center_dec=ref.phase_center_dec,
        antenna_position=ref.antenna_positions, antenna_dish_diameter=ref.antenna_diameters,
        antenna_name=ref.antenna_names, antenna_number=ref.antenna_numbers,
        telescope_name=ref.telescope_name, telescope_location=ref.telescope_location,
        attrs=attrs,
        name=", ".join(os.path.basename(str(f)) for f in files[:2])
        + (" ..." if len(files) > 2 else ""))
    if ref.phase_center_name is not None:
        ds = ds.assign_coords(phase_center_name=("time", list(ref.phase_center_name)))
    if ref.integration_times is not None:
        ds["INTEGRATION_TIME"] = (("time", "baseline_id"), da.from_array(
            ref.integration_times, chunks=(vis.chunks[0], ref.nbl)))
    return ds


def open_uvh5(path, *, chunks=None) -> xr.Dataset:
    """Open one UVH5 file (any telescope) as a lazy contract Dataset (frequency
    ascending; telescope, antennas and phase centres from the file).
    ``chunks={"time": n, "frequency": m}``; default: the whole file per chunk;
    ``{"block_bytes": b}`` instead of "time": as many integrations per chunk as keep its
    visibilities within b bytes (equal chunks)."""
    h = read_header(path)
    fc = (chunks or {}).get("frequency") if isinstance(chunks, dict) else None
    fc = h.nfreqs if fc in (None, -1) else max(1, min(int(fc), h.nfreqs))
    tc = _time_chunks(h.ntime, chunks, h.nbl * fc * h.npols * 8)
    part = _subband_arrays(h, tc, Path(path).stem, _token([h]), fc)
    freqs = np.sort(h.freqs)
    nfc = -(-h.nfreqs // fc)
    return _build_dataset(h, [part], freqs, [path], {"chunk_files": [str(path)] * nfc})


def is_subband_file(path) -> bool:
    """Whether ``path``'s name is a DSA-110 subband file name."""
    try:
        tel.parse_subband_filename(path)
    except ValueError:
        return False
    return True


#: file name endings :func:`open_any` and :func:`find_inputs` take as UVH5
UVH5_SUFFIXES = (".uvh5", ".hdf5", ".h5")


def open_any(path_or_paths, *, chunks=None, n_subbands: int = tel.N_SUBBANDS,
             allow_missing: bool = False, **group_kw) -> xr.Dataset:
    """Open UVH5 data of any telescope: a DSA-110 group (a directory holding one, or
    several subband files) through :func:`open_group`, one file (of any name, any
    telescope; also a single DSA-110 subband) through :func:`open_uvh5`.

    A directory without subband files must hold exactly one UVH5 file
    (``*.uvh5``, ``*.hdf5``, ``*.h5``). Several files that are not the subbands of one
    group raise :class:`UVH5Error` (open them one at a time). ``n_subbands``,
    ``allow_missing`` and ``group_kw`` apply to groups only."""
    if isinstance(path_or_paths, (str, os.PathLike)):
        p = Path(path_or_paths)
        if p.is_dir():
            if any(is_subband_file(x) for x in p.glob("*_sb??.hdf5")):
                return open_group(p, n_subbands=n_subbands, allow_missing=allow_missing,
                                  chunks=chunks, **group_kw)
            found = sorted(x for x in p.iterdir() if x.suffix.lower() in UVH5_SUFFIXES)
            if len(found) != 1:
                raise UVH5Error(f"{p}: neither a DSA-110 subband group nor a directory "
                                f"with one UVH5 file ({len(found)} UVH5 files)")
            return open_uvh5(found[0], chunks=chunks)
        files = [str(p)]
    else:
        files = [str(x) for x in path_or_paths]
    if not files:
        raise UVH5Error("open_any: no files given")
    if len(files) == 1:
        if not os.path.exists(files[0]):
            raise UVH5Error(f"{files[0]}: no such file", culprits=files)
        return open_uvh5(files[0], chunks=chunks)
    odd = [f for f in files if not is_subband_file(f)]
    if odd:
        raise UVH5Error(f"{odd[0]}: several files that are not the DSA-110 subbands of one "
                        "group (YYYY-MM-DDTHH:MM:SS_sbNN.hdf5); open them one at a time",
                        culprits=odd)
    return open_group(files, n_subbands=n_subbands, allow_missing=allow_missing,
                      chunks=chunks, **group_kw)


def find_inputs(inputs, tolerance_s: float = tel.GROUP_TOLERANCE_S) -> list[list[str]]:
    """Directories and files -> units to convert: DSA-110 groups (subband files grouped
    by file-name timestamp, as :func:`find_groups` does) and, each on its own, every
    other UVH5 file (any telescope; in a directory: ``*.uvh5``, ``*.hdf5``, ``*.h5``)."""
    subbands, singles = [], []
    for item in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs):
        p = Path(item)
        if p.is_dir():
            for x in sorted(p.iterdir()):
                if not (x.is_file() and x.suffix.lower() in UVH5_SUFFIXES):
                    continue
                if is_subband_file(x):
                    subbands.append(str(x))
                elif re.search(r"_sb\d+\.hdf5$", x.name):
                    # a DSA-110 subband name gone wrong: not converted on its own
                    log.warning("ignoring %s: not a valid subband file name", x)
                else:
                    singles.append(str(x))
        elif p.exists():
            (subbands if is_subband_file(p) else singles).append(str(p))
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    subbands.sort(key=lambda f: tel.parse_subband_filename(f).timestamp)
    groups: list[list[str]] = []
    start = None
    for f in subbands:
        ts = tel.parse_subband_filename(f).timestamp
        if groups and (ts - start).total_seconds() <= tolerance_s:
            groups[-1].append(f)
        else:
            groups.append([f])
            start = ts
    return groups + [[f] for f in singles]


def product_stem(files) -> str:
    """The name of what a unit of :func:`find_inputs` becomes: a group's earliest
    file-name timestamp, a single non-DSA-110 file's stem."""
    files = [str(f) for f in files]
    if all(is_subband_file(f) for f in files):
        return min(tel.parse_subband_filename(f).stamp for f in files)
    if len(files) == 1:
        return Path(files[0]).stem
    raise UVH5Error(f"{files[0]}: not the DSA-110 subbands of one group", culprits=files)


# ---------------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------------

def _list_files(paths):
    if isinstance(paths, (str, os.PathLike)):
        p = Path(paths)
        if p.is_dir():
            return sorted(str(x) for x in p.glob("*_sb??.hdf5"))
        return [str(p)]
    return [str(p) for p in paths]


def find_groups(directory, tolerance_s: float = tel.GROUP_TOLERANCE_S) -> list[list[str]]:
    """Group the subband files of a directory by file-name timestamp (±tolerance)."""
    items = []
    for p in sorted(Path(directory).glob("*.hdf5")):
        try:
            items.append((tel.parse_subband_filename(p.name), str(p)))
        except ValueError:
            log.warning("ignoring %s: not a subband file name", p)
    items.sort(key=lambda x: x[0].timestamp)
    groups: list[list] = []
    for name, p in items:
        if groups and (name.timestamp - groups[-1][0][0].timestamp).total_seconds() <= tolerance_s:
            groups[-1].append((name, p))
        else:
            groups.append([(name, p)])
    return [[p for _, p in g] for g in groups]


def open_group(paths, *, n_subbands: int = tel.N_SUBBANDS, allow_missing: bool = False,
               time_tolerance_s: float = 1.0, name_tolerance_s: float = tel.GROUP_TOLERANCE_S,
               chunks=None) -> xr.Dataset:
    """Open the subband files of one DSA-110 group as one lazy contract Dataset.

    ``paths``: a list of files or a directory holding one group. Validates: file names
    (``YYYY-MM-DDTHH:MM:SS_sbNN.hdf5``, timestamps within ``name_tolerance_s``),
    distinct subbands ``00..n_subbands-1``, the same antennas and baselines, the same
    integration times (within ``time_tolerance_s``), the same polarisations, and
    contiguous frequencies in the order the subband numbers imply. A missing subband
    raises :class:`GroupError`, or with ``allow_missing=True`` is filled with fully
    flagged zeros (``ds.attrs["missing_subbands"]`` lists them).
    ``chunks={"time": n}`` splits each subband into blocks of n integrations;
    ``chunks={"block_bytes": b}`` into the fewest equal blocks of at most b bytes of
    visibilities each (at least one integration), whatever the number of baselines.
    """
    files = _list_files(paths)
    if not files:
        raise GroupError(f"{paths}: no subband files")
    names = {}
    for p in files:
        try:
            nm = tel.parse_subband_filename(p)
        except ValueError as exc:
            raise GroupError(str(exc)) from None
        if nm.subband >= n_subbands:
            raise GroupError(f"{p}: subband {nm.subband:02d} outside 00..{n_subbands - 1:02d}",
                             culprits=[p])
        if nm.subband in names:
            raise GroupError(f"{p}: duplicate subband sb{nm.subband:02d} "
                             f"(also {names[nm.subband][1]})", culprits=[p])
        names[nm.subband] = (nm, p)
    stamps = [nm.timestamp for nm, _ in names.values()]
    spread = (max(stamps) - min(stamps)).total_seconds()
    if spread > 2 * name_tolerance_s:
        # the culprit is the file farthest from the group's median timestamp
        mid = sorted(stamps)[len(stamps) // 2]
        odd = max(names.values(), key=lambda x: abs((x[0].timestamp - mid).total_seconds()))
        near = min(names.values(), key=lambda x: abs((x[0].timestamp - mid).total_seconds()))
        gap = abs((odd[0].timestamp - mid).total_seconds())
        raise GroupError(f"{odd[1]}: timestamp is {gap:.0f} s from {near[1]}; files of one "
                         f"group differ by at most ±{name_tolerance_s:.0f} s",
                         culprits=[odd[1]])
    missing = sorted(set(range(n_subbands)) - set(names))
    if missing and not allow_missing:
        raise GroupError(f"{Path(files[0]).parent}: group {min(stamps):%Y-%m-%dT%H:%M:%S} is "
                         f"missing subband(s) {', '.join(f'sb{m:02d}' for m in missing)}")

    headers = {}
    for sb, (_, p) in sorted(names.items()):
        h = read_header(p, phase_centres=sb == min(names))
        if sb != min(names):
            # only the reference's UVW is used (a reference other than the first is read
            # again below): not 16 copies of (time, baseline, 3) float64 held at once
            h.uvw = None
        headers[sb] = h
    # the reference is the header most others agree with: an inconsistent file is the
    # culprit, never the good file it was compared with (a lone sb00 with the wrong
    # channel count must not cost the group its 15 good subbands)
    ref_sb = _reference(headers, time_tolerance_s)
    ref = headers[ref_sb]
    for sb, h in headers.items():
        why = _disagreement(ref, ref_sb, h, sb, time_tolerance_s)
        if why:
            raise GroupError(why, culprits=[h.path])
    if ref_sb != min(names):         # (tolerances are not transitive) with its centres
        ref = read_header(ref.path)
    nchan = ref.nfreqs
    cw = ref.channel_width
    t_ref = np.max(ref.freqs) + ref_sb * nchan * cw   # implied top-of-band channel centre

    tc = _time_chunks(ref.ntime, chunks, ref.nbl * nchan * ref.npols * 8)
    token = _token(list(headers.values()))
    parts, freqs = [], []
    for sb in range(n_subbands - 1, -1, -1):     # ascending frequency: highest sb first
        fs = t_ref - (sb * nchan + np.arange(nchan)[::-1]) * cw
        if sb in headers:
            parts.append(_subband_arrays(headers[sb], tc, f"sb{sb:02d}", token))
            fs = np.sort(headers[sb].freqs)
        else:
            parts.append(_filled_arrays(ref.ntime, ref.nbl, nchan, ref.npols, tc,
                                        f"sb{sb:02d}", token))
        freqs.append(fs)
    # which file each frequency chunk reads (ascending order; "" = filled, no file)
    chunk_files = [headers[sb].path if sb in headers else ""
                   for sb in range(n_subbands - 1, -1, -1)]
    extra = {"n_subbands": n_subbands, "missing_subbands": missing, "chunk_files": chunk_files,
             "group_start": f"{min(stamps):%Y-%m-%dT%H:%M:%S}"}
    if missing:
        log.warning("group %s: filling missing subband(s) %s with flagged data",
                    extra["group_start"], missing)
    return _build_dataset(ref, parts, np.concatenate(freqs),
                          [headers[sb].path for sb in sorted(headers)], extra)


def _reference(headers: dict, tol: float) -> int:
    """The subband whose header agrees with the most others (ties: the lowest)."""
    sbs = sorted(headers)
    first = sbs[0]
    if all(_disagreement(headers[first], first, headers[s], s, tol) is None for s in sbs):
        return first
    votes = {a: sum(_disagreement(headers[a], a, headers[b], b, tol) is None for b in sbs)
             for a in sbs}
    return max(sbs, key=lambda a: (votes[a], -a))


def _disagreement(ref: Header, ref_sb: int, h: Header, sb: int, tol: float) -> str | None:
    """Why ``h`` (subband ``sb``) cannot join a group with ``ref``; None if it can. The
    message names ``h`` first (the culprit) and ``ref`` as the reference."""
    if h is not ref:
        try:
            _check_same(ref, h, tol)
        except GroupError as exc:
            return str(exc)
    nchan, cw = ref.nfreqs, ref.channel_width
    if h.nfreqs != nchan:
        return f"{h.path}: {h.nfreqs} channels, {ref.path} has {nchan}"
    if abs(h.channel_width - cw) > 1e-6 * cw:
        return f"{h.path}: channel width {h.channel_width} Hz differs from {cw} Hz in {ref.path}"
    fs = np.sort(h.freqs)
    if nchan > 1 and not np.allclose(np.diff(fs), cw, rtol=1e-6):
        return f"{h.path}: channels are not spaced by the channel width"
    # implied top-of-band channel centre (channel 0 of sb00): sb00 is the highest subband
    if abs((fs[-1] + sb * nchan * cw) - (np.max(ref.freqs) + ref_sb * nchan * cw)) > 0.01 * cw:
        return (f"{h.path}: frequencies {fs[0] / 1e6:.4f}-{fs[-1] / 1e6:.4f} MHz are not "
                f"contiguous with {ref.path} for subband sb{sb:02d} (sb00 is the highest "
                "subband)")
    return None


def _check_same(ref: Header, h: Header, tol: float):
    if (ref.antenna_numbers.size != h.antenna_numbers.size
            or not np.array_equal(ref.antenna_numbers, h.antenna_numbers)
            or list(ref.antenna_names) != list(h.antenna_names)):
        raise GroupError(f"{h.path}: antennas differ from {ref.path}")
    if not np.allclose(ref.antenna_positions, h.antenna_positions, atol=1e-3, rtol=0):
        raise GroupError(f"{h.path}: antenna positions differ from {ref.path} by more than 1 mm")
    if not (np.array_equal(ref.bl_ant1, h.bl_ant1) and np.array_equal(ref.bl_ant2, h.bl_ant2)):
        raise GroupError(f"{h.path}: baselines differ from {ref.path}")
    if ref.times_unix.size != h.times_unix.size:
        raise GroupError(f"{h.path}: {h.times_unix.size} integrations, {ref.path} has "
                         f"{ref.times_unix.size}")
    dt = np.max(np.abs(ref.times_unix - h.times_unix))
    if dt > tol:
        raise GroupError(f"{h.path}: integration times differ from {ref.path} by up to "
                         f"{dt:.3f} s (tolerance {tol} s)")
    if ref.pols != h.pols:
        raise GroupError(f"{h.path}: polarizations {h.pols} differ from {ref.pols} in {ref.path}")
    if not np.array_equal(ref.row_index >= 0, h.row_index >= 0):
        raise GroupError(f"{h.path}: a different set of (time, baseline) rows than {ref.path}")
