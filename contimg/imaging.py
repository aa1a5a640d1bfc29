"""Continuum imaging of one group: weighting, CLEAN with major cycles, primary beam, FITS.

Entry points
------------
:func:`image_dataset`  a contract visibility Dataset -> :class:`ImageProducts` (arrays)
:func:`image_ms`       an MS path, a group's UVH5 files or a Dataset -> FITS files
                       ``<prefix>-image.fits``, ``-residual.fits``, ``-model.fits``,
                       ``-psf.fits``, ``-image-pb.fits`` and an :class:`ImageResult`
:func:`write_fits`     one image with a full header (WCS, beam, frequency, telescope)
:func:`cmd_image`      the ``contimg image`` subcommand

Image phase centre: a DSA-110 group is phased to the meridian at every integration, so
its phase centres move along the equator of date by 15"/s x cos(dec) during the group.
The image is centred on the phase centre of the *middle* integration (index
``ntime // 2``) and every visibility is re-phased there with the exact w term
(:func:`kernels.weighting.rephase`) and new UVW from :func:`contimg.uvw.compute_uvw`.

Stokes I is ``(XX + YY) / 2``; a visibility with either feed flagged is left out.
Autocorrelations are never imaged.

Options: :class:`contimg.config.ImageConfig` (the ``[image]`` table of the configuration)
holds every option and its default; the operators' environment variables set four of
them: ``IMG_IMSIZE`` (npix, default 2048: 3.4 deg at 6 arcsec), ``IMG_ROBUST`` (0.0),
``IMG_NITER`` (1000) and ``IMG_THRESHOLD`` (absolute CLEAN threshold, Jy, a number or
with a unit: ``0.5mJy``; default 0, the auto threshold alone decides). Library calls
take a config and/or keyword overrides of its fields::

    image_ms(ms, "out/g", npix=512, niter=200)               # configured [image] + these
    image_ms(ms, "out/g", config=ImageConfig(npix=512))       # exactly this config
    image_ms(ms, "out/g", config=cfg.image, w_mode="wstack")  # a config + overrides

CLEAN: Clark (default) or Högbom minor cycles (:mod:`kernels.clean`) between major
cycles that degrid the model from the visibilities and grid the residual (all per
chunk, on the Dask workers). A minor cycle stops when the peak residual falls below the
largest of: the absolute threshold, ``auto_threshold_sigma`` x the residual's robust
noise (MAD), ``(1 - mgain)`` x the cycle's starting peak and (Clark) the PSF's largest
sidelobe outside the Clark patch x that peak. CLEAN ends when a major cycle starts
below the threshold, ``niter`` components were found or ``max_major`` cycles ran.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contimg import telescope as tel
from contimg.config import ImageConfig, parse_threshold
from kernels.constants import ARCSEC, SECONDS_PER_DAY, UNIX_MJD0

log = logging.getLogger(__name__)

__all__ = [
    "ImageProducts",
    "ImageResult",
    "image_dataset",
    "image_ms",
    "write_fits",
    "default_options",
    "image_config",
    "parse_threshold",
    "source_mask",
    "cmd_image",
    "add_image_parser",
]



def default_options() -> dict:
    """The configured ``[image]`` options (defaults, file, ``IMG_*`` environment)."""
    from contimg.config import current

    return dataclasses.asdict(current().image)


def image_config(config: ImageConfig | None = None, overrides: dict | None = None
                 ) -> ImageConfig:
    """``config`` (default: the configured ``[image]`` section) with keyword overrides of
    its fields applied (an override of ``None`` for a field that cannot be None means
    "as configured"); an unknown keyword raises TypeError naming it."""
    if config is None:
        from contimg.config import current

        config = current().image
    if overrides:
        known = {f.name: f for f in dataclasses.fields(ImageConfig)}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise TypeError(f"unknown imaging option(s) {unknown}; options are the fields "
                            f"of contimg.config.ImageConfig: {sorted(known)}")
        given = {k: v for k, v in overrides.items()
                 if v is not None or getattr(config, k) is None or k in _OPTIONAL}
        config = dataclasses.replace(config, **given)
    return config


_OPTIONAL = ("clark_patch", "grid_tasks", "uv_max_lambda", "smear_radius_deg", "data_column")


@dataclass
class ImageProducts:
    """Images (numpy ``[ix west, iy north]``, float32) and what describes them."""

    image: np.ndarray          # restored, Jy/beam
    residual: np.ndarray       # Jy/beam
    model: np.ndarray          # Jy/pixel
    psf: np.ndarray            # peak 1
    pb: np.ndarray             # mean primary beam (power), 1 at the pointing centre
    image_pb: np.ndarray       # restored / pb, NaN where pb < pb_cutoff
    dirty: np.ndarray          # Jy/beam
    beam: tuple                # (bmaj, bmin) radians, bpa degrees east of north
    noise: float               # robust (MAD) rms of the residual image, Jy/beam
    peak: float                # peak of the restored image, Jy/beam
    peak_pixel: tuple          # (ix, iy) of the peak
    phase_center: tuple        # (ra, dec) ICRS radians
    cell_rad: float
    freq_hz: float             # weighted mean frequency
    bandwidth_hz: float
    date_obs: str              # ISO UTC start of the first integration
    time_mid_unix: float
    n_components: int
    n_major: int
    threshold: float           # the stop level CLEAN reached for, Jy/beam
    sum_weights: float
    weight_sums: np.ndarray = None  # (ntime, nfreq) imaging weights summed over baselines
    options: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    plan: str = ""
    slant: tuple = (0.0, 0.0)  # FITS SIN (PV2_1, PV2_2): a w-snapshot's projection


@dataclass
class ImageResult:
    """What :func:`image_ms` wrote and found."""

    paths: dict                # kind -> Path ("image", "residual", "model", "psf", "image-pb")
    beam: tuple                # (bmaj_arcsec, bmin_arcsec, bpa_deg)
    noise: float               # Jy/beam
    peak: float                # Jy/beam (restored image)
    peak_radec: tuple          # (ra_deg, dec_deg) of the peak
    n_components: int
    n_major: int
    timings: dict
    products: ImageProducts | None = None


# ---------------------------------------------------------------------------------
# the imaging driver
# ---------------------------------------------------------------------------------


def _scheduler_threads():
    try:
        from distributed import get_client

        return max(1, sum(get_client().nthreads().values()))
    except (ImportError, ValueError):
        return os.cpu_count() or 1


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


W_CORNER_LOSS = 0.05   # a snapshot's loss in the image corners (beyond the PB's 0.15)


def _w_choice(gi, uvw, scale, w_mode, w_loss, radius, width, opts):
    """(snapshot?, slant) for :func:`image_dataset`'s ``w_mode``; notes it in ``opts``."""
    if w_mode == "wstack":
        opts.update(w_stacking=True)
        return False, (0.0, 0.0)
    cop = gi.coplanar_fit(uvw, radius, scale=scale)
    xc = 1.0 - math.cos(width / math.sqrt(2.0))
    corner = 2 * math.pi ** 2 * xc * xc * cop.rms_w ** 2     # the same loss in the corners
    ok = w_mode == "snapshot" or (cop.loss <= w_loss and corner <= W_CORNER_LOSS)
    what = (f"baselines fit w = {cop.a:.5f} u + {cop.b:.5f} v to {cop.rms_w:.3g} wavelengths "
            f"rms (max {cop.max_w:.3g}); dropping the rest loses {cop.loss:.2g} of a point "
            f"source at {math.degrees(radius):.2f} deg, {corner:.2g} in the corners")
    if ok:
        log.info("w-snapshot: %s: imaging in 2-D, SIN projection PV2 = (%.5f, %.5f)", what,
                 *cop.slant)
    else:
        log.info("w-stacking: %s (budgets %.2g and %.2g)", what, w_loss, W_CORNER_LOSS)
    opts.update(w_stacking=not ok, w_plane=(cop.a, cop.b), w_resid_rms=cop.rms_w,
                w_resid_max=cop.max_w, w_snapshot_loss=cop.loss)
    return ok, (cop.slant if ok else (0.0, 0.0))


def image_dataset(ds, config: ImageConfig | None = None, *, mask=None, mask_sources=None,
                  phase_center=None, **options) -> ImageProducts:
    """Image a contract Dataset (Stokes I): dirty, PSF, CLEAN, restore, primary beam.

    ``config``: a :class:`contimg.config.ImageConfig` (default: the configured
    ``[image]`` section, i.e. these defaults, a configuration file and the ``IMG_*``
    environment); ``options``: keyword overrides of its fields (:func:`image_config`).

    Parameters (the fields of ImageConfig, and three per-call arrays)
    ----------
    npix : image size (square, even), default 2048
    cell_arcsec : pixel size, default 6 (DSA-110's restoring beam at Briggs 0 is ~50" x 32")
    weighting : ``"natural"``, ``"uniform"`` or ``"briggs"`` (default)
    robust : Briggs robust, default 0
    epsilon : gridding accuracy (1e-4 ... 1e-7; < 1e-5 runs in double precision)
    niter : maximum CLEAN components (0: dirty image only), default 1000
    threshold : absolute CLEAN threshold, Jy/beam (default 0)
    auto_threshold_sigma : CLEAN down to this many times the residual's robust rms
        (0 disables), default 3
    algorithm : ``"clark"`` (default) or ``"hogbom"``
    gain, mgain : loop gain; major-cycle gain (a minor cycle removes up to this
        fraction of the peak before the next major cycle), as WSClean's -gain/-mgain;
        default 0.1, 0.8. 0.9 saves a major cycle (3 instead of 4 on a full DSA-110
        group, same residual noise) but without a mask lets the T array's ridge
        crossings take a little more flux (Högbom: 5 % instead of < 5 % of a source in
        tests/test_image.py); the streaming service uses 0.9 for its quick-look images
    max_major : at most this many major cycles
    mask : optional boolean ``(npix, npix)`` image ``[ix, iy]``: CLEAN only there
    mask_sources : optional ``(ra, dec)`` arrays (ICRS radians), e.g. a catalogue's
        sources: CLEAN only within ``mask_radius_arcsec`` of them (combined with
        ``mask`` by OR). DSA-110's T-shaped array has PSF ridges along both axes whose
        crossings, for pairs of bright sources, look like sources to an unmasked
        CLEAN; a mask keeps those ghosts (and the flux they steal) out of the model
    clark_patch : half-size of the Clark PSF patch in pixels (default npix/8, >= 32)
    gridder : ``"contimg"`` or ``"ducc0"`` (comparison; needs ducc0)
    nthreads : threads per gridding task (dask parallelises over chunks)
    grid_tasks : number of gridding tasks per image (default: the scheduler's thread
        count: a distributed client's total, else the CPU count). Every task grids its
        share of the band onto a whole image, so each w-plane is FFT'd once per task:
        fewer tasks than chunks saves FFTs; memory per task grows with its share
    phase_center : ``(ra, dec)`` ICRS radians; default the middle integration's
    persist : keep the Stokes I visibilities in (distributed) memory between major
        cycles instead of recomputing them from ``ds`` (re-reading files) each cycle
    pb_cutoff : primary-beam level below which the PB-corrected image is NaN
    double : grid in double precision (forced when epsilon < 1e-5)
    average : baseline-dependent averaging before gridding (:mod:`kernels.averaging`):
        each baseline is averaged over as many integrations and channels as keep its
        smearing loss within ``smear_loss`` at ``smear_radius_deg``. DSA-110's short
        baselines (most of the T) average hard, the outriggers not at all: ~4x fewer
        visibilities to grid and degrid in every major cycle. ``False``: grid every
        visibility as it is
    smear_loss : largest fractional amplitude loss from averaging at
        ``smear_radius_deg``, default 0.01 (1 %)
    smear_radius_deg : where the loss is budgeted; default the primary beam's
        half-power radius at the top of the band or the image's half-width, whichever
        is smaller (sources further out lose more: ~3 % in the corners of a 3.4 deg
        image, where the primary beam is below 0.15)
    w_mode : how the w term is handled. ``"snapshot"``: fit the plane ``w = a u + b v``
        to the baselines and image in 2-D in that plane (:class:`graphs.image.Coplanar`):
        the image is in the slant orthographic projection, recorded in the FITS header
        as ``SIN`` with ``PV2_1``/``PV2_2`` (WCS readers place sources exactly); only
        the residual ``w'`` is dropped. ``"wstack"``: exact w-stacking. ``"auto"``
        (default): the snapshot when dropping ``w'`` costs a point source at most
        ``w_loss`` of its peak at the smear radius (and at most 5 % in the image's
        corners), else w-stacking. A DSA-110 group (the T is flat to a few metres,
        5 minutes of rotation) is a snapshot at every declination from -10 to +85 deg:
        ``w'`` is 14-21 wavelengths rms over its samples, and (de)gridding costs ~5x
        less than over 13 w-planes. The estimate is over the averaged rows, which
        over-represent the outriggers (27.6 wavelengths rms at dec +54.6): it errs high
    w_loss : the snapshot's loss budget for ``w_mode="auto"``, default 3e-3 (0.3 %,
        a third of the default smearing budget)
    uv_min_lambda, uv_max_lambda : image only baselines with projected length
        (wavelengths) in this range (WSClean's -minuv-l / -maxuv-l). DSA-110's
        5 m spacings see scales of degrees: in images smaller than that, a natural-
        weighted PSF sits on a plateau that makes CLEAN ill-conditioned

    Runs ``dask.compute`` (on the active distributed client if there is one) once for
    the PSF + dirty image and once per major cycle.
    """
    import dask

    from graphs import image as gi
    from kernels import clean as kc
    from kernels import weighting as kw

    c = image_config(config, options)   # checked: types, choices, npix, cell
    npix, cell_arcsec, weighting, robust = c.npix, c.cell_arcsec, c.weighting, c.robust
    epsilon, niter, threshold, auto_threshold_sigma = (c.epsilon, c.niter, c.threshold,
                                                       c.auto_threshold_sigma)
    algorithm, gain, mgain, max_major = c.algorithm, c.gain, c.mgain, c.max_major
    clark_patch, gridder, nthreads, persist = c.clark_patch, c.gridder, c.nthreads, c.persist
    pb_cutoff, double, psf_wterm = c.pb_cutoff, c.double, c.psf_wterm
    uv_min_lambda, uv_max_lambda = c.uv_min_lambda, c.uv_max_lambda
    mask_radius_arcsec, grid_tasks, average = c.mask_radius_arcsec, c.grid_tasks, c.average
    smear_loss, smear_radius_deg, w_mode, w_loss = (c.smear_loss, c.smear_radius_deg,
                                                    c.w_mode, c.w_loss)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (npix, npix):
            raise ValueError(f"mask shape {mask.shape} != ({npix}, {npix})")
    opts = dict(npix=npix, cell_arcsec=cell_arcsec, weighting=weighting, robust=robust,
                epsilon=epsilon, niter=niter, threshold=threshold,
                auto_threshold_sigma=auto_threshold_sigma, algorithm=algorithm, gain=gain,
                mgain=mgain, max_major=max_major, gridder=gridder, average=bool(average),
                smear_loss=smear_loss, w_mode=w_mode, w_loss=w_loss)
    timings = {}
    t_all = time.perf_counter()
    cell = cell_arcsec * ARCSEC

    # --- geometry: one phase centre, re-phased Stokes I ---------------------------
    t0 = time.perf_counter()
    ra0, dec0 = _image_centre(ds, phase_center)
    uvw_t = _target_uvw(ds, ra0, dec0)
    freqs = np.asarray(ds.frequency.values, dtype=np.float64)
    uv_range = (float(uv_min_lambda or 0.0),
                np.inf if uv_max_lambda is None else float(uv_max_lambda))
    if not average:
        dsi = gi.stokes_i_dataset(ds, uvw_t, uv_range=uv_range)
    ntask = int(grid_tasks or _scheduler_threads())
    nvis_in = int(np.prod(ds.VISIBILITY.shape[:3]))
    if smear_radius_deg is None:
        pb_half = 0.5 * 1.029 * tel.SPEED_OF_LIGHT / float(freqs.max()) / (
            tel.DISH_DIAMETER_M)
        theta = min(pb_half, 0.5 * npix * cell)
    else:
        theta = math.radians(float(smear_radius_deg))
    if average:
        from kernels import averaging as ka

        chw = abs(float(ds.frequency.attrs.get(
            "channel_width", np.median(np.diff(freqs)) if freqs.size > 1 else 0.0)))
        vchunks = getattr(ds.VISIBILITY.data, "chunks", None)
        nfchunk = int(max(vchunks[2])) if vchunks else min(48, freqs.size)
        tf, ff = ka.bda_factors(uvw_t, freqs, chw, theta, float(smear_loss), nfchunk)
        dsi = gi.average_dataset(ds, uvw_t, tf, ff, uv_range=uv_range)
        nrow = dsi.sizes["row"]
        per = int(math.ceil(nrow / max(1, ntask)))
        dsi = dsi.chunk({"row": per})
        log.info("baseline-dependent averaging (loss <= %.3g at %.2f deg): %d -> %d "
                 "visibilities (%.1fx); bins up to %d integrations x %d channels",
                 smear_loss, math.degrees(theta), nvis_in, nrow, nvis_in / max(nrow, 1),
                 int(tf.max()), int(ff.max()))
        nvis = nrow
        opts.update(n_vis_in=nvis_in, n_vis_gridded=int(nrow),
                    smear_radius_deg=math.degrees(theta))
        if persist:
            dsi = dsi.persist()
    else:
        if persist:
            dsi = dsi.persist()
        nf = dsi.sizes["frequency"]
        nfc = len(dsi.VIS_I.data.chunks[2])
        if ntask < nfc or len(dsi.VIS_I.data.chunks[0]) > 1:
            per = int(math.ceil(nf / max(1, min(ntask, nfc))))
            dsi = dsi.chunk({"time": -1, "baseline_id": -1, "frequency": per})
        nvis = None
        opts.update(n_vis_in=nvis_in, n_vis_gridded=nvis_in)
    log.info("gridding in %d task(s) per image", ntask if average else
             len(dsi.VIS_I.data.chunks[2]))
    snapshot, slant = _w_choice(gi, dsi.UVW_L.data if average else uvw_t.reshape(-1, 3),
                                1.0 if average else float(freqs.max()) / tel.SPEED_OF_LIGHT,
                                w_mode, w_loss, theta, npix * cell, opts)

    def make_plan(wstack):
        if average:
            # the plan from the averaged rows themselves: a bin's mean w can lie below
            # every sample's |w| (w changes sign inside it, e.g. east-west baselines)
            return gi.imaging_plan_rows(dsi, npix, cell, epsilon, double=double,
                                        nthreads=nthreads, do_wstacking=wstack)
        return gi.imaging_plan(uvw_t, freqs, npix, cell, epsilon, double=double,
                               nthreads=nthreads, nvis=nvis, do_wstacking=wstack)

    plan = make_plan(not snapshot)
    # the PSF of the minor cycles: without the w term, so that it is a true convolution
    # kernel (symmetric, positive definite); with it, the response to a component
    # depends on its position (by ~1 % of the peak across a 3 deg field), the Högbom/
    # Clark iteration is no longer a descent and can diverge. Major cycles use the
    # exact w-stacked (de)gridder, so the residual and model stay exact. A snapshot's
    # plan is already 2-D: the PSF shares it (and its gridding index)
    psf_plan = plan if (snapshot or psf_wterm) else make_plan(False)
    if mask_sources is not None:
        sm = source_mask(npix, cell_arcsec, ra0, dec0, mask_sources[0], mask_sources[1],
                         mask_radius_arcsec, slant=slant)
        mask = sm if mask is None else (mask | sm)
    log.info("imaging %d x %d at %.3g arcsec, centre RA %.5f Dec %.5f deg; %s", npix, npix,
             cell_arcsec, math.degrees(ra0), math.degrees(dec0), plan.describe())
    timings["prepare"] = time.perf_counter() - t0

    # --- weighting ------------------------------------------------------------------
    t0 = time.perf_counter()
    if weighting == "natural":
        wspec = gi.WeightSpec("natural")
    else:
        dens, du, dv = gi.density(dsi, npix, npix, cell)
        dens, sum_w = dask.compute(dens, dsi.WEIGHT_I.data.sum(dtype=np.float64))
        f2 = kw.briggs_f2(dens, float(sum_w), robust) if weighting == "briggs" else 0.0
        wspec = gi.WeightSpec(weighting, dens, f2, du, dv)
    timings["weights"] = time.perf_counter() - t0

    # --- PSF and dirty image ------------------------------------------------------------
    t0 = time.perf_counter()
    wsum_l = gi.weight_sums(dsi, wspec)
    index = None
    if gridder == "contimg" and persist and (niter > 0 or psf_plan is plan):
        # sort the visibilities into uv tiles and w-planes once, for every major cycle
        index = gi.grid_index(dsi, plan, wspec, nthreads=nthreads).persist()
    psf_l = gi.dirty_image(dsi, psf_plan, wspec, psf=True, gridder=gridder,
                           nthreads=nthreads, index=index if psf_plan is plan else None)
    dirty_l = gi.dirty_image(dsi, plan, wspec, gridder=gridder, nthreads=nthreads,
                             index=index)
    wsum, psf, dirty = dask.compute(wsum_l, psf_l, dirty_l)
    norm = float(wsum.sum())
    if not norm > 0:
        raise ValueError("nothing to image: every visibility is flagged or has zero weight")
    psf = (psf / norm).astype(np.float32)
    dirty = (dirty / norm).astype(np.float32)
    timings["dirty+psf"] = time.perf_counter() - t0
    log.info("dirty image and PSF in %.1f s (peak %.4g Jy/beam)", timings["dirty+psf"],
             float(np.abs(dirty).max()))
    bmaj, bmin, bpa = kc.fit_beam(psf, cell)
    log.info("restoring beam %.2f\" x %.2f\" PA %.1f deg", bmaj / ARCSEC, bmin / ARCSEC, bpa)

    # --- CLEAN ----------------------------------------------------------------------
    t0 = time.perf_counter()
    residual = dirty.astype(np.float64)
    model = np.zeros((npix, npix), dtype=np.float64)
    psf64 = psf.astype(np.float64)
    use_mask = mask is not None
    mask_arr = mask if use_mask else np.zeros((1, 1), dtype=bool)
    patch = int(clark_patch or max(32, npix // 8))
    patch = min(patch, npix // 2 - 1)
    sidelobe = kc.psf_sidelobe(psf64, patch) if algorithm == "clark" else 0.0
    ncomp, nmajor, stop = 0, 0, threshold
    prev = None  # (peak, model, residual, ncomp) before the last minor cycle
    while ncomp < niter and nmajor < max_major:
        sigma = kc.robust_sigma(residual, mask if use_mask else None)
        stop = max(threshold, auto_threshold_sigma * sigma if auto_threshold_sigma else 0.0)
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
        level = max(stop, (1.0 - mgain) * peak, sidelobe * peak)
        if algorithm == "clark":
            n, last = kc.clark_minor(residual, psf64, model, gain, niter - ncomp, level,
                                     mask_arr, use_mask, patch, 200_000)
        else:
            n, last = kc.hogbom_minor(residual, psf64, model, gain, niter - ncomp, level,
                                      mask_arr, use_mask)
        ncomp += int(n)
        log.info("major cycle %d: peak %.4g at %s, stop %.4g, minor cycle to %.4g: "
                 "%d components", nmajor + 1, peak, tuple(int(i) for i in where), stop,
                 level, n)
        if n == 0:
            break
        res_l = gi.dirty_image(dsi, plan, wspec, model=model.astype(plan.image_dtype),
                               gridder=gridder, nthreads=nthreads, index=index)
        (res,) = dask.compute(res_l)
        residual = res.astype(np.float64) / norm
        nmajor += 1
    timings["clean"] = time.perf_counter() - t0

    # --- restore, primary beam, noise ---------------------------------------------------
    t0 = time.perf_counter()
    image = kc.restore(model, residual, bmaj, bmin, bpa, cell).astype(np.float32)
    pc_ra = np.asarray(ds.PHASE_CENTER_RA.values, dtype=np.float64)
    pc_dec = np.asarray(ds.PHASE_CENTER_DEC.values, dtype=np.float64)
    pb = _pb_map(npix, cell, ra0, dec0, pc_ra, pc_dec, freqs, wsum, slant=slant)
    with np.errstate(invalid="ignore", divide="ignore"):
        image_pb = np.where(pb >= pb_cutoff, image / pb, np.nan).astype(np.float32)
    noise = kc.robust_sigma(residual)
    ipk = np.unravel_index(int(np.argmax(image)), image.shape)
    timings["restore+pb"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    times = np.asarray(ds.time.values, dtype=np.float64)
    tint = float(ds.time.attrs.get("integration_time", tel.INTEGRATION_S))
    date_obs = _dt.datetime.fromtimestamp(times[0] - 0.5 * tint, _dt.timezone.utc)
    fmean = float(np.average(freqs, weights=wsum.sum(axis=0))) if wsum.sum() else float(
        freqs.mean())
    chw = float(ds.frequency.attrs.get("channel_width", np.median(np.diff(freqs))
                                       if freqs.size > 1 else 0.0))
    log.info("image done in %.1f s: %d components in %d major cycles, peak %.4g Jy/beam, "
             "noise %.3g Jy/beam", timings["total"], ncomp, nmajor, float(image[ipk]), noise)
    return ImageProducts(
        image=image, residual=residual.astype(np.float32), model=model.astype(np.float32),
        psf=psf, pb=pb, image_pb=image_pb, dirty=dirty, beam=(bmaj, bmin, bpa),
        noise=float(noise), peak=float(image[ipk]), peak_pixel=(int(ipk[0]), int(ipk[1])),
        phase_center=(ra0, dec0), cell_rad=cell, freq_hz=fmean,
        bandwidth_hz=float(freqs.max() - freqs.min() + abs(chw)),
        date_obs=date_obs.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3],
        time_mid_unix=float(times[len(times) // 2]), n_components=ncomp, n_major=nmajor,
        threshold=float(stop), sum_weights=norm, weight_sums=wsum, options=opts, timings=timings,
        plan=plan.describe(), slant=slant)


# ---------------------------------------------------------------------------------
# FITS
# ---------------------------------------------------------------------------------


def _header(prod: ImageProducts, kind: str, bunit: str):
    from astropy.io import fits

    from contimg import __version__

    npix = prod.image.shape[0]
    ra0, dec0 = prod.phase_center
    cdeg = math.degrees(prod.cell_rad)
    h = fits.Header()
    h["BSCALE"] = 1.0
    h["BZERO"] = 0.0
    h["BUNIT"] = bunit
    h["BTYPE"] = "Intensity"
    h["CTYPE1"] = "RA---SIN"
    h["CRPIX1"] = npix // 2 + 1
    h["CRVAL1"] = math.degrees(ra0) % 360.0
    h["CDELT1"] = -cdeg
    h["CUNIT1"] = "deg"
    h["CTYPE2"] = "DEC--SIN"
    h["CRPIX2"] = npix // 2 + 1
    h["CRVAL2"] = math.degrees(dec0)
    h["CDELT2"] = cdeg
    h["CUNIT2"] = "deg"
    if any(prod.slant):
        # a w-snapshot image (see image_dataset's w_mode): slant orthographic
        h["PV2_1"] = (float(prod.slant[0]), "SIN xi: w-snapshot plane")
        h["PV2_2"] = (float(prod.slant[1]), "SIN eta: w-snapshot plane")
    h["CTYPE3"] = "FREQ"
    h["CRPIX3"] = 1.0
    h["CRVAL3"] = prod.freq_hz
    h["CDELT3"] = prod.bandwidth_hz
    h["CUNIT3"] = "Hz"
    h["CTYPE4"] = "STOKES"
    h["CRPIX4"] = 1.0
    h["CRVAL4"] = 1.0
    h["CDELT4"] = 1.0
    h["CUNIT4"] = ""
    h["RADESYS"] = "ICRS"
    h["EQUINOX"] = 2000.0
    h["LONPOLE"] = 180.0
    h["LATPOLE"] = math.degrees(dec0)
    h["SPECSYS"] = "TOPOCENT"
    bmaj, bmin, bpa = prod.beam
    h["BMAJ"] = (math.degrees(bmaj), "beam major axis FWHM, deg")
    h["BMIN"] = (math.degrees(bmin), "beam minor axis FWHM, deg")
    h["BPA"] = (bpa, "beam PA, deg E of N")
    # DATE-OBS/MJD-OBS: start of the data; DATE-AVG/MJD-AVG: its middle (FITS WCS)
    start = _dt.datetime.fromisoformat(prod.date_obs).replace(tzinfo=_dt.timezone.utc)
    h["DATE-OBS"] = prod.date_obs
    h["MJD-OBS"] = start.timestamp() / SECONDS_PER_DAY + UNIX_MJD0
    h["DATE-AVG"] = _dt.datetime.fromtimestamp(prod.time_mid_unix, _dt.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3]
    h["MJD-AVG"] = prod.time_mid_unix / SECONDS_PER_DAY + UNIX_MJD0
    h["TIMESYS"] = "UTC"
    h["TELESCOP"] = tel.TELESCOPE_NAME
    h["INSTRUME"] = tel.TELESCOPE_NAME
    gx, gy, gz = (float(x) for x in tel.site_itrf())
    h["OBSGEO-X"], h["OBSGEO-Y"], h["OBSGEO-Z"] = gx, gy, gz
    h["OBJECT"] = "DSA-110 group"
    h["ORIGIN"] = f"contimg {__version__}"
    h["DATE"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    h["IMAGETYP"] = kind
    o = prod.options
    h["WEIGHTNG"] = o.get("weighting", "")
    h["ROBUST"] = float(o.get("robust", 0.0))
    h["EPSILON"] = float(o.get("epsilon", 0.0))
    h["NITER"] = (prod.n_components, "CLEAN components")
    h["NMAJOR"] = (prod.n_major, "major cycles")
    h["THRESH"] = (prod.threshold, "CLEAN stop level (Jy/beam)")
    h["NOISE"] = (prod.noise, "residual robust rms (Jy/beam)")
    h["HISTORY"] = f"contimg {__version__} image: {kind}"
    return h


def write_fits(path, data, header):
    """Write one image (``[ix, iy]`` numpy) as a 4-D FITS (RA, Dec, FREQ, STOKES).

    Written to ``<path>.tmp`` and renamed, so a reader never sees half a file.
    """
    from astropy.io import fits

    path = Path(path)
    arr = np.asarray(data, dtype=np.float32).T[None, None]  # (stokes, freq, dec, ra)
    hdu = fits.PrimaryHDU(arr, header=header)
    tmp = path.with_name(path.name + ".tmp")
    hdu.writeto(tmp, overwrite=True, output_verify="exception")
    os.replace(tmp, path)
    return path


def _open_source(src, data_column=None, chunks=None):
    """An MS path, a directory/list of UVH5 files of one group, or a Dataset -> Dataset."""
    import xarray as xr

    if isinstance(src, xr.Dataset):
        return src, "dataset"
    if isinstance(src, (list, tuple)):
        from contimg.io.uvh5 import open_group

        paths = [Path(p) for p in src]
        if len(paths) == 1 and (paths[0] / "table.dat").is_file():
            src = paths[0]
        else:
            return open_group(paths, n_subbands=len(paths), chunks=chunks), "uvh5"
    p = Path(src)
    if (p / "table.dat").is_file():
        from casacore import tables as ct

        from contimg.io.ms import open_ms

        if data_column is None:
            with ct.table(str(p), ack=False) as tb:
                cols = tb.colnames()
            data_column = "CORRECTED_DATA" if "CORRECTED_DATA" in cols else "DATA"
        log.info("imaging %s (%s)", p, data_column)
        return open_ms(p, chunks=chunks, data_column=data_column), "ms"
    if p.is_dir():
        from contimg.io.uvh5 import open_group

        files = sorted(p.glob("*_sb??.hdf5"))
        if not files:
            raise FileNotFoundError(f"{p}: neither a Measurement Set nor a directory of "
                                    "UVH5 subband files")
        return open_group(files, n_subbands=len(files), chunks=chunks), "uvh5"
    raise FileNotFoundError(f"{p}: not a Measurement Set (no table.dat) or a group directory")


def image_ms(src, out_prefix, config: ImageConfig | None = None, *, keep_products=False,
             mask=None, mask_sources=None, phase_center=None, **options) -> ImageResult:
    """Image an MS (``CORRECTED_DATA`` when present, else ``DATA``, or the configured
    ``data_column``), a group's UVH5 files or a Dataset and write ``<prefix>-image.fits``,
    ``-residual.fits``, ``-model.fits``, ``-psf.fits``, ``-image-pb.fits`` (each via a
    temporary name and a rename).

    ``config`` and ``options`` (overrides of its fields) as :func:`image_dataset`.
    Returns an :class:`ImageResult` (paths, restoring beam in arcsec/deg, noise, peak,
    timings; ``products`` with the arrays when ``keep_products``).
    """
    t0 = time.perf_counter()
    c = image_config(config, options)
    ds, kind = _open_source(src, c.data_column)
    prod = image_dataset(ds, c, mask=mask, mask_sources=mask_sources,
                         phase_center=phase_center)
    t1 = time.perf_counter()
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data, unit in (("image", prod.image, "JY/BEAM"),
                             ("residual", prod.residual, "JY/BEAM"),
                             ("model", prod.model, "JY/PIXEL"),
                             ("psf", prod.psf, "JY/BEAM"),
                             ("image-pb", prod.image_pb, "JY/BEAM")):
        p = prefix.with_name(f"{prefix.name}-{name}.fits")
        write_fits(p, data, _header(prod, name, unit))
        paths[name] = p
    timings = dict(prod.timings)
    timings["write"] = time.perf_counter() - t1
    timings["wall"] = time.perf_counter() - t0
    ix, iy = prod.peak_pixel
    from astropy.io import fits
    from astropy.wcs import WCS

    wcs = WCS(fits.getheader(paths["image"])).celestial
    ra_pk, dec_pk = wcs.pixel_to_world_values(ix, iy)
    bmaj, bmin, bpa = prod.beam
    log.info("wrote %s-*.fits in %.1f s", prefix, timings["wall"])
    return ImageResult(paths=paths, beam=(bmaj / ARCSEC, bmin / ARCSEC, bpa),
                       noise=prod.noise, peak=prod.peak,
                       peak_radec=(float(ra_pk), float(dec_pk)),
                       n_components=prod.n_components, n_major=prod.n_major,
                       timings=timings, products=prod if keep_products else None)


# ---------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------


def add_image_parser(sub):
    """Register ``contimg image`` on an argparse subparsers object (its options are the
    ``[image]`` fields that have flags)."""
    from contimg.config import add_options

    s = sub.add_parser("image", help="make a CLEANed continuum image of an MS or a group",
                       description="Image an MS (CORRECTED_DATA when present, else DATA) or "
                       "the UVH5 files of one group. Options not given come from the "
                       "configuration ([image]: file, IMG_IMSIZE, IMG_ROBUST, IMG_NITER, "
                       "IMG_THRESHOLD, defaults).")
    s.add_argument("input", nargs="+", help="an MS, a group directory or its UVH5 files")
    s.add_argument("--out", required=True, help="output prefix (<out>-image.fits, ...)")
    add_options(s, "image.*")
    s.set_defaults(func=cmd_image)
    return s


def cmd_image(args) -> int:
    """Handler of ``contimg image`` (``args.cfg``: the configuration the CLI loaded)."""
    from contimg.config import from_args

    c = (getattr(args, "cfg", None) or from_args(args)).image
    src = args.input if len(args.input) > 1 else args.input[0]
    client = None
    if c.workers:
        from distributed import Client, LocalCluster

        client = Client(LocalCluster(n_workers=c.workers, threads_per_worker=1,
                                     processes=True, dashboard_address=None,
                                     preload=["contimg.runtime"]))
    try:
        res = image_ms(src, args.out, c)
    finally:
        if client is not None:
            client.close()
    print(f"wrote {', '.join(str(p) for p in res.paths.values())}")
    print(f"beam {res.beam[0]:.2f}\" x {res.beam[1]:.2f}\" PA {res.beam[2]:.1f}; peak "
          f"{res.peak:.4g} Jy/beam at RA {res.peak_radec[0]:.5f} Dec {res.peak_radec[1]:.5f}; "
          f"noise {res.noise:.3g} Jy/beam; {res.n_components} components, {res.n_major} "
          f"major cycles; {res.timings['wall']:.1f} s")
    return 0


def _asdict(res: ImageResult) -> dict:  # for JSON reports
    d = dataclasses.asdict(dataclasses.replace(res, products=None))
    d["paths"] = {k: str(v) for k, v in res.paths.items()}
    return d
