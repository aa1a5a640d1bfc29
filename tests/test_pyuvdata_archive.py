"""The current pipeline's archive format: a DSA-110 group read by pyuvdata and written by
its ``write_ms`` (pyuvdata >= 3, and 2.x's own conjugation). open_ms gives the same
Dataset as our own MS of the group, and ``contimg calibrate`` / ``apply`` / ``image`` give
the same results (issue 13, "Must show")."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from contimg.io.ms import open_ms, write_ms
from contimg.io.uvh5 import open_group
from contimg.simulate import SimConfig, simulate_group, write_calibrator_catalog

NSUB, NCHAN, NTIME, NANT = 2, 8, 6, 16


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(our MS, pyuvdata 3 MS, pyuvdata 2.x-style MS, catalogue CSV, group Dataset)."""
    from casacore import tables as ct
    from pyuvdata import UVData

    tmp = tmp_path_factory.mktemp("archive")
    cfg = SimConfig(n_ant=NANT, n_subbands=NSUB, n_chan=NCHAN, n_times=NTIME, rfi=None,
                    threads=1)
    g = simulate_group(tmp / "raw", cfg=cfg, calibrator=True)
    cat = write_calibrator_catalog([g], tmp / "cal.csv")
    ds = open_group(g.files, n_subbands=NSUB)
    ours = tmp / "ours.ms"
    write_ms(ds, ours)
    # what the current pipeline does: pyuvdata reads the subbands (descending
    # frequency, as the files hold them) and writes the MS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uvd = UVData.from_file([str(f) for f in g.files], axis="freq", file_type="uvh5")
        v3 = tmp / "pyuvdata3.ms"
        uvd.write_ms(str(v3))
        v2 = tmp / "pyuvdata2.ms"
        uvd.write_ms(str(v2), flip_conj=False)
    with ct.table(str(v2), readonly=False, ack=False) as tb:   # 2.x wrote no keyword
        tb.removekeyword("pyuvdata_flip_conj")
    with ct.table(f"{v3}::SPECTRAL_WINDOW", ack=False) as tb:
        assert np.all(np.diff(tb.getcell("CHAN_FREQ", 0)) < 0)   # descending, as archived
    return dict(ours=str(ours), v3=str(v3), v2=str(v2), catalog=str(cat), ds=ds)


def _same_dataset(a, b, tol=1e-4):
    for name in ("VISIBILITY", "WEIGHT"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=0, atol=tol,
                                   err_msg=name)
    np.testing.assert_array_equal(a.FLAG.values, b.FLAG.values)
    np.testing.assert_allclose(a.UVW.values, b.UVW.values, rtol=0, atol=tol)
    np.testing.assert_allclose(a.time.values, b.time.values, rtol=0, atol=tol)
    np.testing.assert_array_equal(a.frequency.values, b.frequency.values)
    for name in ("PHASE_CENTER_RA", "PHASE_CENTER_DEC"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.ANTENNA_POSITION.values, b.ANTENNA_POSITION.values,
                               rtol=0, atol=tol)
    np.testing.assert_array_equal(a.baseline_antenna1_id.values, b.baseline_antenna1_id.values)
    np.testing.assert_array_equal(a.baseline_antenna2_id.values, b.baseline_antenna2_id.values)
    assert a.attrs["telescope_name"] == b.attrs["telescope_name"]
    np.testing.assert_allclose(a.attrs["telescope_location"], b.attrs["telescope_location"],
                               rtol=0, atol=tol)


@pytest.mark.parametrize("which, conj", [("v3", "ms"), ("v2", "pyuvdata")])
def test_pyuvdata_archive_ms_opens_as_our_ms(archive, which, conj):
    theirs = open_ms(archive[which])
    assert theirs.attrs["ms_conjugation"] == conj
    ours = open_ms(archive["ours"])
    _same_dataset(theirs, ours)
    _same_dataset(theirs, archive["ds"])
    assert list(theirs.phase_center_name.values) == list(ours.phase_center_name.values)


@pytest.mark.slow
def test_pyuvdata_archive_through_the_cli_as_our_ms(archive, tmp_path, capsys):
    """``contimg calibrate`` / ``contimg apply`` / ``contimg image`` on pyuvdata's MS of a
    group and on our own MS of it: the same B/G tables, CORRECTED_DATA and image."""
    import json
    import shutil

    from astropy.io import fits

    from contimg.caltables import read_caltable
    from contimg.cli import main

    res, corrected, images = {}, {}, {}
    for which in ("ours", "v3"):
        ms = str(tmp_path / f"{which}.ms")
        shutil.copytree(archive[which], ms)
        assert main(["calibrate", ms, "--catalog", archive["catalog"], "--name", which,
                     "--out-dir", str(tmp_path), "--json"]) == 0
        out = capsys.readouterr().out
        r = json.loads(out[out.index("{"):])      # after any log lines
        assert r["calibrator"] == "SIMCAL" and r["status"] == "valid", r
        # pyuvdata writes each integration's phase centre as a FIELD: still a drift scan
        assert [t["kind"] for t in r["transits"]] == ["drift"]
        res[which] = r
        assert main(["apply", ms, r["tables"]["B"], r["tables"]["G"]]) == 0
        assert "CORRECTED_DATA written to" in capsys.readouterr().out
        corrected[which] = open_ms(ms, data_column="CORRECTED_DATA")
        out = tmp_path / f"{which}-img"
        assert main(["image", ms, "--out", str(out), "--size", "256", "--cell", "20",
                     "--niter", "50", "--weighting", "natural"]) == 0
        images[which] = fits.open(f"{out}-image.fits")[0]
    assert res["v3"]["t_transit"] == pytest.approx(res["ours"]["t_transit"], abs=1e-3)
    assert res["v3"]["refant"] == res["ours"]["refant"]
    for kind in ("B", "G"):
        a = read_caltable(res["ours"]["tables"][kind])
        b = read_caltable(res["v3"]["tables"][kind])
        np.testing.assert_array_equal(a["freqs_hz"], b["freqs_hz"])
        np.testing.assert_array_equal(a["flag"], b["flag"])
        ok = ~a["flag"]
        # (nsol, nant, nchan, npol) over the ANTENNA table; the group has NANT antennas
        assert ok.any(axis=(0, 2, 3)).sum() >= NANT - 1
        np.testing.assert_allclose(a["cparam"][ok], b["cparam"][ok], rtol=1e-4, atol=1e-5)
    ca, cb = corrected["ours"], corrected["v3"]
    np.testing.assert_array_equal(ca.FLAG.values, cb.FLAG.values)
    good = ~ca.FLAG.values
    np.testing.assert_allclose(ca.VISIBILITY.values[good], cb.VISIBILITY.values[good],
                               rtol=1e-4, atol=1e-4)
    ia, ib = images["ours"], images["v3"]
    for key in ("CRVAL1", "CRVAL2", "CDELT1", "CDELT2", "CRPIX1", "CRPIX2"):
        assert ib.header[key] == pytest.approx(ia.header[key], rel=1e-12, abs=1e-12), key
    peak = float(np.abs(ia.data).max())
    diff = float(np.abs(ia.data - ib.data).max())
    ka, kb = np.argmax(ia.data), np.argmax(ib.data)
    print(f"CLI on pyuvdata's MS vs ours: image difference {diff / peak:.2e} of the peak "
          f"({peak:.4g} Jy), peak pixel {np.unravel_index(kb, ib.data.shape)[-2:]}")
    assert ka == kb
    assert diff < 1e-4 * peak
