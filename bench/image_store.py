"""Imaging memory: the averaged rows in memory (``--no-spill``) against the store on
disk (``[image] spill``, the default), on one full DSA-110 group.

Each run is ``contimg.imaging.image_ms`` on the group's UVH5 files in a fresh Python
process (dask threads, ``--threads`` workers); its peak resident memory is the
process's ``VmHWM`` and its wall time is measured inside it (imports excluded). The
two images are compared pixel by pixel (largest difference / peak).

    python bench/image_store.py --group DIR            # 2048^2 at 6", 1000 iterations
    python bench/image_store.py                        # simulate a full group first

One run each on a shared machine: quote the load average with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image import group_files, run_result  # noqa: E402  (bench/image.py: the same set-up)

_RUN = """
import json, sys, time, logging
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
logging.getLogger("numba").setLevel(logging.WARNING)
from contimg.runtime import configure
configure()
import dask
from contimg.imaging import image_ms
a = json.loads(sys.argv[1])
dask.config.set(scheduler="threads", num_workers=a.pop("workers"))
t0 = time.perf_counter()
r = image_ms(a.pop("files"), a.pop("prefix"), **a)
wall = time.perf_counter() - t0
hwm = [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")][0]
print("RESULT " + json.dumps(dict(wall=wall, peak=r.peak, noise=r.noise,
      ncomp=r.n_components, nmajor=r.n_major, timings=r.timings, maxrss_mb=hwm / 1024)))
"""


def run(files, prefix, args, spill):
    a = dict(files=[str(f) for f in files], prefix=str(prefix), npix=args.size,
             cell_arcsec=args.cell, niter=args.niter, workers=args.threads, spill=spill,
             nthreads=1, w_mode=args.w_mode)
    return run_result(_RUN, a)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", help="directory of one group's UVH5 files (default: simulate)")
    ap.add_argument("--workdir", help="where the images go (default: a temp dir)")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--cell", type=float, default=6.0, help="arcsec")
    ap.add_argument("--niter", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--w-mode", default="auto", choices=("auto", "snapshot", "wstack"))
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    from contimg.runtime import configure

    configure()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_image_store_"))
    workdir.mkdir(parents=True, exist_ok=True)
    files = group_files(args.group, workdir, args.threads)
    from astropy.io import fits

    out = {"size": args.size, "niter": args.niter, "w_mode": args.w_mode,
           "loadavg": os.getloadavg()}
    for spill in (False, True):
        name = "spill" if spill else "memory"
        res, _log = run(files, workdir / name, args, spill)
        out[name] = res
        print(f"{'store on disk' if spill else 'rows in memory'}: {res['wall']:7.1f} s wall, "
              f"max RSS {res['maxrss_mb']:.0f} MB, {res['ncomp']} components / "
              f"{res['nmajor']} major cycles, peak {res['peak']:.5g} Jy/beam", flush=True)
    a = fits.getdata(workdir / "memory-image.fits")
    b = fits.getdata(workdir / "spill-image.fits")
    diff = float(np.abs(a - b).max() / np.abs(a).max())
    out["max_diff_over_peak"] = diff
    out["loadavg_end"] = os.getloadavg()
    m, s = out["memory"], out["spill"]
    print(f"peak RSS spill/memory = {s['maxrss_mb'] / m['maxrss_mb']:.2f}; wall spill/memory "
          f"= {s['wall'] / m['wall']:.2f}; images differ by {diff:.2e} of the peak; load "
          f"average {out['loadavg'][0]:.1f} -> {out['loadavg_end'][0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
