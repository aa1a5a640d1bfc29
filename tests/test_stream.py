"""The streaming service on a real LocalCluster: policies, worker death, stream death.

Groups are small (10 antennas, 4 subbands x 8 channels, 6 integrations) so that each
test runs in seconds; the stages after flagging are skipped here unless a test is about
them (they have their own tests; ``test_stream_end_to_end`` runs them all).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from contimg.config import ImageConfig
from contimg.simulate import SimConfig, simulate_group
from contimg.state import StateDB
from contimg.stream import Stream, StreamConfig, housekeeping

CFG = SimConfig(n_ant=10, n_subbands=4, n_chan=8, n_times=6, rfi=None)
T0 = dt.datetime(2026, 1, 15, 8, 0, 0)
GROUP_S = 6 * 12.884901888  # a 6-integration group


@pytest.fixture(scope="module")
def sim_groups(tmp_path_factory):
    """Five small groups on disk (not in the incoming directory yet)."""
    root = tmp_path_factory.mktemp("stream_sim")
    return [simulate_group(root / f"g{i}", T0 + dt.timedelta(seconds=i * GROUP_S), cfg=CFG)
            for i in range(5)]


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, memory_limit="4GiB") as lc:
        with Client(lc, set_as_default=False) as client:
            yield client


def _cfg(tmp_path, **kw):
    base = dict(incoming=tmp_path / "in", output=tmp_path / "out",
                db_path=tmp_path / "db.sqlite3", n_subbands=4, min_subbands=3,
                settle_s=0.3, poll_s=0.2, bad_file_grace_s=1.5, group_timeout_s=4.0,
                skip=frozenset({"calibrate", "apply", "image"}), status_every_s=5)
    base.update(kw)
    return StreamConfig(**base)


def _leftover_temporaries(root):
    return [str(p) for p in Path(root).rglob("*") if ".tmp-" in p.name]


def test_policies_for_bad_late_duplicate_and_missing_files(tmp_path, sim_groups, cluster):
    """One stream run where every kind of bad arrival happens at once; each is handled by
    policy with a recorded reason, and the good groups are unaffected."""
    cfg = _cfg(tmp_path)
    inc = cfg.incoming
    inc.mkdir()
    g_ok, g_missing, g_corrupt, g_sparse, g_slow = sim_groups

    # g_ok arrives complete but in reverse subband order; a duplicate of its sb01 (a
    # second copy one second later in name) too
    for f in reversed(g_ok.files):
        shutil.copy(f, inc)
    name01 = Path(g_ok.files[1]).name
    ts = dt.datetime.strptime(name01[:19], "%Y-%m-%dT%H:%M:%S") + dt.timedelta(seconds=1)
    dup = inc / f"{ts:%Y-%m-%dT%H:%M:%S}_sb01.hdf5"
    shutil.copy(g_ok.files[1], dup)
    # g_missing: subband 02 never arrives (3 of 4: processed with it flagged)
    for f in g_missing.files:
        if not str(f).endswith("_sb02.hdf5"):
            shutil.copy(f, inc)
    # g_corrupt: subband 03 is truncated to half its size (never opens as HDF5)
    for f in g_corrupt.files:
        dst = inc / Path(f).name
        if str(f).endswith("_sb03.hdf5"):
            data = Path(f).read_bytes()
            dst.write_bytes(data[: len(data) // 2])
        else:
            shutil.copy(f, dst)
    # g_sparse: only 1 subband (below min_subbands: failed with the reason)
    shutil.copy(g_sparse.files[0], inc)

    # g_slow: written slowly, in pieces, while the stream runs
    def slow_writer():
        for f in g_slow.files:
            data = Path(f).read_bytes()
            dst = inc / Path(f).name
            with open(dst, "wb") as fh:
                for i in range(0, len(data), len(data) // 4 + 1):
                    fh.write(data[i:i + len(data) // 4 + 1])
                    fh.flush()
                    time.sleep(0.15)

    writer = threading.Thread(target=slow_writer)
    writer.start()
    stream = Stream(cfg, cluster)
    try:
        counts = stream.run(until_idle=True, timeout=240)
    finally:
        writer.join()
    db = stream.db
    states = {g["group_id"]: g for g in db.groups()}
    stamp = {id(g): Path(g.files[0]).name[:19] for g in sim_groups}

    def group_of(g):
        return next(s for gid, s in states.items()
                    if abs(s["t_start"] - dt.datetime.strptime(stamp[id(g)],
                           "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc).timestamp())
                    <= 60)

    assert counts == {"collecting": 0, "pending": 0, "in_progress": 0, "completed": 4,
                      "failed": 1}
    assert group_of(g_ok)["state"] == "completed" and group_of(g_ok)["n_present"] == 4
    assert group_of(g_slow)["state"] == "completed" and group_of(g_slow)["n_present"] == 4
    # the duplicate is recorded and ignored
    (d,) = db.files(status="duplicate")
    assert d["path"] == str(dup) and "already has subband 01" in d["reason"]
    # the missing subband: processed after the timeout, flagged, reason recorded
    gm = group_of(g_missing)
    assert gm["state"] == "completed" and gm["missing"] == [2]
    assert any("missing 02" in (e["reason"] or "") for e in db.events(gm["group_id"]))
    # the truncated file: bad, named, with the reason; its group processed without it
    (bad,) = db.files(status="bad")
    assert bad["path"].endswith("_sb03.hdf5") and "truncated or corrupt" in bad["reason"]
    gc = group_of(g_corrupt)
    assert gc["state"] == "completed" and gc["missing"] == [3]
    # too few subbands: failed by policy, with the reason
    gs = group_of(g_sparse)
    assert gs["state"] == "failed" and "1/4 subbands" in gs["error"] \
        and "at least 3" in gs["error"]
    # every completed group completed exactly once, with its MS registered once
    for gid, g in states.items():
        n = sum(1 for e in db.events(gid) if e["to_state"] == "completed")
        assert n == (1 if g["state"] == "completed" else 0), gid
    ms = db.measurement_sets()
    assert len(ms) == 4 and all(os.path.isdir(m["path"]) for m in ms)
    assert all(m["status"] == "flagged" for m in ms)
    # the missing subband's channels are flagged in the MS
    from contimg.io.ms import open_ms

    dsm = open_ms(next(m["path"] for m in ms if m["group_id"] == gm["group_id"]))
    import numpy as np

    from contimg.telescope import subband_frequencies

    sb2 = np.isin(np.round(dsm.frequency.values), np.round(subband_frequencies(2, 8)))
    assert sb2.sum() == 8
    flagged = dsm.FLAG.values.all(axis=(0, 1, 3))
    assert flagged[sb2].all() and not flagged[~sb2].any()
    assert _leftover_temporaries(cfg.output) == []
    # stage timings recorded for every completed group
    for gid, g in states.items():
        if g["state"] == "completed":
            stages = {t["stage"]: t["status"] for t in db.timings(gid)}
            assert stages["convert"] == "ok" and stages["flag"] == "ok"
            assert stages["image"] == "skipped"


def _worker_pids(client):
    return client.run(os.getpid)


def test_worker_killed_mid_group_completes_once(tmp_path, sim_groups, cluster):
    cfg = _cfg(tmp_path, in_flight=1)
    cfg.incoming.mkdir()
    for g in sim_groups[:2]:
        for f in g.files:
            shutil.copy(f, cfg.incoming)
    stream = Stream(cfg, cluster)
    killed = []

    def killer():
        # kill the worker that runs the first group's MS writer, while it runs
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for addr, keys in cluster.processing().items():
                if any(str(k).startswith("convert-") for k in keys):
                    pid = _worker_pids(cluster)[addr]
                    os.kill(pid, signal.SIGKILL)
                    killed.append((addr, pid))
                    return
            time.sleep(0.01)

    t = threading.Thread(target=killer)
    t.start()
    counts = stream.run(until_idle=True, timeout=300)
    t.join()
    assert killed, "never saw the writer task running"
    assert counts["completed"] == 2 and counts["failed"] == 0
    db = stream.db
    for g in db.groups():
        assert [e["to_state"] for e in db.events(g["group_id"])].count("completed") == 1
    assert len(db.measurement_sets()) == 2
    from contimg.io.ms import open_ms

    for m in db.measurement_sets():
        ds = open_ms(m["path"])
        assert ds.sizes["time"] == CFG.n_times and ds.sizes["frequency"] == 32
    assert _leftover_temporaries(cfg.output) == []
    # the cluster heals (the nanny restarts the worker) for the following tests
    cluster.wait_for_workers(2, timeout=60)


def _stream_cmd(tmp_path, *extra, skip="calibrate,apply,image"):
    return [sys.executable, "-m", "contimg.cli", "stream", "--incoming",
            str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--db",
            str(tmp_path / "db.sqlite3"), "--subbands", "4", "--min-subbands", "3",
            "--settle", "0.3", "--poll", "0.2", "--skip", skip, "--in-flight", "1", *extra]


# the kill test images (a small image) so that a group stays in progress for a while
# after its MS is written: the kill lands between the MS and the image products
_WITH_IMAGE = dict(skip="calibrate,apply")
_SMALL_IMAGE = ("--imsize", "256", "--cell", "20", "--niter", "20")


def test_stream_process_killed_and_restarted(tmp_path, sim_groups):
    """SIGKILL the whole stream (its LocalCluster included) while a group is in
    progress; a restart resumes it: every group completed exactly once, no duplicate
    product, nothing half-written left."""
    inc = tmp_path / "in"
    inc.mkdir()
    for g in sim_groups[:3]:
        for f in g.files:
            shutil.copy(f, inc)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log1 = open(tmp_path / "run1.log", "w")
    p = subprocess.Popen(_stream_cmd(tmp_path, *_SMALL_IMAGE, **_WITH_IMAGE), stdout=log1,
                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
    db = None
    victim = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and victim is None:
            time.sleep(0.05)
            if db is None and (tmp_path / "db.sqlite3").exists():
                try:
                    db = StateDB(tmp_path / "db.sqlite3")
                except Exception:  # noqa: BLE001 - being created
                    continue
            if db is not None:
                running = db.groups("in_progress")
                # mid-group: converted and flagged, imaging under way
                if running and any(t["stage"] == "flag" for t in
                                   db.timings(running[0]["group_id"])):
                    victim = running[0]["group_id"]
        assert victim, (tmp_path / "run1.log").read_text()[-3000:]
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert db.group(victim)["state"] == "in_progress"

    r = subprocess.run(_stream_cmd(tmp_path, "--until-idle", "--timeout", "400",
                                   *_SMALL_IMAGE, **_WITH_IMAGE),
                       capture_output=True, text=True, env=env, timeout=450)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "3 group(s) completed" in r.stdout or db.counts()["completed"] == 3
    db = StateDB(tmp_path / "db.sqlite3")
    assert db.counts() == {"collecting": 0, "pending": 0, "in_progress": 0,
                           "completed": 3, "failed": 0}
    for g in db.groups():
        ev = [e["to_state"] for e in db.events(g["group_id"])]
        assert ev.count("completed") == 1, (g["group_id"], ev)
    ev = db.events(victim)
    assert any(e["to_state"] == "pending" and "resumed" in (e["reason"] or "") for e in ev)
    assert db.group(victim)["retries"] == 0     # a dead stream is not the group's fault
    ms = db.measurement_sets()
    assert len(ms) == 3 and len({m["path"] for m in ms}) == 3
    assert sorted(p.name for p in (tmp_path / "out" / "ms").glob("*.ms")) == sorted(
        Path(m["path"]).name for m in ms)
    assert _leftover_temporaries(tmp_path / "out") == []
    assert "resumed" in r.stderr    # the operator sees it in the log
    images = db.images()            # one image per group, each registered once
    assert sorted(im["group_id"] for im in images) == sorted(g["group_id"]
                                                              for g in db.groups())
    assert all(os.path.exists(im["path"]) for im in images)


def test_one_stream_per_output_and_housekeeping(tmp_path, sim_groups, cluster):
    from contimg.stream import StreamBusy

    cfg = _cfg(tmp_path)
    s1 = Stream(cfg, cluster)
    s1._acquire_lock()
    try:
        with pytest.raises(StreamBusy, match="already served"):
            Stream(cfg, cluster).run(until_idle=True)
    finally:
        s1._release_lock()
    db = s1.db
    # a group left in progress by a process that no longer exists, a stale collecting
    # group, a temporary MS of the dead process's group, and a fresh one of no group
    for gid, t in (("2026-01-15T09:00:00", 1.0), ("2026-01-15T10:00:00", 2.0)):
        db.add_file(f"/x/{gid}_sb00.hdf5", subband=0, timestamp=t, group_id=gid,
                    t_start=t, n_expected=4)
    db.set_file_status("/x/2026-01-15T09:00:00_sb00.hdf5", "ready")
    db.transition("2026-01-15T09:00:00", "pending")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = os.uname().nodename
    db.claim("2026-01-15T09:00:00", owner=f"{host}:{dead.pid}")
    db.query("UPDATE groups SET created_at = created_at - 7200 WHERE group_id=?",
             ("2026-01-15T10:00:00",))
    tmp_ms = cfg.output / "ms" / f"2026-01-15T09:00:00.ms.tmp-{dead.pid}"   # its group's
    tmp_ms.mkdir(parents=True)
    live_tmp = cfg.output / "ms" / f"y.ms.tmp-{os.getpid()}"
    live_tmp.mkdir()
    rep = housekeeping(db, output=cfg.output, collecting_timeout_s=3600)
    assert rep["resumed"] == ["2026-01-15T09:00:00"]
    assert rep["expired"] == ["2026-01-15T10:00:00"]
    assert rep["removed"] == [str(tmp_ms)] and live_tmp.exists()
    assert db.group("2026-01-15T09:00:00")["state"] == "pending"
    g = db.group("2026-01-15T10:00:00")
    assert g["state"] == "failed" and "still collecting after 120 min" in g["error"]


def test_status_and_backfill_cli(tmp_path, sim_groups):
    """``contimg backfill`` processes what is on disk; ``contimg status`` shows it."""
    inc = tmp_path / "in"
    inc.mkdir()
    for f in sim_groups[0].files[:3]:     # an incomplete group: backfill does not wait
        shutil.copy(f, inc)
    base = ["--incoming", str(inc), "--output", str(tmp_path / "out"), "--db",
            str(tmp_path / "db.sqlite3"), "--subbands", "4", "--min-subbands", "3",
            "--skip", "calibrate,apply,image"]
    r = subprocess.run([sys.executable, "-m", "contimg.cli", "backfill", *base],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 group(s) completed, 0 failed" in r.stdout
    r = subprocess.run([sys.executable, "-m", "contimg.cli", "status", "--db",
                        str(tmp_path / "db.sqlite3")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "completed 1" in r.stdout and "3/4" in r.stdout and "convert=" in r.stdout
    assert "missing 03" in r.stdout   # the reason it was processed incomplete
    r = subprocess.run([sys.executable, "-m", "contimg.cli", "status", "--db",
                        str(tmp_path / "nope.sqlite3")], capture_output=True, text=True)
    assert r.returncode == 2 and "no state database" in r.stderr


def test_sigterm_stops_cleanly_and_the_group_resumes(tmp_path, sim_groups):
    """SIGTERM (systemd stop): the stream stops after the stage in progress, re-queues
    the group with the reason, exits 0; the next run completes it, once."""
    inc = tmp_path / "in"
    inc.mkdir()
    for f in sim_groups[0].files:
        shutil.copy(f, inc)
    p = subprocess.Popen(_stream_cmd(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        db = None
        while time.time() < deadline:
            time.sleep(0.05)
            try:
                db = db or StateDB(tmp_path / "db.sqlite3")
            except Exception:  # noqa: BLE001 - being created
                continue
            if db.groups("in_progress"):
                break
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, out[-3000:]
    assert "finishing" in out
    (g,) = db.groups()
    assert g["state"] in ("pending", "completed"), g   # completed if the stop came late
    if g["state"] == "pending":
        assert "interrupted by stop" in g["error"]
    r = subprocess.run(_stream_cmd(tmp_path, "--until-idle"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [e["to_state"] for e in db.events(g["group_id"])].count("completed") == 1
    assert _leftover_temporaries(tmp_path / "out") == []


def test_backfill_stages_on_an_existing_ms(tmp_path, sim_groups):
    """``contimg backfill --ms``: the stages after conversion run on an MS made
    elsewhere, and it is registered with its flag fraction."""
    from contimg.io.ms import write_ms
    from contimg.io.uvh5 import open_group

    ms = tmp_path / "x.ms"
    write_ms(open_group(sim_groups[1].files, n_subbands=4), ms)
    r = subprocess.run([sys.executable, "-m", "contimg.cli", "backfill", "--incoming",
                        str(tmp_path / "none"), "--output", str(tmp_path / "out"), "--db",
                        str(tmp_path / "db.sqlite3"), "--skip", "calibrate,apply,image",
                        "--ms", str(ms)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "flag ok" in r.stdout and "image skipped" in r.stdout
    (m,) = StateDB(tmp_path / "db.sqlite3").measurement_sets()
    assert m["path"] == str(ms) and m["status"] == "flagged" and m["flagged_fraction"] >= 0
    assert (tmp_path / "x.ms.flag_summary.json").exists()


def test_a_failed_stage_is_retried_from_that_stage(tmp_path, sim_groups, cluster):
    """The image stage fails twice, each time after it opened the MS through dask-ms.
    The second attempt keeps the first one's MS, flags and calibration and only re-runs
    the image; the third (the last allowed) starts again from the raw files, re-writing
    the MS in worker processes where the failed stages had it open. The group completes
    once, and no worker keeps a table of the MS open afterwards."""
    marker = tmp_path / "failures"

    def install(marker, fails):
        import contimg.imaging as im

        orig = getattr(im, "_unpatched_image_ms", im.image_ms)
        im._unpatched_image_ms = orig

        def flaky(ms_path, prefix, **kw):
            from contimg.io.ms import open_ms

            ds = open_ms(ms_path)                     # held by this frame when it fails
            ds.VISIBILITY.data[:1].compute()
            with open(marker, "a") as f:
                f.write("x")
            if os.path.getsize(marker) <= fails:
                raise RuntimeError(f"injected failure in {ms_path}")
            return orig(ms_path, prefix, **kw)

        im.image_ms = flaky

    def uninstall():
        import contimg.imaging as im

        im.image_ms = getattr(im, "_unpatched_image_ms", im.image_ms)

    def open_tables(path):
        from contimg.pipeline import open_tables

        return open_tables(path)

    cfg = _cfg(tmp_path, in_flight=1, max_retries=2, skip=frozenset({"calibrate", "apply"}),
               image=ImageConfig(npix=256, cell_arcsec=20.0, niter=20))
    cfg.incoming.mkdir()
    for f in sim_groups[0].files:
        shutil.copy(f, cfg.incoming)
    cluster.run(install, str(marker), 2)
    try:
        stream = Stream(cfg, cluster)
        counts = stream.run(until_idle=True, timeout=300)
    finally:
        cluster.run(uninstall)
    assert counts["completed"] == 1 and counts["failed"] == 0, stream.db.groups()
    db = stream.db
    (g,) = db.groups()
    assert g["retries"] == 2 and g["attempts"] == 3
    rec = {(r["attempt"], r["stage"]): r for r in db.timings(g["group_id"])}
    assert rec[1, "image"]["status"] == "failed"
    assert "RuntimeError: injected failure" in rec[1, "image"]["detail"]
    # attempt 2 resumed at the image: convert and flag carried over, not re-run
    for stage in ("convert", "flag"):
        assert rec[2, stage]["status"] == "ok" and rec[2, stage]["seconds"] == 0.0
        assert '"reused_from_attempt": 1' in rec[2, stage]["detail"]
    assert rec[2, "image"]["status"] == "failed"
    # attempt 3, the last allowed, re-converted and then imaged
    assert rec[3, "convert"]["seconds"] > 0 and "reused" not in rec[3, "convert"]["detail"]
    assert rec[3, "image"]["status"] == "ok"
    assert marker.stat().st_size == 3
    (img,) = db.images()
    assert Path(img["path"]).exists()
    ms = db.measurement_sets()[0]["path"]
    assert all(v == [] for v in cluster.run(open_tables, ms).values())
    assert _leftover_temporaries(cfg.output) == []
