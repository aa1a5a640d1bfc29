"""Gridder throughput: kernels.gridding.vis2dirty against ducc0.wgridder on the same data.

DSA-110-like visibilities are synthesised here (nothing is downloaded):

* layout: a T of 48 dishes on an east-west line (0-400 m) and 35 on a north-south line
  (0-440 m) starting at the middle of the EW line, plus 13 outriggers 0.6-2 km out:
  96 correlated antennas, 4656 baselines including autocorrelations (the autos are
  flagged, as imaging does);
* pointing declination +54.57 deg at OVRO (lat 37.2314 deg); 24 integrations of
  12.884902 s phased to the group's middle (hour angles -2.5 .. +2.5 min);
* 768 ascending channels, 244.140625 kHz wide, top channel 1498.643 MHz (or the first
  ``--nchan`` channels of the band's top);
* visibilities complex64 (the data contract's precision; complex128 for epsilon < 1e-5,
  which single precision cannot reach, in ducc0 as here), random, with 1 % random flags;
  weights all one (passed as None to both).

The image is 4096^2 at 3 arcsec by default. Both gridders get the same epsilon,
precision and thread count; the figures are medians of ``--repeats`` runs each.

    python bench/grid.py                      # one subband (48 channels), eps 1e-4 and 1e-6
    python bench/grid.py --nchan 768          # the full group (86 M visibilities)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kernels.constants import SIDEREAL_DAY_S
from kernels.constants import SPEED_OF_LIGHT as C

LAT = np.deg2rad(37.2314)
DEC = np.deg2rad(54.57)


def dsa110_like_enu(seed=110):
    """(96, 3) east/north/up antenna positions (metres) of a DSA-110-like T."""
    rng = np.random.default_rng(seed)
    ew = np.stack([np.linspace(0, 400, 48) + rng.normal(0, 0.5, 48), rng.normal(0, 0.3, 48)], 1)
    ns = np.stack([200 + rng.normal(0, 0.3, 35),
                   np.linspace(12, 440, 35) + rng.normal(0, 0.5, 35)], 1)
    r = rng.uniform(600, 2000, 13)
    phi = rng.uniform(0, 2 * np.pi, 13)
    out = np.stack([200 + r * np.cos(phi), r * np.sin(phi)], 1)
    en = np.concatenate([ew, ns, out])
    return np.concatenate([en, rng.normal(0, 1.0, (en.shape[0], 1))], 1)


def uvw_for(enu, ntime, integration=12.884902):
    """(ntime * nbl, 3) uvw (metres), baselines incl. autos, phased to the middle time."""
    e, n, u = enu[:, 0], enu[:, 1], enu[:, 2]
    # local ENU -> equatorial (X towards HA=0 on the equator, Y east, Z north pole)
    X = -np.sin(LAT) * n + np.cos(LAT) * u
    Y = e
    Z = np.cos(LAT) * n + np.sin(LAT) * u
    a1, a2 = np.triu_indices(enu.shape[0])
    bx, by, bz = X[a2] - X[a1], Y[a2] - Y[a1], Z[a2] - Z[a1]
    t = (np.arange(ntime) - 0.5 * (ntime - 1)) * integration
    ha = 2 * np.pi * t / SIDEREAL_DAY_S
    out = []
    for h in ha:
        su, cu = np.sin(h), np.cos(h)
        uu = su * bx + cu * by
        vv = -np.sin(DEC) * cu * bx + np.sin(DEC) * su * by + np.cos(DEC) * bz
        ww = np.cos(DEC) * cu * bx - np.cos(DEC) * su * by + np.sin(DEC) * bz
        out.append(np.stack([uu, vv, ww], 1))
    auto = np.tile(a1 == a2, ntime)
    return np.concatenate(out), auto


def interleaved(fns, repeats):
    """Time the functions alternately (fair under a fluctuating machine load).

    Returns per function (median seconds, all times, last result).
    """
    ts = [[] for _ in fns]
    res = [None] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            res[k] = fn()
            ts[k].append(time.perf_counter() - t0)
    return [(float(np.median(t)), t, r) for t, r in zip(ts, res)]


def main(argv=None):
    ap = argparse.ArgumentParser(description="gridder throughput: ours vs ducc0")
    ap.add_argument("--ntime", type=int, default=24)
    ap.add_argument("--nchan", type=int, default=48, help="channels from the top of the band")
    ap.add_argument("--npix", type=int, default=4096)
    ap.add_argument("--cell-arcsec", type=float, default=3.0)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-4, 1e-6])
    ap.add_argument("--nthreads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--double", action="store_true", help="complex128 visibilities")
    ap.add_argument("--no-ducc", action="store_true")
    ap.add_argument("--degrid", action="store_true", help="also time dirty2vis (the adjoint)")
    args = ap.parse_args(argv)

    import ducc0.wgridder as dw

    from kernels import gridding

    enu = dsa110_like_enu()
    uvw, auto = uvw_for(enu, args.ntime)
    freq = 1498643188.4765625 - 244140.625 * np.arange(768)[::-1]
    freq = np.ascontiguousarray(freq[-args.nchan:])
    nrow, nchan = uvw.shape[0], freq.size
    rng = np.random.default_rng(1)
    cdt = np.complex128 if args.double else np.complex64
    vis = np.empty((nrow, nchan), dtype=cdt)
    vis.real = rng.standard_normal((nrow, nchan))
    vis.imag = rng.standard_normal((nrow, nchan))
    flags = rng.random((nrow, nchan)) < 0.01
    flags[auto] = True
    mask = (~flags).astype(np.uint8)
    pix = np.deg2rad(args.cell_arcsec / 3600.0)
    nvis = int((~flags).sum())
    wl = np.abs(uvw[:, 2]).max() * freq.max() / C
    print(f"data: {nrow} rows x {nchan} channels = {nrow * nchan / 1e6:.2f} M visibilities "
          f"({nvis / 1e6:.2f} M unflagged), {'complex128' if args.double else 'complex64'}; "
          f"max |w| = {wl:.0f} wavelengths; max |u|,|v| = "
          f"{np.abs(uvw[:, 0]).max() * freq.max() / C:.0f}, "
          f"{np.abs(uvw[:, 1]).max() * freq.max() / C:.0f} wavelengths")
    print(f"image: {args.npix}^2 at {args.cell_arcsec} arcsec "
          f"(field {args.npix * args.cell_arcsec / 3600:.2f} deg)")
    common = dict(npix_x=args.npix, npix_y=args.npix, pixsize_x=pix, pixsize_y=pix)
    # warm up numba (compilation / cache load is not throughput)
    gridding.vis2dirty(uvw[:200], freq[:4], vis[:200, :4], npix_x=64, npix_y=64,
                       pixsize_x=pix, pixsize_y=pix, epsilon=1e-4)
    vis_single = vis
    for eps in args.eps:
        # single precision supports epsilon >= 1e-5 (in ducc0 too): below, use complex128
        double = args.double or eps < 1e-5
        vis = vis_single.astype(np.complex128) if double and not args.double else vis_single
        for nth in args.nthreads:
            plan = gridding.plan_for(uvw, freq, args.npix, args.npix, pix, pix, eps,
                                     flags=flags, vis=vis, double=double, nthreads=nth)
            print(f"\neps={eps:g} nthreads={nth} {vis.dtype}: ours {plan.describe()}")
            def ours():
                return gridding.vis2dirty(uvw, freq, vis, None, flags, epsilon=eps,
                                          nthreads=nth, plan=plan, **common)

            def theirs():
                return dw.vis2dirty(uvw=uvw, freq=freq, vis=vis, mask=mask, epsilon=eps,
                                    do_wgridding=True, nthreads=nth, **common)

            fns = [ours] if args.no_ducc else [ours, theirs]
            res = interleaved(fns, args.repeats)
            t_ours, ts_ours, img = res[0]
            print(f"  ours : {t_ours:8.2f} s  ({nvis / t_ours / 1e6:6.2f} M vis/s)  "
                  f"runs {', '.join(f'{t:.2f}' for t in ts_ours)}")
            if args.no_ducc:
                continue
            t_ducc, ts_ducc, ref = res[1]
            print(f"  ducc0: {t_ducc:8.2f} s  ({nvis / t_ducc / 1e6:6.2f} M vis/s)  "
                  f"runs {', '.join(f'{t:.2f}' for t in ts_ducc)}")
            diff = np.linalg.norm(img.astype(np.float64) - ref) / np.linalg.norm(ref)
            print(f"  throughput ours/ducc0 = {t_ducc / t_ours:.2f}   "
                  f"(target >= 0.70); images differ by {diff:.2e} (rel. L2)")
            if not args.degrid:
                continue
            model = ref.astype(np.float64 if double else np.float32)
            (t_o, _, v_o), (t_d, _, v_d) = interleaved([
                lambda: gridding.dirty2vis(uvw, freq, model, None, flags, pixsize_x=pix,
                                           pixsize_y=pix, epsilon=eps, nthreads=nth,
                                           plan=plan),
                lambda: dw.dirty2vis(uvw=uvw, freq=freq, dirty=model, mask=mask,
                                     pixsize_x=pix, pixsize_y=pix, epsilon=eps,
                                     do_wgridding=True, nthreads=nth),
            ], args.repeats)
            vdiff = np.linalg.norm(v_o - v_d) / np.linalg.norm(v_d)
            print(f"  dirty2vis ours {t_o:.2f} s, ducc0 {t_d:.2f} s, ratio {t_d / t_o:.2f}; "
                  f"visibilities differ by {vdiff:.2e} (rel. L2)")


if __name__ == "__main__":
    main()
