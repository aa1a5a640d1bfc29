"""Calibration end to end: simulate -> corrupt -> solve -> compare with the truth; tables,
registry, apply, bad calibrations; interop with CASA (bandpass/gaincal/applycal) and
WSClean (image of the corrected calibrator).

The simulator's calibrator group: a 20 Jy (alpha = -0.7) source SIMCAL transits at the
middle integration at the pointing declination; its catalogue entry is given as a
user CSV. The group also holds the simulator's field sources (not in the model), per
antenna bandpasses (delays, ripples) and slowly varying gains, and thermal noise.

Thermal-noise bound used below. With per-component noise sigma on each visibility
(``truth["sigma"]``, i.e. E|n|^2 = 2 sigma^2) and the calibrator's apparent flux S,
one antenna's gain averaged over K independent samples on each of its N-1 baselines
has a complex standard deviation

    sigma_g = sqrt(2) sigma / (S sqrt((N - 1) K))          (|g| ~ 1).

The bandpass uses K = n_times per channel, the gains K = n_chan per integration; the
product B*G of one antenna referenced to the reference antenna carries both its own
and the reference antenna's errors, so its expected rms error is
sqrt(2 (sigma_B^2 + sigma_G^2)). We require the measured rms over all antennas,
channels, integrations and both polarisations to lie within [0.5, 1.5] times that:
at the noise limit (not above it), and not suspiciously below it.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from casarun import casa_applycal, casa_solve
from contimg import caltables, sky
from contimg import calibrate as cc
from contimg.io.ms import open_ms, write_ms
from contimg.io.uvh5 import open_group
from contimg.simulate import SimConfig, simulate_group, write_calibrator_catalog
from kernels.constants import SECONDS_PER_DAY

WSCLEAN = shutil.which("wsclean")
NSUB, NCHAN, NTIME, NANT = 2, 8, 6, 16


def _have_module(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _make(tmp, n_ant=NANT, sky_arg=None, **cfg_kw):
    cfg = SimConfig(n_ant=n_ant, n_subbands=NSUB, n_chan=NCHAN, n_times=NTIME, rfi=None,
                    threads=1, **cfg_kw)
    g = simulate_group(tmp / "raw", cfg=cfg, calibrator=True, sky=sky_arg)
    truth = g.load_truth()
    cat = write_calibrator_catalog([g], tmp / "cal.csv")
    ds = open_group(g.files, n_subbands=NSUB)
    return dict(group=g, truth=truth, catalog=str(cat), ds=ds, cfg=cfg)


@pytest.fixture(scope="module")
def calgroup(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("calgroup"))


@pytest.fixture(scope="module")
def cal_ms(calgroup, tmp_path_factory):
    """The group as an MS with MODEL_DATA = our model of SIMCAL (what CASA needs)."""
    from graphs import calibrate as gcal

    ds = calgroup["ds"]
    tr = cc.find_calibrator(ds, calgroup["catalog"])
    srcs = [t.source for t in tr]
    flux = sky.apparent_flux(srcs, ds.PHASE_CENTER_RA.values, ds.PHASE_CENTER_DEC.values,
                             ds.frequency.values)
    model = gcal.predict_model(ds, [s.ra for s in srcs], [s.dec for s in srcs], flux)
    path = tmp_path_factory.mktemp("calms") / "cal.ms"
    write_ms(ds.assign(MODEL=model), path, model_data="MODEL")
    return str(path)


def _copy(ms, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(ms, dst)
    return str(dst)


def _truth_product(truth, refant_station):
    st = list(truth["antenna_numbers"])
    rc = st.index(refant_station)
    true = truth["gains"][:, :, None, :] * truth["bandpass"][None]     # (t, a, f, p)
    return true * np.conj(true[:, rc:rc + 1]) / np.abs(true[:, rc:rc + 1]), st, rc


def _est_product(sol, st, rc):
    B = sol.BANDPASS.values[st]            # (a, f, p)
    G = sol.GAIN.values[:, st]             # (t, a, p)
    est = G[:, :, None, :] * B[None]
    return est * np.conj(est[:, rc:rc + 1]) / np.abs(est[:, rc:rc + 1])


def test_find_calibrator(calgroup, cal_ms):
    tr = cc.find_calibrator(calgroup["ds"], calgroup["catalog"])
    assert [t.name for t in tr] == ["SIMCAL"]
    assert tr[0].integration == NTIME // 2
    assert tr[0].t_transit == pytest.approx(calgroup["truth"]["times_unix"][NTIME // 2],
                                            abs=0.5)
    # the MS path gives the same answer from TIME / FIELD only
    tr2 = cc.find_calibrator(cal_ms, calgroup["catalog"])
    assert tr2[0].t_transit == pytest.approx(tr[0].t_transit, abs=1e-3)
    # the built-in Perley-Butler list has nothing at this RA / dec
    assert cc.find_calibrator(calgroup["ds"]) == []


def test_solutions_at_thermal_noise_limit(calgroup):
    truth = calgroup["truth"]
    sol, transits, q = cc.solve_dataset(calgroup["ds"], catalog=calgroup["catalog"])
    ref = int(sol.REFANT.values)
    true, st, rc = _truth_product(truth, ref)
    est = _est_product(sol, st, rc)
    err = np.abs(est - true)
    # apparent flux of SIMCAL through the beam, averaged over the group and band
    s_app = float(np.mean(sky.apparent_flux(
        [transits[0].source], calgroup["ds"].PHASE_CENTER_RA.values,
        calgroup["ds"].PHASE_CENTER_DEC.values, calgroup["ds"].frequency.values)))
    sigma = float(truth["sigma"])
    n = len(st)
    sig_b = np.sqrt(2) * sigma / (s_app * np.sqrt((n - 1) * NTIME))
    sig_g = np.sqrt(2) * sigma / (s_app * np.sqrt((n - 1) * NSUB * NCHAN))
    bound = np.sqrt(2 * (sig_b ** 2 + sig_g ** 2))
    others = [i for i in range(n) if i != rc]
    rms = float(np.sqrt(np.mean(err[:, others] ** 2)))
    amp = np.sqrt(np.mean((np.abs(est) / np.abs(true) - 1)[:, others] ** 2))
    phase = np.sqrt(np.mean(np.angle(est / true)[:, others] ** 2))
    print(f"gain x bandpass rms error {rms:.5f}, thermal bound {bound:.5f}, "
          f"ratio {rms / bound:.2f}; amplitude {amp:.5f}, phase {phase:.5f} rad")
    assert 0.5 * bound < rms < 1.5 * bound
    # the solver's own error estimate agrees with the bound (per-channel bandpass)
    berr = float(np.median(sol.BANDPASS_ERR.values[st]))
    assert berr == pytest.approx(sig_b, rel=0.25)
    # quality figures: all converged, nothing flagged, chi^2 per sample ~ 2 sigma^2
    # (plus the unmodelled field sources: within 25 %)
    assert q["bandpass_converged_fraction"] == 1.0 and q["gain_converged_fraction"] == 1.0
    assert q["bandpass_flagged_fraction"] == 0.0 and q["gain_flagged_fraction"] == 0.0
    assert q["bandpass_chi2_per_sample_median"] == pytest.approx(2 * sigma ** 2, rel=0.25)


def test_noise_free_solutions_are_exact(tmp_path):
    """No noise, only the calibrator in the sky: the solutions are the true gains to
    the accuracy of the model (exact DFT against the simulator's apparent-frame
    geometry; differential aberration across 0.4 deg is ~0.1 arcsec)."""
    empty = {k: [] for k in ("ra", "dec", "flux", "alpha", "name", "ref_freq")}
    d = _make(tmp_path, n_ant=10, noise=False, sky_arg=empty)
    sol, _, q = cc.solve_dataset(d["ds"], catalog=d["catalog"])
    true, st, rc = _truth_product(d["truth"], int(sol.REFANT.values))
    est = _est_product(sol, st, rc)
    err = np.abs(est - true)
    print(f"noise-free: max error {err.max():.2e}, rms {np.sqrt(np.mean(err ** 2)):.2e}")
    # model-limited at ~0.1 %: an order of magnitude below the thermal errors above
    assert err.max() < 5e-3
    assert np.sqrt(np.mean(err ** 2)) < 1e-3


def test_calibrate_ms_tables_and_registry(calgroup, cal_ms, tmp_path):
    from contimg.state import StateDB

    ms = _copy(cal_ms, tmp_path, "a.ms")
    db = StateDB(path=tmp_path / "state.sqlite3")
    res = cc.calibrate_ms(ms, catalog=calgroup["catalog"], db=db, name="cal1")
    assert res.calibrator == "SIMCAL" and res.status == "valid"
    assert set(res.tables) == {"B", "G"}
    assert res.tables["B"] == str(tmp_path / "cal1.B")
    # the tables read back equal the solutions (conjugated on disk, back on reading)
    b = caltables.read_caltable(res.tables["B"])
    g = caltables.read_caltable(res.tables["G"])
    assert b["kind"] == "B" and g["kind"] == "G" and b["refant"] == res.refant
    np.testing.assert_array_equal(b["cparam"][0], res.solutions.BANDPASS.values)
    np.testing.assert_array_equal(g["cparam"][:, :, 0], res.solutions.GAIN.values)
    np.testing.assert_array_equal(b["flag"][0], res.solutions.BANDPASS_FLAG.values)
    raw = caltables.read_caltable(res.tables["B"], convention="casa")
    np.testing.assert_array_equal(raw["cparam"], np.conj(b["cparam"]))
    np.testing.assert_allclose(g["times_unix"], calgroup["truth"]["times_unix"], atol=1e-5)
    assert list(g["field_id"]) == list(range(NTIME))
    # the registry: valid, window +-12 h around the transit
    row = db.find_calset(res.t_transit + 3600)
    assert row is not None and row["name"] == "cal1" and row["in_window"]
    assert row["valid_end"] - row["valid_start"] == pytest.approx(24 * 3600)
    tables = row["tables"] if isinstance(row["tables"], dict) else json.loads(row["tables"])
    assert tables == res.tables
    assert db.find_calset(res.t_transit + 2 * SECONDS_PER_DAY)["in_window"] is False


def test_apply_graph_and_apply_ms_agree(calgroup, cal_ms, tmp_path):
    from graphs import calibrate as gcal

    ds = open_ms(cal_ms)
    sol, _, _ = cc.solve_dataset(ds, catalog=calgroup["catalog"])
    out = gcal.apply(ds, sol)
    assert hasattr(out.VISIBILITY.data, "dask")                       # lazy
    cor = out.VISIBILITY.values
    model = open_ms(cal_ms, data_column="MODEL_DATA").VISIBILITY.values
    cross = (ds.baseline_antenna1_id != ds.baseline_antenna2_id).values
    ratio = cor[:, cross] / model[:, cross]
    # corrected / model = 1 within the noise per sample (sigma / S ~ 5 %) on average
    assert abs(np.mean(ratio) - 1) < 0.01
    assert np.std(ratio.real) < 3 * float(calgroup["truth"]["sigma"]) / 19.0 + 0.05
    # apply_ms through the CASA tables gives the same numbers
    ms = _copy(cal_ms, tmp_path, "b.ms")
    res = cc.calibrate_ms(ms, catalog=calgroup["catalog"], name="cal2")
    cc.apply_ms(ms, res.tables)
    via_ms = open_ms(ms, data_column="CORRECTED_DATA").VISIBILITY.values
    np.testing.assert_allclose(via_ms, cor, rtol=1e-5, atol=1e-4)


def test_bad_calibration_is_reported_and_never_registered_valid(calgroup, cal_ms, tmp_path):
    from casacore import tables as ct

    from contimg.state import StateDB

    db = StateDB(path=tmp_path / "state.sqlite3")
    # 1. no calibrator in the beam
    far = tmp_path / "far.csv"
    far.write_text("name,ra_deg,dec_deg,flux_jy\nFAR,10.0,-20.0,30.0\n")
    ms = _copy(cal_ms, tmp_path, "c.ms")
    with pytest.raises(cc.NoCalibratorError, match=r"no calibrator .*far.csv"):
        cc.calibrate_ms(ms, catalog=str(far), db=db, name="nocal")
    # 2. too much flagged
    ms2 = _copy(cal_ms, tmp_path, "d.ms")
    with ct.table(ms2, readonly=False, ack=False) as tb:
        f = tb.getcol("FLAG")
        f[: int(0.9 * len(f))] = True
        tb.putcol("FLAG", f)
    with pytest.raises(cc.TooMuchFlaggedError, match=r"% of the cross-correlations"):
        cc.calibrate_ms(ms2, catalog=calgroup["catalog"], db=db, name="flagged")
    # 3. no convergence
    with pytest.raises(cc.NoConvergenceError, match="converged within 1 iterations"):
        cc.calibrate_ms(ms, catalog=calgroup["catalog"], db=db, name="noconv", max_iter=1)
    # 4. every solution below the minimum SNR
    with pytest.raises(cc.TooMuchFlaggedError,
                       match=r"100.0 % of gain solutions flagged \(SNR < 1000000"):
        cc.calibrate_ms(ms, catalog=calgroup["catalog"], db=db, name="lowsnr", min_snr=1e6)
    # all rejected, with reasons; none usable; no tables left behind
    rej = {r["name"]: r for r in db.list_calsets(status="rejected")}
    assert set(rej) == {"nocal", "flagged", "noconv", "lowsnr"}
    assert rej["nocal"]["reason"].startswith("no_calibrator")
    assert rej["flagged"]["reason"].startswith("too_much_flagged")
    assert rej["noconv"]["reason"].startswith("no_convergence")
    assert db.list_calsets(status="valid") == []
    assert db.find_calset(float(calgroup["truth"]["times_unix"][3])) is None
    assert not any(p.name.endswith((".B", ".G")) for p in tmp_path.iterdir())
    # a missing MS is a clear error
    with pytest.raises(FileNotFoundError, match="nothere.ms"):
        cc.apply_ms(str(tmp_path / "nothere.ms"), [])


def test_gain_interpolation_in_time():
    """Linear interpolation is exact for gains linear in amplitude and phase; nearest
    picks the nearest unflagged solution; flagged solutions are skipped."""
    from graphs.calibrate import interpolate_gains

    ts = np.array([0.0, 10.0, 20.0, 30.0])
    amp = lambda t: 1.0 + 0.01 * t                           # noqa: E731
    ph = lambda t: -2.0 + 0.15 * t                           # noqa: E731 (crosses +-pi)
    g = (amp(ts) * np.exp(1j * ph(ts)))[:, None, None] * np.ones((1, 3, 2))
    flag = np.zeros(g.shape, bool)
    flag[2, 1, 0] = True
    t = np.array([-5.0, 3.0, 14.0, 26.0, 40.0])
    lin, lf = interpolate_gains(ts, g, flag, t, "linear")
    tc = np.clip(t, 0, 30)
    np.testing.assert_allclose(lin[:, 0, 0], amp(tc) * np.exp(1j * ph(tc)), rtol=1e-12)
    assert not lf.any()
    # antenna 1, pol 0: the 20 s solution is flagged -> between 10 and 30 s
    np.testing.assert_allclose(lin[3, 1, 0], amp(26.0) * np.exp(1j * ph(26.0)), rtol=1e-12)
    near, _ = interpolate_gains(ts, g, flag, t, "nearest")
    np.testing.assert_allclose(near[:, 0, 0], g[[0, 0, 1, 3, 3], 0, 0])
    allflag = np.ones(g.shape, bool)
    _, f2 = interpolate_gains(ts, g, allflag, t, "linear")
    assert f2.all()


def test_cli_calibrate_and_apply(calgroup, cal_ms, tmp_path, capsys):
    from contimg.cli import main

    ms = _copy(cal_ms, tmp_path, "e.ms")
    db = str(tmp_path / "s.sqlite3")
    assert main(["calibrate", ms, "--catalog", calgroup["catalog"], "--db", db,
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibrator"] == "SIMCAL" and out["status"] == "valid"
    assert main(["apply", ms, "--db", db]) == 0
    from casacore import tables as ct

    with ct.table(ms, ack=False) as tb:
        assert "CORRECTED_DATA" in tb.colnames()
    far = tmp_path / "far.csv"
    far.write_text("name,ra_deg,dec_deg,flux_jy\nFAR,10.0,-20.0,30.0\n")
    assert main(["calibrate", ms, "--catalog", str(far)]) == 2
    assert "calibration rejected (no_calibrator)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------
# interop
# ---------------------------------------------------------------------------------

@pytest.mark.interop
@pytest.mark.skipif(not _have_module("casatasks"), reason="casatasks is not installed")
def test_casa_agrees_with_our_solutions_and_applies_our_tables(calgroup, cal_ms, tmp_path):
    """CASA bandpass + gaincal on the same MS and MODEL_DATA (one FIELD per integration:
    ``combine='field,scan'``) give our solutions; CASA applycal with our tables gives
    our CORRECTED_DATA."""
    from casacore import tables as ct

    ms = _copy(cal_ms, tmp_path, "f.ms")
    res = cc.calibrate_ms(ms, catalog=calgroup["catalog"], name="ours")
    casa_solve(tmp_path, ms, tmp_path / "casa", res.refant, combine="field,scan")
    for kind in ("B", "G"):
        ours = caltables.read_caltable(res.tables[kind])
        theirs = caltables.read_caltable(tmp_path / f"casa.{kind}")   # CASA's own table
        np.testing.assert_array_equal(ours["flag"], theirs["flag"])
        ok = ~ours["flag"]
        diff = np.abs(ours["cparam"] - theirs["cparam"])[ok]
        err = float(np.median(ours["paramerr"][ok]))
        print(f"{kind}: max |ours - CASA| {diff.max():.2e} = {diff.max() / err:.3f} sigma, "
              f"rms {np.sqrt(np.mean(diff ** 2)):.2e}; PARAMERR ours/CASA "
              f"{err / float(np.median(theirs['paramerr'][ok])):.3f}")
        # same solutions to a small fraction of their own thermal error
        assert diff.max() < (0.1 if kind == "B" else 0.5) * err
        np.testing.assert_allclose(np.median(ours["snr"][ok]), np.median(theirs["snr"][ok]),
                                   rtol=0.1)
    # applycal with our tables == our apply_ms
    ms_casa = _copy(cal_ms, tmp_path, "g.ms")
    ms_ours = _copy(cal_ms, tmp_path, "h.ms")
    casa_applycal(tmp_path, ms_casa, [res.tables["B"], res.tables["G"]],
                  interp=["nearest", "linear"])
    cc.apply_ms(ms_ours, res.tables)
    with ct.table(ms_casa, ack=False) as a, ct.table(ms_ours, ack=False) as b:
        ca, cb = a.getcol("CORRECTED_DATA"), b.getcol("CORRECTED_DATA")
        fa, fb = a.getcol("FLAG"), b.getcol("FLAG")
    np.testing.assert_array_equal(fa, fb)
    ok = ~fa
    rel = np.abs(ca - cb)[ok] / np.abs(ca[ok])
    print(f"applycal vs apply_ms: max relative difference {rel.max():.2e}")
    assert rel.max() < 1e-5


@pytest.mark.interop
@pytest.mark.skipif(WSCLEAN is None, reason="wsclean is not installed")
def test_end_to_end_image_flux_of_the_calibrator(tmp_path):
    """simulate -> MS -> calibrate_ms -> apply_ms -> WSClean on CORRECTED_DATA.

    The group keeps the simulator's field sources and noise. WSClean images the
    transit integration's FIELD (it would image every field on the first field's
    centre without rephasing a drift scan); SIMCAL sits at that field's centre. The
    model flux is its spectrum times the beam, averaged over the band.
    """
    from astropy.io import fits

    d = _make(tmp_path, n_ant=32)
    ms = str(tmp_path / "e2e.ms")
    write_ms(d["ds"], ms)
    res = cc.calibrate_ms(ms, catalog=d["catalog"])
    cc.apply_ms(ms, res.tables)
    mid = NTIME // 2
    name = str(tmp_path / "img")
    cmd = [WSCLEAN, "-j", "1", "-quiet", "-name", name, "-size", "1024", "1024",
           "-scale", "6asec", "-pol", "I", "-weight", "natural", "-field", str(mid),
           "-data-column", "CORRECTED_DATA", "-niter", "3000", "-mgain", "0.8",
           "-auto-threshold", "3", "-no-update-model-required", ms]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with fits.open(f"{name}-image.fits") as h:
        img = h[0].data[0, 0]
    peak = float(img[512 - 3:512 + 4, 512 - 3:512 + 4].max())    # SIMCAL at the centre
    src = res.transits[0].source
    ds = d["ds"]
    flux = sky.apparent_flux([src], ds.PHASE_CENTER_RA.values[mid:mid + 1],
                             ds.PHASE_CENTER_DEC.values[mid:mid + 1], ds.frequency.values)
    model = float(flux.mean())
    # the uncalibrated data would not do: check the DATA image is far off
    print(f"calibrator peak {peak:.3f} Jy vs model {model:.3f} Jy "
          f"({100 * (peak / model - 1):+.2f} %)")
    assert peak == pytest.approx(model, rel=0.02)


def test_result_is_plain_data(calgroup, cal_ms, tmp_path):
    """The stream records results: asdict of a CalResult is JSON-serialisable after
    numpy scalars are converted (no Dataset inside), and apply_ms takes the registry's
    ``tables`` as a dict or as its JSON text."""
    import dataclasses

    ms = _copy(cal_ms, tmp_path, "p.ms")
    res = cc.calibrate_ms(ms, catalog=calgroup["catalog"])
    assert res.solutions is not None
    d = dataclasses.asdict(res)
    assert "solutions" not in d
    json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    cc.apply_ms(ms, json.dumps(res.tables))
    a = open_ms(ms, data_column="CORRECTED_DATA").VISIBILITY.values
    cc.apply_ms(ms, res.tables)                      # again: replaces CORRECTED_DATA
    b = open_ms(ms, data_column="CORRECTED_DATA").VISIBILITY.values
    np.testing.assert_array_equal(b, a)
