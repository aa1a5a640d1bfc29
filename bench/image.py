"""Imaging bench: our gridder against ducc0, and our whole image against WSClean 3.1.

On one DSA-110 group (simulated full size unless ``--group`` names a directory of UVH5
subband files), re-phased to its middle integration and written once as an MS:

1. gridder throughput: ``kernels.gridding.vis2dirty`` against
   ``ducc0.wgridder.experimental.vis2dirty`` on the same Stokes I visibilities, Briggs
   weights, image (default 2048^2 at 6"), epsilon and precision, one thread each;
2. the whole image (dirty + PSF + CLEAN + restore + PB + FITS):
   :func:`contimg.imaging.image_ms` on the MS against ``wsclean`` with matching
   parameters (size, scale, Briggs robust, niter, mgain, gain, auto-threshold), both on
   the same cores; wall times, peak memory (max RSS), peak fluxes and noise. Both
   average before gridding at the same smearing budget (1 % at the primary beam's
   half-power radius): ours per baseline in time and frequency, WSClean with
   ``-baseline-averaging`` (time only); ``--no-average`` switches both off.

    python bench/image.py                          # full-size group, 2048^2 at 6"
    python bench/image.py --group DIR --size 2048 --niter 500

Each figure is from one run (``--repeats`` for the gridder). Timings on a shared
machine are noisy: quote them with the load at the time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kernels.constants import ARCSEC
from kernels.constants import SPEED_OF_LIGHT as C


def group_files(group, workdir, threads):
    """One group's UVH5 files: those in the directory ``group``, else a simulated
    calibrated full group in ``workdir/raw`` (no antenna gains, no RFI: imaging follows
    calibration and flagging; thermal noise on)."""
    if group:
        return sorted(Path(group).glob("*_sb??.hdf5"))
    from contimg.simulate import SimConfig, simulate_group

    t0 = time.perf_counter()
    files = simulate_group(Path(workdir) / "raw",
                           cfg=SimConfig(threads=threads, gains=False, rfi=None),
                           calibrator=True).files
    print(f"simulated a full-size group in {time.perf_counter() - t0:.0f} s")
    return files


def run_result(script, payload):
    """Run ``script`` (a ``python -c`` text) in a fresh process with ``payload`` as JSON
    in ``argv[1]``; returns the JSON of its last ``RESULT`` line, and its log."""
    r = subprocess.run([sys.executable, "-c", script, json.dumps(payload)],
                       capture_output=True, text=True)
    if r.returncode:
        print(r.stdout[-3000:], r.stderr[-3000:])
        raise SystemExit("contimg image failed")
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[7:]), r.stderr


def _rephased_ms(ds, path):
    from contimg import schema
    from contimg.io.ms import write_ms
    from contimg.uvw import compute_uvw

    mid = ds.sizes["time"] // 2
    ra0, dec0 = float(ds.PHASE_CENTER_RA[mid]), float(ds.PHASE_CENTER_DEC[mid])
    uvw1 = compute_uvw(ds.ANTENNA_POSITION.values, ds.baseline_antenna1_id.values,
                       ds.baseline_antenna2_id.values, ds.time.values, ra0, dec0,
                       telescope_location=np.asarray(ds.attrs["telescope_location"]))
    dw = ds.UVW.values[..., 2] - uvw1[..., 2]
    rot = np.exp(2j * np.pi * dw[..., None] * ds.frequency.values / C).astype(np.complex64)
    ds = ds.copy()
    ds["VISIBILITY"] = (schema.VIS_DIMS, ds.VISIBILITY.values * rot[..., None])
    ds["UVW"] = (schema.UVW_DIMS, uvw1)
    ds["PHASE_CENTER_RA"] = ("time", np.full(ds.sizes["time"], ra0))
    ds["PHASE_CENTER_DEC"] = ("time", np.full(ds.sizes["time"], dec0))
    if "phase_center_name" in ds.coords:   # one centre: one name (one FIELD row)
        name = str(ds.phase_center_name.values[mid])
        ds = ds.assign_coords(phase_center_name=("time", [name] * ds.sizes["time"]))
    write_ms(ds, path)
    return uvw1


def bench_gridder(ds, uvw_t, args):
    """Stokes I + Briggs weights in memory, then ours vs ducc0 (one thread each)."""
    from graphs import image as gi
    from kernels import gridding as kg
    from kernels import weighting as kw

    dsi = gi.stokes_i_dataset(ds, uvw_t).compute()
    nt, nb, nf = dsi.VIS_I.shape
    freq = dsi.frequency.values
    uvw = uvw_t.reshape(-1, 3)
    vis = dsi.VIS_I.values.reshape(-1, nf)
    w = dsi.WEIGHT_I.values.reshape(-1, nf)
    npix, cell = args.size, args.cell * ARCSEC
    du = 1.0 / (npix * cell)
    dens = kw.density_grid(uvw, freq, w, npix, npix, du, du)
    f2 = kw.briggs_f2(dens, float(w.sum()), args.robust)
    wi = kw.imaging_weights(uvw, freq, w, "briggs", dens, du, du, f2)
    nvis = int(np.count_nonzero(wi))
    double = args.epsilon < 1e-5
    if double:
        vis = vis.astype(np.complex128)
        wi = wi.astype(np.float64)
    print(f"gridder: {nvis / 1e6:.1f} M visibilities (Stokes I, unflagged, cross), "
          f"{npix}^2 at {args.cell}\", epsilon {args.epsilon:g}, "
          f"{'double' if double else 'single'} precision, 1 thread", flush=True)
    kw_common = dict(npix_x=npix, npix_y=npix, pixsize_x=cell, pixsize_y=cell,
                     epsilon=args.epsilon, nthreads=1, flip_v=True, divide_by_n=False)
    t_ours, t_ducc = [], []
    img_o = img_d = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        img_o = kg.vis2dirty(uvw, freq, vis, weights=wi, **kw_common)
        t_ours.append(time.perf_counter() - t0)
        try:
            from ducc0.wgridder.experimental import vis2dirty as dv2d
        except ImportError:
            print("  ducc0 is not installed: no comparison")
            break
        t0 = time.perf_counter()
        img_d = dv2d(uvw=uvw, freq=freq, vis=vis, wgt=wi, do_wgridding=True, **kw_common)
        t_ducc.append(time.perf_counter() - t0)
    to = float(np.median(t_ours))
    out = {"nvis": nvis, "ours_s": to, "ours_mvis_s": nvis / to / 1e6}
    print(f"  ours : {to:7.2f} s  ({nvis / to / 1e6:6.2f} M vis/s)")
    if t_ducc:
        td = float(np.median(t_ducc))
        diff = float(np.linalg.norm(img_o - img_d) / np.linalg.norm(img_d))
        print(f"  ducc0: {td:7.2f} s  ({nvis / td / 1e6:6.2f} M vis/s)")
        print(f"  throughput ours/ducc0 = {td / to:.2f}   (images differ by {diff:.2e} rel. L2)")
        out.update(ducc0_s=td, ratio=td / to, rel_diff=diff)
    return out


_OURS = """
import json, sys, time, logging
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
logging.getLogger("numba").setLevel(logging.WARNING)
import dask
from contimg.imaging import image_ms
a = json.loads(sys.argv[1])
dask.config.set(scheduler="threads", num_workers=a.pop("workers"))
t0 = time.perf_counter()
r = image_ms(a.pop("ms"), a.pop("prefix"), **a)
wall = time.perf_counter() - t0
hwm = [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")][0]
print("RESULT " + json.dumps(dict(wall=wall, peak=r.peak, noise=r.noise, beam=r.beam,
      ncomp=r.n_components, nmajor=r.n_major, timings=r.timings, maxrss_mb=hwm / 1024)))
"""


def _run_peak_memory(cmd):
    """Run ``cmd``; return (exit code, peak resident memory in MB, output).

    Peak memory is the child's ``VmHWM`` polled from /proc (``ru_maxrss`` of a child
    forked from this large process would include our own pages)."""
    import threading

    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        hwm = [0]

        def poll():
            path = f"/proc/{p.pid}/status"
            while p.poll() is None:
                try:
                    for line in open(path):
                        if line.startswith("VmHWM"):
                            hwm[0] = max(hwm[0], int(line.split()[1]))
                except OSError:
                    pass
                time.sleep(0.2)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = p.wait()
        th.join()
        out.seek(0)
        return rc, hwm[0] / 1024, out.read().decode(errors="replace")


def bench_image(ms, workdir, args):
    from astropy.io import fits

    from kernels.clean import robust_sigma

    res = {}
    wsclean = shutil.which("wsclean")
    if wsclean and not args.skip_wsclean:
        name = str(workdir / "ws")
        cmd = [wsclean, "-j", str(args.threads), "-quiet", "-name", name, "-size",
               str(args.size), str(args.size), "-scale", f"{args.cell}asec", "-pol", "I",
               "-weight", "briggs", str(args.robust), "-niter", str(args.niter),
               "-auto-threshold", str(args.auto_threshold), "-mgain", "0.8", "-gain", "0.1",
               "-no-update-model-required", "-use-wgridder"]
        if args.average:
            # WSClean's baseline-dependent averaging (time only) at our smearing budget:
            # the uv distance a bin may span, in wavelengths, for a 1 % loss at the
            # primary beam's half-power radius (kernels.averaging)
            theta = 0.5 * 1.029 * C / 1.4986e9 / 4.65
            bda = math.sqrt(6 * 0.01) / (math.pi * theta)
            cmd += ["-baseline-averaging", f"{bda:.3f}"]
        cmd.append(str(ms))
        t0 = time.perf_counter()
        rc, rss, err = _run_peak_memory(cmd)
        t_ws = time.perf_counter() - t0
        if rc:
            print(err[-3000:])
            raise SystemExit("wsclean failed")
        img = fits.getdata(f"{name}-image.fits")[0, 0]
        resid = fits.getdata(f"{name}-residual.fits")[0, 0]
        res["wsclean"] = dict(wall=t_ws, peak=float(img.max()),
                              noise=robust_sigma(resid), maxrss_mb=rss)
        print(f"WSClean 3.1 (-j {args.threads}, -use-wgridder): {t_ws:7.1f} s wall, peak "
              f"{img.max():.4g} Jy/beam, noise {robust_sigma(resid):.3g} Jy/beam, max RSS "
              f"{rss:.0f} MB", flush=True)
    a = dict(ms=str(ms), prefix=str(workdir / "ours"), npix=args.size,
             cell_arcsec=args.cell, weighting="briggs", robust=args.robust, niter=args.niter,
             auto_threshold_sigma=args.auto_threshold, mgain=0.8, gain=0.1,
             epsilon=args.epsilon, nthreads=1, workers=args.threads, average=args.average)
    t0 = time.perf_counter()
    ours, _log = run_result(_OURS, a)
    ours["wall_incl_start"] = time.perf_counter() - t0
    img = fits.getdata(workdir / "ours-image.fits")[0, 0]
    ours["peak"] = float(img.max())
    res["ours"] = ours
    tm = ", ".join(f"{k} {v:.1f}" for k, v in ours["timings"].items())
    print(f"contimg image ({args.threads} dask threads): {ours['wall']:7.1f} s wall ({tm}); "
          f"peak {ours['peak']:.4g} Jy/beam, noise {ours['noise']:.3g} Jy/beam, "
          f"{ours['ncomp']} components / {ours['nmajor']} major cycles, max RSS "
          f"{ours['maxrss_mb']:.0f} MB", flush=True)
    if "wsclean" in res:
        ws = res["wsclean"]
        print(f"  whole image: WSClean/ours wall = {ws['wall'] / ours['wall']:.2f} "
              f"(>1: we are faster); peak ours/WSClean = {ours['peak'] / ws['peak']:.4f}; "
              f"noise ours/WSClean = {ours['noise'] / ws['noise']:.3f}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", help="directory of one group's UVH5 files (default: simulate)")
    ap.add_argument("--workdir", help="where to put the MS and images (default: a temp dir)")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--cell", type=float, default=6.0, help="arcsec")
    ap.add_argument("--no-average", dest="average", action="store_false",
                    help="no baseline-dependent averaging on either side (default: ours "
                    "at a 1 %% loss budget, WSClean's -baseline-averaging at the same)")
    ap.add_argument("--robust", type=float, default=0.0)
    ap.add_argument("--niter", type=int, default=1000)
    ap.add_argument("--auto-threshold", type=float, default=3.0)
    ap.add_argument("--epsilon", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2, help="cores for the whole-image runs")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-gridder", action="store_true")
    ap.add_argument("--skip-wsclean", action="store_true")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    from contimg.runtime import configure

    configure()

    from contimg.io.uvh5 import open_group

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_image_"))
    workdir.mkdir(parents=True, exist_ok=True)
    files = group_files(args.group, workdir, args.threads)
    ds = open_group(files, n_subbands=len(files)).compute()
    print(f"group: {ds.sizes['time']} integrations x {ds.sizes['baseline_id']} baselines x "
          f"{ds.sizes['frequency']} channels x 2 pols", flush=True)
    ms = workdir / "group.ms"
    t0 = time.perf_counter()
    uvw_t = _rephased_ms(ds, ms)
    print(f"re-phased to the middle integration and wrote {ms} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    out = {"size": args.size, "cell": args.cell, "epsilon": args.epsilon,
           "loadavg": os.getloadavg()}
    if not args.skip_gridder:
        out["gridder"] = bench_gridder(ds, uvw_t, args)
    del ds
    out["image"] = bench_image(ms, workdir, args)
    out["loadavg_end"] = os.getloadavg()
    print(f"load average at start {out['loadavg'][0]:.1f}, at end {out['loadavg_end'][0]:.1f} "
          "(the machine is shared)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
