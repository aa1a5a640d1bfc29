"""RFI flagging on a full DSA-110 group: contimg against AOFlagger 3.1, same data, one run.

    python bench/flag.py [--data DIR] [--antennas N] [--repeat 1] [--threads N]
                         [--ours-only]

Without --data a full-size group is simulated first (``SimConfig()``: 96 antennas x 768
channels x 24 integrations, injected RFI of 5-50 sigma; ``--antennas N`` shrinks it);
with --data, DIR holds one group's ``*_sbNN.hdf5`` files and its ``*_truth.npz``.
The group is written as an MS once; then, in this one run:

* ours (pipeline): ``graphs.flag.flag_dataset`` on the Dataset of ``open_group`` (the
  UVH5 files, the way the pipeline flags: read + flag, the new FLAG computed to memory);
* ours (MS): ``contimg.flagging.flag_ms`` on a copy of the MS (read the MS, back up the
  old flags, flag, write FLAG/FLAG_ROW in place);
* AOFlagger 3.1, default strategy (``aoflagger -j THREADS copy.ms``) on another copy;
* AOFlagger 3.1 at its best on these data: the same strategy on a copy whose rows all
  carry FIELD_ID 0, with ``-baselines all``. AOFlagger flags each "sequence" of rows
  of one baseline, field and band; our MS (like today's pipeline's) has one FIELD per
  integration (the data are phased to the meridian at each integration), so as
  written AOFlagger sees 1 x 768 planes and cannot look along time, and by default it
  leaves the autocorrelations alone. Both runs are shown.

Every flagger runs in its own process (so one's memory does not crowd the next; the
peak RSS of each is reported, from its VmHWM); ours time the flagging call inside the
child (imports excluded, numba's cache load included), AOFlagger's time is its whole
process. For ours the CPU time of that call (user + sys of all threads) is shown too:
on a shared machine it is the steadier figure, and the one the streaming budget is
about. ``--ours-only`` skips AOFlagger (~2 min per run). Each is scored against the simulator's truth mask (per sample: the RFI
time-frequency cells on every baseline, every sample of a bad antenna's baselines):
precision, recall, F1 and the fraction of clean samples flagged, over all samples and
over the cross-correlations between good antennas only (RFI proper: what AOFlagger's
strategy looks for; it keeps no antenna-wide statistics to find a bad antenna). Wall
times are medians over --repeat runs (each on a fresh copy; copying and the FIELD_ID
edit are not timed); the ratios are AOFlagger / ours. Figures only: nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

_MARK = "BENCH-RESULT "


# ---------------------------------------------------------------------------------
# child processes: one flagger run each
# ---------------------------------------------------------------------------------

def _child(kind, threads, target, out):
    import dask
    import numpy as np

    if kind == "pipeline":
        from contimg.io.uvh5 import open_group
        from graphs.flag import flag_dataset

        files = json.loads(target)
        ds = open_group(files, n_subbands=len(files))
        t0, c0 = time.perf_counter(), _cpu()
        with dask.config.set(scheduler="threads", num_workers=threads):
            flags = flag_dataset(ds)["FLAG"].values
        elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
        np.save(out, flags)
        extra = {}
    else:
        from contimg.flagging import flag_ms

        t0, c0 = time.perf_counter(), _cpu()
        with dask.config.set(num_workers=threads):
            summary = flag_ms(target)
        elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
        extra = {"timing_s": summary["timing_s"]}
    extra["peak_rss_mib"] = _vm_hwm(os.getpid())
    print(_MARK + json.dumps({"time": elapsed, "cpu": cpu, **extra}), flush=True)


def _cpu():
    """CPU seconds (user + sys) of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _vm_hwm(pid):
    """Peak resident memory (VmHWM, MiB) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _run_process(cmd):
    """Run ``cmd``; (wall seconds, returncode, stdout, stderr, peak RSS MiB).

    The peak is the child's VmHWM, polled every 0.1 s (``wait4``'s ru_maxrss would
    include the RSS this process had when it forked the child).
    """
    t0 = time.perf_counter()
    peak = 0.0
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True)
        while proc.poll() is None:
            peak = max(peak, _vm_hwm(proc.pid) or 0.0)
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        return wall, proc.returncode, fo.read(), fe.read(), peak


def _ours(kind, threads, target, out=""):
    wall, rc, so, se, rss = _run_process(
        [sys.executable, os.path.abspath(__file__), "--child", kind, "--threads",
         str(threads), "--target", target, "--out", out])
    if rc != 0:
        raise SystemExit(f"ours ({kind}) failed (exit {rc}):\n{so[-3000:]}\n{se[-3000:]}")
    res = json.loads(next(ln for ln in so.splitlines() if ln.startswith(_MARK))[len(_MARK):])
    return res, max(rss, res.get("peak_rss_mib") or 0.0)


# ---------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------

def _scores(flags, truth):
    import numpy as np

    tp = int(np.count_nonzero(flags & truth))
    fp = int(np.count_nonzero(flags & ~truth))
    fn = int(np.count_nonzero(~flags & truth))
    p = tp / max(tp + fp, 1)
    r = tp / max(tp + fn, 1)
    return dict(precision=p, recall=r, f1=2 * p * r / max(p + r, 1e-300),
                clean_flagged=fp / max(int(np.count_nonzero(~truth)), 1),
                flagged=float(np.count_nonzero(flags)) / flags.size)


def _dataset_scores(flags, files, truth):
    """Scores of (time, baseline, frequency, polarization) flags of an open_group
    Dataset: all samples, and cross-correlations between good antennas."""
    import numpy as np

    from contimg.io.uvh5 import open_group

    ds = open_group(files, n_subbands=len(files))
    freq = ds["frequency"].values
    c_index = np.searchsorted(truth["freqs_hz"], freq)
    if not np.allclose(truth["freqs_hz"][c_index], freq, rtol=0, atol=1.0):
        raise SystemExit("truth frequencies do not match the group's")
    a1 = ds["baseline_antenna1_id"].values
    a2 = ds["baseline_antenna2_id"].values
    bad = np.isin(ds["antenna_number"].values, truth["bad_antennas"])
    bad_bl = bad[a1] | bad[a2]
    tr = np.broadcast_to(truth["rfi_tf_mask"][:, c_index][:, None, :, None]
                         | bad_bl[None, :, None, None], flags.shape)
    good = (a1 != a2) & ~bad_bl
    return _scores(flags, tr), _scores(flags[:, good], tr[:, good])


def _ms_scores(path, truth):
    """Scores of an MS's FLAG | FLAG_ROW (rows -> integrations by TIME, antennas ->
    ANTENNA_NUMBER, channels -> the truth's frequencies)."""
    import numpy as np
    from casacore import tables as ct

    with ct.table(path, ack=False) as tb:
        flag = tb.getcol("FLAG") | tb.getcol("FLAG_ROW")[:, None, None]
        t_index = np.unique(tb.getcol("TIME"), return_inverse=True)[1].ravel()
        a1, a2 = tb.getcol("ANTENNA1"), tb.getcol("ANTENNA2")
    with ct.table(os.path.join(path, "ANTENNA"), ack=False) as t:
        numbers = t.getcol("ANTENNA_NUMBER")
    with ct.table(os.path.join(path, "SPECTRAL_WINDOW"), ack=False) as t:
        freq = t.getcell("CHAN_FREQ", 0)
    c_index = np.searchsorted(truth["freqs_hz"], freq)
    bad = np.isin(numbers, truth["bad_antennas"])
    tr = truth["rfi_tf_mask"][t_index][:, c_index] | (bad[a1] | bad[a2])[:, None]
    tr = np.broadcast_to(tr[:, :, None], flag.shape)
    good = (a1 != a2) & ~bad[a1] & ~bad[a2]
    return _scores(flag, tr), _scores(flag[good], tr[good])


def _copy(src, dst):
    shutil.copytree(src, dst)


def _single_field_copy(src, dst):
    import numpy as np
    from casacore import tables as ct

    shutil.copytree(src, dst)
    with ct.table(dst, readonly=False, ack=False) as tb:
        tb.putcol("FIELD_ID", np.zeros(tb.nrows(), dtype=np.int32))


def _line(name, sc, t=None, rss=None):
    tail = f"  time {t:7.2f} s  peak RSS {rss:6.0f} MiB" if t is not None else ""
    return (f"  {name:<40s} P {sc['precision']:.4f}  R {sc['recall']:.4f}  "
            f"F1 {sc['f1']:.4f}  clean flagged {sc['clean_flagged']:7.3%}  "
            f"flagged {sc['flagged']:6.2%}{tail}")


# ---------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="directory with one group's subband files and truth")
    ap.add_argument("--antennas", type=int, default=None,
                    help="simulate this many antennas (default: SimConfig(), 96)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each flagger (median)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="threads for ours (dask) and AOFlagger (-j)")
    ap.add_argument("--work", default=None, help="scratch directory (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--ours-only", action="store_true",
                    help="skip AOFlagger (scores and times of ours only)")
    ap.add_argument("--child", choices=["pipeline", "flag_ms"], help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.threads, args.target, args.out)
        return 0

    aoflagger = shutil.which("aoflagger")
    if aoflagger is None and not args.ours_only:
        raise SystemExit("aoflagger is not installed (Debian package 'aoflagger'); "
                         "--ours-only runs ours alone")

    import dask
    import numpy as np

    from contimg.io.ms import write_ms
    from contimg.io.uvh5 import open_group
    from contimg.simulate import SimConfig, load_truth, simulate_group

    work = tempfile.mkdtemp(prefix="contimg-bench-flag-", dir=args.work)
    try:
        if args.data:
            files = sorted(glob.glob(os.path.join(args.data, "*_sb??.hdf5")))
            truths = sorted(glob.glob(os.path.join(args.data, "*_truth.npz")))
            if not files or not truths:
                raise SystemExit(f"{args.data}: need *_sbNN.hdf5 files and a *_truth.npz")
            truth_path = truths[0]
        else:
            cfg = SimConfig() if args.antennas is None else SimConfig(n_ant=args.antennas)
            t0 = time.perf_counter()
            g = simulate_group(os.path.join(work, "in"), cfg=cfg, calibrator=True)
            files, truth_path = [str(f) for f in g.files], str(g.truth)
            print(f"simulated a group ({cfg.n_ant} antennas, {cfg.n_subbands}x{cfg.n_chan} "
                  f"channels, {cfg.n_times} integrations, RFI {cfg.rfi}) in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        truth = load_truth(truth_path)
        ds0 = open_group(files, n_subbands=len(files))
        shape = (ds0.sizes["time"], ds0.sizes["baseline_id"], ds0.sizes["frequency"],
                 ds0.sizes["polarization"])
        base = os.path.join(work, "base.ms")
        t0 = time.perf_counter()
        with dask.config.set(scheduler="threads", num_workers=args.threads):
            write_ms(ds0, base)
        del ds0
        print(f"group: {len(files)} files, (time, baseline, frequency, polarization) = "
              f"{shape}, {int(np.prod(shape)) / 1e6:.1f} M visibilities; MS written once "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)

        names = ["ours (open_group -> flag_dataset)", "ours (flag_ms on the MS, in place)",
                 "AOFlagger 3.1 (default)", "AOFlagger 3.1 (1 field, -baselines all)"]
        ao_runs = {names[2]: (_copy, []),
                   names[3]: (_single_field_copy, ["-baselines", "all"])}
        if args.ours_only:
            names, ao_runs = names[:2], {}
        times = {n: [] for n in names}
        cpus = {n: [] for n in names[:2]}
        rss = {n: [] for n in names}
        sc = {}
        ms_timing = None
        npy = os.path.join(work, "flags.npy")
        for k in range(args.repeat):
            # AOFlagger first in each round (it wants the most memory)
            for j, (name, (prepare, extra)) in enumerate(ao_runs.items()):
                ao_ms = os.path.join(work, f"aoflagger_{k}_{j}.ms")
                prepare(base, ao_ms)
                wall, rc, so, se, peak = _run_process(
                    [aoflagger, "-j", str(args.threads), *extra, ao_ms])
                if rc != 0:
                    hint = " (killed: out of memory?)" if rc == -9 else ""
                    raise SystemExit(f"{name} failed (exit {rc}){hint}:\n{so[-2000:]}\n"
                                     f"{se[-2000:]}")
                times[name].append(wall)
                rss[name].append(peak)
                if name not in sc:
                    sc[name] = _ms_scores(ao_ms, truth)
                shutil.rmtree(ao_ms)
                gc.collect()
                print(f"  ran {name}: {wall:.1f} s", flush=True)

            # ours, the pipeline way: open_group -> flag_dataset -> FLAG in memory
            res, peak = _ours("pipeline", args.threads, json.dumps(files), npy)
            times[names[0]].append(res["time"])
            cpus[names[0]].append(res["cpu"])
            rss[names[0]].append(peak)
            if names[0] not in sc:
                sc[names[0]] = _dataset_scores(np.load(npy), files, truth)
            os.remove(npy)
            gc.collect()
            print(f"  ran {names[0]}: {res['time']:.1f} s", flush=True)

            # ours on the MS: flag_ms in place (backup + flag + write)
            ours_ms = os.path.join(work, f"ours_{k}.ms")
            shutil.copytree(base, ours_ms)
            res, peak = _ours("flag_ms", args.threads, ours_ms)
            times[names[1]].append(res["time"])
            cpus[names[1]].append(res["cpu"])
            rss[names[1]].append(peak)
            if names[1] not in sc:
                sc[names[1]] = _ms_scores(ours_ms, truth)
                ms_timing = res["timing_s"]
            shutil.rmtree(ours_ms)
            shutil.rmtree(ours_ms + ".flagversions", ignore_errors=True)
            gc.collect()
            print(f"  ran {names[1]}: {res['time']:.1f} s", flush=True)

        med = statistics.median
        label = "median of %d" % args.repeat if args.repeat > 1 else "one run"
        print(f"\nflagging one group, {args.threads} threads each ({label}); "
              "all samples:")
        for n in names:
            print(_line(n, sc[n][0], med(times[n]), max(rss[n])))
        print("RFI only: cross-correlations between good antennas (no bad antenna):")
        for n in names:
            print(_line(n, sc[n][1]))
        for n in names[:2]:
            print(f"  CPU time of {n}: {med(cpus[n]):.2f} s (user + sys, {label})")
        print(f"flag_ms breakdown (first run, s): {ms_timing}")
        ao = names[2:]
        if not ao:
            sys.stdout.flush()
            return 0
        best = max(ao, key=lambda n: sc[n][0]["f1"])
        print(f"F1 (all samples): ours {sc[names[0]][0]['f1']:.4f} (flag_ms "
              f"{sc[names[1]][0]['f1']:.4f}), AOFlagger "
              + ", ".join(f"{sc[n][0]['f1']:.4f}" for n in ao)
              + f"; ours - best AOFlagger: {sc[names[0]][0]['f1'] - sc[best][0]['f1']:+.4f}")
        print(f"F1 (RFI only): ours {sc[names[0]][1]['f1']:.4f}, AOFlagger "
              + ", ".join(f"{sc[n][1]['f1']:.4f}" for n in ao))
        for n in ao:
            print(f"time ratio {n} / ours: {med(times[n]) / med(times[names[0]]):.2f}x "
                  f"(pipeline way), {med(times[n]) / med(times[names[1]]):.2f}x (flag_ms)")
        sys.stdout.flush()
    finally:
        if args.keep:
            print(f"scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
