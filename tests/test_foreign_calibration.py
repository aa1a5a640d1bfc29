"""Calibration of Measurement Sets contimg did not write (tests/foreign.py): CASA's
simulator (VLA, RR/LL and RR/RL/LR/LL, three pointed fields) and pyuvdata's write_ms
(ATA-like, XX/YY, two fields).

* the calibrator search on pointed scans: per field, only calibrators observed, clear
  errors naming the field and the nearest calibrator (the old search divided by a zero
  drift rate);
* ``contimg calibrate --field`` solves the simulated gains and bandpasses (truth);
* ``contimg apply`` corrects every correlation (cross hands by the two feeds' terms)
  and ``--field`` only that field's rows;
* interop: CASA ``bandpass``/``gaincal`` on the same MS and MODEL_DATA agree with our
  tables within 1 % in amplitude and 1 deg in phase, with the same SNR (CASA's
  definition) and flags; ``applycal`` with our tables gives our CORRECTED_DATA.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from casarun import casa_applycal, casa_solve
from contimg import caltables
from contimg import calibrate as cc
from kernels.constants import MJD_UNIX_OFFSET_S

FOREIGN = ["casa_sim_ms", "casa_sim_ms_4pol", "pyuvdata_ms"]


def _have(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _cli_calibrate(fms, ms, field, *extra):
    from contimg.cli import main

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["calibrate", ms, "--catalog", fms.catalog, "--field", str(field),
                   "--json", *extra])
    out = buf.getvalue()
    assert rc == 0, out
    return json.loads(out[out.index("{"):])


def _referenced(x, ref):
    """Phases relative to antenna ``ref`` (axis -3 of (..., nant, nchan, npol))."""
    r = x[..., ref:ref + 1, :, :]
    return x * np.conj(r) / np.abs(r)


# ---------------------------------------------------------------------------------
# the calibrator search on pointed scans
# ---------------------------------------------------------------------------------

def test_pointed_fields_find_only_the_observed_calibrator(casa_sim_ms):
    fms = casa_sim_ms
    found = cc.find_calibrator(fms.path, fms.catalog)
    # DECOY (0.3 deg off in declination, 40 deg away in RA) is never observed
    assert [t.name for t in found] == ["3C286"]
    t = found[0]
    assert (t.kind, t.field_id, t.field_name) == ("pointed", 0, "3C286")
    assert t.in_data and t.separation_deg < 1e-4 and t.peak_response == pytest.approx(1.0)
    lo, hi = (x - MJD_UNIX_OFFSET_S for x in fms.scans["3C286"])
    assert lo <= t.t_transit <= hi
    assert len(t.index) == 6
    # by field, as an id, a digit string or a name
    assert [x.name for x in cc.find_calibrator(fms.path, fms.catalog, field=0)] == ["3C286"]
    assert [x.name for x in cc.find_calibrator(fms.path, fms.catalog, field="0")] == ["3C286"]
    assert cc.find_calibrator(fms.path, fms.catalog, field="TGT1") == []
    # the same from the Dataset
    from contimg.io.ms import open_ms

    ds = open_ms(fms.path)
    assert [x.name for x in cc.find_calibrator(ds, fms.catalog)] == ["3C286"]


def test_no_calibrator_in_a_target_field_names_field_and_nearest(casa_sim_ms, tmp_path):
    fms = casa_sim_ms
    ms = fms.copy(tmp_path)
    with pytest.raises(cc.NoCalibratorError) as err:
        cc.calibrate_ms(ms, catalog=fms.catalog, field="TGT1")
    msg = str(err.value)
    assert "field 1 'TGT1'" in msg and "nearest: 3C286" in msg and "pointed" in msg
    assert "divide" not in msg
    # an unknown field: the CLI says which fields there are
    from contimg.cli import main

    assert main(["calibrate", ms, "--catalog", fms.catalog, "--field", "NOPE"]) == 2


def test_pointed_radius_is_the_primary_beam(casa_sim_ms, tmp_path):
    """A calibrator 0.2 deg from a VLA field centre is in the 25 m beam (HWHM 0.25 deg
    at 1.4 GHz), one 0.35 deg away is not; its apparent flux carries the response."""
    from contimg.msfields import beam_radius_deg

    fms = casa_sim_ms
    ra, dec = fms.field_dirs["TGT2"]
    cat = tmp_path / "c.csv"
    cat.write_text("name,ra_deg,dec_deg,flux_jy\n"
                   f"IN,{np.degrees(ra)},{np.degrees(dec) + 0.2},10\n"
                   f"OUT,{np.degrees(ra)},{np.degrees(dec) + 0.35},10\n")
    assert beam_radius_deg(25.0, fms.freqs.mean()) == pytest.approx(0.25, abs=0.01)
    found = cc.find_calibrator(fms.path, str(cat))
    assert [(t.name, t.field_name) for t in found] == [("IN", "TGT2")]
    assert 0.2 < found[0].peak_response < 0.7
    # the solve's model sees it through the 25 m beam, not DSA-110's 4.65 m one
    from contimg import sky, telescope
    from contimg.msfields import ms_geometry, through_own_beam

    (tr,) = through_own_beam(found, ms_geometry(fms.path))
    flux = sky.apparent_flux([tr.source], [ra], [dec], fms.freqs)[0, 0]
    sep = np.radians(0.2)
    np.testing.assert_allclose(flux, 10 * (fms.freqs / 1.4e9) ** -0.7
                               * telescope.airy_beam(sep, fms.freqs, 25.0), rtol=1e-3)
    assert flux.mean() == pytest.approx(10 * found[0].peak_response, rel=0.02)


# ---------------------------------------------------------------------------------
# contimg calibrate --field against the simulated truth
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("which", FOREIGN)
def test_cli_calibrate_field_recovers_the_truth(which, request, tmp_path):
    fms = request.getfixturevalue(which)
    ms = fms.copy(tmp_path)
    out = _cli_calibrate(fms, ms, fms.calibrator)
    assert out["calibrator"] == fms.calibrator and out["status"] == "valid"
    assert out["transits"][0]["field_name"] == fms.calibrator
    ref = out["refant"]
    B = caltables.read_caltable(out["tables"]["B"], convention="casa")
    G = caltables.read_caltable(out["tables"]["G"], convention="casa")
    assert B["cparam"].shape[-1] == 2                    # per feed, also for 4 correlations
    assert not B["flag"].any() and not G["flag"].any()
    # solutions B x G (every integration) against the truth, phases on the refant
    sol = B["cparam"][0][None] * G["cparam"]             # (ntime, nant, nchan, 2)
    true = (fms.gains[:, None, :] * fms.bandpass)[None]
    s, t = _referenced(sol, ref), _referenced(true, ref)
    amp = np.abs(np.abs(s) / np.abs(t) - 1)
    ph = np.degrees(np.abs(np.angle(s * np.conj(t))))
    print(f"{which}: truth vs ours: amplitude max {100 * amp.max():.3f} %, phase max "
          f"{ph.max():.3f} deg")
    # thermal noise: sigma 0.05 Jy per component on a ~15-22 Jy calibrator, 11
    # baselines x 6 integrations per channel -> ~0.1 %; allow ten times that
    assert amp.max() < 0.01 and ph.max() < 1.0


def test_without_field_the_calibrators_scan_is_used(pyuvdata_ms, tmp_path):
    """No --field on a multi-field MS: the solve uses the integrations of the field in
    which the calibrator is (not the target's): the same tables as --field 3C147."""
    fms = pyuvdata_ms
    a = cc.calibrate_ms(fms.copy(tmp_path / "a"), catalog=fms.catalog)
    b = cc.calibrate_ms(fms.copy(tmp_path / "b"), catalog=fms.catalog, field="3C147")
    assert a.calibrator == b.calibrator == "3C147" and a.refant == b.refant
    assert a.transits[0].field_name == "3C147" and len(a.transits[0].index) == 6
    for k in ("B", "G"):
        x, y = (caltables.read_caltable(r.tables[k]) for r in (a, b))
        np.testing.assert_array_equal(x["cparam"], y["cparam"])
        np.testing.assert_array_equal(x["field_id"], y["field_id"])
    assert set(caltables.read_caltable(a.tables["G"])["field_id"].tolist()) == {0}


def test_tai_time_calibrates_and_applies_as_utc(casa_sim_ms, tmp_path):
    """The same MS with TIME in TAI (37 s later, MEASINFO Ref TAI, as importuvfits
    writes): the same solutions and CORRECTED_DATA (gains interpolated on one clock)."""
    from casacore import tables as ct

    fms = casa_sim_ms
    utc, tai = fms.copy(tmp_path / "utc"), fms.copy(tmp_path / "tai")
    with ct.table(tai, readonly=False, ack=False) as tb:
        for col in ("TIME", "TIME_CENTROID"):
            tb.putcol(col, tb.getcol(col) + 37.0)
            kw = tb.getcolkeywords(col)
            kw["MEASINFO"]["Ref"] = "TAI"
            tb.putcolkeywords(col, kw)
    out = {}
    for ms in (utc, tai):
        r = cc.calibrate_ms(ms, catalog=fms.catalog, field="3C286", gain_interval=2)
        cc.apply_ms(ms, r.tables)
        with ct.table(ms, ack=False) as tb:
            out[ms] = (r, tb.getcol("CORRECTED_DATA"))
    (a, ca), (b, cb) = out[utc], out[tai]
    for k in ("B", "G"):
        np.testing.assert_allclose(caltables.read_caltable(b.tables[k])["cparam"],
                                   caltables.read_caltable(a.tables[k])["cparam"],
                                   rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cb, ca, rtol=1e-5, atol=1e-6)


def test_apply_corrects_cross_hands_and_only_the_field(casa_sim_ms_4pol, tmp_path):
    """RR/RL/LR/LL: every correlation divided by its two feeds' B x G (brute force from
    the tables); ``--field TGT1`` leaves the other fields' CORRECTED_DATA alone."""
    from casacore import tables as ct

    from contimg.cli import main

    fms = casa_sim_ms_4pol
    ms = fms.copy(tmp_path)
    out = _cli_calibrate(fms, ms, "0")
    B = caltables.read_caltable(out["tables"]["B"], convention="casa")["cparam"][0]
    G = caltables.read_caltable(out["tables"]["G"], convention="casa")["cparam"][:, :, 0]
    with ct.table(ms, ack=False) as tb:
        data = tb.getcol("DATA")
        old = tb.getcol("CORRECTED_DATA")
        a1, a2 = tb.getcol("ANTENNA1"), tb.getcol("ANTENNA2")
        fid = tb.getcol("FIELD_ID")
        time = tb.getcol("TIME")
    assert main(["apply", ms, out["tables"]["B"], out["tables"]["G"], "--interp",
                 "nearest", "--field", "TGT1"]) == 0
    with ct.table(ms, ack=False) as tb:
        corr = tb.getcol("CORRECTED_DATA")
    other = fid != 1
    np.testing.assert_array_equal(corr[other], old[other])
    # brute force on TGT1: nearest gain solution in time (all from the 3C286 scan: the last)
    gt = caltables.read_caltable(out["tables"]["G"])["times_unix"] + MJD_UNIX_OFFSET_S
    k = np.abs(time[:, None] - gt[None]).argmin(axis=1)
    feeds = [(0, 0), (0, 1), (1, 0), (1, 1)]
    want = np.empty_like(data)
    for c, (p, q) in enumerate(feeds):
        jp = G[k, a1, p][:, None] * B[a1, :, p]
        jq = G[k, a2, q][:, None] * B[a2, :, q]
        want[..., c] = data[..., c] / (jp * np.conj(jq))
    sel = fid == 1
    np.testing.assert_allclose(corr[sel], want[sel], rtol=2e-5, atol=1e-6)
    # the corrected target: RR and LL equal, cross hands noise-like
    assert abs(np.mean(corr[sel][..., 0] / corr[sel][..., 3]) - 1) < 0.05


# ---------------------------------------------------------------------------------
# interop: CASA bandpass / gaincal / applycal on the same MS
# ---------------------------------------------------------------------------------

def _write_model(fms, ms):
    """MODEL_DATA: the calibrator's spectrum on its field (parallel hands), 0 elsewhere
    -- our model (the calibrator sits at its field's phase centre)."""
    from casacore import tables as ct

    spec = fms.spectrum(fms.calibrator)
    cal = fms.field_id(fms.calibrator)
    with ct.table(ms, readonly=False, ack=False) as tb:
        fid = tb.getcol("FIELD_ID")
        model = np.zeros((fid.size, spec.size, len(fms.corr)), np.complex64)
        for c in fms.parallel:
            model[fid == cal, :, c] = spec
        if "MODEL_DATA" not in tb.colnames():
            desc = tb.getcoldesc("DATA")
            desc.pop("comment", None)
            tb.addcols(ct.maketabdesc(ct.makecoldesc("MODEL_DATA", desc)),
                       tb.getdminfo("DATA") | {"NAME": "ModelData"})
        tb.putcol("MODEL_DATA", model)


@pytest.mark.interop
@pytest.mark.skipif(not _have("casatasks"), reason="casatasks is not installed")
@pytest.mark.parametrize("which", FOREIGN)
def test_casa_agrees_on_foreign_ms(which, request, tmp_path):
    from casacore import tables as ct

    fms = request.getfixturevalue(which)
    ms = fms.copy(tmp_path)
    _write_model(fms, ms)
    out = _cli_calibrate(fms, ms, fms.calibrator)
    casa_solve(tmp_path, ms, tmp_path / "casa", out["refant"],
               field=fms.field_id(fms.calibrator), minsnr=3.0)
    worst = {}
    for kind in ("B", "G"):
        ours = caltables.read_caltable(out["tables"][kind])
        theirs = caltables.read_caltable(tmp_path / f"casa.{kind}")
        if kind == "G":      # CASA writes the scan's solutions only; ours too (same times)
            assert ours["cparam"].shape == theirs["cparam"].shape
        np.testing.assert_array_equal(ours["flag"], theirs["flag"])
        ok = ~ours["flag"]
        a, b = ours["cparam"][ok], theirs["cparam"][ok]
        amp = float(np.max(np.abs(np.abs(a) / np.abs(b) - 1)))
        ph = float(np.max(np.abs(np.degrees(np.angle(a * np.conj(b))))))
        snr = ours["snr"][ok] / theirs["snr"][ok]
        worst[kind] = (amp, ph, float(np.median(snr)), float(snr.min()), float(snr.max()))
        print(f"{which} {kind}: ours vs CASA amplitude max {100 * amp:.4f} %, phase max "
              f"{ph:.4f} deg; SNR ours/CASA median {np.median(snr):.4f} "
              f"[{snr.min():.4f}, {snr.max():.4f}]")
        assert amp < 0.01 and ph < 1.0
        # SNR (kernels.jones.casa_errors): like CASA, one noise estimate per solution
        # cell for both parallel hands, so ours/CASA is one number per cell (bandpass:
        # per channel; gains: per integration) for every antenna and feed ...
        r = ours["snr"] / np.where(theirs["snr"] > 0, theirs["snr"], np.nan)
        cells = r.transpose(2, 0, 1, 3).reshape(r.shape[2], -1) if kind == "B" else \
            r.reshape(r.shape[0], -1)
        spread = np.nanmax(cells, axis=1) / np.nanmin(cells, axis=1) - 1
        print(f"  per-cell spread of ours/CASA across antennas and feeds: max "
              f"{100 * spread.max():.2f} %")
        assert spread.max() < 0.01
        # ... and CASA estimates the noise from the data averaged over the cell (66
        # baselines x 2 feeds: ~200 degrees of freedom, a +-10 % estimate), we from the
        # unaveraged samples: the same on average, within a few sigma of CASA's scatter
        assert np.median(snr) == pytest.approx(1.0, abs=0.05)
        assert 0.75 < snr.min() and snr.max() < 1.3
    # applycal with our tables == contimg apply, every field and correlation
    ms_casa = fms.copy(tmp_path / "c")
    ms_ours = fms.copy(tmp_path / "o")
    casa_applycal(tmp_path, ms_casa, [out["tables"]["B"], out["tables"]["G"]],
                  interp=["nearest", "linear"])
    from contimg.cli import main

    assert main(["apply", ms_ours, out["tables"]["B"], out["tables"]["G"]]) == 0
    with ct.table(ms_casa, ack=False) as x, ct.table(ms_ours, ack=False) as y:
        ca, cb = x.getcol("CORRECTED_DATA"), y.getcol("CORRECTED_DATA")
        fa, fb = x.getcol("FLAG"), y.getcol("FLAG")
    np.testing.assert_array_equal(fa, fb)
    good = ~fa & (np.abs(ca) > 0)
    rel = np.abs(ca - cb)[good] / np.abs(ca[good])
    print(f"{which}: applycal vs contimg apply: max relative difference {rel.max():.2e}")
    assert rel.max() < 1e-5


# ---------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------

def test_apply_feed_jones_brute_force_and_parallel_hands_as_apply_jones():
    from kernels.jones import apply_feed_jones
    from kernels.solvers import apply_jones

    rng = np.random.default_rng(3)
    nrow, nchan, nant, ntime = 40, 5, 6, 3
    a1 = rng.integers(0, nant, nrow)
    a2 = rng.integers(0, nant, nrow)
    tidx = rng.integers(0, ntime, nrow)

    def c(*shape):
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex128)

    gt, bf = c(ntime, nant, 2), c(nant, nchan, 2)
    gtf = np.zeros(gt.shape, bool)
    bff = np.zeros(bf.shape, bool)
    gtf[1, 2, 0] = True
    bff[4, 3, 1] = True
    vis = c(nrow, nchan, 4).astype(np.complex64)
    flag = rng.random(vis.shape) < 0.1
    fp, fq = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    out, of = np.empty_like(vis), np.empty(vis.shape, bool)
    apply_feed_jones(vis, flag, a1, a2, tidx, fp, fq, gt, gtf, bf, bff, out, of)
    for r in range(nrow):
        for k in range(4):
            p, q = fp[k], fq[k]
            j = gt[tidx[r], a1[r], p] * bf[a1[r], :, p] * np.conj(
                gt[tidx[r], a2[r], q] * bf[a2[r], :, q])
            bad = (gtf[tidx[r], a1[r], p] | gtf[tidx[r], a2[r], q] | bff[a1[r], :, p]
                   | bff[a2[r], :, q])
            np.testing.assert_allclose(out[r, :, k], np.where(bad, 0, vis[r, :, k] / j),
                                       rtol=1e-5)
            np.testing.assert_array_equal(of[r, :, k], bad | flag[r, :, k])
    # two parallel hands: the same numbers as kernels.solvers.apply_jones
    v2, f2 = np.ascontiguousarray(vis[..., [0, 3]]), np.ascontiguousarray(flag[..., [0, 3]])
    o1, g1 = np.empty_like(v2), np.empty(v2.shape, bool)
    o2, g2 = np.empty_like(v2), np.empty(v2.shape, bool)
    apply_feed_jones(v2, f2, a1, a2, tidx, np.array([0, 1]), np.array([0, 1]), gt, gtf, bf,
                     bff, o1, g1)
    apply_jones(v2, f2, a1, a2, tidx, gt, gtf, bf, bff, o2, g2)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(g1, g2)


def test_casa_errors_pool_the_noise_over_the_parallel_hands():
    """err = sqrt(s2 / F) per polarisation -> sqrt(s2_pooled / F), s2_pooled =
    sum chi2 / sum (n - nact) over the polarisations of a cell (CASA's k2)."""
    from kernels.jones import casa_errors

    rng = np.random.default_rng(5)
    ncell, nant = 4, 7
    fisher = rng.uniform(1, 3, (ncell, nant, 2))
    chi2 = rng.uniform(50, 150, (ncell, 2))
    n = np.full((ncell, 2), 100)
    fisher[0, 3, 1] = 0                           # an antenna without data in one hand
    nact = (fisher > 0).sum(axis=1)
    s2 = chi2 / (n - nact)
    with np.errstate(divide="ignore"):
        err = np.sqrt(s2[:, None, :] / fisher)
    pooled = chi2.sum(axis=1) / (n - nact).sum(axis=1)
    with np.errstate(divide="ignore"):
        want = np.sqrt(pooled[:, None, None] / fisher)
    np.testing.assert_allclose(casa_errors(err, chi2, n), want, rtol=1e-12)
    # a noise-free cell keeps its errors
    chi2[2] = 0
    got = casa_errors(err, chi2, n)
    np.testing.assert_array_equal(got[2], err[2])


@pytest.mark.interop
@pytest.mark.skipif(not _have("casatasks"), reason="casatasks is not installed")
def test_min_snr_flags_what_casa_flags(casa_sim_ms, tmp_path):
    """Low-SNR bandpass (extra noise: median SNR ~12) with min_snr at about its median:
    our flags and CASA's ``bandpass(minsnr=)`` agree except where CASA's own SNR is
    within its noise-estimate scatter (20 %) of the threshold."""
    from casacore import tables as ct

    fms = casa_sim_ms
    ms = fms.copy(tmp_path)
    _write_model(fms, ms)
    rng = np.random.default_rng(11)
    with ct.table(ms, readonly=False, ack=False) as tb:
        d = tb.getcol("DATA")
        d += (6.0 * (rng.standard_normal(d.shape) + 1j * rng.standard_normal(d.shape))
              ).astype(d.dtype)
        tb.putcol("DATA", d)
    t = 12.0
    res = cc.calibrate_ms(ms, catalog=fms.catalog, field="3C286", min_snr=t,
                          gain_interval=6, max_solutions_flagged=1.0)
    # ours flags only the final B and G: CASA's first two steps unflagged too
    casa_solve(tmp_path, ms, tmp_path / "casa", res.refant, field=0, minsnr=t, gains=False,
               flag_all_steps=False)
    ours = caltables.read_caltable(res.tables["B"])
    theirs = caltables.read_caltable(tmp_path / "casa.B")
    fo, fc = ours["flag"], theirs["flag"]
    differ = fo != fc
    near = np.abs(theirs["snr"] / t - 1) < 0.2
    print(f"min_snr {t}: flagged ours {fo.mean():.1%}, CASA {fc.mean():.1%}; flags differ "
          f"on {differ.sum()} of {differ.size} solutions, all with CASA's SNR within 20 % "
          f"of min_snr: {bool(near[differ].all())}")
    assert 0.1 < fc.mean() < 0.9                   # the threshold does cut
    assert near[differ].all()
    assert differ.mean() < 0.15
