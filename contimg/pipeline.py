"""The stage spine: the stages of one group after conversion, and the one runner.

:data:`PIPELINE` is the ordered list of :class:`Stage` s: ``flag`` → ``calibrate`` (only
when a calibrator transits) → ``apply`` (the valid calibration set nearest in time) →
``image`` → ``photometry`` (the catalogue's sources in the image, light curves, ESEs). Each stage is a task a Dask worker runs (``stage_*`` below: plain values in
and out, so the streaming service, backfill and a Jupyter user can submit them to any
cluster) and a *register* step the driver runs on its result (the state database, the
group's summary). :func:`run_stages` runs them for one :class:`GroupRun`; the streaming
service (``contimg.stream.Stream``), ``contimg backfill --ms`` (:func:`process_ms`) and
the notebooks all go through it. A new stage (photometry, mosaic) is one more entry in
:data:`PIPELINE`.

Every stage is idempotent: it may be re-run after a worker died half-way (outputs are
written to a temporary path and renamed; flagging recovers an interrupted run), which is
what lets Dask re-schedule it. A stage that has nothing to do (no calibrator transits,
no valid calibration set) returns ``{"status": "skipped", "reason": ...}`` instead of
failing the group.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Callable

from contimg.io.files import make_dirs

log = logging.getLogger(__name__)


def _plain(obj):
    """A JSON-friendly copy of a result (dataclass, numpy scalars, paths)."""
    import numpy as np

    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 64 else f"array{obj.shape}"
    if isinstance(obj, Path):
        return str(obj)
    return obj


@contextmanager
def local_dask():
    """Inside a Dask worker task, graphs built and computed by a stage run on local
    threads: without this, dask would pick the worker's distributed client at graph
    construction (P2P rechunks, tasks scheduled back onto the busy cluster) and then fail
    or deadlock when the stage computes with the threaded scheduler.

    Per thread (:func:`graphs.scheduling.local_threads`), never through the process-wide
    ``dask.config``: two stages running at once in one worker (or a stage beside the
    driver) never see, strip or leave behind each other's setting."""
    from graphs.scheduling import local_threads

    with local_threads(_worker_threads()):
        yield


def _worker_threads() -> int:
    """Threads of the Dask worker running this task (the CPU share a stage may use)."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return os.cpu_count() or 1


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


class StageError(RuntimeError):
    """A stage failed on a worker. Carries the original error as text only: no
    traceback, so nothing the stage opened stays alive after it (see ``_stage``)."""


def open_tables(path) -> list[str]:
    """dask-ms table proxies this process still holds on ``path`` (tables or subtables)."""
    try:
        from daskms.table_proxy import _table_cache
    except ImportError:  # pragma: no cover - private dask-ms detail
        return []
    prefix = os.path.abspath(str(path)).rstrip("/")
    return [repr(p) for p in list(_table_cache.values()) if prefix in repr(p)]


def _stage(fn):
    """Run a stage so that it leaves nothing open behind it, whether it succeeds or not.

    dask-ms keeps a table proxy (and casacore its table cache entry) alive for as long
    as anything references it. A failed task's exception and traceback are kept by the
    Dask worker, and the traceback's frames reference the stage's Datasets: a retry of
    the group in the same worker process would then see the old tables through
    casacore's cache. So the failure is re-raised as a :class:`StageError` that holds
    only text (the full traceback goes to this worker's log), and reference cycles are
    collected before the stage returns.
    """

    @functools.wraps(fn)
    def run(ms_path, *args, **kw):
        failure = None
        try:
            return fn(ms_path, *args, **kw)
        except Exception as exc:  # noqa: BLE001 - re-raised below, as text
            # as text: a log record holding exc_info would keep the frames alive
            log.error("%s(%s) failed:\n%s", fn.__name__, ms_path, traceback.format_exc())
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            gc.collect()
            left = open_tables(ms_path)
            if left:
                log.warning("%s(%s): %d dask-ms table(s) still open after the stage",
                            fn.__name__, ms_path, len(left))
        raise StageError(failure)

    return run


@_stage
def stage_flag(ms_path: str, strategy=None) -> dict:
    """RFI-flag the MS in place (``contimg.flagging.flag_ms``); the flag fraction."""
    from contimg.flagging import default_summary_path, flag_ms

    t0 = time.perf_counter()
    with local_dask():
        s = flag_ms(ms_path, strategy=strategy, backup=False,
                    summary_path=default_summary_path(ms_path))
    return {"status": "ok", "seconds": time.perf_counter() - t0,
            "flagged_before": s["before"]["overall"], "flagged": s["after"]["overall"]}


@_stage
def stage_calibrate(ms_path: str, *, db_path: str, cal_dir: str, name: str,
                    catalog=None, refant=None) -> dict:
    """Solve bandpass and gains if a calibrator transits in the MS; the solutions are
    written as CASA tables in ``cal_dir`` and registered in the state database. A solve
    that fails its quality checks is registered as rejected (by ``calibrate_ms``) and
    reported here as ``status="rejected"``: it is not a failure of the group."""
    from contimg import calibrate

    with local_dask():
        matches = calibrate.find_calibrator(ms_path, catalog=catalog)
    if not matches:
        return skipped("no calibrator transits in the primary beam")
    make_dirs(cal_dir)
    t0 = time.perf_counter()
    try:
        with local_dask():
            res = calibrate.calibrate_ms(ms_path, out_dir=cal_dir, catalog=catalog,
                                         refant=refant, db=db_path, name=name)
    except calibrate.CalibrationError as exc:
        log.warning("%s: calibration rejected: %s", ms_path, exc)
        return {"status": "rejected", "reason": f"{type(exc).__name__}: {exc}",
                "seconds": time.perf_counter() - t0}
    out = _plain(res)
    out.update(status="ok", seconds=time.perf_counter() - t0)
    return out


@_stage
def stage_apply(ms_path: str, *, db_path: str, t_mid: float) -> dict:
    """Apply the valid calibration set nearest in time (CORRECTED_DATA)."""
    from contimg import calibrate
    from contimg.state import StateDB

    with StateDB(db_path, create=False) as db:   # a worker never creates one
        cs = db.find_calset(t_mid)
    if cs is None:
        return skipped("no valid calibration set in the database")
    if not cs["in_window"]:
        log.warning("%s: no calibration set valid at this time; using the nearest, %s "
                    "(transit %.0f s away)", ms_path, cs["name"], abs(cs["t_transit"] - t_mid))
    t0 = time.perf_counter()
    with local_dask():
        calibrate.apply_ms(ms_path, cs["tables"])
    return {"status": "ok", "seconds": time.perf_counter() - t0, "calset_id": cs["id"],
            "calset": cs["name"], "in_window": bool(cs["in_window"])}


@_stage
def stage_image(ms_path: str, *, prefix: str, options: dict | None = None) -> dict:
    """Image the MS (CORRECTED_DATA when present) to FITS files ``<prefix>-*.fits``."""
    from contimg import imaging

    make_dirs(os.path.dirname(prefix) or ".")
    options = dict(options or {})
    # one gridding task per thread of this worker, each single-threaded: the stage
    # computes on local threads (see local_dask), not on the cluster's scheduler
    options.setdefault("grid_tasks", _worker_threads())
    options.setdefault("nthreads", 1)
    # the quick-look image: one major cycle fewer than the library's 0.8 (see
    # contimg.imaging.image_dataset's mgain), same residual noise on a full group
    options.setdefault("mgain", 0.9)
    t0 = time.perf_counter()
    with local_dask():
        res = imaging.image_ms(ms_path, prefix, **options)
    out = _plain(res)
    out.update(status="ok", seconds=time.perf_counter() - t0)
    return out


@_stage
def stage_photometry(ms_path: str, *, image: str | None, db_path: str,
                     group_id: str | None = None) -> dict:
    """Forced photometry of the state database's catalogue sources in the group's image,
    flux-scale normalisation, light-curve statistics and ESE candidates
    (:func:`contimg.photometry.stage_photometry`, settings from ``[science]``)."""
    from contimg import photometry

    if not image:
        return skipped("no image")
    res = photometry.stage_photometry(image, db_path, group_id=group_id,
                                      threads=_worker_threads())
    if res.get("skipped"):
        return skipped(res["skipped"])
    return {**_plain(res), "status": "ok"}


# ---------------------------------------------------------------------------------
# the spine
# ---------------------------------------------------------------------------------


@dataclass
class GroupRun:
    """One group (or one MS) going through the stages: what they need, what they gave.

    ``db`` is the driver's :class:`contimg.state.StateDB` (the register steps use it;
    the tasks get its path). ``summary`` collects what the group's log line reports.
    """

    ms: str
    name: str                      # the group's stamp: names its products
    t_mid: float                   # unix time of the middle integration
    db: object
    output: Path
    group_id: str | None = None
    attempt: int = 1
    flag_strategy: object = None
    catalog: object = None
    refant: int | None = None
    image_options: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)   # stage name -> result dict
    summary: dict = field(default_factory=dict)

    @property
    def calset_id(self):
        return self.results.get("apply", {}).get("calset_id")


@dataclass(frozen=True)
class Stage:
    """One entry of :data:`PIPELINE`.

    ``task(ms_path, **kwargs(run))`` runs on a worker and returns a dict;
    ``register(run, result)`` runs in the driver afterwards (also on a result kept from
    an earlier attempt). ``reusable``: a retry keeps this stage's result when every
    stage before it was kept too (the MS still on disk). ``slot``: a named limit on how
    many of these run at once (the streaming service's ``image_slots``).
    ``waits_for_calibration``: the stream first waits for a calibrator group in flight.
    """

    name: str
    task: Callable
    kwargs: Callable[[GroupRun], dict]
    register: Callable[[GroupRun, dict], None] | None = None
    reusable: bool = True
    slot: str | None = None
    waits_for_calibration: bool = False


def _register_flag(run, res):
    if res.get("status") == "ok":
        run.db.register_ms(run.ms, flagged_fraction=res["flagged"], status="flagged")
        run.summary["flagged"] = round(res["flagged"], 4)


def _register_calibration(run, res):
    if res.get("status") in ("ok", "rejected"):
        run.summary["calibration"] = res["status"]


def _register_apply(run, res):
    if res.get("status") == "ok":
        run.db.register_ms(run.ms, calset_id=res.get("calset_id"), status="calibrated")
        run.summary["applied"] = res.get("calset")


def _register_image(run, res):
    if res.get("status") == "ok":
        run.summary["image"] = register_image_result(
            run.db, res, group_id=run.group_id, ms_path=run.ms, calset_id=run.calset_id)


def _register_photometry(run, res):
    if res.get("status") == "ok":
        scale = res.get("scale")
        run.summary["photometry"] = {
            "sources": res.get("n_measured"), "ese_candidates": res.get("n_candidates"),
            "scale": round(scale, 4) if scale is not None and scale == scale else None}


def register_image_result(db, res: dict, *, group_id=None, ms_path=None,
                          calset_id=None):
    """Record the FITS products of an imaging stage result in the images table."""
    src = res["paths"] if isinstance(res.get("paths"), dict) else res
    paths = {k: str(v) for k, v in src.items() if isinstance(v, str) and v.endswith(".fits")}
    main = paths.get("image") or next(iter(paths.values()), None)
    if main is None:
        log.warning("imaging of %s returned no FITS path: %s", ms_path, res)
        return None
    beam = res.get("beam")
    if isinstance(beam, (list, tuple)) and len(beam) == 3:   # (bmaj ", bmin ", bpa deg)
        beam = {"bmaj_arcsec": beam[0], "bmin_arcsec": beam[1], "bpa_deg": beam[2]}
    elif beam is not None and not isinstance(beam, dict):
        beam = {"beam": beam}
    from contimg.app.products import image_qa

    db.register_image(main, group_id=group_id, ms_path=ms_path, products=paths,
                      noise_jy=res.get("noise_jy", res.get("noise")),
                      peak_jy=res.get("peak_jy", res.get("peak")), beam=beam,
                      calset_id=calset_id, qa=image_qa(main, res))   # + thumbnail
    return main


PIPELINE: tuple[Stage, ...] = (
    Stage("flag", stage_flag, lambda r: dict(strategy=r.flag_strategy), _register_flag),
    Stage("calibrate", stage_calibrate,
          lambda r: dict(db_path=str(r.db.path), cal_dir=str(Path(r.output) / "cal"),
                         name=r.name, catalog=r.catalog, refant=r.refant),
          _register_calibration),
    Stage("apply", stage_apply, lambda r: dict(db_path=str(r.db.path), t_mid=r.t_mid),
          _register_apply, waits_for_calibration=True),
    Stage("image", stage_image,
          lambda r: dict(prefix=str(Path(r.output) / "images" / r.name),
                         options=r.image_options),
          _register_image, reusable=False, slot="image"),
    Stage("photometry", stage_photometry,
          lambda r: dict(image=r.summary.get("image"), db_path=str(r.db.path),
                         group_id=r.group_id),
          _register_photometry),
)

#: every stage a group goes through, conversion first (names for ``--skip`` and timings)
STAGES: tuple[str, ...] = ("convert",) + tuple(s.name for s in PIPELINE)


def _reusable_prefix(stages) -> tuple[str, ...]:
    names = ["convert"]
    for s in stages:
        if not s.reusable:
            break
        names.append(s.name)
    return tuple(names)


#: the stages a retry may keep from the previous attempt, in order (a prefix of STAGES)
REUSABLE: tuple[str, ...] = _reusable_prefix(PIPELINE)


def stage_key(stage: str, name: str, attempt: int = 1) -> str:
    """A readable, unique Dask key for a stage task: ``<stage>-<group>-a<attempt>-<ns>``."""
    return f"{stage}-{name}-a{attempt}-{time.time_ns()}"


def submitter(client):
    """``execute`` for :func:`run_stages`: the stage as one task on ``client``."""

    def execute(run, stage, kwargs):
        fut = client.submit(stage.task, run.ms, **kwargs, pure=False,
                            key=stage_key(stage.name, run.group_id or run.name,
                                          run.attempt))
        return fut.result()

    return execute


def run_stages(run: GroupRun, execute, *, skip=frozenset(), done=None, reuse=None,
               before=None, on_skip=None, stages=PIPELINE) -> GroupRun:
    """Run ``stages`` in order for ``run``; returns it (``results``, ``summary``).

    execute(run, stage, kwargs) -> dict
        runs the stage's task (e.g. :func:`submitter`; the stream's adds retries'
        records, timings and slots) and returns its result.
    skip
        stage names not to run (recorded as ``skipped``/``disabled``).
    done
        stage name -> result already obtained (e.g. flags made during conversion).
    reuse
        stage name -> callable() giving the result kept from an earlier attempt.
    before(run, stage)
        called before a stage's task is submitted (the stream waits for calibration).
    on_skip(run, stage, result)
        called for a stage skipped by ``skip`` (the stream records it).

    Each result then goes through the stage's register step, in the driver.
    """
    done = dict(done or {})
    reuse = dict(reuse or {})
    for stage in stages:
        if stage.name in done:
            res = done[stage.name]
        elif stage.name in reuse:
            res = reuse[stage.name]()
        elif stage.name in skip:
            res = skipped("disabled")
            if on_skip is not None:
                on_skip(run, stage, res)
        else:
            if before is not None:
                before(run, stage)
            res = execute(run, stage, stage.kwargs(run))
        run.results[stage.name] = res
        if stage.register is not None:
            stage.register(run, res)
    return run


def process_ms(client, db, ms_path, *, output, skip=frozenset(), flag_strategy=None,
               catalog=None, refant=None, image_options=None) -> dict:
    """Run the stages after conversion on an existing Measurement Set (what
    ``contimg backfill --ms`` and the notebooks do); products are registered in ``db``.
    Returns ``{stage: result}``."""
    import numpy as np

    from contimg.io.ms import open_ms

    ms = os.path.abspath(str(ms_path))
    if not os.path.isdir(ms):
        raise FileNotFoundError(f"{ms}: no such Measurement Set")
    # on local threads: a compute through the distributed client would leave the MS's
    # dask-ms tables referenced by the scheduler's task records (in this process),
    # open for every stage of an in-process cluster
    with local_dask():
        times = np.asarray(open_ms(ms).time.values)
    db.register_ms(ms, t_start=float(times[0]), t_end=float(times[-1]))
    run = GroupRun(ms=ms, name=Path(ms).name.removesuffix(".ms"),
                   t_mid=float(times[len(times) // 2]), db=db, output=Path(output),
                   flag_strategy=flag_strategy, catalog=catalog, refant=refant,
                   image_options=dict(image_options or {}))
    submit = submitter(client)

    def execute(run, stage, kwargs):
        t0 = time.perf_counter()
        res = submit(run, stage, kwargs)
        log.info("%s: %s %s in %.1f s", ms, stage.name, res.get("status"),
                 time.perf_counter() - t0)
        return res

    return run_stages(run, execute, skip=frozenset(skip)).results
