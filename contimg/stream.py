"""The streaming service: incoming subband files → groups → Dask → products.

``Stream.run()`` is the main job of the telescope. Each pass of its loop:

1. **scan** the incoming directory (woken by filesystem notifications through
   ``watchdog``, with polling as the fallback and the safety net). A new subband file is
   recorded at once; it becomes *ready* when its size and mtime have been stable for
   ``settle_s``, its HDF5 header opens and its data are all written (storage allocated
   inside the file, the last integration not all zeros: the correlator may still be
   writing a file whose size no longer changes). A stable file whose header still does not open
   after ``bad_file_grace_s`` is *bad* (truncated/corrupt), with the reason recorded.
   A second file for a subband a group already has is a *duplicate*; a file for a group
   already dispatched is *late*. Both are recorded and ignored.
2. **group**: files join the group whose start is within ``tolerance_s`` (±60 s) of their
   file-name timestamp. A group with all its subbands ready becomes *pending*. A group
   still incomplete ``group_timeout_s`` after its first file is, by the ``incomplete``
   policy, either processed with the missing subbands flagged (``"process"``, if at
   least ``min_subbands`` are there) or *failed* with the reason (``"fail"``).
3. **dispatch** pending groups, oldest first, ``in_flight`` at a time: each is claimed
   atomically in the state database (so no group is ever processed twice at once) and
   runs through the stages convert → flag → calibrate (if a calibrator transits) →
   apply (the valid calibration set nearest in time) → image → register products, every
   stage a task on the Dask cluster, timed into ``stage_timings``.
4. **retry**: a failed group goes back to *pending* until it has failed
   ``max_retries + 1`` times, then it is *failed* with the error. Bad input (a file
   that turns out corrupt when its data are read) marks the file bad and re-queues the
   group without it when the policy allows. A Dask worker dying mid-task is handled by
   Dask itself (the task is re-run elsewhere; all stages are idempotent).

On start it **resumes**: groups left *in_progress* by a stream process that is gone go
back to *pending*, and temporary outputs of dead processes are removed. Only one stream
may serve an output directory at a time (a lock file there).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

from contimg import pipeline
from contimg import telescope as tel
from contimg.config import Config, ImageConfig, StreamSettings
from contimg import intake
from contimg.intake import Intake
from contimg.io.files import make_dirs
from contimg.mosaic import NightlySchedule
from contimg.pipeline import register_image_result  # noqa: F401 - its old home
from contimg.maintenance import (  # noqa: F401 - housekeeping: its old home
    housekeeping, remove_stale_temporaries, resume_stale_groups)
from contimg.admission import visibilities
from contimg.state import StateDB, owner_id

if typing.TYPE_CHECKING:
    from graphs.flag import FlagStrategy

log = logging.getLogger(__name__)

_DISK_FULL_WAIT_S = 5.0          # a group that failed on a full disk waits this long
_DISK_LOW_BYTES = 64 << 20       # ... "full": less than this free under the output
#: an attempt failed because the scheduler went away, not because of the group
#: (a future cancelled for another reason is the group's failure: no endless re-queue)
_SCHEDULER_LOST = ("scheduler-connection-lost", "CommClosedError", "StreamClosedError")


@dataclass(frozen=True, kw_only=True)
class StreamConfig(StreamSettings):
    """Everything the stream is told: the ``[stream]`` settings (inherited, see
    :class:`contimg.config.StreamSettings`) plus where it works and what the stages
    need. Build it from the configuration with :meth:`from_config`."""

    incoming: Path
    output: Path
    db_path: Path | None = None                  # None: the configured database
    #: "any", None (ask the workers) or {worker: [directories]} (see contimg.convert)
    placement: str | dict | None = "any"
    flag_strategy: FlagStrategy | None = None    # None: the configured [flag] strategy
    catalog: str | None = None                   # None: the configured calibrator list
    refant: int | None = None
    image: ImageConfig = field(default_factory=ImageConfig)
    mosaic_hour_utc: int | None = None           # the nightly mosaic ([science])
    holder_timeout_s: float = 60.0               # [dask] no_workers_timeout (placement)
    #: directories scanned beside ``incoming`` (placement "nodes": every node's own
    #: directory, so that no incoming directory of links is needed)
    incoming_dirs: tuple = ()

    def __post_init__(self):
        self._check_fields(StreamSettings, skip=("placement",))
        # absolute: workers started in another directory see the same paths
        object.__setattr__(self, "incoming", Path(self.incoming).absolute())
        object.__setattr__(self, "output", Path(self.output).absolute())
        object.__setattr__(self, "incoming_dirs",
                           tuple(Path(d).absolute() for d in self.incoming_dirs))
        if self.db_path is not None:
            object.__setattr__(self, "db_path", Path(self.db_path).absolute())
        if self.placement not in ("any", None) and not isinstance(self.placement, dict):
            raise ValueError(f"placement {self.placement!r}: 'any', None or a mapping "
                             "(StreamConfig.from_config reads 'discover' and JSON files)")
        self._check()

    @classmethod
    def from_config(cls, cfg: Config, **over) -> "StreamConfig":
        """The stream's configuration from a :class:`contimg.config.Config`; ``over``:
        fields to replace."""
        from contimg.cluster import node_placement
        from contimg.convert import parse_placement

        kw = {f.name: getattr(cfg.stream, f.name) for f in fields(StreamSettings)}
        by_node = cfg.stream.placement == "nodes"
        placement = (node_placement(cfg.dask.nodes) if by_node
                     else parse_placement(cfg.stream.placement))
        # by node: every node's directory is scanned (the incoming directory too, if set)
        dirs = tuple(Path(d[0]) for d in placement.values()) if by_node else ()
        kw.update(incoming=cfg.paths.incoming or (dirs[0] if dirs else None),
                  output=cfg.paths.output, db_path=cfg.paths.db,
                  placement=placement, incoming_dirs=dirs,
                  flag_strategy=cfg.flag.strategy, catalog=cfg.calibrate.catalog,
                  refant=cfg.calibrate.refant, image=cfg.image,
                  mosaic_hour_utc=cfg.science.mosaic_hour_utc,
                  holder_timeout_s=cfg.dask.no_workers_timeout)
        kw.update(over)
        if kw["incoming"] is None or kw["output"] is None:
            raise ValueError("the stream needs an incoming and an output directory: "
                             "--incoming/--output, or incoming/output in [paths] of the "
                             "configuration file")
        return cls(**kw)

    @property
    def scan_dirs(self) -> tuple:
        """Every directory the stream scans: ``incoming`` then ``incoming_dirs``."""
        return tuple(dict.fromkeys((self.incoming, *self.incoming_dirs)))

    @property
    def image_options(self) -> dict:
        """Keyword options of the image stage: the ``[image]`` options that are set, with
        the stream's quick-look major-cycle gain (``image_mgain``)."""
        opts = {k: v for k, v in self.image.dataset_options().items() if v is not None}
        opts["mgain"] = self.image_mgain
        return opts


class BadInput(Exception):
    """A group's input turned out unusable (names the file)."""


def _why(exc) -> str:
    """An error as recorded in the database: a stage's error already names its type."""
    if isinstance(exc, pipeline.StageError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _culprits(exc) -> tuple:
    """The files an error names as at fault (``culprits``), following its chain (a
    BadInput raised from a UVH5Error keeps the latter as its context)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "culprits", None):
            return tuple(exc.culprits)
        exc = exc.__cause__ or exc.__context__
    return ()


class StreamBusy(RuntimeError, OSError):
    """Another stream process already serves this output directory (an OSError too:
    the CLI reports it in one line)."""


def output_lock(output, owner=None):
    """Take the one-stream-per-output lock (``<output>/.contimg-stream.lock``, flock);
    the open lock file (closing it releases the lock). Raise :class:`StreamBusy` naming
    the holder. ``contimg backfill`` takes it before it changes any state."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    fh = open(output / ".contimg-stream.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise StreamBusy(f"{output}: already served by contimg stream ({holder}); one "
                         "stream per output directory") from None
    fh.seek(0)
    fh.truncate()
    fh.write(owner or owner_id())
    fh.flush()
    return fh


class Stream(Intake):
    """The streaming service on one Dask client (see the module docstring)."""

    def __init__(self, cfg: StreamConfig, client, *, db: StateDB | None = None):
        from contimg.runtime import configure

        configure()
        self.cfg = cfg
        self.client = client
        self.db = db or StateDB(cfg.db_path)
        self.owner = owner_id()
        self._watch: dict[str, list] = {}       # path -> [size, mtime, stable_since]
        self._final: set[str] = set()           # paths whose status is settled
        self._ignored: set[str] = set()
        self._problems: dict[tuple, str] = {}   # (entry, kind) -> why it is unusable
        self._running: dict[str, object] = {}   # group_id -> concurrent future
        self._pool = ThreadPoolExecutor(cfg.in_flight, thread_name_prefix="group")
        self._wake = threading.Event()
        self._stop = threading.Event()
        # named limits on stages running at once (a Stage's `slot`)
        self._slots = {"image": threading.BoundedSemaphore(max(1, cfg.image_slots))}
        self._submit = pipeline.submitter(client)
        from contimg.admission import Admission

        self._admission = Admission.from_settings(cfg.memory_limit, cfg.memory_per_visibility,
                                                  client)
        self._last_status = 0.0
        self._mosaic = NightlySchedule(client, self.db, cfg.output / "mosaics",
                                       cfg.mosaic_hour_utc)
        self._lockfile = None
        self.completed: list[str] = []
        self.failed: list[str] = []

    # ------------------------------------------------------------------ lifecycle
    def _acquire_lock(self):
        self._lockfile = output_lock(self.cfg.output, self.owner)

    def _release_lock(self):
        if self._lockfile is not None:
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)
            self._lockfile.close()
            self._lockfile = None

    def resume(self):
        """Take over what a previous (dead) stream left: its in-progress groups go back to
        pending, its temporary outputs are removed, known files are not re-examined."""
        self.db.check_integrity()      # refuse to start on a damaged database
        resumed = resume_stale_groups(self.db, self.cfg.stale_after_s)
        remove_stale_temporaries(self.cfg.output, db=self.db,
                                 stale_after_s=self.cfg.stale_after_s)
        for f in self.db.files():
            if f["status"] != "seen":
                self._final.add(f["path"])
        counts = self.db.counts()
        log.info("state %s: %s%s", self.db.path,
                 ", ".join(f"{k} {v}" for k, v in counts.items()),
                 f"; resumed {len(resumed)} group(s)" if resumed else "")

    def stop(self):
        """Ask the loop to finish (from a signal handler or another thread)."""
        self._stop.set()
        self._wake.set()

    def run(self, *, until_idle: bool = False, timeout: float | None = None,
            once: bool = False) -> dict:
        """Serve until :meth:`stop` (or, with ``until_idle``, until nothing is collecting,
        pending or running). ``once``: treat every file as settled and every incomplete
        group as timed out at once (backfill of data already on disk). Returns the queue
        counts at the end."""
        self._acquire_lock()
        observer = None
        t_end = None if timeout is None else time.monotonic() + timeout
        try:
            self.resume()
            if self.cfg.use_notifications and not once:
                observer = self._start_observer()
            log.info("watching %s%s; products in %s; %d group(s) in flight at most",
                     ", ".join(map(str, self.cfg.scan_dirs)), " (notifications)" if observer else " (polling)",
                     self.cfg.output, self.cfg.in_flight)
            while not self._stop.is_set():
                self.step(once=once)
                if (until_idle or once) and self._idle():
                    break
                if t_end is not None and time.monotonic() > t_end:
                    log.warning("stream: time limit of %.0f s reached", timeout)
                    break
                self._wake.wait(0.2 if once else self.cfg.poll_s)
                self._wake.clear()
        finally:
            if observer is not None:
                observer.stop()
            self._drain()
            self._pool.shutdown(wait=True)
            self._release_lock()
        counts = self.db.counts()
        self._log_status(force=True)
        return counts

    def step(self, *, once: bool = False):
        """One pass: scan, update groups, reap finished work, dispatch, heartbeat."""
        self.scan(once=once)
        self.update_groups(once=once)
        self._reap()
        self.dispatch()
        if self._running:
            self.db.heartbeat(list(self._running), owner=self.owner)
        self._mosaic.tick()                     # the nightly mosaic, when it is due
        self._log_status()

    def _start_observer(self):
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            return None
        wake = self._wake

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                wake.set()

        self.cfg.incoming.mkdir(parents=True, exist_ok=True)
        obs = Observer()
        for d in self.cfg.scan_dirs:
            if d.is_dir():        # a node directory missing now is still polled
                obs.schedule(_Handler(), str(d), recursive=False)
        try:
            obs.start()
        except OSError as exc:  # e.g. inotify watch limit: polling still works
            log.warning("filesystem notifications unavailable (%s); polling", exc)
            return None
        return obs

    def _drain(self):
        """On stop: wait for groups in flight; a group interrupted by a stop request goes
        back to pending (by its own worker thread)."""
        if self._running:
            log.info("waiting for %d group(s) in flight", len(self._running))
        for fut in list(self._running.values()):
            fut.result()
        self._reap()

    def _idle(self) -> bool:
        if self._running:
            return False
        c = self.db.counts()
        if c["collecting"] or c["pending"] or c["in_progress"]:
            return False
        return not any(p not in self._final for p in self._watch)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self):
        if self._stop.is_set():
            return
        while len(self._running) < self.cfg.in_flight:
            cands = [g for g in self.db.next_pending(limit=self.cfg.in_flight + 8)
                     if g["group_id"] not in self._running]
            if not cands:
                return
            # headers now, in this thread: the group's size for the memory budget, and
            # whether a calibrator transits is known before any other group in flight
            # can reach its apply stage
            gid = cands[0]["group_id"]
            opened = None
            try:
                opened = self._open(gid)
            except Exception as exc:  # noqa: BLE001 - the pipeline reports it properly
                log.debug("group %s: early open failed: %s", gid, exc)
            nvis = visibilities(opened[1]) if opened else 0
            why = self._admission.check(gid, nvis)
            if why:
                self._admission.waiting(gid, why)
                return
            g = self.db.claim(gid, owner=self.owner)
            if g is None:
                continue
            self._admission.admit(gid, nvis)
            log.info("group %s: started (attempt %d)", g["group_id"], g["attempts"])
            if opened:
                try:
                    self._note_calibrator(gid, opened[1])
                except Exception as exc:  # noqa: BLE001 - the pipeline reports it properly
                    log.debug("group %s: calibrator check failed: %s", gid, exc)
            self._running[g["group_id"]] = self._pool.submit(self._process, g, opened)

    def _reap(self):
        for gid, fut in list(self._running.items()):
            if fut.done():
                del self._running[gid]
                self._admission.release(gid)
                exc = fut.exception()
                if exc is not None:  # _process handles its own errors; this is a bug
                    log.error("group %s: internal error: %r", gid, exc)

    def _process(self, g, opened=None):
        gid = g["group_id"]
        t0 = time.time()
        try:
            result = self._pipeline(g, opened)
        except BadInput as exc:
            self._bad_input(g, exc)
        except Exception as exc:  # noqa: BLE001 - recorded per group, others go on
            self._failed_attempt(g, _why(exc))
        else:
            # a worker that died mid-write leaves its temporary MS behind: clear it now
            remove_stale_temporaries(self.cfg.output, products=[result.get("ms")])
            self.db.record_stage(gid, g["attempts"], "total", "ok", time.time() - t0, t0)
            if self.db.transition(gid, "completed", expect="in_progress", owner=self.owner):
                log.info("group %s: completed in %.1f s: %s", gid, time.time() - t0, result)
                self.completed.append(gid)
            else:
                log.error("group %s: finished but no longer ours (state %s)", gid,
                          self.db.group(gid)["state"])
        finally:
            self._wake.set()

    def _failed_attempt(self, g, why):
        gid = g["group_id"]
        if self._stop.is_set():
            self._record(gid, self.db.transition, gid, "pending", expect="in_progress",
                         reason=f"interrupted by stop: {why}", owner=None)
            return
        if any(s in why for s in _SCHEDULER_LOST):
            # the scheduler went away (restart): not the group's fault; re-queued without
            # counting a retry once the client has reconnected
            log.error("group %s: scheduler connection lost (%s); re-queued, not counted as "
                      "a retry", gid, why)
            self._await_scheduler()
            self._record(gid, self.db.transition, gid, "pending", expect="in_progress",
                         reason=f"scheduler connection lost: {why}", owner=None)
            return
        full = self._disk_full(why)
        if full:
            # not the group's fault: wait (still ours, heartbeating), then re-queue it
            # without counting a retry, so a disk that fills and frees loses nothing
            log.error("group %s: %s; re-queued in %.0f s, not counted as a retry", gid, full,
                      _DISK_FULL_WAIT_S)
            self._stop.wait(_DISK_FULL_WAIT_S)
            self._record(gid, self.db.transition, gid, "pending", expect="in_progress",
                         reason=f"{full}: {why}", owner=None)
            return
        retries = g["retries"] + 1
        if retries > self.cfg.max_retries:
            self._record(gid, self.db.transition, gid, "failed", expect="in_progress",
                         retries=retries, reason=f"failed {retries} time(s); last error: {why}")
            log.error("group %s: failed for good after %d attempt(s): %s", gid, retries, why)
            self.failed.append(gid)
        else:
            self._record(gid, self.db.transition, gid, "pending", expect="in_progress",
                         retries=retries, reason=why, owner=None)
            log.warning("group %s: attempt failed (%s); retry %d/%d", gid, why, retries,
                        self.cfg.max_retries)

    def _await_scheduler(self, timeout=120.0):
        """Wait until the client is connected to a scheduler again (it reconnects by
        itself after a scheduler restart) and, with placement by node, every node's
        worker is back (their nannies restart them)."""
        deadline = time.monotonic() + timeout
        nodes = set(self.cfg.placement) if isinstance(self.cfg.placement, dict) else set()
        while time.monotonic() < deadline and not self._stop.is_set():
            if getattr(self.client, "status", "running") == "running":
                try:
                    info = self.client.scheduler_info()
                    names = {str(w.get("name")) for w in info["workers"].values()}
                    if info["workers"] and nodes <= names:
                        return
                except Exception:  # noqa: BLE001 - not yet
                    pass
            self._stop.wait(1.0)

    def _disk_full(self, why) -> str | None:
        """Whether an attempt failed for want of disk space (the error says so, or the
        output's filesystem is nearly full: casacore may abort its worker instead of
        raising); a description, else None."""
        try:
            free = shutil.disk_usage(self.cfg.output).free
        except OSError:
            free = None
        if "No space left on device" in why or "[Errno 28]" in why:
            return f"disk full under {self.cfg.output}"
        if free is not None and free < _DISK_LOW_BYTES:
            return f"disk nearly full under {self.cfg.output} ({free >> 20} MiB free)"
        return None

    def _record(self, gid, fn, *args, **kw):
        """Write a group's outcome to the database, waiting out a database that cannot
        be written (a full disk, a lock held too long) instead of dying: the group stays
        in progress, heartbeating, until it is recorded; on stop it is left for the next
        start to resume."""
        import sqlite3

        told = False
        while True:
            try:
                return fn(*args, **kw)
            except sqlite3.OperationalError as exc:
                if not told:
                    log.error("group %s: cannot record its outcome (%s); retrying", gid, exc)
                    told = True
                if self._stop.wait(2.0):
                    log.error("group %s: outcome not recorded before stop; the next start "
                              "resumes it", gid)
                    return None

    def _bad_input(self, g, exc):
        """Input proved unusable when read: set aside exactly the file(s) the error names
        as culprits (``UVH5Error.culprits``, never a search of the message, which names
        the reference file too), bring back a duplicate of a subband set aside, and
        re-queue the group if the policy accepts what is left, else fail it."""
        gid = g["group_id"]
        why = str(exc)
        named = set(_culprits(exc))
        culprits = [f for f in self.db.files(gid, status="ready") if f["path"] in named]
        for f in culprits:
            self.db.set_file_status(f["path"], "bad", reason=why)
            self._reconsider_duplicate(gid, f["subband"], f["path"], check_now=True)
        left = {f["subband"] for f in self.db.files(gid, status="ready")}
        if (culprits and self.cfg.incomplete == "process"
                and len(left) >= self.cfg.min_subbands):
            missing = sorted(set(range(self.cfg.n_subbands)) - left)
            self._record(gid, self.db.transition, gid, "pending", expect="in_progress",
                         missing=missing, reason=f"bad input, re-queued without it: {why}",
                         owner=None)
            log.error("group %s: %s; re-queued without the bad file(s)", gid, why)
        else:
            self._record(gid, self.db.transition, gid, "failed", expect="in_progress",
                         reason=f"bad input: {why}")
            log.error("group %s: failed: bad input: %s", gid, why)
            self.failed.append(gid)

    def _reconsider_duplicate(self, gid, subband, bad_path, *, check_now=False):
        """The file that beat a duplicate turned out bad: the earliest duplicate of that
        subband takes its place. ``check_now`` (the group is already dispatched): it is
        checked here and becomes ready at once; otherwise it settles like a new file."""
        from contimg.io.uvh5 import UVH5Error

        for d in self.db.files(gid, status="duplicate"):
            if d["subband"] != subband:
                continue
            why = f"replaces {os.path.basename(bad_path)} (bad)"
            if not check_now:
                self.db.set_file_status(d["path"], "seen", reason=why)
                self._final.discard(d["path"])
                log.warning("%s: reconsidered: %s", os.path.basename(d["path"]), why)
                return d["path"]
            try:
                intake._check_ready(d["path"])
            except (UVH5Error, OSError) as exc:
                self.db.set_file_status(d["path"], "bad", reason=str(exc))
                continue
            self.db.set_file_status(d["path"], "ready", reason=why)
            log.warning("%s: ready: %s", os.path.basename(d["path"]), why)
            return d["path"]
        return None

    # ------------------------------------------------------------------ the stages
    def _reusable(self, g, ms) -> dict:
        """Stages of the previous attempt whose results this attempt keeps.

        A retry resumes where the previous attempt stopped: the stages it finished (a
        prefix of the reusable stages, convert → flag → calibrate → apply, the MS still
        on disk) are not run again; their records are carried over. The last allowed
        attempt starts again from the raw files, in case the MS itself was what went
        wrong.
        """
        gid, attempt = g["group_id"], g["attempts"]
        if attempt <= 1 or g["retries"] >= self.cfg.max_retries:
            return {}
        if not os.path.isfile(os.path.join(ms, "table.dat")):
            return {}
        prev = {r["stage"]: r for r in self.db.timings(gid) if r["attempt"] == attempt - 1}
        keep = {}
        for stage in pipeline.REUSABLE:
            r = prev.get(stage)
            if r is not None and r["detail"] == "disabled":
                continue            # skipped by configuration: decided again below
            if r is not None and r["status"] == "skipped":
                # skipped for want of something (e.g. "no valid calibration set", which
                # a solve since may have provided): decided again, with what follows
                break
            if r is None or r["status"] == "failed":
                break
            keep[stage] = r
        return keep if "convert" in keep else {}

    def _reuse(self, g, stage, rec) -> dict:
        """Carry a stage's result over from an earlier attempt (see ``_reusable``)."""
        try:
            res = json.loads(rec["detail"] or "{}")
        except ValueError:
            res = {}
        if not isinstance(res, dict):
            res = {}
        res.setdefault("status", rec["status"])
        res["reused_from_attempt"] = res.get("reused_from_attempt", rec["attempt"])
        self.db.record_stage(g["group_id"], g["attempts"], stage, rec["status"], 0.0,
                             time.time(), json.dumps(res, default=str))
        log.info("group %s: %s kept from attempt %d", g["group_id"], stage,
                 res["reused_from_attempt"])
        return res

    def _execute(self, run, stage, kwargs):
        """``execute`` of :func:`contimg.pipeline.run_stages`: the stage as one Dask task
        (within its slot, e.g. ``image_slots``), timed into ``stage_timings``."""
        gid, attempt = run.group_id, run.attempt
        if self._stop.is_set():
            raise RuntimeError("stream stopping")
        t0 = time.time()
        try:
            # groups in flight overlap, but at most `image_slots` images at once: the
            # next group converts, flags and calibrates while this one images
            with self._slots.get(stage.slot) or contextlib.nullcontext():
                t0 = time.time()
                res = self._submit(run, stage, kwargs)
        except Exception as exc:
            self.db.record_stage(gid, attempt, stage.name, "failed", time.time() - t0, t0,
                                 _why(exc))
            raise
        status = "skipped" if res.get("status") == "skipped" else "ok"
        self.db.record_stage(gid, attempt, stage.name, status, time.time() - t0, t0,
                             json.dumps(res, default=str))
        log.info("group %s: %s %s in %.1f s%s", gid, stage.name, res.get("status", "ok"),
                 time.time() - t0, f" ({res['reason']})" if "reason" in res else "")
        return res

    def _disabled(self, run, stage, res):
        self.db.record_stage(run.group_id, run.attempt, stage.name, "skipped", 0.0,
                             time.time(), "disabled")

    def _before(self, run, stage):
        if stage.waits_for_calibration:
            self._wait_for_calibration(run.group_id, run.t_mid)

    def _open(self, gid):
        """The group's ready files and its lazy Dataset (headers only)."""
        from contimg.convert import BLOCK_BYTES
        from contimg.io.uvh5 import open_group

        files = [f["path"] for f in self.db.files(gid, status="ready")]
        if not files:
            raise BadInput(f"group {gid}: no readable subband files")
        # time chunks of bounded bytes, as convert_group opens files (its blocks)
        ds = open_group(files, n_subbands=self.cfg.n_subbands,
                        allow_missing=len(files) < self.cfg.n_subbands,
                        name_tolerance_s=self.cfg.tolerance_s,
                        chunks={"block_bytes": BLOCK_BYTES})
        return files, ds

    def _pipeline(self, g, opened=None) -> dict:
        from contimg.io.uvh5 import UVH5Error

        gid, attempt = g["group_id"], g["attempts"]
        try:
            files, ds = opened or self._open(gid)
        except UVH5Error as exc:
            self.db.record_stage(gid, attempt, "convert", "failed", 0.0, time.time(),
                                 str(exc))
            raise BadInput(str(exc)) from None
        stamp = min(tel.parse_subband_filename(f).stamp for f in files)
        ms = str(self.cfg.output / "ms" / f"{stamp}.ms")
        make_dirs(os.path.dirname(ms))
        times = ds.time.values
        t_mid = float(times[len(times) // 2])

        reuse = self._reusable(g, ms)
        done = {}
        if reuse:
            self._reuse(g, "convert", reuse.pop("convert"))
        else:
            flagged = self._convert(g, ds, ms)
            if flagged:
                done["flag"] = flagged
        run = group_run(self.cfg, self.db, ms, stamp, t_mid, group_id=gid, attempt=attempt)
        pipeline.run_stages(run, self._execute, skip=self.cfg.skip, done=done,
                            reuse={k: functools.partial(self._reuse, g, k, r)
                                   for k, r in reuse.items()},
                            before=self._before, on_skip=self._disabled)
        return {"ms": ms, **run.summary}

    def _convert(self, g, ds, ms):
        """Write the group's MS (the reads run on the workers; headers were read here),
        flagging on the way when the files may be read anywhere, so that the MS is
        written once, with its flags. Returns the flag stage's record in that case."""
        from contimg.convert import convert_group
        from contimg.io.uvh5 import UVH5Error

        gid, attempt = g["group_id"], g["attempts"]
        flag_here = (self.cfg.flag_in_convert and "flag" not in self.cfg.skip
                     and self.cfg.placement == "any")
        t0 = time.time()
        try:
            if isinstance(self.cfg.placement, dict):
                # every subband's holder connected (a node gone: fail naming its files)
                from contimg.cluster import wait_for_holders

                wait_for_holders(self.client, self.cfg.placement, ds.attrs["source_files"],
                                 self.cfg.holder_timeout_s)
            fut = convert_group(self.client, ds, ms, placement=self.cfg.placement,
                                overwrite=True, key=f"convert-{gid}-a{attempt}",
                                flag=(self.cfg.flag_strategy or True) if flag_here else None)
            conv = fut.result()
        except UVH5Error as exc:
            self.db.record_stage(gid, attempt, "convert", "failed", time.time() - t0, t0,
                                 str(exc))
            raise BadInput(str(exc)) from None
        except Exception as exc:
            self.db.record_stage(gid, attempt, "convert", "failed", time.time() - t0, t0,
                                 _why(exc))
            raise
        times = ds.time.values
        self.db.record_stage(gid, attempt, "convert", "ok", time.time() - t0, t0,
                             json.dumps(conv, default=str))
        self.db.register_ms(ms, group_id=gid, t_start=float(times[0]),
                            t_end=float(times[-1]), nbytes=conv["nbytes"], status="converted")
        log.info("group %s: convert ok in %.1f s -> %s", gid, time.time() - t0, ms)
        if not flag_here:
            return None
        fl = {"status": "ok", "flagged": conv["flagged"], "during": "convert"}
        self.db.record_stage(gid, attempt, "flag", "ok", conv["flag_seconds"], t0,
                             json.dumps(fl))
        return fl

    def _note_calibrator(self, gid, ds):
        """Record whether a calibrator transits in this group (header data only), so
        that groups in flight beside it can wait for its solutions."""
        if "calibrate" in self.cfg.skip:
            return
        from contimg import calibrate

        try:
            has = bool(calibrate.find_calibrator(ds, catalog=self.cfg.catalog))
        except Exception as exc:  # noqa: BLE001 - the calibrate stage reports it properly
            log.debug("group %s: calibrator check failed: %s", gid, exc)
            return
        self.db.annotate_group(gid, has_calibrator=has)

    def _wait_for_calibration(self, gid, t_mid):
        """Before applying: when no calibration set is valid at ``t_mid`` but a group in
        flight nearby is about to solve one, wait for it (at most
        ``calibration_wait_s``), so that the groups of a calibrator transit are not left
        uncalibrated just because they were processed at the same time."""
        if {"apply", "calibrate"} & self.cfg.skip:
            return
        deadline = time.monotonic() + self.cfg.calibration_wait_s
        told = False
        while not self._stop.is_set():
            cs = self.db.find_calset(t_mid)
            if cs is not None and cs["in_window"]:
                return
            busy = self.db.calibrations_under_way(t_mid, exclude=gid)
            if not busy:
                return
            if time.monotonic() > deadline:
                log.warning("group %s: gave up waiting for the calibration of %s", gid,
                            ", ".join(busy))
                return
            if not told:
                log.info("group %s: waiting for the calibration of %s", gid, ", ".join(busy))
                told = True
            self._stop.wait(0.5)

    # ------------------------------------------------------------------ reporting
    def _log_status(self, force=False):
        now = time.monotonic()
        if not force and now - self._last_status < self.cfg.status_every_s:
            return
        self._last_status = now
        c = self.db.counts()
        log.info("queue: " + ", ".join(f"{k} {v}" for k, v in c.items())
                 + f"; in flight here: {', '.join(self._running) or 'none'}")


def group_run(cfg: StreamConfig, db: StateDB, ms, name, t_mid, **kw) -> pipeline.GroupRun:
    """A :class:`contimg.pipeline.GroupRun` with the stream configuration's settings."""
    return pipeline.GroupRun(ms=ms, name=name, t_mid=t_mid, db=db, output=cfg.output,
                             flag_strategy=cfg.flag_strategy, catalog=cfg.catalog,
                             refant=cfg.refant, image_options=cfg.image_options, **kw)


def process_ms(client, db: StateDB, ms_path, cfg: StreamConfig) -> dict:
    """Run the stages after conversion on an existing Measurement Set, as ``contimg
    backfill --ms`` does (:func:`contimg.pipeline.process_ms`); products are registered."""
    return pipeline.process_ms(client, db, ms_path, output=cfg.output, skip=cfg.skip,
                               flag_strategy=cfg.flag_strategy, catalog=cfg.catalog,
                               refant=cfg.refant, image_options=cfg.image_options)
