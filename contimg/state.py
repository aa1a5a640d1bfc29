"""The pipeline's state database (SQLite).

One file holds everything the streaming service knows: the HDF5 subband files it has
seen, the groups they form (the ingest queue), the Measurement Sets, calibration sets,
images and photometry it produced, the sources it measures, and the time every stage
took. Its path comes from ``PIPELINE_DB`` (default ``state/db/pipeline.sqlite3`` under
``PIPELINE_STATE_DIR`` or the working directory).

* WAL journal, foreign keys on, a busy timeout so several processes (the stream, the
  CLI, a Dask worker registering a calibration set) can share it.
* The schema and its migrations are ``MIGRATIONS`` (``contimg.migrations``); ``PRAGMA user_version``
  is the schema version. Opening an older database migrates it in one transaction.
* Every group transition is one ``UPDATE ... WHERE state = <expected>`` inside a
  ``BEGIN IMMEDIATE`` transaction, so two processes can never both claim a group, and
  each transition is also logged in ``group_events`` (which tests use to prove that a
  group completed exactly once).

Group states::

    collecting ──(all subbands ready, or timeout by policy)──> pending
    pending ──claim──> in_progress ──> completed
                            │  └─────> failed           (retries exhausted / bad input)
                            └─(error, retries left; or owner died)──> pending
    collecting ──(timeout, policy "fail")──> failed
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

GROUP_STATES = ("collecting", "pending", "in_progress", "completed", "failed")

# (from_state, to_state) pairs that are legal
_TRANSITIONS = {
    ("collecting", "pending"), ("collecting", "failed"),
    ("pending", "in_progress"), ("pending", "failed"),
    ("in_progress", "completed"), ("in_progress", "failed"), ("in_progress", "pending"),
    ("failed", "pending"),      # operator reprocess / backfill
    ("completed", "pending"),   # operator reprocess
}

from contimg.migrations import MIGRATIONS  # noqa: E402 - the schema, in one place

SCHEMA_VERSION = len(MIGRATIONS)


class StateError(RuntimeError):
    """An illegal or lost state transition."""


class DatabaseRefused(StateError, OSError):
    """The state database is missing, empty or damaged, and will not be used (an
    OSError too: the CLI reports it in one line, naming the database)."""


def default_db_path() -> Path:
    """The configured state database (:mod:`contimg.config`): ``$PIPELINE_DB``, else
    ``$PIPELINE_STATE_DIR/db/pipeline.sqlite3``, else ``state/db/pipeline.sqlite3``
    under the working directory (or what a configuration file says)."""
    from contimg.config import current

    return current().paths.db


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _row(cur, row):
    return {d[0]: row[i] for i, d in enumerate(cur.description)}


_JSON_COLS = {"tables", "params", "quality", "products", "beam", "missing", "evidence",
              "qa"}


def _decode(d: dict | None) -> dict | None:
    if d is None:
        return None
    for k in _JSON_COLS & d.keys():
        if isinstance(d[k], str):
            d[k] = json.loads(d[k])
    return d


class StateDB:
    """A connection to the state database; safe to share between threads of one
    process (one connection, serialised by a lock). Create one per process."""

    def __init__(self, path: str | os.PathLike | None = None, *, timeout: float = 30.0,
                 create: bool = True):
        """``create=False``: the database must exist already (a Dask worker, handed
        the path, never creates a second database somewhere else). An existing file of
        zero bytes is refused (a truncated database would otherwise start from scratch
        and everything be reprocessed and overwritten)."""
        # absolute: the path is handed to Dask workers, which may run elsewhere
        self.path = (Path(path) if path is not None else default_db_path()).absolute()
        self._lock = threading.RLock()
        if not self.path.exists():
            if not create:
                raise DatabaseRefused(f"{self.path}: no such state database (only the stream "
                                 "or the CLI creates one; is the path right?)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            for _ in range(20):       # (another process may be creating it this instant)
                if self.path.stat().st_size > 0:
                    break
                time.sleep(0.1)
            else:
                raise DatabaseRefused(f"{self.path}: the state database is empty (0 bytes; "
                                 "truncated?); refusing to start from scratch, which would "
                                 "reprocess and overwrite everything: restore it from a "
                                 "backup, or move it away to start afresh")
        try:
            with self._named():
                self._con = sqlite3.connect(str(self.path), timeout=timeout,
                                            isolation_level=None, check_same_thread=False)
                self._con.row_factory = _row
                self._con.execute("PRAGMA journal_mode=WAL")
                self._con.execute("PRAGMA foreign_keys=ON")
                self._con.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
                self._con.execute("PRAGMA synchronous=NORMAL")
                self.migrate()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise
            raise DatabaseRefused(f"{exc}: not a usable state database; refusing to start: "
                             "restore it from a backup and start again") from exc

    @contextmanager
    def _named(self):
        """SQLite errors name the database they are about (same type, path first)."""
        try:
            yield
        except sqlite3.Error as exc:
            if str(self.path) in str(exc):
                raise
            raise type(exc)(f"{self.path}: {exc}") from exc

    def check_integrity(self):
        """``PRAGMA quick_check``; raise :class:`StateError` naming the database and its
        first problems unless it is sound (the stream refuses to start on a damaged
        database rather than make it worse)."""
        try:
            with self._lock, self._named():
                rows = [next(iter(r.values())) for r in
                        self._con.execute("PRAGMA quick_check(20)").fetchall()]
        except sqlite3.DatabaseError as exc:
            rows = [str(exc)]
        if rows != ["ok"]:
            raise DatabaseRefused(f"{self.path}: the state database is damaged "
                             f"({'; '.join(rows[:5])}); refusing to start: restore it from a "
                             "backup (or try sqlite3's .recover) and start again")

    # ------------------------------------------------------------------ plumbing
    def close(self):
        with self._lock:
            self._con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):   # pickled to a Dask worker: reopen there by path
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"], create=False)

    @contextmanager
    def transaction(self):
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (rollback on error); yields the connection."""
        with self._lock, self._named():
            self._con.execute("BEGIN IMMEDIATE")
            try:
                yield self._con
            except BaseException:
                if self._con.in_transaction:
                    self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")

    def query(self, sql, params=()) -> list[dict]:
        with self._lock, self._named():
            return [_decode(r) for r in self._con.execute(sql, params).fetchall()]

    @property
    def version(self) -> int:
        with self._lock:
            return self._con.execute("PRAGMA user_version").fetchone()["user_version"]

    def migrate(self):
        """Bring the schema to ``SCHEMA_VERSION``; one transaction per migration. Foreign
        keys are off meanwhile (a migration may rebuild a table others refer to, as
        SQLite's ALTER TABLE procedure does) and checked after."""
        with self._lock:
            v = self.version
            if v > SCHEMA_VERSION:
                raise StateError(f"{self.path}: schema version {v} is newer than this "
                                 f"contimg ({SCHEMA_VERSION}); upgrade contimg")
            if v == SCHEMA_VERSION:
                return
            self._con.execute("PRAGMA foreign_keys=OFF")
            try:
                for i in range(v, SCHEMA_VERSION):
                    with self.transaction() as con:
                        # the write lock is ours now: another process opening the same
                        # new database may have migrated it since ``v`` was read
                        if con.execute("PRAGMA user_version").fetchone()["user_version"] > i:
                            continue
                        log.info("%s: migrating schema %d -> %d", self.path, i, i + 1)
                        for stmt in MIGRATIONS[i].split(";"):
                            if stmt.strip():
                                con.execute(stmt)
                        bad = con.execute("PRAGMA foreign_key_check").fetchall()
                        if bad:
                            raise StateError(f"{self.path}: migration {i + 1} breaks "
                                             f"foreign keys: {bad[:5]}")
                        con.execute(f"PRAGMA user_version={i + 1}")
            finally:
                self._con.execute("PRAGMA foreign_keys=ON")

    # ------------------------------------------------------------------ files and groups
    def add_file(self, path, *, subband: int, timestamp: float, group_id: str,
                 t_start: float, n_expected: int, size: int | None = None,
                 status: str = "seen", reason: str | None = None) -> bool:
        """Record a newly seen subband file in its group (created if new). Returns
        False when the path was already known."""
        now = time.time()
        with self.transaction() as con:
            if con.execute("SELECT 1 FROM hdf5_files WHERE path=?", (str(path),)).fetchone():
                return False
            con.execute(
                "INSERT INTO groups (group_id, t_start, n_expected, created_at, updated_at) "
                "VALUES (?,?,?,?,?) ON CONFLICT(group_id) DO NOTHING",
                (group_id, t_start, n_expected, now, now))
            con.execute(
                "INSERT INTO hdf5_files (path, group_id, subband, timestamp, size, status, "
                "reason, first_seen) VALUES (?,?,?,?,?,?,?,?)",
                (str(path), group_id, subband, timestamp, size, status, reason, now))
            return True

    def set_file_status(self, path, status: str, *, size=None, reason=None):
        now = time.time()
        with self.transaction() as con:
            con.execute("UPDATE hdf5_files SET status=?, size=COALESCE(?, size), reason=?, "
                        "ready_at=CASE WHEN ?='ready' THEN ? ELSE ready_at END WHERE path=?",
                        (status, size, reason, status, now, str(path)))
            g = con.execute("SELECT group_id FROM hdf5_files WHERE path=?",
                            (str(path),)).fetchone()
            if g and g["group_id"]:
                n = con.execute("SELECT COUNT(DISTINCT subband) AS n FROM hdf5_files "
                                "WHERE group_id=? AND status='ready'",
                                (g["group_id"],)).fetchone()["n"]
                con.execute("UPDATE groups SET n_present=?, updated_at=? WHERE group_id=?",
                            (n, now, g["group_id"]))

    def files(self, group_id=None, status=None) -> list[dict]:
        sql, args = "SELECT * FROM hdf5_files WHERE 1=1", []
        if group_id is not None:
            sql += " AND group_id=?"
            args.append(group_id)
        if status is not None:
            sql += " AND status=?"
            args.append(status)
        return self.query(sql + " ORDER BY subband, path", args)

    def group(self, group_id) -> dict | None:
        """The group ``group_id`` (or a former name of it, see :meth:`rename_group`)."""
        r = self.query("SELECT * FROM groups WHERE group_id=?", (group_id,))
        if not r:
            r = self.query("SELECT g.* FROM groups g JOIN group_aliases a "
                           "ON a.group_id = g.group_id WHERE a.alias=?", (group_id,))
        return r[0] if r else None

    def rename_group(self, old: str, new: str, *, t_start: float) -> bool:
        """Rename a *collecting* group (an earlier subband arrived after it was registered
        under a later file's name: its id becomes the earliest timestamp, its products'
        name). Every row that refers to it follows; ``old`` stays an alias; an event
        records it. False if the group is no longer collecting (left as it is)."""
        now = time.time()
        with self.transaction() as con:
            if con.execute("SELECT 1 FROM groups WHERE group_id=?", (new,)).fetchone():
                raise StateError(f"{self.path}: cannot rename group {old} to {new}: "
                                 f"a group {new} exists")
            con.execute("PRAGMA defer_foreign_keys=ON")   # until COMMIT (reset there)
            if not con.execute("UPDATE groups SET group_id=?, t_start=?, updated_at=? "
                               "WHERE group_id=? AND state='collecting'",
                               (new, t_start, now, old)).rowcount:
                return False
            tables = [r["name"] for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type='table'").fetchall()]
            for table in tables:
                for fk in con.execute(f"PRAGMA foreign_key_list({table})").fetchall():
                    if fk["table"] == "groups":
                        con.execute(f"UPDATE {table} SET {fk['from']}=? WHERE {fk['from']}=?",
                                    (new, old))
            con.execute("INSERT INTO group_aliases (alias, group_id, renamed_at) "
                        "VALUES (?,?,?)", (old, new, now))
            con.execute("INSERT INTO group_events (group_id, from_state, to_state, at, "
                        "owner, reason) VALUES (?,?,?,?,?,?)",
                        (new, "collecting", "collecting", now, owner_id(),
                         f"renamed from {old}: an earlier subband arrived"))
        log.info("group %s renamed %s (its earliest subband's timestamp)", old, new)
        return True

    def groups(self, state=None, limit=None) -> list[dict]:
        sql, args = "SELECT * FROM groups", []
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args += states
        sql += " ORDER BY t_start"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self.query(sql, args)

    def find_group(self, t: float, tolerance_s: float) -> dict | None:
        """The group whose start is nearest to ``t`` within ``tolerance_s``."""
        r = self.query("SELECT * FROM groups WHERE ABS(t_start - ?) <= ? "
                       "ORDER BY ABS(t_start - ?) LIMIT 1", (t, tolerance_s, t))
        return r[0] if r else None

    def transition(self, group_id, to_state: str, *, expect: str | tuple | None = None,
                   reason: str | None = None, **fields) -> bool:
        """Move ``group_id`` to ``to_state`` if it is currently in ``expect`` (one of
        them); atomically, with an event logged. Returns False (nothing changed) when the
        group is not in an expected state."""
        if to_state not in GROUP_STATES:
            raise StateError(f"unknown group state {to_state!r}")
        now = time.time()
        with self.transaction() as con:
            row = con.execute("SELECT state FROM groups WHERE group_id=?",
                              (group_id,)).fetchone()
            if row is None:
                raise StateError(f"group {group_id}: not in the state database")
            cur = row["state"]
            allowed = (expect,) if isinstance(expect, str) else expect
            if allowed is not None and cur not in allowed:
                return False
            if (cur, to_state) not in _TRANSITIONS:
                raise StateError(f"group {group_id}: illegal transition {cur} -> {to_state}")
            sets = {"state": to_state, "updated_at": now, **fields}
            if to_state == "in_progress":
                sets.setdefault("started_at", now)
            if to_state in ("completed", "failed"):
                sets.setdefault("finished_at", now)
            if to_state == "failed" or reason is not None and to_state != "completed":
                sets.setdefault("error", reason)
            for k in ("missing",):
                if k in sets and not isinstance(sets[k], (str, type(None))):
                    sets[k] = json.dumps(sets[k])
            cols = ", ".join(f"{k}=?" for k in sets)
            n = con.execute(f"UPDATE groups SET {cols} WHERE group_id=? AND state=?",
                            (*sets.values(), group_id, cur)).rowcount
            if n != 1:
                return False
            con.execute("INSERT INTO group_events (group_id, from_state, to_state, at, owner, "
                        "reason) VALUES (?,?,?,?,?,?)",
                        (group_id, cur, to_state, now, fields.get("owner"), reason))
        log.debug("group %s: %s -> %s%s", group_id, cur, to_state,
                  f" ({reason})" if reason else "")
        return True

    def requeue(self, group_id, *, reason: str) -> bool:
        """A completed or failed group back to pending with its retries reset: what
        ``contimg backfill --group`` and the operator app's Reprocess do. False (nothing
        changed) when the group is in another state; StateError if it is unknown."""
        if self.group(group_id) is None:
            raise StateError(f"group {group_id}: not in the state database")
        return self.transition(group_id, "pending", expect=("completed", "failed"),
                               retries=0, reason=reason)

    def claim(self, group_id, owner: str | None = None) -> dict | None:
        """pending → in_progress for this process; the group row, or None if someone
        else has it (or it is no longer pending)."""
        owner = owner or owner_id()
        now = time.time()
        with self._lock:
            attempts = self.group(group_id)["attempts"]
            ok = self.transition(group_id, "in_progress", expect="pending", owner=owner,
                                 heartbeat=now, started_at=now, attempts=attempts + 1,
                                 error=None)
        return self.group(group_id) if ok else None

    def annotate_group(self, group_id, *, has_calibrator: bool | None):
        """Record facts learnt about a group while processing it (no state change)."""
        with self.transaction() as con:
            con.execute("UPDATE groups SET has_calibrator=?, updated_at=? WHERE group_id=?",
                        (None if has_calibrator is None else int(has_calibrator),
                         time.time(), group_id))

    def calibrations_under_way(self, t_unix: float, *, exclude=None,
                               window_s: float = 12 * 3600) -> list[str]:
        """In-progress groups within ``window_s`` of ``t_unix`` that have a calibrator
        transit and have not finished their calibrate stage yet (this attempt)."""
        rows = self.query(
            "SELECT g.group_id FROM groups g WHERE g.has_calibrator = 1 AND "
            "g.state = 'in_progress' AND g.group_id != ? AND ABS(g.t_start - ?) <= ? AND "
            "NOT EXISTS (SELECT 1 FROM stage_timings s WHERE s.group_id = g.group_id AND "
            "s.attempt = g.attempts AND s.stage = 'calibrate')",
            (exclude or "", t_unix, window_s))
        return [r["group_id"] for r in rows]

    def next_pending(self, limit: int = 1) -> list[dict]:
        return self.groups("pending", limit=limit)

    def heartbeat(self, group_ids, owner: str | None = None):
        owner = owner or owner_id()
        ids = list(group_ids)
        if not ids:
            return
        with self.transaction() as con:
            con.execute(f"UPDATE groups SET heartbeat=? WHERE owner=? AND state='in_progress' "
                        f"AND group_id IN ({','.join('?' * len(ids))})",
                        (time.time(), owner, *ids))

    def events(self, group_id=None) -> list[dict]:
        if group_id is None:
            return self.query("SELECT * FROM group_events ORDER BY id")
        return self.query("SELECT * FROM group_events WHERE group_id=? ORDER BY id",
                          (group_id,))

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(GROUP_STATES, 0)
        for r in self.query("SELECT state, COUNT(*) AS n FROM groups GROUP BY state"):
            out[r["state"]] = r["n"]
        return out

    # ------------------------------------------------------------------ timings
    def record_stage(self, group_id, attempt: int, stage: str, status: str,
                     seconds: float | None = None, started_at: float | None = None,
                     detail: str | None = None):
        with self.transaction() as con:
            con.execute(
                "INSERT INTO stage_timings (group_id, attempt, stage, status, seconds, "
                "started_at, detail) VALUES (?,?,?,?,?,?,?) ON CONFLICT(group_id, attempt, "
                "stage) DO UPDATE SET status=excluded.status, seconds=excluded.seconds, "
                "started_at=excluded.started_at, detail=excluded.detail",
                (group_id, attempt, stage, status, seconds, started_at, detail))

    def timings(self, group_id=None) -> list[dict]:
        if group_id is None:
            return self.query("SELECT * FROM stage_timings ORDER BY group_id, attempt, id")
        return self.query("SELECT * FROM stage_timings WHERE group_id=? ORDER BY attempt, id",
                          (group_id,))

    # ------------------------------------------------------------------ products
    def register_ms(self, path, *, group_id=None, t_start=None, t_end=None, nbytes=None,
                    flagged_fraction=None, calset_id=None, status="converted"):
        """Insert or update (by path) a Measurement Set: re-processing a group replaces
        its row, it never duplicates it."""
        now = time.time()
        with self.transaction() as con:
            con.execute(
                "INSERT INTO measurement_sets (path, group_id, t_start, t_end, nbytes, "
                "flagged_fraction, calset_id, status, created_at, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(path) DO UPDATE SET "
                "group_id=COALESCE(excluded.group_id, group_id), "
                "t_start=COALESCE(excluded.t_start, t_start), "
                "t_end=COALESCE(excluded.t_end, t_end), "
                "nbytes=COALESCE(excluded.nbytes, nbytes), "
                "flagged_fraction=COALESCE(excluded.flagged_fraction, flagged_fraction), "
                "calset_id=COALESCE(excluded.calset_id, calset_id), "
                "status=excluded.status, updated_at=excluded.updated_at",
                (str(path), group_id, t_start, t_end, nbytes, flagged_fraction, calset_id,
                 status, now, now))

    def measurement_sets(self, status=None, limit=None) -> list[dict]:
        sql, args = "SELECT * FROM measurement_sets", []
        if status:
            sql += " WHERE status=?"
            args.append(status)
        sql += " ORDER BY t_start"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self.query(sql, args)

    def register_image(self, path, *, group_id=None, ms_path=None, kind="continuum",
                       products=None, noise_jy=None, peak_jy=None, beam=None,
                       calset_id=None, qa=None):
        """``qa``: the operator app's figures (thumbnail path, CLEAN components, ...)."""
        now = time.time()
        with self.transaction() as con:
            con.execute(
                "INSERT INTO images (path, group_id, ms_path, kind, products, noise_jy, "
                "peak_jy, beam, calset_id, created_at, qa) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(path) DO UPDATE SET group_id=excluded.group_id, "
                "ms_path=excluded.ms_path, kind=excluded.kind, products=excluded.products, "
                "noise_jy=excluded.noise_jy, peak_jy=excluded.peak_jy, beam=excluded.beam, "
                "calset_id=excluded.calset_id, created_at=excluded.created_at, qa=excluded.qa",
                (str(path), group_id, None if ms_path is None else str(ms_path), kind,
                 json.dumps(products or {}), noise_jy, peak_jy,
                 None if beam is None else json.dumps(beam), calset_id, now,
                 None if qa is None else json.dumps(qa)))

    def images(self, group_id=None) -> list[dict]:
        if group_id is None:
            return self.query("SELECT * FROM images ORDER BY created_at")
        return self.query("SELECT * FROM images WHERE group_id=?", (group_id,))

    def add_source(self, name, ra_deg, dec_deg, flux_jy=None, origin=None) -> int:
        with self.transaction() as con:
            con.execute("INSERT INTO sources (name, ra_deg, dec_deg, flux_jy, origin) "
                        "VALUES (?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                        "ra_deg=excluded.ra_deg, dec_deg=excluded.dec_deg, "
                        "flux_jy=excluded.flux_jy, origin=excluded.origin",
                        (name, ra_deg, dec_deg, flux_jy, origin))
            return con.execute("SELECT id FROM sources WHERE name=?", (name,)).fetchone()["id"]

    def add_photometry(self, source_id, image_path, *, t_mid, flux_jy, err_jy):
        with self.transaction() as con:
            con.execute("INSERT INTO photometry (source_id, image_path, t_mid, flux_jy, err_jy)"
                        " VALUES (?,?,?,?,?) ON CONFLICT(source_id, image_path) DO UPDATE SET "
                        "t_mid=excluded.t_mid, flux_jy=excluded.flux_jy, "
                        "err_jy=excluded.err_jy",
                        (source_id, str(image_path), t_mid, flux_jy, err_jy))

    # ------------------------------------------------------------------ calibration sets
    def register_calset(self, name, *, ms_path=None, calibrator=None, t_transit=None,
                        valid_start=None, valid_end=None, refant=None, tables=None,
                        params=None, quality=None, status="valid", reason=None) -> int:
        """Record a calibration set; returns its id. ``status="rejected"`` (with a
        ``reason``) keeps a failed solve on record without ever making it usable. The
        validity window defaults to ±12 h around ``t_transit``. Sets are versioned:
        re-registering a name (a re-solve) adds the next version and never changes an
        earlier one, so a rejected re-solve leaves a valid set of its name usable; of
        valid versions, the latest is the one :meth:`find_calset` picks."""
        if status not in ("valid", "rejected"):
            raise ValueError(f"calibration set {name}: status must be 'valid' or "
                             f"'rejected', not {status!r}")
        if status == "valid":
            if t_transit is None or not tables:
                raise ValueError(f"calibration set {name}: a valid set needs t_transit "
                                 "and tables")
            missing = [p for p in tables.values() if not os.path.exists(p)]
            if missing:
                raise ValueError(f"calibration set {name}: table(s) not found: {missing}")
        if t_transit is not None:
            valid_start = t_transit - 12 * 3600 if valid_start is None else valid_start
            valid_end = t_transit + 12 * 3600 if valid_end is None else valid_end
        with self.transaction() as con:
            version = con.execute("SELECT COALESCE(MAX(version), 0) + 1 AS v FROM "
                                  "calibration_sets WHERE name=?", (name,)).fetchone()["v"]
            cur = con.execute(
                "INSERT INTO calibration_sets (name, version, ms_path, calibrator, t_transit, "
                "valid_start, valid_end, refant, tables, params, quality, status, reason, "
                "created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (name, version, None if ms_path is None else str(ms_path), calibrator,
                 t_transit, valid_start, valid_end, None if refant is None else int(refant),
                 json.dumps({k: str(v) for k, v in (tables or {}).items()}),
                 json.dumps(params or {}, default=_jsonable),
                 json.dumps(quality or {}, default=_jsonable), status, reason, time.time()))
            if version > 1:
                log.info("calibration set %s: version %d (%s)", name, version, status)
            return cur.lastrowid

    def find_calset(self, t_unix: float) -> dict | None:
        """The valid set for time ``t_unix``: among valid sets whose window covers it,
        the one with the nearest transit; else the nearest valid set in time (with
        ``in_window=False``, so the caller can warn); None if there is no valid set."""
        r = self.query("SELECT * FROM calibration_sets WHERE status='valid' AND "
                       "valid_start <= ? AND ? <= valid_end ORDER BY ABS(t_transit - ?), id "
                       "DESC LIMIT 1", (t_unix, t_unix, t_unix))
        if r:
            r[0]["in_window"] = True
            return r[0]
        r = self.query("SELECT * FROM calibration_sets WHERE status='valid' "
                       "ORDER BY ABS(t_transit - ?), id DESC LIMIT 1", (t_unix,))
        if r:
            r[0]["in_window"] = False
            return r[0]
        return None

    def list_calsets(self, status=None) -> list[dict]:
        if status is None:
            return self.query("SELECT * FROM calibration_sets ORDER BY t_transit")
        return self.query("SELECT * FROM calibration_sets WHERE status=? ORDER BY t_transit",
                          (status,))


def _jsonable(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
