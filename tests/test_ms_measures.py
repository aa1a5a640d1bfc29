"""open_ms honours measure references (TIME: UTC/TAI/TT..., FIELD directions: J2000,
B1950, GALACTIC, per-row references -> ICRS) and the writer's conjugation convention."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from test_ms import make_dataset

from contimg.io.ms import MJD_UNIX_OFFSET_S, compute_uvw, ms_fields, open_ms, write_ms

TAI_MINUS_UTC = 37.0  # seconds, since 2017-01-01


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(MS path, Dataset): 6 antennas, 3 drift-scan integrations, one field each."""
    ds = make_dataset(nant=6, ntime=3, nsub=1, nchan=8, autos=False).compute()
    path = tmp_path_factory.mktemp("measures") / "utc.ms"
    write_ms(ds, path)
    return str(path), ds


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _as_tai(path):
    """Rewrite TIME and TIME_CENTROID as TAI (values and MEASINFO), as importuvfits writes."""
    from casacore import tables as ct

    with ct.table(path, readonly=False, ack=False) as tb:
        for col in ("TIME", "TIME_CENTROID"):
            tb.putcol(col, tb.getcol(col) + TAI_MINUS_UTC)
            kw = tb.getcolkeywords(col)
            kw["MEASINFO"] = {"type": "epoch", "Ref": "TAI"}
            tb.putcolkeywords(col, kw)


def test_tai_time_gives_the_same_times_and_positions_as_utc(base, tmp_path):
    path, ds = base
    tai = _copy(path, tmp_path / "tai.ms")
    _as_tai(tai)
    a, b = open_ms(path), open_ms(tai)
    np.testing.assert_allclose(b.time.values, ds.time.values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(b.time.values, a.time.values, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(b.PHASE_CENTER_RA.values, a.PHASE_CENTER_RA.values)
    np.testing.assert_array_equal(b.VISIBILITY.values, a.VISIBILITY.values)
    # positions: the geometry recomputed from the times read is the stored one (37 s
    # late, the earth turns 2.7 mrad: metres of w on these baselines)
    for d in (a, b):
        uvw = compute_uvw(d.ANTENNA_POSITION.values, d.baseline_antenna1_id.values,
                          d.baseline_antenna2_id.values, d.time.values,
                          d.PHASE_CENTER_RA.values, d.PHASE_CENTER_DEC.values,
                          telescope_location=np.asarray(d.attrs["telescope_location"]))
        np.testing.assert_allclose(uvw, ds.UVW.values, rtol=0, atol=1e-4)


def test_tt_and_unknown_time_references(base, tmp_path):
    from casacore import tables as ct

    path, ds = base
    tt = _copy(path, tmp_path / "tt.ms")
    with ct.table(tt, readonly=False, ack=False) as tb:
        tb.putcol("TIME", tb.getcol("TIME") + TAI_MINUS_UTC + 32.184)
        kw = tb.getcolkeywords("TIME")
        kw["MEASINFO"] = {"type": "epoch", "Ref": "TT"}
        tb.putcolkeywords("TIME", kw)
    np.testing.assert_allclose(open_ms(tt).time.values, ds.time.values, rtol=0, atol=1e-6)
    with ct.table(tt, readonly=False, ack=False) as tb:
        kw = tb.getcolkeywords("TIME")
        kw["MEASINFO"] = {"type": "epoch", "Ref": "GMST1"}
        tb.putcolkeywords("TIME", kw)
    with pytest.raises(ValueError, match="tt.ms.*GMST1"):
        open_ms(tt)


def _casacore_convert(ra, dec, frame):
    """ICRS -> ``frame`` by casacore's measures (the reference, independent of astropy)."""
    from casacore.measures import measures

    dm = measures()
    out = []
    for r, d in zip(ra, dec, strict=True):
        m = dm.measure(dm.direction("ICRS", f"{float(r)!r}rad", f"{float(d)!r}rad"), frame)
        out.append((m["m0"]["value"], m["m1"]["value"]))
    return np.array(out)


@pytest.mark.parametrize("frame, tol_rad", [("J2000", 1e-9), ("GALACTIC", 1e-9),
                                            ("B1950", 1e-9), ("SUPERGAL", 1e-9)])
def test_field_directions_in_other_frames_come_back_icrs(base, tmp_path, frame, tol_rad):
    from casacore import tables as ct

    path, ds = base
    other = _copy(path, tmp_path / f"{frame}.ms")
    ra, dec = ds.PHASE_CENTER_RA.values, ds.PHASE_CENTER_DEC.values
    conv = _casacore_convert(ra, dec, frame)
    with ct.table(f"{other}::FIELD", readonly=False, ack=False) as tb:
        tb.putcol("PHASE_DIR", conv[:, None, :])
        kw = tb.getcolkeywords("PHASE_DIR")
        kw["MEASINFO"] = {"type": "direction", "Ref": frame}
        tb.putcolkeywords("PHASE_DIR", kw)
    f = ms_fields(other)
    # RA differences are angles on the sky: scale by cos(dec)
    np.testing.assert_allclose(np.array([x["ra"] for x in f]) * np.cos(dec), ra * np.cos(dec),
                               rtol=0, atol=tol_rad)
    np.testing.assert_allclose([x["dec"] for x in f], dec, rtol=0, atol=tol_rad)
    back = open_ms(other)
    np.testing.assert_allclose(back.PHASE_CENTER_DEC.values, dec, rtol=0, atol=tol_rad)


def test_per_row_direction_references(base, tmp_path):
    """A FIELD table with a VarRefCol (as pyuvdata and CASA write for mixed frames)."""
    from casacore import tables as ct

    path, ds = base
    other = _copy(path, tmp_path / "varref.ms")
    ra, dec = ds.PHASE_CENTER_RA.values, ds.PHASE_CENTER_DEC.values
    frames = ["ICRS", "J2000", "GALACTIC"]
    dirs = np.array([_casacore_convert(ra[i:i + 1], dec[i:i + 1], fr)[0]
                     for i, fr in enumerate(frames)])
    with ct.table(f"{other}::FIELD", readonly=False, ack=False) as tb:
        tb.putcol("PHASE_DIR", dirs[:, None, :])
        desc = ct.makescacoldesc("PhaseDir_Ref", 0)
        tb.addcols(desc)
        types = ["J2000", "ICRS", "GALACTIC"]
        tb.putcol("PhaseDir_Ref", np.array([types.index(fr) for fr in frames], np.int32))
        kw = tb.getcolkeywords("PHASE_DIR")
        kw["MEASINFO"] = {"type": "direction", "Ref": "J2000", "VarRefCol": "PhaseDir_Ref",
                          "TabRefTypes": types, "TabRefCodes": np.arange(3, dtype=np.uint32)}
        tb.putcolkeywords("PHASE_DIR", kw)
    f = ms_fields(other)
    np.testing.assert_allclose([x["dec"] for x in f], dec, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.array([x["ra"] for x in f]) * np.cos(dec), ra * np.cos(dec),
                               rtol=0, atol=1e-9)


def test_time_dependent_frame_is_refused_naming_it(base, tmp_path):
    from casacore import tables as ct

    path, _ = base
    other = _copy(path, tmp_path / "azel.ms")
    with ct.table(f"{other}::FIELD", readonly=False, ack=False) as tb:
        kw = tb.getcolkeywords("PHASE_DIR")
        kw["MEASINFO"] = {"type": "direction", "Ref": "AZEL"}
        tb.putcolkeywords("PHASE_DIR", kw)
    with pytest.raises(ValueError, match="azel.ms.*AZEL"):
        ms_fields(other)


# ---------------------------------------------------------------------------------
# conjugation
# ---------------------------------------------------------------------------------


def _pyuvdata_ms(src, dst, *, flip_conj, drop_keyword=False):
    """Our MS -> pyuvdata -> an MS written by pyuvdata (``flip_conj`` as given)."""
    from casacore import tables as ct
    from pyuvdata import UVData

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uvd = UVData.from_file(src)
        uvd.write_ms(str(dst), flip_conj=flip_conj)
    if drop_keyword:  # what pyuvdata 2.x wrote: its own convention, no keyword
        with ct.table(str(dst), readonly=False, ack=False) as tb:
            tb.removekeyword("pyuvdata_flip_conj")
    return str(dst), uvd


@pytest.mark.parametrize("flip_conj, drop, expected", [(True, False, "ms"),
                                                        (False, False, "pyuvdata"),
                                                        (False, True, "pyuvdata")])
def test_conjugation_of_pyuvdata_written_ms_is_detected(base, tmp_path, flip_conj, drop,
                                                        expected):
    path, ds = base
    ms, uvd = _pyuvdata_ms(path, tmp_path / "pyuv.ms", flip_conj=flip_conj, drop_keyword=drop)
    back = open_ms(ms)
    assert back.attrs["ms_conjugation"] == expected
    nt, nbl = ds.sizes["time"], ds.sizes["baseline_id"]
    # the Dataset is in pyuvdata's convention: what pyuvdata holds, whatever it wrote
    np.testing.assert_array_equal(back.VISIBILITY.values,
                                  uvd.data_array.reshape(nt, nbl, -1, 2).astype(np.complex64))
    np.testing.assert_allclose(back.UVW.values, ds.UVW.values, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(back.VISIBILITY.values, ds.VISIBILITY.values)
    # and pyuvdata agrees with itself on the file
    from pyuvdata import UVData

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = UVData.from_file(ms)
    np.testing.assert_array_equal(again.data_array.reshape(nt, nbl, -1, 2),
                                  back.VISIBILITY.values)


def test_conjugation_option_overrides_detection(base, tmp_path):
    path, ds = base
    ms, _ = _pyuvdata_ms(path, tmp_path / "pyuv2.ms", flip_conj=False, drop_keyword=True)
    forced = open_ms(ms, conjugation="ms")
    assert forced.attrs["ms_conjugation"] == "ms"
    np.testing.assert_array_equal(forced.VISIBILITY.values, np.conj(ds.VISIBILITY.values))
    np.testing.assert_allclose(forced.UVW.values, -ds.UVW.values, rtol=0, atol=1e-9)
    ours = open_ms(path)
    assert ours.attrs["ms_conjugation"] == "ms"
    with pytest.raises(ValueError, match="conjugation"):
        open_ms(path, conjugation="casa")


# ---------------------------------------------------------------------------------
# CASA's importuvfits (interop): TIME in TAI
# ---------------------------------------------------------------------------------

_IMPORT_SCRIPT = r"""
import sys
from casatasks import importuvfits
importuvfits(fitsfile=sys.argv[1], vis=sys.argv[2])
"""


def _have_casatasks():
    import importlib.util

    return importlib.util.find_spec("casatasks") is not None


@pytest.mark.interop
@pytest.mark.skipif(not _have_casatasks(), reason="casatasks is not installed")
def test_casa_importuvfits_tai_ms_gives_our_times_and_positions(tmp_path):
    """UVFITS of our data through CASA's importuvfits: CASA writes TIME in TAI; open_ms
    gives the same times (UTC), phase centre, UVW and visibilities as our MS."""
    from casacore import tables as ct
    from casarun import run_casa
    from pyuvdata import UVData

    # contiguous channels (UVFITS needs them); one phase centre (UVFITS holds one): our
    # data rephased by pyuvdata
    ds = make_dataset(nant=6, ntime=3, nsub=1, nchan=48, autos=False).compute()
    path = str(tmp_path / "ours.ms")
    write_ms(ds, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uvd = UVData.from_file(path)
        # antennas numbered 1..n (importuvfits stumbles over gaps in the AN table)
        lut = {int(n): i + 1 for i, n in enumerate(uvd.telescope.antenna_numbers)}
        uvd.ant_1_array = np.array([lut[int(a)] for a in uvd.ant_1_array])
        uvd.ant_2_array = np.array([lut[int(a)] for a in uvd.ant_2_array])
        uvd.telescope.antenna_numbers = np.arange(1, uvd.telescope.Nants + 1)
        uvd.baseline_array = uvd.antnums_to_baseline(uvd.ant_1_array, uvd.ant_2_array)
        uvd.phase(ra=float(ds.PHASE_CENTER_RA.values[1]), dec=float(ds.PHASE_CENTER_DEC.values[1]),
                  cat_name="CENTRE", phase_frame="icrs")
        ref_ms = tmp_path / "ref.ms"
        uvd.write_ms(str(ref_ms))
        # an AIPS-style UVFITS in IAT (TAI): times 37 s later, TIMSYS = 'IAT'
        # (importuvfits copies the times and labels them by TIMSYS; pyuvdata writes
        # 'TIMESYS', which CASA does not read, and then CASA assumes IAT too)
        uvd.time_array = uvd.time_array + TAI_MINUS_UTC / 86400.0
        fits_path = tmp_path / "data.uvfits"
        uvd.write_uvfits(str(fits_path), run_check=False)
    from astropy.io import fits

    with fits.open(fits_path, mode="update") as hdul:
        an = hdul["AIPS AN"].header
        an.pop("TIMESYS", None)
        an["TIMSYS"] = "IAT"
    casa_ms = tmp_path / "casa.ms"
    run_casa(tmp_path, _IMPORT_SCRIPT, fits_path, casa_ms, name="imp.py")
    with ct.table(str(casa_ms), ack=False) as tb:
        ref = tb.getcolkeyword("TIME", "MEASINFO")["Ref"]
        raw = np.unique(tb.getcol("TIME"))
    got, want = open_ms(casa_ms), open_ms(ref_ms)
    assert ref.upper() in ("TAI", "IAT")
    # CASA's TAI, 37 s after UTC: without the conversion every time would be late
    np.testing.assert_allclose(raw - MJD_UNIX_OFFSET_S - TAI_MINUS_UTC, want.time.values,
                               rtol=0, atol=1e-3)
    np.testing.assert_allclose(got.time.values, want.time.values, rtol=0, atol=1e-3)
    np.testing.assert_allclose(got.PHASE_CENTER_RA.values, want.PHASE_CENTER_RA.values,
                               atol=1e-9)
    np.testing.assert_allclose(got.PHASE_CENTER_DEC.values, want.PHASE_CENTER_DEC.values,
                               atol=1e-9)
    assert got.attrs["ms_conjugation"] == "ms"
    np.testing.assert_allclose(got.UVW.values, want.UVW.values, rtol=0, atol=1e-4)
    # the geometry at the times read is the stored UVW (37 s off would be metres)
    uvw = compute_uvw(want.ANTENNA_POSITION.values, want.baseline_antenna1_id.values,
                      want.baseline_antenna2_id.values, got.time.values,
                      got.PHASE_CENTER_RA.values, got.PHASE_CENTER_DEC.values,
                      telescope_location=np.asarray(want.attrs["telescope_location"]))
    np.testing.assert_allclose(uvw, got.UVW.values, rtol=0, atol=2e-3)
    np.testing.assert_allclose(got.VISIBILITY.values, want.VISIBILITY.values, rtol=0,
                               atol=1e-4)
