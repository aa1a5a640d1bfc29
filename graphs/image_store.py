"""Lazy graphs over a compact averaged store on disk: CLEAN's major cycles stream it.

The averaged Stokes I rows of an image (:func:`graphs.image.average_dataset`) are
written once, in *parts* of at most ``rows_per_part`` rows, to a directory (one
``.npy`` file per array and part): ``vis`` complex64, ``w`` float32 (natural
weights), ``uvw`` float64 wavelengths, ``t``/``f`` int32 (bin middles). Nothing of
the group stays in memory between major cycles: every pass (density, weight sums,
dirty image, PSF, each residual) reads the parts back one at a time.

:func:`spill_rows` writes the parts (one task per chunk of the row Dataset: the data
are read once); :func:`open_rows` is a lazy row Dataset over them (one chunk per
part), which the ordinary builders of :mod:`graphs.image` (density, weight sums,
plans, the coplanar fit) take as they are. :func:`store_image` grids: one task per
group of parts, which streams its parts through one accumulating uv grid (a 2-D plan:
one FFT per task and pass; with w-stacking, the w-planes in batches, each FFT'd once
per task and pass). The imaging
weights and the gridding index of a part are made on its first pass and kept next to
it (``wi.npy``, ``index-<plan>.pkl``): later passes load them (the index per part, not
per group).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr

from graphs.image import WeightSpec, _imaging_weights
from kernels import gridding as kg
from kernels.constants import SPEED_OF_LIGHT

__all__ = ["ROW_ARRAYS", "spill_rows", "open_rows", "store_image", "part_groups"]

#: the arrays of a part: name -> (trailing shape, dtype)
ROW_ARRAYS = {"vis": ((), np.complex64), "w": ((), np.float32), "uvw": ((3,), np.float64),
              "t": ((), np.int32), "f": ((), np.int32)}
_FREQ = np.array([SPEED_OF_LIGHT])      # rows: uvw in wavelengths, one "channel" at c


def _save(path: Path, arr):
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _write_block(vis, w, uvw, t, f, *, root, k, rows_per_part):
    """Write one chunk's rows as parts ``<root>/c<k>-p<j>``; returns [(dir, nrows)]."""
    n = int(vis.shape[0])
    out = []
    bounds = list(range(0, n, max(1, int(rows_per_part)))) or [0]
    for j, a in enumerate(bounds):
        b = min(n, a + rows_per_part)
        d = Path(root) / f"c{k:04d}-p{j:04d}"
        d.mkdir(parents=True, exist_ok=True)
        for name, arr in zip(ROW_ARRAYS, (vis, w, uvw, t, f)):
            _save(d / f"{name}.npy", np.ascontiguousarray(arr[a:b]))
        out.append((str(d), b - a))
    return out


def spill_rows(dsr: xr.Dataset, root, rows_per_part: int):
    """Lazy: write the row Dataset ``dsr`` (:func:`graphs.image.average_dataset`) as
    parts under ``root``; one delayed list of ``(part_dir, nrows)`` per chunk of
    ``dsr`` (compute them together: each chunk is read once and written)."""
    names = ("VIS_I", "WEIGHT_I", "UVW_L", "TIME_INDEX", "CHAN_INDEX")
    blocks = [dsr[n].data.to_delayed().reshape(-1) for n in names]
    write = dask.delayed(_write_block, pure=False)
    tok = dask.base.tokenize(dsr.VIS_I.data, str(root))
    return [write(*(b[k] for b in blocks), root=str(root), k=k, rows_per_part=rows_per_part,
                  dask_key_name=f"spill-rows-{tok}-{k}")
            for k in range(len(blocks[0]))]


def _load(part, name):
    return np.load(Path(part) / f"{name}.npy")


def open_rows(parts, attrs) -> xr.Dataset:
    """A lazy row Dataset (as :func:`graphs.image.average_dataset` makes) over the parts
    ``[(dir, nrows)]``: one chunk per part, each read from disk when a task needs it."""
    load = dask.delayed(_load, pure=True)
    cols = {}
    for name, (shape, dt) in ROW_ARRAYS.items():
        pieces = [da.from_delayed(load(d, name, dask_key_name=f"store-{name}-{d}"),
                                  shape=(n,) + shape, dtype=dt) for d, n in parts]
        cols[name] = da.concatenate(pieces, axis=0) if pieces else da.zeros(
            (0,) + shape, dtype=dt)
    return xr.Dataset({"VIS_I": (("row",), cols["vis"]), "WEIGHT_I": (("row",), cols["w"]),
                       "UVW_L": (("row", "uvw_label"), cols["uvw"]),
                       "TIME_INDEX": (("row",), cols["t"]),
                       "CHAN_INDEX": (("row",), cols["f"])}, attrs=dict(attrs))


def part_groups(parts, ntask: int):
    """The part directories of ``parts`` ``[(dir, nrows)]`` split into at most ``ntask``
    contiguous groups of similar row counts (one gridding task each)."""
    ntask = max(1, min(int(ntask), len(parts)))
    total = max(1, sum(n for _, n in parts))
    groups = [[] for _ in range(ntask)]
    acc = 0
    for d, n in parts:
        groups[min(ntask - 1, int((acc + 0.5 * n) * ntask / total))].append(d)
        acc += n
    return [g for g in groups if g]


def _part_index(d, uvw, plan, wspec, grid, key, nthreads):
    """(index, imaging weights) of part ``d`` for ``plan``: loaded when a previous pass
    made them, else made and kept (``key`` names the plan)."""
    p = Path(d) / f"index-{key}.pkl"
    if p.is_file():
        with open(p, "rb") as fh:
            return pickle.load(fh)
    wpath = Path(d) / "wi.npy"
    if wpath.is_file():
        wi = np.load(wpath)
    else:
        w = _load(d, "w")[:, None]
        wi = _imaging_weights(w, uvw, _FREQ, wspec, grid)
        _save(wpath, wi)
    idx = kg.make_index(uvw, _FREQ, plan, flags=wi == 0, nthreads=nthreads)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump((idx, wi), fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, p)
    return idx, wi


#: bytes of w-planes a w-stacking task holds at once (its planes go in batches)
STACK_BYTES = 256 * 2 ** 20


def _store_block(dirs, grid, model, *, plan, wspec, psf, key, nthreads):
    """One task: stream parts ``dirs`` through the (de)gridder; returns the image."""
    if plan.nplanes > 1:
        return _store_block_wstack(dirs, grid, model, plan=plan, wspec=wspec, psf=psf,
                                   key=key, nthreads=nthreads)
    img_dtype = plan.image_dtype
    cdt = plan.grid_dtype
    acc = None
    mstack = None
    for d in dirs:
        uvw = _load(d, "uvw")
        idx, wi = _part_index(d, uvw, plan, wspec, grid, key, nthreads)
        if not np.any(wi):
            continue
        flags = wi == 0
        if psf:
            v = (wi > 0).astype(cdt)
        else:
            v = _load(d, "vis")[:, None].astype(cdt, copy=False)
        if model is not None:
            if mstack is None:
                mstack = kg.image_to_grid(np.asarray(model, img_dtype), plan,
                                          nthreads=nthreads)
            pred = kg.degrid_chunk(mstack, uvw, _FREQ, plan, flags=flags,
                                   nthreads=nthreads, index=idx)
            v = np.subtract(v, pred, out=pred)
        acc = kg.grid_chunk(uvw, _FREQ, v, plan, weights=wi.astype(img_dtype, copy=False),
                            flags=flags, nthreads=nthreads, out=acc, index=idx)
        del v
    if acc is None:
        return np.zeros((plan.npix_x, plan.npix_y), dtype=img_dtype)
    image = kg.grid_to_image(acc, plan, nthreads=nthreads, overwrite=True)
    return np.asarray(image, dtype=img_dtype)


def _store_block_wstack(dirs, grid, model, *, plan, wspec, psf, key, nthreads):
    """:func:`_store_block` for a w-stacking plan: the w-planes in batches of at most
    :data:`STACK_BYTES`; for each batch the parts stream through the batch's stack
    (model -> predicted visibilities, added up over the batches and held for the pass,
    8 bytes a row; then the residuals gridded), so each plane is FFT'd once per task."""
    img_dtype = plan.image_dtype
    cdt = plan.grid_dtype
    per = max(1, int(STACK_BYTES // (plan.nu * plan.nv * np.dtype(cdt).itemsize)))
    batches = [(p0, min(plan.nplanes, p0 + per)) for p0 in range(0, plan.nplanes, per)]

    def parts():
        for d in dirs:
            uvw = _load(d, "uvw")
            idx, wi = _part_index(d, uvw, plan, wspec, grid, key, nthreads)
            if np.any(wi):
                yield d, uvw, idx, wi

    preds = {}
    if model is not None:
        m = np.asarray(model, img_dtype)
        for batch in batches:
            mstack = kg.image_to_grid(m, plan, planes=batch, nthreads=nthreads)
            for d, uvw, idx, wi in parts():
                p = kg.degrid_chunk(mstack, uvw, _FREQ, plan, flags=wi == 0, planes=batch,
                                    nthreads=nthreads, index=idx)
                if d in preds:
                    preds[d] += p
                else:
                    preds[d] = p
            del mstack
    image = np.zeros((plan.npix_x, plan.npix_y), dtype=img_dtype)
    for batch in batches:
        acc = None
        for d, uvw, idx, wi in parts():
            if psf:
                v = (wi > 0).astype(cdt)
            else:
                v = _load(d, "vis")[:, None].astype(cdt, copy=False)
                if d in preds:
                    v = v - preds[d]
            acc = kg.grid_chunk(uvw, _FREQ, v, plan, weights=wi.astype(img_dtype, copy=False),
                                flags=wi == 0, planes=batch, nthreads=nthreads, out=acc,
                                index=idx)
        if acc is not None:
            image += kg.grid_to_image(acc, plan, planes=batch, nthreads=nthreads,
                                      overwrite=True)
    return image


def store_image(groups, plan, wspec: WeightSpec = WeightSpec(), *, model=None, psf=False,
                nthreads=1):
    """Lazy ``(npix_x, npix_y)`` dirty / residual (``model``, Jy/pixel) / PSF image,
    unnormalised, as :func:`graphs.image.dirty_image` makes from the same rows: one
    task per group of parts (:func:`part_groups`), images summed."""
    from graphs.image import _grid_arg

    g, _gi, light = _grid_arg(wspec)
    gd = None if g is None else g.to_delayed().reshape(-1)[0]
    key = dask.base.tokenize(plan)[:12]
    block = dask.delayed(_store_block, pure=True)
    m = None if model is None else np.asarray(model, dtype=plan.image_dtype)
    name = "psf" if psf else ("residual" if model is not None else "dirty")
    tok = dask.base.tokenize(groups, key, light, m, psf)
    md = None if m is None else dask.delayed(m, name=f"store-model-{tok}")
    imgs = [da.from_delayed(block(grp, gd, md, plan=plan, wspec=light, psf=psf, key=key,
                                  nthreads=nthreads,
                                  dask_key_name=f"store-{name}-{tok}-{i}"),
                            shape=(plan.npix_x, plan.npix_y), dtype=plan.image_dtype)
            for i, grp in enumerate(groups)]
    return da.stack(imgs).sum(axis=0, split_every=4, dtype=plan.image_dtype)
