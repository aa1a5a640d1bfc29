"""Lazy imaging graphs: Stokes I, re-phasing, weighting and dirty images per chunk, summed.

Everything here returns dask collections and never computes. Gridding runs in one task
per chunk of the visibility Dataset (one subband x one time chunk, as read); each task
turns its chunk into a full dirty image with the *same* global gridding plan, and the
images are summed by dask's tree reduction, so memory grows with the image (one grid and
a few images per worker), not with the data.

Typical use (what :func:`contimg.imaging.image_dataset` does)::

    dsi = stokes_i_dataset(ds, uvw_target)          # lazy, Stokes I at one phase centre
    plan = imaging_plan(uvw_target, freq, npix, cell, epsilon=1e-4)
    dens = density(dsi, plan)                       # lazy (npix_x, npix_y) uv density
    ... compute dens, f2 = kernels.weighting.briggs_f2(dens, sum_w, robust) ...
    wspec = WeightSpec("briggs", dens, f2, du, dv)
    psf = dirty_image(dsi, plan, wspec, psf=True)   # lazy, unnormalised
    dirty = dirty_image(dsi, plan, wspec, model=model_image)

Baseline-dependent averaging (:func:`average_stokes_i`, :mod:`kernels.averaging`) turns
the Stokes I cube into a *row* Dataset (dim ``row``: one averaged visibility each, UVW in
wavelengths); :func:`density`, :func:`weight_sums` and :func:`dirty_image` take either.

Image layout: arrays ``[ix, iy]``, ``ix`` increasing to the *west* (decreasing RA,
FITS axis 1 with negative CDELT1) and ``iy`` to the north, ``(npix_x//2, npix_y//2)``
at the phase centre. With the Dataset convention ``V = sum S exp(+2 pi i (u l + v m +
w (n-1)))`` this is ducc0's/``kernels.gridding``'s convention with ``flip_v=True``
(pixel ``ix`` <-> ``-l``); ``divide_by_n=False`` makes the dirty image of a point
source of flux S peak at ``S * sum(weights)`` wherever it is, and the degridder of a
model image in Jy/pixel predict point sources exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import dask.array as da
import numpy as np
import xarray as xr

from graphs import scheduling
from graphs.contract import UVW_DIMS, VIS_DIMS
from kernels import averaging as ka
from kernels import gridding as kg
from kernels import weighting as kw
from kernels.constants import SPEED_OF_LIGHT

__all__ = [
    "WeightSpec",
    "stokes_i_dataset",
    "imaging_plan",
    "density",
    "dirty_image",
    "weight_sums",
    "average_stokes_i",
    "average_dataset",
    "imaging_plan_rows",
    "Coplanar",
    "coplanar_fit",
    "grid_index",
    "GRIDDERS",
    "PARALLEL_HANDS",
    "parallel_hands",
]

GRIDDERS = ("contimg", "ducc0")


@dataclass(frozen=True)
class WeightSpec:
    """How imaging weights are made from natural weights (see :mod:`kernels.weighting`).

    ``grid`` (numpy or a single-chunk dask array) is the density of all the data,
    ``du``/``dv`` its cells (wavelengths), ``f2`` Briggs' factor.
    """

    weighting: str = "natural"
    grid: object = None
    f2: float = 0.0
    du: float = 1.0
    dv: float = 1.0


# ---------------------------------------------------------------------------------
# Stokes I at one phase centre
# ---------------------------------------------------------------------------------


#: the parallel-hand pairs whose mean is Stokes I (linear and circular feeds)
PARALLEL_HANDS = (("XX", "YY"), ("RR", "LL"))


def parallel_hands(pols) -> tuple:
    """Indices ``(i, j)`` of the two parallel-hand correlations (XX and YY, or RR and LL)
    in ``pols`` (the Dataset's ``polarization`` labels, any order, 2 or 4 of them):
    Stokes I is their mean. Raises ValueError naming the correlations when there is no
    pair (e.g. only cross hands, a single hand, or linear and circular mixed)."""
    pols = [str(p).upper() for p in pols]
    for a, b in PARALLEL_HANDS:
        if a in pols and b in pols:
            return pols.index(a), pols.index(b)
    raise ValueError(f"Stokes I imaging needs both parallel hands (XX and YY, or RR and "
                     f"LL); the data have correlations {pols}")


def _parallel(a, pair):
    """``a[..., pair]`` as a 2-correlation array (a no-op when it already is)."""
    if tuple(pair) == (0, 1) and a.shape[-1] == 2:
        return a
    return a[..., list(pair)]


def _vis_i_block(vis, flag, weight, uvw_old, uvw_new, freq):
    t, b, f, _ = vis.shape
    v, _w = kw.stokes_i(vis.reshape(t * b, f, 2), flag.reshape(t * b, f, 2),
                        weight.reshape(t * b, f, 2))
    if uvw_new is not None:
        kw.rephase(v, np.ascontiguousarray(uvw_old[..., 2].reshape(-1)),
                   np.ascontiguousarray(uvw_new[..., 2].reshape(-1)),
                   np.ascontiguousarray(freq, dtype=np.float64))
    return v.reshape(t, b, f)


def _w_i_block(vis, flag, weight, cross, uvw, freq, uv_min, uv_max):
    t, b, f, _ = vis.shape
    _v, w = kw.stokes_i(vis.reshape(t * b, f, 2), flag.reshape(t * b, f, 2),
                        weight.reshape(t * b, f, 2))
    w = w.reshape(t, b, f)
    w *= cross[None, :, None]
    if uv_min > 0 or uv_max < np.inf:
        uvd = np.hypot(uvw[..., 0], uvw[..., 1])[..., None] * (
            np.asarray(freq, np.float64)[None, None, :] / SPEED_OF_LIGHT)
        w[(uvd < uv_min) | (uvd > uv_max)] = 0.0
    return w


def stokes_i_dataset(ds: xr.Dataset, uvw_target=None, uv_range=(0.0, np.inf), *,
                     uvw_rows=None) -> xr.Dataset:
    """Lazy Stokes I Dataset, re-phased to one phase centre.

    Parameters
    ----------
    ds : contract visibility Dataset (``VISIBILITY``/``FLAG``/``WEIGHT`` with XX, YY).
    uvw_target : (ntime, nbaseline, 3) float, optional
        UVW (metres) of every row towards the image's phase centre (from
        :func:`contimg.uvw.compute_uvw`); the visibilities are rotated by
        ``exp(2 pi i (w_old - w_new) / lambda)`` (exact w term). ``None``: keep the
        Dataset's phase centres (only right if they do not change with time).
    uv_range : (min, max) projected baseline length in wavelengths; visibilities
        outside get weight 0 (WSClean's ``-minuv-l``/``-maxuv-l``).
    uvw_rows : (ntime, nbaseline, 3) float, optional
        UVW (metres) of every row towards its *own* phase centre, the ``w_old`` of the
        re-phasing; default the Dataset's stored ``UVW``. Give the recomputed one
        (:func:`contimg.uvw.compute_uvw`) so that ``w_old`` and ``w_new`` come from one
        geometry: stored UVW from another writer (other conventions, epochs or TIME
        reference) would otherwise shift the sources.

    Stokes I is the mean of the parallel hands (:func:`parallel_hands`: XX/YY or RR/LL,
    2 or 4 correlations in any order); the cross hands are not read.

    Returns a Dataset with ``VIS_I`` (time, baseline_id, frequency) complex64,
    ``WEIGHT_I`` float32 (0 = flagged, autocorrelation or missing XX/YY) and ``UVW``
    (the target's), chunked like ``ds``.
    """
    pair = parallel_hands(ds.polarization.values)
    vis = ds.VISIBILITY.data
    flag = ds.FLAG.data
    weight = ds.WEIGHT.data
    if not isinstance(vis, da.Array):
        vis, flag, weight = (da.from_array(np.asarray(a), chunks=(-1, -1, -1, -1))
                             for a in (vis, flag, weight))
    vis, flag, weight = (_parallel(a, pair) for a in (vis, flag, weight))
    tchunks, bchunks, fchunks = vis.chunks[0], vis.chunks[1], vis.chunks[2]
    uvw_old = ds.UVW.data if uvw_rows is None else _checked_uvw(uvw_rows, ds)
    if not isinstance(uvw_old, da.Array):
        uvw_old = da.from_array(np.asarray(uvw_old), chunks=(tchunks, bchunks, 3))
    else:
        uvw_old = uvw_old.rechunk((tchunks, bchunks, 3), method=scheduling.rechunk_method())
    freq = da.from_array(np.asarray(ds.frequency.values, dtype=np.float64),
                         chunks=(fchunks,))
    if uvw_target is not None:
        uvw_target = np.asarray(uvw_target, dtype=np.float64)
        if uvw_target.shape != tuple(ds.UVW.shape):
            raise ValueError(f"uvw_target shape {uvw_target.shape} != UVW {ds.UVW.shape}")
        uvw_new = da.from_array(uvw_target, chunks=(tchunks, bchunks, 3), name=False)
        vis_i = da.blockwise(_vis_i_block, "tbf", vis, "tbfp", flag, "tbfp", weight, "tbfp",
                             uvw_old, "tbc", uvw_new, "tbc", freq, "f", concatenate=True,
                             dtype=np.complex64, token="stokes-i-rephase")
        uvw_out = uvw_new
    else:
        vis_i = da.blockwise(_vis_i_block, "tbf", vis, "tbfp", flag, "tbfp", weight, "tbfp",
                             uvw_old, "tbc", None, None, freq, "f", concatenate=True,
                             dtype=np.complex64, token="stokes-i")
        uvw_out = uvw_old
    cross = np.asarray(ds.baseline_antenna1_id.values != ds.baseline_antenna2_id.values,
                       dtype=np.float32)
    cross = da.from_array(cross, chunks=(bchunks,))
    uv_min, uv_max = float(uv_range[0]), float(uv_range[1])
    w_i = da.blockwise(_w_i_block, "tbf", vis, "tbfp", flag, "tbfp", weight, "tbfp",
                       cross, "b", uvw_out, "tbc", freq, "f", concatenate=True,
                       dtype=np.float32, token="weight-i", uv_min=uv_min, uv_max=uv_max)
    out = xr.Dataset(
        {
            "VIS_I": (VIS_DIMS[:3], vis_i),
            "WEIGHT_I": (VIS_DIMS[:3], w_i),
            "UVW": (UVW_DIMS, uvw_out),
        },
        coords={k: ds.coords[k] for k in ("time", "baseline_antenna1_id",
                                          "baseline_antenna2_id", "frequency")
                if k in ds.coords},
        attrs=dict(ds.attrs),
    )
    return out


# ---------------------------------------------------------------------------------
# baseline-dependent averaging: the cube -> a list of averaged visibilities
# ---------------------------------------------------------------------------------


_ROW_OUTPUTS = (("vis", (), np.complex64), ("w", (), np.float32), ("uvw", (3,), np.float64),
                ("t", (), np.int32), ("f", (), np.int32))


def _row_outputs(n):
    """Empty arrays for n averaged visibilities: vis, weight, uvw, time and channel."""
    return tuple(np.zeros((n,) + shape, dtype=dt) for _, shape, dt in _ROW_OUTPUTS)


def _rows_dataset(fchunks, nt, tf, ff, block_of, attrs, bchunks=None):
    """The row Dataset from one delayed 5-tuple per frequency chunk:
    ``block_of(k, chan0, nchan, start, n)`` (see :func:`kernels.averaging.bda_average`);
    with ``bchunks`` (baselines per block), one per frequency chunk and baseline block:
    ``block_of(k, chan0, nchan, start, n, (j, b0, b1))``, ``start`` within the block.
    The rows are those of the whole chunk in the same order (baseline, time bin,
    channel bin): a block's rows are a contiguous run of its chunk's."""
    parts = {name: [] for name, _, _ in _ROW_OUTPUTS}
    c0 = 0
    bedges = None if bchunks is None else np.concatenate([[0], np.cumsum(bchunks)])
    for k, nfk in enumerate(fchunks):
        counts = ka.bda_count(nt, nfk, tf, ff)
        spans = [(None, 0, counts.size)] if bedges is None else [
            ((j, int(bedges[j]), int(bedges[j + 1])), int(bedges[j]), int(bedges[j + 1]))
            for j in range(len(bchunks))]
        for blk, b0, b1 in spans:
            cb = counts[b0:b1]
            start = np.concatenate([[0], np.cumsum(cb)[:-1]]).astype(np.int64)
            n = int(cb.sum())
            out = (block_of(k, c0, nfk, start, n) if blk is None
                   else block_of(k, c0, nfk, start, n, blk))
            for i, (name, shape, dt) in enumerate(_ROW_OUTPUTS):
                parts[name].append(da.from_delayed(out[i], shape=(n,) + shape, dtype=dt))
        c0 += nfk
    cat = {k: da.concatenate(v, axis=0) for k, v in parts.items()}
    return xr.Dataset(
        {
            "VIS_I": (("row",), cat["vis"]),
            "WEIGHT_I": (("row",), cat["w"]),
            "UVW_L": (("row", "uvw_label"), cat["uvw"]),
            "TIME_INDEX": (("row",), cat["t"]),
            "CHAN_INDEX": (("row",), cat["f"]),
        },
        attrs=attrs,
    )


def _bda_block(vis, w, uvw, freq, tf, ff, start, n, chan0):
    out_vis, out_w, out_uvw, out_t, out_f = _row_outputs(n)
    ka.bda_average(np.ascontiguousarray(vis), np.ascontiguousarray(w),
                   np.ascontiguousarray(uvw, dtype=np.float64),
                   np.ascontiguousarray(freq, dtype=np.float64), tf, ff, start, chan0,
                   out_vis, out_w, out_uvw, out_t, out_f)
    return out_vis, out_w, out_uvw, out_t, out_f


def _factors(tf, ff, nb):
    """The per-baseline averaging factors as int64 arrays, checked."""
    tf = np.ascontiguousarray(tf, dtype=np.int64)
    ff = np.ascontiguousarray(ff, dtype=np.int64)
    if tf.shape != (nb,) or ff.shape != (nb,):
        raise ValueError(f"tf/ff must have one entry per baseline ({nb})")
    if (tf < 1).any() or (ff < 1).any():
        raise ValueError("averaging factors must be >= 1")
    return tf, ff


def average_stokes_i(dsi: xr.Dataset, tf, ff) -> xr.Dataset:
    """Lazy baseline-dependent average of a Stokes I Dataset (:func:`stokes_i_dataset`).

    ``tf``/``ff`` ``(nbaseline,)``: integrations and channels per bin for each baseline
    (:func:`kernels.averaging.bda_factors`; frequency bins stay inside a chunk). Returns
    a Dataset over dim ``row`` (one averaged visibility per row, one chunk per input
    frequency chunk) with ``VIS_I`` complex64, ``WEIGHT_I`` float32 (summed), ``UVW_L``
    ``(row, uvw_label)`` float64 in *wavelengths*, and ``TIME_INDEX``/``CHAN_INDEX``
    int32 (the bin's middle integration and channel). Attributes ``ntime``, ``nfreq``
    and ``n_input`` (visibilities averaged).
    """
    import dask

    nt, nb, nf = dsi.VIS_I.shape
    if len(dsi.VIS_I.data.chunks[0]) != 1 or len(dsi.VIS_I.data.chunks[1]) != 1:
        dsi = dsi.chunk({"time": -1, "baseline_id": -1})
    tf, ff = _factors(tf, ff, nb)
    fchunks = dsi.VIS_I.data.chunks[2]
    freq = np.asarray(dsi.frequency.values, dtype=np.float64)
    vis_b = dsi.VIS_I.data.to_delayed().ravel()
    w_b = dsi.WEIGHT_I.data.to_delayed().ravel()
    uvw = dsi.UVW.data
    if isinstance(uvw, da.Array):
        uvw = uvw.rechunk((nt, nb, 3), method=scheduling.rechunk_method())
        (uvw_d,) = uvw.to_delayed().ravel()
    else:
        uvw_d = np.asarray(uvw, dtype=np.float64)
    block = dask.delayed(_bda_block, nout=5, pure=True)
    tok = dask.base.tokenize(dsi.VIS_I.data, tf, ff)

    def block_of(k, c0, nfk, start, n):
        return block(vis_b[k], w_b[k], uvw_d, freq[c0:c0 + nfk], tf, ff, start, n, c0,
                     dask_key_name=f"bda-average-{tok}-{k}")

    return _rows_dataset(fchunks, nt, tf, ff, block_of,
                         dict(dsi.attrs, ntime=int(nt), nfreq=int(nf), n_input=int(nt * nb * nf)))


def _bda_xxyy_block(vis, flag, weight, uvw_old, uvw_new, freq, cross, tf, ff, start, n,
                    chan0, uv_min, uv_max, bsl=slice(None)):
    """Rows of one chunk (or of its baselines ``bsl``: ``uvw_old``/``uvw_new`` are
    every baseline's, ``vis``/``flag``/``weight``/``cross``/``tf``/``ff`` the block's)."""
    out_vis, out_w, out_uvw, out_t, out_f = _row_outputs(n)
    uvw_old = np.asarray(uvw_old, dtype=np.float64)[:, bsl]
    uvw_new = np.asarray(uvw_new, dtype=np.float64)[:, bsl]
    ka.bda_stokes_i(np.ascontiguousarray(vis), np.ascontiguousarray(flag),
                    np.ascontiguousarray(weight), np.ascontiguousarray(uvw_old[..., 2]),
                    np.ascontiguousarray(uvw_new, dtype=np.float64),
                    np.ascontiguousarray(freq, dtype=np.float64), cross, uv_min, uv_max,
                    tf, ff, start, chan0, out_vis, out_w, out_uvw, out_t, out_f)
    return out_vis, out_w, out_uvw, out_t, out_f


def _checked_uvw(uvw, ds):
    uvw = np.asarray(uvw, dtype=np.float64)
    if uvw.shape != tuple(ds.UVW.shape):
        raise ValueError(f"uvw_rows shape {uvw.shape} != UVW {ds.UVW.shape}")
    return uvw


def average_dataset(ds: xr.Dataset, uvw_target, tf, ff,
                    uv_range=(0.0, np.inf), *, uvw_rows=None) -> xr.Dataset:
    """Stokes I, re-phased to one phase centre and averaged per baseline, in one pass:
    :func:`stokes_i_dataset` followed by :func:`average_stokes_i` without the Stokes I
    cube in between (one task per frequency chunk; the same row Dataset, to rounding).
    Baseline chunks of the input are kept (one task per frequency chunk and baseline
    block, e.g. the bounded blocks of :func:`contimg.io.mscolumns.baseline_block_reads`):
    the rows are the same, bit for bit, in the same order.

    ``uvw_target`` ``(ntime, nbaseline, 3)`` metres towards the image's phase centre;
    ``tf``/``ff`` per-baseline factors; ``uv_range``, ``uvw_rows`` and the parallel hands
    as in :func:`stokes_i_dataset`.
    """
    import dask

    pair = parallel_hands(ds.polarization.values)
    nt, nb, nf, _ = ds.VISIBILITY.shape
    uvw_target = np.asarray(uvw_target, dtype=np.float64)
    if uvw_target.shape != (nt, nb, 3):
        raise ValueError(f"uvw_target shape {uvw_target.shape} != UVW {(nt, nb, 3)}")
    tf, ff = _factors(tf, ff, nb)
    arrs = []
    for name in ("VISIBILITY", "FLAG", "WEIGHT"):
        a = ds[name].data
        if not isinstance(a, da.Array):
            a = da.from_array(np.asarray(a), chunks=(-1, -1, 48, -1))
        arrs.append(_parallel(a, pair).rechunk({0: -1, 3: -1},
                                               method=scheduling.rechunk_method()))
    fchunks, bchunks = arrs[0].chunks[2], arrs[0].chunks[1]
    arrs = [a.rechunk({1: bchunks, 2: fchunks}, method=scheduling.rechunk_method())
            for a in arrs]
    blocks = [a.to_delayed()[0, :, :, 0] for a in arrs]         # (baseline, frequency)
    uvw_old = ds.UVW.data if uvw_rows is None else _checked_uvw(uvw_rows, ds)
    if isinstance(uvw_old, da.Array):
        (uvw_old,) = uvw_old.rechunk((nt, nb, 3), method=scheduling.rechunk_method()
                                     ).to_delayed().reshape(-1)
    else:
        uvw_old = np.asarray(uvw_old, dtype=np.float64)
    uvw_new = dask.delayed(uvw_target)
    cross = np.asarray(ds.baseline_antenna1_id.values != ds.baseline_antenna2_id.values)
    freq = np.asarray(ds.frequency.values, dtype=np.float64)
    uv_min, uv_max = float(uv_range[0]), float(uv_range[1])
    block = dask.delayed(_bda_xxyy_block, nout=5, pure=True)
    tok = dask.base.tokenize(ds.VISIBILITY.data, ds.FLAG.data, ds.WEIGHT.data, uvw_target,
                             tf, ff, uv_min, uv_max, pair, uvw_rows)

    def block_of(k, c0, nfk, start, n, blk=None):
        if blk is None:
            return block(blocks[0][0, k], blocks[1][0, k], blocks[2][0, k], uvw_old,
                         uvw_new, freq[c0:c0 + nfk], cross, tf, ff, start, n, c0, uv_min,
                         uv_max, dask_key_name=f"bda-stokes-i-{tok}-{k}")
        j, b0, b1 = blk
        return block(blocks[0][j, k], blocks[1][j, k], blocks[2][j, k], uvw_old, uvw_new,
                     freq[c0:c0 + nfk], cross[b0:b1], tf[b0:b1], ff[b0:b1], start, n, c0,
                     uv_min, uv_max, slice(b0, b1), dask_key_name=f"bda-stokes-i-{tok}-{k}-{j}")

    return _rows_dataset(fchunks, nt, tf, ff, block_of,
                         dict(ds.attrs, ntime=int(nt), nfreq=int(nf), n_input=int(nt * nb * nf)),
                         bchunks=None if len(bchunks) == 1 else bchunks)


def _is_rows(dsi):
    return "row" in dsi.VIS_I.dims


def _cube(dsi):
    """(vis, weight, uvw, freq) as (t, b, f) dask arrays: a row Dataset is one time,
    rows as baselines and one "channel" of frequency c (UVW already in wavelengths)."""
    if not _is_rows(dsi):
        return dsi.VIS_I.data, dsi.WEIGHT_I.data, _uvw_arr(dsi), _freq_arr(dsi)
    vis = dsi.VIS_I.data[None, :, None]
    w = dsi.WEIGHT_I.data[None, :, None]
    uvw = dsi.UVW_L.data.rechunk((dsi.VIS_I.data.chunks[0], 3),
                                 method=scheduling.rechunk_method())[None]
    freq = da.from_array(np.array([SPEED_OF_LIGHT]), chunks=1)
    return vis, w, uvw, freq


# ---------------------------------------------------------------------------------
# plan, density, dirty images
# ---------------------------------------------------------------------------------


def imaging_plan(uvw, freq, npix, cell_rad, epsilon=1e-4, *, double=False, nthreads=1,
                 nvis=None, do_wstacking=True):
    """The global gridding plan for an image of ``npix`` x ``npix`` cells of ``cell_rad``.

    ``uvw``: all rows' target UVW (metres, numpy, ``(..., 3)``), ``freq`` all channels
    (Hz). The plan fixes kernel, grid and w-planes from the extremes of the data so every
    chunk grids onto the same w-stack. ``double=False`` (single precision) needs
    ``epsilon >= 1e-5``; below that double precision is used whatever ``double`` says.
    ``do_wstacking=False`` drops the w term (n - 1): the plan for the minor-cycle PSF,
    which must be a true (shift-invariant, positive-definite) convolution kernel.
    """
    uvw = np.asarray(uvw, dtype=np.float64).reshape(-1, 3)
    freq = np.asarray(freq, dtype=np.float64)
    if epsilon < 1e-5:
        double = True
    fmin, fmax = float(freq.min()) / SPEED_OF_LIGHT, float(freq.max()) / SPEED_OF_LIGHT
    cross = np.any(uvw != 0.0, axis=1)
    aw = np.abs(uvw[cross, 2]) if cross.any() else np.zeros(1)
    wmin, wmax = float(aw.min()) * fmin, float(aw.max()) * fmax
    umax = float(np.abs(uvw[:, 0]).max()) * fmax
    vmax = float(np.abs(uvw[:, 1]).max()) * fmax
    if nvis is None:
        nvis = int(cross.sum()) * freq.size
    return kg.make_plan(npix, npix, cell_rad, cell_rad, epsilon, wmin=wmin, wmax=wmax,
                        umax=umax, vmax=vmax, nvis=max(nvis, 1), double=double,
                        nthreads=nthreads, flip_v=True, divide_by_n=False,
                        do_wstacking=do_wstacking)


@dataclass(frozen=True)
class Coplanar:
    """The plane ``w = a u + b v`` that best fits the baselines, and what dropping the
    rest of ``w`` costs (:func:`coplanar_fit`).

    Imaged in 2-D, ``V = sum S exp(2 pi i (u l + v m + w (n - 1)))`` with ``w = a u + b v
    + w'`` puts a source at ``l' = l + a (n - 1)``, ``m' = m + b (n - 1)``: the slant
    orthographic projection, FITS ``SIN`` with ``PV2_1 = -a``, ``PV2_2 = -b``, which WCS
    readers undo exactly. What is left is the phase ``2 pi w' (n - 1)``. A snapshot of a
    flat array (DSA-110's T over one 5-minute group: ``|w'|`` of a few wavelengths) is
    nearly all plane; a long track is not.
    """

    a: float
    b: float
    rms_w: float        # rms of the residual w' over the rows, wavelengths
    max_w: float        # largest |w'|, wavelengths
    radius: float       # radius (rad) at which the loss is evaluated
    loss: float         # peak loss of a point source at ``radius`` from dropping w'

    @property
    def slant(self) -> tuple:
        """FITS ``(PV2_1, PV2_2)`` of the 2-D image."""
        return (-self.a, -self.b)


def coplanar_fit(uvw, radius, *, scale=1.0) -> Coplanar:
    """Least-squares plane ``w = a u + b v`` through rows ``uvw`` ``(n, 3)`` (numpy or
    dask; times ``scale`` gives wavelengths) and the peak loss that ignoring the residual
    costs a point source ``radius`` radians from the centre: ``1 - <cos phi>`` with
    ``phi = 2 pi w' (1 - cos radius)``, bounded by ``2 pi^2 (1 - cos radius)^2
    <w'^2>``. Rows of zeros (autocorrelations) do not move the fit."""
    u, v, w = uvw[:, 0], uvw[:, 1], uvw[:, 2]
    sums = [(u * u).sum(), (u * v).sum(), (v * v).sum(), (u * w).sum(), (v * w).sum(),
            (w * w).sum(), (abs(u) + abs(v) + abs(w) > 0).sum()]
    suu, suv, svv, suw, svw, sww, n = (float(x) for x in scheduling.compute(*sums))
    det = suu * svv - suv * suv
    if n < 3 or not det > 0:
        a = b = 0.0
    else:
        a = (suw * svv - svw * suv) / det
        b = (svw * suu - suw * suv) / det
    (wmax,) = scheduling.compute(abs(w - a * u - b * v).max())
    ss = max(sww - 2 * a * suw - 2 * b * svw + a * a * suu + 2 * a * b * suv + b * b * svv,
             0.0)
    rms = scale * float(np.sqrt(ss / max(n, 1.0)))
    x = 1.0 - np.cos(radius)
    return Coplanar(a=float(a), b=float(b), rms_w=rms, max_w=scale * float(wmax),
                    radius=float(radius), loss=float(2 * np.pi ** 2 * x * x * rms * rms))


def imaging_plan_rows(dsr: xr.Dataset, npix, cell_rad, epsilon=1e-4, *, double=False,
                      nthreads=1, do_wstacking=True):
    """:func:`imaging_plan` for a row Dataset (:func:`average_dataset`): the w range and
    uv extent of its rows (UVW in wavelengths). Computes four small reductions."""
    uvw = dsr.UVW_L.data
    aw = abs(uvw[:, 2])
    wmin, wmax, umax, vmax = scheduling.compute(aw.min(), aw.max(), abs(uvw[:, 0]).max(),
                                          abs(uvw[:, 1]).max())
    if epsilon < 1e-5:
        double = True
    return kg.make_plan(npix, npix, cell_rad, cell_rad, epsilon, wmin=float(wmin),
                        wmax=float(wmax), umax=float(umax), vmax=float(vmax),
                        nvis=max(int(dsr.sizes["row"]), 1), double=double,
                        nthreads=nthreads, flip_v=True, divide_by_n=False,
                        do_wstacking=do_wstacking)


def _rows(uvw, vis_or_w):
    t, b, f = vis_or_w.shape
    return (np.ascontiguousarray(uvw.reshape(t * b, 3), dtype=np.float64),
            vis_or_w.reshape(t * b, f))


def _density_block(w, uvw, freq, nu, nv, du, dv):
    uvw_r, w_r = _rows(uvw, w)
    g = kw.density_grid(uvw_r, np.ascontiguousarray(freq, np.float64),
                        np.ascontiguousarray(w_r), nu, nv, du, dv)
    return g[None, None, None]


def _freq_arr(dsi):
    return da.from_array(np.asarray(dsi.frequency.values, dtype=np.float64),
                         chunks=(dsi.VIS_I.data.chunks[2],))


def _uvw_arr(dsi):
    c = dsi.VIS_I.data.chunks
    return dsi.UVW.data.rechunk((c[0], c[1], 3), method=scheduling.rechunk_method())


def density(dsi: xr.Dataset, npix_x, npix_y, cell_x_rad, cell_y_rad=None):
    """Lazy uv density grid ``(npix_x, npix_y)`` float64 of ``WEIGHT_I`` (summed over chunks).

    Cells ``du = 1 / (npix_x cell_x)`` (the image's Fourier cell, as WSClean and CASA
    use for uniform/Briggs weighting). Returns ``(grid, du, dv)``.
    """
    cell_y_rad = cell_x_rad if cell_y_rad is None else cell_y_rad
    du, dv = 1.0 / (npix_x * cell_x_rad), 1.0 / (npix_y * cell_y_rad)
    _v, w, uvw, freq = _cube(dsi)
    g = da.blockwise(_density_block, "tbfxy", w, "tbf", uvw, "tbc",
                     freq, "f", concatenate=True, dtype=np.float64,
                     new_axes={"x": npix_x, "y": npix_y},
                     adjust_chunks={"t": 1, "b": 1, "f": 1}, token="uv-density",
                     nu=npix_x, nv=npix_y, du=du, dv=dv)
    return g.sum(axis=(0, 1, 2), split_every=4), du, dv


def _imaging_weights(w_r, uvw_r, freq, wspec, grid):
    if wspec.weighting == "natural":
        return np.ascontiguousarray(w_r, dtype=np.float32)
    return kw.imaging_weights(uvw_r, freq, w_r, wspec.weighting, grid, wspec.du, wspec.dv,
                              wspec.f2)


def _weight_sum_block(w, uvw, freq, grid, wspec):
    uvw_r, w_r = _rows(uvw, w)
    wi = _imaging_weights(w_r, uvw_r, np.asarray(freq, np.float64), wspec, grid)
    t, b, f = w.shape
    return wi.reshape(t, b, f).sum(axis=1, dtype=np.float64)[:, None, :]


def _weight_sum_rows_block(w, uvw, freq, ti, fi, grid, wspec, nt, nf):
    uvw_r, w_r = _rows(uvw, w)
    wi = _imaging_weights(w_r, uvw_r, np.asarray(freq, np.float64), wspec, grid)
    flat = ti.reshape(-1).astype(np.int64) * nf + fi.reshape(-1)
    out = np.bincount(flat, weights=wi.reshape(-1).astype(np.float64), minlength=nt * nf)
    return out.reshape(1, 1, 1, nt, nf)


def _grid_arg(wspec):
    """(density grid as one dask block, its index) and the spec without the grid (the
    grid travels to the workers once, as a graph key, not inside every task)."""
    light = replace(wspec, grid=None)
    if wspec.weighting == "natural" or wspec.grid is None:
        return None, None, light
    g = wspec.grid
    if not isinstance(g, da.Array):
        g = da.from_array(np.asarray(g, dtype=np.float64), chunks=-1)
    return g.rechunk(-1, method=scheduling.rechunk_method()), "gh", light


def weight_sums(dsi: xr.Dataset, wspec: WeightSpec):
    """Lazy ``(ntime, nfreq)`` float64: imaging weights summed over baselines.

    Their total normalises the dirty image; per (time, channel) they weight the
    primary beam (:func:`kernels.beam.mean_airy_beam`). For a row Dataset
    (:func:`average_stokes_i`) each averaged visibility counts at its bin's middle.
    """
    g, gi, wspec = _grid_arg(wspec)
    if _is_rows(dsi):
        nt, nf = int(dsi.attrs["ntime"]), int(dsi.attrs["nfreq"])
        _v, w, uvw, freq = _cube(dsi)
        ti = dsi.TIME_INDEX.data[None, :, None]
        fi = dsi.CHAN_INDEX.data[None, :, None]
        s = da.blockwise(_weight_sum_rows_block, "tbfxy", w, "tbf", uvw, "tbc", freq, "f",
                         ti, "tbf", fi, "tbf", g, gi, concatenate=True, dtype=np.float64,
                         new_axes={"x": nt, "y": nf}, adjust_chunks={"t": 1, "b": 1, "f": 1},
                         token="weight-sums-rows", wspec=wspec, nt=nt, nf=nf)
        return s.sum(axis=(0, 1, 2), split_every=8)
    s = da.blockwise(_weight_sum_block, "tbf", dsi.WEIGHT_I.data, "tbf", _uvw_arr(dsi),
                     "tbc", _freq_arr(dsi), "f", g, gi, concatenate=True, dtype=np.float64,
                     adjust_chunks={"b": 1}, token="weight-sums", wspec=wspec)
    return s.sum(axis=1)


def _index_block(w, uvw, freq, grid, *, plan, wspec, nthreads):
    uvw_r, w_r = _rows(uvw, w)
    freq = np.ascontiguousarray(freq, dtype=np.float64)
    wi = _imaging_weights(w_r, uvw_r, freq, wspec, grid)
    out = np.empty((1, 1, 1), dtype=object)
    # the imaging weights travel with the index: both stay fixed over the major cycles
    out[0, 0, 0] = (kg.make_index(uvw_r, freq, plan, flags=wi == 0, nthreads=nthreads), wi)
    return out


def grid_index(dsi: xr.Dataset, plan, wspec: WeightSpec = WeightSpec(), *, nthreads=1):
    """Lazy gridding indices, one per chunk (an object array of one element per block):
    pass as ``index=`` to :func:`dirty_image` with the same ``dsi``, ``plan`` and
    ``wspec`` (persist it: CLEAN's major cycles then skip sorting the visibilities into
    uv tiles and w-planes, which costs about one gridding pass each time)."""
    g, gi, wspec = _grid_arg(wspec)
    _v, w, uvw, freq = _cube(dsi)
    return da.blockwise(_index_block, "tbf", w, "tbf", uvw, "tbc", freq, "f", g, gi,
                        concatenate=True, dtype=object,
                        adjust_chunks={"t": 1, "b": 1, "f": 1}, token="grid-index",
                        plan=plan, wspec=wspec, nthreads=nthreads)


def _dirty_block(vis, w, uvw, freq, grid, model, index, *, plan, wspec, psf, gridder,
                 nthreads, epsilon):
    uvw_r, w_r = _rows(uvw, w)
    freq = np.ascontiguousarray(freq, dtype=np.float64)
    if index is not None:
        index, wi = index.reshape(-1)[0]
    else:
        wi = _imaging_weights(w_r, uvw_r, freq, wspec, grid)
    t, b, f = vis.shape
    if psf:
        v = (wi > 0).astype(np.complex128 if plan.double else np.complex64)
    else:
        v = vis.reshape(t * b, f).astype(np.complex128 if plan.double else np.complex64,
                                          copy=False)
    img_dtype = plan.image_dtype
    if not np.any(wi):
        return np.zeros((1, 1, 1, plan.npix_x, plan.npix_y), dtype=img_dtype)
    flags = wi == 0
    if model is not None:
        model = np.ascontiguousarray(model, dtype=img_dtype)
        if gridder == "ducc0":
            from ducc0.wgridder.experimental import dirty2vis as d2v

            pred = d2v(uvw=uvw_r, freq=freq, dirty=model, wgt=None,
                       mask=(~flags).astype(np.uint8), pixsize_x=plan.pixsize_x,
                       pixsize_y=plan.pixsize_y, epsilon=epsilon,
                       do_wgridding=plan.do_wstacking,
                       nthreads=nthreads, flip_v=True, divide_by_n=False)
        else:
            pred = kg.dirty2vis(uvw_r, freq, model, flags=flags, pixsize_x=plan.pixsize_x,
                                pixsize_y=plan.pixsize_y, epsilon=plan.epsilon,
                                do_wstacking=plan.do_wstacking, nthreads=nthreads,
                                plan=plan, index=index)
        np.subtract(v, pred, out=pred)  # pred is a fresh array: reuse it
        v = pred
        del pred
    if gridder == "ducc0":
        from ducc0.wgridder.experimental import vis2dirty as v2d

        img = v2d(uvw=uvw_r, freq=freq, vis=v, wgt=wi.astype(img_dtype, copy=False),
                  npix_x=plan.npix_x, npix_y=plan.npix_y, pixsize_x=plan.pixsize_x,
                  pixsize_y=plan.pixsize_y, epsilon=epsilon, do_wgridding=plan.do_wstacking,
                  nthreads=nthreads, flip_v=True, divide_by_n=False)
    else:
        img = kg.vis2dirty(uvw_r, freq, v, weights=wi.astype(img_dtype, copy=False),
                           flags=flags,
                           npix_x=plan.npix_x, npix_y=plan.npix_y, pixsize_x=plan.pixsize_x,
                           pixsize_y=plan.pixsize_y, epsilon=plan.epsilon,
                           do_wstacking=plan.do_wstacking, nthreads=nthreads, plan=plan,
                           index=index)
    return np.asarray(img, dtype=img_dtype)[None, None, None]


def dirty_image(dsi: xr.Dataset, plan, wspec: WeightSpec = WeightSpec(), *, model=None,
                psf=False, gridder="contimg", nthreads=1, epsilon=None, index=None):
    """Lazy ``(npix_x, npix_y)`` dirty (or residual, or PSF) image, *unnormalised*.

    One task per chunk grids the chunk's Stokes I with its imaging weights onto a full
    image with the global ``plan``; images are summed (tree reduction). Divide by the
    total imaging weight (:func:`weight_sums`) for Jy/beam.

    ``model``: a model image (Jy/pixel, numpy) whose visibilities (degridded per chunk,
    the gridder's exact adjoint) are subtracted first: the result is the residual image
    of a major cycle. ``psf=True`` grids unit visibilities (the PSF). ``gridder``:
    ``"contimg"`` (:mod:`kernels.gridding`) or ``"ducc0"`` (``ducc0.wgridder``, same
    conventions and epsilon, for comparison). ``nthreads``: threads per task.
    ``index``: :func:`grid_index` of the same ``dsi``, ``plan`` and ``wspec`` (contimg
    gridder only).
    """
    if gridder not in GRIDDERS:
        raise ValueError(f"gridder must be one of {GRIDDERS}, got {gridder!r}")
    if gridder == "ducc0":
        try:
            import ducc0.wgridder.experimental  # noqa: F401
        except ImportError as exc:  # pragma: no cover - ducc0 is a bench dependency
            raise ImportError("gridder='ducc0' needs the ducc0 package") from exc
    g, gi, wspec = _grid_arg(wspec)
    if model is not None:
        model = np.asarray(model, dtype=plan.image_dtype)
        if model.shape != (plan.npix_x, plan.npix_y):
            raise ValueError(f"model shape {model.shape} != image {(plan.npix_x, plan.npix_y)}")
        m = da.from_array(model, chunks=-1)
        margs = (m, "xy")
        new_axes = {}
    else:
        margs = (None, None)
        new_axes = {"x": plan.npix_x, "y": plan.npix_y}
    name = "psf" if psf else ("residual" if model is not None else "dirty")
    vis, w, uvw, freq = _cube(dsi)
    if index is not None:
        if gridder != "contimg":
            raise ValueError("index= works with the contimg gridder only")
        if index.numblocks != vis.numblocks:
            raise ValueError(f"index has {index.numblocks} blocks, the data {vis.numblocks}")
        # one index per data block, matched by block position (not by chunk sizes)
        iargs = (index, "tbf")
    else:
        iargs = (None, None)
    imgs = da.blockwise(
        _dirty_block, "tbfxy", vis, "tbf", w, "tbf", uvw, "tbc", freq, "f", g, gi, *margs,
        *iargs, concatenate=True, align_arrays=index is None,
        dtype=plan.image_dtype, new_axes=new_axes, adjust_chunks={"t": 1, "b": 1, "f": 1},
        token=f"grid-{name}", plan=plan, wspec=wspec, psf=psf, gridder=gridder,
        nthreads=nthreads, epsilon=plan.epsilon if epsilon is None else epsilon)
    return imgs.sum(axis=(0, 1, 2), split_every=4, dtype=plan.image_dtype)
