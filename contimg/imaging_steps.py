"""The CLEAN driver of :func:`contimg.imaging.image_dataset`, as named steps.

Each step is a function of what the previous ones made, testable on its own:

1. :func:`prepare_visibilities` — one phase centre, Stokes I, baseline-dependent
   averaging, the uv range, the gridding tasks (:class:`Visibilities`);
2. :func:`choose_w_mode` — w-snapshot in the baselines' plane (slant SIN projection)
   or w-stacking;
3. :func:`plan_imaging` — the gridding plans of the image and of the PSF
   (and :func:`clean_mask`);
4. :func:`imaging_weights` — natural, uniform or Briggs;
5. :func:`dirty_and_psf` — one compute, with the gridding index (:class:`Dirty`);
6. :func:`clean` — minor cycles between major cycles (:class:`CleanResult`);
7. :func:`image_products` — restore, primary beam (:func:`primary_beam`), noise, peak:
   :class:`contimg.imaging.ImageProducts`.

Every step takes the image's :class:`contimg.config.ImageConfig` (``c``). The image
geometry (the slant SIN projection's :func:`unslant`,
:func:`source_mask`, the primary beam map) lives here too.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from contimg import telescope as tel
from graphs import scheduling
from kernels.constants import ARCSEC, SPEED_OF_LIGHT

if TYPE_CHECKING:
    from contimg.config import ImageConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------
# image geometry: the slant SIN projection, masks, the primary beam
# ---------------------------------------------------------------------------------


def unslant(lp, mp, slant):
    """True direction cosines ``(l, m)`` of image coordinates ``(l', m')`` in the SIN
    projection with ``(PV2_1, PV2_2) = slant``: ``l' = l + xi (1 - n)``,
    ``m' = m + eta (1 - n)`` (a fixed-point iteration; ``xi (1 - n)`` is small)."""
    xi, eta = (float(x) for x in slant)
    if not (xi or eta):
        return lp, mp
    l, m = lp, mp
    for _ in range(4):
        n = np.sqrt(np.maximum(1.0 - l * l - m * m, 0.0))
        l, m = lp - xi * (1.0 - n), mp - eta * (1.0 - n)
    return l, m


def source_mask(npix, cell_arcsec, ra0, dec0, ra, dec, radius_arcsec, slant=(0.0, 0.0)):
    """Boolean ``[ix, iy]`` mask: discs of ``radius_arcsec`` around ``(ra, dec)`` (ICRS
    radians, arrays) in an image of ``npix`` cells of ``cell_arcsec`` centred on
    ``(ra0, dec0)`` (SIN projection with ``(PV2_1, PV2_2) = slant``, first axis west)."""
    from kernels.beam import lmn_of

    ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
    dec = np.atleast_1d(np.asarray(dec, dtype=np.float64))
    l, m, n = lmn_of(ra, dec, ra0, dec0)
    l, m = l + slant[0] * (1.0 - n), m + slant[1] * (1.0 - n)
    cell = cell_arcsec * ARCSEC
    ix = npix // 2 - l / cell
    iy = npix // 2 + m / cell
    rad = radius_arcsec / cell_arcsec
    mask = np.zeros((npix, npix), dtype=bool)
    h = int(math.ceil(rad))
    for x, y, nn in zip(ix, iy, n):
        if nn <= 0:
            continue
        x0, x1 = max(0, int(x) - h), min(npix, int(x) + h + 2)
        y0, y1 = max(0, int(y) - h), min(npix, int(y) + h + 2)
        if x0 >= x1 or y0 >= y1:
            continue
        gx, gy = np.meshgrid(np.arange(x0, x1), np.arange(y0, y1), indexing="ij")
        mask[x0:x1, y0:y1] |= (gx - x) ** 2 + (gy - y) ** 2 <= rad * rad
    return mask


def _pb_map(npix, cell, ra0, dec0, pc_ra, pc_dec, freqs, wsum, ncoarse=129, nfbin=16,
            slant=(0.0, 0.0)):
    """Mean Airy beam on the image, on a coarse grid interpolated (cubic) to every pixel
    (``slant``: the image's SIN ``PV2_1``, ``PV2_2``, see :func:`unslant`)."""
    from scipy import ndimage

    from kernels.beam import lmn_of, mean_airy_beam

    nf = freqs.size
    edges = np.linspace(0, nf, min(nfbin, nf) + 1).astype(int)
    wb = np.stack([wsum[:, a:b].sum(axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)
    fb = np.array([np.average(freqs[a:b], weights=None if not wsum[:, a:b].sum()
                              else wsum[:, a:b].sum(axis=0)) for a, b in
                   zip(edges[:-1], edges[1:])])
    pl, pm, _ = lmn_of(pc_ra, pc_dec, ra0, dec0)
    nc = min(ncoarse, npix)
    idx = np.linspace(0, npix - 1, nc)
    l = -(idx - npix // 2)[:, None] * cell + 0 * idx[None, :]
    m = (idx - npix // 2)[None, :] * cell + 0 * idx[:, None]
    l, m = unslant(l, m, slant)
    coarse = mean_airy_beam(l, m, pl, pm, fb, wb, tel.DISH_DIAMETER_M)
    if nc == npix:
        return coarse.astype(np.float32)
    scale = (nc - 1) / (npix - 1)
    ii = np.arange(npix, dtype=np.float64) * scale
    out = np.empty((npix, npix), dtype=np.float32)
    step = 512
    for a in range(0, npix, step):
        gx, gy = np.meshgrid(ii[a:a + step], ii, indexing="ij")
        out[a:a + step] = ndimage.map_coordinates(coarse, [gx, gy], order=3, mode="nearest")
    return out


# ---------------------------------------------------------------------------------
# the imaging driver: named steps, each a function of what the previous ones made
# ---------------------------------------------------------------------------------


def _scheduler_threads():
    if scheduling.threads():   # computing on local threads (graphs.scheduling)
        return scheduling.threads()
    try:
        from distributed import get_client

        return max(1, sum(get_client().nthreads().values()))
    except (ImportError, ValueError):
        return os.cpu_count() or 1


def cell_rad(c: ImageConfig) -> float:
    """Pixel size of an :class:`~contimg.config.ImageConfig`, radians."""
    return c.cell_arcsec * ARCSEC


def recorded_options(c: ImageConfig) -> dict:
    """The options an image records (``ImageProducts.options``, the FITS header)."""
    return {k: getattr(c, k) for k in (
        "npix", "cell_arcsec", "weighting", "robust", "epsilon", "niter", "threshold",
        "auto_threshold_sigma", "algorithm", "gain", "mgain", "max_major", "gridder")} | {
        "average": bool(c.average), "smear_loss": c.smear_loss, "w_mode": c.w_mode,
        "w_loss": c.w_loss}


@dataclass
class Visibilities:
    """Step 1's Stokes I visibilities, re-phased to the image centre, ready to grid."""

    dsi: object                # Dataset: VIS_I, WEIGHT_I, UVW(_L) (rows or time x baseline)
    uvw: np.ndarray            # (time, baseline, 3) metres, towards the image centre
    freqs: np.ndarray          # Hz
    centre: tuple              # (ra, dec) ICRS radians
    smear_radius: float        # radians: where the averaging loss is budgeted
    ntask: int                 # gridding tasks per image
    nvis: int | None           # visibilities gridded (None: every one of the Dataset)
    averaged: bool
    qa: dict = None            # checks of the input (uvw_geometry's stored-UVW check)
    store: object = None       # the ImagingStore the rows stream from (spill), or None


def _image_centre(ds, phase_center):
    nt = ds.sizes["time"]
    if phase_center is not None:
        return float(phase_center[0]), float(phase_center[1])
    ra = np.asarray(ds.PHASE_CENTER_RA.values, dtype=np.float64)
    dec = np.asarray(ds.PHASE_CENTER_DEC.values, dtype=np.float64)
    return float(ra[nt // 2]), float(dec[nt // 2])


def _target_uvw(ds, ra0, dec0):
    from contimg.uvw import compute_uvw

    loc = ds.attrs.get("telescope_location")
    return compute_uvw(np.asarray(ds.ANTENNA_POSITION.values, dtype=np.float64),
                       np.asarray(ds.baseline_antenna1_id.values),
                       np.asarray(ds.baseline_antenna2_id.values),
                       np.asarray(ds.time.values, dtype=np.float64), ra0, dec0,
                       telescope_location=None if loc is None else np.asarray(loc, float))


UVW_SOURCES = ("recompute", "stored")


def uvw_geometry(ds, ra0, dec0, uvw_source="recompute", tolerance_m=1e-3):
    """One consistent geometry for the re-phasing: ``(uvw_rows, uvw_target, qa)``.

    ``uvw_rows`` (the w_old of every row, towards its own phase centre) and
    ``uvw_target`` (towards the image centre ``(ra0, dec0)``) come from the same source:
    ``"recompute"`` (default): both from the antenna positions and times
    (:func:`contimg.uvw.compute_uvw`); ``"stored"``: the Dataset's stored UVW, and for
    the target the same baselines rotated from each row's (recomputed) frame into the
    target's. Never one of each: stored UVW of another writer (conventions, epochs, a
    TIME reference) mixed with recomputed w misplaces sources.

    ``qa``: how far the stored UVW are from the recomputed ones (``uvw_max_diff_m``,
    ``uvw_rms_diff_m`` over the cross-correlations), ``uvw_ok`` (within
    ``tolerance_m``) and ``uvw_source``; a warning is logged beyond the tolerance.
    """
    from contimg.uvw import phase_center_basis

    if uvw_source not in UVW_SOURCES:
        raise ValueError(f"uvw_source must be one of {UVW_SOURCES}, got {uvw_source!r}")
    nt = ds.sizes["time"]
    times = np.asarray(ds.time.values, dtype=np.float64)
    pc_ra = np.broadcast_to(np.asarray(ds.PHASE_CENTER_RA.values, np.float64), (nt,))
    pc_dec = np.broadcast_to(np.asarray(ds.PHASE_CENTER_DEC.values, np.float64), (nt,))
    pos = np.asarray(ds.ANTENNA_POSITION.values, dtype=np.float64)
    a1 = np.asarray(ds.baseline_antenna1_id.values)
    a2 = np.asarray(ds.baseline_antenna2_id.values)
    loc = ds.attrs.get("telescope_location")
    loc = pos.mean(axis=0) if loc is None else np.asarray(loc, dtype=np.float64)
    b_rows = phase_center_basis(times, pc_ra, pc_dec, loc)           # (T, 3, 3)
    b_tgt = phase_center_basis(times, ra0, dec0, loc)
    proj = np.einsum("tij,aj->tai", b_rows, pos - loc)
    uvw_rec = proj[:, a2, :] - proj[:, a1, :]
    (stored,) = scheduling.compute(ds.UVW.data)   # on this stage's threads, not a client
    stored = np.asarray(stored, dtype=np.float64)
    cross = a1 != a2
    diff = np.linalg.norm(stored[:, cross] - uvw_rec[:, cross], axis=-1)
    finite = np.isfinite(diff)
    dmax = float(diff[finite].max()) if finite.any() else 0.0
    drms = float(np.sqrt(np.mean(diff[finite] ** 2))) if finite.any() else 0.0
    ok = bool(dmax <= tolerance_m and finite.all())
    qa = {"uvw_source": uvw_source, "uvw_max_diff_m": dmax, "uvw_rms_diff_m": drms,
          "uvw_tolerance_m": float(tolerance_m), "uvw_ok": ok}
    if not ok:
        log.warning("stored UVW differ from UVW recomputed from the antenna positions and "
                    "times by up to %.4g m (rms %.4g m, tolerance %.3g m): another writer's "
                    "conventions, epoch or TIME reference; imaging with %s UVW", dmax, drms,
                    tolerance_m, "recomputed" if uvw_source == "recompute" else "stored")
    if uvw_source == "recompute":
        proj_t = np.einsum("tij,aj->tai", b_tgt, pos - loc)
        return uvw_rec, proj_t[:, a2, :] - proj_t[:, a1, :], qa
    # the stored baselines, taken back to ITRS through each row's frame, then projected
    # on the target's: the same rotation the recomputed ones would see
    rot = np.einsum("tij,tkj->tik", b_tgt, b_rows)                    # B_tgt B_rows^T
    return stored, np.einsum("tij,tbj->tbi", rot, stored), qa


def _channel_width(ds, freqs) -> float:
    return float(ds.frequency.attrs.get("channel_width", np.median(np.diff(freqs))
                                        if freqs.size > 1 else 0.0))


#: Visibility bytes (complex64) of one averaging task's input: the averaging needs every
#: integration of a baseline, and open_ms's chunks hold every baseline, so a chunk of
#: all integrations grows with the array. Above this, an MS is read in baseline blocks
#: instead (:func:`contimg.io.mscolumns.baseline_block_reads`). 96 MiB keeps a full
#: DSA-110 group's chunks (24 integrations x 4656 baselines x 48 channels = 86 MiB).
AVERAGE_BLOCK_BYTES = 96 << 20


def _bounded_reads(ds):
    """``ds``, or, when it is a whole MS opened by :func:`contimg.imaging.image_ms` (its
    ``ms_data_column`` attribute says which column) whose chunks of every integration
    would hold more than :data:`AVERAGE_BLOCK_BYTES`, the same Dataset read in baseline
    blocks of at most that size (the same values; the averaged rows are the same, bit
    for bit)."""
    ms = ds.attrs.get("ms_path")
    vis = ds.VISIBILITY.data
    if (not ms or "ms_data_column" not in ds.attrs or "ms_field_id" in ds.attrs
            or not hasattr(vis, "chunks")):
        return ds
    nt, nbl, _, npol = vis.shape
    per_bl = nt * max(vis.chunks[2]) * npol * 8
    if per_bl * nbl <= AVERAGE_BLOCK_BYTES:
        return ds
    from contimg.io.ms import MSFormatError
    from contimg.io.mscolumns import baseline_block_reads

    block = max(1, AVERAGE_BLOCK_BYTES // per_bl)
    nblk = -(-nbl // block)
    block = -(-nbl // nblk)                      # blocks of equal size
    try:
        out = baseline_block_reads(ds, block, ds.attrs["ms_data_column"])
    except MSFormatError as exc:              # rows the Dataset does not map one to one
        log.info("averaging from open_ms's chunks (%s)", exc)
        return ds
    log.info("reading %s in %d baseline blocks of %d baselines for the averaging",
             ms, nblk, block)
    return out


def prepare_visibilities(ds, c: ImageConfig, opts: dict, phase_center=None) -> Visibilities:
    """Step 1: one phase centre, Stokes I, baseline-dependent averaging (or not), the
    uv range, chunked into the gridding tasks (noted in ``opts``)."""
    from graphs import image as gi

    store = None
    ra0, dec0 = _image_centre(ds, phase_center)
    uvw_rows, uvw_t, qa = uvw_geometry(ds, ra0, dec0, c.uvw_source, c.uvw_tolerance_m)
    freqs = np.asarray(ds.frequency.values, dtype=np.float64)
    uv_range = (float(c.uv_min_lambda or 0.0),
                np.inf if c.uv_max_lambda is None else float(c.uv_max_lambda))
    ntask = int(c.grid_tasks or _scheduler_threads())
    nvis_in = int(np.prod(ds.VISIBILITY.shape[:3]))
    if c.smear_radius_deg is None:
        pb_half = 0.5 * 1.029 * SPEED_OF_LIGHT / float(freqs.max()) / (
            tel.DISH_DIAMETER_M)
        theta = min(pb_half, 0.5 * c.npix * cell_rad(c))
    else:
        theta = math.radians(float(c.smear_radius_deg))
    if c.average:
        from kernels import averaging as ka

        chw = abs(_channel_width(ds, freqs))
        vchunks = getattr(ds.VISIBILITY.data, "chunks", None)
        nfchunk = int(max(vchunks[2])) if vchunks else min(48, freqs.size)
        tf, ff = ka.bda_factors(uvw_t, freqs, chw, theta, float(c.smear_loss), nfchunk)
        dsi = gi.average_dataset(_bounded_reads(ds), uvw_t, tf, ff, uv_range=uv_range,
                                 uvw_rows=uvw_rows)
        nrow = dsi.sizes["row"]
        if c.spill and c.gridder == "contimg":
            # the rows go to a store on disk; every pass streams them (imaging_store)
            from contimg.imaging_store import ImagingStore

            store = ImagingStore().write(dsi)
            dsi = store.dataset()
        else:
            per = int(math.ceil(nrow / max(1, ntask)))
            dsi = dsi.chunk({"row": per})
        log.info("baseline-dependent averaging (loss <= %.3g at %.2f deg): %d -> %d "
                 "visibilities (%.1fx); bins up to %d integrations x %d channels",
                 c.smear_loss, math.degrees(theta), nvis_in, nrow, nvis_in / max(nrow, 1),
                 int(tf.max()), int(ff.max()))
        nvis = nrow
        opts.update(n_vis_in=nvis_in, n_vis_gridded=int(nrow),
                    smear_radius_deg=math.degrees(theta))
        if c.persist and store is None:
            dsi = scheduling.persist(dsi)
    else:
        dsi = gi.stokes_i_dataset(ds, uvw_t, uv_range=uv_range, uvw_rows=uvw_rows)
        if c.persist:
            dsi = scheduling.persist(dsi)
        nf = dsi.sizes["frequency"]
        nfc = len(dsi.VIS_I.data.chunks[2])
        if ntask < nfc or len(dsi.VIS_I.data.chunks[0]) > 1:
            per = int(math.ceil(nf / max(1, min(ntask, nfc))))
            dsi = dsi.chunk({"time": -1, "baseline_id": -1, "frequency": per})
        nvis = None
        opts.update(n_vis_in=nvis_in, n_vis_gridded=nvis_in)
    log.info("gridding in %d task(s) per image", ntask if c.average else
             len(dsi.VIS_I.data.chunks[2]))
    return Visibilities(dsi=dsi, uvw=uvw_t, freqs=freqs, centre=(ra0, dec0),
                        smear_radius=theta, ntask=ntask, nvis=nvis, averaged=bool(c.average),
                        qa=qa, store=store)


W_CORNER_LOSS = 0.05   # a snapshot's loss in the image corners (beyond the PB's 0.15)


def choose_w_mode(vis: Visibilities, c: ImageConfig, opts: dict):
    """Step 2: ``(snapshot?, slant)`` for ``c.w_mode`` (see :func:`image_dataset`);
    notes the choice and the fit in ``opts``."""
    from graphs import image as gi

    if c.w_mode == "wstack":
        opts.update(w_stacking=True)
        return False, (0.0, 0.0)
    uvw = vis.dsi.UVW_L.data if vis.averaged else vis.uvw.reshape(-1, 3)
    scale = 1.0 if vis.averaged else float(vis.freqs.max()) / SPEED_OF_LIGHT
    radius, width = vis.smear_radius, c.npix * cell_rad(c)
    cop = gi.coplanar_fit(uvw, radius, scale=scale)
    xc = 1.0 - math.cos(width / math.sqrt(2.0))
    corner = 2 * math.pi ** 2 * xc * xc * cop.rms_w ** 2     # the same loss in the corners
    ok = c.w_mode == "snapshot" or (cop.loss <= c.w_loss and corner <= W_CORNER_LOSS)
    what = (f"baselines fit w = {cop.a:.5f} u + {cop.b:.5f} v to {cop.rms_w:.3g} wavelengths "
            f"rms (max {cop.max_w:.3g}); dropping the rest loses {cop.loss:.2g} of a point "
            f"source at {math.degrees(radius):.2f} deg, {corner:.2g} in the corners")
    if ok:
        log.info("w-snapshot: %s: imaging in 2-D, SIN projection PV2 = (%.5f, %.5f)", what,
                 *cop.slant)
    else:
        log.info("w-stacking: %s (budgets %.2g and %.2g)", what, c.w_loss, W_CORNER_LOSS)
    opts.update(w_stacking=not ok, w_plane=(cop.a, cop.b), w_resid_rms=cop.rms_w,
                w_resid_max=cop.max_w, w_snapshot_loss=cop.loss)
    return ok, (cop.slant if ok else (0.0, 0.0))


def plan_imaging(vis: Visibilities, c: ImageConfig, snapshot: bool):
    """Step 3: the gridding plans ``(plan, psf_plan)``.

    The PSF of the minor cycles is made without the w term, so that it is a true
    convolution kernel (symmetric, positive definite); with it, the response to a
    component depends on its position (by ~1 % of the peak across a 3 deg field), the
    Högbom/Clark iteration is no longer a descent and can diverge. Major cycles use the
    exact w-stacked (de)gridder, so the residual and model stay exact. A snapshot's
    plan is already 2-D: the PSF shares it (and its gridding index).
    """
    from graphs import image as gi

    def make_plan(wstack):
        if vis.averaged:
            # the plan from the averaged rows themselves: a bin's mean w can lie below
            # every sample's |w| (w changes sign inside it, e.g. east-west baselines)
            return gi.imaging_plan_rows(vis.dsi, c.npix, cell_rad(c), c.epsilon, double=c.double,
                                        nthreads=c.nthreads, do_wstacking=wstack)
        return gi.imaging_plan(vis.uvw, vis.freqs, c.npix, cell_rad(c), c.epsilon,
                               double=c.double, nthreads=c.nthreads, nvis=vis.nvis,
                               do_wstacking=wstack)

    plan = make_plan(not snapshot)
    psf_plan = plan if (snapshot or c.psf_wterm) else make_plan(False)
    return plan, psf_plan


def clean_mask(vis: Visibilities, c: ImageConfig, slant, mask=None, mask_sources=None):
    """The CLEAN mask: ``mask`` OR discs of ``c.mask_radius_arcsec`` around
    ``mask_sources`` (``(ra, dec)`` arrays, ICRS radians); None: no mask."""
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (c.npix, c.npix):
            raise ValueError(f"mask shape {mask.shape} != ({c.npix}, {c.npix})")
    if mask_sources is not None:
        sm = source_mask(c.npix, c.cell_arcsec, *vis.centre, mask_sources[0],
                         mask_sources[1], c.mask_radius_arcsec, slant=slant)
        mask = sm if mask is None else (mask | sm)
    return mask


def imaging_weights(vis: Visibilities, c: ImageConfig):
    """Step 4: the imaging weights (natural, uniform or Briggs) as a ``WeightSpec``."""
    from graphs import image as gi
    from kernels import weighting as kw

    if c.weighting == "natural":
        return gi.WeightSpec("natural")
    dens, du, dv = gi.density(vis.dsi, c.npix, c.npix, cell_rad(c))
    dens, sum_w = scheduling.compute(dens, vis.dsi.WEIGHT_I.data.sum(dtype=np.float64))
    f2 = kw.briggs_f2(dens, float(sum_w), c.robust) if c.weighting == "briggs" else 0.0
    return gi.WeightSpec(c.weighting, dens, f2, du, dv)


@dataclass
class Dirty:
    """Step 5's products: normalised dirty image and PSF (float32, ``[ix, iy]``)."""

    dirty: np.ndarray
    psf: np.ndarray
    weight_sums: np.ndarray    # (ntime, nfreq) imaging weights summed over baselines
    norm: float                # their total: the image normalisation
    index: object              # the persisted gridding index of `plan` (or None)


def dirty_and_psf(vis: Visibilities, c: ImageConfig, plan, psf_plan, wspec) -> Dirty:
    """Step 5: the PSF and the dirty image in one compute (with the gridding index the
    major cycles reuse, when there will be any)."""
    from graphs import image as gi

    if vis.store is not None:
        return _dirty_and_psf_store(vis, c, plan, psf_plan, wspec)
    index = None
    if c.gridder == "contimg" and c.persist and (c.niter > 0 or psf_plan is plan):
        # sort the visibilities into uv tiles and w-planes once, for every major cycle
        index = gi.grid_index(vis.dsi, plan, wspec, nthreads=c.nthreads)
        index = scheduling.persist(index)
    wsum_l = gi.weight_sums(vis.dsi, wspec)
    psf_l = gi.dirty_image(vis.dsi, psf_plan, wspec, psf=True, gridder=c.gridder,
                           nthreads=c.nthreads, index=index if psf_plan is plan else None)
    dirty_l = gi.dirty_image(vis.dsi, plan, wspec, gridder=c.gridder, nthreads=c.nthreads,
                             index=index)
    wsum, psf, dirty = scheduling.compute(wsum_l, psf_l, dirty_l)
    norm = float(wsum.sum())
    if not norm > 0:
        raise ValueError("nothing to image: every visibility is flagged or has zero weight")
    return Dirty(dirty=(dirty / norm).astype(np.float32), psf=(psf / norm).astype(np.float32),
                 weight_sums=wsum, norm=norm, index=index)


def _dirty_and_psf_store(vis: Visibilities, c: ImageConfig, plan, psf_plan, wspec) -> Dirty:
    """Step 5 from the store: the dirty image first (each part's weights and index are
    made and kept), then the PSF (reusing them when the plans are one)."""
    from graphs import image as gi
    from graphs.image_store import store_image

    groups = vis.store.groups(vis.ntask)
    wsum_l = gi.weight_sums(vis.dsi, wspec)
    dirty_l = store_image(groups, plan, wspec, nthreads=c.nthreads)
    wsum, dirty = scheduling.compute(wsum_l, dirty_l)
    (psf,) = scheduling.compute(store_image(groups, psf_plan, wspec, psf=True,
                                            nthreads=c.nthreads))
    norm = float(wsum.sum())
    if not norm > 0:
        raise ValueError("nothing to image: every visibility is flagged or has zero weight")
    return Dirty(dirty=(dirty / norm).astype(np.float32), psf=(psf / norm).astype(np.float32),
                 weight_sums=wsum, norm=norm, index=None)


def residual_image(vis: Visibilities, c: ImageConfig, plan, wspec, d: Dirty, model):
    """The residual image (Jy/beam, float64) of ``model`` (Jy/pixel): one major cycle,
    from the store (``vis.store``) or the in-memory rows with ``d.index``."""
    from graphs import image as gi

    from contimg.runtime import release_freed_memory

    release_freed_memory()          # what the minor cycles and the last pass left
    m = model.astype(plan.image_dtype)
    if vis.store is not None:
        from graphs.image_store import store_image

        res_l = store_image(vis.store.groups(vis.ntask), plan, wspec, model=m,
                            nthreads=c.nthreads)
    else:
        res_l = gi.dirty_image(vis.dsi, plan, wspec, model=m, gridder=c.gridder,
                               nthreads=c.nthreads, index=d.index)
    (res,) = scheduling.compute(res_l)
    return res.astype(np.float64) / d.norm


@dataclass
class CleanResult:
    """Step 6's products."""

    model: np.ndarray          # float64 Jy/pixel
    residual: np.ndarray       # float64 Jy/beam
    n_components: int
    n_major: int
    stop: float                # the stop level CLEAN reached for, Jy/beam


def clean(dirty, psf, c: ImageConfig, mask, residual_of) -> CleanResult:
    """Step 6: minor cycles (Clark or Högbom, :mod:`kernels.clean`) between major cycles
    (``residual_of(model)``: the residual image of a model, from the visibilities);
    the stopping rules of the module docstring."""
    from kernels import clean as kc

    npix, niter = c.npix, c.niter
    residual = dirty.astype(np.float64)
    model = np.zeros((npix, npix), dtype=np.float64)
    psf64 = psf.astype(np.float64)
    use_mask = mask is not None
    mask_arr = mask if use_mask else np.zeros((1, 1), dtype=bool)
    patch = int(c.clark_patch or max(32, npix // 8))
    patch = min(patch, npix // 2 - 1)
    sidelobe = kc.psf_sidelobe(psf64, patch) if c.algorithm == "clark" else 0.0
    ncomp, nmajor, stop = 0, 0, c.threshold
    prev = None  # (peak, model, residual, ncomp) before the last minor cycle
    while ncomp < niter and nmajor < c.max_major:
        sigma = kc.robust_sigma(residual, mask if use_mask else None)
        stop = max(c.threshold,
                   c.auto_threshold_sigma * sigma if c.auto_threshold_sigma else 0.0)
        peak = float(np.abs(residual[mask] if use_mask else residual).max())
        if prev is not None and peak > 1.5 * prev[0]:
            # the last major cycle made the peak residual much worse: the minor cycle's
            # PSF model failed (ill-conditioned PSF); undo it and stop
            log.warning("major cycle %d raised the peak residual from %.4g to %.4g: "
                        "undoing it and stopping CLEAN", nmajor, prev[0], peak)
            peak, model, residual, ncomp = prev
            nmajor -= 1
            break
        if peak <= stop:
            break
        prev = (peak, model.copy(), residual.copy(), ncomp)
        where = np.unravel_index(int(np.argmax(np.abs(residual))), residual.shape)
        level = max(stop, (1.0 - c.mgain) * peak, sidelobe * peak)
        if c.algorithm == "clark":
            n, last = kc.clark_minor(residual, psf64, model, c.gain, niter - ncomp, level,
                                     mask_arr, use_mask, patch, 200_000)
        else:
            n, last = kc.hogbom_minor(residual, psf64, model, c.gain, niter - ncomp, level,
                                      mask_arr, use_mask)
        ncomp += int(n)
        log.info("major cycle %d: peak %.4g at %s, stop %.4g, minor cycle to %.4g: "
                 "%d components", nmajor + 1, peak, tuple(int(i) for i in where), stop,
                 level, n)
        if n == 0:
            break
        residual = residual_of(model)
        nmajor += 1
    return CleanResult(model=model, residual=residual, n_components=ncomp, n_major=nmajor,
                       stop=float(stop))


def primary_beam(ds, vis: Visibilities, c: ImageConfig, weight_sums, slant):
    """Step 7b: the mean primary beam (power) on the image."""
    pc_ra = np.asarray(ds.PHASE_CENTER_RA.values, dtype=np.float64)
    pc_dec = np.asarray(ds.PHASE_CENTER_DEC.values, dtype=np.float64)
    return _pb_map(c.npix, cell_rad(c), *vis.centre, pc_ra, pc_dec, vis.freqs, weight_sums,
                   slant=slant)


def image_products(ds, vis: Visibilities, c: ImageConfig, d: Dirty, cr: CleanResult,
                   beam, slant, opts, timings, plan):
    """Step 7: restore the model, divide by the primary beam, measure, describe."""
    from contimg.imaging import ImageProducts
    from kernels import clean as kc

    t0 = time.perf_counter()
    bmaj, bmin, bpa = beam
    image = kc.restore(cr.model, cr.residual, bmaj, bmin, bpa, cell_rad(c)).astype(np.float32)
    pb = primary_beam(ds, vis, c, d.weight_sums, slant)
    with np.errstate(invalid="ignore", divide="ignore"):
        image_pb = np.where(pb >= c.pb_cutoff, image / pb, np.nan).astype(np.float32)
    noise = kc.robust_sigma(cr.residual)
    ipk = np.unravel_index(int(np.argmax(image)), image.shape)
    timings["restore+pb"] = time.perf_counter() - t0
    times = np.asarray(ds.time.values, dtype=np.float64)
    tint = float(ds.time.attrs.get("integration_time", tel.INTEGRATION_S))
    date_obs = _dt.datetime.fromtimestamp(times[0] - 0.5 * tint, _dt.timezone.utc)
    freqs, wsum = vis.freqs, d.weight_sums
    fmean = float(np.average(freqs, weights=wsum.sum(axis=0))) if wsum.sum() else float(
        freqs.mean())
    return ImageProducts(
        image=image, residual=cr.residual.astype(np.float32),
        model=cr.model.astype(np.float32), psf=d.psf, pb=pb, image_pb=image_pb,
        dirty=d.dirty, beam=(bmaj, bmin, bpa), noise=float(noise), peak=float(image[ipk]),
        peak_pixel=(int(ipk[0]), int(ipk[1])), phase_center=vis.centre, cell_rad=cell_rad(c),
        freq_hz=fmean,
        bandwidth_hz=float(freqs.max() - freqs.min() + abs(_channel_width(ds, freqs))),
        date_obs=date_obs.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3],
        time_mid_unix=float(times[len(times) // 2]), n_components=cr.n_components,
        n_major=cr.n_major, threshold=cr.stop, sum_weights=d.norm, weight_sums=wsum,
        options=opts, timings=timings, plan=plan.describe(), slant=slant,
        qa=dict(vis.qa or {}))
