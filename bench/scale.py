"""Scale-out: the same groups on 1 and 2 Dask worker processes (real processes).

    python bench/scale.py [--workers 1,2] [--groups 3] [--antennas 96] [--subbands 16]
                          [--channels 48] [--integrations 24] [--skip calibrate,apply,photometry]
                          [--imsize 1024] [--threads 1]

Simulates ``--groups`` groups once, then for each worker count N starts a real cluster
with ``contimg cluster up`` (a ``dask scheduler`` and N ``dask worker`` processes on
loopback, ``--threads`` threads each, nodes n0..n(N-1)), puts subband k in node
k mod N's own directory (no incoming directory: the stream scans the nodes' directories),
runs ``contimg stream --until-idle`` with ``placement = "nodes"`` and prints, side by
side:

* groups per hour (groups / wall time from the first claim to the last completion);
* per-stage wall and CPU seconds per group, from the workers' own task records
  (``contimg.cluster.TaskRecorder``: CPU of the worker process while the task ran; the
  MS writer's record overlaps the reads it waits for on its own worker);
* bytes sent between workers per group, from the workers' transfer logs
  (``Worker.transfer_outgoing_log``), and how much of it is raw subband blocks (reads
  sent to the writer);
* reads off-node: reads that ran on a worker whose directory does not hold the file
  (the workers' own verdict); the design says 0.

The anchor is the 1-worker run: the ratio column is N-worker throughput over 1-worker.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUP_S = 309.2


def _ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    out = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return out


def _contimg(*args, timeout=3600):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run([sys.executable, "-m", "contimg.cli", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode not in (0,):
        raise SystemExit(f"contimg {' '.join(map(str, args))}: {p.returncode}\n{p.stdout}\n"
                         f"{p.stderr}")
    return p


def _transfers(dask_worker=None):
    return [{"who": e.get("who"), "keys": {str(k): v for k, v in e["keys"].items()},
             "total": e["total"]} for e in dask_worker.transfer_outgoing_log]


def _place(files, nodes, n):
    """Subband k into node k mod n's own directory (hard links to the simulation)."""
    for f in files:
        f = Path(f)
        sb = int(f.name.split("_sb")[1][:2])
        os.link(f, nodes[f"n{sb % n}"] / f.name)


def _unplace(files, nodes):
    names = {Path(f).name for f in files}
    for d in nodes.values():
        for f in d.iterdir():
            if f.name in names:
                f.unlink()


def _clear_transfers(dask_worker=None):
    dask_worker.transfer_outgoing_log.clear()


def run_one(n, files, warm, work: Path, args) -> dict:
    from distributed import Client

    from contimg.cluster import reads_off_node, stage_cpu, task_records
    from contimg.state import StateDB

    root = work / f"w{n}"
    if root.exists():              # a previous run's cluster directories
        shutil.rmtree(root)
    nodes = {f"n{i}": root / "nodes" / f"n{i}" for i in range(n)}
    for d in nodes.values():
        d.mkdir(parents=True)
    _place(warm, nodes, n)
    sport, wport = _ports(2)
    skip = [s for s in args.skip.split(",") if s]
    cfg = root / "contimg.toml"
    cfg.write_text(f"""
[paths]
output = "{root / 'out'}"
db = "{root / 'db.sqlite3'}"
[dask]
scheduler = "tcp://127.0.0.1:{sport}"
nodes = [{", ".join(f'"{k}={v}"' for k, v in nodes.items())}]
worker_threads = {args.threads}
worker_port = {wport}
task_log = "{root / 'tasks'}"
run_dir = "{root / 'run'}"
[stream]
placement = "nodes"
n_subbands = {args.subbands}
settle_s = 0.2
poll_s = 0.2
in_flight = {max(2, n)}
skip = {json.dumps(skip)}
[image]
npix = {args.imsize}
""")
    _contimg("--config", cfg, "cluster", "up")
    try:
        # warm-up (imports, numba caches, first-call costs in the fresh workers): one
        # small group through the same stages, apart (own database and output)
        _contimg("--config", cfg, "stream", "--until-idle",
                 "--output", root / "warm" / "out", "--db", root / "warm" / "db.sqlite3",
                 "--subbands", args.warm_subbands)
        _unplace(warm, nodes)          # the stream scans the nodes' directories
        _place(files, nodes, n)
        with Client(f"tcp://127.0.0.1:{sport}", set_as_default=False) as c:
            c.run(_clear_transfers)
        t0 = time.time()
        _contimg("--config", cfg, "stream", "--until-idle", "--timeout", "7200")
        wall = time.time() - t0
        with Client(f"tcp://127.0.0.1:{sport}", set_as_default=False) as c:
            transfers = c.run(_transfers)
    finally:
        _contimg("--config", cfg, "cluster", "down")
    db = StateDB(root / "db.sqlite3")
    groups = db.groups()
    done = [g for g in groups if g["state"] == "completed"]
    starts, ends = [], []
    for g in done:
        ev = db.events(g["group_id"])
        starts += [e["at"] for e in ev if e["to_state"] == "in_progress"]
        ends += [e["at"] for e in ev if e["to_state"] == "completed"]
    span = max(ends) - min(starts) if done else float("nan")
    gids = {g["group_id"] for g in groups}
    names = {Path(f).name for f in files}
    recs = [r for r in task_records(log_dir=root / "tasks")
            if r.get("group") in gids or r.get("file") in names]     # not the warm-up's
    per = stage_cpu(recs)
    sent = raw = 0
    for entries in transfers.values():
        for e in entries:
            sent += e["total"]
            raw += sum(v for k, v in e["keys"].items() if k.startswith("read-"))
    n_g = max(1, len(done))
    reads = [r for r in recs if r["stage"] == "read"]
    return {"workers": n, "groups": len(groups), "completed": len(done), "wall_s": wall,
            "span_s": span, "groups_per_hour": 3600 * len(done) / span if done else 0.0,
            "stages": {k: {"wall_s": v["seconds"] / n_g, "cpu_s": v["cpu_s"] / n_g,
                           "tasks": v["tasks"]} for k, v in per.items()},
            "bytes_between_workers_per_group": sent / n_g,
            "raw_read_bytes_between_workers_per_group": raw / n_g,
            "reads": len(reads), "reads_off_node": len(reads_off_node(recs))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--antennas", type=int, default=96)
    ap.add_argument("--subbands", type=int, default=16)
    ap.add_argument("--channels", type=int, default=48)
    ap.add_argument("--integrations", type=int, default=24)
    ap.add_argument("--skip", default="calibrate,apply,photometry",
                    help="stages not run (no calibrator catalogue in the simulation)")
    ap.add_argument("--imsize", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="threads per worker")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from contimg.runtime import configure
    from contimg.simulate import SimConfig, simulate_group

    configure()
    work = Path(args.work or tempfile.mkdtemp(prefix="contimg-scale-"))
    sim = SimConfig(n_ant=args.antennas, n_subbands=args.subbands, n_chan=args.channels,
                    n_times=args.integrations)
    t0 = dt.datetime(2026, 1, 15, 8, 0, 0)
    files = []
    ts = time.time()
    def _sim(d, t, cfg):       # a simulation already in --work is used again
        have = sorted(map(str, d.glob("*.hdf5")))
        if len(have) == cfg.n_subbands:
            return have
        return list(simulate_group(d, t, cfg=cfg).files)

    for i in range(args.groups):
        files += _sim(work / "sim" / f"g{i}", t0 + dt.timedelta(seconds=i * GROUP_S), sim)
    warm = _sim(work / "sim" / "warm", t0 - dt.timedelta(days=1),
                SimConfig(n_ant=10, n_subbands=4, n_chan=8, n_times=6))
    args.warm_subbands = 4
    print(f"simulated (or reused) {args.groups} group(s) of {args.antennas} antennas, "
          f"{args.subbands}x{args.channels} channels, {args.integrations} integrations in "
          f"{time.time() - ts:.0f} s; {args.threads} thread(s) per worker; skipped: "
          f"{args.skip or 'none'}; image {args.imsize} px", flush=True)
    results = []
    for n in [int(x) for x in args.workers.split(",")]:
        r = run_one(n, files, warm, work, args)
        results.append(r)
        print(f"  {n} worker(s): {r['completed']}/{r['groups']} groups in {r['span_s']:.1f} s",
              flush=True)
    base = results[0]
    cols = [f"{r['workers']} worker(s)" for r in results]
    print(f"\n{'':<42}" + "".join(f"{c:>16}" for c in cols))
    print(f"{'groups/hour':<42}" + "".join(f"{r['groups_per_hour']:>16.1f}" for r in results))
    print(f"{'  ratio to 1 worker':<42}"
          + "".join(f"{r['groups_per_hour'] / base['groups_per_hour']:>16.2f}" for r in results))
    stages = sorted({s for r in results for s in r["stages"]})
    for s in stages:
        print(f"{s + ' CPU s/group':<42}"
              + "".join(f"{r['stages'].get(s, {}).get('cpu_s', 0):>16.2f}" for r in results))
        print(f"{s + ' wall s/group (sum of tasks)':<42}"
              + "".join(f"{r['stages'].get(s, {}).get('wall_s', 0):>16.2f}" for r in results))
    print(f"{'bytes between workers / group (MB)':<42}"
          + "".join(f"{r['bytes_between_workers_per_group'] / 1e6:>16.1f}" for r in results))
    print(f"{'  of which raw subband blocks (MB)':<42}"
          + "".join(f"{r['raw_read_bytes_between_workers_per_group'] / 1e6:>16.1f}"
                    for r in results))
    print(f"{'reads / reads off-node':<42}"
          + "".join(f"{str(r['reads']) + ' / ' + str(r['reads_off_node']):>16}" for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
