"""Plan-level building blocks for distributed imaging: grid a chunk onto a stack of
w-planes, turn a (summed) stack into the image, and their adjoints; the reusable index.
"""

from __future__ import annotations

import math

import numpy as np

from kernels.gridding._loops import LOOPS as _LOOPS
from kernels.gridding.fft import _nonzero_extent
from kernels.gridding.index import _build_index, _work_items
from kernels.gridding.plan import _active_mask
from kernels.gridding.screens import _ImageAccumulator, _ImageFiller
from kernels.gridding.threads import _compiled, _map, _split
from kernels.gridding.visibilities import (
    _check_inputs,
    _finish,
    _phasors,
    _prepare_gridding,
)


def _plane_pass(gridf, idx, vals, plan, plane, coeffs, nthreads, gridding):
    """One w-plane: grid ``vals`` onto ``gridf`` (``gridding``) or degrid it into them
    (the generated loops, threads over tile rows that never share grid cells)."""
    W, T = plan.W, plan.tile
    nsafe = W // 2 + 1
    inv_dw = 1.0 / plan.dw if plan.do_wstacking else 0.0
    fn = _LOOPS[coeffs.shape[1]][0 if gridding else 1]
    for tasks in _work_items(idx, plan, plane, nthreads, gridding):
        def work(items):
            args = (gridf, items, plane, idx.blk_tv, idx.blk_p0, idx.blk_rstart, idx.run_row,
                    idx.run_c0, idx.run_c1, idx.uvw, idx.fovc, vals, coeffs, W, T, nsafe,
                    plan.pixsize_x, plan.pixsize_y, plan.do_wstacking, plan.wplane0, inv_dw)
            _compiled(fn, args)(*args)

        _map(nthreads, work, tasks)


def _grid_plane(gridf, idx, vis_eff, plan, plane, coeffs, nthreads):
    _plane_pass(gridf, idx, vis_eff, plan, plane, coeffs, nthreads, True)


def _degrid_plane(gridf, idx, raw, plan, plane, coeffs, nthreads):
    _plane_pass(gridf, idx, raw, plan, plane, coeffs, nthreads, False)


def _stack_arg(grids, plan, sel):
    """``grids`` as a stack ``(len(sel), nu, nv)`` (a single 2-D grid is one plane)."""
    grids = np.asarray(grids)
    if grids.ndim == 2:
        grids = grids[None]
    if grids.shape != (len(sel), plan.nu, plan.nv):
        raise ValueError(f"grids shape {grids.shape} != {(len(sel), plan.nu, plan.nv)}")
    return grids


def _index_for(uvw, freq, weights, flags, plan, nthreads):
    """(active mask, index) of visibilities without data (degridding, the index)."""
    uvw = np.asarray(uvw, dtype=np.float64)
    freq = np.asarray(freq, dtype=np.float64)
    shape = (uvw.shape[0], freq.size)
    _check_inputs(uvw, freq, shape, plan)
    act = _active_mask(None, weights, flags, shape, False)
    idx = _build_index(uvw, freq, act, plan, nthreads)
    _check_extent(idx, plan)
    return act, idx


def _planes_arg(plan, planes):
    if planes is None:
        return range(plan.nplanes)
    if isinstance(planes, slice):
        return range(plan.nplanes)[planes]
    lo, hi = int(planes[0]), int(planes[1])
    if not 0 <= lo <= hi <= plan.nplanes:
        raise ValueError(f"planes {planes} outside [0, {plan.nplanes}]")
    return range(lo, hi)


def _coeffs(plan):
    return np.ascontiguousarray(plan.kernel.coeffs.astype(plan.image_dtype))


def grid_chunk(uvw, freq, vis, plan, weights=None, flags=None, planes=None, nthreads=1,
               out=None, index=None):
    """Grid one chunk of visibilities onto the w-stack (or a range of its planes).

    Returns a complex array ``(nsel, nu, nv)`` (``plan.grid_dtype``), ``nsel`` = number of
    selected planes (1 without w-stacking). Stacks from different chunks gridded with the
    same plan add up; :func:`grid_to_image` turns the sum into the dirty image.
    ``planes``: ``None`` (all), a ``slice`` or ``(start, stop)``. ``out``: an existing
    stack to accumulate into. ``index``: :func:`make_index` of the same uvw, freq and
    plan (its mask replaces ``flags`` as the choice of visibilities).
    """
    sel = _planes_arg(plan, planes)
    if index is not None:
        _check_index(index, uvw, freq, plan)
    idx, vis_eff = _prepare_gridding(uvw, freq, vis, weights, flags, plan, nthreads,
                                     idx=index)
    _check_extent(idx, plan)
    if out is None:
        out = np.zeros((len(sel), plan.nu, plan.nv), dtype=plan.grid_dtype)
    elif out.shape != (len(sel), plan.nu, plan.nv) or out.dtype != plan.grid_dtype:
        raise ValueError("out has the wrong shape or dtype")
    coeffs = _coeffs(plan)
    for k, pl in enumerate(sel):
        gridf = out[k].view(plan.image_dtype)
        _grid_plane(gridf, idx, vis_eff, plan, pl, coeffs, nthreads)
    return out


def _check_extent(idx, plan):
    fmax = float(idx.fovc.max()) if idx.fovc.size else 0.0
    if idx.uvw.shape[0]:
        um = float(np.abs(idx.uvw[:, 0]).max() * fmax)
        vm = float(np.abs(idx.uvw[:, 1]).max() * fmax)
        if um > plan.umax * (1 + 1e-9) or vm > plan.vmax * (1 + 1e-9):
            raise ValueError(
                f"uv extent of the data ({um:.6g}, {vm:.6g}) exceeds the plan's "
                f"({plan.umax:.6g}, {plan.vmax:.6g}) wavelengths"
            )


def _plan_ranges(plan):
    W = plan.W
    ulim = int(math.ceil(plan.umax * plan.pixsize_x * plan.nu)) + W + 2
    vlim = int(math.ceil(plan.vmax * plan.pixsize_y * plan.nv)) + W + 2
    nu, nv = plan.nu, plan.nv
    urange = (0, nu) if 2 * ulim >= nu else (nu // 2 - ulim, nu // 2 + ulim)
    vrange = (0, nv) if 2 * vlim >= nv else (nv // 2 - vlim, nv // 2 + vlim)
    return urange, vrange


def grid_to_image(grids, plan, planes=None, nthreads=1, overwrite=False):
    """FFT + screens + corrections: a (summed) w-stack -> the dirty image.

    ``grids``: ``(nsel, nu, nv)`` from :func:`grid_chunk` (summed over chunks) for the
    planes ``planes`` (default all). Images of disjoint plane ranges add up. The stack
    is used as FFT workspace, so it is copied unless ``overwrite``.
    """
    sel = _planes_arg(plan, planes)
    grids = _stack_arg(grids, plan, sel)
    inplace = overwrite and grids.dtype == plan.grid_dtype and grids.flags.c_contiguous
    work = None if inplace else np.empty((plan.nu, plan.nv), dtype=plan.grid_dtype)
    acc = _ImageAccumulator(plan, nthreads)
    for k, pl in enumerate(sel):
        if inplace:
            g = grids[k]
        else:  # one plane of workspace at a time, not a copy of the stack
            work[...] = grids[k]
            g = work
        ext = _nonzero_extent(g, plan, nthreads)
        if ext is not None:
            acc.add(g, pl, ext[0], ext[1])
    return acc.result()


def image_to_grid(dirty, plan, planes=None, nthreads=1):
    """Adjoint of :func:`grid_to_image`: image -> w-stack ``(nsel, nu, nv)``.

    Exact inside the uv region the plan was made for (``|u| <= plan.umax``,
    ``|v| <= plan.vmax`` plus the kernel support), which is all :func:`degrid_chunk`
    reads; outside it the partial FFTs leave intermediate values.
    """
    sel = _planes_arg(plan, planes)
    urange, vrange = _plan_ranges(plan)
    out = np.zeros((len(sel), plan.nu, plan.nv), dtype=plan.grid_dtype)
    filler = _ImageFiller(plan, dirty, nthreads)
    for k, pl in enumerate(sel):
        filler.fill(out[k], pl, urange, vrange)
    return out


def degrid_chunk(grids, uvw, freq, plan, weights=None, flags=None, planes=None, nthreads=1,
                 out=None, index=None):
    """Adjoint of :func:`grid_chunk`: w-stack -> visibilities ``(nrow, nchan)``.

    ``grids`` holds the planes ``planes`` (default all); the visibilities predicted from
    disjoint plane ranges add up to those of the whole stack. ``index``: as in
    :func:`grid_chunk`.
    """
    sel = _planes_arg(plan, planes)
    grids = _stack_arg(grids, plan, sel)
    grids = np.ascontiguousarray(grids, dtype=plan.grid_dtype)
    if index is not None:
        _check_index(index, uvw, freq, plan)
        act, idx = index.active, index
    else:
        act, idx = _index_for(uvw, freq, weights, flags, plan, nthreads)
    raw = np.zeros(act.shape, dtype=plan.grid_dtype)
    coeffs = _coeffs(plan)
    for k, pl in enumerate(sel):
        _degrid_plane(grids[k].view(plan.image_dtype), idx, raw, plan, pl, coeffs, nthreads)
    return _finish(raw, weights, act, idx, plan, out, nthreads)


def make_index(uvw, freq, plan, weights=None, flags=None, nthreads=1):
    """The sort of visibilities into uv tiles and w-planes that every (de)gridding call
    builds first, built once to be passed as ``index=`` to :func:`vis2dirty` and
    :func:`dirty2vis` with the same ``uvw``, ``freq`` and ``plan``.

    Visibilities with a zero weight or a flag are left out (as in the calls). Worth it
    when the same data are (de)gridded many times, as in CLEAN's major cycles: on
    DSA-110 data building the index costs about as much as one gridding pass. The index
    also keeps the w-shift phasor of every visibility (one complex number each), so
    the calls that use it compute no trigonometric functions per visibility.
    """
    act, idx = _index_for(uvw, freq, weights, flags, plan, nthreads)
    shape = act.shape
    if plan.do_wstacking and plan.nshift != 0.0:
        # the w-shift phasor of every visibility, once (8 or 16 bytes per visibility)
        ph = np.empty(shape, dtype=plan.grid_dtype)
        bd = _split(shape[0], max(1, nthreads))
        _map(nthreads, lambda i: _phasors(idx.uvw, idx.fovc, plan.nshift, ph, bd[i],
                                          bd[i + 1]), list(range(len(bd) - 1)))
        idx.phasor = ph
    return idx


def _check_index(index, uvw, freq, plan):
    if plan is None:
        raise ValueError("index= needs the plan it was built with (plan=)")
    if index.active.shape != (np.shape(uvw)[0], np.size(freq)):
        raise ValueError(f"index built for {index.active.shape} visibilities, got "
                         f"{(np.shape(uvw)[0], np.size(freq))}")
