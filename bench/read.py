"""Full-group read: contimg's UVH5 reader against pyuvdata on the same 16 files.

    python bench/read.py [--data DIR] [--repeat 3] [--threads 2]

Without --data, a full-size DSA-110 group is simulated first (its time is printed too).
Ours: ``open_group`` + load VISIBILITY, FLAG and WEIGHT into memory (the same content
pyuvdata holds after reading), on the threaded scheduler. Anchor: pyuvdata
``UVData.from_file`` of the 16 files (what the current pipeline does). Medians of
``--repeat`` runs, and their ratio. The page cache is warm for both (each is run once
before timing), so this measures the readers, not the disk.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
import tempfile
import time
import warnings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="directory with one group of 16 subband files")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import dask

    from contimg.io.uvh5 import open_group

    tmp = None
    if args.data:
        files = sorted(glob.glob(f"{args.data}/*_sb??.hdf5"))
    else:
        from contimg.simulate import SimConfig, simulate_group

        tmp = tempfile.TemporaryDirectory(prefix="contimg-bench-read-")
        t0 = time.perf_counter()
        g = simulate_group(tmp.name, cfg=SimConfig(threads=args.threads), calibrator=True)
        print(f"simulated a full-size group in {time.perf_counter() - t0:.1f} s")
        files = [str(f) for f in g.files]
    if len(files) != 16:
        sys.exit(f"expected 16 subband files, found {len(files)}")

    def ours():
        ds = open_group(files)
        with dask.config.set(scheduler="threads", num_workers=args.threads):
            ds[["VISIBILITY", "FLAG", "WEIGHT"]].load()
        return ds

    def ours_stream():
        ds = open_group(files)
        with dask.config.set(scheduler="threads", num_workers=args.threads):
            abs(ds.VISIBILITY).sum().compute()

    def pyuvdata_read():
        from pyuvdata import UVData

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return UVData.from_file(files, file_type="uvh5")

    ds = ours()
    print(f"group: {ds.sizes['time']} integrations x {ds.sizes['baseline_id']} baselines x "
          f"{ds.sizes['frequency']} channels x {ds.sizes['polarization']} pols = "
          f"{ds.VISIBILITY.size / 1e6:.0f} M visibilities")
    del ds
    results = {}
    for name, fn in (("contimg open_group + load", ours),
                     ("contimg open_group + sum|V| (streaming)", ours_stream),
                     ("pyuvdata UVData.from_file", pyuvdata_read)):
        fn()  # warm the page cache and numba/astropy caches
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            del out
        results[name] = statistics.median(times)
        print(f"{name:42s} median {results[name]:7.2f} s  (runs: "
              + ", ".join(f"{t:.2f}" for t in times) + ")")
    ref = results["pyuvdata UVData.from_file"]
    for name in ("contimg open_group + load", "contimg open_group + sum|V| (streaming)"):
        print(f"speed-up of {name!r} over pyuvdata: {ref / results[name]:.1f}x")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
