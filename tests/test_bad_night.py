"""A bad night loses nothing (issue 19): a seeded, randomised fault-injection run.

Ten small groups arrive while, at random (seed 19), files are corrupt, written by
another group, late, duplicated (once with the first copy bad), half-written, or
symlinks; the stream process is killed (SIGKILL) and restarted; a Dask worker is killed;
the disk under the products fills and frees (a small tmpfs, when this runs as root).
Afterwards: every good subband that arrived in time was used, every group completed
exactly once or failed with its bad files named, none is left in progress, there is one
whole MS per completed group and no temporary, and the event log agrees with the final
states. The figures are printed. The stages after flagging are skipped (they have their
own tests); the run takes about two minutes.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from contimg.simulate import SimConfig, simulate_group
from contimg.state import StateDB
from contimg.stream import Stream, StreamConfig

SEED = 19
N_GROUPS = 10
NSB = 4
CFG = SimConfig(n_ant=8, n_subbands=NSB, n_chan=4, n_times=4, rfi=None, source_density=0.2)
T0 = dt.datetime(2026, 3, 1, 1, 0, 0)
FAULTS = ("corrupt", "other_group", "duplicate", "bad_then_duplicate", "half_written",
          "symlinks", "late", "two_corrupt")


def _name(path, dt_s=0):
    n = Path(path).name
    ts = dt.datetime.strptime(n[:19], "%Y-%m-%dT%H:%M:%S") + dt.timedelta(seconds=dt_s)
    return f"{ts:%Y-%m-%dT%H:%M:%S}{n[19:]}"


def _unwritten(src, dst):
    """``src`` as a correlator leaves it mid-write: the last integration not yet there."""
    import h5py
    import numpy as np

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        nbl = int(f["Header/Nbls"][()])
        for name in ("visdata", "flags", "nsamples"):
            d = f["Data"][name]
            d[-nbl:] = np.zeros((nbl,) + d.shape[1:], d.dtype)


def _finish(src, dst):
    import h5py

    with h5py.File(src, "r") as fi, h5py.File(dst, "r+") as fo:
        nbl = int(fi["Header/Nbls"][()])
        for name in ("visdata", "flags", "nsamples"):
            fo["Data"][name][-nbl:] = fi["Data"][name][-nbl:]


def _write_slowly(src, dst):
    """The correlator's last integrations: the file's mtime moves for 2 s (size fixed:
    HDF5 allocated it), then the last integration lands."""
    for _ in range(4):
        time.sleep(0.5)
        os.utime(dst)
    for _ in range(50):   # (the stream may hold it open, read-only, in this process)
        try:
            _finish(src, dst)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{dst}: could not finish it")


class Night:
    """The plan (seeded) and its delivery; ``expect`` records what each group must end
    as: ``used`` (subbands whose good file arrived in time), ``bad`` (paths of files
    that must be set aside, the culprits), ``late`` (paths arriving after dispatch)."""

    def __init__(self, groups, inc, seed=SEED):
        self.rng = random.Random(seed)
        self.groups, self.inc = groups, inc
        order = list(range(N_GROUPS))
        self.rng.shuffle(order)
        self.fault = {gi: f for gi, f in zip(order, FAULTS)}
        self.expect = {}
        self.later = []          # (kind, args) actions for the driver
        self.writers = []        # threads finishing half-written files
        self.n_faults = 0

    def deliver(self, gi):
        g = self.groups[gi]
        fault = self.fault.get(gi)
        sb = self.rng.randrange(NSB)
        used, bad, late = set(range(NSB)), [], []
        for k, f in enumerate(g.files):
            dst = self.inc / Path(f).name
            if k == sb and fault in ("corrupt", "two_corrupt"):
                dst.write_bytes(Path(f).read_bytes()[:2000])    # never opens as HDF5
                used.discard(k)
                bad.append(str(dst))
            elif k == (sb + 1) % NSB and fault == "two_corrupt":
                dst.write_bytes(Path(f).read_bytes()[:3000])
                used.discard(k)
                bad.append(str(dst))
            elif k == sb and fault in ("other_group", "bad_then_duplicate"):
                other = self.groups[(gi + 1) % N_GROUPS].files[k]   # other integrations
                shutil.copy(other, dst)
                old = time.time() - 60
                os.utime(dst, (old, old))
                bad.append(str(dst))
                if fault == "other_group":
                    used.discard(k)
                else:      # a good copy, a second later in name: set aside, then used
                    shutil.copy(f, self.inc / _name(f, 1))
            elif k == sb and fault == "duplicate":
                shutil.copy(f, dst)
                dup = self.inc / _name(f, 1)
                shutil.copy(f, dup)
                self.later.append(("duplicate", str(dup)))
            elif k == sb and fault == "half_written":
                _unwritten(f, dst)
                th = threading.Thread(target=_write_slowly, args=(f, dst))
                th.start()
                self.writers.append(th)
            elif fault == "symlinks":
                os.symlink(f, dst)
            elif k == sb and fault == "late":
                used.discard(k)
                late.append((f, dst))
            else:
                shutil.copy(f, dst)
        if fault:
            self.n_faults += 1
        for f, dst in late:
            self.later.append(("late", (g.stamp, f, dst)))
        self.expect[g.stamp] = dict(used=used, bad=bad, late=[str(d) for _, d in late],
                                    fault=fault)


@pytest.fixture(scope="module")
def night_groups(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_night_sim")
    return [simulate_group(root / f"g{i}", T0 + dt.timedelta(minutes=5 * i), cfg=CFG)
            for i in range(N_GROUPS)]


def _mount_small_disk(path, size="256m"):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def _fill(path):
    """Fill the filesystem under ``path``: the filler file (removed to free it)."""
    filler = path / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def _wait(pred, timeout, step=0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return False


def test_a_bad_night_loses_nothing(tmp_path, night_groups):
    from distributed import Client, LocalCluster

    inc, out, dbp = tmp_path / "in", tmp_path / "out", tmp_path / "db.sqlite3"
    inc.mkdir()
    small_disk = _mount_small_disk(out)
    night = Night(night_groups, inc)
    figures = dict(groups=N_GROUPS, stream_killed=0, worker_killed=0, disk_full=0)
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None, memory_limit="2GiB") as lc, \
                Client(lc, set_as_default=False) as client:
            # --- phase A: a stream process, killed outright while it works
            for gi in range(3):
                night.deliver(gi)
            proc = subprocess.Popen(
                [sys.executable, "-m", "contimg.cli", "stream", "--incoming", str(inc),
                 "--output", str(out), "--db", str(dbp), "--scheduler", lc.scheduler_address,
                 "--subbands", str(NSB), "--min-subbands", "3", "--settle", "0.3", "--poll",
                 "0.2", "--bad-file-grace", "3", "--group-timeout", "8", "--skip",
                 "calibrate,apply,image", "--in-flight", "1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                assert _wait(lambda: dbp.exists() and dbp.stat().st_size > 0, 60)
                dba = StateDB(dbp)
                ok = _wait(lambda: dba.counts()["in_progress"] > 0, 90)
                assert ok, "the first stream never started a group"
                time.sleep(0.5)
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            figures["stream_killed"] += 1

            # --- phase B: the restarted stream, while the night goes on
            cfg = StreamConfig(incoming=inc, output=out, db_path=dbp, n_subbands=NSB,
                               min_subbands=3, settle_s=0.3, poll_s=0.2,
                               bad_file_grace_s=3.0, group_timeout_s=8.0, in_flight=2,
                               skip=frozenset({"calibrate", "apply", "image"}),
                               status_every_s=10, stale_after_s=60)
            stream = Stream(cfg, client)
            runner = threading.Thread(target=stream.run)
            runner.start()
            db = StateDB(dbp)
            try:
                for gi in range(3, N_GROUPS):
                    night.deliver(gi)
                    time.sleep(0.6)
                    if gi == 5:    # a worker dies while groups are converting
                        pids = client.run(os.getpid)
                        os.kill(next(iter(pids.values())), signal.SIGKILL)
                        figures["worker_killed"] += 1
                    if gi == 7 and small_disk:    # the disk fills, then frees
                        filler = _fill(out)
                        figures["disk_full"] += 1
                        time.sleep(6.0)
                        filler.unlink()
                for th in night.writers:
                    th.join()
                for kind, arg in night.later:
                    if kind == "late":      # arrives once its group is under way
                        stamp, src, dst = arg
                        t = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").replace(
                            tzinfo=dt.timezone.utc).timestamp()
                        assert _wait(lambda: (db.find_group(t, 60) or {}).get(
                            "state", "collecting") != "collecting", 60)
                        shutil.copy(src, dst)

                def settled():
                    c = db.counts()
                    late = [f for f in db.files() if f["status"] == "late"]
                    return (c["collecting"] == c["pending"] == c["in_progress"] == 0
                            and len(late) == sum(len(e["late"])
                                                 for e in night.expect.values()))
                assert _wait(settled, 150), db.counts()
            finally:
                stream.stop()
                runner.join(60)
        _check(db, night, out, figures)
    finally:
        if small_disk:
            subprocess.run(["umount", "-l", str(out)], check=False)


def _check(db, night, out, figures):
    files = db.files()
    groups = {g["group_id"]: g for g in db.groups()}
    by_path = {f["path"]: f for f in files}
    counts = db.counts()
    assert counts["in_progress"] == counts["pending"] == counts["collecting"] == 0
    assert len(groups) == N_GROUPS, sorted(groups)
    lost = 0
    for stamp, e in night.expect.items():
        gid = next(gid for gid, g in groups.items() if abs(
            g["t_start"] - dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").replace(
                tzinfo=dt.timezone.utc).timestamp()) <= 60)
        g = groups[gid]
        for p in e["bad"]:                          # the culprits, named, set aside
            assert by_path[p]["status"] == "bad" and by_path[p]["reason"], (stamp, p)
        for p in e["late"]:
            assert by_path[p]["status"] == "late" and "arrived after" in by_path[p]["reason"]
        ready = {f["subband"] for f in files if f["group_id"] == gid and f["status"] == "ready"}
        if g["state"] == "completed":
            used = set(range(NSB)) - set(g["missing"] or [])
            lost += len(e["used"] - used)
            assert used == e["used"] == ready, (stamp, e["fault"], used, e["used"])
        else:   # failed: only by policy, its bad files named in the database
            assert g["state"] == "failed" and e["fault"] == "two_corrupt", (stamp, g)
            assert len(e["used"]) < 3 and "2/4 subbands" in g["error"], g["error"]
            assert {by_path[p]["subband"] for p in e["bad"]} == set(g["missing"])
        # the event log: a chain of legal steps ending in the final state
        ev = db.events(gid)
        prev = "collecting"
        for x in ev:
            assert x["from_state"] == prev, (gid, ev)
            prev = x["to_state"]
        assert prev == g["state"], (gid, ev)
        n_done = sum(x["to_state"] == "completed" for x in ev)
        assert n_done == (1 if g["state"] == "completed" else 0), (gid, ev)
    # products: one whole MS per completed group, no temporaries, none half-written
    completed = [g for g in groups.values() if g["state"] == "completed"]
    ms = db.measurement_sets()
    assert len(ms) == len(completed) == len({m["group_id"] for m in ms})
    on_disk = sorted(p.name for p in (out / "ms").iterdir() if p.name.endswith(".ms"))
    assert on_disk == sorted(Path(m["path"]).name for m in ms), on_disk
    for m in ms:
        assert (Path(m["path"]) / "table.dat").exists() and m["status"] == "flagged"
    leftovers = [p.name for d in (out, out / "ms") for p in d.iterdir()
                 if ".tmp" in p.name or ".old-" in p.name]
    assert leftovers == []
    figures.update(faults_injected=night.n_faults + figures["stream_killed"]
                   + figures["worker_killed"] + figures["disk_full"],
                   completed=len(completed), failed=counts["failed"],
                   bad_files=sum(f["status"] == "bad" for f in files),
                   duplicates=sum(f["status"] == "duplicate" for f in files),
                   late=sum(f["status"] == "late" for f in files),
                   retries=sum(g["retries"] for g in groups.values()),
                   attempts=sum(g["attempts"] for g in groups.values()),
                   data_lost=lost)
    print("\nbad night: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    print("faults by group: " + ", ".join(f"{s[11:16]} {e['fault'] or '-'}"
                                           for s, e in sorted(night.expect.items())))
    assert lost == 0
