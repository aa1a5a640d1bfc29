"""Imaging end to end: re-phasing, distributed gridding, CLEAN, primary beam, FITS,
and agreement with WSClean 3.1 and CASA's importfits."""

from __future__ import annotations

import datetime as dt
import math
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from contimg import telescope as tel
from contimg.simulate import SimConfig, _metadata, simulate_group
from contimg.uvw import compute_uvw, phase_center_basis
from kernels.constants import ARCSEC
from kernels.constants import SPEED_OF_LIGHT as C

WSCLEAN = shutil.which("wsclean")
START = dt.datetime(2026, 1, 15, 8, 0, 0)


def _sky(cfg, offsets, fluxes, alphas):
    """Sources at (east, north) offsets (deg) from the middle integration's centre."""
    meta = _metadata(cfg, START)
    mid = cfg.n_times // 2
    ra0, dec0 = float(meta["ra_icrs"][mid]), float(meta["dec_icrs"][mid])
    ra, dec = [], []
    for de, dn in offsets:
        l, m = math.radians(de), math.radians(dn)
        n = math.sqrt(1 - l * l - m * m)
        dec.append(math.asin(m * math.cos(dec0) + n * math.sin(dec0)))
        ra.append(ra0 + math.atan2(l, n * math.cos(dec0) - m * math.sin(dec0)))
    k = len(offsets)
    return dict(ra=np.array(ra), dec=np.array(dec), flux=np.array(fluxes, float),
                alpha=np.array(alphas, float), name=np.array([f"S{i}" for i in range(k)]),
                ref_freq=np.full(k, 1.4e9))


def _true_pixel(ds, prod, ra, dec):
    """Exact (ix, iy) of an ICRS source in our image (apparent frame at mid-time)."""
    loc = np.asarray(ds.attrs["telescope_location"])
    tm = np.array([prod.time_mid_unix])
    b0 = phase_center_basis(tm, prod.phase_center[0], prod.phase_center[1], loc)[0]
    s = phase_center_basis(tm, ra, dec, loc)[0][2]
    l, m, nn = b0 @ s
    # a w-snapshot image is in the slant SIN projection: l' = l + xi (1 - n), m' likewise
    l, m = l + prod.slant[0] * (1 - nn), m + prod.slant[1] * (1 - nn)
    n = prod.image.shape[0]
    return n // 2 - l / prod.cell_rad, n // 2 + m / prod.cell_rad


def _uvw_towards(ds, ra0, dec0):
    """UVW (metres) of every row of ``ds`` towards (ra0, dec0)."""
    return compute_uvw(ds.ANTENNA_POSITION.values, ds.baseline_antenna1_id.values,
                       ds.baseline_antenna2_id.values, ds.time.values, ra0, dec0,
                       telescope_location=np.asarray(ds.attrs["telescope_location"]))


def _fit_source(img, beam, cell, x0, y0):
    """Least-squares fit of a restoring-beam-shaped source: (amplitude, x, y)."""
    from scipy.optimize import least_squares

    from kernels.clean import gaussian_image

    h = int(math.ceil(beam[0] / cell))
    xi, yi = int(round(x0)), int(round(y0))
    sub = img[xi - h: xi + h + 1, yi - h: yi + h + 1].astype(float)

    def resid(p):
        g = gaussian_image(sub.shape, beam[0], beam[1], beam[2], cell,
                           centre=(h + p[1], h + p[2]))
        return (p[0] * g - sub).ravel()

    r = least_squares(resid, [sub[h, h], x0 - xi, y0 - yi])
    return r.x[0], xi + r.x[1], yi + r.x[2]


def _apparent_truth(truth, wsum, i):
    """Flux the PB-corrected image should show: sum W S B / sum W B over (t, f)."""
    from kernels.beam import airy_power, lmn_of

    f = truth["freqs_hz"]
    _, _, n = lmn_of(truth["sky_ra"][i], truth["sky_dec"][i], truth["phase_center_ra"],
                     truth["phase_center_dec"])
    sep = np.arccos(np.clip(n, -1, 1))
    b = airy_power(sep[:, None], f[None, :], tel.DISH_DIAMETER_M)
    s = truth["sky_flux"][i] * (f / truth["sky_ref_freq"][i]) ** truth["sky_alpha"][i]
    return float((wsum * s[None] * b).sum() / (wsum * b).sum())


# ---------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------

PS_CFG = SimConfig(n_ant=64, n_subbands=2, n_chan=8, n_times=12, noise=False, gains=False,
                   rfi=None, threads=1)
PS_OFFSETS = [(0.0, 0.0), (0.25, 0.15), (-0.3, 0.2), (0.15, -0.35), (-0.2, -0.25)]
PS_FLUX = [20.0, 3.0, 2.0, 4.0, 1.5]
PS_ALPHA = [-0.7, 0.0, -0.5, -1.0, 0.3]


@pytest.fixture(scope="module")
def ps_group(tmp_path_factory):
    out = tmp_path_factory.mktemp("ps_group")
    sky = _sky(PS_CFG, PS_OFFSETS, PS_FLUX, PS_ALPHA)
    return simulate_group(out, START, cfg=PS_CFG, sky=sky)


@pytest.fixture(scope="module")
def ps_ds(ps_group):
    from contimg.io.uvh5 import open_group

    return open_group(ps_group.files, n_subbands=PS_CFG.n_subbands).compute()


# ---------------------------------------------------------------------------------
# re-phasing and the distributed dirty image
# ---------------------------------------------------------------------------------


def test_rephase_to_middle_integration_against_dft(ps_group, ps_ds):
    """Re-phased Stokes I equals a DFT of the true sky towards the image centre."""
    from graphs.image import stokes_i_dataset
    from kernels.beam import airy_power, lmn_of

    ds = ps_ds
    truth = ps_group.load_truth()
    mid = ds.sizes["time"] // 2
    ra0, dec0 = float(ds.PHASE_CENTER_RA[mid]), float(ds.PHASE_CENTER_DEC[mid])
    loc = np.asarray(ds.attrs["telescope_location"])
    uvw = compute_uvw(ds.ANTENNA_POSITION.values, ds.baseline_antenna1_id.values,
                      ds.baseline_antenna2_id.values, ds.time.values, ra0, dec0,
                      telescope_location=loc)
    dsi = stokes_i_dataset(ds, uvw).compute()
    f = ds.frequency.values
    times = ds.time.values
    sel = slice(0, 400)  # a few hundred baselines is plenty
    model = np.zeros((len(times), 400, f.size), complex)
    for i in range(len(truth["sky_ra"])):
        for t in range(len(times)):
            b = phase_center_basis(times[t:t + 1], ra0, dec0, loc)[0]
            s = phase_center_basis(times[t:t + 1], truth["sky_ra"][i], truth["sky_dec"][i],
                                   loc)[0][2]
            l, m, n = b @ s
            _, _, npt = lmn_of(truth["sky_ra"][i], truth["sky_dec"][i],
                               truth["phase_center_ra"][t], truth["phase_center_dec"][t])
            beam = airy_power(np.arccos(min(npt, 1.0)), f, tel.DISH_DIAMETER_M)
            flux = truth["sky_flux"][i] * (f / 1.4e9) ** truth["sky_alpha"][i] * beam
            ph = (uvw[t, sel, 0, None] * l + uvw[t, sel, 1, None] * m
                  + uvw[t, sel, 2, None] * (n - 1)) * f[None] / C
            model[t] += flux[None] * np.exp(2j * np.pi * ph)
    cross = (ds.baseline_antenna1_id.values != ds.baseline_antenna2_id.values)[sel]
    got = dsi.VIS_I.values[:, sel][:, cross]
    exp = model[:, cross]
    err = np.abs(got - exp).max() / np.abs(exp).max()
    assert err < 1e-4, err
    # without re-phasing the far integrations decorrelate: the test can tell
    raw = stokes_i_dataset(ds, None).compute().VIS_I.values[:, sel][:, cross]
    assert np.abs(raw - exp).max() / np.abs(exp).max() > 0.1


@pytest.mark.parametrize("gridder", ["contimg", "ducc0"])
def test_distributed_dirty_equals_direct_gridding(ps_ds, gridder):
    """Per-chunk images summed == one vis2dirty over all the data (dask == numpy)."""
    import dask

    from graphs import image as gi
    from kernels import gridding as kg
    from kernels import weighting as kw

    if gridder == "ducc0":
        pytest.importorskip("ducc0")
    ds = ps_ds
    mid = ds.sizes["time"] // 2
    ra0, dec0 = float(ds.PHASE_CENTER_RA[mid]), float(ds.PHASE_CENTER_DEC[mid])
    uvw = _uvw_towards(ds, ra0, dec0)
    ds = ds.chunk({"time": 4, "frequency": 8})  # 3 x 2 chunks
    dsi = gi.stokes_i_dataset(ds, uvw)
    npix, cell = 256, 8 * ARCSEC
    plan = gi.imaging_plan(uvw, ds.frequency.values, npix, cell, 1e-5, double=True)
    dens, du, dv = gi.density(dsi, npix, npix, cell)
    dens, sw = dask.compute(dens, dsi.WEIGHT_I.data.sum())
    f2 = kw.briggs_f2(dens, float(sw), 0.0)
    wspec = gi.WeightSpec("briggs", dens, f2, du, dv)
    img = gi.dirty_image(dsi, plan, wspec, gridder=gridder).compute()
    # direct, on all rows at once
    full = dsi.compute()
    nt, nb, nf = full.VIS_I.shape
    u = uvw.reshape(-1, 3)
    wi = kw.imaging_weights(u, full.frequency.values, full.WEIGHT_I.values.reshape(-1, nf),
                            "briggs", dens, du, dv, f2)
    ref = kg.vis2dirty(u, full.frequency.values,
                       full.VIS_I.values.reshape(-1, nf).astype(np.complex128), weights=wi,
                       npix_x=npix, npix_y=npix, pixsize_x=cell, pixsize_y=cell,
                       epsilon=1e-5, flip_v=True, divide_by_n=False)
    err = np.linalg.norm(img - ref) / np.linalg.norm(ref)
    assert err < 1e-4, err


# ---------------------------------------------------------------------------------
# the simulated group: fluxes and positions after CLEAN and primary-beam correction
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ps_image(ps_ds, ps_group):
    """CLEANed inside 60" discs around the catalogue positions (see ``mask_sources``)."""
    from contimg.imaging import image_dataset

    truth = ps_group.load_truth()
    return image_dataset(ps_ds, npix=768, cell_arcsec=5.0, weighting="briggs", robust=0.0,
                         niter=20000, auto_threshold_sigma=0.0, threshold=1e-3, gain=0.1,
                         mgain=0.8, max_major=30,
                         mask_sources=(truth["sky_ra"], truth["sky_dec"]),
                         mask_radius_arcsec=60.0)


def test_point_sources_flux_and_position(ps_group, ps_ds, ps_image):
    prod = ps_image
    truth = ps_group.load_truth()
    ds = ps_ds
    assert prod.n_components > 0 and prod.n_major >= 2
    errs = []
    for i in range(len(truth["sky_ra"])):
        px, py = _true_pixel(ds, prod, truth["sky_ra"][i], truth["sky_dec"][i])
        amp, x, y = _fit_source(prod.image, prod.beam, prod.cell_rad, px, py)
        pb = float(prod.pb[int(round(x)), int(round(y))])
        flux = amp / pb
        exp = _apparent_truth(truth, prod.weight_sums, i)
        errs.append((flux / exp - 1, x - px, y - py))
    errs = np.array(errs)
    print("flux rel. errors", errs[:, 0], "position errors (px)", errs[:, 1:])
    assert np.all(np.abs(errs[:, 0]) < 0.01), errs
    assert np.all(np.abs(errs[:, 1:]) < 0.1), errs
    # the PB-corrected image says the same at the peak pixel of the calibrator
    cx, cy = prod.peak_pixel
    assert prod.image_pb[cx, cy] == pytest.approx(prod.image[cx, cy] / prod.pb[cx, cy])


def test_unmasked_clean_stays_stable(ps_ds, ps_group):
    """Without a mask the T array's ridge crossings attract some flux, but CLEAN must
    neither diverge nor lose more than a few per cent of a source (Högbom and Clark)."""
    from contimg.imaging import image_dataset

    truth = ps_group.load_truth()
    for algo in ("clark", "hogbom"):
        prod = image_dataset(ps_ds, npix=512, cell_arcsec=6.0, niter=3000,
                             auto_threshold_sigma=0.0, threshold=5e-3, algorithm=algo,
                             max_major=15)
        assert np.abs(prod.residual).max() < 0.05 * np.abs(prod.dirty).max()
        for i in range(len(truth["sky_ra"])):
            px, py = _true_pixel(ps_ds, prod, truth["sky_ra"][i], truth["sky_dec"][i])
            amp, _, _ = _fit_source(prod.image, prod.beam, prod.cell_rad, px, py)
            exp = _apparent_truth(truth, prod.weight_sums, i)
            assert amp / float(prod.pb[int(round(px)), int(round(py))]) == pytest.approx(
                exp, rel=0.05), (algo, i)


def test_mirror_holds_no_source(ps_ds, ps_image, ps_group):
    """A sign error in u, v or w would image the sky's mirror: check the orientation."""
    prod = ps_image
    truth = ps_group.load_truth()
    px, py = _true_pixel(ps_ds, prod, truth["sky_ra"][3], truth["sky_dec"][3])
    n = prod.image.shape[0]
    mx, my = int(round(n - px)), int(round(n - py))
    assert prod.dirty[int(round(px)), int(round(py))] > 2.0
    assert abs(prod.dirty[mx, my]) < 0.3


# ---------------------------------------------------------------------------------
# FITS, image_ms, CLI
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ms(tmp_path_factory, ps_ds):
    from contimg.io.ms import write_ms

    out = tmp_path_factory.mktemp("ms") / "group.ms"
    # CORRECTED_DATA = 2 x DATA so the test can tell which column was imaged
    ds = ps_ds.copy()
    ds["CORR2"] = ds.VISIBILITY * 2
    write_ms(ds, out, corrected_data="CORR2")
    return out


def test_image_ms_writes_fits_with_full_header(small_ms, tmp_path, ps_group, ps_ds):
    from astropy.io import fits
    from astropy.wcs import WCS

    from contimg.imaging import image_ms

    res = image_ms(small_ms, tmp_path / "g", npix=256, cell_arcsec=10.0, niter=200,
                   keep_products=True)
    assert set(res.paths) == {"image", "residual", "model", "psf", "image-pb"}
    assert not list(tmp_path.glob("*.tmp"))
    truth = ps_group.load_truth()
    with fits.open(res.paths["image"]) as hdul:
        h = hdul[0].header
        data = hdul[0].data
    assert data.shape == (1, 1, 256, 256)
    for key in ("BMAJ", "BMIN", "BPA", "BUNIT", "DATE-OBS", "TELESCOP", "ORIGIN", "RADESYS",
                "SPECSYS"):
        assert key in h, key
    assert "RESTFRQ" not in h and "RESTFREQ" not in h
    assert h["BUNIT"] == "JY/BEAM" and h["TELESCOP"] == "DSA-110"
    assert h["CTYPE3"] == "FREQ" and 1.3e9 < h["CRVAL3"] < 1.5e9
    assert h["BMAJ"] * 3600 == pytest.approx(res.beam[0], rel=1e-6)
    # CORRECTED_DATA (= 2 x DATA) was imaged: the calibrator's apparent flux doubled
    exp = 2 * _apparent_truth(truth, res.products.weight_sums, 0) * float(
        res.products.pb[128, 128])
    assert res.peak == pytest.approx(exp, rel=0.03)
    # WCS: the calibrator's sky position lands on its pixel
    w = WCS(h).celestial
    px, py = w.world_to_pixel_values(np.degrees(truth["sky_ra"][0]),
                                     np.degrees(truth["sky_dec"][0]))
    iy, ix = np.unravel_index(np.argmax(data[0, 0]), data[0, 0].shape)
    assert abs(px - ix) < 0.5 and abs(py - iy) < 0.5
    with fits.open(res.paths["model"]) as hdul:
        assert hdul[0].header["BUNIT"] == "JY/PIXEL"
    with fits.open(res.paths["image-pb"]) as hdul:
        pbimg = hdul[0].data[0, 0]
        assert np.isfinite(pbimg[128, 128])


def test_bad_input_is_named(tmp_path):
    from contimg.imaging import image_ms

    with pytest.raises(FileNotFoundError, match="not a Measurement Set"):
        image_ms(tmp_path / "nothing.ms", tmp_path / "x")
    os.environ["IMG_NITER"] = "many"
    try:
        from contimg.imaging import default_options

        with pytest.raises(ValueError, match="IMG_"):
            default_options()
    finally:
        del os.environ["IMG_NITER"]


def test_env_defaults(monkeypatch):
    from contimg.imaging import default_options

    monkeypatch.setenv("IMG_IMSIZE", "2048")
    monkeypatch.setenv("IMG_ROBUST", "-0.5")
    monkeypatch.setenv("IMG_NITER", "123")
    monkeypatch.setenv("IMG_THRESHOLD", "0.5mJy")
    d = default_options()
    assert d["npix"] == 2048 and d["robust"] == -0.5 and d["niter"] == 123
    assert d["threshold"] == pytest.approx(5e-4)


def test_cli_image(small_ms, tmp_path):
    env = dict(os.environ, IMG_IMSIZE="128", IMG_NITER="50")
    res = subprocess.run([sys.executable, "-m", "contimg.cli", "image", str(small_ms),
                          "--out", str(tmp_path / "cli"), "--cell", "20"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "cli-image.fits").is_file()
    from astropy.io import fits

    assert fits.getdata(tmp_path / "cli-image-pb.fits").shape == (1, 1, 128, 128)


# ---------------------------------------------------------------------------------
# interop: CASA importfits, WSClean 3.1
# ---------------------------------------------------------------------------------


@pytest.mark.interop
def test_casa_importfits_accepts_our_fits(small_ms, tmp_path):
    """CASA 6.7's importfits reads our FITS: beam, unit, pixel values and the w-snapshot's
    slant projection (SIN with its two parameters) survive."""
    import importlib.util

    if importlib.util.find_spec("casatasks") is None:
        pytest.skip("casatasks is not installed")
    from casarun import run_casa

    from contimg.imaging import image_ms

    res = image_ms(small_ms, tmp_path / "c", npix=128, cell_arcsec=20.0, niter=50)
    out = run_casa(
        tmp_path,
        "import sys, json\n"
        "from casatasks import importfits, imhead\n"
        "from casatools import image\n"
        f"importfits(fitsimage={str(res.paths['image'])!r}, imagename={str(tmp_path / 'c.im')!r})\n"
        f"h = imhead({str(tmp_path / 'c.im')!r}, mode='list')\n"
        "ia = image(); ia.open(" + repr(str(tmp_path / 'c.im')) + ")\n"
        "st = ia.statistics(); cs = ia.coordsys(); pr = cs.projection(); cs.done()\n"
        "ia.close()\n"
        "print(json.dumps({'bmaj': h['beammajor']['value'], 'unit': h['beammajor']['unit'],"
        " 'bunit': h['bunit'], 'max': float(st['max'][0]), 'proj': pr['type'],"
        " 'pv': [float(x) for x in pr['parameters']]}))\n", name="imp.py")
    import json

    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["bunit"].lower() == "jy/beam"
    bmaj = info["bmaj"] * (1.0 if info["unit"] == "arcsec" else 3600.0)
    assert bmaj == pytest.approx(res.beam[0], rel=1e-4)
    assert info["max"] == pytest.approx(res.peak, rel=1e-5)
    from astropy.io import fits

    h = fits.getheader(res.paths["image"])
    assert "PV2_2" in h                              # the image is a w-snapshot
    assert info["proj"] == "SIN"
    assert info["pv"] == pytest.approx([h["PV2_1"], h["PV2_2"]], abs=1e-9)


def _rephased_ms(ds, path):
    """The group re-phased to its middle integration's centre, as one FIELD."""
    from contimg.io.ms import write_ms
    from contimg import schema

    ds = ds.copy()
    mid = ds.sizes["time"] // 2
    ra0, dec0 = float(ds.PHASE_CENTER_RA[mid]), float(ds.PHASE_CENTER_DEC[mid])
    uvw1 = compute_uvw(ds.ANTENNA_POSITION.values, ds.baseline_antenna1_id.values,
                       ds.baseline_antenna2_id.values, ds.time.values, ra0, dec0,
                       telescope_location=np.asarray(ds.attrs["telescope_location"]))
    dw = ds.UVW.values[..., 2] - uvw1[..., 2]
    rot = np.exp(2j * np.pi * dw[..., None] * ds.frequency.values / C)
    ds["VISIBILITY"] = (schema.VIS_DIMS,
                        (ds.VISIBILITY.values * rot[..., None]).astype(np.complex64))
    ds["UVW"] = (schema.UVW_DIMS, uvw1)
    ds["PHASE_CENTER_RA"] = ("time", np.full(ds.sizes["time"], ra0))
    ds["PHASE_CENTER_DEC"] = ("time", np.full(ds.sizes["time"], dec0))
    if "phase_center_name" in ds.coords:   # one centre: one name (one FIELD row)
        name = str(ds.phase_center_name.values[mid])
        ds = ds.assign_coords(phase_center_name=("time", [name] * ds.sizes["time"]))
    write_ms(ds, path)
    return ds


@pytest.mark.interop
def test_wsclean_agrees(tmp_path):
    """Same MS, same parameters: peak fluxes within 2 %, image noise within 10 %.
    WSClean grids w exactly, so here we do too (``w_mode="wstack"``); the w-snapshot is
    compared with w-stacking in ``test_snapshot_images_where_its_wcs_says``."""
    if WSCLEAN is None:
        pytest.skip("wsclean is not installed")
    from astropy.io import fits

    from contimg.imaging import image_ms
    from contimg.io.uvh5 import open_group

    cfg = SimConfig(n_ant=48, n_subbands=2, n_chan=8, n_times=12, noise=True, gains=False,
                    rfi=None, threads=1, sefd_jy=5800.0)
    sky = _sky(cfg, [(0.0, 0.0), (0.3, 0.1), (-0.25, 0.2), (0.1, -0.3)],
               [20.0, 2.0, 1.0, 3.0], [-0.7, 0.0, 0.0, -0.5])
    g = simulate_group(tmp_path / "raw", START, cfg=cfg, sky=sky)
    ds = open_group(g.files, n_subbands=2).compute()
    ms = tmp_path / "g.ms"
    _rephased_ms(ds, ms)
    npix, cell, niter, thr = 512, 6.0, 2000, 0.02
    name = str(tmp_path / "ws")
    cmd = [WSCLEAN, "-j", "1", "-quiet", "-name", name, "-size", str(npix), str(npix),
           "-scale", f"{cell}asec", "-pol", "I", "-weight", "briggs", "0", "-niter",
           str(niter), "-threshold", str(thr), "-mgain", "0.8", "-gain", "0.1",
           "-no-update-model-required", "-use-wgridder", str(ms)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    with fits.open(f"{name}-image.fits") as hdul, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ws = hdul[0].data[0, 0].T.astype(float)  # -> [ix, iy]
    with fits.open(f"{name}-residual.fits") as hdul:
        ws_res = hdul[0].data[0, 0].T.astype(float)
    ours = image_ms(ms, tmp_path / "ours", npix=npix, cell_arcsec=cell, weighting="briggs",
                    robust=0.0, niter=niter, threshold=thr, auto_threshold_sigma=0.0,
                    mgain=0.8, gain=0.1, keep_products=True, w_mode="wstack").products
    from kernels.clean import robust_sigma

    peaks = []
    for i in range(len(sky["ra"])):
        px, py = _true_pixel(ds, ours, sky["ra"][i], sky["dec"][i])
        xi, yi = int(round(px)), int(round(py))
        a = ours.image[xi - 3: xi + 4, yi - 3: yi + 4].max()
        b = ws[xi - 3: xi + 4, yi - 3: yi + 4].max()
        peaks.append((a, b))
    peaks = np.array(peaks)
    n_ours, n_ws = robust_sigma(ours.residual), robust_sigma(ws_res)
    print("peaks ours / wsclean", peaks.tolist(), "noise", n_ours, n_ws)
    assert np.all(np.abs(peaks[:, 0] / peaks[:, 1] - 1) < 0.02), peaks
    assert n_ours == pytest.approx(n_ws, rel=0.10)


def test_distributed_client_gives_the_same_image(ps_ds):
    """On a distributed cluster (as the stream runs it) the image is the same."""
    from distributed import Client, LocalCluster

    from contimg.imaging import image_dataset

    kw = dict(npix=256, cell_arcsec=10.0, niter=100, auto_threshold_sigma=0.0,
              threshold=0.01, grid_tasks=3)
    local = image_dataset(ps_ds, **kw)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster):
        dist = image_dataset(ps_ds, **kw)
    np.testing.assert_allclose(dist.image, local.image, atol=1e-5 * local.peak)
    assert dist.n_components == local.n_components


# ---------------------------------------------------------------------------------
# baseline-dependent averaging and the reused gridding index
# ---------------------------------------------------------------------------------


def test_averaging_keeps_fluxes_within_its_budget(ps_ds, ps_group):
    """Dirty images with and without averaging: at every source the averaged image
    keeps the flux to within the budget (all sources lie inside the budget's radius);
    a budget 20x larger visibly smears the outer sources (the test can tell)."""
    from contimg.imaging import image_dataset

    truth = ps_group.load_truth()
    kw = dict(npix=512, cell_arcsec=6.0, niter=0, weighting="natural")
    ref = image_dataset(ps_ds, average=False, **kw)
    avg = image_dataset(ps_ds, average=True, smear_loss=0.01, smear_radius_deg=0.5, **kw)
    big = image_dataset(ps_ds, average=True, smear_loss=0.2, smear_radius_deg=0.5, **kw)
    assert avg.options["n_vis_gridded"] < ref.options["n_vis_gridded"] / 2
    for prod in (ref, avg, big):
        prod.pix = [_true_pixel(ps_ds, prod, truth["sky_ra"][i], truth["sky_dec"][i])
                    for i in range(len(truth["sky_ra"]))]
    ratios_avg, ratios_big = [], []
    for i in range(len(truth["sky_ra"])):
        a0, x, y = _fit_source(ref.dirty, ref.beam, ref.cell_rad, *ref.pix[i])
        a1, *_ = _fit_source(avg.dirty, ref.beam, ref.cell_rad, *avg.pix[i])
        a2, *_ = _fit_source(big.dirty, ref.beam, ref.cell_rad, *big.pix[i])
        ratios_avg.append(a1 / a0)
        ratios_big.append(a2 / a0)
    ratios_avg, ratios_big = np.array(ratios_avg), np.array(ratios_big)
    print("averaged / full:", ratios_avg, "with a 20 % budget:", ratios_big)
    assert np.all(np.abs(ratios_avg - 1) < 0.01), ratios_avg
    # (bins are capped by this small group: 12 integrations x 8 channels per chunk)
    assert np.min(ratios_big) < 0.99 and np.min(ratios_big) < np.min(ratios_avg) - 0.005, \
        ratios_big


def test_grid_index_reused_gives_the_same_images(ps_ds):
    """Residual and dirty images with a persisted gridding index == without one."""
    import dask

    from graphs import image as gi
    from kernels import averaging as ka

    ds = ps_ds
    mid = ds.sizes["time"] // 2
    ra0, dec0 = float(ds.PHASE_CENTER_RA[mid]), float(ds.PHASE_CENTER_DEC[mid])
    uvw = _uvw_towards(ds, ra0, dec0)
    npix, cell = 256, 8 * ARCSEC
    freq = ds.frequency.values
    plan = gi.imaging_plan(uvw, freq, npix, cell, 1e-4)
    dsi = gi.stokes_i_dataset(ds.chunk({"frequency": 8}), uvw)
    tf, ff = ka.bda_factors(uvw, freq, float(np.diff(freq)[0]), math.radians(0.5), 0.01, 8)
    for data in (dsi, gi.average_stokes_i(dsi, tf, ff).chunk({"row": 20000})):
        data = data.persist()
        dens, du, dv = gi.density(data, npix, npix, cell)
        (dens,) = dask.compute(dens)
        wspec = gi.WeightSpec("uniform", dens, 0.0, du, dv)
        index = gi.grid_index(data, plan, wspec).persist()
        model = np.zeros((npix, npix), np.float32)
        model[100, 140] = 2.0
        model[128, 128] = 5.0
        for m in (None, model):
            a = gi.dirty_image(data, plan, wspec, model=m).compute()
            b = gi.dirty_image(data, plan, wspec, model=m, index=index).compute()
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * np.abs(a).max())


def test_fused_averaging_equals_stokes_i_then_average(ps_ds):
    """average_dataset (one pass from XX/YY) == stokes_i_dataset + average_stokes_i,
    with flags, a uv range and autocorrelations in the data."""
    from graphs import image as gi
    from kernels import averaging as ka

    ds = ps_ds.copy()
    rng = np.random.default_rng(11)
    flag = ds.FLAG.values.copy()
    flag[rng.uniform(size=flag.shape) < 0.1] = True
    ds["FLAG"] = (ds.FLAG.dims, flag)
    ds = ds.chunk({"frequency": 8})
    mid = ds.sizes["time"] // 2
    ra0, dec0 = float(ds.PHASE_CENTER_RA[mid]) + 0.01, float(ds.PHASE_CENTER_DEC[mid])
    uvw = _uvw_towards(ds, ra0, dec0)
    freq = ds.frequency.values
    tf, ff = ka.bda_factors(uvw, freq, float(np.diff(freq)[0]), math.radians(1.0), 0.02, 8)
    assert tf.max() > 1 and ff.max() > 1
    uv_range = (30.0, 2000.0)
    ref = gi.average_stokes_i(gi.stokes_i_dataset(ds, uvw, uv_range=uv_range), tf, ff).compute()
    got = gi.average_dataset(ds, uvw, tf, ff, uv_range=uv_range).compute()
    np.testing.assert_array_equal(got.TIME_INDEX.values, ref.TIME_INDEX.values)
    np.testing.assert_array_equal(got.CHAN_INDEX.values, ref.CHAN_INDEX.values)
    np.testing.assert_allclose(got.WEIGHT_I.values, ref.WEIGHT_I.values, rtol=1e-6)
    assert (got.WEIGHT_I.values == 0).sum() == (ref.WEIGHT_I.values == 0).sum()
    scale = np.abs(ref.VIS_I.values).max()
    np.testing.assert_allclose(got.VIS_I.values, ref.VIS_I.values, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(got.UVW_L.values, ref.UVW_L.values, rtol=1e-10, atol=1e-8)


def test_plan_of_averaged_rows_holds_a_w_that_changes_sign():
    """A bin whose samples' w straddle 0 averages to a |w| below every sample's |w|: the
    plan of the averaged rows must still hold it (a full group failed on this)."""
    import xarray as xr

    from graphs import image as gi

    uvw = np.array([[100.0, 50.0, -3.0], [100.0, 50.0, 3.0], [120.0, 40.0, 5.0]]) / 0.2
    dsr = xr.Dataset({"UVW_L": (("row", "uvw_label"), np.array(
        [uvw[:2].mean(0), uvw[2]]))}).chunk({"row": 1})
    dsr["VIS_I"] = (("row",), np.ones(2, np.complex64))
    plan = gi.imaging_plan_rows(dsr, 256, 8 * ARCSEC, 1e-4)
    assert plan.wmin <= 0.0 + 1e-12 and plan.wmax >= 25.0
    # the samples' own range (what the plan used to be made from) misses the mean
    assert np.abs(uvw[:, 2]).min() > abs(dsr.UVW_L.values[0, 2])


# ---------------------------------------------------------------------------------
# w-snapshot imaging: 2-D in the baselines' plane, slant SIN projection
# ---------------------------------------------------------------------------------


def test_coplanar_fit_against_lstsq_and_the_brute_force_loss():
    import dask.array as da

    from graphs.image import coplanar_fit

    rng = np.random.default_rng(7)
    uv = rng.uniform(-3000, 3000, (20000, 2))
    wres = rng.normal(0, 6.0, 20000)
    uvw = np.c_[uv, 0.002 * uv[:, 0] + 0.31 * uv[:, 1] + wres]
    uvw[:50] = 0.0                                     # autocorrelations
    radius = math.radians(1.3)
    for arr in (uvw, da.from_array(uvw, chunks=(3000, 3))):
        cop = coplanar_fit(arr, radius, scale=2.0)
        (a, b), *_ = np.linalg.lstsq(uvw[:, :2], uvw[:, 2], rcond=None)
        assert cop.a == pytest.approx(a, abs=1e-12) and cop.b == pytest.approx(b, abs=1e-12)
        r = 2.0 * (uvw[:, 2] - a * uvw[:, 0] - b * uvw[:, 1])[50:]
        assert cop.max_w == pytest.approx(np.abs(r).max(), rel=1e-9)
        assert cop.rms_w == pytest.approx(np.sqrt((r ** 2).sum() / r.size), rel=1e-6)
        assert cop.slant == (-cop.a, -cop.b)
        brute = 1 - np.cos(2 * np.pi * r * (1 - np.cos(radius))).mean()
        assert brute <= cop.loss and cop.loss == pytest.approx(brute, rel=0.01)


WIDE_CFG = SimConfig(n_ant=64, n_subbands=2, n_chan=8, n_times=12, noise=False, gains=False,
                     rfi=None, threads=1)
WIDE_OFFSETS = [(0.0, 0.0), (1.2, 0.3), (-0.4, 1.25), (0.9, -1.0), (-1.1, -0.8)]


@pytest.fixture(scope="module")
def wide_ds(tmp_path_factory):
    """Sources up to 1.35 deg out, where a snapshot's slant moves them by ~1 pixel."""
    from contimg.io.uvh5 import open_group

    sky = _sky(WIDE_CFG, WIDE_OFFSETS, [10.0, 4.0, 4.0, 5.0, 4.0], [0.0] * 5)
    g = simulate_group(tmp_path_factory.mktemp("wide"), START, cfg=WIDE_CFG, sky=sky)
    return open_group(g.files, n_subbands=2).compute(), g.load_truth(), g.files


def test_snapshot_images_where_its_wcs_says(wide_ds, tmp_path):
    """The same sky imaged with exact w-stacking and as a w-snapshot: every source sits
    at its exact (apparent-frame) position in each image's projection, the snapshot's
    sources are displaced as its SIN PV2 keywords say (a WCS reader moves them back),
    and their fluxes agree. Dirty images: the comparison is of the two operators, not
    of two CLEAN runs (unmasked CLEAN of a T array wanders by several per cent on this
    sky whichever operator it uses)."""
    from astropy.io import fits
    from astropy.wcs import WCS

    from contimg.imaging import image_ms

    ds, truth, _files = wide_ds
    res = {}
    for mode in ("wstack", "snapshot"):
        res[mode] = image_ms(ds, tmp_path / mode, npix=1600, cell_arcsec=6.0, niter=0,
                             w_mode=mode, keep_products=True)
    snap, ws = res["snapshot"].products, res["wstack"].products
    assert ws.slant == (0.0, 0.0) and ws.options["w_stacking"]
    assert not snap.options["w_stacking"] and abs(snap.slant[1]) > 0.1
    hdr = {m: fits.getheader(res[m].paths["image"]) for m in res}
    assert "PV2_1" not in hdr["wstack"]
    assert (hdr["snapshot"]["PV2_1"], hdr["snapshot"]["PV2_2"]) == pytest.approx(snap.slant)
    wcs = {m: WCS(h).celestial for m, h in hdr.items()}
    shifts = []
    for i in range(len(WIDE_OFFSETS)):
        fit = {}
        for m, prod in (("wstack", ws), ("snapshot", snap)):
            px, py = _true_pixel(ds, prod, truth["sky_ra"][i], truth["sky_dec"][i])
            amp, x, y = _fit_source(prod.dirty, prod.beam, prod.cell_rad, px, py)
            assert abs(x - px) < 0.15 and abs(y - py) < 0.15, (m, i, x - px, y - py)
            fit[m] = (amp, x, y)
        # the FITS WCS: the shift between the two images is what their headers say
        # (FITS pixel axes: x = ix, y = iy, 0-based)
        wx = {m: np.array(w.world_to_pixel_values(np.degrees(truth["sky_ra"][i]),
                                                  np.degrees(truth["sky_dec"][i])))
              for m, w in wcs.items()}
        d_img = np.array(fit["snapshot"][1:]) - np.array(fit["wstack"][1:])
        d_wcs = wx["snapshot"] - wx["wstack"]
        assert np.all(np.abs(d_img - d_wcs) < 0.1), (i, d_img, d_wcs)
        shifts.append(np.hypot(*d_img))
        assert fit["snapshot"][0] == pytest.approx(fit["wstack"][0], rel=0.005), i
    assert max(shifts) > 0.5, shifts    # the slant is visible: the test can tell


def test_auto_w_mode_takes_the_snapshot_only_within_its_budget(wide_ds):
    from contimg.imaging import image_dataset

    ds, _truth, _files = wide_ds
    kw = dict(npix=1600, cell_arcsec=6.0, niter=0)
    auto = image_dataset(ds, **kw)
    assert not auto.options["w_stacking"]
    assert auto.options["w_snapshot_loss"] < 1e-3 and auto.slant != (0.0, 0.0)
    strict = image_dataset(ds, w_loss=auto.options["w_snapshot_loss"] / 2, **kw)
    assert strict.options["w_stacking"] and strict.slant == (0.0, 0.0)
    assert "planes" in strict.plan and "planes" not in auto.plan
    with pytest.raises(ValueError, match="w_mode"):
        image_dataset(ds, w_mode="faceted", **kw)


# ---------------------------------------------------------------------------------
# the CLEAN driver's named steps; the FITS header is its WCS
# ---------------------------------------------------------------------------------


def test_named_steps_compose_to_image_dataset(ps_ds):
    """The steps of contimg.imaging_steps, called one by one, make the image
    image_dataset makes (bit for bit), and each step's product is what it says."""
    import dask

    from contimg import imaging_steps as st
    from contimg.imaging import image_config, image_dataset
    from graphs import image as gi
    from kernels import clean as kc

    kw = dict(npix=256, cell_arcsec=10.0, niter=100, grid_tasks=2)
    want = image_dataset(ps_ds, **kw)

    c = image_config(None, kw)
    opts = st.recorded_options(c)
    vis = st.prepare_visibilities(ps_ds, c, opts)
    assert vis.averaged and opts["n_vis_gridded"] < opts["n_vis_in"]   # averaging ran
    snapshot, slant = st.choose_w_mode(vis, c, opts)
    assert snapshot == (not opts["w_stacking"]) and slant == want.slant
    plan, psf_plan = st.plan_imaging(vis, c, snapshot)
    assert plan.describe() == want.plan
    wspec = st.imaging_weights(vis, c)
    d = st.dirty_and_psf(vis, c, plan, psf_plan, wspec)
    np.testing.assert_array_equal(d.dirty, want.dirty)
    np.testing.assert_array_equal(d.psf, want.psf)
    assert d.psf.max() == pytest.approx(1.0, abs=1e-6)                 # normalised PSF
    beam = kc.fit_beam(d.psf, st.cell_rad(c))

    def residual_of(model):
        (res,) = dask.compute(gi.dirty_image(vis.dsi, plan, wspec,
                                             model=model.astype(plan.image_dtype),
                                             gridder=c.gridder, nthreads=c.nthreads,
                                             index=d.index))
        return res.astype(np.float64) / d.norm

    cr = st.clean(d.dirty, d.psf, c, st.clean_mask(vis, c, slant), residual_of)
    assert 0 < cr.n_components <= c.niter and cr.n_major >= 1
    # CLEAN took flux out of the residual: its peak is below the dirty image's
    assert np.abs(cr.residual).max() < 0.5 * np.abs(d.dirty).max()
    prod = st.image_products(ps_ds, vis, c, d, cr, beam, slant, opts, {}, plan)
    for name in ("image", "residual", "model", "psf", "pb", "image_pb", "dirty"):
        np.testing.assert_array_equal(getattr(prod, name), getattr(want, name), err_msg=name)
    assert (prod.n_components, prod.n_major, prod.beam) == (want.n_components,
                                                            want.n_major, want.beam)


def test_fits_header_is_its_wcs_and_reads_back_without_fixes(small_ms, tmp_path):
    """Imaging writes no astropy FITSFixedWarning, and a reader's wcslib finds nothing
    to fix in the header (it is WCS(...).to_header() plus the keywords that are not
    WCS): the WCS read back is the one the image was made with."""
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    from contimg.imaging import image_ms
    from contimg.io.fits import image_wcs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = image_ms(small_ms, tmp_path / "g", npix=256, cell_arcsec=10.0, niter=20,
                       keep_products=True)
    assert not [w for w in caught if issubclass(w.category, FITSFixedWarning)], \
        [str(w.message) for w in caught]
    want = image_wcs(res.products)
    for key, value in want.to_header().items():
        with fits.open(res.paths["image"]) as hdul:
            assert hdul[0].header[key] == value, key
    h = fits.getheader(res.paths["image"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FITSFixedWarning)
        got = WCS(h)
    pix = np.array([[0.0, 0.0, 0, 0], [255.0, 17.0, 0, 0], [128.0, 128.0, 0, 0]])
    g, w = got.all_pix2world(pix, 0), want.all_pix2world(pix, 0)
    np.testing.assert_allclose(g[:, :2], w[:, :2], rtol=0, atol=1e-9)    # deg
    np.testing.assert_allclose(g[:, 2:], w[:, 2:], rtol=1e-12)            # Hz, Stokes
    assert h["OBSGEO-H"] == pytest.approx(1222.0, abs=5.0)   # the geodetic set is there
    assert h["BMAJ"] * 3600 == pytest.approx(res.beam[0], rel=1e-6)
