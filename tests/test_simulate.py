"""The simulator writes what the telescope writes, and what it says it wrote."""

import h5py
import numpy as np
import pytest

from contimg import telescope as tel
from contimg.io.uvh5 import open_group
from contimg.simulate import SimConfig, load_truth, simulate, simulate_group
from kernels.constants import SECONDS_PER_DAY, UNIX_JD0


def _uvdata(files):
    from pyuvdata import UVData

    uv = UVData.from_file([str(f) for f in files], file_type="uvh5")
    uv.reorder_freqs(channel_order="freq")
    uv.reorder_blts("time", minor_order="baseline")
    return uv


def test_files_look_like_the_telescopes(tmp_path):
    cfg = SimConfig(n_ant=6, n_subbands=2, n_chan=48, n_times=24, noise=False, rfi=None)
    g = simulate_group(tmp_path, "2026-02-03T04:05:06", cfg=cfg)
    assert [f.name[-10:] for f in g.files] == ["_sb00.hdf5", "_sb01.hdf5"]
    assert g.files[0].name == "2026-02-03T04:05:06_sb00.hdf5"
    for sb, f in enumerate(g.files):
        name = tel.parse_subband_filename(f.name)
        assert abs((name.timestamp - tel.parse_subband_filename(g.files[0].name).timestamp)
                   .total_seconds()) <= 60
        with h5py.File(f) as h:
            hd = h["Header"]
            freqs = hd["freq_array"][()].ravel()
            assert freqs.size == 48 and np.all(np.diff(freqs) < 0)       # descending
            np.testing.assert_allclose(hd["channel_width"][()], 244140.625)
            assert freqs[0] == pytest.approx(tel.TOP_CHANNEL_HZ - sb * 48 * 244140.625)
            assert list(hd["polarization_array"][()]) == [-5, -6]
            assert hd["Ntimes"][()] == 24 and hd["Nbls"][()] == 21
            np.testing.assert_allclose(hd["integration_time"][()], 12.884902)
            assert hd["extra_keywords/phase_center_dec"][()] == pytest.approx(np.radians(54.57))
            t = np.unique(hd["time_array"][()])
            np.testing.assert_allclose(np.diff(t) * SECONDS_PER_DAY, 12.884902, atol=1e-4)
            assert h["Data/visdata"].shape == (24 * 21, 48, 2)


def test_pyuvdata_reads_every_file_like_our_reader(small_group):
    uv = _uvdata(small_group.files)
    uv.check()
    ds = open_group(small_group.files, n_subbands=4)
    nt, nbl = ds.sizes["time"], ds.sizes["baseline_id"]
    np.testing.assert_array_equal(ds.VISIBILITY.values,
                                  uv.data_array.reshape(nt, nbl, -1, 2))
    np.testing.assert_array_equal(ds.FLAG.values, uv.flag_array.reshape(nt, nbl, -1, 2))
    np.testing.assert_array_equal(ds.WEIGHT.values, uv.nsample_array.reshape(nt, nbl, -1, 2))
    np.testing.assert_array_equal(ds.frequency.values, uv.freq_array)
    np.testing.assert_allclose(ds.time.values,
                               (np.unique(uv.time_array) - UNIX_JD0) * SECONDS_PER_DAY, atol=1e-4)
    pos = uv.telescope.antenna_positions + uv.telescope._location.xyz()
    np.testing.assert_allclose(ds.ANTENNA_POSITION.values, pos, atol=1e-6)
    np.testing.assert_allclose(ds.UVW.values, uv.uvw_array.reshape(nt, nbl, 3), atol=1e-9)


def test_phasing_agrees_with_pyuvdata(clean_group):
    """pyuvdata re-phases to the one source: its visibilities become real and constant.

    Only a simulator whose delays, frames and sign convention match pyuvdata's (to
    ~1e-7 in phase) passes: a sign error doubles the phase, a frame error leaves
    arcsecond offsets (~0.05 rad on 2 km baselines).
    """
    g, cfg, sky = clean_group
    uv = _uvdata(g.files)
    cross = uv.ant_1_array != uv.ant_2_array
    before = uv.data_array[cross]
    assert np.std(np.angle(before)) > 0.5
    uv.phase(lon=sky["ra"][0], lat=sky["dec"][0], cat_name="src")
    d = uv.data_array[cross]
    # 1e-3: the file carries contimg.uvw UVW, which differs from pyuvdata's own by ~4 um
    assert np.max(np.abs(d.imag)) / np.mean(np.abs(d.real)) < 1e-3
    # and the amplitude is the flux, spectral index and Airy beam the truth says
    truth = load_truth(g.truth)
    sep = np.arccos(np.sin(sky["dec"][0]) * np.sin(truth["phase_center_dec"])
                    + np.cos(sky["dec"][0]) * np.cos(truth["phase_center_dec"])
                    * np.cos(sky["ra"][0] - truth["phase_center_ra"]))
    f = uv.freq_array
    expect = 5.0 * (f[None, :] / 1.4e9) ** -0.7 * tel.airy_beam(sep[:, None], f[None, :])
    got = d.real[..., 0].reshape(cfg.n_times, -1, f.size).mean(axis=1)
    np.testing.assert_allclose(got, expect, rtol=2e-3)


def test_true_gains_are_the_ones_in_the_data(tmp_path):
    """No noise, no RFI, one source at the phase centre: V_pq = S B_p B_q* g_p g_q*."""
    from contimg.simulate import _metadata
    import datetime as dt

    cfg = SimConfig(n_ant=8, n_subbands=2, n_chan=8, n_times=4, noise=False, rfi=None)
    start = dt.datetime(2026, 1, 15, 9)
    meta = _metadata(cfg, start)
    sky = dict(ra=np.array([meta["ra_icrs"][2]]), dec=np.array([meta["dec_icrs"][2]]),
               flux=np.array([10.0]), alpha=np.array([0.0]), name=np.array(["C"]),
               ref_freq=np.array([1.4e9]))
    g = simulate_group(tmp_path, start, cfg=cfg, sky=sky)
    truth = load_truth(g.truth)
    ds = open_group(g.files, n_subbands=2)
    v = ds.VISIBILITY.values
    a1, a2 = ds.baseline_antenna1_id.values, ds.baseline_antenna2_id.values
    idx = {int(n): i for i, n in enumerate(truth["antenna_numbers"])}
    p = np.array([idx[int(n)] for n in ds.antenna_number.values[a1]])
    q = np.array([idx[int(n)] for n in ds.antenna_number.values[a2]])
    B, G = truth["bandpass"], truth["gains"]
    gain = (G[:, p, None, :] * np.conj(G[:, q, None, :])
            * B[None, p] * np.conj(B[None, q]))
    cross = a1 != a2
    ratio = v[:, cross] / gain[:, cross]
    # the source is at the phase centre of integration 2 only; there it is 10 Jy x beam
    assert np.allclose(ratio[2].imag, 0, atol=1e-3 * 10)
    np.testing.assert_allclose(ratio[2].real, 10.0, rtol=1e-3)


def test_noise_has_the_radiometer_level(tmp_path):
    cfg = SimConfig(n_ant=8, n_subbands=1, n_chan=16, n_times=24, gains=False, rfi=None,
                    source_density=0.0, sefd_jy=5800.0)
    g = simulate_group(tmp_path, cfg=cfg)
    ds = open_group(g.files, n_subbands=1)
    cross = (ds.baseline_antenna1_id != ds.baseline_antenna2_id).values
    v = ds.VISIBILITY.values[:, cross]
    sigma = 5800.0 / np.sqrt(2 * tel.subband_channel_width(16) * tel.INTEGRATION_S)
    assert np.std(v.real) == pytest.approx(sigma, rel=0.03)
    assert np.std(v.imag) == pytest.approx(sigma, rel=0.03)
    assert abs(np.mean(v)) < 0.05 * sigma


def test_rfi_truth_mask_marks_what_was_injected(small_group, small_cfg, tmp_path):
    """The same group without RFI differs from it exactly where the truth mask says."""
    import dataclasses

    twin = simulate_group(tmp_path, small_group.start,
                          cfg=dataclasses.replace(small_cfg, rfi=None), calibrator=True)
    truth = load_truth(small_group.truth)
    ds = open_group(small_group.files, n_subbands=4)
    diff = np.abs(ds.VISIBILITY.values - open_group(twin.files, n_subbands=4).VISIBILITY.values)
    nums = ds.antenna_number.values
    bad = np.isin(nums[ds.baseline_antenna1_id.values], truth["bad_antennas"]) | np.isin(
        nums[ds.baseline_antenna2_id.values], truth["bad_antennas"])
    tf = truth["rfi_tf_mask"]
    assert tf.shape == (small_cfg.n_times, small_cfg.n_subbands * small_cfg.n_chan)
    assert tf.any() and bad.sum() == small_cfg.n_ant  # its crosses and its auto
    mask = tf[:, None, :, None] | bad[None, :, None, None]
    mask = np.broadcast_to(mask, diff.shape)
    assert np.all(diff[~mask] == 0)                 # nothing injected outside the mask
    sigma = float(truth["sigma"])
    scale = np.abs(truth["gains"]).mean() * np.abs(truth["bandpass"]).mean()
    good = np.broadcast_to(~bad[None, :, None, None], diff.shape)
    assert np.median(diff[mask & good]) > 5 * sigma * scale
    assert np.median(diff[np.broadcast_to(bad[None, :, None, None], diff.shape)]) > 10 * sigma


def test_deterministic_from_the_seed(tmp_path):
    cfg = SimConfig(n_ant=5, n_subbands=1, n_chan=4, n_times=2)
    a = simulate_group(tmp_path / "a", cfg=cfg)
    b = simulate_group(tmp_path / "b", cfg=cfg)
    c = simulate_group(tmp_path / "c", cfg=SimConfig(n_ant=5, n_subbands=1, n_chan=4,
                                                     n_times=2, seed=2))
    read = lambda g: h5py.File(g.files[0])["Data/visdata"][()]  # noqa: E731
    assert np.array_equal(read(a), read(b))
    assert not np.array_equal(read(a), read(c))


def test_consecutive_groups_share_a_sky_and_the_calibrator_transits(tmp_path):
    cfg = SimConfig(n_ant=6, n_subbands=1, n_chan=4, n_times=4, rfi=None)
    groups = simulate(tmp_path, n_groups=2, cfg=cfg, calibrator_group=1)
    t0, t1 = load_truth(groups[0].truth), load_truth(groups[1].truth)
    assert list(t0["sky_name"]) == list(t1["sky_name"]) and "SIMCAL" in list(t1["sky_name"])
    i = list(t1["sky_name"]).index("SIMCAL")
    # transits at the middle of group 1: the phase centre of its middle integration
    assert t1["sky_ra"][i] == pytest.approx(t1["phase_center_ra"][2], abs=1e-9)
    assert t1["times_unix"][0] - t0["times_unix"][0] == pytest.approx(4 * tel.INTEGRATION_S)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="n_subbands"):
        SimConfig(n_subbands=17)
    with pytest.raises(ValueError, match="n_chan"):
        SimConfig(n_chan=0)


def test_calibrator_group_writes_its_catalogue_for_the_cli(tmp_path):
    """``contimg simulate --calibrator-group K`` writes ``calibrators.csv`` beside the
    files and says so; ``contimg calibrate --catalog`` then finds and solves the
    simulated calibrator without any Python."""
    import json
    import subprocess
    import sys

    out = tmp_path / "sim"
    r = subprocess.run([sys.executable, "-m", "contimg.cli", "simulate", "--out", str(out),
                        "--groups", "2", "--calibrator-group", "1", "--antennas", "12",
                        "--subbands", "2", "--channels", "8", "--integrations", "6",
                        "--no-rfi"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    cat = out / "calibrators.csv"
    assert cat.is_file() and str(cat) in r.stdout + r.stderr     # and it says so
    lines = cat.read_text().splitlines()
    assert lines[0].startswith("name,ra_deg,dec_deg,flux_jy") and lines[1].startswith("SIMCAL,")

    from contimg.io.ms import write_ms
    from contimg.io.uvh5 import find_groups, open_group

    groups = find_groups(out)
    ms = write_ms(open_group(groups[1], n_subbands=2), tmp_path / "cal.ms")
    r = subprocess.run([sys.executable, "-m", "contimg.cli", "calibrate", str(ms),
                        "--catalog", str(cat), "--db", str(tmp_path / "s.sqlite3"),
                        "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["calibrator"] == "SIMCAL" and res["status"] == "valid"
