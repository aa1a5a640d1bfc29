"""Forced photometry: the kernels against brute force, and the flux densities and their
errors against the truth on synthetic images (point sources convolved with the restoring
beam, noise correlated like the beam, an Airy primary beam) and on an imaged simulated
group."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernels import photometry as kph

CELL_DEG = 6.0 / 3600.0
BEAM = (50.0 / 3600.0, 32.0 / 3600.0, 30.0)   # bmaj, bmin (deg), bpa (deg E of N)


# ---------------------------------------------------------------------------------
# a synthetic image with its own truth
# ---------------------------------------------------------------------------------

def _gauss(shape, x0, y0, q):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    dx, dy = xx - x0, yy - y0
    return np.exp(-(q[0] * dx * dx + q[1] * dx * dy + q[2] * dy * dy))


def beam_noise(shape, q, rng):
    """Gaussian noise of unit rms whose correlation function is the beam ``q``: white
    noise convolved with the beam's square root (a Gaussian with twice the quadratic
    form's coefficients), scaled to rms 1."""
    from scipy.signal import fftconvolve

    pad = 40
    w = rng.normal(size=(shape[0] + 2 * pad, shape[1] + 2 * pad))
    k = _gauss((2 * pad + 1, 2 * pad + 1), pad, pad, tuple(2 * c for c in q))
    n = fftconvolve(w, k, mode="same")[pad:-pad, pad:-pad]
    return n / np.sqrt(np.sum(k * k))


def synthetic_fits(path, *, npix=512, n_src=60, rms=1e-3, seed=1, ra0=150.0, dec0=54.6,
                   fluxes=None, positions=None, freq=1.4e9, pb_files=True, with_pb=True,
                   drift_s=150.0, radec=None, mjd=61000.0):
    """Write ``<path>-image.fits`` (and ``-image-pb.fits``): point sources (flux, at
    random positions unless given) seen through an Airy PB, convolved with BEAM, plus
    beam-correlated noise. Returns (image path, ra_deg, dec_deg, true flux, pb)."""
    from astropy.io import fits
    from astropy.wcs import WCS

    from contimg import telescope as tel
    from kernels.beam import airy_power

    rng = np.random.default_rng(seed)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [npix // 2 + 1, npix // 2 + 1]
    w.wcs.cdelt = [-CELL_DEG, CELL_DEG]
    east = -1.0
    q = kph.beam_quadratic(BEAM[0] / CELL_DEG, BEAM[1] / CELL_DEG, BEAM[2], east)
    if radec is not None:
        px, py = w.world_to_pixel_values(*radec)
    elif positions is None:
        px = rng.uniform(20, npix - 21, n_src)
        py = rng.uniform(20, npix - 21, n_src)
    else:
        px, py = positions
    ra, dec = w.pixel_to_world_values(px, py)
    if fluxes is None:
        fluxes = 10 ** rng.uniform(np.log10(5 * rms), np.log10(500 * rms), len(px))
    fluxes = np.asarray(fluxes, float)
    yy, xx = np.mgrid[0:npix, 0:npix]
    rr, dd = w.pixel_to_world_values(xx, yy)
    sep_src = np.radians(np.hypot((ra - ra0) * np.cos(np.radians(dec0)), dec - dec0))
    pb_src = airy_power(sep_src, freq, tel.DISH_DIAMETER_M) if with_pb else np.ones(len(px))
    img = rms * beam_noise((npix, npix), q, rng)
    for x0, y0, s, p in zip(px, py, fluxes, pb_src):
        img += s * p * _gauss((npix, npix), x0, y0, q)
    sep = np.radians(np.hypot((rr - ra0) * np.cos(np.radians(dec0)), dd - dec0))
    pb = airy_power(sep, freq, tel.DISH_DIAMETER_M) if with_pb else np.ones_like(sep)
    h = w.to_header()
    h["BMAJ"], h["BMIN"], h["BPA"] = BEAM
    h["MJD-OBS"] = mjd
    h["MJD-AVG"] = mjd + drift_s / 86400.0
    h["NOISE"] = rms
    out = f"{path}-image.fits"
    fits.PrimaryHDU(img.astype(np.float32), header=h).writeto(out, overwrite=True)
    if pb_files:
        fits.PrimaryHDU(np.where(pb >= 0.1, img / pb, np.nan).astype(np.float32),
                        header=h).writeto(f"{path}-image-pb.fits", overwrite=True)
    return out, ra, dec, fluxes, pb_src


# ---------------------------------------------------------------------------------
# kernels vs brute force
# ---------------------------------------------------------------------------------

def test_beam_quadratic_fwhm_and_position_angle():
    """The beam is at half power at +-bmaj/2 along the position angle (x to the west)."""
    q = kph.beam_quadratic(10.0, 4.0, 30.0, -1.0)
    pa = math.radians(30.0)
    ax, ay = -math.sin(pa) * 5.0, math.cos(pa) * 5.0      # major axis: E of N
    bx, by = -math.cos(pa) * 2.0, -math.sin(pa) * 2.0
    for dx, dy in ((ax, ay), (bx, by)):
        assert math.exp(-(q[0] * dx * dx + q[1] * dx * dy + q[2] * dy * dy)) == \
            pytest.approx(0.5, rel=1e-12)


def test_beam_fit_and_rms_against_brute_force():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(120, 130))
    img[10:13, 40:44] = np.nan
    q = kph.beam_quadratic(7.0, 4.5, -20.0, -1.0)
    xs = np.array([60.3, 0.3, 41.0, 100.7])
    ys = np.array([50.6, 60.1, 12.4, 118.6])
    amp, fac, npx, edge = kph.beam_fit(img, xs, ys, *q, 0.5, 2)
    mask = kph.source_mask(120, 130, xs, ys, 8.0)
    rms, nr, trunc = kph.local_rms(img, mask, xs, ys, 12.0, 30.0, 50, 2, 2)
    yy, xx = np.mgrid[0:120, 0:130]
    for k in range(xs.size):
        g = _gauss(img.shape, xs[k], ys[k], q)
        # the brute-force region: g >= 0.5 over an unbounded grid, clipped to the image
        sel = (g >= 0.5) & np.isfinite(img)
        assert npx[k] == sel.sum()
        assert amp[k] == pytest.approx(np.sum(img[sel] * g[sel]) / np.sum(g[sel] ** 2))
        dxm = xx[sel][:, None] - xx[sel][None, :]
        dym = yy[sel][:, None] - yy[sel][None, :]
        r = np.exp(-(q[0] * dxm ** 2 + q[1] * dxm * dym + q[2] * dym ** 2))
        assert fac[k] == pytest.approx(np.sqrt(g[sel] @ r @ g[sel]) / np.sum(g[sel] ** 2))
        d2 = (xx - xs[k]) ** 2 + (yy - ys[k]) ** 2
        a = (d2 >= 144) & (d2 < 900) & ~mask & np.isfinite(img) & (xx % 2 == 0) & (yy % 2 == 0)
        v = img[a]
        med = np.median(v)
        s = 1.482602218505602 * np.median(np.abs(v - med))
        v = v[np.abs(v - med) <= 5 * s]
        assert nr[k] == v.size
        assert rms[k] == pytest.approx(1.482602218505602 * np.median(np.abs(v - np.median(v))))
    assert list(edge) == [False, True, True, True]     # left edge, NaNs, top edge
    assert list(trunc) == [False, True, True, True]
    # the mask is every pixel within the radius of some source
    brute = np.zeros_like(mask)
    for k in range(xs.size):
        brute |= (xx - xs[k]) ** 2 + (yy - ys[k]) ** 2 <= 64.0
    assert np.array_equal(mask, brute)


# ---------------------------------------------------------------------------------
# against the truth
# ---------------------------------------------------------------------------------

def test_synthetic_image_bright_fluxes_and_pulls(tmp_path):
    """Bright sources within 2 % after PB correction; pull std within 1 +- 0.15 over
    all isolated sources of 8 synthetic images."""
    from contimg.photometry import FLAG_BLENDED, measure_image

    pulls, bright = [], []
    for seed in range(8):
        path, ra, dec, flux, pb = synthetic_fits(tmp_path / f"s{seed}", seed=seed)
        res = measure_image(path, {"ra_deg": ra, "dec_deg": dec}, pb_cut=0.2)
        ok = res["measured"] & (res["flags"] & ~FLAG_BLENDED == 0) \
            & (res["flags"] & FLAG_BLENDED == 0)
        assert np.allclose(res["pb"][res["measured"]], pb[res["measured"]], rtol=1e-5)
        pulls.append(((res["flux_jy"] - flux) / res["err_jy"])[ok])
        snr = flux * pb / 1e-3
        b = ok & (snr > 250)   # the 2 % is then > 4 sigma of the noise
        bright.append(np.abs(res["flux_jy"][b] / flux[b] - 1))
    pulls, bright = np.concatenate(pulls), np.concatenate(bright)
    assert pulls.size > 200 and bright.size > 10, (pulls.size, bright.size)
    assert abs(np.mean(pulls)) < 0.15
    assert 0.85 <= np.std(pulls) <= 1.15, np.std(pulls)
    assert bright.max() < 0.02


def test_flags_edge_blended_low_pb(tmp_path):
    from contimg.photometry import (FLAG_BLENDED, FLAG_EDGE, FLAG_LOW_PB, flag_names,
                                    measure_image)

    npix = 256
    pos = (np.array([128.0, 133.0, 2.0, 60.0, 128.0]), np.array([128.0, 130.0, 100.0, 60.0,
                                                                 250.0]))
    path, ra, dec, flux, pb = synthetic_fits(tmp_path / "f", npix=npix, positions=pos,
                                             fluxes=[1, 1, 1, 1, 1], with_pb=False)
    res = measure_image(path, {"ra_deg": ra, "dec_deg": dec}, pb_cut=0.2)
    assert res["flags"][0] & FLAG_BLENDED and res["flags"][1] & FLAG_BLENDED
    assert res["flags"][2] & FLAG_EDGE and res["flags"][4] & FLAG_EDGE
    assert res["flags"][3] == 0 and flag_names(int(res["flags"][0])) == ["blended"]
    # a low PB response: without the PB file, the header model (Airy at 1.4 GHz)
    path2, ra2, dec2, *_ = synthetic_fits(tmp_path / "g", npix=1024, with_pb=True,
                                          positions=(np.array([512.0, 100.0, 30.0]),
                                                     np.array([512.0, 512.0, 30.0])),
                                          fluxes=[1, 1, 1], pb_files=False, drift_s=0.0)
    res2 = measure_image(path2, {"ra_deg": ra2, "dec_deg": dec2}, pb_cut=0.9)
    assert res2["pb"][0] == pytest.approx(1.0, abs=1e-6)
    assert res2["flags"][1] & FLAG_LOW_PB and not res2["flags"][0] & FLAG_LOW_PB
    assert res2["flux_jy"][0] == pytest.approx(1.0, rel=0.02)
    assert res2["flux_jy"][1] == pytest.approx(1.0, rel=0.03)


def test_stage_normalises_stores_and_is_idempotent(tmp_path, capsys):
    """An image whose flux scale is 10 % low (bad calibration): the stage finds the
    scale from the references, stores raw and normalised values, and a re-run of the
    same image replaces its rows without counting the epoch twice."""
    from contimg import catalog
    from contimg.cli import main
    from contimg.photometry import stage_photometry
    from contimg.state import StateDB

    rng = np.random.default_rng(4)
    flux = 10 ** rng.uniform(np.log10(0.01), np.log10(0.5), 60)
    path, ra, dec, _, pb = synthetic_fits(tmp_path / "g", fluxes=0.9 * flux, seed=4)
    sky = dict(ra=np.radians(ra), dec=np.radians(dec), flux=flux, alpha=np.zeros(60),
               name=np.array([f"S{i:03d}" for i in range(60)]))
    cat = catalog.write_sky_catalog(sky, tmp_path / "sky.csv")
    db = tmp_path / "db.sqlite3"
    assert main(["photometry", path, "--catalog", str(cat), "--db", str(db)]) == 0
    out = stage_photometry(path, db)      # the same image again
    assert out["n_ref"] >= 10
    assert out["scale"] == pytest.approx(0.9, abs=3 * out["scale_err"])
    assert out["scale_err"] < 0.01
    with StateDB(db) as d:
        rows = d.query("SELECT s.flux_jy AS truth, p.* FROM photometry p JOIN sources s "
                       "ON s.id = p.source_id WHERE p.flags = 0")
        stats = d.query("SELECT n FROM source_stats")
        scale = d.query("SELECT * FROM image_flux_scale")
    assert len(rows) > 30 and {r["n"] for r in stats} == {1}
    assert len(scale) == 1 and scale[0]["t_mid"] == pytest.approx(61000 * 86400 - 40587 * 86400 + 150)
    truth = np.array([r["truth"] for r in rows])
    raw = np.array([r["flux_jy"] for r in rows])
    norm = np.array([r["norm_flux_jy"] for r in rows])
    err = np.array([r["norm_err_jy"] for r in rows])
    assert np.allclose(raw / norm, out["scale"])
    pull = (norm - truth) / err
    assert abs(np.median(pull)) < 0.5 and np.std(pull) < 1.5
    # QA: a 10 % low scale with a small error stands out
    capsys.readouterr()
    assert main(["sources", "scales", "--db", str(db), "--tolerance", "0.05"]) == 0
    assert " OFF " in capsys.readouterr().out


def test_bad_image_names_the_problem(tmp_path):
    from astropy.io import fits

    from contimg.photometry import measure_image

    fits.PrimaryHDU(np.zeros((8, 8), np.float32)).writeto(tmp_path / "x.fits")
    with pytest.raises(ValueError, match="x.fits: header has no BMAJ"):
        measure_image(tmp_path / "x.fits", {"ra_deg": [0.0], "dec_deg": [0.0]})
    with pytest.raises(FileNotFoundError, match="no such image"):
        measure_image(tmp_path / "y.fits", {"ra_deg": [0.0], "dec_deg": [0.0]})


@pytest.mark.slow
def test_imaged_simulated_group_against_truth(tmp_path):
    """A simulated group (64 antennas, 2 x 4 channels, 12 integrations, thermal noise)
    imaged by contimg with CLEAN masked at the catalogue positions (as the catalogue
    allows): sources at SNR >= 200 within 2 % of the truth after PB correction, and no
    pull beyond 4."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_image import START, _sky

    from contimg.imaging import image_ms
    from contimg.photometry import measure_image
    from contimg.simulate import SimConfig, simulate_group

    cfg = SimConfig(n_ant=64, n_subbands=2, n_chan=4, n_times=12, noise=True, gains=False,
                    rfi=None, threads=1)
    off = [(0.0, 0.0), (0.25, 0.15), (-0.3, 0.2), (0.15, -0.35), (-0.2, -0.25), (0.6, 0.5)]
    sky = _sky(cfg, off, [3.0, 2.0, 1.5, 1.0, 0.8, 2.5], [-0.7] * 6)
    g = simulate_group(tmp_path / "grp", START, cfg=cfg, sky=sky)
    image_ms(g.files, tmp_path / "img", npix=768, cell_arcsec=6.0, niter=20000,
             auto_threshold_sigma=1.0, gain=0.1, mgain=0.8, max_major=30,
             mask_sources=(sky["ra"], sky["dec"]), mask_radius_arcsec=60.0)
    res = measure_image(tmp_path / "img-image.fits",
                        {"ra_deg": np.degrees(sky["ra"]), "dec_deg": np.degrees(sky["dec"])})
    true = sky["flux"] * (res["freq_hz"] / 1.4e9) ** sky["alpha"]
    assert res["measured"].all()
    pull = (res["flux_jy"] - true) / res["err_jy"]
    bright = res["flux_jy"] / res["err_jy"] >= 200
    assert bright.sum() >= 3
    assert np.all(np.abs(res["flux_jy"][bright] / true[bright] - 1) < 0.02), \
        res["flux_jy"] / true
    assert np.all(np.abs(pull) < 4), pull


def test_cli_prints_csv_without_a_database(tmp_path, capsys, monkeypatch):
    from contimg import catalog
    from contimg.cli import main

    pos = (np.array([100.0, 200.0, 300.0]), np.array([100.0, 250.0, 400.0]))
    path, ra, dec, flux, pb = synthetic_fits(tmp_path / "c", positions=pos,
                                             fluxes=[0.5, 0.2, 0.1], seed=9)
    sky = dict(ra=np.radians(ra), dec=np.radians(dec), flux=flux, alpha=np.zeros(3),
               name=np.array(["A", "B", "C"]))
    cat = catalog.write_sky_catalog(sky, tmp_path / "sky.csv")
    monkeypatch.chdir(tmp_path)                # the default database would be here
    monkeypatch.delenv("PIPELINE_DB", raising=False)
    monkeypatch.delenv("PIPELINE_STATE_DIR", raising=False)
    assert main(["photometry", path, "--catalog", str(cat), "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "name,flux_jy,err_jy,peak_jy,rms_jy,pb,flags"
    got = {r.split(",")[0]: float(r.split(",")[1]) for r in lines[2:]}
    assert set(got) == {"A", "B", "C"}
    assert got["A"] == pytest.approx(0.5, rel=0.02)
    assert not (tmp_path / "state").exists()       # nothing stored
