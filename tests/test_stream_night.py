"""Issue 19 (a bad night loses nothing): one test per item, on small simulated groups.

Groups are small (10 antennas, 4 subbands x 8 channels, 6 integrations); the stages
after flagging are skipped unless a test is about them.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pytest

from contimg.simulate import SimConfig, simulate_group, write_calibrator_catalog
from contimg.state import StateDB
from contimg.stream import Stream, StreamConfig
from test_stream import _cfg  # the same small-group stream settings

CFG = SimConfig(n_ant=10, n_subbands=4, n_chan=8, n_times=6, rfi=None)
T0 = dt.datetime(2026, 2, 3, 8, 0, 0)
GROUP_S = 6 * 12.884901888


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    """Three small groups, and a group of 4-channel subbands (a wrong channel count)."""
    root = tmp_path_factory.mktemp("night_sim")
    groups = [simulate_group(root / f"g{i}", T0 + dt.timedelta(seconds=i * GROUP_S), cfg=CFG)
              for i in range(3)]
    narrow = simulate_group(root / "narrow", T0 + dt.timedelta(seconds=GROUP_S),
                            cfg=SimConfig(n_ant=10, n_subbands=4, n_chan=4, n_times=6,
                                          rfi=None))
    return groups, narrow


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                      dashboard_address=None, memory_limit="4GiB") as lc:
        with Client(lc, set_as_default=False) as client:
            yield client


def _name(path, sb=None, dt_s=0):
    """The file name of ``path`` with its subband and/or timestamp changed."""
    n = Path(path).name
    ts = dt.datetime.strptime(n[:19], "%Y-%m-%dT%H:%M:%S") + dt.timedelta(seconds=dt_s)
    return f"{ts:%Y-%m-%dT%H:%M:%S}_sb{int(n[22:24]) if sb is None else sb:02d}.hdf5"


def _age(path, seconds):
    t = os.path.getmtime(path) - seconds
    os.utime(path, (t, t))


# ---------------------------------------------------------------- item 1: one culprit
def test_group_errors_name_the_odd_file_as_culprit(sims):
    from contimg.io.uvh5 import GroupError, open_group

    (a, b, _), narrow = sims
    # sb00 (the usual reference) has the wrong channel count: sb00 is the culprit
    files = [narrow.files[0]] + list(b.files[1:])
    with pytest.raises(GroupError) as ei:
        open_group(files, n_subbands=4)
    assert ei.value.culprits == (str(narrow.files[0]),)
    # sb02 holds another group's integrations: sb02 alone, though sb00 is named too
    files = list(a.files[:2]) + [b.files[2]] + [a.files[3]]
    with pytest.raises(GroupError) as ei:
        open_group(files, n_subbands=4, name_tolerance_s=1e9)
    assert ei.value.culprits == (str(b.files[2]),) and str(a.files[0]) in str(ei.value)


def test_bad_input_sets_aside_only_the_culprit_and_revives_a_duplicate(tmp_path, sims,
                                                                       cluster):
    (a, b, c), narrow = sims
    cfg = _cfg(tmp_path)
    inc = cfg.incoming
    inc.mkdir()
    # group a: its sb01 holds group c's integrations (named as a's sb01)
    for f in a.files:
        shutil.copy(f, inc)
    shutil.copy(c.files[1], inc / Path(a.files[1]).name)
    # group b: its sb02 has the wrong channel count; a good copy arrives later, a second
    # after it in name: a duplicate, set aside, until the first one proves bad
    for f in b.files:
        if "_sb02" not in str(f):
            shutil.copy(f, inc)
    bad = inc / Path(b.files[2]).name
    shutil.copy(narrow.files[2], bad)
    _age(bad, 30)
    dup = inc / _name(b.files[2], dt_s=1)
    shutil.copy(b.files[2], dup)

    stream = Stream(cfg, cluster)
    counts = stream.run(until_idle=True, timeout=180)
    db = stream.db
    assert counts["completed"] == 2 and counts["failed"] == 0, db.groups()
    by_path = {f["path"]: f for f in db.files()}
    ga = db.group(by_path[str(inc / Path(a.files[0]).name)]["group_id"])
    gb = db.group(by_path[str(dup)]["group_id"])
    # a lost only its sb01; the reference sb00 named in the message stays good
    assert ga["missing"] == [1] and ga["n_present"] == 3
    assert by_path[str(inc / Path(a.files[1]).name)]["status"] == "bad"
    assert by_path[str(inc / Path(a.files[0]).name)]["status"] == "ready"
    # b: the narrow sb02 is bad, its duplicate took its place: nothing missing
    assert by_path[str(bad)]["status"] == "bad"
    assert by_path[str(dup)]["status"] == "ready" and "replaces" in by_path[str(dup)]["reason"]
    assert gb["missing"] == [] and gb["n_present"] == 4


# ---------------------------------------------------------------- item 2 (and 13: chmod 000)
def test_scan_survives_any_directory_entry(tmp_path, sims, cluster, monkeypatch, caplog):
    """A symlink loop, a dangling symlink, a directory, an entry that cannot be stat'ed
    (permission), a file that cannot be read for a while (chmod 000; root reads anything,
    so it is injected) and a file that vanishes: the stream goes on, logs each once with
    its reason, and the good group (one file a symlink) completes with all its subbands."""
    import logging

    import contimg.intake as st

    (a, _, _), _ = sims
    cfg = _cfg(tmp_path)
    inc = cfg.incoming
    inc.mkdir()
    for f in a.files[1:]:
        shutil.copy(f, inc)
    os.symlink(a.files[0], inc / Path(a.files[0]).name)          # a symlinked subband
    os.symlink(inc / "2026-02-04T00:00:00_sb01.hdf5", inc / "2026-02-04T00:00:00_sb00.hdf5")
    os.symlink(inc / "2026-02-04T00:00:00_sb00.hdf5", inc / "2026-02-04T00:00:00_sb01.hdf5")
    os.symlink(tmp_path / "nowhere.hdf5", inc / "2026-02-04T00:00:00_sb02.hdf5")
    (inc / "2026-02-04T00:00:00_sb03.hdf5").mkdir()
    (inc / "2026-02-05T00:00:00_sb00.hdf5").write_bytes(b"x" * 100)   # no permission
    vanishing = inc / "2026-02-06T00:00:00_sb00.hdf5"
    shutil.copy(a.files[0], vanishing)

    real_scandir = os.scandir

    class Entry:
        def __init__(self, e):
            self._e, self.name, self.path = e, e.name, e.path

        def stat(self):
            if self.name.startswith("2026-02-05"):
                raise PermissionError(13, "Permission denied")
            return self._e.stat()

        def is_file(self):
            return self._e.is_file()

    def scandir(p="."):
        if Path(p) != inc:
            return real_scandir(p)
        with real_scandir(p) as it:
            return [Entry(e) for e in it]

    monkeypatch.setattr(os, "scandir", scandir)
    unreadable = str(inc / Path(a.files[2]).name)
    real_check, denied = st._check_ready, []

    def check(path):
        if path == unreadable and len(denied) < 4:
            denied.append(path)
            raise PermissionError(13, "Permission denied")
        if path == str(vanishing):
            os.unlink(path)
        return real_check(path)

    monkeypatch.setattr(st, "_check_ready", check)
    caplog.set_level(logging.WARNING, logger="contimg.stream")
    stream = Stream(cfg, cluster)
    counts = stream.run(until_idle=True, timeout=120)
    # the vanished file's group (nothing else in it) fails as incomplete, with the reason
    assert counts["completed"] == 1 and counts["failed"] == 1
    (f,) = [g for g in stream.db.groups() if g["state"] == "failed"]
    assert f["group_id"] == "2026-02-06T00:00:00" and "0/4 subbands" in f["error"]
    (g,) = [g for g in stream.db.groups() if g["state"] == "completed"]
    assert g["n_present"] == 4 and g["missing"] == []
    assert len(denied) == 4     # the unreadable file was retried, not marked bad
    msgs = [r.getMessage() for r in caplog.records]

    def n(text):
        return sum(text in m for m in msgs)

    assert n("Too many levels of symbolic links") == 2
    assert n("_sb02.hdf5: skipped for now: No such file or directory") == 1
    assert n("_sb03.hdf5: skipped for now: not a regular file") == 1
    assert n("2026-02-05T00:00:00_sb00.hdf5: skipped for now: Permission denied") == 1
    assert n(f"{unreadable}: skipped for now: Permission denied") == 1
    assert n(f"{vanishing}: skipped for now: vanished before it was ready") == 1


# ---------------------------------------------------------------- item 5: readiness
def _unwritten_copy(src, dst, *, chunked=False):
    """``src`` as the correlator leaves it mid-write: header and full-shape data
    datasets, all integrations but the last written (contiguous: allocated, the last
    integration zeros; chunked: one chunk per integration, the last not allocated)."""
    import h5py
    import numpy as np

    with h5py.File(src, "r") as fi, h5py.File(dst, "w") as fo:
        fi.copy("Header", fo)
        nbl = int(fi["Header/Nbls"][()])
        for name in ("visdata", "flags", "nsamples"):
            d = fi["Data"][name]
            kw = {"chunks": (nbl,) + d.shape[1:]} if chunked else {}
            o = fo.create_dataset(f"Data/{name}", shape=d.shape, dtype=d.dtype, **kw)
            o[:-nbl] = d[:-nbl]
            if not chunked:
                o[-nbl:] = np.zeros_like(d[-nbl:])
    return dst


def _finish(src, dst):
    import h5py

    with h5py.File(src, "r") as fi, h5py.File(dst, "r+") as fo:
        nbl = int(fi["Header/Nbls"][()])
        for name in ("visdata", "flags", "nsamples"):
            fo["Data"][name][-nbl:] = fi["Data"][name][-nbl:]


def test_check_written_sees_a_file_still_being_written(tmp_path, sims):
    from contimg.io.uvh5 import UVH5Error, check_written

    (a, _, _), _ = sims
    check_written(a.files[1])                      # a complete file passes
    for chunked in (False, True):
        p = _unwritten_copy(a.files[1], tmp_path / f"x{int(chunked)}_sb01.hdf5",
                            chunked=chunked)
        with pytest.raises(UVH5Error, match="still being written") as ei:
            check_written(p)
        assert ei.value.culprits == (str(p),)
        _finish(a.files[1], p)
        check_written(p)
    # a file cut short after its (contiguous) data were allocated: data beyond the end
    p = tmp_path / "cut_sb01.hdf5"
    data = Path(a.files[1]).read_bytes()
    p.write_bytes(data[:-4096])
    with pytest.raises(UVH5Error):
        check_written(p)


def test_a_subband_still_being_written_is_not_ready(tmp_path, sims, cluster):
    """The stable-size file whose last integration is unwritten waits; it becomes ready
    (and the group is processed) only once the correlator has finished it."""
    import time

    import numpy as np

    from contimg.io.ms import open_ms

    (a, _, _), _ = sims
    cfg = _cfg(tmp_path, bad_file_grace_s=30.0)
    inc = cfg.incoming
    inc.mkdir()
    for f in a.files:
        if "_sb01" not in str(f):
            shutil.copy(f, inc)
    slow = _unwritten_copy(a.files[1], inc / Path(a.files[1]).name)
    stream = Stream(cfg, cluster)
    done = {}

    def finish():
        time.sleep(4.0)
        for _ in range(50):   # (the stream may hold it open read-only in this process)
            try:
                t = time.time()   # (the stream may see it finished before this returns)
                _finish(a.files[1], slow)
                done["t"] = t
                break
            except OSError:
                time.sleep(0.1)

    import threading

    th = threading.Thread(target=finish)
    th.start()
    counts = stream.run(until_idle=True, timeout=120)
    th.join()
    assert counts["completed"] == 1
    f = next(f for f in stream.db.files() if f["path"] == str(slow))
    assert f["status"] == "ready" and f["ready_at"] >= done["t"]
    (ms,) = stream.db.measurement_sets()
    ds = open_ms(ms["path"])
    last = ds.VISIBILITY.isel(time=-1).values
    assert np.all(np.any(last != 0, axis=(0, 2)))   # every channel of the last time written


# ---------------------------------------------------------------- items 9 and 3: liveness
def _db_with_group(tmp_path, gid, owner, heartbeat_age):
    import time

    db = StateDB(tmp_path / "db.sqlite3")
    t = dt.datetime.strptime(gid, "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=dt.timezone.utc).timestamp()
    db.add_file(f"/x/{gid}_sb00.hdf5", subband=0, timestamp=t, group_id=gid, t_start=t,
                n_expected=4)
    db.set_file_status(f"/x/{gid}_sb00.hdf5", "ready")
    db.transition(gid, "pending")
    db.claim(gid, owner=owner)
    db.query("UPDATE groups SET heartbeat=? WHERE group_id=?",
             (time.time() - heartbeat_age, gid))
    return db


def test_a_reused_pid_does_not_keep_a_group_in_progress(tmp_path):
    """The owner's PID is alive on this host (reused by another process) but its
    heartbeat stopped an hour ago: the group goes back to pending."""
    from contimg.state import owner_id
    from contimg.stream import housekeeping, resume_stale_groups

    host = owner_id().rpartition(":")[0]
    gid = "2026-02-03T09:00:00"
    db = _db_with_group(tmp_path, gid, f"{host}:{os.getppid()}", 3600)
    assert resume_stale_groups(db, stale_after_s=1800) == [gid]
    assert db.group(gid)["state"] == "pending"
    # a live heartbeat keeps it, on this host or another
    db.claim(gid, owner=f"{host}:{os.getppid()}")
    assert housekeeping(db, stale_after_s=1800)["resumed"] == []
    assert db.group(gid)["state"] == "in_progress"


def test_temporaries_judged_by_their_owners_heartbeat(tmp_path):
    """Another node's live MS (its owner's PID means nothing here) is kept; contimg's
    own temporaries of finished work are removed, the image's .fits.tmp included; an
    interrupted MS replacement is put back; other files and MS insides are untouched."""
    from contimg.stream import remove_stale_temporaries

    live, done = "2026-02-03T09:00:00", "2026-02-03T09:05:00"
    db = _db_with_group(tmp_path, live, "othernode:12", 10)     # heartbeat 10 s ago
    out = tmp_path / "out"
    ms = out / "ms"
    (ms / f"{live}.ms.tmp-12").mkdir(parents=True)              # being written elsewhere
    t = dt.datetime.strptime(done, "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=dt.timezone.utc).timestamp()
    db.add_file(f"/x/{done}_sb00.hdf5", subband=0, timestamp=t, group_id=done, t_start=t,
                n_expected=4)
    (ms / f"{done}.ms.tmp-999999").mkdir()                        # of a finished group
    (out / "images").mkdir()
    (out / "images" / f"{done}-image.fits.tmp").write_bytes(b"x")
    (ms / f"{done}.ms.old-999999").mkdir()                        # interrupted replacement
    (ms / f"{done}.ms.old-999999" / "table.dat").write_bytes(b"t")
    (ms / "2026-02-03T08:00:00.ms").mkdir()
    inner = ms / "2026-02-03T08:00:00.ms" / "x.tmp-999999"        # inside an MS: not ours
    inner.write_bytes(b"x")
    (out / "notes.tmp-999999.txt").write_bytes(b"x")              # not contimg's pattern
    removed = remove_stale_temporaries(out, db=db, stale_after_s=1800)
    assert (ms / f"{live}.ms.tmp-12").exists()
    assert not (ms / f"{done}.ms.tmp-999999").exists()
    assert not (out / "images" / f"{done}-image.fits.tmp").exists()
    assert (ms / f"{done}.ms" / "table.dat").exists()              # restored
    assert inner.exists() and (out / "notes.tmp-999999.txt").exists()
    assert len(removed) == 3
    # the owner falls silent: its temporary goes too
    db.query("UPDATE groups SET heartbeat=heartbeat-7200 WHERE group_id=?", (live,))
    remove_stale_temporaries(out, db=db, stale_after_s=1800)
    assert not (ms / f"{live}.ms.tmp-12").exists()


# ---------------------------------------------------------------- item 7: retries re-decide
def test_a_retry_decides_again_an_apply_skipped_for_want_of_a_calibration_set(tmp_path):
    import json
    import time

    gid = "2026-02-03T09:00:00"
    db = _db_with_group(tmp_path, gid, "h:1", 0)
    ms = tmp_path / "out" / "ms" / f"{gid}.ms"
    ms.mkdir(parents=True)
    (ms / "table.dat").write_bytes(b"t")
    now = time.time()
    for stage, status, detail in (
            ("convert", "ok", "{}"), ("flag", "ok", json.dumps({"flagged": 0.1})),
            ("calibrate", "skipped", json.dumps({"status": "skipped",
                                                 "reason": "no calibrator transits"})),
            ("apply", "skipped", json.dumps({"status": "skipped", "reason":
                                             "no valid calibration set in the database"})),
            ("image", "failed", "MemoryError: ...")):
        db.record_stage(gid, 1, stage, status, 1.0, now, detail)
    stream = Stream(_cfg(tmp_path), client=None, db=db)
    g = dict(db.group(gid), attempts=2, retries=1)
    keep = stream._reusable(g, str(ms))
    assert set(keep) == {"convert", "flag"}     # calibrate and apply decided again


# ---------------------------------------------------------------- item 8: versioned calsets
def test_a_rejected_re_solve_never_replaces_a_valid_set(tmp_path):
    tables = {"B": str(tmp_path / "x.B"), "G": str(tmp_path / "x.G")}
    for p in tables.values():
        Path(p).mkdir()
    db = StateDB(tmp_path / "db.sqlite3")
    t = 1.77e9
    first = db.register_calset("2026-02-03T09:00:00", t_transit=t, tables=tables,
                               calibrator="3C48", refant=3)
    db.register_calset("2026-02-03T09:00:00", t_transit=t, tables={}, status="rejected",
                       reason="low SNR: 93.8 % converged")
    cs = db.find_calset(t + 60)
    assert cs is not None and cs["id"] == first and cs["status"] == "valid"
    sets = db.list_calsets()
    assert [(c["version"], c["status"]) for c in sets] == [(1, "valid"), (2, "rejected")]
    # a later valid re-solve is a third version, and the one used
    third = db.register_calset("2026-02-03T09:00:00", t_transit=t, tables=tables)
    assert db.find_calset(t)["id"] == third and db.list_calsets()[2]["version"] == 3


def test_a_version_1_database_migrates_with_its_references(tmp_path):
    """The calibration_sets rebuild keeps ids, so MSs and images that refer to a set
    still do; foreign keys hold after the migration."""
    import sqlite3

    from contimg.state import MIGRATIONS, SCHEMA_VERSION

    path = tmp_path / "old.sqlite3"
    con = sqlite3.connect(path)
    con.executescript(MIGRATIONS[0] + ";PRAGMA user_version=1;")
    con.execute("INSERT INTO calibration_sets (id, name, status, t_transit, valid_start, "
                "valid_end, created_at) VALUES (7, 'c', 'valid', 1, 0, 2, 0)")
    con.execute("INSERT INTO measurement_sets (path, calset_id, created_at, updated_at) "
                "VALUES ('/m.ms', 7, 0, 0)")
    con.commit()
    con.close()
    db = StateDB(path)
    assert db.version == SCHEMA_VERSION
    (cs,) = db.list_calsets()
    assert cs["id"] == 7 and cs["version"] == 1
    assert db.query("PRAGMA foreign_key_check") == []
    assert db.measurement_sets()[0]["calset_id"] == 7
    assert db.query("PRAGMA foreign_keys")[0]["foreign_keys"] == 1


# ---------------------------------------------------------------- item 10: the database
def test_a_damaged_or_empty_database_is_refused_naming_it(tmp_path):
    import sqlite3

    from contimg.state import StateError

    empty = tmp_path / "empty.sqlite3"
    empty.write_bytes(b"")
    with pytest.raises(StateError, match=r"empty\.sqlite3: the state database is empty"):
        StateDB(empty)
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not sqlite" * 500)
    with pytest.raises(StateError, match=r"junk\.sqlite3.*not a usable state database"):
        StateDB(junk)
    # a database whose pages were overwritten: quick_check finds it, the stream refuses
    good = tmp_path / "good.sqlite3"
    db = StateDB(good)
    for i in range(300):
        db.add_file(f"/x/{i:04d}_sb00.hdf5", subband=0, timestamp=float(i), group_id=f"g{i}",
                    t_start=float(i), n_expected=4)
    db.query("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    data = bytearray(good.read_bytes())
    for off in range(3 * 4096, len(data) - 4096, 4 * 4096):   # scribble over some pages
        data[off + 100:off + 900] = b"\x5a" * 800
    good.write_bytes(bytes(data))
    with pytest.raises((StateError, sqlite3.DatabaseError), match=r"good\.sqlite3"):
        StateDB(good).check_integrity()
    cfg = _cfg(tmp_path, db_path=good)
    with pytest.raises((StateError, sqlite3.DatabaseError), match=r"good\.sqlite3"):
        Stream(cfg, client=None).run(until_idle=True, timeout=10)
    # a worker never creates a database: a wrong path is an error naming it
    with pytest.raises(StateError, match="no such state database"):
        StateDB(tmp_path / "elsewhere" / "db.sqlite3", create=False)
    assert not (tmp_path / "elsewhere").exists()


def test_a_full_disk_when_recording_a_failure_does_not_kill_the_stream(tmp_path,
                                                                        monkeypatch):
    import sqlite3

    gid = "2026-02-03T09:00:00"
    db = _db_with_group(tmp_path, gid, "h:1", 0)
    g = db.group(gid)
    stream = Stream(_cfg(tmp_path), client=None, db=db)
    real, calls = db.transition, []

    def full(*a, **kw):
        calls.append(a)
        if len(calls) <= 2:
            raise sqlite3.OperationalError(f"{db.path}: database or disk is full")
        return real(*a, **kw)

    monkeypatch.setattr(db, "transition", full)
    monkeypatch.setattr(stream._stop, "wait", lambda t: False)    # no real waiting
    stream._failed_attempt(g, "RuntimeError: boom")   # the database is full meanwhile
    assert len(calls) == 3
    g = db.group(gid)
    assert g["state"] == "pending" and g["retries"] == 1 and "boom" in g["error"]
    # an attempt that failed for want of disk space is re-queued without counting
    g = db.claim(gid, owner="h:1")
    stream._failed_attempt(g, "OSError: [Errno 28] No space left on device")
    g = db.group(gid)
    assert g["state"] == "pending" and g["retries"] == 1 and "disk full" in g["error"]


# ---------------------------------------------------------------- item 11: NaN visibilities
def test_solver_accumulation_masks_nan_visibilities():
    import numpy as np

    from kernels import solvers

    rng = np.random.default_rng(3)
    nt, nbl, nf, npol, nant = 2, 3, 4, 2, 3
    a1, a2 = np.array([0, 0, 1]), np.array([1, 2, 2])
    vis = (rng.normal(size=(nt, nbl, nf, npol)) + 1j * rng.normal(size=(nt, nbl, nf, npol))
           ).astype(np.complex64)
    model = np.ones_like(vis)
    flag = np.zeros(vis.shape, bool)
    w = np.ones(vis.shape, np.float32)
    bad = vis.copy()
    bad[0, 1, 2, 0] = np.nan
    bad[1, 2, 0, 1] = complex(np.inf, 0)
    masked = flag.copy()
    masked[0, 1, 2, 0] = masked[1, 2, 0, 1] = True
    pt = np.ones((nt, nant, npol), np.complex128)
    pf = np.ones((nant, nf, npol), np.complex128)

    def bp(v, f):
        out = [np.zeros((npol, nbl, nf), t) for t in (np.complex128, float, float, np.int64)]
        return solvers.accumulate_bandpass(v, model, f, w, a1, a2, pt, *out)

    def gn(v, f):
        tb = np.zeros(nt, np.int64)
        out = [np.zeros((1, npol, nbl), t) for t in (np.complex128, float, float, np.int64)]
        return solvers.accumulate_gains(v, model, f, w, a1, a2, tb, pf, *out)

    def gen(v, f):
        tb, fb = np.zeros(nt, np.int64), np.zeros(nf, np.int64)
        out = [np.zeros((1, 1, npol, nbl), t) for t in (np.complex128, float, float, np.int64)]
        return solvers.accumulate(v, model, f, w, a1, a2, tb, fb, pt, pf, *out)

    for acc in (bp, gn, gen):
        got, want = acc(bad, flag), acc(vis, masked)   # NaN/inf == flagged
        for g, x in zip(got, want):
            assert np.all(np.isfinite(g)) and np.allclose(g, x)


def test_conversion_flags_nan_visibilities(tmp_path, sims, cluster):
    import h5py
    import numpy as np

    from contimg.convert import convert_group
    from contimg.io.ms import open_ms

    (a, _, _), _ = sims
    files = []
    for f in a.files:
        shutil.copy(f, tmp_path)
        files.append(str(tmp_path / Path(f).name))
    with h5py.File(files[1], "r+") as h:
        v = h["Data/visdata"]
        row = v[7]
        row[3, 0] = complex(np.nan, np.nan)
        v[7] = row
    ms = str(tmp_path / "x.ms")
    convert_group(cluster, files, ms, n_subbands=4).result()
    ds = open_ms(ms)
    vis, flag = ds.VISIBILITY.values, ds.FLAG.values
    assert np.isfinite(vis).all()
    assert flag.sum() == 1 and flag.any(axis=(0, 1))[:, 0].sum() == 1


def test_a_failed_solve_says_nan_visibilities_were_there(small_group, tmp_path):
    import numpy as np

    from contimg.calibrate import NoConvergenceError, solve_dataset
    from contimg.io.uvh5 import open_group

    cat = write_calibrator_catalog([small_group], tmp_path / "cal.csv")
    ds = open_group(small_group.files, n_subbands=4).compute()
    vis = ds.VISIBILITY.values
    vis[:, ::3, ::2] = np.nan                     # unflagged NaN in a sixth of the data
    with pytest.raises(NoConvergenceError, match="are NaN or inf"):
        # (a failure forced: the solve itself masks them)
        solve_dataset(ds, catalog=str(cat), min_converged=1.01)


# ---------------------------------------------------------------- item 13: small ones
def test_file_names_take_ascii_digits_only():
    from contimg import telescope as tel

    assert tel.parse_subband_filename("2026-02-03T09:00:00_sb01.hdf5").subband == 1
    for name in ("2026-02-03T09:00:00_sb\u0660\u0661.hdf5",      # Arabic-Indic 01
                 "\u0662026-02-03T09:00:00_sb01.hdf5"):
        with pytest.raises(ValueError, match="not a DSA-110 subband file name"):
            tel.parse_subband_filename(name)


# ---------------------------------------------------------------- item 12: backfill and the lock
def test_backfill_changes_nothing_while_a_stream_serves_the_output(tmp_path, capsys):
    from contimg.cli import main
    from contimg.stream import output_lock

    gid = "2026-02-03T09:00:00"
    db = _db_with_group(tmp_path, gid, "h:1", 0)
    db.transition(gid, "failed", reason="boom")
    (tmp_path / "in").mkdir()
    ms = tmp_path / "x.ms"
    ms.mkdir()
    held = output_lock(tmp_path / "out", "otherhost:42")      # a stream serves it
    try:
        base = ["--incoming", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                "--db", str(tmp_path / "db.sqlite3")]
        assert main(["backfill", *base, "--retry-failed"]) == 2
        assert db.group(gid)["state"] == "failed"             # nothing re-queued
        assert main(["backfill", *base, "--ms", str(ms)]) == 2
        err = capsys.readouterr().err
        assert err.count("already served by contimg stream (otherhost:42)") == 2
    finally:
        held.close()


def test_the_cli_refuses_an_empty_database_in_one_line(tmp_path, capsys):
    from contimg.cli import main

    (tmp_path / "db.sqlite3").write_bytes(b"")
    assert main(["status", "--db", str(tmp_path / "db.sqlite3")]) == 2
    err = capsys.readouterr().err
    assert "db.sqlite3: the state database is empty" in err and "Traceback" not in err


# ---------------------------------------------------------------- item 6: paths for workers
def test_paths_handed_to_workers_are_absolute_and_a_worker_never_creates_a_db(
        tmp_path, monkeypatch):
    from contimg import pipeline
    from contimg.state import DatabaseRefused

    monkeypatch.chdir(tmp_path)
    cfg = StreamConfig(incoming="in", output="out", db_path="db.sqlite3", n_subbands=4,
                       min_subbands=3)
    assert cfg.incoming == tmp_path / "in" and cfg.output == tmp_path / "out"
    assert cfg.db_path == tmp_path / "db.sqlite3"
    db = StateDB("db.sqlite3")
    assert db.path == tmp_path / "db.sqlite3"
    # a worker in another directory, handed a path that does not exist there: an error
    # naming it, not a second, empty database
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    with pytest.raises(DatabaseRefused, match="no such state database"):
        pipeline.stage_apply.__wrapped__("x.ms", db_path="db.sqlite3", t_mid=0.0)
    assert not (other / "db.sqlite3").exists()


# ---------------------------------------------------------------- item 14: exposure
def test_the_local_dashboard_listens_on_localhost_only():
    from distributed import LocalCluster

    from contimg.config import load_config

    addr = load_config(env={}).dask.dashboard_address
    assert addr.startswith("127.0.0.1:")
    with LocalCluster(n_workers=0, processes=False, dashboard_address=addr) as lc:
        socks = list(lc.scheduler.http_server._sockets.values())
        assert socks and all(s.getsockname()[0] == "127.0.0.1" for s in socks)


def test_contimg_stream_exits_non_zero_when_every_group_failed(tmp_path, sims, capsys):
    from contimg.cli import main

    (a, _, _), _ = sims
    inc = tmp_path / "in"
    inc.mkdir()
    shutil.copy(a.files[0], inc)                  # 1 of 4 subbands: failed by policy
    rc = main(["stream", "--incoming", str(inc), "--output", str(tmp_path / "out"), "--db",
               str(tmp_path / "db.sqlite3"), "--subbands", "4", "--min-subbands", "3",
               "--settle", "0.2", "--poll", "0.2", "--group-timeout", "1",
               "--bad-file-grace", "1", "--skip", "calibrate,apply,image", "--until-idle",
               "--timeout", "60"])
    assert rc == 1
    assert StateDB(tmp_path / "db.sqlite3").counts()["failed"] == 1
