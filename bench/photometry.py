"""Forced photometry and variability at survey scale, against the 5-minute budget
between groups (the anchor: there is no other pipeline's figure to compare with; the
budget is what the stream must meet).

    python bench/photometry.py [--sources 10000] [--npix 2048] [--stat-sources 100000]
                               [--threads 2] [--repeat 3]

1. Forced photometry of ``--sources`` catalogue sources on one full-size image
   (2048^2 at 6", a synthetic restored image: point sources convolved with a 50"x32"
   beam, beam-correlated noise, an Airy PB; written as ``-image.fits`` and
   ``-image-pb.fits``): ``contimg.photometry.measure_image`` (read, PB, mask, rms,
   fits) and the whole stage (``stage_photometry``: + normalisation, storage of every
   row, running sums, ESE triggers) into a fresh state database.
2. The variability update of ``--stat-sources`` sources with one new epoch
   (``contimg.variability.update``: read the running sums, update, write them back)
   in a database that already holds their statistics.

Prints ours, the budget (300 s) and the budget / ours ratio. Figures only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
BUDGET_S = 300.0


def synthetic_image(prefix: Path, n_src: int, npix: int, rng):
    """A restored-looking image with ``n_src`` point sources (FFT convolution)."""
    from astropy.io import fits
    from astropy.wcs import WCS
    from scipy.signal import fftconvolve

    from kernels import photometry as kph
    from kernels.beam import airy_power

    cell = 6.0 / 3600
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN"]
    w.wcs.crval = [150.0, 54.6]
    w.wcs.crpix = [npix // 2 + 1] * 2
    w.wcs.cdelt = [-cell, cell]
    q = kph.beam_quadratic(50 / 6, 32 / 6, 30.0, -1.0)
    px, py = rng.uniform(10, npix - 11, n_src), rng.uniform(10, npix - 11, n_src)
    ra, dec = w.pixel_to_world_values(px, py)
    flux = np.exp(rng.uniform(np.log(5e-3), np.log(2.0), n_src))
    yy, xx = np.mgrid[0:npix, 0:npix]
    r, d = w.pixel_to_world_values(xx, yy)
    pb = airy_power(np.radians(np.hypot((r - 150.0) * np.cos(np.radians(54.6)), d - 54.6)),
                    1.4e9, 4.65)
    del r, d, yy, xx
    sky = np.zeros((npix, npix))
    np.add.at(sky, (np.rint(py).astype(int), np.rint(px).astype(int)), flux)
    sky *= pb
    h = 25
    ky, kx = np.mgrid[-h:h + 1, -h:h + 1]
    beam = np.exp(-(q[0] * kx * kx + q[1] * kx * ky + q[2] * ky * ky))
    noise = fftconvolve(rng.normal(size=(npix, npix)),
                        np.exp(-2 * (q[0] * kx * kx + q[1] * kx * ky + q[2] * ky * ky)),
                        mode="same")
    img = fftconvolve(sky, beam, mode="same") + 1e-3 * noise / noise.std()
    hd = w.to_header()
    hd["BMAJ"], hd["BMIN"], hd["BPA"] = 50 / 3600, 32 / 3600, 30.0
    hd["MJD-OBS"], hd["MJD-AVG"] = 61000.0, 61000.0 + 150 / 86400
    fits.PrimaryHDU(img.astype(np.float32), header=hd).writeto(f"{prefix}-image.fits",
                                                              overwrite=True)
    fits.PrimaryHDU(np.where(pb >= 0.1, img / pb, np.nan).astype(np.float32),
                    header=hd).writeto(f"{prefix}-image-pb.fits", overwrite=True)
    return dict(ra_deg=ra, dec_deg=dec, flux=flux)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=int, default=10000)
    ap.add_argument("--npix", type=int, default=2048)
    ap.add_argument("--stat-sources", type=int, default=100000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    from contimg import catalog, variability
    from contimg.photometry import measure_image, stage_photometry
    from contimg.state import StateDB

    rng = np.random.default_rng(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-phot-"))
    t = time.perf_counter()
    src = synthetic_image(tmp / "g", args.sources, args.npix, rng)
    print(f"synthetic {args.npix}^2 image with {args.sources} sources in "
          f"{time.perf_counter() - t:.1f} s -> {tmp}")
    measure_image(tmp / "g-image.fits", src, threads=args.threads)     # numba warm-up
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        res = measure_image(tmp / "g-image.fits", src, threads=args.threads)
        times.append(time.perf_counter() - t)
    ours = float(np.median(times))
    n_meas = int(res["measured"].sum())
    print(f"forced photometry, {n_meas} of {args.sources} sources measured: "
          f"{ours:.2f} s (median of {args.repeat}); budget {BUDGET_S:.0f} s; "
          f"budget/ours = {BUDGET_S / ours:.0f}x")
    sky = dict(ra=np.radians(src["ra_deg"]), dec=np.radians(src["dec_deg"]),
               flux=src["flux"], alpha=np.zeros(args.sources),
               name=np.array([f"B{i:06d}" for i in range(args.sources)]))
    catalog.write_sky_catalog(sky, tmp / "sky.csv")
    with StateDB(tmp / "db.sqlite3") as db:
        catalog.load_into_db(db, tmp / "sky.csv")
    t = time.perf_counter()
    out = stage_photometry(tmp / "g-image.fits", tmp / "db.sqlite3", threads=args.threads)
    st = time.perf_counter() - t
    print(f"photometry stage (measure + normalise + store {out['n_measured']} rows + "
          f"running sums + ESE triggers): {st:.2f} s; budget/ours = {BUDGET_S / st:.0f}x "
          f"(flux scale {out['scale']:.4f} +- {out['scale_err']:.4f} from {out['n_ref']} "
          "references)")

    n = args.stat_sources
    with StateDB(tmp / "stats.sqlite3") as db:
        with db.transaction() as con:
            con.executemany("INSERT INTO sources (name, ra_deg, dec_deg, flux_jy) VALUES "
                            "(?,?,?,?)", [(f"S{i}", (i * 1e-3) % 360, 50.0, 1.0)
                                          for i in range(n)])
        ids = np.arange(1, n + 1)
        for k in range(3):   # a history to update
            variability.update(db, ids, np.full(n, 1.7e9 + k * 86400),
                               rng.normal(1, 0.01, n), np.full(n, 0.01))
        times = []
        for k in range(args.repeat):
            f = rng.normal(1, 0.01, n)
            t = time.perf_counter()
            variability.update(db, ids, np.full(n, 1.8e9 + k * 86400), f, np.full(n, 0.01))
            times.append(time.perf_counter() - t)
    vt = float(np.median(times))
    print(f"variability update of {n} sources with one epoch: {vt:.2f} s (median of "
          f"{args.repeat}); budget {BUDGET_S:.0f} s; budget/ours = {BUDGET_S / vt:.0f}x")


if __name__ == "__main__":
    main()
