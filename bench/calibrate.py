"""Bandpass + gain calibration of a full DSA-110 calibrator group: contimg against CASA 6.7
``bandpass`` + ``gaincal``, same MS, same model, one run.

    python bench/calibrate.py [--data DIR] [--antennas N] [--threads N] [--keep DIR]

Without --data a full-size calibrator group is simulated first (``SimConfig(rfi=None)``:
96 antennas x 768 channels x 24 integrations, SIMCAL, 20 Jy, transiting at the middle
integration; ``--antennas N`` shrinks it); with --data, DIR holds one group's
``*_sbNN.hdf5`` files and its ``*_truth.npz``. The group is written once as an MS with
MODEL_DATA = our model of the calibrator (CASA uses MODEL_DATA; no setjy/ft). Then,
each in its own process, on its own copy of the MS:

* ours: ``contimg.calibrate.calibrate_ms`` (open the MS with dask-ms, predict the
  model, solve B0 -> phase per integration -> B -> G(ap) per integration with the
  numba StEFCal kernels, write the two CASA tables);
* CASA: the same four solves (``bandpass`` solint inf, ``gaincal`` calmode p solint int,
  ``bandpass`` with it, ``gaincal`` calmode ap solint int with B; ``combine='field,scan'``
  because the MS has one FIELD per integration; refant = ours), timed inside the child
  around the task calls (imports excluded), and the two-task minimum that a
  pipeline needs at least (``bandpass`` + ``gaincal`` ap) timed separately.

Reported: wall times and CPU times (process time of the child, all threads: the
fairer figure on a shared machine), their ratios CASA / ours, and the agreement of the final B and G
tables (max |ours - CASA| in units of the solutions' own thermal error, PARAMERR).
The machine may be shared: the figures are one run each. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

_MARK = "BENCH-RESULT "

CASA_CHILD = r"""
import json, sys, time
from casatasks import bandpass, gaincal
vis, pre, refant, mode = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
kw = dict(vis=vis, refant=refant, combine="field,scan", minsnr=3.0)
t0, c0 = time.perf_counter(), time.process_time()
if mode == "full":
    bandpass(caltable=pre + ".B0", solint="inf", bandtype="B", solnorm=False, **kw)
    gaincal(caltable=pre + ".Gp", solint="int", calmode="p", gaintype="G",
            gaintable=[pre + ".B0"], **kw)
    bandpass(caltable=pre + ".B", solint="inf", bandtype="B", solnorm=False,
             gaintable=[pre + ".Gp"], **kw)
else:
    bandpass(caltable=pre + ".B", solint="inf", bandtype="B", solnorm=False, **kw)
gaincal(caltable=pre + ".G", solint="int", calmode="ap", gaintype="G",
        gaintable=[pre + ".B"], **kw)
print("BENCH-RESULT " + json.dumps({"seconds": time.perf_counter() - t0,
                                   "cpu_seconds": time.process_time() - c0}))
"""


def _ours_child(ms, catalog, threads):
    import dask

    from contimg.calibrate import calibrate_ms

    dask.config.set(scheduler="threads", num_workers=threads)
    t0, c0 = time.perf_counter(), time.process_time()
    res = calibrate_ms(ms, catalog=catalog, name="ours")
    dt = time.perf_counter() - t0
    print(_MARK + json.dumps({"seconds": dt, "cpu_seconds": time.process_time() - c0,
                              "refant": res.refant, "tables": res.tables,
                              "solve_seconds": res.quality["solve_seconds"]}))


def _run(cmd, env=None):
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    for line in res.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    raise RuntimeError(f"no result from {cmd[:3]}:\n{res.stdout[-2000:]}")


def _compare(ours, theirs):
    import numpy as np

    from contimg.caltables import read_caltable

    a, b = read_caltable(ours), read_caltable(theirs)
    ok = ~a["flag"] & ~b["flag"]
    diff = np.abs(a["cparam"] - b["cparam"])[ok]
    err = float(np.median(a["paramerr"][ok]))
    return dict(max_abs_diff=float(diff.max()), rms_diff=float(np.sqrt(np.mean(diff ** 2))),
                max_in_sigma=float(diff.max() / err), flags_equal=bool(
                    (a["flag"] == b["flag"]).all()), flagged_ours=float(a["flag"].mean()),
                flagged_casa=float(b["flag"].mean()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="directory of one calibrator group")
    p.add_argument("--antennas", type=int, default=None)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--keep", default=None, help="work directory to keep (default: temp)")
    p.add_argument("--child", nargs=3, metavar=("MS", "CATALOG", "THREADS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _ours_child(args.child[0], args.child[1], int(args.child[2]))
        return 0

    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from contimg import sky
    from contimg.calibrate import find_calibrator
    from contimg.io.ms import write_ms
    from contimg.io.uvh5 import open_group
    from contimg.simulate import SimConfig, load_truth, simulate_group
    from graphs import calibrate as gcal

    work = args.keep or tempfile.mkdtemp(prefix="bench-calibrate-")
    os.makedirs(work, exist_ok=True)
    try:
        if args.data:
            files = sorted(glob.glob(os.path.join(args.data, "*_sb??.hdf5")))
            truth = load_truth(sorted(glob.glob(os.path.join(args.data, "*_truth.npz")))[0])
        else:
            kw = {} if args.antennas is None else {"n_ant": args.antennas}
            t0 = time.perf_counter()
            g = simulate_group(os.path.join(work, "raw"), cfg=SimConfig(rfi=None, **kw),
                               calibrator=True)
            print(f"simulated {len(g.files)} files in {time.perf_counter() - t0:.1f} s")
            files, truth = g.files, g.load_truth()
        i = list(truth["sky_name"]).index(str(truth["calibrator"]))
        cat = os.path.join(work, "cal.csv")
        with open(cat, "w") as fh:
            fh.write("name,ra_deg,dec_deg,flux_jy,alpha\n"
                     f"{truth['sky_name'][i]},{float(np.degrees(truth['sky_ra'][i]))!r},"
                     f"{float(np.degrees(truth['sky_dec'][i]))!r},"
                     f"{float(truth['sky_flux'][i])!r},{float(truth['sky_alpha'][i])!r}\n")
        ds = open_group(files)
        tr = find_calibrator(ds, cat)
        srcs = [t.source for t in tr]
        flux = sky.apparent_flux(srcs, ds.PHASE_CENTER_RA.values, ds.PHASE_CENTER_DEC.values,
                                 ds.frequency.values)
        model = gcal.predict_model(ds, [s.ra for s in srcs], [s.dec for s in srcs], flux)
        base = os.path.join(work, "base.ms")
        if not os.path.exists(base):
            t0 = time.perf_counter()
            write_ms(ds.assign(MODEL=model), base, model_data="MODEL")
            print(f"wrote {base} (DATA + MODEL_DATA) in {time.perf_counter() - t0:.1f} s")
        del ds, model
        shape = None
        from casacore import tables as ct

        with ct.table(base, ack=False) as t:
            shape = (t.nrows(),) + tuple(t.getcell("DATA", 0).shape)

        ms_ours = os.path.join(work, "ours.ms")
        shutil.rmtree(ms_ours, ignore_errors=True)
        shutil.copytree(base, ms_ours)
        env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads),
                   OMP_NUM_THREADS=str(args.threads))
        ours = _run([sys.executable, os.path.abspath(__file__), "--child", ms_ours, cat,
                     str(args.threads)], env=env)
        print(f"ours: {ours['seconds']:.2f} s wall, {ours['cpu_seconds']:.2f} s CPU "
              f"(solve {ours['solve_seconds']:.2f} s), refant {ours['refant']}")

        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "tests"))
        from pathlib import Path

        from conftest import casa_site_config

        site = casa_site_config(Path(work))
        cenv = dict(env, CASASITECONFIG=str(site))
        script = os.path.join(work, "casa_child.py")
        with open(script, "w") as fh:
            fh.write(CASA_CHILD)
        results = {}
        for mode in ("full", "two"):
            ms_c = os.path.join(work, f"casa_{mode}.ms")
            shutil.rmtree(ms_c, ignore_errors=True)
            shutil.copytree(base, ms_c)
            r = _run([sys.executable, script, ms_c, os.path.join(work, f"casa_{mode}"),
                      str(ours["refant"]), mode], env=cenv)
            results[mode] = r["seconds"]
            results[mode + "_cpu"] = r["cpu_seconds"]
            print(f"CASA ({'B0, Gp, B, G' if mode == 'full' else 'B, G'}): "
                  f"{r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU")
        agree = {k: _compare(ours["tables"][k], os.path.join(work, f"casa_full.{k}"))
                 for k in ("B", "G")}
        summary = dict(
            ms_shape=shape, threads=args.threads, ours_s=ours["seconds"],
            ours_solve_s=ours["solve_seconds"], casa_same_sequence_s=results["full"],
            casa_two_tasks_s=results["two"],
            ratio_same_sequence=results["full"] / ours["seconds"],
            ratio_two_tasks=results["two"] / ours["seconds"],
            ours_cpu_s=ours["cpu_seconds"], casa_same_sequence_cpu_s=results["full_cpu"],
            casa_two_tasks_cpu_s=results["two_cpu"],
            cpu_ratio_same_sequence=results["full_cpu"] / ours["cpu_seconds"],
            cpu_ratio_two_tasks=results["two_cpu"] / ours["cpu_seconds"], agreement=agree)
        print(json.dumps(summary, indent=1))
        print(f"CASA / ours, wall: {summary['ratio_same_sequence']:.1f}x (same four solves), "
              f"{summary['ratio_two_tasks']:.1f}x (CASA's two-task minimum); CPU: "
              f"{summary['cpu_ratio_same_sequence']:.1f}x, {summary['cpu_ratio_two_tasks']:.1f}x")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
