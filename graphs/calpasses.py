"""Calibration solved in passes over bounded chunks: memory of a chunk, not of a group.

:func:`graphs.calibrate.solve` is one graph: its four steps (``B0``, ``Gp``, ``B``,
``G``; see :mod:`graphs.calibrate`) read every chunk of the group once and keep the
visibilities and the model in memory until the last step has used them, so its peak
grows with the group (~3.7 GB on a full DSA-110 group).

:func:`solve_steps` takes the same steps as a sequence of small graphs, one per pass
over the data: each pass reads the chunks again (from the MS, through the Dataset's own
lazy reads), reduces every ``(time, frequency)`` chunk to the per-cell sums its solver
needs (``sum w M* V`` and ``sum w |M|^2`` per baseline and channel or interval,
:mod:`kernels.solvers`), adds the sums over chunks in a tree, and lets go of the chunk.
Only the sums and the solutions live between passes. The solutions are those of
:func:`graphs.calibrate.solve` within float rounding (the same sums, added in another
order when a frequency chunk has more than one time chunk).

Passes: when every frequency chunk is one time chunk (a full DSA-110 group as
``open_ms`` chunks it), ``B0`` and the ``Gp`` sums are taken in one read and ``B`` and
the ``G`` sums in a second, as :func:`graphs.calibrate.solve` does in one; otherwise
each step is one read (four). Either way the largest thing in memory is a chunk per
thread plus sums of one chunk's baselines.

This module builds graphs and never computes: :func:`solve_steps` is a generator that
yields a lazy list, receives its computed values through ``send``, and returns the
solutions Dataset (numpy-backed) as its value; :func:`contimg.calibrate.run_steps` drives it.
"""

from __future__ import annotations

import dask
import numpy as np

from graphs.calibrate import (
    _add_sums, _as_dask, _bandpass_chunk, _bandpass_solve, _bandpass_sums, _expand_gp,
    _finish, _gain_sums_chunk, _solve_attrs, _solve_gains, _solve_setup, gain_bins,
    solutions_dataset,
)

__all__ = ["solve_steps"]


def _bp_then_gain_sums(vis, model, flag, weight, a1, a2, nant, opts, prior_t, tbin, nct):
    """One read of a whole-time chunk: its bandpass, then its gain sums with it applied
    (``tbin is None``: the bandpass only)."""
    bp = _bandpass_chunk(vis, model, flag, weight, a1, a2, nant, prior_t, opts)
    if tbin is None:
        return bp, None
    return bp, _gain_sums_chunk(vis, model, flag, weight, a1, a2, nant, tbin, nct, bp)


def _tree_sum(parts, name):
    """Add tuples of sums pairwise, so that parts are let go as soon as they are added."""
    d = dask.delayed
    level = 0
    while len(parts) > 1:
        parts = [d(_add_sums, pure=True)(*parts[i:i + 2],
                                         dask_key_name=f"{name}-add{level}-{i}")
                 if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
        level += 1
    return parts[0]


def _add_into(acc, part):
    """``acc += part`` for tuples of sums, in place: between computes the running sums
    are the driver's own (computed values nothing else holds), so adding a batch costs
    no copy of sums that grow with the baselines (the same values as ``_add_sums``)."""
    for o, x in zip(acc, part):
        o += x
    return acc


def _first(x):
    return x[0]


def _second(x):
    return x[1]


def solve_steps(ds, model, *, refant=None, gain_interval=1, gain_mode="ap", min_snr=3.0,
                max_iter=200, tol=1e-8, phase_pass=True, batch=2):
    """Bandpass + gain solutions of ``ds`` against ``model`` in passes (a generator).

    Same parameters and solutions as :func:`graphs.calibrate.solve`. Yields lists of
    lazy objects (``batch`` frequency chunks of one pass each: a scheduler given every
    chunk at once reads ahead of the solvers); send back their computed values
    (``dask.compute(*lazy)``); the generator's return value is the computed solutions
    Dataset.
    """
    opts, ntime, nstations, stations, a1, a2, nant = _solve_setup(
        ds, gain_interval, gain_mode, min_snr, max_iter, tol)
    vis = _as_dask(ds.VISIBILITY)
    vis = vis.rechunk((vis.chunks[0], -1, vis.chunks[2], -1))
    chunks = vis.chunks
    parts = [vis] + [_as_dask(x).rechunk(chunks) for x in (model, ds.FLAG, ds.WEIGHT)]
    delayed = [p.to_delayed()[:, 0, :, 0] for p in parts]       # (ntchunk, nfchunk)
    nt, nf = delayed[0].shape
    t_edges = np.concatenate([[0], np.cumsum(chunks[0])])
    blk = [[tuple(x[i, k] for x in delayed) for k in range(nf)] for i in range(nt)]
    tag = vis.name
    d = dask.delayed

    gi = int(gain_interval)
    tbin_g, nct, t_centres, t_width = gain_bins(ds, gi)
    tbin_p = np.arange(ntime, dtype=np.int64)

    def tsl(i, x):
        return None if x is None else np.ascontiguousarray(x[t_edges[i]:t_edges[i + 1]])

    def batches():
        for k0 in range(0, nf, batch):
            yield range(k0, min(k0 + batch, nf))

    def fused(prior, tbin, n, step):
        """One read per chunk: its bandpass, then its gain sums (``batch`` frequency
        chunks per compute; the sums are added here, between computes)."""
        bp, sums = [], None
        for ks in batches():
            out = [d(_bp_then_gain_sums, pure=True, nout=2)(
                *blk[0][k], a1, a2, nant, opts, prior, tbin, n,
                dask_key_name=f"{step}-f{k:02d}-{tag}") for k in ks]
            got = yield [[o[0] for o in out], _tree_sum([o[1] for o in out],
                                                        f"{step}-sums-{ks[0]:02d}-{tag}")]
            bp += got[0]
            sums = got[1] if sums is None else _add_into(sums, got[1])
        return bp, sums

    def bandpass(prior, step):
        bp = []
        for ks in batches():
            got = yield [[d(_bandpass_solve, pure=True)(
                _tree_sum([d(_bandpass_sums, pure=True)(*blk[i][k], a1, a2, nant, tsl(i, prior),
                                                  dask_key_name=f"{step}-t{i:02d}-f{k:02d}-{tag}")
                           for i in range(nt)], f"{step}-f{k:02d}-{tag}"),
                a1, a2, nant, opts, dask_key_name=f"{step}-solve-f{k:02d}-{tag}")
                for k in ks]]
            bp += got[0]
        return bp

    def gain_sums(bp, tbin, n, step):
        sums = None
        for ks in batches():
            (got,) = yield [_tree_sum([d(_gain_sums_chunk, pure=True)(
                *blk[i][k], a1, a2, nant, tsl(i, tbin), n, bp[k],
                dask_key_name=f"{step}-t{i:02d}-f{k:02d}-{tag}")
                for i in range(nt) for k in ks], f"{step}-{ks[0]:02d}-{tag}")]
            sums = got if sums is None else _add_into(sums, got)
        return sums

    if nt == 1:
        # pass 1: B0 and the Gp sums; pass 2: B and the G sums (one read each)
        bp, sums = yield from fused(None, tbin_p if phase_pass else tbin_g,
                                    ntime if phase_pass else nct, "calpass1")
        if phase_pass:
            gp = _solve_gains(sums, a1, a2, nant, opts, True)
            bp, sums = yield from fused(_expand_gp(gp, tbin_p), tbin_g, nct, "calpass2")
    else:
        bp = yield from bandpass(None, "calpass-b0")
        if phase_pass:
            sums = yield from gain_sums(bp, tbin_p, ntime, "calpass-gp")
            gp = _solve_gains(sums, a1, a2, nant, opts, True)
            bp = yield from bandpass(_expand_gp(gp, tbin_p), "calpass-b")
        sums = yield from gain_sums(bp, tbin_g, nct, "calpass-g")
    g = _solve_gains(sums, a1, a2, nant, opts, gain_mode == "p")
    fin = _finish(list(bp), g, stations, nstations, refant, opts)
    return solutions_dataset(lambda key, shape, dtype: np.asarray(fin[key], dtype=dtype),
                             ds, nstations, nct, t_centres, t_width,
                             _solve_attrs(gain_mode, gi, min_snr, max_iter, tol, phase_pass))
