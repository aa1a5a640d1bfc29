"""What the operator app reads from the state database: one function per view, shared by
the REST API and the Panel pages. Parameterised SQL only; parameters are validated
here (:class:`BadParameter` names the parameter and the problem)."""

from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
import time

from contimg.state import GROUP_STATES, StateDB

MAX_LIMIT = 10000
MS_STAGES = ("converted", "flagged", "calibrated", "imaged")
TELESCOPE_GROUPS_PER_HOUR = 12.0


class BadParameter(ValueError):
    """A query parameter is malformed or out of range."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"parameter {name!r}: {problem}")
        self.name = name


class NotFound(LookupError):
    pass


# ------------------------------------------------------------------ parameters
def parse_limit(value, default: int = 100, name: str = "limit") -> int:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise BadParameter(name, f"{value!r} is not an integer") from None
    if not 1 <= n <= MAX_LIMIT:
        raise BadParameter(name, f"{n} is outside 1..{MAX_LIMIT}")
    return n


def parse_since(value, name: str = "since") -> float | None:
    """Unix seconds, or an ISO-8601 time (UTC unless it says otherwise)."""
    if value is None or value == "":
        return None
    try:
        t = float(value)
        if not math.isfinite(t):
            raise ValueError
        return t
    except ValueError:
        pass
    try:
        d = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise BadParameter(name, f"{value!r} is neither unix seconds nor an ISO-8601 "
                                 "time") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return d.timestamp()


def parse_choice(value, choices, name: str) -> str | None:
    if value is None or value == "":
        return None
    if value not in choices:
        raise BadParameter(name, f"{value!r} is not one of {', '.join(choices)}")
    return value


def parse_id(value, name: str = "id") -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise BadParameter(name, f"{value!r} is not an integer id") from None
    if n < 1:
        raise BadParameter(name, f"{n} is not a valid id")
    return n


# ------------------------------------------------------------------ views
def has_table(db: StateDB, name: str) -> bool:
    return bool(db.query("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                         (name,)))


def status(db: StateDB, products: str | os.PathLike | None = None) -> dict:
    """Queue counts, throughput, latency and failures of the last hours, disk use."""
    now = time.time()
    done = db.query("SELECT COUNT(*) AS n, AVG(finished_at - t_start) AS lat FROM groups "
                    "WHERE state='completed' AND finished_at >= ?", (now - 3600,))[0]
    failures = db.query("SELECT group_id, error, updated_at FROM groups WHERE state='failed' "
                        "ORDER BY updated_at DESC LIMIT 10")
    newest = db.query("SELECT rowid AS id, path, group_id, created_at FROM images WHERE "
                      "json_extract(qa, '$.thumbnail') IS NOT NULL ORDER BY created_at DESC, "
                      "rowid DESC LIMIT 1")
    ms_bytes = db.query("SELECT COALESCE(SUM(nbytes), 0) AS n FROM measurement_sets")[0]["n"]
    disk = None
    if products is not None and os.path.isdir(products):
        u = shutil.disk_usage(products)
        disk = {"path": str(products), "total": u.total, "used": u.used, "free": u.free}
    return {"time": now, "counts": db.counts(), "completed_last_hour": done["n"],
            "telescope_groups_per_hour": TELESCOPE_GROUPS_PER_HOUR,
            "mean_latency_s_last_hour": done["lat"], "recent_failures": failures,
            "newest_image": newest[0] if newest else None, "ms_bytes": ms_bytes,
            "disk": disk, "schema_version": db.version}


def throughput(db: StateDB, hours: int = 24) -> dict:
    """Groups completed per hour and each group's end-to-end latency (data start to
    products registered) over the last ``hours``."""
    now = time.time()
    rows = db.query("SELECT group_id, t_start, finished_at FROM groups WHERE state="
                    "'completed' AND finished_at >= ? ORDER BY finished_at",
                    (now - hours * 3600,))
    per_hour = [0] * hours
    for r in rows:
        k = int((now - r["finished_at"]) // 3600)
        if 0 <= k < hours:
            per_hour[hours - 1 - k] += 1
    latency = [{"group_id": r["group_id"], "finished_at": r["finished_at"],
                "latency_s": r["finished_at"] - r["t_start"]} for r in rows]
    return {"hours_ago": list(range(hours - 1, -1, -1)), "per_hour": per_hour,
            "latency": latency}


def groups(db: StateDB, state=None, since=None, limit=None) -> list[dict]:
    """Groups, newest first, with the current attempt's stage timings, flagged fraction,
    calibration applied and image id."""
    state = parse_choice(state, GROUP_STATES, "state")
    t0 = parse_since(since)
    n = parse_limit(limit)
    sql = ("SELECT g.group_id, g.t_start, g.state, g.attempts, g.retries, g.n_present, "
           "g.n_expected, g.error, g.has_calibrator, g.started_at, g.finished_at, "
           "g.updated_at, m.path AS ms_path, m.flagged_fraction, c.name AS calset, "
           "(SELECT i.rowid FROM images i WHERE i.group_id = g.group_id ORDER BY "
           "i.created_at DESC LIMIT 1) AS image_id FROM groups g "
           "LEFT JOIN measurement_sets m ON m.group_id = g.group_id "
           "LEFT JOIN calibration_sets c ON c.id = m.calset_id WHERE 1=1")
    args: list = []
    if state:
        sql += " AND g.state = ?"
        args.append(state)
    if t0 is not None:
        sql += " AND g.t_start >= ?"
        args.append(t0)
    sql += " ORDER BY g.t_start DESC LIMIT ?"
    args.append(n)
    rows = db.query(sql, args)
    if rows:
        ids = [r["group_id"] for r in rows]
        timings: dict = {}
        for t in db.query("SELECT s.group_id, s.stage, s.status, s.seconds FROM stage_timings "
                          "s JOIN groups g ON g.group_id = s.group_id AND s.attempt = "
                          f"g.attempts WHERE s.group_id IN ({','.join('?' * len(ids))})",
                          ids):
            timings.setdefault(t["group_id"], {})[t["stage"]] = (
                t["seconds"] if t["status"] == "ok" else t["status"])
        for r in rows:
            r["stages"] = timings.get(r["group_id"], {})
    return rows


def group(db: StateDB, group_id: str) -> dict:
    g = db.group(group_id)
    if g is None:
        raise NotFound(f"group {group_id!r} is not in the state database")
    g["events"] = db.events(group_id)
    g["timings"] = db.timings(group_id)
    g["files"] = db.query("SELECT path, subband, status, reason, size FROM hdf5_files "
                          "WHERE group_id=? ORDER BY subband", (group_id,))
    g["measurement_sets"] = db.query("SELECT * FROM measurement_sets WHERE group_id=?",
                                     (group_id,))
    g["images"] = db.query("SELECT rowid AS id, path, kind, noise_jy, peak_jy, created_at "
                           "FROM images WHERE group_id=? ORDER BY created_at", (group_id,))
    return g


def ms_index(db: StateDB, stage=None, status=None, limit=None) -> list[dict]:
    """Measurement Sets with ``stage`` (the furthest product made from it: converted,
    flagged, calibrated, imaged) and ``status`` (its group's state), newest first."""
    stage = parse_choice(stage, MS_STAGES, "stage")
    status = parse_choice(status, GROUP_STATES, "status")
    n = parse_limit(limit)
    inner = ("SELECT m.path, m.group_id, m.t_start, m.t_end, m.nbytes, m.flagged_fraction, "
             "m.calset_id, m.created_at, m.updated_at, CASE WHEN EXISTS (SELECT 1 FROM images "
             "i WHERE i.ms_path = m.path) THEN 'imaged' ELSE m.status END AS stage, "
             "g.state AS status FROM measurement_sets m LEFT JOIN groups g ON "
             "g.group_id = m.group_id")
    sql, args = f"SELECT * FROM ({inner}) WHERE 1=1", []
    if stage:
        sql += " AND stage = ?"
        args.append(stage)
    if status:
        sql += " AND status = ?"
        args.append(status)
    sql += " ORDER BY t_start DESC LIMIT ?"
    args.append(n)
    return db.query(sql, args)


def calibration_sets(db: StateDB) -> list[dict]:
    rows = db.query("SELECT c.*, (SELECT COUNT(*) FROM measurement_sets m WHERE m.calset_id "
                    "= c.id) AS n_groups FROM calibration_sets c ORDER BY c.t_transit")
    for r in rows:
        r["groups"] = [x["group_id"] for x in db.query(
            "SELECT group_id FROM measurement_sets WHERE calset_id=? ORDER BY t_start "
            "LIMIT 50", (r["id"],))]
    return rows


def calibration_set(db: StateDB, calset_id) -> dict:
    r = db.query("SELECT * FROM calibration_sets WHERE id=?", (parse_id(calset_id),))
    if not r:
        raise NotFound(f"calibration set {calset_id} is not in the state database")
    return r[0]


_IMAGE_COLS = ("rowid AS id, path, group_id, ms_path, kind, products, noise_jy, peak_jy, "
               "beam, calset_id, created_at, qa")


def _image_row(r: dict) -> dict:
    qa = r.get("qa") or {}
    if r.get("peak_jy") is not None and r.get("noise_jy"):
        qa.setdefault("dynamic_range", r["peak_jy"] / r["noise_jy"])
    r["qa"] = qa
    return r


def images(db: StateDB, since=None, limit=None) -> list[dict]:
    t0 = parse_since(since)
    n = parse_limit(limit)
    sql, args = f"SELECT {_IMAGE_COLS} FROM images WHERE 1=1", []
    if t0 is not None:
        sql += " AND created_at >= ?"
        args.append(t0)
    sql += " ORDER BY created_at DESC LIMIT ?"
    args.append(n)
    return [_image_row(r) for r in db.query(sql, args)]


def image(db: StateDB, image_id) -> dict:
    r = db.query(f"SELECT {_IMAGE_COLS} FROM images WHERE rowid=?", (parse_id(image_id),))
    if not r:
        raise NotFound(f"image {image_id} is not in the state database")
    return _image_row(r[0])


def sources(db: StateDB, limit=None) -> list[dict]:
    n = parse_limit(limit, default=1000)
    return db.query("SELECT s.id, s.name, s.ra_deg, s.dec_deg, s.flux_jy, s.origin, "
                    "(SELECT COUNT(*) FROM photometry p WHERE p.source_id = s.id) AS "
                    "n_points FROM sources s ORDER BY s.id LIMIT ?", (n,))


def lightcurve(db: StateDB, source_id) -> dict:
    sid = parse_id(source_id)
    s = db.query("SELECT id, name, ra_deg, dec_deg, flux_jy FROM sources WHERE id=?", (sid,))
    if not s:
        raise NotFound(f"source {source_id} is not in the state database")
    pts = db.query("SELECT t_mid, flux_jy, err_jy, image_path FROM photometry WHERE "
                   "source_id=? ORDER BY t_mid", (sid,))
    return {"source": s[0], "points": pts}


# tables the science products (contimg.photometry, .variability, .mosaic) add; the app
# reads whichever exist and says which are missing (an older database)
SCIENCE_TABLES = ("ese_candidates", "source_stats", "image_flux_scale", "mosaics")


def ese_candidates(db: StateDB, limit=None) -> dict:
    n = parse_limit(limit)
    if not has_table(db, "ese_candidates"):
        return {"candidates": [], "available": False,
                "missing": "no ese_candidates table: this database has no variability or "
                           "ESE products yet"}
    return {"candidates": db.query("SELECT * FROM ese_candidates ORDER BY score DESC "
                                   "LIMIT ?", (n,)), "available": True}


def science_inventory(db: StateDB) -> dict:
    """What the Sources page can show: counts of what exists, names of what is missing."""
    have = {"sources": db.query("SELECT COUNT(*) AS n FROM sources")[0]["n"],
            "photometry": db.query("SELECT COUNT(*) AS n FROM photometry")[0]["n"]}
    missing = [t for t in SCIENCE_TABLES if not has_table(db, t)]
    for t in SCIENCE_TABLES:
        if t not in missing:
            have[t] = db.query(f"SELECT COUNT(*) AS n FROM {t}")[0]["n"]  # noqa: S608 (fixed names)
    return {"have": have, "missing": missing}
