"""Calibration graphs: model prediction, bandpass + gain solutions, application.

All three are lazy: they build a Dask graph over a contract visibility Dataset and
never compute.

Chunking
    The solvers work per frequency chunk (one subband). Every pass over the data is
    one task per chunk that reduces it to per-baseline sums (``kernels.solvers``); the
    bandpass (one solution per channel over the whole transit) is then solved inside
    the chunk's own task, and the gains (one solution per time interval over the whole
    band) from the sum of the chunks' partial sums. The time axis is taken as one
    chunk (a calibrator group is 24 integrations).

Sequence (:func:`solve`)
    1. ``B0``: bandpass per channel over all integrations, no prior;
    2. ``Gp``: phase-only gains per integration over the whole band with ``B0``
       applied (this is the time-variable phase);
    3. ``B``: bandpass per channel over all integrations with ``Gp`` taken out;
    4. ``G``: gains per interval (amplitude+phase or phase only) with ``B`` applied.
    Solutions are referenced to one antenna (zero phase), chosen automatically (the
    antenna with the most usable data and highest bandpass SNR) unless given, and
    flagged below ``min_snr`` or without data.

Convention: the Dataset's, ``V_pq = g_p conj(g_q) b_p conj(b_q) M_pq`` with the contract's
``V`` (see :mod:`contimg.io.ms`; CASA tables hold the complex conjugates, which
:mod:`contimg.caltables` takes care of).
"""

from __future__ import annotations

import logging
import operator

import dask
import dask.array as da
import numpy as np
import xarray as xr

from graphs import scheduling
from kernels import solvers
from kernels.dft import predict_points
from kernels.jones import casa_errors
from kernels.predict import predict_dft

log = logging.getLogger(__name__)

__all__ = ["source_lmn", "predict_model", "solve", "apply", "interpolate_gains"]


# ---------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------

def source_lmn(ra0, dec0, ra, dec):
    """(ntime, nsrc, 3) direction cosines (l, m, n - 1) of ICRS sources about the
    per-integration phase centres ``ra0, dec0`` (ntime,), all radians."""
    ra0 = np.asarray(ra0, float)[:, None]
    dec0 = np.asarray(dec0, float)[:, None]
    ra = np.asarray(ra, float)[None, :]
    dec = np.asarray(dec, float)[None, :]
    dra = ra - ra0
    cd = np.cos(dec)
    l = cd * np.sin(dra)
    m = np.sin(dec) * np.cos(dec0) - cd * np.sin(dec0) * np.cos(dra)
    n = np.sin(dec) * np.sin(dec0) + cd * np.cos(dec0) * np.cos(dra)
    return np.ascontiguousarray(np.stack([l, m, n - 1.0], axis=-1))


def _predict_block(uvw, lmn, flux, freqs, npol):
    uvw = np.ascontiguousarray(uvw, dtype=np.float64)
    ntime, nbl = uvw.shape[:2]
    nchan = freqs.size
    step = np.diff(freqs)
    if nchan == 1 or np.allclose(step, step[0], rtol=0, atol=1e-3):
        res = np.empty((ntime, nbl, nchan, npol), np.complex64)
        predict_points(uvw, lmn, flux, float(freqs[0]),
                       float(step[0]) if nchan > 1 else 0.0, res)
        return res
    out = np.zeros((ntime, nbl, nchan), np.complex128)       # irregular channels
    if lmn.shape[1]:
        predict_dft(uvw, lmn, flux, freqs, out)
    res = np.empty((ntime, nbl, nchan, npol), np.complex64)
    res[...] = out[..., None]
    return res


def predict_model(ds, ra, dec, apparent_flux):
    """Lazy model visibilities of point sources (unpolarised: XX = YY = I).

    Exact direct Fourier transform, w term included, against each integration's own
    phase centre (``PHASE_CENTER_RA/DEC``) with the Dataset's UVW.

    Parameters
    ----------
    ds : xarray.Dataset
        Contract visibility Dataset (gives UVW, frequencies, phase centres, chunks).
    ra, dec : array (nsrc,)
        ICRS positions, radians.
    apparent_flux : array (ntime, nsrc, nchan)
        Flux density each integration sees at each channel (Jy): spectrum times
        primary-beam power response (computed by the caller, e.g.
        :func:`contimg.sky.apparent_flux`).

    Returns
    -------
    xarray.DataArray
        Same dims, coords and chunks as ``ds.VISIBILITY``, complex64.
    """
    ra = np.atleast_1d(np.asarray(ra, float))
    dec = np.atleast_1d(np.asarray(dec, float))
    ntime, nchan = ds.sizes["time"], ds.sizes["frequency"]
    flux = np.asarray(apparent_flux, float)
    if flux.shape != (ntime, ra.size, nchan):
        raise ValueError(f"apparent_flux has shape {flux.shape}, expected "
                         f"(ntime, nsrc, nchan) = {(ntime, ra.size, nchan)}")
    lmn = source_lmn(ds.PHASE_CENTER_RA.values, ds.PHASE_CENTER_DEC.values, ra, dec)
    freqs = np.asarray(ds.frequency.values, float)
    npol = ds.sizes["polarization"]
    vis = ds.VISIBILITY.data
    if not isinstance(vis, da.Array):
        vis = da.from_array(vis, chunks=(-1, -1, 48, -1))
    tchunks, fchunks = vis.chunks[0], vis.chunks[2]
    uvw = da.asarray(ds.UVW.data).rechunk((tchunks, -1, -1), method=scheduling.rechunk_method())
    ublk = uvw.to_delayed()[:, 0, 0]
    t_edges = np.concatenate([[0], np.cumsum(tchunks)])
    f_edges = np.concatenate([[0], np.cumsum(fchunks)])
    nbl = vis.shape[1]
    rows = []
    for i in range(len(tchunks)):
        t0, t1 = t_edges[i], t_edges[i + 1]
        row = []
        for k in range(len(fchunks)):
            f0, f1 = f_edges[k], f_edges[k + 1]
            blk = dask.delayed(_predict_block, pure=True)(
                ublk[i], np.ascontiguousarray(lmn[t0:t1]),
                np.ascontiguousarray(flux[t0:t1, :, f0:f1]), freqs[f0:f1], npol,
                dask_key_name=f"predict-t{i:02d}-sb{k:02d}-{vis.name}")
            row.append(da.from_delayed(blk, (t1 - t0, nbl, f1 - f0, npol), dtype=np.complex64))
        rows.append(da.concatenate(row, axis=2))
    model = da.concatenate(rows, axis=0)
    return xr.DataArray(model, dims=ds.VISIBILITY.dims, coords=ds.VISIBILITY.coords,
                        name="MODEL", attrs={"units": "Jy", "sources": int(ra.size)})


# ---------------------------------------------------------------------------------
# solving
# ---------------------------------------------------------------------------------

def _compact_antennas(ds):
    a1 = np.asarray(ds.baseline_antenna1_id.values, np.int64)
    a2 = np.asarray(ds.baseline_antenna2_id.values, np.int64)
    stations = np.unique(np.concatenate([a1[a1 != a2], a2[a1 != a2]]))
    index = np.full(int(ds.sizes.get("antenna_id", stations.max() + 1)), -1, np.int64)
    index[stations] = np.arange(stations.size)
    return stations, index[a1], index[a2]


def _sums(vis, model, flag, weight, a1, a2, tbin, nct, fbin, ncf, prior_t, prior_f):
    npol, nbl = vis.shape[3], vis.shape[1]
    A = np.zeros((nct, ncf, npol, nbl), np.complex128)
    B = np.zeros((nct, ncf, npol, nbl), np.float64)
    C = np.zeros((nct, ncf, npol, nbl), np.float64)
    N = np.zeros((nct, ncf, npol, nbl), np.int64)
    solvers.accumulate(np.ascontiguousarray(vis), np.ascontiguousarray(model),
                       np.ascontiguousarray(flag), np.ascontiguousarray(weight, np.float32),
                       a1, a2, tbin, fbin, np.ascontiguousarray(prior_t),
                       np.ascontiguousarray(prior_f), A, B, C, N)
    return A, B, C, N


def _solve_sums(sums, a1, a2, nant, max_iter, tol, phase_only):
    A, B, C, N = sums
    nct, ncf, npol = A.shape[:3]
    g = np.zeros((nct, ncf, npol, nant), np.complex128)
    err = np.zeros((nct, ncf, npol, nant), np.float64)
    niter = np.zeros((nct, ncf, npol), np.int64)
    conv = np.zeros((nct, ncf, npol), np.bool_)
    chi2 = np.zeros((nct, ncf, npol), np.float64)
    nsamp = np.zeros((nct, ncf, npol), np.int64)
    solvers.solve_cells(A, B, C, N, a1, a2, nant, int(max_iter), float(tol), bool(phase_only),
                        g, err, niter, conv, chi2, nsamp)
    return dict(g=g, err=err, niter=niter, converged=conv, chi2=chi2, nsamp=nsamp)


def _add_sums(*parts):
    out = [p.copy() for p in parts[0]]
    for p in parts[1:]:
        for o, x in zip(out, p):
            o += x
    return tuple(out)


def _bandpass_sums(vis, model, flag, weight, a1, a2, nant, prior_t):
    """Bandpass sums (npol, nbl, nchan) of one chunk; ``prior_t`` (ntime, nant, npol)."""
    ntime, nbl, nchan, npol = vis.shape
    if prior_t is None:
        prior_t = np.ones((ntime, nant, npol), np.complex128)
    A = np.zeros((npol, nbl, nchan), np.complex128)
    B = np.zeros((npol, nbl, nchan), np.float64)
    C = np.zeros((npol, nbl, nchan), np.float64)
    N = np.zeros((npol, nbl, nchan), np.int64)
    solvers.accumulate_bandpass(np.ascontiguousarray(vis), np.ascontiguousarray(model),
                                np.ascontiguousarray(flag),
                                np.ascontiguousarray(weight, np.float32), a1, a2,
                                np.ascontiguousarray(prior_t), A, B, C, N)
    return A, B, C, N


def _bandpass_solve(sums, a1, a2, nant, opts):
    """Per-channel bandpass of a frequency chunk from its (summed) bandpass sums."""
    # -> cell layout (1, nchan, npol, nbl)
    cells = tuple(np.ascontiguousarray(x.transpose(2, 0, 1))[None] for x in sums)
    res = _solve_sums(cells, a1, a2, nant, opts["max_iter"], opts["tol"], False)
    # (1, nchan, npol, nant) -> (nant, nchan, npol)
    res["g"] = res["g"][0].transpose(2, 0, 1)
    res["err"] = res["err"][0].transpose(2, 0, 1)
    for k in ("niter", "converged", "chi2", "nsamp"):
        res[k] = res[k][0]                     # (nchan, npol)
    return res


def _bandpass_chunk(vis, model, flag, weight, a1, a2, nant, prior_t, opts):
    """Per-channel solutions of one frequency chunk over all integrations."""
    return _bandpass_solve(_bandpass_sums(vis, model, flag, weight, a1, a2, nant, prior_t),
                           a1, a2, nant, opts)


def _gain_sums_chunk(vis, model, flag, weight, a1, a2, nant, tbin, nct, bandpass):
    """Per-interval partial sums of one frequency chunk with its bandpass applied."""
    ntime, nbl, nchan, npol = vis.shape
    A = np.zeros((nct, npol, nbl), np.complex128)
    B = np.zeros((nct, npol, nbl), np.float64)
    C = np.zeros((nct, npol, nbl), np.float64)
    N = np.zeros((nct, npol, nbl), np.int64)
    solvers.accumulate_gains(np.ascontiguousarray(vis), np.ascontiguousarray(model),
                             np.ascontiguousarray(flag),
                             np.ascontiguousarray(weight, np.float32), a1, a2, tbin,
                             np.ascontiguousarray(bandpass["g"], np.complex128), A, B, C, N)
    return tuple(x[:, None] for x in (A, B, C, N))        # (nct, 1, npol, nbl)


def _solve_gains(sums, a1, a2, nant, opts, phase_only):
    res = _solve_sums(sums, a1, a2, nant, opts["max_iter"], opts["tol"], phase_only)
    res["g"] = res["g"][:, 0]              # (nct, npol, nant)
    res["err"] = res["err"][:, 0]
    for k in ("niter", "converged", "chi2", "nsamp"):
        res[k] = res[k][:, 0]              # (nct, npol)
    res["g"] = res["g"].transpose(0, 2, 1)  # (nct, nant, npol)
    res["err"] = res["err"].transpose(0, 2, 1)
    return res


def _expand_gp(gp, tbin):
    return np.ascontiguousarray(gp["g"][tbin])  # (ntime, nant, npol)


def _choose_refant(bp_list, stations, refant):
    """Station index of the reference antenna."""
    if refant is not None:
        if refant not in set(stations.tolist()):
            raise ValueError(f"refant {refant}: antenna has no unflagged cross-correlations "
                             f"(solvable antennas: {stations.tolist()})")
        return int(refant)
    snr = None
    for bp in bp_list:
        s = np.median(_snr(bp["g"], bp["err"]), axis=(1, 2))
        snr = s if snr is None else snr + s
    # any antenna within 10 % of the best median SNR will do: take the first such
    # (deterministic, and the lowest station numbers are the core of the array)
    good = np.nonzero(snr >= 0.9 * snr.max())[0]
    return int(stations[int(good[0])])


def _reference(g, ref_c, flagged):
    """Rotate phases so that the reference antenna (compact index) has zero phase.

    g: (..., nant, npol) with the antenna axis second to last. Cells where the refant
    is unusable fall back to the next antenna in order that is usable.
    """
    g = g.copy()
    nant = g.shape[-2]
    order = [ref_c] + [a for a in range(nant) if a != ref_c]
    ref = np.take(g, ref_c, axis=-2)
    ok = ~np.take(flagged, ref_c, axis=-2)
    for a in order[1:]:
        if ok.all():
            break
        alt_ok = ~np.take(flagged, a, axis=-2)
        use = ~ok & alt_ok
        ref = np.where(use, np.take(g, a, axis=-2), ref)
        ok = ok | use
    rot = np.where(np.abs(ref) > 0, np.conj(ref) / np.where(np.abs(ref) > 0, np.abs(ref), 1), 1)
    return g * np.expand_dims(rot, -2)


#: SNR reported for a solution with zero residual (noise-free data)
SNR_NOISE_FREE = 1e9


def _snr(g, err):
    """|g| / err; 0 without data (err = inf), SNR_NOISE_FREE for a perfect fit."""
    a = np.abs(g)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(err > 0, a / np.where(err > 0, err, 1.0), SNR_NOISE_FREE)
    return np.where(np.isfinite(err) & (a > 0), snr, 0.0)


def _finish(bp_list, g_res, stations, nstations, refant, opts):
    """Gather: choose and apply the reference antenna, flag, expand to all stations."""
    ref_station = _choose_refant(bp_list, stations, refant)
    ref_c = int(np.searchsorted(stations, ref_station))
    min_snr = opts["min_snr"]
    # bandpass (nant, nchan, npol)
    bg = np.concatenate([b["g"] for b in bp_list], axis=1)
    berr = np.concatenate([b["err"] for b in bp_list], axis=1)
    # CASA's errors: the noise estimate pooled over the polarisations (kernels.jones)
    berr = casa_errors(berr.transpose(1, 0, 2), np.concatenate(
        [b["chi2"] for b in bp_list], axis=0), np.concatenate(
        [b["nsamp"] for b in bp_list], axis=0)).transpose(1, 0, 2)
    bsnr = _snr(bg, berr)
    bflag = (bsnr <= min_snr) | (np.abs(bg) == 0)      # CASA keeps SNR > minsnr
    bg = _reference(bg.transpose(1, 0, 2), ref_c, bflag.transpose(1, 0, 2)).transpose(1, 0, 2)
    gg = g_res["g"]                         # (nct, nant, npol)
    gerr = casa_errors(g_res["err"], g_res["chi2"], g_res["nsamp"])
    gsnr = _snr(gg, gerr)
    gflag = (gsnr <= min_snr) | (np.abs(gg) == 0)
    gg = _reference(gg, ref_c, gflag)

    def full(arr, fill, axis):
        shape = list(arr.shape)
        shape[axis] = nstations
        out = np.full(shape, fill, dtype=arr.dtype)
        idx = [slice(None)] * arr.ndim
        idx[axis] = stations
        out[tuple(idx)] = arr
        return out

    return dict(
        bandpass=full(bg.astype(np.complex64), 1 + 0j, 0),
        bandpass_flag=full(bflag, True, 0),
        bandpass_snr=full(bsnr.astype(np.float32), 0, 0),
        bandpass_err=full(np.where(np.isfinite(berr), berr, 0).astype(np.float32), 0, 0),
        bandpass_chi2=np.concatenate([b["chi2"] for b in bp_list], axis=0),
        bandpass_niter=np.concatenate([b["niter"] for b in bp_list], axis=0),
        bandpass_converged=np.concatenate([b["converged"] for b in bp_list], axis=0),
        bandpass_nsamp=np.concatenate([b["nsamp"] for b in bp_list], axis=0),
        gain=full(gg.astype(np.complex64), 1 + 0j, 1),
        gain_flag=full(gflag, True, 1),
        gain_snr=full(gsnr.astype(np.float32), 0, 1),
        gain_err=full(np.where(np.isfinite(gerr), gerr, 0).astype(np.float32), 0, 1),
        gain_chi2=g_res["chi2"], gain_niter=g_res["niter"],
        gain_converged=g_res["converged"], gain_nsamp=g_res["nsamp"],
        refant=np.int64(ref_station),
    )


def solve(ds, model, *, refant=None, gain_interval=1, gain_mode="ap", min_snr=3.0,
          max_iter=200, tol=1e-8, phase_pass=True):
    """Lazy bandpass + gain solutions of a calibrator Dataset against ``model``.

    Parameters
    ----------
    ds : xarray.Dataset
        Contract visibility Dataset (``VISIBILITY``, ``FLAG``, ``WEIGHT``); dask- or
        numpy-backed. Autocorrelations are ignored.
    model : xarray.DataArray
        Model visibilities with ``VISIBILITY``'s dims (e.g. :func:`predict_model`).
    refant : int, optional
        Reference antenna as an index of the antenna table (``antenna_id``); default:
        chosen automatically.
    gain_interval : int
        Integrations per gain solution (1 = every integration; the last interval may
        be shorter).
    gain_mode : {"ap", "p"}
        Amplitude and phase, or phase only, for the final gains.
    min_snr : float
        Solutions with a lower SNR (|g| / its standard deviation) are flagged.
    max_iter, tol : int, float
        StEFCal iteration limit and relative convergence tolerance.
    phase_pass : bool
        Take the time-variable phase out before the final bandpass (steps 1-3 of the
        module docstring); ``False`` solves the bandpass once, without it.

    Returns
    -------
    xarray.Dataset
        Lazy solutions: ``BANDPASS`` (antenna_id, frequency, polarization) with
        ``BANDPASS_FLAG/_SNR/_ERR``, ``GAIN`` (gain_time, antenna_id, polarization) with
        ``GAIN_FLAG/_SNR/_ERR``, per-solution quality ``BANDPASS_CHI2/_NITER/
        _CONVERGED/_NSAMP`` (frequency, polarization) and ``GAIN_CHI2/...``
        (gain_time, polarization), and ``REFANT``. Attributes record the options.
    """
    opts, ntime, nstations, stations, a1, a2, nant = _solve_setup(
        ds, gain_interval, gain_mode, min_snr, max_iter, tol)
    npol = ds.sizes["polarization"]
    vis = _as_dask(ds.VISIBILITY)
    fchunks = vis.chunks[2]
    ch = (ntime, vis.shape[1], fchunks, npol)
    vis = vis.rechunk(ch, method=scheduling.rechunk_method())
    mod = _as_dask(model).rechunk(ch, method=scheduling.rechunk_method())
    flg = _as_dask(ds.FLAG).rechunk(ch, method=scheduling.rechunk_method())
    wgt = _as_dask(ds.WEIGHT).rechunk(ch, method=scheduling.rechunk_method())
    blocks = [b.ravel() for b in (vis.to_delayed(), mod.to_delayed(), flg.to_delayed(),
                                  wgt.to_delayed())]
    nchunk = len(fchunks)

    gi = int(gain_interval)
    tbin_g, nct, t_centres, t_width = gain_bins(ds, gi)
    tbin_p = np.arange(ntime, dtype=np.int64)

    d = dask.delayed
    blk = [tuple(b[k] for b in blocks) for k in range(nchunk)]
    tag = [f"sb{k:02d}" for k in range(nchunk)]
    bp0 = [d(_bandpass_chunk, pure=True)(*blk[k], a1, a2, nant, None, opts,
                                         dask_key_name=f"bandpass0-{tag[k]}-{vis.name}")
           for k in range(nchunk)]
    if phase_pass:
        ps = [d(_gain_sums_chunk, pure=True)(*blk[k], a1, a2, nant, tbin_p, ntime, bp0[k],
                                             dask_key_name=f"phase-sums-{tag[k]}-{vis.name}")
              for k in range(nchunk)]
        gp = d(_solve_gains, pure=True)(d(_add_sums)(*ps), a1, a2, nant, opts, True,
                                        dask_key_name=f"phase-solve-{vis.name}")
        prior = d(_expand_gp)(gp, tbin_p)
        bp = [d(_bandpass_chunk, pure=True)(*blk[k], a1, a2, nant, prior, opts,
                                            dask_key_name=f"bandpass-{tag[k]}-{vis.name}")
              for k in range(nchunk)]
    else:
        bp = bp0
    gs = [d(_gain_sums_chunk, pure=True)(*blk[k], a1, a2, nant, tbin_g, nct, bp[k],
                                         dask_key_name=f"gain-sums-{tag[k]}-{vis.name}")
          for k in range(nchunk)]
    g = d(_solve_gains, pure=True)(d(_add_sums)(*gs), a1, a2, nant, opts, gain_mode == "p",
                                   dask_key_name=f"gain-solve-{vis.name}")
    fin = d(_finish, pure=True)(bp, g, stations, nstations, refant, opts,
                                dask_key_name=f"calsolutions-{vis.name}")

    def lazy(key, shape, dtype):
        return da.from_delayed(d(operator.getitem, pure=True)(fin, key), shape, dtype=dtype)

    return solutions_dataset(lazy, ds, nstations, nct, t_centres, t_width,
                             _solve_attrs(gain_mode, gi, min_snr, max_iter, tol, phase_pass))


def _solve_setup(ds, gain_interval, gain_mode, min_snr, max_iter, tol):
    """The option checks and antenna set-up of :func:`solve` and
    :func:`graphs.calpasses.solve_steps`: ``(solver options, ntime, nstations, stations,
    a1, a2, nant)`` (``a1``/``a2`` index the ``nant`` cross-correlated ``stations``)."""
    if gain_mode not in ("ap", "p"):
        raise ValueError(f"gain_mode must be 'ap' or 'p', got {gain_mode!r}")
    if int(gain_interval) < 1:
        raise ValueError(f"gain_interval must be >= 1 integration, got {gain_interval}")
    opts = dict(max_iter=int(max_iter), tol=float(tol), min_snr=float(min_snr))
    ntime = ds.sizes["time"]
    nstations = ds.sizes["antenna_id"] if "antenna_id" in ds.sizes else int(
        max(ds.baseline_antenna1_id.max(), ds.baseline_antenna2_id.max()) + 1)
    stations, a1, a2 = _compact_antennas(ds)
    nant = stations.size
    if nant < 3:
        raise ValueError(f"need at least 3 antennas with cross-correlations, got {nant}")
    return opts, ntime, nstations, stations, a1, a2, nant


def _as_dask(x):
    """A Dataset variable's (or an array's) dask array; numpy in 48-channel chunks."""
    x = x.data if hasattr(x, "data") else x
    if not isinstance(x, da.Array):
        x = da.from_array(x, chunks=(-1, -1, 48, -1))
    return x


def _solve_attrs(gain_mode, gi, min_snr, max_iter, tol, phase_pass):
    """The options a solutions Dataset records."""
    return dict(gain_mode=gain_mode, gain_interval_integrations=gi, min_snr=float(min_snr),
                max_iter=int(max_iter), tol=float(tol), phase_pass=bool(phase_pass))


def gain_bins(ds, gi):
    """Gain solution intervals of ``gi`` integrations: the interval index of each
    integration, their count, centres and widths (s)."""
    ntime = ds.sizes["time"]
    tbin_g = np.arange(ntime, dtype=np.int64) // gi
    nct = int(tbin_g.max()) + 1
    times = np.asarray(ds.time.values, float)
    t_centres = np.array([times[tbin_g == k].mean() for k in range(nct)])
    dt = float(ds.time.attrs.get("integration_time", np.median(np.diff(times))
                                 if ntime > 1 else 0.0))
    t_width = np.array([dt * np.count_nonzero(tbin_g == k) for k in range(nct)])
    return tbin_g, nct, t_centres, t_width


def solutions_dataset(get, ds, nstations, nct, t_centres, t_width, attrs):
    """The solutions Dataset (see :func:`solve`); ``get(key, shape, dtype)`` gives each
    array of :func:`_finish`'s dict (lazy or computed)."""
    lazy = get
    freqs = np.asarray(ds.frequency.values, float)
    npol = ds.sizes["polarization"]
    nf = freqs.size
    sol = xr.Dataset(
        dict(
            BANDPASS=(("antenna_id", "frequency", "polarization"),
                      lazy("bandpass", (nstations, nf, npol), np.complex64)),
            BANDPASS_FLAG=(("antenna_id", "frequency", "polarization"),
                           lazy("bandpass_flag", (nstations, nf, npol), bool)),
            BANDPASS_SNR=(("antenna_id", "frequency", "polarization"),
                          lazy("bandpass_snr", (nstations, nf, npol), np.float32)),
            BANDPASS_ERR=(("antenna_id", "frequency", "polarization"),
                          lazy("bandpass_err", (nstations, nf, npol), np.float32)),
            BANDPASS_CHI2=(("frequency", "polarization"),
                           lazy("bandpass_chi2", (nf, npol), np.float64)),
            BANDPASS_NITER=(("frequency", "polarization"),
                            lazy("bandpass_niter", (nf, npol), np.int64)),
            BANDPASS_CONVERGED=(("frequency", "polarization"),
                                lazy("bandpass_converged", (nf, npol), bool)),
            BANDPASS_NSAMP=(("frequency", "polarization"),
                            lazy("bandpass_nsamp", (nf, npol), np.int64)),
            GAIN=(("gain_time", "antenna_id", "polarization"),
                  lazy("gain", (nct, nstations, npol), np.complex64)),
            GAIN_FLAG=(("gain_time", "antenna_id", "polarization"),
                       lazy("gain_flag", (nct, nstations, npol), bool)),
            GAIN_SNR=(("gain_time", "antenna_id", "polarization"),
                      lazy("gain_snr", (nct, nstations, npol), np.float32)),
            GAIN_ERR=(("gain_time", "antenna_id", "polarization"),
                      lazy("gain_err", (nct, nstations, npol), np.float32)),
            GAIN_CHI2=(("gain_time", "polarization"), lazy("gain_chi2", (nct, npol), np.float64)),
            GAIN_NITER=(("gain_time", "polarization"),
                        lazy("gain_niter", (nct, npol), np.int64)),
            GAIN_CONVERGED=(("gain_time", "polarization"),
                            lazy("gain_converged", (nct, npol), bool)),
            GAIN_NSAMP=(("gain_time", "polarization"), lazy("gain_nsamp", (nct, npol), np.int64)),
            REFANT=((), lazy("refant", (), np.int64)),
        ),
        coords=dict(
            antenna_id=np.arange(nstations),
            frequency=("frequency", freqs, dict(ds.frequency.attrs)),
            polarization=ds.polarization.values,
            gain_time=("gain_time", t_centres, {"units": "s", "description": "unix seconds"}),
            gain_interval=("gain_time", t_width, {"units": "s"}),
        ),
        attrs=dict(attrs, solver="stefcal", convention="V = g_p conj(g_q) b_p conj(b_q) M "
                                                        "(contract Dataset convention)"),
    )
    return sol


# ---------------------------------------------------------------------------------
# applying
# ---------------------------------------------------------------------------------

def interpolate_gains(gain_time, gain, flag, times, interp="linear"):
    """Gains at ``times`` from solutions at ``gain_time``.

    gain (nsol, nant, npol) complex, flag (same) bool. ``nearest`` takes the nearest
    unflagged solution; ``linear`` interpolates amplitude and phase separately
    between the two unflagged solutions around each time (nearest beyond the ends).
    Returns ``(g, flag)`` of shape (ntime, nant, npol); times with no unflagged
    solution at all are flagged.
    """
    if interp not in ("nearest", "linear"):
        raise ValueError(f"interp must be 'nearest' or 'linear', got {interp!r}")
    gain_time = np.asarray(gain_time, float)
    gain = np.asarray(gain)
    flag = np.asarray(flag, bool)
    times = np.asarray(times, float)
    nsol, nant, npol = gain.shape
    out = np.ones((times.size, nant, npol), np.complex128)
    oflag = np.ones((times.size, nant, npol), bool)
    for a in range(nant):
        for c in range(npol):
            ok = ~flag[:, a, c]
            if not ok.any():
                continue
            ts = gain_time[ok]
            gs = gain[ok, a, c].astype(np.complex128)
            oflag[:, a, c] = False
            if interp == "nearest" or ts.size == 1:
                j = np.abs(times[:, None] - ts[None, :]).argmin(axis=1)
                out[:, a, c] = gs[j]
                continue
            j = np.clip(np.searchsorted(ts, times) - 1, 0, ts.size - 2)
            t0, t1 = ts[j], ts[j + 1]
            frac = np.clip((times - t0) / (t1 - t0), 0.0, 1.0)
            g0, g1 = gs[j], gs[j + 1]
            amp = np.abs(g0) + frac * (np.abs(g1) - np.abs(g0))
            ph = np.angle(g0) + frac * np.angle(g1 * np.conj(g0))
            out[:, a, c] = amp * np.exp(1j * ph)
    return out, oflag


def _match_channels(sol_freqs, freqs, width):
    idx = np.abs(freqs[:, None] - sol_freqs[None, :]).argmin(axis=1)
    bad = np.abs(sol_freqs[idx] - freqs) > 0.5 * abs(width)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} channel(s) of the data (e.g. "
                         f"{freqs[bad][0] / 1e6:.4f} MHz) have no bandpass solution")
    return idx


def _solution_arrays(solutions):
    """``(B, B_flag, G, G_flag, gain_time, bandpass frequencies)`` of solutions as
    :func:`solve` returns them (xarray, lazy or not) or as
    :func:`contimg.caltables.read_solutions` does (a dict of numpy arrays); the
    missing ones None."""
    has_b, has_g = "BANDPASS" in solutions, "GAIN" in solutions
    if not (has_b or has_g):
        raise ValueError("solutions hold neither BANDPASS nor GAIN")

    def data_of(name):
        if name not in solutions:
            return None
        x = solutions[name]
        return x.data if hasattr(x, "data") else x

    sol_f = (solutions["BANDPASS"].frequency.values if has_b
             and hasattr(solutions["BANDPASS"], "frequency") else
             solutions.get("frequency") if has_b else None)
    gain_t = (np.asarray(solutions["GAIN"].gain_time.values) if has_g and hasattr(
        solutions["GAIN"], "gain_time") else (solutions.get("gain_time") if has_g else None))
    return (data_of("BANDPASS"), data_of("BANDPASS_FLAG"), data_of("GAIN"),
            data_of("GAIN_FLAG"), gain_t, sol_f)


def _check_solutions(B, G, nstations, npol):
    for name, x, axis in (("BANDPASS", B, 0), ("GAIN", G, 1)):
        if x is None:
            continue
        if x.shape[axis] < nstations:
            raise ValueError(f"{name} has {x.shape[axis]} antennas, the data's antenna "
                             f"table has {nstations}")
        if x.shape[-1] != npol:
            raise ValueError(f"{name} has {x.shape[-1]} correlations, the data {npol}")


def prepare_solutions(B, Bf, G, Gf, gain_time, sol_freqs, *, freqs, times, nstations,
                      npol, channel_width=np.inf, interp="linear", conjugate=False):
    """Solutions on the data's grid, as :func:`correct_rows` takes them: ``(gt, gt_flag)``
    (ntime, nstations, npol) interpolated to ``times`` and ``(bf, bf_flag)``
    (nstations, nchan, npol) matched to ``freqs`` (any order); unity where a term is
    missing (None). ``conjugate``: for data in the MS convention (CASA's ``DATA``, the
    contract's ``conj(VISIBILITY)``)."""
    freqs = np.asarray(freqs, float)
    times = np.asarray(times, float)
    conj = np.conj if conjugate else (lambda x: x)
    _check_solutions(B, G, nstations, npol)
    if B is not None:
        idx = _match_channels(np.asarray(sol_freqs, float), freqs, channel_width)
        bf = np.ascontiguousarray(conj(np.asarray(B, np.complex128)[:, idx]))
        bff = np.ascontiguousarray(np.asarray(Bf, bool)[:, idx])
    else:
        bf = np.ones((nstations, freqs.size, npol), np.complex128)
        bff = np.zeros(bf.shape, bool)
    if G is not None:
        gt, gtf = interpolate_gains(gain_time, conj(np.asarray(G)), Gf, times, interp)
    else:
        gt = np.ones((times.size, nstations, npol), np.complex128)
        gtf = np.zeros(gt.shape, bool)
    return gt, gtf, bf, bff


def correct_rows(vis, flag, a1, a2, tidx, prepared, chan=slice(None)):
    """Corrected ``(vis, flag)`` of rows ``(nrow, nchan, npol)`` (any row order: row r
    is baseline ``a1[r], a2[r]`` at integration ``tidx[r]``); ``prepared`` from
    :func:`prepare_solutions`, ``chan`` the rows' channels in it."""
    gt, gtf, bf, bff = prepared
    out = np.empty(vis.shape, np.complex64)
    oflag = np.empty(vis.shape, bool)
    solvers.apply_jones(np.ascontiguousarray(vis, np.complex64), np.ascontiguousarray(flag),
                        np.asarray(a1, np.int64), np.asarray(a2, np.int64),
                        np.asarray(tidx, np.int64), gt, gtf,
                        np.ascontiguousarray(bf[:, chan]), np.ascontiguousarray(bff[:, chan]),
                        out, oflag)
    return out, oflag


def _correct_block(vis, flag, a1, a2, prepared, t0, c0):
    """:func:`correct_rows` of a contract block ``(time, baseline, frequency, pol)``
    starting at integration ``t0``, channel ``c0``."""
    nt, nbl, nf, npol = vis.shape
    tidx = t0 + np.repeat(np.arange(nt, dtype=np.int64), nbl)
    out, oflag = correct_rows(vis.reshape(nt * nbl, nf, npol),
                              flag.reshape(nt * nbl, nf, npol), np.tile(a1, nt),
                              np.tile(a2, nt), tidx, prepared, slice(c0, c0 + nf))
    return out.reshape(vis.shape), oflag.reshape(vis.shape)


def apply_rows(vis, flag, a1, a2, tidx, prepared, *, name="apply-cal"):
    """Lazy corrected ``(vis, flag)`` of row-major arrays ``(row, channel, pol)``
    (dask, chunked along rows, all channels in a chunk): the MS's own layout, read and
    written in contiguous runs of rows. ``a1, a2, tidx``: numpy, per row; ``prepared``:
    :func:`prepare_solutions` (numpy or delayed). Task names ``<name>-r<k>``."""
    rch = vis.chunks[0]
    edges = np.concatenate([[0], np.cumsum(rch)]).astype(int)
    vblk, fblk = vis.to_delayed().ravel(), flag.to_delayed().ravel()
    out_v, out_f = [], []
    for k in range(len(rch)):
        r0, r1 = edges[k], edges[k + 1]
        res = dask.delayed(correct_rows, pure=True, nout=2)(
            vblk[k], fblk[k], a1[r0:r1], a2[r0:r1], tidx[r0:r1], prepared,
            dask_key_name=f"{name}-r{k:03d}-{vis.name}")
        out_v.append(da.from_delayed(res[0], (r1 - r0,) + vis.shape[1:], dtype=np.complex64))
        out_f.append(da.from_delayed(res[1], (r1 - r0,) + vis.shape[1:], dtype=bool))
    return da.concatenate(out_v, axis=0), da.concatenate(out_f, axis=0)


def apply(ds, solutions, *, interp="linear"):
    """Lazy corrected Dataset: ``VISIBILITY / (g_p conj(g_q) b_p conj(b_q))``.

    Parameters
    ----------
    ds : xarray.Dataset
        Contract visibility Dataset to correct (any chunks).
    solutions : xarray.Dataset or dict
        As returned by :func:`solve` (lazy or computed) or read by
        :func:`contimg.caltables.read_solutions`: ``BANDPASS``/``BANDPASS_FLAG``
        (antenna_id, frequency, polarization) and/or ``GAIN``/``GAIN_FLAG``
        (gain_time, antenna_id, polarization) with a ``gain_time`` coordinate. Either
        may be missing (then it is not applied).
    interp : {"linear", "nearest"}
        Interpolation of the gains in time.

    Returns
    -------
    xarray.Dataset
        ``ds`` with ``VISIBILITY`` corrected and ``FLAG`` extended by flagged
        solutions; lazy, same chunks. Each block is :func:`correct_rows` of its rows,
        as :func:`apply_rows` (what ``contimg.calibrate.apply_ms`` runs on an MS).
    """
    if interp not in ("nearest", "linear"):
        raise ValueError(f"interp must be 'nearest' or 'linear', got {interp!r}")
    nstations = ds.sizes["antenna_id"] if "antenna_id" in ds.sizes else int(
        max(ds.baseline_antenna1_id.max(), ds.baseline_antenna2_id.max()) + 1)
    npol = ds.sizes["polarization"]
    a1 = np.asarray(ds.baseline_antenna1_id.values, np.int64)
    a2 = np.asarray(ds.baseline_antenna2_id.values, np.int64)
    arrays = _solution_arrays(solutions)
    for key in ("BANDPASS", "GAIN"):
        if key in solutions and hasattr(solutions[key], "polarization"):
            spol = [str(p) for p in np.asarray(solutions[key].polarization.values)]
            if spol != [str(p) for p in ds.polarization.values]:
                raise ValueError(f"{key} polarizations {spol} differ from the data's "
                                 f"{list(ds.polarization.values)}")
    _check_solutions(arrays[0], arrays[2], nstations, npol)
    prepared = dask.delayed(prepare_solutions, pure=True, nout=4)(
        *arrays, freqs=np.asarray(ds.frequency.values, float),
        times=np.asarray(ds.time.values, float), nstations=nstations, npol=npol,
        channel_width=ds.frequency.attrs.get("channel_width", np.inf), interp=interp)

    vis = ds.VISIBILITY.data
    flag = ds.FLAG.data
    if not isinstance(vis, da.Array):
        vis = da.from_array(vis, chunks=(-1, -1, 48, -1))
    vis = vis.rechunk({1: -1, 3: -1}, method=scheduling.rechunk_method())
    flag = da.asarray(flag).rechunk(vis.chunks, method=scheduling.rechunk_method())
    tch, fch = vis.chunks[0], vis.chunks[2]
    t_edges = np.concatenate([[0], np.cumsum(tch)]).astype(int)
    f_edges = np.concatenate([[0], np.cumsum(fch)]).astype(int)
    vblk = vis.to_delayed()
    fblk = flag.to_delayed()
    out_v, out_f = [], []
    for i in range(len(tch)):
        row_v, row_f = [], []
        for k in range(len(fch)):
            res = dask.delayed(_correct_block, pure=True, nout=2)(
                vblk[i, 0, k, 0], fblk[i, 0, k, 0], a1, a2, prepared, t_edges[i],
                f_edges[k], dask_key_name=f"apply-cal-t{i:02d}-sb{k:02d}-{vis.name}")
            shape = (tch[i], vis.shape[1], fch[k], npol)
            row_v.append(da.from_delayed(res[0], shape, dtype=np.complex64))
            row_f.append(da.from_delayed(res[1], shape, dtype=bool))
        out_v.append(row_v)
        out_f.append(row_f)
    new_vis = da.concatenate([da.concatenate(r, axis=2) for r in out_v], axis=0)
    new_flag = da.concatenate([da.concatenate(r, axis=2) for r in out_f], axis=0)
    out = ds.copy()
    out["VISIBILITY"] = (ds.VISIBILITY.dims, new_vis, ds.VISIBILITY.attrs)
    out["FLAG"] = (ds.FLAG.dims, new_flag, ds.FLAG.attrs)
    out.attrs = dict(ds.attrs, calibrated=True)
    return out
