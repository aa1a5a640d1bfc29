"""The stream's intake: the incoming directories' files and the groups they form.

:class:`Intake` is the part of :class:`contimg.stream.Stream` that watches files arrive
(``scan``: every directory entry, whatever it is, is recorded or skipped with its reason;
a file is *ready* when its size is stable, its header opens and its data are all
written) and turns them into groups (``update_groups``: complete → pending; incomplete
after the timeout → processed with missing subbands or failed, by policy). It relies on
the stream's ``cfg``, ``db`` and bookkeeping (``_problems``, ``_final``, ``_ignored``,
``_watch``, ``failed``) and on its ``_reconsider_duplicate``.
"""

from __future__ import annotations

import datetime as _dt
import errno
import logging
import os
import time

from contimg import telescope as tel
from contimg.io.uvh5 import is_subband_file

log = logging.getLogger("contimg.stream")

_VANISHED = FileNotFoundError(errno.ENOENT, "vanished before it was ready")


def _unix(ts: _dt.datetime) -> float:
    return ts.replace(tzinfo=_dt.timezone.utc).timestamp()


def _check_ready(path):
    """Raise UVH5Error naming ``path`` unless its header opens and its data are all
    written (the correlator may still be writing a file of stable size)."""
    from contimg.io.uvh5 import check_written, read_header

    with open(path, "rb"):      # PermissionError: not bad, only not readable yet
        pass
    check_written(path, read_header(path))


class Intake:
    """Files → groups (mixed into :class:`contimg.stream.Stream`)."""

    # ------------------------------------------------------------------ files
    def scan(self, *, once: bool = False):
        """Look at the incoming directories (``cfg.scan_dirs``: the incoming directory and,
        with placement by node, every node's own directory; a group's subbands may be
        spread over them); record new files, promote settled ones."""
        now = time.time()
        entries = []
        for d in self.cfg.scan_dirs:
            try:
                entries += list(os.scandir(d))
            except FileNotFoundError:
                if d == self.cfg.incoming:
                    d.mkdir(parents=True, exist_ok=True)
                else:                # a node directory not mounted: say so, keep trying
                    self._entry_problem(str(d), FileNotFoundError(
                        errno.ENOENT, "node directory not found"))
                continue
            except OSError as exc:       # unreadable directory: say so once, keep trying
                self._entry_problem(str(d), exc)
                continue
            self._entry_problem(str(d), None)
        new, listed, real = [], set(), set()
        several = len(self.cfg.scan_dirs) > 1
        for e in entries:
            if not e.name.endswith(".hdf5") or e.name.startswith("."):
                continue
            path = os.path.abspath(e.path)
            if several and is_subband_file(e.name):   # one file reachable from two directories:
                rp = os.path.realpath(path)      # once (a misnamed link hides nothing)
                if rp in real:
                    continue
                real.add(rp)
            listed.add(path)
            if path in self._final or path in self._ignored:
                continue
            try:   # any entry may fail: a symlink loop, no permission, gone meanwhile
                st = e.stat()
                if not e.is_file():
                    raise IsADirectoryError(errno.EISDIR, "not a regular file")
            except OSError as exc:
                self._entry_problem(path, exc)
                continue
            self._entry_problem(path, None)
            new.append((st, path))
        for path in [p for p in self._watch if p not in listed and p not in self._final]:
            # a file seen but not yet ready vanished: forget it (seen again if it returns)
            del self._watch[path]
            self._entry_problem(path, _VANISHED)
        # oldest first, so that of two files for one subband the earlier one wins
        new.sort(key=lambda x: (x[0].st_mtime, x[1]))
        for st, path in new:
            if path not in self._watch:
                if not self._register_new(path, st.st_size):
                    continue
                self._watch[path] = [st.st_size, st.st_mtime, now]
                if not once:
                    continue
            w = self._watch[path]
            if (st.st_size, st.st_mtime) != (w[0], w[1]):
                w[:] = [st.st_size, st.st_mtime, now]
                continue
            stable = now - w[2]
            if not once and stable < self.cfg.settle_s:
                continue
            self._check_file(path, st.st_size, stable, once)

    def _entry_problem(self, path, exc, kind="entry"):
        """Log a directory entry the scan cannot use (``kind`` "entry": listing it,
        "read": reading it), once per path and reason (it is looked at again on every
        pass); ``exc=None``: the entry is fine (again)."""
        why = None if exc is None else (exc.strerror or str(exc)
                                        if isinstance(exc, OSError) else str(exc))
        if self._problems.get((path, kind)) == why:
            return
        if why is None:
            log.info("%s: usable again", path)
            del self._problems[(path, kind)]
        else:
            log.warning("%s: skipped for now: %s", path, why)
            self._problems[(path, kind)] = why

    def _register_new(self, path, size) -> bool:
        try:
            name = tel.parse_subband_filename(path)
        except ValueError as exc:
            log.warning("ignoring %s", exc)
            self._ignored.add(path)
            return False
        ts = _unix(name.timestamp)
        known = self.db.query("SELECT status FROM hdf5_files WHERE path=?", (path,))
        if known:
            if known[0]["status"] != "seen":
                self._final.add(path)
                return False
            return True
        g = self.db.find_group(ts, self.cfg.tolerance_s)
        gid = g["group_id"] if g else name.stamp
        status, reason = "seen", None
        if name.subband >= self.cfg.n_subbands:
            status, reason = "bad", (f"subband {name.subband} out of range "
                                     f"(expected 0..{self.cfg.n_subbands - 1})")
        elif g is not None and g["state"] != "collecting":
            status, reason = "late", f"arrived after group {gid} was {g['state']}"
        elif g is not None:
            other = [f for f in self.db.files(gid) if f["subband"] == name.subband
                     and f["status"] in ("seen", "ready")]
            if other:
                status, reason = "duplicate", (f"group {gid} already has subband "
                                               f"{name.subband:02d} from {other[0]['path']}")
        if status == "seen" and g is not None and ts < g["t_start"]:
            # the group is named after its earliest subband (its products' name)
            if self.db.rename_group(gid, name.stamp, t_start=ts):
                gid = name.stamp
        self.db.add_file(path, subband=name.subband, timestamp=ts, group_id=gid,
                         t_start=ts, n_expected=self.cfg.n_subbands, size=size,
                         status=status, reason=reason)
        if status == "seen":
            log.info("new file %s (group %s)", os.path.basename(path), gid)
            return True
        log.warning("%s: %s: %s", os.path.basename(path), status, reason)
        self._final.add(path)
        return False

    def _check_file(self, path, size, stable_for, once):
        from contimg.io.uvh5 import UVH5Error

        try:
            _check_ready(path)
        except FileNotFoundError:        # gone meanwhile: seen again if it returns
            self._watch.pop(path, None)
            self._entry_problem(path, _VANISHED)
            return
        except OSError as exc:   # chmod 000 until someone fixes it, EIO...: retried
            if not once:         # (a one-pass backfill records it and ends)
                self._entry_problem(path, exc, "read")
                return
            self._mark_bad(path, size, f"{path}: not readable: {exc.strerror or exc}")
            return
        except UVH5Error as exc:
            if once or stable_for >= self.cfg.bad_file_grace_s:
                self._mark_bad(path, size, str(exc))
            return
        self._entry_problem(path, None, "read")
        self.db.set_file_status(path, "ready", size=size)
        self._final.add(path)
        log.debug("ready: %s (%d bytes)", path, size)

    def _mark_bad(self, path, size, why):
        """A file is bad for good: recorded with the reason; a duplicate of its subband
        set aside earlier takes its place."""
        self.db.set_file_status(path, "bad", size=size, reason=why)
        self._final.add(path)
        log.error("bad file: %s", why)
        f = self.db.query("SELECT group_id, subband FROM hdf5_files WHERE path=?", (path,))
        if f and f[0]["group_id"]:
            self._reconsider_duplicate(f[0]["group_id"], f[0]["subband"], path)

    # ------------------------------------------------------------------ groups
    def update_groups(self, *, once: bool = False):
        """collecting → pending (complete, or timed out under "process") or failed."""
        now = time.time()
        n = self.cfg.n_subbands
        for g in self.db.groups("collecting"):
            gid = g["group_id"]
            files = self.db.files(gid)
            ready = {f["subband"] for f in files if f["status"] == "ready"}
            settling = [f for f in files if f["status"] == "seen"]
            if len(ready) == n:
                if self.db.transition(gid, "pending", expect="collecting", missing=[]):
                    log.info("group %s: complete (%d subbands), queued", gid, n)
                continue
            age = now - g["created_at"]
            if not once and (age < self.cfg.group_timeout_s or
                             (settling and age < self.cfg.group_timeout_s
                              + self.cfg.bad_file_grace_s)):
                continue
            missing = sorted(set(range(n)) - ready)
            what = (f"{len(ready)}/{n} subbands after {age:.0f} s "
                    f"(missing {', '.join(f'{s:02d}' for s in missing)})")
            if self.cfg.incomplete == "process" and len(ready) >= self.cfg.min_subbands:
                if self.db.transition(gid, "pending", expect="collecting", missing=missing,
                                      reason=f"incomplete: {what}; processing with the "
                                             "missing subbands flagged"):
                    log.warning("group %s: incomplete, %s: queued with missing subbands "
                                "flagged", gid, what)
            else:
                why = (f"incomplete: {what}; policy {self.cfg.incomplete!r}"
                       + (f" needs at least {self.cfg.min_subbands}"
                          if self.cfg.incomplete == "process" else ""))
                if self.db.transition(gid, "failed", expect="collecting", reason=why,
                                      missing=missing):
                    log.error("group %s: failed: %s", gid, why)
                    self.failed.append(gid)
