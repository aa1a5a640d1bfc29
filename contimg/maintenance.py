"""Maintenance of the state a stream shares with other processes and nodes: whether
a group's owner is alive (its heartbeat in the database), taking over the groups of
owners that are gone, and removing contimg's temporaries that nobody will finish.

``contimg housekeeping`` runs :func:`housekeeping`; a stream runs the same pieces when
it starts and after each group (see :mod:`contimg.stream`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import shutil
import time
from pathlib import Path

from contimg.state import StateDB, owner_id

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def _owner_gone(owner: str | None, heartbeat: float | None, stale_after_s: float) -> bool:
    """Whether the process ``owner`` ("host:pid") that claimed a group is gone: its
    heartbeat in the database is older than ``stale_after_s``, whatever its host (its PID
    may have been reused since, or live in another PID namespace); before that, only a
    process of this host known dead (or this very process: a previous life of it) is."""
    if not owner:
        return True
    if heartbeat is None or time.time() - heartbeat > stale_after_s:
        return True
    host, _, pid = owner.rpartition(":")
    if host == owner_id().rpartition(":")[0] and pid.isdigit():
        return int(pid) == os.getpid() or not _pid_alive(int(pid))
    return False


# contimg's own temporaries: <product>.tmp-<pid> (MS, calibration tables, flag files),
# <product>.old-<pid> (the MS an interrupted replacement moved aside), <image>.fits.tmp
_TMP_RE = re.compile(r"^(?P<product>.+?)"
                     r"(?:\.(?P<kind>tmp|old)-(?P<pid>\d+)|(?<=\.fits)\.tmp)$")
_PRODUCT_DIRS = ("", "ms", "images", "cal")     # where contimg writes under the output


def _product_stamps(db: StateDB, group_ids=None) -> set:
    """The names of groups' products: their ids and earliest file-name timestamps (one
    query; ``group_ids`` None: every group)."""
    sql = ("SELECT g.group_id AS gid, MIN(f.timestamp) AS t FROM groups g LEFT JOIN "
           "hdf5_files f ON f.group_id = g.group_id")
    args = []
    if group_ids is not None:
        ids = list(group_ids)
        if not ids:
            return set()
        sql += f" WHERE g.group_id IN ({','.join('?' * len(ids))})"
        args = ids
    out = set()
    for r in db.query(sql + " GROUP BY g.group_id", args):
        out.add(r["gid"])
        if r["t"] is not None:
            out.add(_dt.datetime.fromtimestamp(r["t"], _dt.timezone.utc)
                    .strftime("%Y-%m-%dT%H:%M:%S"))
    return out


def remove_stale_temporaries(root: Path, *, db: StateDB | None = None,
                             stale_after_s: float = 1800.0, min_age_s: float | None = None,
                             products=None) -> list[str]:
    """Remove contimg's temporaries left under ``root`` by a process that is gone; the
    paths removed (or restored).

    Only the product directories are listed (an MS is never walked into). A temporary
    of a group in progress whose owner is alive by its heartbeat in ``db`` (on any
    host) is kept; one of another group is removed; one that is no group's (a CLI run)
    only when untouched for ``min_age_s`` (default ``stale_after_s``). ``products``:
    remove the temporaries of these product paths only (their group has finished). An
    ``.old-<pid>`` MS whose product is missing (a replacement interrupted between its
    two renames) is put back in place instead."""
    root = Path(root)
    min_age_s = stale_after_s if min_age_s is None else min_age_s
    live = known = set()
    if db is not None and products is None:
        live = _product_stamps(db, [g["group_id"] for g in db.groups("in_progress")
                                    if not _owner_gone(g["owner"], g["heartbeat"],
                                                       stale_after_s)])
        known = _product_stamps(db)
    wanted = None if products is None else {os.path.basename(str(p)) for p in products if p}
    now, removed = time.time(), []
    for sub in _PRODUCT_DIRS if wanted is None else {os.path.dirname(str(p)) for p in products
                                                     if p}:
        d = root / sub
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            m = _TMP_RE.match(e.name)
            if not m:
                continue
            product = m.group("product")
            stamp = product[:19]
            if wanted is not None:
                if not any(product == w or product.startswith(w + "-") for w in wanted):
                    continue
            elif stamp in live:
                continue
            elif stamp not in known:
                try:
                    if now - os.lstat(e.path).st_mtime < min_age_s:
                        continue
                except FileNotFoundError:
                    continue
            p = Path(e.path)
            target = p.with_name(product)
            if m.group("kind") == "old" and not os.path.lexists(target):
                os.rename(p, target)
                log.warning("restored %s from the interrupted replacement %s", target, p)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(str(p))
    for p in removed:
        log.info("removed temporary output of a finished or dead process: %s", p)
    return removed


def resume_stale_groups(db: StateDB, stale_after_s: float, *, reason_prefix="resumed") -> list:
    """In-progress groups whose owner is gone → pending (not counted as a retry)."""
    out = []
    for g in db.groups("in_progress"):
        if _owner_gone(g["owner"], g["heartbeat"], stale_after_s):
            why = f"{reason_prefix}: owner {g['owner']} is gone"
            if db.transition(g["group_id"], "pending", expect="in_progress", reason=why,
                             owner=None):
                log.warning("group %s: %s; back to pending", g["group_id"], why)
                out.append(g["group_id"])
    return out


def housekeeping(db: StateDB, *, output=None, stale_after_s: float = 1800.0,
                 collecting_timeout_s: float = 3600.0, tmp_age_s: float = 6 * 3600.0) -> dict:
    """What ``contimg housekeeping`` does; safe while a stream runs.

    * in-progress groups whose owner is gone (its heartbeat older than
      ``stale_after_s``, or a process of this host known dead) → pending;
    * collecting groups older than ``collecting_timeout_s`` → failed, with the reason;
    * contimg's temporaries under ``output`` (see ``remove_stale_temporaries``) of
      groups not in progress with a live owner → removed; those of no group when older
      than ``tmp_age_s``.
    """
    resumed = resume_stale_groups(db, stale_after_s, reason_prefix="housekeeping")
    expired = []
    now = time.time()
    for g in db.groups("collecting"):
        age = now - g["created_at"]
        if age > collecting_timeout_s:
            have = sorted({f["subband"] for f in db.files(g["group_id"], status="ready")})
            why = (f"housekeeping: still collecting after {age / 60:.0f} min with "
                   f"{len(have)}/{g['n_expected']} subbands")
            if db.transition(g["group_id"], "failed", expect="collecting", reason=why):
                log.warning("group %s: %s", g["group_id"], why)
                expired.append(g["group_id"])
    removed = (remove_stale_temporaries(Path(output), db=db, stale_after_s=stale_after_s,
                                        min_age_s=tmp_age_s) if output else [])
    return {"resumed": resumed, "expired": expired, "removed": removed}
