"""Measurement Set I/O: write_ms / open_ms / compute_uvw (issue 3).

Synthetic contract Datasets are built here (a few DSA-110-like antennas including
2 km outriggers, XX/YY, two 48-channel subbands, a few 12.9 s integrations).
Interop tests run the real clients: WSClean 3.1, AOFlagger 3.1, CASA 6.7, pyuvdata.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import warnings

import dask.array as da
import numpy as np
import pytest

from contimg import telescope as tel
from contimg.io.ms import MJD_UNIX_OFFSET_S, MSFormatError, compute_uvw, open_ms, write_ms
from graphs import contract

T0_UNIX = 1759667400.0  # 2025-10-05T12:30:00 UTC
C = tel.SPEED_OF_LIGHT


# ---------------------------------------------------------------------------------
# synthetic Datasets
# ---------------------------------------------------------------------------------


def _antennas(nant):
    """ITRF positions, names, numbers of ``nant`` DSA-110-like antennas (outriggers too)."""
    enu, names = tel.t_layout_enu()
    sel = tel.correlated_subset(nant)
    lat, lon = np.radians(tel.SITE_LAT_DEG), np.radians(tel.SITE_LON_DEG)
    rot = tel.enu_to_ecef_rotation(lat, lon)
    pos = tel.site_itrf() + enu[sel] @ rot.T
    return pos, [names[i] for i in sel], (sel + 1).astype(np.int32)


def meridian_ra(times_unix):
    """ICRS RA of the local meridian (apparent LST; close enough for a phase centre)."""
    from astropy import units as u
    from astropy.time import Time

    t = Time(times_unix, format="unix", scale="utc")
    return t.sidereal_time("apparent", longitude=tel.SITE_LON_DEG * u.deg).rad


def point_source_vis(uvw, freq, ra0, dec0, sources):
    """V = sum S exp(+2 pi i (u l + v m + w (n - 1)) / lambda), uvw = x2 - x1.

    The sign is pyuvdata's (``UVData.phase`` multiplies by ``exp(-2 pi i dw/lambda)``,
    which only fits this sign; checked in ``test_pyuvdata_sign_convention``) and
    ``kernels.predict``'s. l, m are ICRS offsets (the apparent-frame ones differ by a
    few milliarcseconds of differential aberration here, negligible).

    ``uvw`` (ntime, nbl, 3), phase centres ``ra0``/``dec0`` (ntime,), sources a list of
    (ra, dec, flux). Returns (ntime, nbl, nfreq) complex128.
    """
    out = np.zeros(uvw.shape[:2] + (freq.size,), dtype=np.complex128)
    for ra, dec, flux in sources:
        dra = ra - ra0
        ll = np.cos(dec) * np.sin(dra)
        mm = np.sin(dec) * np.cos(dec0) - np.cos(dec) * np.sin(dec0) * np.cos(dra)
        nn = np.sqrt(1.0 - ll**2 - mm**2)
        phase = (uvw[..., 0] * ll[:, None] + uvw[..., 1] * mm[:, None]
                 + uvw[..., 2] * (nn[:, None] - 1.0))  # (ntime, nbl) metres
        out += flux * np.exp(2j * np.pi * phase[..., None] * freq / C)
    return out


def make_dataset(*, nant=8, ntime=4, nsub=2, nchan=48, pols=("XX", "YY"),
                 drift=True, dec_deg=tel.DEFAULT_DEC_DEG, sources=None, seed=1,
                 use_dask=True, autos=True):
    """A contract Dataset.

    ``drift``: phase centre on the meridian at every integration (DSA-110), else
    fixed at the meridian of the middle integration. ``sources``: list of
    (ra, dec, flux) point sources (else random visibilities, flags and weights).
    """
    rng = np.random.default_rng(seed)
    pos, names, numbers = _antennas(nant)
    a1, a2 = np.triu_indices(nant, 0 if autos else 1)
    times = T0_UNIX + np.arange(ntime) * tel.INTEGRATION_S
    dec0 = np.full(ntime, np.radians(dec_deg))
    ra0 = meridian_ra(times) if drift else np.full(ntime, meridian_ra(times[ntime // 2]))
    # DSA-110 band: subbands descend in the files; the contract is ascending
    freq = np.sort(np.concatenate([tel.subband_frequencies(sb, nchan) for sb in range(nsub)]))
    npol = len(pols)
    uvw = compute_uvw(pos, a1, a2, times, ra0, dec0, telescope_location=tel.site_itrf())
    shape = (ntime, a1.size, freq.size, npol)
    if sources is None:
        vis = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
        flag = rng.random(shape) < 0.1
        flag[0, 1] = True  # one fully flagged row
        weight = rng.uniform(0.5, 2.0, size=shape).astype(np.float32)
    else:
        v = point_source_vis(uvw, freq, ra0, dec0, sources)
        vis = np.repeat(v[..., None], npol, axis=-1).astype(np.complex64)
        flag = np.zeros(shape, dtype=bool)
        flag[:, a1 == a2] = True  # autocorrelations are not imaged
        weight = np.ones(shape, dtype=np.float32)
    fchunk = nchan
    if use_dask:
        ch = (ntime, -1, fchunk, -1)
        vis, flag, weight = (da.from_array(x, chunks=ch) for x in (vis, flag, weight))
        uvw_arr = da.from_array(uvw, chunks=(ntime, -1, 3))
    else:
        uvw_arr = uvw
    return contract.visibility_dataset(
        vis=vis, flag=flag, weight=weight, uvw=uvw_arr, time=times,
        integration_time=tel.INTEGRATION_S, antenna1=a1, antenna2=a2, frequency=freq,
        channel_width=tel.CHANNEL_WIDTH_HZ, polarizations=pols, phase_center_ra=ra0,
        phase_center_dec=dec0, antenna_position=pos,
        antenna_dish_diameter=np.full(nant, tel.DISH_DIAMETER_M), antenna_name=names,
        antenna_number=numbers, telescope_name=tel.TELESCOPE_NAME,
        telescope_location=tel.site_itrf(),
        attrs={"phase_center_dec": float(np.radians(dec_deg)), "source_files": ["synthetic"]})


@pytest.fixture(scope="module")
def small_ds():
    return make_dataset()


@pytest.fixture(scope="module")
def small_ms(small_ds, tmp_path_factory):
    path = tmp_path_factory.mktemp("ms") / "small.ms"
    write_ms(small_ds, path)
    return str(path)


# ---------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------


def test_open_ms_round_trips_every_variable(small_ds, small_ms):
    back = open_ms(small_ms)
    assert contract.check(back) == []
    for name in ("VISIBILITY", "FLAG", "WEIGHT", "UVW", "PHASE_CENTER_RA",
                 "PHASE_CENTER_DEC", "ANTENNA_POSITION", "ANTENNA_DISH_DIAMETER"):
        got, want = back[name].values, small_ds[name].values
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    for name in ("baseline_antenna1_id", "baseline_antenna2_id", "frequency",
                 "polarization", "uvw_label", "antenna_name", "antenna_number"):
        np.testing.assert_array_equal(back[name].values, small_ds[name].values, err_msg=name)
    # unix -> MJD seconds -> unix: exact up to the rounding of the sum (< 1 us)
    np.testing.assert_allclose(back["time"].values, small_ds["time"].values, rtol=0, atol=1e-6)
    assert back["time"].attrs["integration_time"] == tel.INTEGRATION_S
    assert back["frequency"].attrs["channel_width"] == tel.CHANNEL_WIDTH_HZ
    assert back.attrs["telescope_name"] == "DSA-110"
    np.testing.assert_array_equal(back.attrs["telescope_location"],
                                  small_ds.attrs["telescope_location"])
    assert back.attrs["phase_center_dec"] == small_ds.attrs["phase_center_dec"]
    assert back.attrs["source_files"] == ["synthetic"]
    # lazily, one 48-channel subband per chunk
    assert isinstance(back["VISIBILITY"].data, da.Array)
    assert back["VISIBILITY"].data.chunks[2] == (48, 48)


def test_numpy_backed_dataset_writes_the_same_ms(small_ds, small_ms, tmp_path):
    path = tmp_path / "numpy.ms"
    write_ms(small_ds.compute(), path)
    a, b = open_ms(small_ms), open_ms(path)
    for name in ("VISIBILITY", "FLAG", "WEIGHT", "UVW"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_any_baseline_order_round_trips(tmp_path):
    ds = make_dataset(ntime=2, nsub=1, use_dask=False)
    rng = np.random.default_rng(5)
    ds = ds.isel(baseline_id=rng.permutation(ds.sizes["baseline_id"]))
    write_ms(ds, tmp_path / "perm.ms")
    back = open_ms(tmp_path / "perm.ms")
    for name in ("baseline_antenna1_id", "baseline_antenna2_id"):
        np.testing.assert_array_equal(back[name].values, ds[name].values)
    for name in ("VISIBILITY", "FLAG", "WEIGHT", "UVW"):
        np.testing.assert_array_equal(back[name].values, ds[name].values, err_msg=name)


def test_main_table_columns_as_casacore_reads_them(small_ds, small_ms):
    """The MS itself: conventions, row order, every MAIN column against the Dataset."""
    from casacore import tables as ct

    ds = small_ds.compute()
    nt, nbl, nf, npol = ds["VISIBILITY"].shape
    with ct.table(small_ms, ack=False) as tb:
        assert tb.nrows() == nt * nbl
        # MS convention: conjugated data, uvw = x1 - x2 (pyuvdata flip_conj)
        np.testing.assert_array_equal(
            tb.getcol("DATA"), np.conj(ds["VISIBILITY"].values).reshape(-1, nf, npol))
        np.testing.assert_array_equal(tb.getcol("UVW"), -ds["UVW"].values.reshape(-1, 3))
        flag = ds["FLAG"].values.reshape(-1, nf, npol)
        np.testing.assert_array_equal(tb.getcol("FLAG"), flag)
        np.testing.assert_array_equal(tb.getcol("FLAG_ROW"), flag.all(axis=(1, 2)))
        assert tb.getcol("FLAG_ROW").sum() == 1
        ws = ds["WEIGHT"].values.reshape(-1, nf, npol)
        np.testing.assert_array_equal(tb.getcol("WEIGHT_SPECTRUM"), ws)
        np.testing.assert_allclose(tb.getcol("WEIGHT"), ws.mean(axis=1), rtol=1e-6)
        np.testing.assert_allclose(tb.getcol("SIGMA"), 1 / np.sqrt(ws.mean(axis=1)), rtol=1e-6)
        mjd = np.repeat(ds["time"].values + MJD_UNIX_OFFSET_S, nbl)
        np.testing.assert_array_equal(tb.getcol("TIME"), mjd)
        np.testing.assert_array_equal(tb.getcol("TIME_CENTROID"), mjd)
        np.testing.assert_array_equal(tb.getcol("INTERVAL"), tel.INTEGRATION_S)
        np.testing.assert_array_equal(tb.getcol("EXPOSURE"), tel.INTEGRATION_S)
        np.testing.assert_array_equal(tb.getcol("ANTENNA1"),
                                      np.tile(ds["baseline_antenna1_id"].values, nt))
        np.testing.assert_array_equal(tb.getcol("ANTENNA2"),
                                      np.tile(ds["baseline_antenna2_id"].values, nt))
        # drift scan: one field per integration
        np.testing.assert_array_equal(tb.getcol("FIELD_ID"), np.repeat(np.arange(nt), nbl))
        for col, val in (("FEED1", 0), ("FEED2", 0), ("DATA_DESC_ID", 0), ("ARRAY_ID", 0),
                         ("OBSERVATION_ID", 0), ("PROCESSOR_ID", 0), ("STATE_ID", 0),
                         ("SCAN_NUMBER", 1)):
            np.testing.assert_array_equal(tb.getcol(col), val, err_msg=col)
        dm = {d["NAME"]: d for d in tb.getdminfo().values()}
        assert dm["TiledDATA"]["TYPE"] == "TiledColumnStMan"
        assert list(dm["TiledDATA"]["SPEC"]["DEFAULTTILESHAPE"][:2]) == [npol, 48]
        assert dm["TiledFLAG"]["TYPE"] == "TiledColumnStMan"
        assert tb.getcolkeyword("UVW", "MEASINFO")["Ref"] == "ICRS"
    with ct.table(f"{small_ms}::SPECTRAL_WINDOW", ack=False) as tb:
        f = tb.getcell("CHAN_FREQ", 0)
        np.testing.assert_array_equal(f, ds["frequency"].values)
        assert np.all(np.diff(f) > 0) and tb.getcell("NUM_CHAN", 0) == nf
    with ct.table(f"{small_ms}::POLARIZATION", ack=False) as tb:
        np.testing.assert_array_equal(tb.getcell("CORR_TYPE", 0), [9, 12])
        np.testing.assert_array_equal(tb.getcell("CORR_PRODUCT", 0), [[0, 0], [1, 1]])
    with ct.table(f"{small_ms}::ANTENNA", ack=False) as tb:
        np.testing.assert_array_equal(tb.getcol("POSITION"), ds["ANTENNA_POSITION"].values)
        np.testing.assert_array_equal(tb.getcol("DISH_DIAMETER"), 4.65)
        assert set(tb.getcol("MOUNT")) == {"ALT-AZ"}
    with ct.table(f"{small_ms}::FIELD", ack=False) as tb:
        assert tb.nrows() == nt
        pd_ = tb.getcol("PHASE_DIR")[:, 0, :]
        np.testing.assert_array_equal(pd_[:, 0], ds["PHASE_CENTER_RA"].values)
        np.testing.assert_array_equal(pd_[:, 1], ds["PHASE_CENTER_DEC"].values)
        assert tb.getcolkeyword("PHASE_DIR", "MEASINFO")["Ref"] == "ICRS"
    with ct.table(f"{small_ms}::OBSERVATION", ack=False) as tb:
        assert tb.getcell("TELESCOPE_NAME", 0) == "DSA_110"
        np.testing.assert_array_equal(tb.getcell("TELESCOPE_LOCATION", 0), tel.site_itrf())
    for sub, nrows in (("FEED", ds.sizes["antenna_id"]), ("SOURCE", nt),
                       ("DATA_DESCRIPTION", 1), ("STATE", 1), ("PROCESSOR", 1),
                       ("POINTING", nt * ds.sizes["antenna_id"])):
        with ct.table(f"{small_ms}::{sub}", ack=False) as tb:
            assert tb.nrows() == nrows, sub
    with ct.table(f"{small_ms}::HISTORY", ack=False) as tb:
        assert "contimg" in tb.getcell("MESSAGE", 0)


def test_daskms_reads_every_column_back(small_ds, small_ms):
    from daskms import xds_from_ms, xds_from_table

    ds = small_ds.compute()
    nt, nbl, nf, npol = ds["VISIBILITY"].shape
    (main,) = xds_from_ms(small_ms, group_cols=[], index_cols=[])
    main = main.compute()
    np.testing.assert_array_equal(main.DATA.values,
                                  np.conj(ds.VISIBILITY.values).reshape(-1, nf, npol))
    np.testing.assert_array_equal(main.FLAG.values, ds.FLAG.values.reshape(-1, nf, npol))
    np.testing.assert_array_equal(main.WEIGHT_SPECTRUM.values,
                                  ds.WEIGHT.values.reshape(-1, nf, npol))
    np.testing.assert_array_equal(main.UVW.values, -ds.UVW.values.reshape(-1, 3))
    np.testing.assert_array_equal(main.TIME.values,
                                  np.repeat(ds.time.values + MJD_UNIX_OFFSET_S, nbl))
    np.testing.assert_array_equal(main.ANTENNA1.values,
                                  np.tile(ds.baseline_antenna1_id.values, nt))
    # grouping by the default FIELD_ID/DATA_DESC_ID gives one dataset per integration
    groups = xds_from_ms(small_ms)
    assert len(groups) == nt
    (spw,) = xds_from_table(f"{small_ms}::SPECTRAL_WINDOW")
    np.testing.assert_array_equal(spw.CHAN_FREQ.values[0], ds.frequency.values)
    (ant,) = xds_from_table(f"{small_ms}::ANTENNA")
    np.testing.assert_array_equal(ant.POSITION.values, ds.ANTENNA_POSITION.values)


def test_fixed_phase_centre_gives_one_field_and_model_columns(tmp_path):
    ds = make_dataset(drift=False, ntime=3, nsub=1)
    ds["MY_MODEL"] = ds["VISIBILITY"] * np.complex64(2)
    path = tmp_path / "fixed.ms"
    write_ms(ds, path, model_data="MY_MODEL", corrected_data=True, history=["hello"])
    from casacore import tables as ct

    with ct.table(str(path), ack=False) as tb:
        np.testing.assert_array_equal(tb.getcol("FIELD_ID"), 0)
        data = tb.getcol("DATA")
        np.testing.assert_array_equal(tb.getcol("CORRECTED_DATA"), data)
        np.testing.assert_array_equal(tb.getcol("MODEL_DATA"), 2 * data)
    with ct.table(f"{path}::FIELD", ack=False) as tb:
        assert tb.nrows() == 1
    with ct.table(f"{path}::HISTORY", ack=False) as tb:
        assert "hello" in list(tb.getcol("MESSAGE"))
    back = open_ms(path, data_column="MODEL_DATA")
    np.testing.assert_array_equal(back.VISIBILITY.values, ds.MY_MODEL.values)
    # clearcal-like unity model; first drop the dask-ms handles on the old MS (casacore
    # caches open tables by name, so a live handle would shadow the new files)
    del back
    gc.collect()
    write_ms(ds, path, overwrite=True, model_data=True)
    with ct.table(str(path), ack=False) as tb:
        np.testing.assert_array_equal(tb.getcol("MODEL_DATA"), 1 + 0j)


def test_open_ms_fills_missing_rows_and_unswaps(small_ds, small_ms, tmp_path):
    """Rows removed and rows stored as (ant2, ant1) come back right, missing ones flagged."""
    from casacore import tables as ct

    ds = small_ds.compute()
    nt, nbl = ds.sizes["time"], ds.sizes["baseline_id"]
    full = str(tmp_path / "full.ms")
    path = str(tmp_path / "holes.ms")
    shutil.copytree(small_ms, full)
    drop = [nbl + 3, 2 * nbl + 5]  # two (time, baseline) rows
    swap_row = 3 * nbl + 7
    with ct.table(full, readonly=False, ack=False) as tb:
        a1, a2 = tb.getcell("ANTENNA1", swap_row), tb.getcell("ANTENNA2", swap_row)
        assert a1 < a2
        tb.putcell("ANTENNA1", swap_row, a2)
        tb.putcell("ANTENNA2", swap_row, a1)
        tb.putcell("DATA", swap_row, np.conj(tb.getcell("DATA", swap_row)))
        tb.putcell("UVW", swap_row, -tb.getcell("UVW", swap_row))
        # tiled storage managers cannot remove rows: deep-copy a selection instead
        keep_rows = np.setdiff1d(np.arange(tb.nrows()), drop)
        sel = tb.selectrows(keep_rows)
        sel.copy(path, deep=True, valuecopy=True)
        sel.close()
    back = open_ms(path)
    assert back.sizes == ds.sizes
    vis, flag, wt = back.VISIBILITY.values, back.FLAG.values, back.WEIGHT.values
    for r in drop:
        t, b = divmod(r, nbl)
        assert np.all(vis[t, b] == 0) and np.all(flag[t, b]) and np.all(wt[t, b] == 0)
        # filled UVW is computed from the antenna positions (< 1 mm of the original)
        np.testing.assert_allclose(back.UVW.values[t, b], ds.UVW.values[t, b], atol=1e-3)
    keep = np.ones(nt * nbl, dtype=bool)
    keep[drop] = False
    np.testing.assert_array_equal(vis.reshape(-1, *vis.shape[2:])[keep],
                                  ds.VISIBILITY.values.reshape(-1, *vis.shape[2:])[keep])
    np.testing.assert_array_equal(back.UVW.values.reshape(-1, 3)[keep],
                                  ds.UVW.values.reshape(-1, 3)[keep])


def test_open_ms_rejects_multiple_spectral_windows(small_ms, tmp_path):
    from casacore import tables as ct

    path = str(tmp_path / "twospw.ms")
    shutil.copytree(small_ms, path)
    with ct.table(path, readonly=False, ack=False) as tb:
        dd = tb.getcol("DATA_DESC_ID")
        dd[: dd.size // 2] = 1
        tb.putcol("DATA_DESC_ID", dd)
    with pytest.raises(MSFormatError, match=r"twospw\.ms.*2 DATA_DESC_IDs"):
        open_ms(path)
    with pytest.raises(FileNotFoundError, match="not a casacore table"):
        open_ms(tmp_path / "nothing.ms")


# ---------------------------------------------------------------------------------
# the temp-and-rename guarantee
# ---------------------------------------------------------------------------------


def _failing_dataset(ds, fail_block=(1, 0, 1, 0)):
    """``ds`` whose VISIBILITY raises when block ``fail_block`` is computed."""
    vis = ds["VISIBILITY"].data

    def boom(block, block_info=None):
        if tuple(block_info[0]["chunk-location"]) == fail_block:
            raise RuntimeError("injected failure while computing a chunk")
        return block

    bad = ds.copy()
    bad["VISIBILITY"] = (contract.VIS_DIMS, vis.map_blocks(boom, dtype=vis.dtype))
    return bad


def test_failure_mid_write_leaves_nothing(tmp_path):
    ds = make_dataset(ntime=4)
    ds = ds.chunk({"time": 1})  # several time blocks: the failure is mid-write
    bad = _failing_dataset(ds, fail_block=(2, 0, 1, 0))
    out = tmp_path / "bad.ms"
    with pytest.raises(RuntimeError, match="injected failure"):
        write_ms(bad, out)
    assert os.listdir(tmp_path) == []
    # overwrite=True: a failed rewrite keeps the old MS untouched
    write_ms(ds, out)
    before = open_ms(out).VISIBILITY.values
    with pytest.raises(RuntimeError, match="injected failure"):
        write_ms(bad, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["bad.ms"]
    np.testing.assert_array_equal(open_ms(out).VISIBILITY.values, before)
    with pytest.raises(FileExistsError, match="already exists"):
        write_ms(ds, out)


def test_invalid_dataset_is_refused_before_anything_is_written(tmp_path):
    ds = make_dataset(ntime=2, nsub=1).drop_vars("UVW")
    with pytest.raises(contract.SchemaError, match="UVW"):
        write_ms(ds, tmp_path / "x.ms")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------
# UVW against pyuvdata
# ---------------------------------------------------------------------------------


def _pyuvdata_uvw(pos, a1, a2, times, ra, dec, loc):
    """pyuvdata's UVW for sidereal ICRS phase centres, one per integration."""
    from astropy import units as u
    from astropy.coordinates import EarthLocation
    from astropy.time import Time
    from pyuvdata.utils.phasing import calc_frame_pos_angle, calc_uvw, transform_icrs_to_app
    from pyuvdata.utils.times import get_lst_for_time

    el = EarthLocation.from_geocentric(*loc, unit=u.m)
    jd = Time(times, format="unix", scale="utc").jd
    nbl = a1.size
    lst = np.repeat(get_lst_for_time(jd, telescope_loc=el), nbl)
    app_ra, app_dec = transform_icrs_to_app(time_array=jd, ra=ra, dec=dec, telescope_loc=el)
    app_ra, app_dec = np.repeat(app_ra, nbl), np.repeat(app_dec, nbl)
    pa = calc_frame_pos_angle(time_array=np.repeat(jd, nbl), app_ra=app_ra, app_dec=app_dec,
                              telescope_loc=el, ref_frame="icrs")
    uvw = calc_uvw(app_ra=app_ra, app_dec=app_dec, frame_pa=pa, lst_array=lst,
                   use_ant_pos=True, antenna_positions=pos - loc,
                   antenna_numbers=np.arange(pos.shape[0]),
                   ant_1_array=np.tile(a1, times.size), ant_2_array=np.tile(a2, times.size),
                   telescope_lat=el.lat.rad, telescope_lon=el.lon.rad)
    return uvw.reshape(times.size, nbl, 3)


@pytest.mark.parametrize("dec_deg", [tel.DEFAULT_DEC_DEG, -30.0, 89.5])
def test_compute_uvw_matches_pyuvdata_below_a_millimetre(dec_deg):
    pos, _, _ = _antennas(117)  # the full T with 2 km outriggers
    a1, a2 = np.triu_indices(pos.shape[0], 1)
    times = T0_UNIX + np.arange(24) * tel.INTEGRATION_S
    ra = meridian_ra(times)  # drift scan: a new phase centre every integration
    dec = np.full(times.size, np.radians(dec_deg))
    loc = tel.site_itrf()
    ours = compute_uvw(pos, a1, a2, times, ra, dec, telescope_location=loc)
    ref = _pyuvdata_uvw(pos, a1, a2, times, ra, dec, loc)
    blen = np.linalg.norm(ref, axis=-1)
    assert blen.max() > 2000.0  # really 2 km baselines
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), blen, rtol=0, atol=1e-6)
    assert np.abs(ours - ref).max() < 1e-3


@pytest.mark.filterwarnings("ignore:channel_width not provided")
@pytest.mark.filterwarnings("ignore:Recalculating uvw_array")
def test_compute_uvw_matches_a_pyuvdata_uvdata_object():
    """Independent route: a UVData phased to an ICRS centre computes its own UVWs."""
    from astropy import units as u
    from astropy.coordinates import EarthLocation
    from astropy.time import Time
    from pyuvdata import Telescope, UVData

    pos, names, numbers = _antennas(24)
    loc = tel.site_itrf()
    times = T0_UNIX + np.arange(3) * tel.INTEGRATION_S
    ra0, dec0 = float(meridian_ra(times[1])), np.radians(tel.DEFAULT_DEC_DEG)
    el = EarthLocation.from_geocentric(*loc, unit=u.m)
    telescope = Telescope.new(location=el, name="DSA-110", antenna_positions={
        int(n): p - loc for n, p in zip(numbers, pos, strict=True)},
        antenna_names=names, instrument="DSA-110", x_orientation="east",
        antenna_diameters=np.full(len(names), 4.65), feeds=["x", "y"],
        mount_type="alt-az")
    uvd = UVData.new(freq_array=np.array([1.4e9]), polarization_array=["xx"],
                     times=Time(times, format="unix").jd, telescope=telescope,
                     antpairs=[(int(numbers[i]), int(numbers[j]))
                               for i in range(24) for j in range(i + 1, 24)],
                     phase_center_catalog={0: {"cat_name": "pc", "cat_type": "sidereal",
                                               "cat_lon": ra0, "cat_lat": dec0,
                                               "cat_frame": "icrs"}})
    # UVData.new orders baseline-times time-major; map antenna numbers to indices
    index = {int(n): i for i, n in enumerate(numbers)}
    a1 = np.array([index[a] for a in uvd.ant_1_array[: uvd.Nbls]])
    a2 = np.array([index[a] for a in uvd.ant_2_array[: uvd.Nbls]])
    ours = compute_uvw(pos, a1, a2, times, ra0, dec0, telescope_location=loc)
    ref = uvd.uvw_array.reshape(times.size, uvd.Nbls, 3)
    assert np.abs(ours - ref).max() < 1e-3


def test_pyuvdata_sign_convention():
    """pyuvdata's ``phase()`` implies V = S exp(+2 pi i (ul + vm + w(n-1))/lambda).

    A 1 Jy source at phase centre A (V = 1) is rephased by pyuvdata to B; the result
    must equal :func:`point_source_vis` for the source at A seen from B.
    """
    from astropy import units as u
    from astropy.coordinates import EarthLocation
    from astropy.time import Time
    from pyuvdata import Telescope, UVData

    nant = 10
    pos, names, numbers = _antennas(nant)
    loc = tel.site_itrf()
    times = T0_UNIX + np.arange(2) * tel.INTEGRATION_S
    ra_a, dec_a = float(meridian_ra(times[0])), np.radians(tel.DEFAULT_DEC_DEG)
    ra_b, dec_b = ra_a + np.radians(0.3), dec_a - np.radians(0.2)
    el = EarthLocation.from_geocentric(*loc, unit=u.m)
    telescope = Telescope.new(location=el, name="DSA-110", antenna_positions={
        int(n): p - loc for n, p in zip(numbers, pos, strict=True)}, antenna_names=names,
        instrument="DSA-110", x_orientation="east", antenna_diameters=np.full(nant, 4.65),
        feeds=["x", "y"], mount_type="alt-az")
    freq = np.array([1.4e9])
    a1, a2 = np.triu_indices(nant, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uvd = UVData.new(freq_array=freq, polarization_array=["xx"],
                         times=Time(times, format="unix").jd, telescope=telescope,
                         antpairs=[(int(numbers[i]), int(numbers[j])) for i, j in zip(a1, a2)],
                         phase_center_catalog={0: {"cat_name": "A", "cat_type": "sidereal",
                                                   "cat_lon": ra_a, "cat_lat": dec_a,
                                                   "cat_frame": "icrs"}},
                         channel_width=np.array([1e6]), empty=True)
        uvd.data_array[:] = 1.0
        uvd.phase(lon=ra_b, lat=dec_b, cat_name="B")
    uvw = uvd.uvw_array.reshape(times.size, a1.size, 3)
    got = uvd.data_array[:, 0, 0].reshape(times.size, a1.size)
    model = point_source_vis(uvw, freq, np.full(2, ra_b), np.full(2, dec_b),
                             [(ra_a, dec_a, 1.0)])[..., 0]
    phase_turns = np.abs(np.angle(model)).max()
    assert phase_turns > 1.0  # the test means something: phases wrap
    # agreement to a few mrad (ICRS vs apparent offsets: differential aberration)
    assert np.abs(got - model).max() < 0.05
    assert np.abs(got - np.conj(model)).max() > 1.0  # the other sign is far off


# ---------------------------------------------------------------------------------
# interop: real clients read what we write
# ---------------------------------------------------------------------------------

WSCLEAN = shutil.which("wsclean")
AOFLAGGER = shutil.which("aoflagger")


def _have_module(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _source_at_pixel(ra0, dec0, dx, dy, pix_rad):
    """ICRS position of a source at pixel offsets (dx east, dy north) in a SIN image."""
    ll, mm = dx * pix_rad, dy * pix_rad
    nn = np.sqrt(1 - ll**2 - mm**2)
    dec = np.arcsin(mm * np.cos(dec0) + nn * np.sin(dec0))
    ra = ra0 + np.arctan2(ll, nn * np.cos(dec0) - mm * np.sin(dec0))
    return float(ra), float(dec)


def _wsclean(ms, workdir, *, size=1024, scale_asec=4.0, niter=1000, extra=()):
    """Run WSClean 3.1 (one thread), return {kind: (data, WCS)} of its FITS products."""
    from astropy.io import fits
    from astropy.wcs import WCS

    name = os.path.join(str(workdir), "img")
    cmd = [WSCLEAN, "-j", "1", "-quiet", "-name", name, "-size", str(size), str(size),
           "-scale", f"{scale_asec}asec", "-pol", "I", "-weight", "briggs", "0",
           "-niter", str(niter), "-mgain", "0.8", "-auto-mask", "3",
           "-auto-threshold", "1", "-no-update-model-required", *extra, str(ms)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"wsclean failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    out = {}
    for kind in ("image", "model", "dirty"):
        with fits.open(f"{name}-{kind}.fits") as hdul, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's "datfix" note on WSClean headers
            out[kind] = (hdul[0].data[0, 0].astype(float), WCS(hdul[0].header).celestial)
    return out


def _peak_and_truth(img, wcs, ra, dec):
    iy, ix = np.unravel_index(np.argmax(img), img.shape)
    px, py = wcs.world_to_pixel_values(np.degrees(ra), np.degrees(dec))
    return (ix, iy), (float(px), float(py))


@pytest.mark.interop
@pytest.mark.skipif(WSCLEAN is None, reason="wsclean is not installed")
def test_wsclean_finds_synthetic_point_source(tmp_path):
    """WSClean 3.1 images our MS: the source on its true pixel with its true flux."""
    ntime = 6
    times = T0_UNIX + np.arange(ntime) * tel.INTEGRATION_S
    ra0, dec0 = float(meridian_ra(times[ntime // 2])), np.radians(tel.DEFAULT_DEC_DEG)
    pix = np.radians(4.0 / 3600)
    # east and south of the centre: a sign error would mirror it through the centre
    ra_s, dec_s = _source_at_pixel(ra0, dec0, 40, -25, pix)
    ds = make_dataset(nant=24, ntime=ntime, nsub=2, drift=False, sources=[(ra_s, dec_s, 10.0)])
    assert np.allclose(ds.PHASE_CENTER_RA.values, ra0)
    ms = tmp_path / "ps.ms"
    write_ms(ds, ms)
    out = _wsclean(ms, tmp_path)
    img, wcs = out["image"]
    (ix, iy), (px, py) = _peak_and_truth(img, wcs, ra_s, dec_s)
    assert abs(px - 512 + 40) < 0.01 and abs(py - 512 + 25) < 0.01  # WCS sanity
    assert abs(ix - px) <= 0.5 and abs(iy - py) <= 0.5, ((ix, iy), (px, py))
    assert img.max() == pytest.approx(10.0, rel=0.03)
    dirty = out["dirty"][0]
    assert dirty[iy, ix] == pytest.approx(10.0, rel=0.01)
    assert out["model"][0].sum() == pytest.approx(10.0, rel=0.03)
    # the mirror position holds no source
    assert dirty[1024 - iy, 1024 - ix] < 0.3 * dirty[iy, ix]


def _rephase(ds, ra_c, dec_c):
    """Rephase a (computed) contract Dataset to one fixed ICRS centre.

    With V = S exp(+2 pi i b.(s - s0)/lambda): V1 = V0 exp(+2 pi i (w0 - w1)/lambda),
    w measured towards the apparent phase centres (as compute_uvw does).
    """
    ds = ds.compute()
    uvw1 = compute_uvw(ds.ANTENNA_POSITION.values, ds.baseline_antenna1_id.values,
                       ds.baseline_antenna2_id.values, ds.time.values, ra_c, dec_c,
                       telescope_location=np.asarray(ds.attrs["telescope_location"]))
    dw = ds.UVW.values[..., 2] - uvw1[..., 2]
    rot = np.exp(2j * np.pi * dw[..., None] * ds.frequency.values / C)
    out = ds.copy()
    out["VISIBILITY"] = (contract.VIS_DIMS, (ds.VISIBILITY.values * rot[..., None]).astype(
        np.complex64))
    out["UVW"] = (contract.UVW_DIMS, uvw1)
    out["PHASE_CENTER_RA"] = ("time", np.full(ds.sizes["time"], ra_c))
    out["PHASE_CENTER_DEC"] = ("time", np.full(ds.sizes["time"], dec_c))
    return out


@pytest.mark.interop
@pytest.mark.skipif(WSCLEAN is None, reason="wsclean is not installed")
def test_wsclean_images_a_simulated_group(tmp_path):
    """simulate_group -> open_group -> write_ms -> WSClean: the source where it belongs.

    The group is phased to the meridian at every integration (one FIELD each); we check
    that MS first, then rephase to one centre off the source (as today's pipeline
    phases a group to its midpoint) so that WSClean images the whole group.
    """
    simulate = pytest.importorskip("contimg.simulate")
    uvh5 = pytest.importorskip("contimg.io.uvh5")
    from casacore import tables as ct

    cfg = simulate.SimConfig(n_ant=24, n_subbands=2, n_times=8, noise=False, gains=False,
                             rfi=None, threads=1, calibrator_alpha=0.0,
                             calibrator_flux_jy=20.0)
    empty = {k: [] for k in ("ra", "dec", "flux", "alpha", "name", "ref_freq")}
    group = simulate.simulate_group(tmp_path / "raw", cfg=cfg, calibrator=True, sky=empty)
    truth = group.load_truth()
    ra_s, dec_s = float(truth["sky_ra"][0]), float(truth["sky_dec"][0])
    ds = uvh5.open_group(group.files, n_subbands=2)
    nt = ds.sizes["time"]

    # the simulator writes compute_uvw's exact per-integration UVW (pyuvdata's
    # calc_uvw reuses one rotation for integrations sharing an hour angle, i.e. all of
    # them under meridian phasing, and is off by ~5 mm in u, v); recomputing from the
    # file's antenna positions, times and phase centres gives them back to a few um
    # (the file stores times as float64 JD: ~20 us, i.e. ~3 um of Earth rotation at 2 km)
    uvw = compute_uvw(ds.ANTENNA_POSITION.values, ds.baseline_antenna1_id.values,
                      ds.baseline_antenna2_id.values, ds.time.values,
                      ds.PHASE_CENTER_RA.values, ds.PHASE_CENTER_DEC.values,
                      telescope_location=np.asarray(ds.attrs["telescope_location"]))
    assert np.abs(uvw - ds.UVW.values).max() < 1e-5

    drift_ms = tmp_path / "drift.ms"
    write_ms(ds, drift_ms)
    with ct.table(f"{drift_ms}::FIELD", ack=False) as tb:
        assert tb.nrows() == nt  # one meridian phase centre per integration
    back = open_ms(drift_ms)
    np.testing.assert_array_equal(back.VISIBILITY.values, ds.VISIBILITY.values)
    del back

    pix = np.radians(4.0 / 3600)
    # a centre that puts the source 30 px west and 20 px north of the image centre
    ra_c, dec_c = _source_at_pixel(ra_s, dec_s, 30, -20, pix)
    fixed = _rephase(ds, ra_c, dec_c)
    ms = tmp_path / "group.ms"
    write_ms(fixed, ms)
    out = _wsclean(ms, tmp_path)
    img, wcs = out["image"]
    (ix, iy), (px, py) = _peak_and_truth(img, wcs, ra_s, dec_s)
    assert abs(px - 542) < 1.5 and abs(py - 532) < 1.5  # 30 px west, 20 px north
    assert abs(ix - px) <= 1 and abs(iy - py) <= 1, ((ix, iy), (px, py))
    # expected flux: 20 Jy through the Airy beam of each integration's pointing
    sep = _angular_sep(ra_s, dec_s, ds.PHASE_CENTER_RA.values, ds.PHASE_CENTER_DEC.values)
    expected = 20.0 * tel.airy_beam(sep[:, None], ds.frequency.values[None, :]).mean()
    model = out["model"][0]
    flux = model[int(iy) - 5: int(iy) + 6, int(ix) - 5: int(ix) + 6].sum()
    assert flux == pytest.approx(expected, rel=0.03)
    assert img.max() == pytest.approx(expected, rel=0.06)


def _angular_sep(ra1, dec1, ra2, dec2):
    return np.arccos(np.clip(np.sin(dec1) * np.sin(dec2)
                             + np.cos(dec1) * np.cos(dec2) * np.cos(ra1 - ra2), -1, 1))


@pytest.mark.interop
@pytest.mark.skipif(AOFLAGGER is None, reason="aoflagger is not installed")
def test_aoflagger_flags_our_ms(tmp_path):
    """AOFlagger 3.1 runs on our MS and finds an injected narrow-band line."""
    from casacore import tables as ct

    ds = make_dataset(nant=10, ntime=12, nsub=2, drift=True, autos=False).compute()
    rng = np.random.default_rng(3)
    shape = ds.VISIBILITY.shape
    vis = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    vis[:, :, 30, :] += 200.0  # 140 sigma line in one channel
    ds["VISIBILITY"] = (contract.VIS_DIMS, vis)
    ds["FLAG"] = (contract.VIS_DIMS, np.zeros(shape, bool))
    ms = tmp_path / "rfi.ms"
    write_ms(ds, ms)
    res = subprocess.run([AOFLAGGER, "-j", "1", str(ms)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    with ct.table(str(ms), ack=False) as tb:
        flag = tb.getcol("FLAG")
    assert flag[:, 30].mean() > 0.95
    assert np.delete(flag, 30, axis=1).mean() < 0.05
    back = open_ms(ms)
    assert back.FLAG.values[:, :, 30].mean() > 0.95


_CASA_SCRIPT = r"""
import json, sys
import numpy as np
from casatasks import visstat
from casatools import ms as mstool
path = sys.argv[1]
stats = visstat(vis=path, axis="amp", datacolumn="data", useflags=True)
(key,) = stats.keys()
m = mstool()
m.open(path)
d = m.getdata(["data", "uvw", "flag", "antenna1", "antenna2"])
nchan = int(m.getspectralwindowinfo()["0"]["NumChan"])
nrow = int(m.nrow())
m.close()
np.save(sys.argv[2], d["data"])
np.save(sys.argv[3], d["uvw"])
print(json.dumps({"mean": float(stats[key]["mean"]), "npts": float(stats[key]["npts"]),
                  "nrow": nrow, "nchan": nchan}))
"""


@pytest.mark.interop
@pytest.mark.skipif(not _have_module("casatasks"), reason="casatasks is not installed")
def test_casa_reads_our_ms(small_ds, small_ms, tmp_path):
    """CASA 6.7 (offline, casadata) reads our MS: visstat and the ms tool agree with us."""
    from casarun import run_casa

    data_npy, uvw_npy = tmp_path / "data.npy", tmp_path / "uvw.npy"
    res = run_casa(tmp_path, _CASA_SCRIPT, small_ms, data_npy, uvw_npy, name="casa_read.py")
    got = json.loads(res.stdout.strip().splitlines()[-1])
    ds = small_ds.compute()
    vis, flag = ds.VISIBILITY.values, ds.FLAG.values
    nt, nbl, nf, npol = vis.shape
    assert got["nrow"] == nt * nbl and got["nchan"] == nf
    amp = np.abs(vis)[~flag]
    assert got["npts"] == amp.size
    assert got["mean"] == pytest.approx(amp.mean(), rel=1e-5)
    data = np.load(data_npy)  # (ncorr, nchan, nrow)
    np.testing.assert_array_equal(data, np.conj(vis).reshape(-1, nf, npol).transpose(2, 1, 0))
    np.testing.assert_array_equal(np.load(uvw_npy), -ds.UVW.values.reshape(-1, 3).T)


@pytest.mark.interop
def test_pyuvdata_reads_our_ms_in_its_own_convention(tmp_path):
    """pyuvdata's MS reader gives back our visibilities and UVW unchanged."""
    from pyuvdata import UVData

    ds = make_dataset(nant=8, ntime=3, nsub=2, drift=True, autos=False).compute()
    ms = tmp_path / "pyuv.ms"
    write_ms(ds, ms)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uvd = UVData.from_file(str(ms))
    nt, nbl = ds.sizes["time"], ds.sizes["baseline_id"]
    assert uvd.telescope.name == "DSA_110"
    np.testing.assert_allclose(uvd.telescope._location.xyz(), tel.site_itrf(), atol=1e-6)
    assert list(uvd.polarization_array) == [-5, -6]
    np.testing.assert_array_equal(uvd.freq_array.ravel(), ds.frequency.values)
    np.testing.assert_array_equal(uvd.data_array.reshape(nt, nbl, -1, 2), ds.VISIBILITY.values)
    np.testing.assert_array_equal(uvd.uvw_array.reshape(nt, nbl, 3), ds.UVW.values)
    np.testing.assert_array_equal(uvd.flag_array.reshape(nt, nbl, -1, 2), ds.FLAG.values)
    assert uvd.Nphase == nt  # one phase centre per integration
