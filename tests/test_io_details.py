"""The smaller I/O items of issue 13 (item 6): per-row integration times of baseline-
dependent-averaged UVH5, negative nsamples, FITS headers from the data, the phase
centre's name in FIELD.NAME, the --w-loss default, and the bandpass table's channel
order on a descending-frequency MS."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from foreign_uvh5 import foreign_uvdata, write_foreign_uvh5
from test_ms import make_dataset

from contimg.io.ms import open_ms, write_ms
from contimg.io.uvh5 import open_uvh5

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ per-row integration times

def test_baseline_dependent_integration_times_survive_to_the_ms(tmp_path):
    from casacore import tables as ct

    uvd = foreign_uvdata(ntime=4, nant=5)
    # BDA-like: the short baselines "averaged" over twice as long
    bl_len = np.linalg.norm(uvd.uvw_array, axis=1)
    it = np.where(bl_len < np.median(bl_len), 16.0, 8.0)
    uvd.integration_time = it
    path = tmp_path / "bda.uvh5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uvd.write_uvh5(str(path), run_check=False)
    ds = open_uvh5(path)
    assert "INTEGRATION_TIME" in ds
    want = it.reshape(uvd.Ntimes, uvd.Nbls)
    np.testing.assert_array_equal(ds.INTEGRATION_TIME.values, want)
    assert ds.time.attrs["integration_time"] == np.median(it)   # one value, as before
    ms = tmp_path / "bda.ms"
    write_ms(ds, ms)
    with ct.table(str(ms), ack=False) as tb:
        np.testing.assert_array_equal(tb.getcol("INTERVAL"), want.ravel())
        np.testing.assert_array_equal(tb.getcol("EXPOSURE"), want.ravel())
    back = open_ms(ms)
    np.testing.assert_array_equal(back.INTEGRATION_TIME.values, want)
    # a file without BDA has no such variable
    plain = tmp_path / "plain.uvh5"
    write_foreign_uvh5(plain)
    assert "INTEGRATION_TIME" not in open_uvh5(plain)


# ------------------------------------------------------------------ negative nsamples

def test_negative_nsamples_are_flagged_with_a_warning_naming_the_file(tmp_path, caplog):
    path = tmp_path / "negative.uvh5"
    uvd = write_foreign_uvh5(path, ntime=2)
    with h5py.File(path, "r+") as f:
        ns = f["Data/nsamples"][()]
        ns[3, 2:5, 0] = -1.0
        f["Data/nsamples"][...] = ns
    ds = open_uvh5(path)
    with caplog.at_level(logging.WARNING):
        flag, weight = ds.FLAG.values, ds.WEIGHT.values
    assert str(path) in caplog.text and "negative nsamples" in caplog.text
    t, b = divmod(3, uvd.Nbls)
    assert flag[t, b, 2:5, 0].all() and (weight[t, b, 2:5, 0] == 0).all()
    assert flag.sum() == 3 and (weight >= 0).all()
    assert (weight[~flag] == 1).all()


# ------------------------------------------------------------------ FIELD.NAME

def test_write_ms_keeps_the_phase_centres_name(tmp_path):
    from casacore import tables as ct

    ds = make_dataset(nant=4, ntime=4, nsub=1, nchan=4, drift=False)
    ds = ds.assign_coords(phase_center_name=("time", ["3C286"] * 4))
    ms = tmp_path / "named.ms"
    write_ms(ds, ms)
    with ct.table(f"{ms}::FIELD", ack=False) as tb:
        assert list(tb.getcol("NAME")) == ["3C286"]
    with ct.table(f"{ms}::SOURCE", ack=False) as tb:
        assert list(tb.getcol("NAME")) == ["3C286"]
    assert list(open_ms(ms, field="3C286").phase_center_name.values) == ["3C286"] * 4
    # two centres of one source keep the name twice (no "3C286_")
    ds2 = make_dataset(nant=4, ntime=2, nsub=1, nchan=4, drift=True)
    ds2 = ds2.assign_coords(phase_center_name=("time", ["drift", "drift"]))
    write_ms(ds2, tmp_path / "two.ms")
    with ct.table(f"{tmp_path / 'two.ms'}::FIELD", ack=False) as tb:
        assert list(tb.getcol("NAME")) == ["drift", "drift"]
    # a centre is its position: a Dataset re-phased to one centre whose integrations
    # still carry their drift names is one FIELD (named after its first integration),
    # not one per name (imagers such as WSClean image one field)
    ds3 = ds2.assign(PHASE_CENTER_RA=("time", np.full(2, float(ds2.PHASE_CENTER_RA[0]))),
                     PHASE_CENTER_DEC=("time", np.full(2, float(ds2.PHASE_CENTER_DEC[0]))))
    ds3 = ds3.assign_coords(phase_center_name=("time", ["drift-0", "drift-1"]))
    write_ms(ds3, tmp_path / "one.ms")
    with ct.table(f"{tmp_path / 'one.ms'}::FIELD", ack=False) as tb:
        assert list(tb.getcol("NAME")) == ["drift-0"]
    # unnamed centres: J names, as before
    write_ms(make_dataset(nant=4, ntime=2, nsub=1, nchan=4), tmp_path / "j.ms")
    with ct.table(f"{tmp_path / 'j.ms'}::FIELD", ack=False) as tb:
        assert all(n.startswith("J") for n in tb.getcol("NAME"))


# ------------------------------------------------------------------ FITS headers

def _fake_products():
    return types.SimpleNamespace(
        image=np.zeros((32, 32), np.float32), phase_center=(1.2, -0.6), cell_rad=1e-5,
        freq_hz=1.3e9, bandwidth_hz=16e6, slant=(0.0, 0.0),
        date_obs="2025-10-04T12:00:00.000", time_mid_unix=1759579210.0,
        beam=(1e-4, 8e-5, 30.0), options={"weighting": "briggs", "robust": 0.0},
        n_components=0, n_major=0, threshold=0.0, noise=1e-3)


def test_fits_header_takes_telescope_location_and_object_from_the_data(tmp_path):
    from astropy.io import fits
    from astropy.wcs import WCS

    from contimg import telescope as tel
    from contimg.io.fits import image_header, write_fits

    path = tmp_path / "f.uvh5"
    write_foreign_uvh5(path)
    ds = open_uvh5(path)
    loc = np.asarray(ds.attrs["telescope_location"])
    out = write_fits(tmp_path / "img.fits", np.zeros((32, 32)),
                     image_header(_fake_products(), "image", "JY/BEAM", ds))
    h = fits.getheader(out)
    assert h["TELESCOP"] == "TESTARRAY" and h["INSTRUME"] == "TESTARRAY"
    assert h["OBJECT"] == "MYSRC"
    np.testing.assert_allclose([h["OBSGEO-X"], h["OBSGEO-Y"], h["OBSGEO-Z"]], loc, atol=1e-3)
    assert abs(h["OBSGEO-B"] - (-30.7215)) < 1e-6 and abs(h["OBSGEO-L"] - 21.4283) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # nothing for wcslib to fix
        WCS(h)
    # DSA-110 data: its own name, site and the group as the object
    dsa = image_header(_fake_products(), "image", "JY/BEAM",
                       {"telescope_name": "DSA-110", "telescope_location": tel.site_itrf(),
                        "group_start": "2025-10-04T12:00:00"})
    assert dsa["TELESCOP"] == "DSA-110" and dsa["OBJECT"] == "group 2025-10-04T12:00:00"
    assert abs(dsa["OBSGEO-B"] - tel.SITE_LAT_DEG) < 1e-6


# ------------------------------------------------------------------ --w-loss default

def test_w_loss_default_is_one_value_everywhere():
    from contimg.config import ImageConfig
    from contimg.imaging import image_dataset

    assert ImageConfig().w_loss == 3e-3
    assert "default 3e-3" in " ".join(image_dataset.__doc__.split())
    r = subprocess.run([sys.executable, "-m", "contimg.cli", "image", "--help"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "default 0.003" in " ".join(r.stdout.split()), r.stdout
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "`--w-loss` (3e-3" in readme


# ------------------------------------------------------------------ bandpass channel order

@pytest.fixture(scope="module")
def descending_ms(tmp_path_factory):
    """An MS whose SPECTRAL_WINDOW descends (as pyuvdata writes DSA-110's descending
    subbands unsorted), the same visibilities as an ascending one."""
    from casacore import tables as ct

    d = tmp_path_factory.mktemp("desc")
    ds = make_dataset(nant=5, ntime=2, nsub=1, nchan=8)
    asc = d / "asc.ms"
    write_ms(ds, asc)
    desc = d / "desc.ms"
    shutil.copytree(asc, desc)
    with ct.table(str(desc), readonly=False, ack=False) as tb:
        for col in ("DATA", "FLAG", "WEIGHT_SPECTRUM"):
            tb.putcol(col, tb.getcol(col)[:, ::-1])
    with ct.table(f"{desc}::SPECTRAL_WINDOW", readonly=False, ack=False) as tb:
        tb.putcell("CHAN_FREQ", 0, tb.getcell("CHAN_FREQ", 0)[::-1])
        tb.putcell("CHAN_WIDTH", 0, -tb.getcell("CHAN_WIDTH", 0))
    return str(asc), str(desc), ds


def test_bandpass_table_of_a_descending_ms_maps_channels_by_frequency(descending_ms, tmp_path):
    from casacore import tables as ct

    from contimg.caltables import read_caltable, read_solutions, write_caltable

    asc, desc, ds = descending_ms
    freq = ds.frequency.values                        # ascending (the Dataset's order)
    nant, npol = 5, 2
    # a bandpass whose phase and amplitude identify the frequency
    bp = ((1 + (freq - freq[0]) / 1e8)[None, :, None]
          * np.exp(1j * (freq[None, :, None] / 1e7 + np.arange(nant)[:, None, None]
                         + 0.5 * np.arange(npol)))).astype(np.complex64)   # (ant, chan, pol)
    for ms in (asc, desc):
        path = write_caltable(str(tmp_path / (Path(ms).stem + ".B")), ms, kind="B",
                              times_unix=[ds.time.values.mean()], cparam=bp[None],
                              flag=np.zeros((1,) + bp.shape, bool), freqs_hz=freq)
        with ct.table(path, ack=False) as tb:
            cp = tb.getcol("CPARAM")                  # (nant, nchan, npol), CASA convention
        with ct.table(f"{path}/SPECTRAL_WINDOW", ack=False) as tb:
            tab_f = tb.getcell("CHAN_FREQ", 0)
        # channel j of the table is the solution at the table's CHAN_FREQ[j]
        j_of = np.searchsorted(freq, tab_f)
        np.testing.assert_array_equal(cp, np.conj(bp[:, j_of]))
        back = read_caltable(path)
        np.testing.assert_array_equal(back["freqs_hz"], freq)
        np.testing.assert_array_equal(back["cparam"][0], bp)
        casa = read_caltable(path, convention="casa")
        np.testing.assert_array_equal(casa["freqs_hz"], tab_f)
        sol = read_solutions(path)
        np.testing.assert_array_equal(sol["BANDPASS"], bp)
        np.testing.assert_array_equal(sol["frequency"], freq)
    # the default (no freqs_hz) of Dataset-convention solutions: ascending
    p2 = write_caltable(str(tmp_path / "default.B"), desc, kind="B",
                        times_unix=[0.0], cparam=bp[None], flag=np.zeros((1,) + bp.shape, bool))
    np.testing.assert_array_equal(read_caltable(p2)["cparam"][0], bp)
    with ct.table(p2, ack=False) as tb:
        np.testing.assert_array_equal(tb.getcol("CPARAM"), np.conj(bp[:, ::-1]))
    sol = read_solutions(p2)
    np.testing.assert_array_equal(sol["frequency"], freq)
    np.testing.assert_array_equal(sol["BANDPASS"], bp)
    # frequencies that are not the MS's are refused, naming the MS
    from contimg.caltables import CalTableError

    with pytest.raises(CalTableError, match="desc.ms"):
        write_caltable(str(tmp_path / "bad.B"), desc, kind="B", times_unix=[0.0],
                       cparam=bp[None], flag=np.zeros((1,) + bp.shape, bool),
                       freqs_hz=freq + 1e5)


@pytest.mark.interop
def test_casa_applies_our_bandpass_of_a_descending_ms_by_frequency(descending_ms, tmp_path):
    """CASA's applycal with the table written for the descending MS corrects it exactly as
    our apply_ms corrects the ascending MS (channels matched by frequency)."""
    import importlib.util

    if importlib.util.find_spec("casatasks") is None:
        pytest.skip("casatasks is not installed")
    from casarun import casa_applycal

    from contimg.calibrate import apply_ms
    from contimg.caltables import write_caltable

    asc, desc, ds = descending_ms
    freq = ds.frequency.values
    rng = np.random.default_rng(3)
    bp = ((1 + 0.3 * rng.random((5, freq.size, 2)))
          * np.exp(1j * rng.uniform(-3, 3, (5, freq.size, 2)))).astype(np.complex64)
    a_ms, d_ms = str(tmp_path / "a.ms"), str(tmp_path / "d.ms")
    shutil.copytree(asc, a_ms)
    shutil.copytree(desc, d_ms)
    tabs = {}
    for name, ms in (("a", a_ms), ("d", d_ms)):
        tabs[name] = write_caltable(str(tmp_path / f"{name}.B"), ms, kind="B",
                                    times_unix=[ds.time.values.mean()], cparam=bp[None],
                                    flag=np.zeros((1,) + bp.shape, bool), freqs_hz=freq)
    apply_ms(a_ms, [tabs["a"]])
    casa_applycal(tmp_path, d_ms, [tabs["d"]])
    ours = open_ms(a_ms, data_column="CORRECTED_DATA")
    casa = open_ms(d_ms, data_column="CORRECTED_DATA")
    np.testing.assert_array_equal(casa.frequency.values, ours.frequency.values)
    ok = ~(ours.FLAG.values | casa.FLAG.values)
    a, c = ours.VISIBILITY.values[ok], casa.VISIBILITY.values[ok]
    assert np.max(np.abs(a - c) / np.abs(a)) < 1e-5
    # and the correction did something (a reversed bandpass would not match)
    raw = ds.VISIBILITY.values[ok]
    assert np.median(np.abs(raw - a) / np.abs(a)) > 0.1
