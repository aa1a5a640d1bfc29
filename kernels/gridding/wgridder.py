"""``ducc0.wgridder``-shaped API: :func:`vis2dirty` and :func:`dirty2vis`.
"""

from __future__ import annotations

import math

import numpy as np

from kernels.gridding.index import _build_index
from kernels.gridding.plan import _active_mask, _plan_active
from kernels.gridding.screens import _ImageAccumulator, _ImageFiller
from kernels.gridding.stack import _check_index, _coeffs, _degrid_plane, _grid_plane
from kernels.gridding.visibilities import _check_inputs, _finish, _prepare_gridding


def _check_plan(plan, double, npix_x, npix_y, pixsize_x, pixsize_y):
    if plan.double != double:
        raise ValueError("the plan's precision does not match the data's dtype")
    if (npix_x, npix_y) != (plan.npix_x, plan.npix_y) or not (
        math.isclose(pixsize_x, plan.pixsize_x, rel_tol=1e-12)
        and math.isclose(pixsize_y, plan.pixsize_y, rel_tol=1e-12)
    ):
        raise ValueError("the plan was made for another image geometry")


def _dtype_of(vis):
    if vis.dtype == np.complex64:
        return False
    if vis.dtype == np.complex128:
        return True
    raise TypeError(f"vis must be complex64 or complex128, got {vis.dtype}")


def vis2dirty(uvw, freq, vis, weights=None, flags=None, *, npix_x, npix_y, pixsize_x,
              pixsize_y, epsilon, do_wstacking=True, nthreads=1, flip_u=False, flip_v=False,
              flip_w=False, divide_by_n=True, sigma_min=1.1, sigma_max=2.6, plan=None,
              index=None):
    """Visibilities -> dirty image, ducc0.wgridder.vis2dirty conventions (see module doc).

    uvw (nrow, 3) metres; freq (nchan,) Hz; vis (nrow, nchan) complex64/128 (sets the
    precision); weights (nrow, nchan) real or None; flags (nrow, nchan) bool, True =
    flagged, or None. Returns (npix_x, npix_y) float32/float64. ``plan`` (from
    :func:`make_plan`/:func:`plan_for`) fixes kernel, grid and w-planes instead of
    choosing them from the data; it must describe the same image geometry. ``index``
    (:func:`make_index` with the same uvw, freq and plan) skips building the index;
    its mask replaces ``weights``/``flags`` as the choice of visibilities.
    """
    vis = np.asarray(vis)
    uvw = np.asarray(uvw, dtype=np.float64)
    freq = np.asarray(freq, dtype=np.float64)
    double = _dtype_of(vis)
    _check_inputs(uvw, freq, vis.shape, None)
    if index is not None:
        _check_index(index, uvw, freq, plan)
        act = index.active
    else:
        act = _active_mask(vis, weights, flags, vis.shape, True)
    if plan is None:
        plan = _plan_active(uvw, freq, act, npix_x, npix_y, pixsize_x, pixsize_y, epsilon,
                            do_wstacking=do_wstacking, double=double, sigma_min=sigma_min,
                            sigma_max=sigma_max, nthreads=nthreads, flip_u=flip_u,
                            flip_v=flip_v, flip_w=flip_w, divide_by_n=divide_by_n)
    else:
        _check_plan(plan, double, npix_x, npix_y, pixsize_x, pixsize_y)
    idx, vis_eff = _prepare_gridding(uvw, freq, vis, weights, flags, plan, nthreads, act,
                                     idx=index)
    if idx.nvis == 0:
        return np.zeros((plan.npix_x, plan.npix_y), dtype=plan.image_dtype)
    coeffs = _coeffs(plan)
    grid = np.zeros((plan.nu, plan.nv), dtype=plan.grid_dtype)
    gridf = grid.view(plan.image_dtype)
    acc = _ImageAccumulator(plan, nthreads)
    for pl in range(plan.nplanes):
        rng = idx.plane_ranges[pl if plan.do_wstacking else 0]
        if rng is None:  # no visibility touches this plane
            continue
        _grid_plane(gridf, idx, vis_eff, plan, pl, coeffs, nthreads)
        acc.add(grid, pl, rng[0], rng[1], zero_after=True)
    return acc.result()


def dirty2vis(uvw, freq, dirty, weights=None, flags=None, *, pixsize_x, pixsize_y, epsilon,
              do_wstacking=True, nthreads=1, flip_u=False, flip_v=False, flip_w=False,
              divide_by_n=True, sigma_min=1.1, sigma_max=2.6, plan=None, index=None):
    """Dirty image -> visibilities: the exact adjoint of :func:`vis2dirty` (``index``:
    as there).

    dirty (npix_x, npix_y) float32/float64 (sets the precision). Returns (nrow, nchan)
    complex64/complex128; flagged or zero-weight visibilities are 0.
    """
    dirty = np.asarray(dirty)
    if dirty.dtype not in (np.float32, np.float64):
        raise TypeError(f"dirty must be float32 or float64, got {dirty.dtype}")
    double = dirty.dtype == np.float64
    uvw = np.asarray(uvw, dtype=np.float64)
    freq = np.asarray(freq, dtype=np.float64)
    shape = (uvw.shape[0], freq.size)
    _check_inputs(uvw, freq, shape, None)
    if index is not None:
        _check_index(index, uvw, freq, plan)
        act = index.active
    else:
        act = _active_mask(None, weights, flags, shape, False)
    if plan is None:
        plan = _plan_active(uvw, freq, act, dirty.shape[0], dirty.shape[1], pixsize_x,
                            pixsize_y, epsilon, do_wstacking=do_wstacking, double=double,
                            sigma_min=sigma_min, sigma_max=sigma_max, nthreads=nthreads,
                            flip_u=flip_u, flip_v=flip_v, flip_w=flip_w,
                            divide_by_n=divide_by_n)
    else:
        _check_plan(plan, double, dirty.shape[0], dirty.shape[1], pixsize_x, pixsize_y)
    idx = index if index is not None else _build_index(uvw, freq, act, plan, nthreads)
    raw = np.zeros(shape, dtype=plan.grid_dtype)
    if idx.nvis:
        coeffs = _coeffs(plan)
        grid = np.zeros((plan.nu, plan.nv), dtype=plan.grid_dtype)
        gridf = grid.view(plan.image_dtype)
        filler = _ImageFiller(plan, dirty, nthreads)
        for pl in range(plan.nplanes):
            rng = idx.plane_ranges[pl if plan.do_wstacking else 0]
            if rng is None:
                continue
            filler.fill(grid, pl, rng[0], rng[1])
            _degrid_plane(gridf, idx, raw, plan, pl, coeffs, nthreads)
    return _finish(raw, weights, act, idx, plan, None, nthreads)
