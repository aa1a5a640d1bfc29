"""Mosaics of overlapping synthetic images (point sources through an Airy PB, convolved
with the restoring beam, beam-correlated noise): fluxes in the overlaps, the noise map
against the measured noise, the WCS read by astropy and by CASA's importfits, the
plan/build records and the nightly schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_photometry import synthetic_fits

from contimg import mosaic
from contimg.state import StateDB

RMS = 1e-3
CENTRES = [150.0, 150.7, 151.4]       # 0.41 deg apart on the sky at dec 54.6


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three 512^2 images whose centres step in RA; 40 sources in their union."""
    tmp = tmp_path_factory.mktemp("mosaic")
    rng = np.random.default_rng(8)
    ra = rng.uniform(149.6, 151.8, 40)
    dec = rng.uniform(54.3, 54.9, 40)
    flux = 10 ** rng.uniform(-1.0, 0.0, 40)
    paths = []
    for k, c in enumerate(CENTRES):
        # only the sources on this image (the rest would be off its grid)
        p, *_ = synthetic_fits(tmp / f"m{k}", npix=512, radec=(ra, dec), fluxes=flux,
                               ra0=c, dec0=54.6, seed=20 + k, rms=RMS, mjd=61000.0 + k / 288)
        paths.append(p)
    return tmp, paths, ra, dec, flux


def test_plan_build_fluxes_noise_and_wcs(members):
    from astropy.io import fits
    from astropy.wcs import WCS

    from contimg.cli import main
    from contimg.photometry import Image, measure

    tmp, paths, ra, dec, flux = members
    db_path = tmp / "db.sqlite3"
    with StateDB(db_path) as db:
        for p in paths:
            db.register_image(p)
        # the window holds the first two images only: the third is 10 min later
        t0 = (61000.0 - 40587.0) * 86400.0
        p = mosaic.plan(db, "two", t0, t0 + 600.0)
        assert len(p["members"]) == 2
    from astropy.time import Time

    since, until = Time(61000 - 0.5, format="mjd").isot, Time(61000.5, format="mjd").isot
    assert main(["mosaic", "plan", "--name", "all", "--since", since, "--until", until,
                 "--db", str(db_path)]) == 0
    out = tmp / "out" / "all.fits"
    assert main(["mosaic", "build", "all", "--output", str(out), "--db", str(db_path)]) == 0
    with StateDB(db_path) as db:
        row = db.query("SELECT * FROM mosaics WHERE name='all'")[0]
        n_mem = db.query("SELECT COUNT(*) AS n FROM mosaic_members m JOIN mosaics s ON "
                         "s.id = m.mosaic_id WHERE s.name='all'")[0]["n"]
    assert row["status"] == "built" and row["n_images"] == 3 == n_mem
    assert row["products"]["noise"].endswith("all-noise.fits")
    h = fits.getheader(out)
    wcs = WCS(h)
    mos = fits.getdata(out).astype(float)
    noise = fits.getdata(tmp / "out" / "all-noise.fits").astype(float)
    weight = fits.getdata(tmp / "out" / "all-weight.fits").astype(float)
    assert np.allclose(noise[weight > 0], 1 / np.sqrt(weight[weight > 0]), rtol=1e-5)
    # how many members cover each source with PB >= 0.2
    from kernels.beam import airy_power

    def pb(c):
        sep = np.radians(np.hypot((ra - c) * np.cos(np.radians(54.6)), dec - 54.6))
        return airy_power(sep, 1.4e9, 4.65)

    # only sources on an image's grid are in it: the 512 px image is 0.85 deg wide
    on = [(np.abs((ra - c) * np.cos(np.radians(54.6))) < 0.40) & (np.abs(dec - 54.6) < 0.40)
          for c in CENTRES]
    cover = sum(o & (pb(c) >= 0.2) for o, c in zip(on, CENTRES))
    img = Image(path=out, data=np.nan_to_num(mos), header=h, wcs=wcs,
                beam=(h["BMAJ"], h["BMIN"], h["BPA"]), cell_deg=abs(h["CDELT2"]),
                freq_hz=1.4e9, bandwidth_hz=0.0, t_mid=0.0, t_start=0.0)
    res = measure(img, ra, dec, pb=np.where(np.isfinite(mos), 1.0, 0.0), pb_cut=0.0)
    x, y = wcs.world_to_pixel_values(ra, dec)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    inside = (ix >= 0) & (iy >= 0) & (ix < mos.shape[1]) & (iy < mos.shape[0])
    nmap = np.full(ra.size, np.nan)
    nmap[inside] = noise[iy[inside], ix[inside]]
    overlap = (cover >= 2) & res["measured"] & (res["flags"] == 0) & (flux / nmap > 250)
    assert overlap.sum() >= 5, overlap.sum()
    rel = res["flux_jy"][overlap] / flux[overlap] - 1
    assert np.max(np.abs(rel)) < 0.02, rel
    # noise: the rms of source-free mosaic pixels over the noise map
    from kernels.photometry import source_mask

    m = source_mask(*mos.shape, np.ascontiguousarray(x), np.ascontiguousarray(y), 40.0)
    z = (mos / noise)[~m & np.isfinite(mos)]
    robust = 1.482602218505602 * np.median(np.abs(z - np.median(z)))
    assert z.size > 50000 and abs(robust - 1) < 0.10, robust


@pytest.mark.interop
def test_casa_importfits_reads_the_mosaic(members):
    import importlib.util

    if importlib.util.find_spec("casatasks") is None:
        pytest.skip("casatasks is not installed")
    from astropy.wcs import WCS
    from casarun import run_casa

    tmp, paths, *_ = members
    mos, wt, noise, wcs, beam = mosaic.make_mosaic(paths[:2])
    p = mosaic.write_mosaic(tmp / "casa" / "m.fits", mos, wt, noise, wcs, beam)["mosaic"]
    im = tmp / "casa" / "m.im"
    out = run_casa(
        tmp / "casa",
        "import json\nfrom casatasks import importfits, imhead\n"
        f"importfits(fitsimage={p!r}, imagename={str(im)!r})\n"
        f"h = imhead({str(im)!r}, mode='list')\n"
        "print(json.dumps({'shape': [int(x) for x in h['shape']], "
        "'crval1': float(h['crval1']), 'crval2': float(h['crval2']), "
        "'cdelt2': float(h['cdelt2']), 'proj': h['projection'], 'bunit': h['bunit']}))\n",
        name="imp.py")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    w = WCS(p)
    assert info["shape"][:2] == list(mos.shape[::-1])
    assert np.degrees(info["crval1"]) % 360 == pytest.approx(w.wcs.crval[0], abs=1e-9)
    assert np.degrees(info["crval2"]) == pytest.approx(w.wcs.crval[1], abs=1e-9)
    assert np.degrees(info["cdelt2"]) == pytest.approx(w.wcs.cdelt[1], rel=1e-9)
    assert info["proj"] == "SIN" and info["bunit"].lower() == "jy/beam"


def test_nightly_schedule_and_bad_input(tmp_path):
    import datetime as dt

    with StateDB(tmp_path / "db.sqlite3") as db:
        now = dt.datetime(2026, 3, 2, 5, 30, tzinfo=dt.timezone.utc).timestamp()
        due = mosaic.nightly_due(db, now, 4)
        assert due["name"] == "night-2026-03-01"
        assert due["until"] - due["since"] == 86400.0
        assert dt.datetime.fromtimestamp(due["until"], dt.timezone.utc).hour == 4
        early = dt.datetime(2026, 3, 2, 3, 0, tzinfo=dt.timezone.utc).timestamp()
        assert mosaic.nightly_due(db, early, 4)["name"] == "night-2026-02-28"
        mosaic.plan(db, due["name"], due["since"], due["until"])
        assert mosaic.nightly_due(db, now, 4) is None           # planned once
        with pytest.raises(ValueError, match="bad time 'yesterday'"):
            mosaic.plan(db, "x", "yesterday", 0)
        with pytest.raises(ValueError, match="mosaic nope: not planned"):
            mosaic.build(db, "nope")
    assert mosaic.stage_nightly_mosaic(tmp_path / "db.sqlite3", hour_utc=None) is None


def test_stream_submits_the_nightly_mosaic_once(tmp_path):
    from concurrent.futures import Future

    from contimg.stream import Stream, StreamConfig

    calls = []
    pending = Future()

    class Client:
        def submit(self, fn, *args, **kw):
            calls.append((fn, args, kw))
            return pending

    cfg = StreamConfig(incoming=tmp_path / "in", output=tmp_path / "out",
                       db_path=tmp_path / "db.sqlite3", mosaic_hour_utc=0)
    s = Stream(cfg, Client())
    s.step()                                  # a pass of the loop submits it
    assert len(calls) == 1
    fn, args, kw = calls[0]
    assert fn is mosaic.stage_nightly_mosaic and kw["hour_utc"] == 0
    assert kw["out_dir"] == str(tmp_path / "out" / "mosaics")
    s._mosaic.checked = 0.0
    s._mosaic.tick()                          # still running: not submitted again
    assert len(calls) == 1
    pending.set_result({"name": "night-x", "n_images": 0})
    s._mosaic.checked = 0.0
    s._mosaic.tick()                          # collected
    assert s._mosaic.future is None
    # the task itself plans the night once, then has nothing to do
    task_kw = {k: v for k, v in kw.items() if k not in ("pure", "key")}
    assert fn(*args, **task_kw)["n_images"] == 0
    assert fn(*args, **task_kw) is None
    # no hour configured: nothing
    s2 = Stream(StreamConfig(incoming=tmp_path / "in", output=tmp_path / "o2",
                             db_path=tmp_path / "db.sqlite3"), Client())
    s2._mosaic.tick()
    assert len(calls) == 1
