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
from contimg import sky as _sky
from contimg.io.files import finalise, writable_dir
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


def find_calibrator(ds_or_ms, catalog=None, *, radius_deg=None, topn=None):
    """Calibrators transiting inside the beam during a group (cheap; no data read).

    Parameters
    ----------
    ds_or_ms : xarray.Dataset or str
        A contract Dataset (uses ``time``, ``PHASE_CENTER_RA/DEC``) or an MS path
        (reads TIME, FIELD_ID and the FIELD table only).
    catalog : Catalog, path or list of Source, optional
        Default ``$VLA_CATALOG`` if set, else the built-in Perley-Butler list.
    radius_deg, topn : optional
        Overrides of ``$CAL_MATCH_RADIUS_DEG`` (1.5) and ``$CAL_MATCH_TOPN`` (3).

    Returns
    -------
    list of :class:`contimg.sky.Transit`
        Brightest apparent flux first; empty when none transits in the data.
    """
    if isinstance(ds_or_ms, (str, os.PathLike)):
        times, ra0, dec0, _ = _meta_from_ms(ds_or_ms)
    else:
        ds = ds_or_ms
        times = np.asarray(ds.time.values, float)
        ra0 = np.asarray(ds.PHASE_CENTER_RA.values, float)
        dec0 = np.asarray(ds.PHASE_CENTER_DEC.values, float)
    return _sky.find_transits(catalog, times_unix=times, ra0=ra0, dec0=dec0,
                              radius_deg=radius_deg, topn=topn)


# ---------------------------------------------------------------------------------
# solving
# ---------------------------------------------------------------------------------

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
    lazy list, send the values back, return the generator's result."""
    lazy = next(steps)
    while True:
        try:
            lazy = steps.send(list(scheduling.compute(*lazy)))
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
                 validity_hours=None, **solver_opts):
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
    from contimg.io.ms import open_ms

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
    ds = open_ms(ms_path)
    times = np.asarray(ds.time.values, float)
    t_mid = float(times.mean())
    transits = []
    try:
        transits = find_calibrator(ds, catalog, radius_deg=solver_opts.get("radius_deg"),
                                   topn=solver_opts.get("topn"))
        sol, transits, q = solve_dataset(ds, catalog=catalog, transits=transits,
                                         refant=refant, **solver_opts)
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
    del ds
    # FIELD_ID of each gain solution: the field of its first integration
    _, _, _, fields = _meta_from_ms(ms_path)
    gi = int(params["gain_interval"])
    field_ids = fields[::gi][: sol.sizes["gain_time"]]
    tables = caltables.write_solutions(sol, ms_path, prefix, field_ids=field_ids)
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
# applying to an MS
# ---------------------------------------------------------------------------------

def _apply_step(tb, nchan, npol, target=64 << 20):
    """Rows per read/write of :func:`apply_ms`: ~``target`` bytes of visibilities, in
    whole tiles of DATA when it is tiled (the MS has no tile cache: a chunk that ends
    inside a tile makes the next one read and write that tile again)."""
    step = max(1, target // max(1, nchan * npol * 8))
    try:
        spec = tb.getdminfo("DATA").get("SPEC", {})
        cubes = list(spec.get("HYPERCUBES", {}).values())
        rows = int(cubes[0]["TileShape"][-1]) if cubes else 0
    except (RuntimeError, KeyError, IndexError, TypeError):
        rows = 0
    if rows > 0:
        step = max(1, round(step / rows)) * rows
    return step


_TMPCOL = "CORRECTED_DATA_CONTIMG_TMP"


def _begin_apply(tb, path, rows_per_chunk):
    """In the MS's table thread, under a write lock held until :func:`_end_apply`: the
    MS's rows, channels and antennas, checked; an empty copy of DATA's column added as
    the temporary column."""
    from casacore import tables as ct

    from kernels.constants import MJD_UNIX_OFFSET_S

    tb.lock(write=True)
    with ct.table(os.path.join(path, "SPECTRAL_WINDOW"), ack=False) as t:
        if t.nrows() != 1:
            raise ValueError(f"{path}: {t.nrows()} spectral windows; one supported")
        freqs = t.getcell("CHAN_FREQ", 0)
        width = float(np.abs(t.getcell("CHAN_WIDTH", 0)).max())
    with ct.table(os.path.join(path, "ANTENNA"), ack=False) as t:
        nant = t.nrows()
    a1 = tb.getcol("ANTENNA1").astype(np.int64)
    a2 = tb.getcol("ANTENNA2").astype(np.int64)
    if max(a1.max(), a2.max()) >= nant:
        raise ValueError(f"{path}: ANTENNA1/2 beyond the ANTENNA table")
    ddid = np.unique(tb.getcol("DATA_DESC_ID"))
    if ddid.size != 1:
        raise ValueError(f"{path}: {ddid.size} DATA_DESC_IDs; one supported")
    times, tidx = np.unique(tb.getcol("TIME") - MJD_UNIX_OFFSET_S, return_inverse=True)
    npol = tb.getcell("DATA", 0).shape[1]
    if _TMPCOL in tb.colnames():
        tb.removecols([_TMPCOL])
    desc = tb.getcoldesc("DATA")
    desc.pop("comment", None)
    dm = tb.getdminfo("DATA")
    # a data manager name not in use (an earlier run's renamed column keeps its own)
    dm = {"TYPE": dm["TYPE"], "NAME": f"CorrectedData_{os.getpid()}_{_time.time_ns()}",
          "SPEC": dm.get("SPEC", {})}
    tb.addcols(ct.maketabdesc(ct.makecoldesc(_TMPCOL, desc)), dm)
    return dict(nrow=a1.size, a1=a1, a2=a2, tidx=tidx.astype(np.int64), times=times,
                freqs=freqs, width=width, nant=nant, npol=npol,
                step=rows_per_chunk or _apply_step(tb, freqs.size, npol))


def _end_apply(tb, ok):
    """In the table thread: the temporary column becomes CORRECTED_DATA (``ok``) or is
    removed; the write lock of :func:`_begin_apply` is released."""
    try:
        if ok:
            if "CORRECTED_DATA" in tb.colnames():
                tb.removecols(["CORRECTED_DATA"])
            tb.renamecol(_TMPCOL, "CORRECTED_DATA")
            tb.flush()
        elif _TMPCOL in tb.colnames():
            tb.removecols([_TMPCOL])
    finally:
        tb.unlock()


def apply_ms(ms_path, tables, *, interp="linear", flag=True, rows_per_chunk=None):
    """Write CORRECTED_DATA = DATA corrected by bandpass and gain tables.

    One lazy computation, computed here on local threads: the MS's rows in contiguous,
    tile-aligned runs (read in the MS's table thread) through
    :func:`graphs.calibrate.apply_rows` (the correction of ``graphs.calibrate.apply``)
    and written back run by run.

    Parameters
    ----------
    ms_path : str
        The MS (one spectral window; XX/YY or any two parallel hands).
    tables : str, list of str or dict
        At most one B and one G table (ours or CASA's), e.g. ``CalResult.tables`` or
        the ``tables`` of a registry row.
    interp : {"linear", "nearest"}
        Gain interpolation in time (amplitude and phase separately).
    flag : bool
        Also flag (in FLAG) the samples whose solutions are flagged, as CASA's
        ``applycal`` does (``applymode='calflag'``). Weights are not rescaled
        (CASA's ``calwt=False``).
    rows_per_chunk : int, optional
        Rows corrected per task (default ~64 MiB of visibilities, whole tiles).

    The corrected data go to a temporary column that replaces CORRECTED_DATA only when
    complete, so an interrupted run leaves the previous CORRECTED_DATA (if any).
    """
    import dask
    import dask.array as da

    from contimg.io.mscolumns import RowTarget, ms_proxy, read_rows, run_in_table
    from graphs.calibrate import _solution_arrays, apply_rows, prepare_solutions

    ms_path = os.path.abspath(os.fspath(ms_path))
    if not os.path.isfile(os.path.join(ms_path, "table.dat")):
        raise FileNotFoundError(f"{ms_path}: not a Measurement Set (no table.dat)")
    if isinstance(tables, str) and tables.lstrip().startswith("{"):
        tables = json.loads(tables)       # the registry's JSON column, undecoded
    if isinstance(tables, dict):
        tables = list(tables.values())
    sol = caltables.read_solutions(tables)
    tic = _time.perf_counter()
    proxy = ms_proxy(ms_path)
    ok = False
    try:
        m = run_in_table(proxy, _begin_apply, ms_path, rows_per_chunk, write=False)
        try:
            # solutions -> the MS's DATA convention (conjugated)
            prepared = prepare_solutions(
                *_solution_arrays(sol), freqs=m["freqs"], times=m["times"],
                nstations=m["nant"], npol=m["npol"], channel_width=m["width"],
                interp=interp, conjugate=True)
        except ValueError as exc:
            raise ValueError(f"{ms_path} with {', '.join(map(str, tables))}: {exc}") \
                from None
        cell = (m["freqs"].size, m["npol"])
        data = read_rows(proxy, "DATA", m["nrow"], m["step"], cell, np.complex64,
                         "apply-read-data")
        flg = read_rows(proxy, "FLAG", m["nrow"], m["step"], cell, bool, "apply-read-flag")
        vis, new_flag = apply_rows(data, flg, m["a1"], m["a2"], m["tidx"],
                                   dask.delayed(prepared, traverse=False))
        stores = [da.store(vis, RowTarget(proxy, _TMPCOL), lock=False, compute=False)]
        if flag:
            stores.append(da.store(new_flag, RowTarget(proxy, "FLAG"), lock=False,
                                   compute=False))
        scheduling.compute(*stores, threads=scheduling.threads() or os.cpu_count())
        ok = True
    finally:
        try:
            run_in_table(proxy, _end_apply, ok, write=False)
        except Exception:  # noqa: BLE001 - the first error is the one raised
            if ok:
                raise
    finalise(ms_path)   # the column's new files: the product mode, whatever the umask
    log.info("%s: CORRECTED_DATA written from %s in %.2f s", ms_path, ", ".join(
        map(str, tables)), _time.perf_counter() - tic)


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
                "calibrate.gain_mode", "calibrate.min_snr", "paths.db")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("apply", help="write CORRECTED_DATA of an MS from B/G tables")
    p.add_argument("ms", help="Measurement Set")
    p.add_argument("tables", nargs="*", help="bandpass and/or gain tables (ours or CASA's); "
                   "none: the set the state database finds for the MS's mid-time")
    add_options(p, "paths.db", "calibrate.interp", "calibrate.apply_flag")
    p.set_defaults(func=cmd_apply)


def _cfg(args):
    from contimg.config import from_args

    return getattr(args, "cfg", None) or from_args(args)


def cmd_calibrate(args):
    """``contimg calibrate MS``: prints the tables and quality; exit 2 when rejected."""
    from contimg.state import StateDB

    cfg = _cfg(args)
    c = cfg.calibrate
    register = args.register or "paths.db" in vars(args)
    db = StateDB(cfg.paths.db) if register else None
    try:
        res = calibrate_ms(args.ms, out_dir=args.out_dir, catalog=c.catalog,
                           refant=c.refant, db=db, name=args.name,
                           validity_hours=c.validity_hours, gain_interval=c.gain_interval,
                           gain_mode=c.gain_mode, min_snr=c.min_snr)
    except CalibrationError as exc:
        print(f"calibration rejected ({exc.reason}): {exc}")
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
    apply_ms(args.ms, tables, interp=cfg.calibrate.interp, flag=cfg.calibrate.apply_flag)
    print(f"CORRECTED_DATA written to {args.ms} from {', '.join(tables)}")
    return 0
