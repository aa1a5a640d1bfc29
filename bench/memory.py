"""Peak memory of each stage and of the whole stream, as the group grows.

    python bench/memory.py [--scales 1,2,4] [--axis antennas|channels|times]
                           [--stages convert,flag,calibrate,apply,image,stream]
                           [--code DIR] [--label NAME] [--results FILE] [--work DIR]
    python bench/memory.py --report [--results FILE]

For each scale, simulates one group (a calibrator transits in it) that many times a
full DSA-110 group (``contimg.simulate.scaled``: 96 antennas x 768 channels x 24
integrations x 2 polarisations = 171 M visibilities at 1x) once into ``--work``, then
runs every stage in a fresh Python process of the code in ``--code`` (default: this
checkout; give an export of another commit to measure the code before a change):

* convert -- ``convert_group`` on a LocalCluster (1 worker process, 2 threads), no flags;
* convertflag -- the same with ``flag=True`` (the stream's default: flags while converting);
* flag -- ``pipeline.stage_flag`` (``flag_ms`` on the MS);
* calibrate -- ``pipeline.stage_calibrate`` (find the calibrator, solve, write tables);
* apply -- ``calibrate.apply_ms`` with those tables (CORRECTED_DATA);
* image -- ``pipeline.stage_image`` (the stream's quick-look image);
* stream -- that code's ``bench/stream.py --data`` on the group: the whole stream
  (convert with flagging, calibrate, apply, image, photometry) in one LocalCluster.

The peak is the largest sum of the resident set sizes of the stage's process tree
(the process and its Dask worker processes), sampled every 50 ms with psutil; the
largest single process's ``ru_maxrss`` (from ``wait4``) is reported beside it. Wall
time per visibility is the stage's wall time (process start to exit, imports
included) over the group's visibilities; the CPU time of the process and its waited-for
children (``wait4``; a LocalCluster's worker processes are not among them) is recorded
too, as wall time depends on what else the machine runs. Results are appended as JSON lines to
``--results``; ``--report`` prints them side by side per label and scale, with each
stage's growth from the 1x group (the issue's target: every stage <= 2 GiB at 1x and
within 20 % as the group grows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
GIB = float(1 << 30)

STAGES = ("convert", "convertflag", "flag", "calibrate", "apply", "image", "stream")

_PRELUDE = """
import json, os, sys
from contimg.runtime import configure
configure()
args = json.loads(sys.argv[1])
"""

_SNIPPETS = {
    "convert": """
from distributed import Client, LocalCluster
from contimg.convert import convert_group
with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                  dashboard_address=":0") as cl, Client(cl) as client:
    convert_group(client, args["files"], args["ms"], placement="any", overwrite=True,
                  n_subbands=len(args["files"])).result()
""",
    "convertflag": """
from distributed import Client, LocalCluster
from contimg.convert import convert_group
with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                  dashboard_address=":0") as cl, Client(cl) as client:
    convert_group(client, args["files"], args["ms"], placement="any", overwrite=True,
                  n_subbands=len(args["files"]), flag=True).result()
""",
    "flag": """
from contimg.pipeline import stage_flag
print(json.dumps(stage_flag(args["ms"])))
""",
    "calibrate": """
from contimg.pipeline import stage_calibrate
from contimg.state import StateDB
StateDB(args["db"]).close()
res = stage_calibrate(args["ms"], db_path=args["db"], cal_dir=args["cal_dir"], name="bench",
                      catalog=args["catalog"])
assert res["status"] == "ok", res
json.dump(res["tables"], open(args["tables"], "w"))
""",
    "apply": """
from contimg.calibrate import apply_ms
from contimg.pipeline import local_dask
with local_dask():
    apply_ms(args["ms"], json.load(open(args["tables"])))
""",
    "image": """
from contimg.pipeline import stage_image
stage_image(args["ms"], prefix=args["prefix"])
""",
}


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd, env, cwd=None) -> dict:
    """Run ``cmd``; its wall time, the peak RSS of its process tree and its ru_maxrss."""
    import psutil

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    peak = [0]
    done = threading.Event()
    out = []

    def sample():
        ps = psutil.Process(p.pid)
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(ps))
            done.wait(0.05)

    def drain():
        out.append(p.stdout.read())

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    dr = threading.Thread(target=drain, daemon=True)
    dr.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    dr.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    text = out[0].decode(errors="replace") if out else ""
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({p.returncode}):\n{text[-3000:]}")
    return dict(seconds=wall, cpu_seconds=ru.ru_utime + ru.ru_stime, peak_bytes=peak[0],
                maxrss_bytes=ru.ru_maxrss * 1024, output=text[-2000:])


def simulate(work: Path, scale: float, axis: str) -> tuple[Path, dict]:
    """One group ``scale`` times a full DSA-110 group (cached in ``work``); scale 0: a
    small group (24 antennas, 4 subbands) for the warm-up."""
    from contimg.simulate import SimConfig, n_visibilities, scaled, simulate as sim

    if scale == 0:
        cfg = SimConfig(n_ant=24, n_subbands=4)
    else:
        cfg = scaled(scale, axis) if scale != 1 else SimConfig()
    d = work / (f"sim-{axis}-{scale:g}x" if scale else "sim-small")
    info = dict(n_ant=cfg.n_ant, n_chan=cfg.n_chan, n_times=cfg.n_times,
                n_subbands=cfg.n_subbands, visibilities=n_visibilities(cfg))
    if not (d / "done.json").exists():
        t0 = time.perf_counter()
        sim(d / "in", n_groups=1, cfg=cfg, calibrator_group=0)
        (d / "done.json").write_text(json.dumps(info))
        print(f"simulated {scale:g}x ({axis}) in {time.perf_counter() - t0:.0f} s: {info}",
              flush=True)
    return d, info


def run_stage(stage, code: Path, d: Path, scratch: Path) -> dict:
    import glob

    env = dict(os.environ, PYTHONPATH=str(code), PYTHONUNBUFFERED="1")
    incoming = d / "in"
    a = dict(files=sorted(glob.glob(str(incoming / "*.hdf5"))), ms=str(scratch / "group.ms"),
             db=str(scratch / "state.sqlite3"), cal_dir=str(scratch / "cal"),
             catalog=str(incoming / "calibrators.csv"), tables=str(scratch / "tables.json"),
             prefix=str(scratch / "img" / "group"))
    if stage == "stream":
        cmd = [sys.executable, str(code / "bench" / "stream.py"), "--data", str(incoming),
               "--groups", "1", "--work", str(scratch)]
    else:
        cmd = [sys.executable, "-c", _PRELUDE + _SNIPPETS[stage], json.dumps(a)]
    return measure(cmd, env, cwd=scratch)   # not the current directory: python -c puts
    #                                          it first on sys.path


def report(path: Path):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {}
    for r in rows:
        latest[(r["label"], r["axis"], r["scale"], r["stage"])] = r
    labels = sorted({k[0] for k in latest})
    axes = sorted({k[1] for k in latest})
    for axis in axes:
        scales = sorted({k[2] for k in latest if k[1] == axis})
        print(f"\npeak RSS of the process tree, GiB (ns per visibility)  [axis: {axis}]")
        head = f"{'stage':<10}" + "".join(f"{lab + ' ' + format(s, 'g') + 'x':>22}"
                                          for lab in labels for s in scales)
        print(head)
        for st in STAGES:
            cells = []
            for lab in labels:
                for s in scales:
                    r = latest.get((lab, axis, s, st))
                    cells.append(f"{r['peak_bytes'] / GIB:9.2f} ({r['ns_per_vis']:6.1f})"
                                 if r else f"{'-':>18}")
            if any(c.strip() != "-" for c in cells):
                print(f"{st:<10}" + "".join(f"{c:>22}" for c in cells))
        for lab in labels:
            base = {st: latest.get((lab, axis, 1.0, st)) for st in STAGES}
            growth = []
            for st in STAGES:
                for s in scales:
                    r = latest.get((lab, axis, s, st))
                    if s != 1.0 and r and base[st]:
                        growth.append(f"{st} {s:g}x {r['peak_bytes'] / base[st]['peak_bytes']:.2f}")
            if growth:
                print(f"growth of the peak from 1x, {lab}: " + ", ".join(growth))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="1,2,4")
    ap.add_argument("--axis", default="antennas", choices=("antennas", "channels", "times"))
    ap.add_argument("--stages", default=",".join(s for s in STAGES if s != "convertflag"))
    ap.add_argument("--code", default=str(HERE), help="checkout whose code is measured")
    ap.add_argument("--label", default=None, help="name of this code in the results "
                    "(default: its directory name)")
    ap.add_argument("--work", default="/tmp/contimg-bench-memory",
                    help="simulated groups (kept and reused) and scratch")
    ap.add_argument("--results", default=None, help="JSON lines (default WORK/results.jsonl)")
    ap.add_argument("--report", action="store_true", help="only print the results table")
    ap.add_argument("--no-warmup", action="store_true",
                    help="do not first run every stage on a small group (unrecorded: it "
                         "fills the code's numba cache, whose compilation would otherwise "
                         "land in the first measured stage)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = Path(args.results or work / "results.jsonl")
    if args.report:
        report(results)
        return 0
    sys.path.insert(0, str(HERE))       # the simulator of this checkout
    from contimg.runtime import configure

    configure()
    code = Path(args.code).resolve()
    label = args.label or code.name
    stages = [s for s in args.stages.split(",") if s]
    if not args.no_warmup:
        d, _ = simulate(work, 0, args.axis)
        scratch = work / f"warmup-{label}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        for stage in stages:
            if stage == "stream":
                continue
            try:
                r = run_stage(stage, code, d, scratch)
                print(f"warm-up {stage}: {r['seconds']:.1f} s", flush=True)
            except RuntimeError as exc:
                print(f"warm-up {stage} failed: {exc}", flush=True)
        shutil.rmtree(scratch, ignore_errors=True)
    for scale in (float(s) for s in args.scales.split(",")):
        d, info = simulate(work, scale, args.axis)
        scratch = work / f"run-{label}-{args.axis}-{scale:g}x"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        for stage in stages:
            r = run_stage(stage, code, d, scratch)
            r.update(label=label, axis=args.axis, scale=scale, stage=stage,
                     ns_per_vis=r["seconds"] / info["visibilities"] * 1e9, **info)
            print(f"{label} {scale:g}x {stage:<10} peak {r['peak_bytes'] / GIB:6.2f} GiB "
                  f"(largest process {r['maxrss_bytes'] / GIB:5.2f}) {r['seconds']:7.1f} s "
                  f"{r['ns_per_vis']:6.1f} ns/vis, CPU {r['cpu_seconds']:.1f} s", flush=True)
            r.pop("output")
            with open(results, "a") as fh:
                fh.write(json.dumps(r) + "\n")
        shutil.rmtree(scratch, ignore_errors=True)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
