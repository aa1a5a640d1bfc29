"""Calibration entry points: find the calibrator, solve, write CASA tables, register, apply.

For the streaming pipeline and for scientists:

* :func:`find_calibrator` (cheap) -- which catalogue calibrators transit inside the
  beam during a group (a Dataset or an MS);
* :func:`solve_dataset` -- model + bandpass + gains of a calibrator Dataset, computed,
  with quality checks (raises :class:`CalibrationError` subclasses);
* :func:`calibrate_ms` -- the whole step on an MS: solve, write ``<name>.B`` and
  ``<name>.G`` CASA tables, register them in the state database;
* :func:`apply_ms` -- write CORRECTED_DATA of an MS from B/G tables (ours or CASA's);
* :func:`cmd_calibrate` / :func:`cmd_apply` -- ``contimg calibrate`` / ``contimg apply``.

The solver and its conventions are described in :mod:`graphs.calibrate` and
:mod:`kernels.solvers`; the table format in :mod:`contimg.caltables`; the catalogue
and the operators' environment variables (``VLA_CATALOG``, ``CAL_MATCH_RADIUS_DEG``,
``CAL_MATCH_TOPN``, ``PIPELINE_POINTING_DEC_DEG``) in :mod:`contimg.sky`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time as _time
from dataclasses import dataclass, field

import numpy as np

from contimg import caltables
from contimg import msfields
from contimg import sky as _sky
from contimg.calapply import apply_ms  # re-exported: applying lives in contimg.calapply
from contimg.io.files import writable_dir
from contimg.runtime import release_freed_memory
from graphs import scheduling

log = logging.getLogger(__name__)


__all__ = [
    "CalibrationError", "NoCalibratorError", "TooMuchFlaggedError", "NoConvergenceError",
    "CalResult", "find_calibrator", "solve_dataset", "calibrate_ms", "apply_ms",
    "cmd_calibrate", "cmd_apply", "add_subcommands",
]


class CalibrationError(RuntimeError):
    """Calibration failed; the message says why. ``reason`` is a short code."""

    reason = "failed"


class NoCalibratorError(CalibrationError):
    """No catalogue calibrator transits inside the primary beam during the data."""

    reason = "no_calibrator"


class TooMuchFlaggedError(CalibrationError):
    """Too much of the data, or of the solutions, is flagged."""

    reason = "too_much_flagged"


class NoConvergenceError(CalibrationError):
    """The solver did not converge for too many solutions."""

    reason = "no_convergence"


@dataclass
class CalResult:
    """Outcome of :func:`calibrate_ms`."""

    name: str
    ms_path: str
    calibrator: str
    refant: int
    tables: dict                 # {"B": path, "G": path}
    t_transit: float             # unix seconds
    valid_start: float
    valid_end: float
    quality: dict
    params: dict
    transits: list = field(default_factory=list)
    set_id: int | None = None
    status: str = "valid"
    # ``solutions`` (the computed solutions Dataset) is set as a plain attribute, not a
    # field, so that ``dataclasses.asdict`` of a result stays small and JSON-friendly

    def as_dict(self):
        d = {k: getattr(self, k) for k in ("name", "ms_path", "calibrator", "refant", "tables",
                                            "t_transit", "valid_start", "valid_end", "quality",
                                            "params", "set_id", "status")}
        d["transits"] = [t.as_dict() for t in self.transits]
        return d


# ---------------------------------------------------------------------------------
# finding the calibrator
# ---------------------------------------------------------------------------------

def _meta_from_ms(ms_path):
    """times (unix, per integration), phase centres (ICRS rad), frequencies of an MS."""
    from casacore import tables as ct

    from kernels.constants import MJD_UNIX_OFFSET_S

    ms_path = os.fspath(ms_path)
    if not os.path.isfile(os.path.join(ms_path, "table.dat")):
        raise FileNotFoundError(f"{ms_path}: not a Measurement Set (no table.dat)")
    with ct.table(ms_path, ack=False) as tb:
        time = tb.getcol("TIME")
        fid = tb.getcol("FIELD_ID")
    with ct.table(os.path.join(ms_path, "FIELD"), ack=False) as t:
        pdir = t.getcol("PHASE_DIR")[:, 0, :]
    ut, first = np.unique(time, return_index=True)
    f = fid[first]
    return ut - MJD_UNIX_OFFSET_S, pdir[f, 0], pdir[f, 1], f


def find_calibrator(ds_or_ms, catalog=None, *, radius_deg=None, topn=None, field=None):
    """Calibrators the data observe (cheap; no data read).

    A drift scan (DSA-110) observes a calibrator that transits inside the beam during
    the data; a pointed (tracked) scan one within its field's primary beam, for the
    whole scan (see :mod:`contimg.msfields`).

    Parameters
    ----------
    ds_or_ms : xarray.Dataset or str
        A contract Dataset (uses ``time``, ``PHASE_CENTER_RA/DEC``) or an MS path
        (reads TIME, FIELD_ID and the FIELD, ANTENNA and SPECTRAL_WINDOW tables only).
    catalog : Catalog, path or list of Source, optional
        Default ``$VLA_CATALOG`` if set, else the built-in Perley-Butler list.
    radius_deg, topn : optional
        Overrides of ``$CAL_MATCH_RADIUS_DEG`` (1.5; for pointed scans the default is
        the primary beam's half-power radius) and ``$CAL_MATCH_TOPN`` (3).
    field : int or str, optional
        Only this field of an MS (a FIELD id or name).

    Returns
    -------
    list of :class:`contimg.msfields.FieldTransit` (:class:`contimg.sky.Transit`)
        Brightest apparent flux first; empty when the data observe none.
    """
    return msfields.find_field_calibrators(_geometry(ds_or_ms, field), catalog,
                                           radius_deg=radius_deg, topn=topn)


def _geometry(ds_or_ms, field=None):
    if isinstance(ds_or_ms, (str, os.PathLike)):
        ms = os.fspath(ds_or_ms)
        ids = None
        if field is not None:
            from contimg.io.ms.fields import read_fields, resolve_field

            ids = resolve_field(ms, field, read_fields(ms))
        return msfields.ms_geometry(ms, field_ids=ids)
    ds = ds_or_ms
    ms = ds.attrs.get("ms_path")
    if ms and os.path.isfile(os.path.join(ms, "table.dat")):
        # the FIELD ids and names of the Dataset's integrations
        g = msfields.ms_geometry(ms, field_ids=ds.attrs.get("ms_field_id"))
        if g.times.size == ds.sizes["time"]:
            return msfields.dataset_geometry(ds, field_id=g.field_id,
                                             field_names=g.field_names, source=ms)
    return msfields.dataset_geometry(ds)


def _calibrator_data(ds, geom, transits):
    """The integrations and correlations to solve on: those in which the brightest
    observed calibrator is in the beam (a drift: all), their parallel hands; the
    calibrators in the beam there (the model) and the FIELD id of each integration."""
    from contimg.calapply import parallel_hands

    cal = transits[0]
    idx = np.arange(ds.sizes["time"]) if cal.index is None else np.asarray(cal.index)
    same = [t for t in transits if t.index is None or np.intersect1d(t.index, idx).size]
    if idx.size < ds.sizes["time"]:
        log.info("solving on the %d integrations of field %s %r in which %s is in the beam",
                 idx.size, cal.field_id, cal.field_name, cal.name)
        ds = ds.isel(time=idx)
    fields = (geom.field_id[idx] if geom.field_id is not None
              else np.zeros(idx.size, np.int64))
    return parallel_hands(ds), same, fields


# ---------------------------------------------------------------------------------
# solving
# ---------------------------------------------------------------------------------

#: Visibility bytes (complex64) of one chunk of the calibration passes. A chunk in
#: flight costs about 2.6 times this (visibilities, model, weights, flags and the
#: read's temporaries), and ``batch`` chunks (one per core) are in flight at once:
#: the solve's memory is set by this budget, not by the group. 96 MiB keeps a full
#: DSA-110 group's chunking (all 24 integrations x 48 channels x 4656 baselines =
#: 86 MiB) and gives larger groups chunks of the same size.
CHUNK_BYTES = 96 << 20


def calibration_chunks(ntime, nbl, npol, fchunk, budget=CHUNK_BYTES) -> dict:
    """``open_ms`` chunks (``{"time": n, "frequency": m}``) for the calibration passes:
    at most ``budget`` bytes of visibilities per chunk, whatever the number of
    baselines.

    Every integration in one chunk when a chunk of some channels holds them all: the
    passes then read the data twice, not four times (:mod:`graphs.calpasses`). The
    channels per chunk are the largest divisor of ``fchunk`` (the reader's channels per
    chunk, a subband: one MS tile) that fits, so that no chunk straddles two tiles, and
    the bandpass (per channel) is solved from the same sums. When even one channel's
    integrations do not fit, chunks of ``fchunk`` channels and as many integrations as
    fit (the four-pass path).
    """
    ntime, nbl, npol, fchunk = int(ntime), int(nbl), int(npol), max(1, int(fchunk))
    per_chan = ntime * nbl * npol * 8           # one channel, every integration
    fits = [m for m in range(fchunk, 0, -1) if fchunk % m == 0 and m * per_chan <= budget]
    if fits:
        return {"time": ntime, "frequency": fits[0]}
    per_time = nbl * fchunk * npol * 8
    return {"time": max(1, min(ntime, budget // max(per_time, 1))), "frequency": fchunk}


def _open_for_passes(ms_path, field=None):
    """The MS as a Dataset chunked by :func:`calibration_chunks`."""
    from contimg.io.ms import open_ms

    ds = open_ms(ms_path, field=field)
    vis = ds.VISIBILITY.data
    want = calibration_chunks(ds.sizes["time"], ds.sizes["baseline_id"],
                              ds.sizes["polarization"], vis.chunks[2][0])
    if (vis.chunks[0][0], vis.chunks[2][0]) == (want["time"], want["frequency"]):
        return ds
    log.info("calibration chunks: %d integrations x %d channels x %d baselines (%.0f MiB "
             "of visibilities)", want["time"], want["frequency"], ds.sizes["baseline_id"],
             want["time"] * want["frequency"] * ds.sizes["baseline_id"]
             * ds.sizes["polarization"] * 8 / 2 ** 20)
    return open_ms(ms_path, field=field, chunks=want)


def _quality(sol, ds_flag_fraction):
    """Quality figures of a computed solutions Dataset (antennas that have data)."""
    bflag = sol.BANDPASS_FLAG.values
    gflag = sol.GAIN_FLAG.values
    # antennas with data (an SNR on some bandpass solution), flagged or not
    solved = (sol.BANDPASS_SNR.values > 0).any(axis=(1, 2))
    n_solved = int(solved.sum())
    bf = float(bflag[solved].mean()) if n_solved else 1.0
    gf = float(gflag[:, solved].mean()) if n_solved else 1.0
    bsnr = sol.BANDPASS_SNR.values[solved][~bflag[solved]]
    gsnr = sol.GAIN_SNR.values[:, solved][~gflag[:, solved]]
    bchi = sol.BANDPASS_CHI2.values
    bn = sol.BANDPASS_NSAMP.values
    gchi = sol.GAIN_CHI2.values
    gn = sol.GAIN_NSAMP.values
    with np.errstate(divide="ignore", invalid="ignore"):
        bred = np.where(bn > 0, bchi / bn, np.nan)
        gred = np.where(gn > 0, gchi / gn, np.nan)
    return dict(
        n_antennas_solved=n_solved,
        data_flagged_fraction=float(ds_flag_fraction),
        bandpass_flagged_fraction=bf,
        gain_flagged_fraction=gf,
        bandpass_snr_median=float(np.median(bsnr)) if bsnr.size else 0.0,
        gain_snr_median=float(np.median(gsnr)) if gsnr.size else 0.0,
        bandpass_converged_fraction=float(sol.BANDPASS_CONVERGED.values[bn > 0].mean())
        if (bn > 0).any() else 0.0,
        gain_converged_fraction=float(sol.GAIN_CONVERGED.values[gn > 0].mean())
        if (gn > 0).any() else 0.0,
        bandpass_iterations_max=int(sol.BANDPASS_NITER.values.max()),
        gain_iterations_max=int(sol.GAIN_NITER.values.max()),
        bandpass_chi2_per_sample_median=float(np.nanmedian(bred)) if np.isfinite(bred).any()
        else float("nan"),
        gain_chi2_per_sample=[float(x) for x in np.nanmean(gred, axis=1)]
        if np.isfinite(gred).any() else [],
    )


def solve_dataset(ds, *, catalog=None, transits=None, refant=None, gain_interval=1,
                  gain_mode="ap", min_snr=3.0, max_iter=200, tol=1e-8,
                  max_data_flagged=0.7, max_solutions_flagged=0.5, min_converged=0.95,
                  radius_deg=None, topn=None):
    """Predict the calibrator model and solve bandpass + gains of a Dataset (computed).

    Parameters
    ----------
    ds : xarray.Dataset
        Contract visibility Dataset of a group in which a calibrator transits.
    catalog, radius_deg, topn
        See :func:`find_calibrator`; or give ``transits`` (its result) directly.
    refant, gain_interval, gain_mode, min_snr, max_iter, tol
        Solver options (:func:`graphs.calibrate.solve`).
    max_data_flagged : float
        Largest tolerated flagged fraction of the cross-correlations.
    max_solutions_flagged : float
        Largest tolerated flagged fraction of the bandpass or gain solutions (over
        antennas that have data).
    min_converged : float
        Smallest tolerated fraction of converged solutions.

    Returns
    -------
    (solutions, transits, quality)
        ``solutions`` the computed solutions Dataset, ``quality`` a dict.

    Raises
    ------
    NoCalibratorError, TooMuchFlaggedError, NoConvergenceError
    """
    from graphs import calibrate as gcal
    from graphs import calpasses

    if transits is None:
        transits = find_calibrator(ds, catalog, radius_deg=radius_deg, topn=topn)
    if not transits:
        pdec = math.degrees(float(np.median(ds.PHASE_CENTER_DEC.values)))
        ra = np.degrees(ds.PHASE_CENTER_RA.values)
        cat = _sky.default_catalog(catalog)
        raise NoCalibratorError(
            f"no calibrator of {cat.origin or 'the catalogue'} ({len(cat)} sources) transits "
            f"within {_sky.match_radius_deg() if radius_deg is None else radius_deg} deg "
            f"of dec {pdec:.3f} deg during RA {ra[0]:.3f}..{ra[-1]:.3f} deg")
    sources = [t.source for t in transits]
    tic = _time.perf_counter()
    # flagged fraction of the cross-correlations: an integer count (FLAG.where(...)
    # would make a float64 copy of the whole cube, ~2 s on a full group)
    cross = np.asarray(ds.baseline_antenna1_id.values != ds.baseline_antenna2_id.values)
    if cross.any():
        fl = ds.FLAG.data[:, cross] if cross.sum() < cross.size else ds.FLAG.data
        nflag = fl.sum(dtype=np.int64)
        flag_frac = float(scheduling.compute(nflag)[0]) / fl.size
    else:
        flag_frac = 1.0
    if flag_frac > max_data_flagged:
        raise TooMuchFlaggedError(
            f"{flag_frac * 100:.1f} % of the cross-correlations are flagged "
            f"(limit {max_data_flagged * 100:.0f} %)")
    freqs = np.asarray(ds.frequency.values, float)
    flux = _sky.apparent_flux(sources, ds.PHASE_CENTER_RA.values, ds.PHASE_CENTER_DEC.values,
                              freqs)
    log.info("calibrating on %s (apparent %s Jy at 1.4 GHz)",
             ", ".join(t.name for t in transits),
             ", ".join(f"{t.apparent_flux_jy:.2f}" for t in transits))
    model = gcal.predict_model(ds, [s.ra for s in sources], [s.dec for s in sources], flux)
    # in passes over the chunks (graphs.calpasses): memory of a chunk, not of the group
    sol = run_steps(calpasses.solve_steps(ds, model, refant=refant,
                                          gain_interval=gain_interval, gain_mode=gain_mode,
                                          min_snr=min_snr, max_iter=max_iter, tol=tol,
                                          batch=os.cpu_count() or 1))
    q = _quality(sol, flag_frac)
    q["solve_seconds"] = _time.perf_counter() - tic
    log.info("solved in %.2f s: refant %d, %d antennas, bandpass SNR median %.1f, "
             "%.1f %% bandpass / %.1f %% gain solutions flagged", q["solve_seconds"],
             int(sol.REFANT.values), q["n_antennas_solved"], q["bandpass_snr_median"],
             100 * q["bandpass_flagged_fraction"], 100 * q["gain_flagged_fraction"])
    conv = min(q["bandpass_converged_fraction"], q["gain_converged_fraction"])
    if conv < min_converged:
        raise NoConvergenceError(
            f"only {conv * 100:.1f} % of solutions converged within {max_iter} iterations "
            f"(tol {tol:g}; need {min_converged * 100:.0f} %)" + _nonfinite_note(ds, cross))
    if q["n_antennas_solved"] < 3:
        raise TooMuchFlaggedError(f"only {q['n_antennas_solved']} antennas have unflagged "
                                  "cross-correlations with the calibrator")
    if max(q["bandpass_flagged_fraction"], q["gain_flagged_fraction"]) > max_solutions_flagged:
        raise TooMuchFlaggedError(
            f"{q['bandpass_flagged_fraction'] * 100:.1f} % of bandpass and "
            f"{q['gain_flagged_fraction'] * 100:.1f} % of gain solutions flagged (SNR < "
            f"{min_snr} or no data; limit {max_solutions_flagged * 100:.0f} %)"
            + _nonfinite_note(ds, cross))
    return sol, transits, q


def run_steps(steps):
    """Drive a pass generator (:func:`graphs.calpasses.solve_steps`): compute each pass's
    lazy list, send the values back, return the generator's result. Freed memory goes
    back to the OS after each compute (:func:`contimg.runtime.release_freed_memory`): on
    a group of 4x DSA-110's baselines the resident set otherwise grew by 0.24 GiB over
    the passes (glibc keeps the pages of the freed per-baseline sums)."""
    lazy = next(steps)
    while True:
        vals = list(scheduling.compute(*lazy))
        release_freed_memory()
        try:
            lazy = steps.send(vals)
        except StopIteration as stop:
            return stop.value


def _nonfinite_note(ds, cross) -> str:
    """When a solve fails: how many unflagged cross-correlation visibilities were NaN or
    inf (the solver masks them), so that the error says so; "" when none were."""
    bad = ~np.isfinite(ds.VISIBILITY.data[:, cross]) & ~ds.FLAG.data[:, cross]
    n = bad.sum(dtype=np.int64)
    n = int(scheduling.compute(n)[0])
    if not n:
        return ""
    return (f"; {n} unflagged visibilities ({100 * n / bad.size:.1f} %) are NaN or inf "
            "(masked in the solve): a correlator fault?")


def _open_db(db):
    if db is None:
        return None
    from contimg.state import StateDB

    if isinstance(db, (str, os.PathLike)):
        return StateDB(path=os.fspath(db), create=False)   # (on a worker: never a new one)
    return db


def configured_solver_options(**given) -> dict:
    """Solver keywords: ``given`` over the configured ``[calibrate]`` ``gain_interval``,
    ``gain_mode`` and ``min_snr`` (a configuration file reaches the stream's workers
    through ``CONTIMG_CONFIG``)."""
    from contimg.config import current

    conf = current().calibrate
    out = {k: getattr(conf, k) for k in ("gain_interval", "gain_mode", "min_snr")}
    out.update(given)
    return out


def calibrate_ms(ms_path, *, out_dir=None, catalog=None, refant=None, db=None, name=None,
                 validity_hours=None, field=None, **solver_opts):
    """Calibrate a calibrator group's MS: solve, write CASA tables, register.

    Parameters
    ----------
    ms_path : str
        Measurement Set of a group in which a calibrator transits (DATA column).
    out_dir : str, optional
        Where ``<name>.B`` and ``<name>.G`` go (default: next to the MS).
    catalog : Catalog, path or list of Source, optional
        Calibrator catalogue (default: the configured one, ``$VLA_CATALOG``, else the
        built-in Perley-Butler list).
    refant : int, optional
        Reference antenna (ANTENNA table row); default automatic.
    db : StateDB or path, optional
        Register the set there (valid, or rejected with the reason on failure).
    name : str, optional
        Table name prefix (default the MS name without ``.ms``).
    validity_hours : float, optional
        Half-width of the validity window around the transit (default: the configured
        ``[calibrate] validity_hours``, 12 h).
    field : int or str, optional
        Use only this field (a FIELD id or name; default every field). In a multi-field
        MS of pointed scans the solve uses the integrations of the scans in which the
        brightest observed calibrator is in the beam (:func:`find_calibrator`); with
        four correlations it uses the parallel hands (the tables are per feed).
    **solver_opts
        ``gain_interval``, ``gain_mode``, ``min_snr`` (default: the configured
        ``[calibrate]`` values), ``max_iter``, ``tol``, ``max_data_flagged``,
        ``max_solutions_flagged``, ``min_converged``, ``radius_deg``, ``topn`` (see
        :func:`solve_dataset`).

    Returns
    -------
    CalResult

    Raises
    ------
    CalibrationError
        (``NoCalibratorError``, ``TooMuchFlaggedError``, ``NoConvergenceError``): the
        set is then registered as rejected (when ``db`` is given), never as valid.
    """
    if validity_hours is None:
        from contimg.config import current

        validity_hours = current().calibrate.validity_hours
    solver_opts = configured_solver_options(**solver_opts)
    ms_path = os.path.abspath(os.fspath(ms_path))
    base = os.path.basename(ms_path.rstrip("/"))
    name = name or (base[:-3] if base.endswith(".ms") else base)
    out_dir = os.path.abspath(out_dir) if out_dir else os.path.dirname(ms_path)
    writable_dir(out_dir, "calibration table directory")   # before solving
    prefix = os.path.join(out_dir, name)
    db = _open_db(db)
    params = dict(solver="stefcal", refant_requested=refant, **solver_opts)
    if field is not None:
        params["field"] = field
    # chunks of a bounded size, whatever the group's baselines (see CHUNK_BYTES)
    ds = _open_for_passes(ms_path, field=field)
    times = np.asarray(ds.time.values, float)
    t_mid = float(times.mean())
    transits = []
    try:
        geom = _geometry(ds)
        transits = msfields.find_field_calibrators(
            geom, catalog, radius_deg=solver_opts.get("radius_deg"),
            topn=solver_opts.get("topn"))
        if not transits:
            raise NoCalibratorError(msfields.no_calibrator_message(
                geom, catalog, radius_deg=solver_opts.get("radius_deg")))
        ds, transits, fields = _calibrator_data(ds, geom, transits)
        try:
            # the model of a pointed scan's calibrators: through the data's own beam
            sol, transits, q = solve_dataset(ds, catalog=catalog,
                                             transits=msfields.through_own_beam(transits, geom),
                                             refant=refant, **solver_opts)
        except CalibrationError as exc:
            cal = transits[0]
            if cal.kind == "pointed":      # say which field and calibrator
                exc.args = (f"{cal.name} in field {cal.field_id} {cal.field_name!r}: "
                            f"{exc}",)
            raise
    except CalibrationError as exc:
        log.error("%s: calibration rejected: %s", ms_path, exc)
        if db is not None:
            t_tr = transits[0].t_transit if transits else t_mid
            exc.set_id = db.register_calset(
                name, ms_path=ms_path, calibrator=transits[0].name if transits else "",
                t_transit=t_tr, valid_start=t_tr - validity_hours * 3600,
                valid_end=t_tr + validity_hours * 3600, refant=-1 if refant is None else refant,
                tables={}, params=_jsonable(params), quality={}, status="rejected",
                reason=f"{exc.reason}: {exc}")
        raise
    # tables describe the MS's DATA as it is (CASA's view): when the reader did not
    # conjugate it (an MS in pyuvdata 2.x's convention) neither may the tables
    as_is = ds.attrs.get("ms_conjugation") == "pyuvdata"
    del ds
    # FIELD_ID of each gain solution: the field of its first integration
    gi = int(params["gain_interval"])
    field_ids = fields[::gi][: sol.sizes["gain_time"]]
    out = sol
    if as_is:
        out = sol.assign(BANDPASS=np.conj(sol.BANDPASS), GAIN=np.conj(sol.GAIN))
    tables = caltables.write_solutions(out, ms_path, prefix, field_ids=field_ids)
    cal = transits[0]
    res = CalResult(name=name, ms_path=ms_path, calibrator=cal.name,
                    refant=int(sol.REFANT.values), tables=tables, t_transit=cal.t_transit,
                    valid_start=cal.t_transit - validity_hours * 3600,
                    valid_end=cal.t_transit + validity_hours * 3600, quality=q,
                    params=_jsonable(params), transits=transits)
    res.solutions = sol
    if db is not None:
        res.set_id = db.register_calset(
            name, ms_path=ms_path, calibrator=cal.name, t_transit=cal.t_transit,
            valid_start=res.valid_start, valid_end=res.valid_end, refant=res.refant,
            tables=tables, params=res.params, quality=_jsonable(q), status="valid")
    log.info("%s: calibration set %s on %s (refant %d) -> %s", ms_path, name, cal.name,
             res.refant, ", ".join(tables.values()))
    return res


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item")
                                 else str(o)))


# ---------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------

def add_subcommands(sub):
    """Register ``calibrate`` and ``apply`` on an argparse subparsers object (options from
    the ``[calibrate]`` and ``[paths]`` configuration fields)."""
    from contimg.config import add_options

    p = sub.add_parser("calibrate", help="solve bandpass + gains on a calibrator MS and "
                       "write CASA tables (optionally register them)")
    p.add_argument("ms", help="Measurement Set of a group with a calibrator transit")
    p.add_argument("--out-dir", default=None, help="where <name>.B/.G go (default: beside MS)")
    p.add_argument("--name", default=None, help="table name prefix (default: MS name)")
    p.add_argument("--register", action="store_true",
                   help="register the set in the state database ([paths] db; implied by "
                        "--db)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_options(p, "calibrate.catalog", "calibrate.refant", "calibrate.gain_interval",
                "calibrate.gain_mode", "calibrate.min_snr", "paths.db", "calibrate.field")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("apply", help="write CORRECTED_DATA of an MS from B/G tables")
    p.add_argument("ms", help="Measurement Set")
    p.add_argument("tables", nargs="*", help="bandpass and/or gain tables (ours or CASA's); "
                   "none: the set the state database finds for the MS's mid-time")
    add_options(p, "paths.db", "calibrate.interp", "calibrate.apply_flag", "calibrate.field")
    p.set_defaults(func=cmd_apply)


def _cfg(args):
    from contimg.config import from_args

    return getattr(args, "cfg", None) or from_args(args)


def cmd_calibrate(args):
    """``contimg calibrate MS``: prints the tables and quality; exit 2 when rejected."""
    from contimg.io.ms import UnknownFieldError
    from contimg.state import StateDB

    cfg = _cfg(args)
    c = cfg.calibrate
    register = args.register or "paths.db" in vars(args)
    db = StateDB(cfg.paths.db) if register else None
    try:
        res = calibrate_ms(args.ms, out_dir=args.out_dir, catalog=c.catalog,
                           refant=c.refant, db=db, name=args.name,
                           validity_hours=c.validity_hours, gain_interval=c.gain_interval,
                           gain_mode=c.gain_mode, min_snr=c.min_snr, field=c.field)
    except CalibrationError as exc:
        print(f"calibration rejected ({exc.reason}): {exc}")
        return 2
    except UnknownFieldError as exc:
        print(f"calibration not started: {exc}")
        return 2
    if args.json:
        print(json.dumps(_jsonable(res.as_dict()), indent=1))
    else:
        q = res.quality
        print(f"calibrator {res.calibrator}, refant {res.refant}, "
              f"{q['n_antennas_solved']} antennas")
        print(f"bandpass SNR median {q['bandpass_snr_median']:.1f}, gain SNR median "
              f"{q['gain_snr_median']:.1f}; flagged {100 * q['bandpass_flagged_fraction']:.1f}"
              f" % / {100 * q['gain_flagged_fraction']:.1f} %")
        for k, v in res.tables.items():
            print(f"{k}: {v}")
        if res.set_id is not None:
            print(f"registered as set {res.set_id}")
    return 0


def cmd_apply(args):
    """``contimg apply MS [TABLES...]``."""
    from contimg.io.ms import UnknownFieldError

    cfg = _cfg(args)
    tables = list(args.tables)
    if not tables:
        from contimg.state import StateDB

        if not os.path.exists(cfg.paths.db):
            print(f"give calibration tables, or a state database to look them up in "
                  f"(--db; {cfg.paths.db} does not exist)")
            return 2
        db = StateDB(cfg.paths.db)
        times, *_ = _meta_from_ms(args.ms)
        row = db.find_calset(float(np.mean(times)))
        if row is None:
            print(f"no valid calibration set in the database for {args.ms}")
            return 2
        t = row["tables"]
        tables = list((json.loads(t) if isinstance(t, str) else t).values())
        if not row.get("in_window", True):
            log.warning("nearest calibration set %s is outside its validity window",
                        row.get("name"))
    try:
        apply_ms(args.ms, tables, interp=cfg.calibrate.interp, flag=cfg.calibrate.apply_flag,
                 field=cfg.calibrate.field)
    except UnknownFieldError as exc:
        print(f"nothing applied: {exc}")
        return 2
    where = "" if cfg.calibrate.field is None else f" (field {cfg.calibrate.field})"
    print(f"CORRECTED_DATA written to {args.ms}{where} from {', '.join(tables)}")
    return 0
