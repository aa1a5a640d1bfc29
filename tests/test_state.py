"""The SQLite state database: schema, atomic transitions, registries."""

import multiprocessing as mp
import sqlite3

import pytest

from contimg.state import SCHEMA_VERSION, StateDB, StateError, default_db_path
from kernels.constants import SECONDS_PER_DAY


def _db(tmp_path):
    return StateDB(tmp_path / "db" / "pipeline.sqlite3")


def _add_group(db, gid="2026-01-15T08:00:00", t=1768464000.0, n=2):
    for sb in range(n):
        db.add_file(f"/in/{gid}_sb{sb:02d}.hdf5", subband=sb, timestamp=t, group_id=gid,
                    t_start=t, n_expected=n)
    return gid


def test_schema_wal_and_foreign_keys(tmp_path):
    db = _db(tmp_path)
    assert db.version == SCHEMA_VERSION
    assert db.query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
    assert db.query("PRAGMA foreign_keys")[0]["foreign_keys"] == 1
    with pytest.raises(sqlite3.IntegrityError):
        db.record_stage("no-such-group", 1, "convert", "ok", 1.0)
    # reopening does not migrate again or lose data
    _add_group(db)
    db.close()
    db2 = _db(tmp_path)
    assert db2.version == SCHEMA_VERSION and len(db2.groups()) == 1


def test_newer_schema_is_refused(tmp_path):
    db = _db(tmp_path)
    db.query(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StateError, match="newer than this contimg"):
        _db(tmp_path)


def test_two_processes_opening_a_new_database_migrate_once(monkeypatch, tmp_path):
    """A process that read the schema version before another one migrated (both opened
    the new database at once: the stream and `contimg status`) does not migrate again."""
    StateDB(tmp_path / "db.sqlite3").close()
    monkeypatch.setattr(StateDB, "version", property(lambda self: 0))   # the stale read
    db = StateDB(tmp_path / "db.sqlite3")
    assert db.query("PRAGMA user_version")[0]["user_version"] == SCHEMA_VERSION


def test_default_path_honours_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PIPELINE_DB", raising=False)
    monkeypatch.setenv("PIPELINE_STATE_DIR", str(tmp_path / "st"))
    assert default_db_path() == tmp_path / "st" / "db" / "pipeline.sqlite3"
    monkeypatch.setenv("PIPELINE_DB", str(tmp_path / "x.sqlite3"))
    assert default_db_path() == tmp_path / "x.sqlite3"


def test_files_and_group_lifecycle(tmp_path):
    db = _db(tmp_path)
    gid = _add_group(db)
    assert not db.add_file("/in/2026-01-15T08:00:00_sb00.hdf5", subband=0, timestamp=0,
                           group_id=gid, t_start=0, n_expected=2)   # already known
    assert db.group(gid)["state"] == "collecting" and db.group(gid)["n_present"] == 0
    for f in db.files(gid):
        db.set_file_status(f["path"], "ready", size=10)
    assert db.group(gid)["n_present"] == 2
    assert db.transition(gid, "pending", expect="collecting")
    assert not db.transition(gid, "pending", expect="collecting")  # already moved
    g = db.claim(gid, owner="a:1")
    assert g["state"] == "in_progress" and g["owner"] == "a:1" and g["attempts"] == 1
    assert db.claim(gid, owner="b:2") is None
    with pytest.raises(StateError, match="illegal transition in_progress -> collecting"):
        db.transition(gid, "collecting")
    assert db.transition(gid, "pending", expect="in_progress", reason="boom",
                         retries=1)
    assert db.group(gid)["error"] == "boom"
    assert db.claim(gid, owner="a:1")["attempts"] == 2
    db.record_stage(gid, 2, "convert", "ok", 1.5)
    db.record_stage(gid, 2, "convert", "ok", 1.25)  # re-recorded, not duplicated
    assert [t["seconds"] for t in db.timings(gid)] == [1.25]
    assert db.transition(gid, "completed", expect="in_progress")
    g = db.group(gid)
    assert g["state"] == "completed" and g["finished_at"] >= g["started_at"]
    assert [(e["from_state"], e["to_state"]) for e in db.events(gid)] == [
        ("collecting", "pending"), ("pending", "in_progress"), ("in_progress", "pending"),
        ("pending", "in_progress"), ("in_progress", "completed")]
    assert db.counts()["completed"] == 1


def _claim_worker(path, gid, q):
    db = StateDB(path)
    q.put(db.claim(gid, owner=f"p:{mp.current_process().pid}") is not None)


def test_concurrent_claims_one_winner(tmp_path):
    db = _db(tmp_path)
    gid = _add_group(db)
    db.transition(gid, "pending")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim_worker, args=(db.path, gid, q)) for _ in range(4)]
    for p in procs:
        p.start()
    wins = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert sorted(wins) == [False, False, False, True]
    assert [e["to_state"] for e in db.events(gid)].count("in_progress") == 1


def test_products_are_upserted_not_duplicated(tmp_path):
    db = _db(tmp_path)
    gid = _add_group(db)
    db.register_ms("/out/a.ms", group_id=gid, nbytes=1)
    db.register_ms("/out/a.ms", group_id=gid, flagged_fraction=0.1, status="flagged")
    (ms,) = db.measurement_sets()
    assert ms["nbytes"] == 1 and ms["flagged_fraction"] == 0.1 and ms["status"] == "flagged"
    db.register_image("/out/a-image.fits", group_id=gid, noise_jy=1e-3,
                      beam={"bmaj_deg": 0.01})
    db.register_image("/out/a-image.fits", group_id=gid, noise_jy=2e-3)
    (im,) = db.images(gid)
    assert im["noise_jy"] == 2e-3
    sid = db.add_source("S1", 10.0, 70.0)
    assert db.add_source("S1", 10.0, 70.0) == sid
    db.add_photometry(sid, "/out/a-image.fits", t_mid=1.0, flux_jy=1.0, err_jy=0.1)
    db.add_photometry(sid, "/out/a-image.fits", t_mid=1.0, flux_jy=1.1, err_jy=0.1)
    assert [p["flux_jy"] for p in db.query("SELECT * FROM photometry")] == [1.1]


def test_calibration_set_selection(tmp_path):
    db = _db(tmp_path)
    tabs = {}
    for k in ("B", "G"):
        p = tmp_path / f"cal.{k}"
        p.mkdir()
        tabs[k] = str(p)
    day = SECONDS_PER_DAY
    t0 = 1768464000.0
    with pytest.raises(ValueError, match="needs t_transit"):
        db.register_calset("x", tables=tabs)
    with pytest.raises(ValueError, match="not found"):
        db.register_calset("x", t_transit=t0, tables={"B": str(tmp_path / "nope")})
    a = db.register_calset("a", t_transit=t0, tables=tabs, refant=3, calibrator="3C286",
                           quality={"chi2": 1.02})
    b = db.register_calset("b", t_transit=t0 + 6 * 3600, tables=tabs)
    r = db.register_calset("r", t_transit=t0 + 1, status="rejected",
                           reason="no calibrator in the beam")
    assert r not in (a, b)
    # nearest transit among the sets whose ±12 h window covers t
    assert db.find_calset(t0 + 100)["id"] == a
    assert db.find_calset(t0 + 5 * 3600)["id"] == b
    got = db.find_calset(t0 + 2 * day)     # no window covers it: nearest, flagged
    assert got["id"] == b and got["in_window"] is False
    assert db.find_calset(t0 - 3600)["in_window"] is True
    assert db.find_calset(t0)["refant"] == 3 and db.find_calset(t0)["quality"]["chi2"] == 1.02
    assert [c["name"] for c in db.list_calsets("rejected")] == ["r"]
    empty = StateDB(tmp_path / "other.sqlite3")
    empty.register_calset("r", t_transit=t0, status="rejected", reason="diverged")
    assert empty.find_calset(t0) is None


def test_calibrations_under_way(tmp_path):
    db = _db(tmp_path)
    a = _add_group(db, "2026-01-15T08:00:00", 1000.0)
    b = _add_group(db, "2026-01-15T08:05:00", 1300.0)
    for gid in (a, b):
        db.transition(gid, "pending")
        db.claim(gid, owner="x:1")
    assert db.calibrations_under_way(1000.0, exclude=a) == []      # unknown: no wait
    db.annotate_group(b, has_calibrator=True)
    assert db.calibrations_under_way(1000.0, exclude=a) == [b]
    assert db.calibrations_under_way(1000.0 + 13 * 3600, exclude=a) == []   # too far
    db.record_stage(b, 1, "calibrate", "ok", 1.0)                 # solved: no more wait
    assert db.calibrations_under_way(1000.0, exclude=a) == []
