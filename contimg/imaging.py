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
(:func:`kernels.weighting.rephase`). Both ends of the re-phasing come from one
geometry (:func:`contimg.imaging_steps.uvw_geometry`): UVW recomputed from the antenna
positions and times (:func:`contimg.uvw.compute_uvw`, default) or the stored UVW
rotated (``uvw_source="stored"``); stored and recomputed UVW are compared, and a
difference beyond ``uvw_tolerance_m`` is logged and recorded (``ImageProducts.qa``,
FITS ``UVWDIFF``/``UVWOK``/``UVWSRC``).

Stokes I is the mean of the parallel hands (XX and YY, or RR and LL; 2 or 4
correlations in any order); a visibility with either hand flagged is left out.
Autocorrelations are never imaged. With ``spill`` (default) the averaged rows live in
a store on disk (:mod:`contimg.imaging_store`) that every pass streams.

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
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contimg.config import ImageConfig, parse_threshold
from contimg.imaging_steps import (cell_rad, choose_w_mode, clean, clean_mask,
                                   dirty_and_psf, image_products, imaging_weights,
                                   plan_imaging, prepare_visibilities, recorded_options,
                                   residual_image, source_mask, unslant)
from contimg.io.files import writable_dir
from contimg.io.fits import image_header, image_wcs, write_fits
from graphs import scheduling
from kernels.constants import ARCSEC

log = logging.getLogger(__name__)

_REEXPORTED = (source_mask, unslant, write_fits)   # their old home: here

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
    qa: dict = field(default_factory=dict)  # input checks (stored vs recomputed UVW, ...)


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
    qa: dict = field(default_factory=dict)  # ImageProducts.qa (also in the FITS headers)


# ---------------------------------------------------------------------------------
# the imaging driver (its steps: contimg.imaging_steps)
# ---------------------------------------------------------------------------------


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
    uvw_source : ``"recompute"`` (default) or ``"stored"``: where both ends of the
        re-phasing take their UVW (see the module docstring); ``uvw_tolerance_m``:
        the stored-vs-recomputed difference (m) beyond which the image says so
    spill : keep the averaged rows between major cycles in a store on disk (default;
        memory grows with a part of the rows, not the group) instead of in memory
    uv_min_lambda, uv_max_lambda : image only baselines with projected length
        (wavelengths) in this range (WSClean's -minuv-l / -maxuv-l). DSA-110's
        5 m spacings see scales of degrees: in images smaller than that, a natural-
        weighted PSF sits on a plateau that makes CLEAN ill-conditioned

    Computes (on the active distributed client if there is one, on local threads inside
    :func:`graphs.scheduling.local_threads`) once for
    the PSF + dirty image and once per major cycle. The steps, each its own function
    in :mod:`contimg.imaging_steps`: :func:`prepare_visibilities`, :func:`choose_w_mode`,
    :func:`plan_imaging`, :func:`imaging_weights`, :func:`dirty_and_psf`, :func:`clean`,
    :func:`image_products`.
    """
    from graphs import image as gi
    from kernels import clean as kc

    c = image_config(config, options)   # checked: types, choices, npix, cell
    opts = recorded_options(c)
    timings = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    vis = prepare_visibilities(ds, c, opts, phase_center)
    snapshot, slant = choose_w_mode(vis, c, opts)
    plan, psf_plan = plan_imaging(vis, c, snapshot)
    mask = clean_mask(vis, c, slant, mask, mask_sources)
    log.info("imaging %d x %d at %.3g arcsec, centre RA %.5f Dec %.5f deg; %s", c.npix,
             c.npix, c.cell_arcsec, math.degrees(vis.centre[0]), math.degrees(vis.centre[1]),
             plan.describe())
    timings["prepare"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    wspec = imaging_weights(vis, c)
    timings["weights"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    d = dirty_and_psf(vis, c, plan, psf_plan, wspec)
    timings["dirty+psf"] = time.perf_counter() - t0
    log.info("dirty image and PSF in %.1f s (peak %.4g Jy/beam)", timings["dirty+psf"],
             float(np.abs(d.dirty).max()))
    beam = kc.fit_beam(d.psf, cell_rad(c))
    log.info("restoring beam %.2f\" x %.2f\" PA %.1f deg", beam[0] / ARCSEC,
             beam[1] / ARCSEC, beam[2])

    def residual_of(model):
        if vis.store is not None:   # [image] spill: streamed from the store on disk
            return residual_image(vis, c, plan, wspec, d, model)
        res_l = gi.dirty_image(vis.dsi, plan, wspec, model=model.astype(plan.image_dtype),
                               gridder=c.gridder, nthreads=c.nthreads, index=d.index)
        (res,) = scheduling.compute(res_l)
        return res.astype(np.float64) / d.norm

    t0 = time.perf_counter()
    cr = clean(d.dirty, d.psf, c, mask, residual_of)
    timings["clean"] = time.perf_counter() - t0
    if vis.store is not None:
        opts.update(spill_mb=round(vis.store.nbytes() / 2 ** 20, 1),
                    spill_parts=len(vis.store.parts))
        vis.store.close()

    prod = image_products(ds, vis, c, d, cr, beam, slant, opts, timings, plan)
    timings["total"] = time.perf_counter() - t_all
    log.info("image done in %.1f s: %d components in %d major cycles, peak %.4g Jy/beam, "
             "noise %.3g Jy/beam", timings["total"], cr.n_components, cr.n_major, prod.peak,
             prod.noise)
    return prod


def qa_header(h, qa: dict):
    """``h`` (a FITS header) with the image's input checks: ``UVWDIFF`` (largest
    difference of stored and recomputed UVW, m), ``UVWOK`` (within tolerance) and
    ``UVWSRC`` (the UVW the image used)."""
    if "uvw_max_diff_m" in qa:
        h["UVWDIFF"] = (float(qa["uvw_max_diff_m"]), "max |stored - recomputed UVW|, m")
        h["UVWOK"] = (bool(qa["uvw_ok"]), f"stored UVW within {qa['uvw_tolerance_m']:g} m")
        h["UVWSRC"] = (str(qa["uvw_source"]), "UVW used: recompute or stored")
    return h


def _open_source(src, data_column=None, chunks=None, field=None):
    """An MS path, a directory/list of UVH5 files (of one group, or single files of any
    telescope), or a Dataset -> Dataset; ``field``: one field of an MS (by name or id)
    or one phase centre of UVH5 data (:func:`_uvh5_field`)."""
    import xarray as xr

    if isinstance(src, xr.Dataset):
        if field is not None:
            raise ValueError("field= selects a field of an MS; a Dataset is imaged as given")
        return src, "dataset"
    if isinstance(src, (list, tuple)) and len(src) == 1 and (Path(src[0]) / "table.dat"
                                                            ).is_file():
        src = src[0]
    if isinstance(src, (list, tuple)) or not (Path(src) / "table.dat").is_file():
        ds = _open_uvh5(src, chunks)
        return (ds if field is None else _uvh5_field(ds, field, src)), "uvh5"
    from casacore import tables as ct

    from contimg.io.ms import open_ms

    p = Path(src)
    if data_column is None:
        with ct.table(str(p), ack=False) as tb:
            cols = tb.colnames()
        data_column = "CORRECTED_DATA" if "CORRECTED_DATA" in cols else "DATA"
    log.info("imaging %s (%s%s)", p, data_column, "" if field is None else f", field {field}")
    ds = open_ms(p, chunks=chunks, data_column=data_column, field=field)
    # the column the averaging may read again in baseline blocks (imaging_steps)
    ds.attrs["ms_data_column"] = data_column
    return ds, "ms"


def _open_uvh5(src, chunks=None):
    """UVH5 files (a list), one file, or a directory of them -> Dataset."""
    from contimg.io.uvh5 import open_group

    if isinstance(src, (list, tuple)):
        paths = [Path(p) for p in src]
        if len(paths) > 1 and all(_DSA_SUBBAND.fullmatch(q.name) for q in paths):
            return open_group(paths, n_subbands=len(paths), chunks=chunks)
        return _open_any(paths, chunks)
    p = Path(src)
    if p.is_file():
        return _open_any([p], chunks)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory (not a Measurement Set, "
                                "UVH5 file or group directory)")
    if p.is_dir():
        files = sorted(p.glob("*_sb??.hdf5"))
        if not files and any(q.suffix.lower() in (".uvh5", ".hdf5", ".h5")
                             for q in p.iterdir()):
            return _open_any(p, chunks)    # a directory with one UVH5 file
        if not files:
            raise FileNotFoundError(f"{p}: neither a Measurement Set nor a directory of "
                                    "UVH5 files")
        return open_group(files, n_subbands=len(files), chunks=chunks)
    raise FileNotFoundError(f"{p}: not a Measurement Set (no table.dat), a UVH5 file or a "
                            "group directory")


def _uvh5_field(ds, field, src):
    """The integrations of UVH5 data on one phase centre, chosen by its catalogue name
    (``phase_center_name``) or by its index among the distinct names in time order;
    :class:`contimg.io.ms.UnknownFieldError` naming the input and its centres if none."""
    from contimg.io.ms import UnknownFieldError

    names = [str(n) for n in ds.phase_center_name.values]
    distinct = list(dict.fromkeys(names))
    key = str(field).strip()
    if key in distinct:
        want = key
    elif key.isdigit() and int(key) < len(distinct):
        want = distinct[int(key)]
    else:
        where = src if not isinstance(src, (list, tuple)) else ", ".join(map(str, src))
        listed = ", ".join(f"{i} {n!r}" for i, n in enumerate(distinct[:20]))
        more = f" (and {len(distinct) - 20} more)" if len(distinct) > 20 else ""
        raise UnknownFieldError(f"{where}: no phase centre {field!r}; its phase centres "
                                f"(index, name): {listed}{more}")
    log.info("imaging phase centre %r of %s", want, src)
    return ds.isel(time=np.flatnonzero(np.asarray(names) == want))


_DSA_SUBBAND = re.compile(r".*_sb\d\d\.hdf5")


def _open_any(paths, chunks=None):
    """Any UVH5 (single files of any telescope, phase centre and telescope from the
    file): :func:`contimg.io.uvh5.open_any`."""
    try:
        from contimg.io.uvh5 import open_any
    except ImportError as exc:
        raise FileNotFoundError(f"{', '.join(map(str, paths))}: not a Measurement Set or a "
                                "DSA-110 subband group (files named *_sbNN.hdf5), and this "
                                "contimg cannot open other UVH5 files") from exc
    return open_any(paths, chunks=chunks)


def image_ms(src, out_prefix, config: ImageConfig | None = None, *, keep_products=False,
             mask=None, mask_sources=None, phase_center=None, **options) -> ImageResult:
    """Image an MS (``CORRECTED_DATA`` when present, else ``DATA``, or the configured
    ``data_column``; ``field=``: one field of a multi-field MS, by name or id), a
    group's UVH5 files or a Dataset and write ``<prefix>-image.fits``,
    ``-residual.fits``, ``-model.fits``, ``-psf.fits``, ``-image-pb.fits`` (each via a
    temporary name and a rename).

    ``config`` and ``options`` (overrides of its fields) as :func:`image_dataset`.
    Returns an :class:`ImageResult` (paths, restoring beam in arcsec/deg, noise, peak,
    timings; ``products`` with the arrays when ``keep_products``).
    """
    t0 = time.perf_counter()
    c = image_config(config, options)
    writable_dir(Path(out_prefix).parent, "image output directory")  # before computing
    ds, kind = _open_source(src, c.data_column, field=c.field)
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
        write_fits(p, data, qa_header(image_header(prod, name, unit, ds), prod.qa))
        paths[name] = p
    timings = dict(prod.timings)
    timings["write"] = time.perf_counter() - t1
    timings["wall"] = time.perf_counter() - t0
    ix, iy = prod.peak_pixel
    wcs = image_wcs(prod).celestial
    ra_pk, dec_pk = wcs.pixel_to_world_values(ix, iy)
    bmaj, bmin, bpa = prod.beam
    log.info("wrote %s-*.fits in %.1f s", prefix, timings["wall"])
    return ImageResult(paths=paths, beam=(bmaj / ARCSEC, bmin / ARCSEC, bpa),
                       noise=prod.noise, peak=prod.peak,
                       peak_radec=(float(ra_pk), float(dec_pk)),
                       n_components=prod.n_components, n_major=prod.n_major,
                       timings=timings, products=prod if keep_products else None,
                       qa=dict(prod.qa))


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
    s.add_argument("input", nargs="+", help="an MS, a group directory or its UVH5 files, "
                   "or UVH5 files of any telescope")
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
