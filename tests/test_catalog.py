"""Catalogues: CSV, FITS and VOTable (NVSS and FIRST as VizieR serves them), units,
deduplication by position, the simulator's sky as a catalogue, the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from contimg import catalog
from contimg.state import StateDB


def _nvss_votable(path, n=5, seed=0, dup_of=None):
    """An NVSS-like VOTable as VizieR writes it: sexagesimal RAJ2000/DEJ2000 strings,
    S1.4 and e_S1.4 in mJy."""
    from astropy.coordinates import SkyCoord
    from astropy.table import Table
    from astropy import units as u

    rng = np.random.default_rng(seed)
    ra = rng.uniform(150, 151, n)
    dec = rng.uniform(54, 55, n)
    if dup_of is not None:
        ra[0], dec[0] = dup_of[0] + 2.0 / 3600, dup_of[1]      # 2 arcsec from a known one
    c = SkyCoord(ra * u.deg, dec * u.deg)
    t = Table()
    t["NVSS"] = [f"{i:04d}" for i in range(n)]
    t["RAJ2000"] = c.ra.to_string(unit=u.hourangle, sep=" ", precision=2, pad=True)
    t["RAJ2000"].unit = "h:m:s"
    t["DEJ2000"] = c.dec.to_string(sep=" ", precision=1, alwayssign=True, pad=True)
    t["DEJ2000"].unit = "d:m:s"
    t["S1.4"] = rng.uniform(3, 900, n)
    t["S1.4"].unit = u.mJy
    t["e_S1.4"] = np.full(n, 0.5)
    t["e_S1.4"].unit = u.mJy
    t.write(path, format="votable", overwrite=True)
    return ra, dec, np.asarray(t["S1.4"]) / 1e3


def test_nvss_votable_units_and_positions(tmp_path):
    ra, dec, s = _nvss_votable(tmp_path / "nvss.vot")
    cat = catalog.read_catalog(tmp_path / "nvss.vot")
    assert np.allclose(cat["ra_deg"], ra, atol=0.01 * 15 / 3600)
    assert np.allclose(cat["dec_deg"], dec, atol=0.1 / 3600)
    assert np.allclose(cat["flux_jy"], s) and np.allclose(cat["flux_err_jy"], 5e-4)
    assert cat["name"][0] == "NVSS 0000"


def test_first_fits_and_csv_and_dedup(tmp_path):
    from astropy.table import Table
    from astropy import units as u

    t = Table()
    t["FIRST"] = ["J100000+545000", "J100100+545500", "J100100+545501"]
    t["RAJ2000"] = [150.0, 150.25, 150.25 + 1.0 / 3600]   # last two: 1 arcsec apart
    t["RAJ2000"].unit = u.deg
    t["DEJ2000"] = [54.8333, 54.9167, 54.9167]
    t["DEJ2000"].unit = u.deg
    t["Fpeak"] = [10.0, 5.0, 8.0]
    t["Fpeak"].unit = "mJy/beam"
    t["Fint"] = [12.0, 6.0, 9.0]
    t["Fint"].unit = u.mJy
    t["Rms"] = [0.15, 0.14, 0.15]
    t["Rms"].unit = "mJy/beam"
    t.write(tmp_path / "first.fits", overwrite=True)
    cat = catalog.read_catalog(tmp_path / "first.fits")
    assert np.allclose(cat["flux_jy"], [0.012, 0.006, 0.009])     # Fint before Fpeak
    assert np.allclose(cat["flux_err_jy"], [1.5e-4, 1.4e-4, 1.5e-4])
    (tmp_path / "mine.csv").write_text("name,ra_deg,dec_deg,flux_jy\nA,150.0005,54.8333,0.5\n"
                                       "B,10,20,1.0\n")
    with StateDB(tmp_path / "db.sqlite3") as db:
        r1 = catalog.load_into_db(db, tmp_path / "first.fits", name="FIRST")
        assert (r1["n_new"], r1["n_duplicates"]) == (2, 1)
        kept = db.query("SELECT name, flux_jy, origin, catalog_id FROM sources ORDER BY id")
        assert [k["name"] for k in kept] == ["FIRST J100000+545000", "FIRST J100100+545501"]
        # A is 1.8 arcsec from the first FIRST source: matched, not added; B is new
        r2 = catalog.load_into_db(db, tmp_path / "mine.csv")
        assert (r2["n_new"], r2["n_matched"]) == (1, 1)
        cats = db.query("SELECT name, n_new, n_matched FROM catalogs ORDER BY id")
        assert cats == [dict(name="FIRST", n_new=2, n_matched=0),
                        dict(name="mine", n_new=1, n_matched=1)]
        # loading the same file again adds nothing
        assert catalog.load_into_db(db, tmp_path / "mine.csv")["n_new"] == 0


def test_bad_catalogues_name_the_problem(tmp_path):
    (tmp_path / "x.csv").write_text("name,foo,bar\nA,1,2\n")
    with pytest.raises(ValueError, match="x.csv: no position columns"):
        catalog.read_catalog(tmp_path / "x.csv")
    (tmp_path / "y.dat").write_text("")
    with pytest.raises(ValueError, match="unknown catalogue format"):
        catalog.read_catalog(tmp_path / "y.dat")
    with pytest.raises(FileNotFoundError, match="no such catalogue"):
        catalog.read_catalog(tmp_path / "z.csv")


def test_sky_catalog_roundtrip_and_cli(tmp_path):
    from contimg.cli import main

    sky = dict(ra=np.radians([150.0, 151.0]), dec=np.radians([54.0, 55.0]),
               flux=np.array([0.5, 1.5]), alpha=np.array([-0.7, 0.1]),
               name=np.array(["SIM00000", "SIM00001"]))
    p = catalog.write_sky_catalog(sky, tmp_path / "sky.csv")
    db = tmp_path / "db.sqlite3"
    assert main(["catalog", "load", str(p), "--name", "simsky", "--db", str(db)]) == 0
    with StateDB(db) as d:
        src = catalog.sources_table(d)
    assert list(src["name"]) == ["SIM00000", "SIM00001"]
    assert np.allclose(src["ra_deg"], [150, 151]) and np.allclose(src["alpha"], [-0.7, 0.1])
    assert np.allclose(catalog.expected_flux(src, 2.8e9), [0.5 * 2 ** -0.7, 1.5 * 2 ** 0.1])
