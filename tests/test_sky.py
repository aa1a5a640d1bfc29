"""contimg.sky: built-in standards, catalogue loaders, transit finder, beam response."""

from __future__ import annotations

import math
import os
import sqlite3

import numpy as np
import pytest

from contimg import sky
from contimg import telescope as tel
from kernels.constants import SECONDS_PER_DAY


def test_builtin_spectra_match_casa_perley_butler_2017_table():
    """Our coefficients are CASA's (casadata's PerleyButler2017Coeffs, latest epoch)."""
    casadata = pytest.importorskip("casadata")
    from casacore import tables as ct

    path = os.path.join(casadata.datapath, "nrao", "VLA", "standards", "PerleyButler2017Coeffs")
    if not os.path.isdir(path):
        pytest.skip("casadata has no PerleyButler2017Coeffs table")
    cat = sky.builtin_catalog()
    with ct.table(path, ack=False) as t:
        for src in cat:
            ref = t.getcol(f"{src.name}_coeffs")[-1]
            np.testing.assert_allclose(src.coeffs, ref[: len(src.coeffs)], atol=1e-4)
            assert np.all(ref[len(src.coeffs):] == 0)
            # and the flux is the polynomial evaluated
            for f in (1.3e9, 1.4e9, 1.5e9):
                x = math.log10(f / 1e9)
                exp = 10 ** sum(c * x ** k for k, c in enumerate(ref))
                assert src.flux(f) == pytest.approx(exp, rel=1e-4)
    # published L-band values (Perley & Butler 2017 Table 9 region): 3C286 ~ 14.9 Jy
    assert cat["3C286"].flux(1.4e9) == pytest.approx(14.9, rel=0.02)
    assert cat["3c48"].flux(1.4e9) == pytest.approx(16.0, rel=0.05)


def test_csv_catalogue_and_clear_errors(tmp_path):
    p = tmp_path / "cat.csv"
    p.write_text("name,ra_deg,dec_deg,flux_jy,alpha\nA,10.5,54.0,3.0,-0.5\n"
                 "B,13:31:08.29,+30:30:33.0,14.9,\n")
    cat = sky.load_catalog(p)
    assert cat.names() == ["A", "B"]
    assert cat["A"].ra == pytest.approx(math.radians(10.5))
    assert cat["A"].flux(2.8e9) == pytest.approx(3.0 * 2 ** -0.5)
    assert cat["B"].alpha == -0.7                    # default spectral index
    assert math.degrees(cat["B"].ra) == pytest.approx(202.78454, abs=1e-4)
    assert math.degrees(cat["B"].dec) == pytest.approx(30.509167, abs=1e-5)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,ra_deg,dec_deg\nA,1,2\n")
    with pytest.raises(ValueError, match=r"bad.csv line 2: missing column 'flux_jy'"):
        sky.load_catalog(bad)
    neg = tmp_path / "neg.csv"
    neg.write_text("name,ra_deg,dec_deg,flux_jy\nA,1,2,-1\n")
    with pytest.raises(ValueError, match="flux must be > 0"):
        sky.load_catalog(neg)
    with pytest.raises(FileNotFoundError, match="not found"):
        sky.load_catalog(tmp_path / "missing.csv")


def test_sqlite_catalogue(tmp_path):
    p = tmp_path / "cal.sqlite3"
    con = sqlite3.connect(p)
    con.execute("CREATE TABLE calibrators (name TEXT, ra_deg REAL, dec_deg REAL, "
                "flux_jy REAL, alpha REAL)")
    con.execute("INSERT INTO calibrators VALUES ('X', 120.0, 54.5, 5.0, -0.8)")
    con.commit()
    con.close()
    cat = sky.load_catalog(p)
    assert cat.names() == ["X"] and cat["X"].alpha == -0.8


VLA_TEXT = """\
1331+305   J2000  A 13h31m08.288060s  30d30'32.958850"  Aug01  3C286
1331+305   B1950  A 13h28m49.657700s  30d45'58.640000"
-----------------------------------------------------
BAND        A B C D    FLUX(Jy)    UVMIN(kL)  UVMAX(kL)
=====================================================
 90cm    P  X S S S      26.00
 20cm    L  P P P P      15.00
  6cm    C  P P P P       7.47
=====================================================
0137+331   J2000  A 01h37m41.299431s  33d09'35.132990"  Aug01  3C48
-----------------------------------------------------
BAND        A B C D    FLUX(Jy)    UVMIN(kL)  UVMAX(kL)
=====================================================
 20cm    L  P P P P      16.50
"""


def test_vla_calibrator_list_format(tmp_path):
    p = tmp_path / "vla.txt"
    p.write_text(VLA_TEXT)
    cat = sky.load_catalog(p)
    assert cat.names() == ["3C286", "3C48"]
    s = cat["3C286"]
    assert math.degrees(s.ra) == pytest.approx(15 * (13 + 31 / 60 + 8.28806 / 3600), abs=1e-7)
    assert math.degrees(s.dec) == pytest.approx(30 + 30 / 60 + 32.95885 / 3600, abs=1e-7)
    assert s.flux(1.4e9) == pytest.approx(15.0)
    nu6 = tel.SPEED_OF_LIGHT / 0.06
    assert s.alpha == pytest.approx(math.log(7.47 / 15.0) / math.log(nu6 / 1.4e9))
    assert cat["3C48"].alpha == -0.7


def test_environment_variables(monkeypatch, tmp_path):
    p = tmp_path / "env.csv"
    p.write_text("name,ra_deg,dec_deg,flux_jy\nENV1,1,2,3\n")
    monkeypatch.setenv("VLA_CATALOG", str(p))
    assert sky.default_catalog().names() == ["ENV1"]
    monkeypatch.setenv("CAL_MATCH_RADIUS_DEG", "0.25")
    monkeypatch.setenv("CAL_MATCH_TOPN", "2")
    monkeypatch.setenv("PIPELINE_POINTING_DEC_DEG", "30.5")
    assert sky.match_radius_deg() == 0.25 and sky.match_topn() == 2
    assert sky.pointing_dec_deg() == 30.5
    monkeypatch.setenv("CAL_MATCH_TOPN", "x")
    with pytest.raises(ValueError, match="CAL_MATCH_TOPN"):
        sky.match_topn()


def _drift(ntime=24, dec_deg=54.57, ra_mid_deg=100.0):
    dt = tel.INTEGRATION_S
    times = 1.7e9 + np.arange(ntime) * dt
    rate = 2 * np.pi / sky.SIDEREAL_DAY_S
    ra0 = math.radians(ra_mid_deg) + (times - times[ntime // 2]) * rate
    dec0 = np.full(ntime, math.radians(dec_deg))
    return times, ra0, dec0


def test_transits_in_data_with_beam_response():
    times, ra0, dec0 = _drift()
    mid = 12
    cat = sky.Catalog([
        sky.Source("ON", ra0[mid], dec0[0] + math.radians(0.5), 10.0),
        sky.Source("EARLY", ra0[3], dec0[0], 2.0),
        sky.Source("FAR_DEC", ra0[mid], dec0[0] + math.radians(3.0), 50.0),
        sky.Source("LATER", ra0[-1] + math.radians(1.0), dec0[0], 50.0),
    ])
    tr = sky.find_transits(cat, times_unix=times, ra0=ra0, dec0=dec0)
    assert [t.name for t in tr] == ["ON", "EARLY"]        # brightest apparent first
    on = tr[0]
    assert on.integration == mid and on.in_data
    assert on.t_transit == pytest.approx(times[mid], abs=1e-3)
    # beam response per integration: the Airy power pattern at the separation
    sep = sky.separation(ra0, dec0, cat["ON"].ra, cat["ON"].dec)
    np.testing.assert_allclose(on.response, tel.airy_beam(sep, 1.4e9))
    assert on.peak_response == pytest.approx(float(tel.airy_beam(math.radians(0.5), 1.4e9)))
    assert on.apparent_flux_jy == pytest.approx(10.0 * on.peak_response)
    # radius and topn
    wide = sky.find_transits(cat, times_unix=times, ra0=ra0, dec0=dec0, radius_deg=3.5,
                             topn=5)
    # FAR_DEC is matched with a wider radius but ranked by what the beam lets through
    assert [t.name for t in wide] == ["ON", "EARLY", "FAR_DEC"]
    assert [t.name for t in sky.find_transits(cat, times_unix=times, ra0=ra0, dec0=dec0,
                                               topn=1)] == ["ON"]
    assert [t.name for t in sky.find_transits(cat, times_unix=times, ra0=ra0, dec0=dec0,
                                               radius_deg=0.1)] == ["EARLY"]


def test_transit_times_over_a_day_against_astropy():
    """3C286 at dec 30.5: its transit time puts it on the meridian (azimuth 180)."""
    from astropy import units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.time import Time

    cat = sky.builtin_catalog()
    start = Time("2026-01-15T00:00:00", scale="utc").unix
    tr = sky.find_transits(cat, start=start, end=start + 2 * SECONDS_PER_DAY, dec_deg=30.5,
                           radius_deg=0.5, group_start=start, group_length_s=309.23)
    names = [t.name for t in tr]
    assert names == ["3C286", "3C286"]
    assert tr[1].t_transit - tr[0].t_transit == pytest.approx(sky.SIDEREAL_DAY_S, abs=2.0)
    loc = EarthLocation.from_geodetic(tel.SITE_LON_DEG * u.deg, tel.SITE_LAT_DEG * u.deg,
                                      tel.SITE_ALT_M * u.m)
    src = cat["3C286"]
    for t in tr:
        aa = SkyCoord(src.ra * u.rad, src.dec * u.rad).transform_to(
            AltAz(obstime=Time(t.t_transit, format="unix"), location=loc))
        # 1 s of time = 15 arcsec of hour angle; allow 2 s
        ha_err_s = abs(aa.az.deg - 180.0) * math.cos(math.radians(aa.alt.deg)) / math.cos(
            src.dec) * 240.0 / 1.0
        assert ha_err_s < 5.0, ha_err_s
        assert t.group_index == int((t.t_transit - start) // 309.23)
