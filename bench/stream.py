"""The whole pipeline on full-size groups: groups per hour and seconds per group.

    python bench/stream.py [--groups 2] [--in-flight 1] [--data DIR] [--skip STAGES]
                           [--imsize N --cell ARCSEC --niter K]

Simulates ``--groups`` full-size DSA-110 groups (a calibrator transits in the first)
unless ``--data`` names a directory of subband files (the simulated calibrator is taken
from the ``*_truth.npz`` files there into a CSV catalogue), then runs ``contimg stream`` on
them (LocalCluster: 1 worker, all cores) until every group is done, and prints:

* each group's end-to-end time (claimed → completed) and its stages;
* the medians per stage and per group;
* the throughput in groups per hour against the telescope's rate (12 groups/hour, one
  every 5 minutes);
* our convert and calibrate stages beside the current pipeline's own published
  figures from its benchmark host (hardware not stated; not re-run here): 4.05 min to
  convert a group, 31.1 s for bandpass and 10.3 s for gaincal. It publishes no
  end-to-end figure, so none is compared.

Target of the streaming issue: a full-size group end to end in under 60 s here.
"""

from __future__ import annotations

# the current pipeline's own published figures (its benchmark host, hardware not stated)
CURRENT_CONVERT_S = 4.05 * 60
CURRENT_BANDPASS_S = 31.1
CURRENT_GAINCAL_S = 10.3

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--in-flight", type=int, default=1)
    ap.add_argument("--data", default=None, help="directory of subband files (default: simulate)")
    ap.add_argument("--skip", default="", help="stages not to run, e.g. image")
    ap.add_argument("--imsize", type=int, default=None)
    ap.add_argument("--cell", type=float, default=None)
    ap.add_argument("--niter", type=int, default=None)
    ap.add_argument("--work", default=None, help="scratch directory (default: system temp)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the scratch directory (MS, images, database)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the stream's log")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from distributed import Client, LocalCluster

    from contimg.runtime import configure

    configure()     # before the cluster: its worker processes inherit the settings

    from contimg.state import StateDB
    from contimg.stream import Stream, StreamConfig

    work = tempfile.mkdtemp(prefix="contimg-bench-stream-", dir=args.work)
    try:
        if args.data:
            incoming = args.data
        else:
            from contimg.simulate import SimConfig, simulate

            incoming = os.path.join(work, "in")
            t0 = time.perf_counter()
            simulate(incoming, n_groups=args.groups, cfg=SimConfig(), calibrator_group=0,
                     start=dt.datetime(2026, 1, 15, 8, 0, 0))
            print(f"simulated {args.groups} full-size group(s) in "
                  f"{time.perf_counter() - t0:.1f} s")
        import glob

        from contimg.simulate import write_calibrator_catalog

        catalog = write_calibrator_catalog(
            sorted(glob.glob(os.path.join(incoming, "*_truth.npz"))),
            os.path.join(work, "calibrators.csv"))
        from contimg.config import ImageConfig

        image = ImageConfig(**{k: v for k, v in (("npix", args.imsize),
                                                 ("cell_arcsec", args.cell),
                                                 ("niter", args.niter)) if v is not None})
        cfg = StreamConfig(incoming=incoming, output=os.path.join(work, "out"),
                           db_path=os.path.join(work, "state.sqlite3"), settle_s=0.2,
                           poll_s=0.2, in_flight=args.in_flight, image=image,
                           skip=frozenset(s for s in args.skip.split(",") if s),
                           catalog=None if catalog is None else str(catalog))
        n = os.cpu_count() or 2
        with LocalCluster(n_workers=1, threads_per_worker=n, processes=True,
                          dashboard_address="127.0.0.1:0") as cl, Client(cl) as client:
            db = StateDB(cfg.db_path)
            stream = Stream(cfg, client, db=db)
            t0 = time.perf_counter()
            counts = stream.run(until_idle=True)
            wall = time.perf_counter() - t0
        done = db.groups("completed")
        if counts["failed"] or not done:
            for g in db.groups("failed"):
                print(f"FAILED {g['group_id']}: {g['error']}")
            sys.exit(1)
        per_stage: dict[str, list] = {}
        totals = []
        print(f"\n{'group':<20} {'total s':>8}  stages (s)")
        for g in done:
            st = {t["stage"]: t for t in db.timings(g["group_id"])
                  if t["attempt"] == g["attempts"]}
            total = g["finished_at"] - g["started_at"]
            totals.append(total)
            for k, t in st.items():
                if k != "total" and t["status"] == "ok":
                    per_stage.setdefault(k, []).append(t["seconds"])
            cells = [f"{k}=" + ("skip" if t["status"] == "skipped" else f"{t['seconds']:.1f}")
                     for k, t in st.items() if k != "total"]
            print(f"{g['group_id']:<20} {total:8.1f}  " + " ".join(cells))
            im = st.get("image")
            if im is not None and im["status"] == "ok":
                tim = json.loads(im["detail"]).get("timings", {})
                print(f"{'':<30}image: " + " ".join(
                    f"{k}={v:.1f}" for k, v in tim.items() if isinstance(v, (int, float))))
        print("\nmedian per stage: " + ", ".join(
            f"{k} {statistics.median(v):.1f} s" for k, v in per_stage.items()))
        med = statistics.median(totals)
        rate = len(done) / wall * 3600
        print(f"median end to end per group: {med:.1f} s (target < 60 s)")
        print(f"throughput: {len(done)} group(s) in {wall:.1f} s = {rate:.0f} groups/hour; "
              f"telescope 12 groups/hour -> {rate / 12:.1f}x the data rate")
        # the current pipeline's published figures (its benchmark host, not re-run here)
        for stage, theirs, what in (("convert", CURRENT_CONVERT_S, "to convert a group"),
                                    ("calibrate", CURRENT_BANDPASS_S + CURRENT_GAINCAL_S,
                                     "bandpass 31.1 s + gaincal 10.3 s")):
            if per_stage.get(stage):
                ours = statistics.median(per_stage[stage])
                print(f"{stage}: ours {ours:.1f} s (median), current pipeline {theirs:.1f} s "
                      f"({what}, its benchmark host): {theirs / ours:.1f}x")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
