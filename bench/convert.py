"""Full-group UVH5 → MS: contimg against the current pipeline's way and the copy floor.

    python bench/convert.py [--data DIR] [--repeat 3] [--anchor-repeat 1]

Without --data a full-size DSA-110 group is simulated first. Same machine, same files,
one run of this script:

* ours: ``contimg.convert.convert_group`` on a LocalCluster (1 worker, 2 threads; reads
  of a few subbands in flight while the writer task streams blocks into the MS);
* anchor: pyuvdata ``UVData.from_file`` of the 16 files + ``UVData.write_ms`` (what the
  current pipeline does);
* floor: ``cp`` of the 16 input files into a new directory (the same bytes in and out).

Medians over the repeats, the ratios, and the peak memory of our worker.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings


def _du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="directory with one group of 16 subband files")
    ap.add_argument("--repeat", type=int, default=3, help="runs of ours and of the floor")
    ap.add_argument("--anchor-repeat", type=int, default=1, help="runs of pyuvdata (slow)")
    ap.add_argument("--work", default=None, help="scratch directory (default: system temp)")
    args = ap.parse_args(argv)

    from distributed import Client, LocalCluster

    from contimg.runtime import configure

    configure()     # before the cluster: its worker processes inherit the settings

    from contimg.convert import convert_group

    work = tempfile.mkdtemp(prefix="contimg-bench-convert-", dir=args.work)
    try:
        if args.data:
            files = sorted(glob.glob(f"{args.data}/*_sb??.hdf5"))
        else:
            from contimg.simulate import SimConfig, simulate_group

            t0 = time.perf_counter()
            g = simulate_group(os.path.join(work, "in"), cfg=SimConfig(), calibrator=True)
            print(f"simulated a full-size group in {time.perf_counter() - t0:.1f} s")
            files = [str(f) for f in g.files]
        if len(files) != 16:
            sys.exit(f"expected 16 subband files, found {len(files)}")
        nbytes_in = sum(os.path.getsize(f) for f in files)
        print(f"input: 16 files, {nbytes_in / 2**30:.2f} GiB")

        def floor(i):
            dst = os.path.join(work, f"cp{i}")
            os.makedirs(dst)
            t0 = time.perf_counter()
            subprocess.run(["cp", *files, dst], check=True)
            subprocess.run(["sync", "-f", dst], check=False)
            dt = time.perf_counter() - t0
            shutil.rmtree(dst)
            return dt

        results = {}
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                          dashboard_address="127.0.0.1:0") as cl, Client(cl) as client:
            def ours(i):
                ms = os.path.join(work, f"ours{i}.ms")
                t0 = time.perf_counter()
                convert_group(client, files, ms, placement="any").result()
                subprocess.run(["sync", "-f", ms], check=False)
                dt = time.perf_counter() - t0
                results["ms_bytes"] = _du(ms)
                shutil.rmtree(ms)
                return dt

            ours(-1)  # warm-up: numba/astropy caches, page cache
            client.run(_reset_peak)
            t_ours = [ours(i) for i in range(args.repeat)]
            peak = max(client.run(_peak_rss).values())
        t_floor = [floor(i) for i in range(args.repeat)]

        def anchor(i):
            from pyuvdata import UVData

            ms = os.path.join(work, f"pyuvdata{i}.ms")
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                uv = UVData.from_file(files, file_type="uvh5")
                uv.write_ms(ms)
            subprocess.run(["sync", "-f", ms], check=False)
            dt = time.perf_counter() - t0
            del uv
            shutil.rmtree(ms)
            return dt

        t_anchor = [anchor(i) for i in range(args.anchor_repeat)]
        m_ours, m_floor = statistics.median(t_ours), statistics.median(t_floor)
        m_anchor = statistics.median(t_anchor) if t_anchor else float("nan")
        fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
        print(f"MS written: {results['ms_bytes'] / 2**30:.2f} GiB")
        print(f"ours   contimg convert_group          median {m_ours:7.1f} s  ({fmt(t_ours)}); "
              f"worker peak RSS {peak / 2**30:.2f} GiB")
        print(f"anchor pyuvdata from_file + write_ms  median {m_anchor:7.1f} s  ({fmt(t_anchor)})")
        print(f"floor  cp of the 16 input files       median {m_floor:7.1f} s  ({fmt(t_floor)})")
        print(f"speed-up over pyuvdata: {m_anchor / m_ours:.1f}x (target >= 10x)")
        print(f"ours / copy floor:      {m_ours / m_floor:.2f}x (target <= 2x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _reset_peak():
    # ru_maxrss cannot be reset; we report the max
    return None


def _peak_rss():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
