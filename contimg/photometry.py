"""Forced photometry of catalogue sources in an image, its flux-scale normalisation, and
the photometry stage of the stream.

For every catalogue source whose primary-beam response in the image is at least the
image's own PB cutoff (where ``-image-pb.fits`` is defined): the amplitude of the
restoring beam fitted at the known position (``kernels.photometry.beam_fit``) in the
apparent image, its error from the local robust rms (an annulus of 2–5 beams that skips
every catalogue source), the PB response, and flags:

* ``edge``    — the fit region or the noise annulus runs off the image or into NaNs;
* ``blended`` — another catalogue source lies within one beam FWHM;
* ``low_pb``  — the PB response is below the photometry cut (default 0.2);
* ``no_rms``  — too few pixels to measure the local rms (no flux then).

Flux densities are PB-corrected (``peak / pb``). The PB is read from ``<prefix>-pb.fits``
when it exists, else recovered exactly (to float32 rounding) from ``-image.fits`` /
``-image-pb.fits``, else modelled from the header (the 4.65 m Airy beam averaged over
the drift from DATE-OBS to the end of the group and over the band).

Normalisation: per image, the robust median of measured/expected over steady, bright,
unflagged reference sources is the flux-scale correction (its error from the MAD);
light curves keep the raw and the normalised values.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels import photometry as kph
from kernels.constants import SECONDS_PER_DAY, SIDEREAL_DAY_S, UNIX_MJD0

log = logging.getLogger(__name__)

FLAG_EDGE, FLAG_BLENDED, FLAG_LOW_PB, FLAG_NO_RMS = 1, 2, 4, 8
FLAG_NAMES = {FLAG_EDGE: "edge", FLAG_BLENDED: "blended", FLAG_LOW_PB: "low_pb",
              FLAG_NO_RMS: "no_rms"}
DEFAULT_PB_CUT = 0.2
DEFAULT_PB_FLOOR = 0.1          # never measure below this (the imager's PB cutoff)
DEFAULT_REFERENCE_MIN_SNR = 20.0


def flag_names(flags: int) -> list[str]:
    return [n for b, n in FLAG_NAMES.items() if flags & b]


@dataclass
class Image:
    path: Path
    data: np.ndarray      # [y, x] float64, Jy/beam (apparent)
    header: object        # astropy Header
    wcs: object           # celestial WCS
    beam: tuple           # (bmaj_deg, bmin_deg, bpa_deg)
    cell_deg: float
    freq_hz: float
    bandwidth_hz: float
    t_mid: float          # unix seconds
    t_start: float


def _unix(header, mjd_key, date_key):
    from astropy.time import Time

    if mjd_key in header:
        return (float(header[mjd_key]) - UNIX_MJD0) * SECONDS_PER_DAY
    if date_key in header:
        return float(Time(header[date_key], scale="utc").unix)
    return None


def read_image(path) -> Image:
    """Read a restored image (any FITS whose celestial WCS and BMAJ/BMIN/BPA describe
    it); clear errors for what is missing."""
    from astropy.io import fits
    from astropy.wcs import WCS

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image")
    with fits.open(path, memmap=False) as hl:
        header = hl[0].header
        data = np.asarray(hl[0].data, dtype=np.float64)
    while data.ndim > 2:
        data = data[0]
    if data.ndim != 2:
        raise ValueError(f"{path}: not an image (data shape {data.shape})")
    for k in ("BMAJ", "BMIN"):
        if k not in header:
            raise ValueError(f"{path}: header has no {k} (restoring beam)")
    wcs = WCS(header).celestial
    cell = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))))
    freq, bw = 1.4e9, 0.0
    for i in range(1, header.get("NAXIS", 0) + 1):
        if str(header.get(f"CTYPE{i}", "")).startswith("FREQ"):
            freq, bw = float(header[f"CRVAL{i}"]), abs(float(header.get(f"CDELT{i}", 0.0)))
    t_start = _unix(header, "MJD-OBS", "DATE-OBS")
    t_mid = _unix(header, "MJD-AVG", "DATE-AVG")
    t_mid = t_start if t_mid is None else t_mid
    return Image(path=path, data=data, header=header, wcs=wcs,
                 beam=(float(header["BMAJ"]), float(header["BMIN"]),
                       float(header.get("BPA", 0.0))),
                 cell_deg=cell, freq_hz=freq, bandwidth_hz=bw, t_mid=t_mid, t_start=t_start)


def _sibling(path: Path, suffix: str) -> Path | None:
    name = path.name
    if name.endswith("-image.fits"):
        p = path.with_name(name[: -len("-image.fits")] + suffix)
        return p if p.is_file() else None
    return None


def _read2d(path):
    from astropy.io import fits

    d = np.asarray(fits.getdata(path), dtype=np.float64)
    while d.ndim > 2:
        d = d[0]
    return d


def pb_map(img: Image) -> np.ndarray | None:
    """The PB over the whole image (0 where below the imager's cutoff), or None when
    neither ``-pb.fits`` nor ``-image-pb.fits`` is beside the image."""
    p = _sibling(img.path, "-pb.fits")
    if p is not None:
        return _read2d(p)
    q = _sibling(img.path, "-image-pb.fits")
    if q is None:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        pb = img.data / _read2d(q)
    pb[~np.isfinite(pb)] = 0.0
    return pb


def model_pb(img: Image, ra_deg, dec_deg, ntime=24, nfreq=8) -> np.ndarray:
    """Airy beam of the dish at the sources, averaged over the drift (pointing at the
    image centre's declination, RA moving with the sidereal rate from DATE-OBS to the
    end of the group) and over the band."""
    from contimg import telescope as tel
    from kernels.beam import lmn_of, mean_airy_beam

    ra0, dec0 = (math.radians(v) for v in img.wcs.wcs.crval)
    half = (img.t_mid - img.t_start) if img.t_start is not None else 0.0
    dt = np.linspace(-half, half, ntime) if half > 0 else np.zeros(1)
    pra = ra0 + dt * 2 * math.pi / SIDEREAL_DAY_S
    pl, pm, _ = lmn_of(pra, np.full(pra.size, dec0), ra0, dec0)
    f = img.freq_hz + (np.linspace(-0.5, 0.5, nfreq) * img.bandwidth_hz
                       if img.bandwidth_hz else np.zeros(1))
    l, m, _ = lmn_of(np.radians(ra_deg), np.radians(dec_deg), ra0, dec0)
    return mean_airy_beam(l, m, pl, pm, f, np.ones((pra.size, f.size)), tel.DISH_DIAMETER_M)


def _pb_at(img: Image, pb: np.ndarray | None, x, y, ra_deg, dec_deg) -> np.ndarray:
    if pb is None:
        return model_pb(img, ra_deg, dec_deg)
    from scipy.ndimage import map_coordinates

    out = map_coordinates(pb, [y, x], order=1, mode="constant", cval=0.0)
    # next to the imager's cutoff the interpolation mixes in zeros: below it, nothing
    lo = map_coordinates((pb > 0).astype(np.float64), [y, x], order=1, mode="constant")
    out[lo < 1.0] = 0.0
    return out


def measure(img: Image, ra_deg, dec_deg, *, pb: np.ndarray | None = None,
            pb_cut: float = DEFAULT_PB_CUT, pb_floor: float = DEFAULT_PB_FLOOR,
            annulus_beams=(2.0, 5.0), threads: int = 1) -> dict:
    """Forced photometry of the positions ``(ra_deg, dec_deg)`` in ``img``.

    Returns arrays (one per position): ``measured`` (bool: PB >= ``pb_floor`` and on the
    image), ``flux_jy``/``err_jy`` (PB-corrected), ``peak_jy`` (apparent), ``rms_jy``,
    ``pb``, ``flags``, ``x``, ``y``.
    """
    ra_deg = np.atleast_1d(np.asarray(ra_deg, dtype=np.float64))
    dec_deg = np.atleast_1d(np.asarray(dec_deg, dtype=np.float64))
    x, y = img.wcs.world_to_pixel_values(ra_deg, dec_deg)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ny, nx = img.data.shape
    on = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (y >= 0) & (x <= nx - 1) & (y <= ny - 1)
    pbv = np.zeros(x.size)
    pbv[on] = _pb_at(img, pb, x[on], y[on], ra_deg[on], dec_deg[on])
    sel = on & (pbv >= pb_floor)
    bmaj_pix = img.beam[0] / img.cell_deg
    bmin_pix = img.beam[1] / img.cell_deg
    east = -1.0 if img.wcs.wcs.cdelt[0] * img.wcs.wcs.get_pc()[0, 0] < 0 else 1.0
    qa, qb, qc = kph.beam_quadratic(bmaj_pix, bmin_pix, img.beam[2], east)
    # every catalogue source on the image masks the noise annuli, measured or not
    xm, ym = np.ascontiguousarray(x[on]), np.ascontiguousarray(y[on])
    mask = kph.source_mask(ny, nx, xm, ym, 1.5 * bmaj_pix)
    xs, ys = np.ascontiguousarray(x[sel]), np.ascontiguousarray(y[sel])
    rms, nrms, trunc = kph.local_rms(img.data, mask, xs, ys, annulus_beams[0] * bmaj_pix,
                                     annulus_beams[1] * bmaj_pix, 50, 2, threads)
    amp, fac, npx, edge = kph.beam_fit(img.data, xs, ys, qa, qb, qc, 0.5, threads)
    flags = np.zeros(x.size, dtype=np.int64)
    f = np.zeros(xs.size, dtype=np.int64)
    f[edge | trunc] |= FLAG_EDGE
    f[~np.isfinite(rms)] |= FLAG_NO_RMS
    f[pbv[sel] < pb_cut] |= FLAG_LOW_PB
    if xm.size > 1 and xs.size:
        from scipy.spatial import cKDTree

        tree = cKDTree(np.stack([xm, ym], axis=1))
        cnt = tree.query_ball_point(np.stack([xs, ys], axis=1), bmaj_pix, return_length=True)
        f[np.asarray(cnt) > 1] |= FLAG_BLENDED
    flags[sel] = f
    out = {k: np.full(x.size, np.nan) for k in ("flux_jy", "err_jy", "peak_jy", "rms_jy")}
    out["peak_jy"][sel] = amp
    out["rms_jy"][sel] = rms
    with np.errstate(invalid="ignore", divide="ignore"):
        out["flux_jy"][sel] = np.where(np.isfinite(rms), amp / pbv[sel], np.nan)
        out["err_jy"][sel] = fac * rms / pbv[sel]
    out.update(measured=sel & np.isfinite(out["flux_jy"]), pb=pbv, flags=flags, x=x, y=y)
    return out


def measure_image(fits_path, sources, *, pb_cut: float = DEFAULT_PB_CUT,
                  pb_floor: float = DEFAULT_PB_FLOOR, threads: int = 1) -> dict:
    """Forced photometry of ``sources`` (a dict/Table with ``ra_deg``, ``dec_deg``) in
    the restored image ``fits_path``; the result of :func:`measure` plus ``t_mid``,
    ``freq_hz`` and ``image``."""
    img = read_image(fits_path)
    res = measure(img, np.asarray(sources["ra_deg"]), np.asarray(sources["dec_deg"]),
                  pb=pb_map(img), pb_cut=pb_cut, pb_floor=pb_floor, threads=threads)
    res.update(t_mid=img.t_mid, freq_hz=img.freq_hz, image=str(img.path))
    return res


def flux_scale(measured, err, expected, ok) -> tuple[float, float, int]:
    """Robust median of ``measured/expected`` over ``ok`` references and its error
    (1.2533 x 1.4826 MAD / sqrt(n), never below the median's statistical error).
    ``(nan, nan, n)`` with fewer than 3 references."""
    ok = ok & np.isfinite(measured) & np.isfinite(expected) & (expected > 0)
    n = int(ok.sum())
    if n < 3:
        return math.nan, math.nan, n
    r = measured[ok] / expected[ok]
    med = float(np.median(r))
    mad = float(np.median(np.abs(r - med))) * 1.482602218505602
    stat = float(np.sqrt(np.mean((err[ok] / expected[ok]) ** 2)))
    return med, 1.2533 * max(mad, stat) / math.sqrt(n), n


# ---------------------------------------------------------------------------------
# the stage: measure, normalise, store, update the light-curve statistics
# ---------------------------------------------------------------------------------

def _ensure_image(db, path: str, noise=None, beam=None, group_id=None):
    if not db.query("SELECT 1 FROM images WHERE path=?", (path,)):
        db.register_image(path, group_id=group_id, noise_jy=noise, beam=beam)


def record(db, image_path: str, t_mid: float, source_ids, res: dict, expected,
           *, reference_min_snr: float = DEFAULT_REFERENCE_MIN_SNR,
           steady_eta: float = 3.0, ese_preset: str | None = "default") -> dict:
    """Normalise one image's photometry and store it (raw and normalised), then update
    the variability running sums of its unflagged sources and run the ESE detector
    where the new epoch calls for it. A source already measured in this image (a
    re-run) gets its row replaced but is not counted twice in the running sums.
    Returns a summary."""
    from contimg import variability

    m = res["measured"]
    ids = np.asarray(source_ids)[m]
    flux, err = res["flux_jy"][m], res["err_jy"][m]
    flags = res["flags"][m]
    exp = np.asarray(expected, dtype=float)[m]
    # references: unflagged, bright, with a catalogue flux, not known to vary
    eta = variability.eta_of(db, ids)
    ref = (flags == 0) & (flux / err >= reference_min_snr) & ~(eta > steady_eta)
    scale, scale_err, n_ref = flux_scale(flux, err, exp, ref)
    if math.isfinite(scale):
        nflux = flux / scale
        nerr = np.hypot(err / scale, nflux * scale_err / scale)
    else:
        nflux, nerr = flux, err
    seen = {r["source_id"] for r in db.query(
        "SELECT source_id FROM photometry WHERE image_path=?", (image_path,))}
    now = time.time()
    with db.transaction() as con:
        con.execute("INSERT INTO image_flux_scale (image_path, t_mid, scale, scale_err, "
                    "n_ref, n_measured, created_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT("
                    "image_path) DO UPDATE SET t_mid=excluded.t_mid, scale=excluded.scale, "
                    "scale_err=excluded.scale_err, n_ref=excluded.n_ref, "
                    "n_measured=excluded.n_measured, created_at=excluded.created_at",
                    (image_path, t_mid, None if not math.isfinite(scale) else scale,
                     None if not math.isfinite(scale_err) else scale_err, n_ref,
                     int(ids.size), now))
        con.executemany(
            "INSERT INTO photometry (source_id, image_path, t_mid, flux_jy, err_jy, peak_jy,"
            " rms_jy, pb, flags, norm_flux_jy, norm_err_jy) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(source_id, image_path) DO UPDATE SET t_mid=excluded.t_mid, "
            "flux_jy=excluded.flux_jy, err_jy=excluded.err_jy, peak_jy=excluded.peak_jy, "
            "rms_jy=excluded.rms_jy, pb=excluded.pb, flags=excluded.flags, "
            "norm_flux_jy=excluded.norm_flux_jy, norm_err_jy=excluded.norm_err_jy",
            [(int(i), image_path, t_mid, float(a), float(b), float(c), float(d), float(e),
              int(g), float(h), float(k)) for i, a, b, c, d, e, g, h, k in zip(
                ids, flux, err, res["peak_jy"][m], res["rms_jy"][m], res["pb"][m], flags,
                nflux, nerr)])
    new = (flags == 0) & np.array([int(i) not in seen for i in ids], dtype=bool)
    upd = variability.update(db, ids[new], np.full(int(new.sum()), t_mid), nflux[new],
                             nerr[new])
    cands = ([] if ese_preset is None else
             variability.detect_updated(db, ids[new], upd["deviation"], ese_preset))
    return dict(image=image_path, n_measured=int(ids.size), n_flagged=int((flags != 0).sum()),
                scale=scale, scale_err=scale_err, n_ref=n_ref, n_updated=upd["n_updated"],
                n_candidates=len(cands))


def stage_photometry(image_path, db_path=None, *, pb_cut: float | None = None,
                     reference_min_snr: float | None = None, ese_preset: str | None = None,
                     threads: int = 1, group_id: str | None = None) -> dict:
    """The stream's photometry stage: forced photometry of every catalogue source of the
    state database in ``image_path`` (a ``*-image.fits`` path, or the image prefix),
    normalisation, storage, variability and ESE update. Settings left None come from
    the configuration (``[science]``). Returns a summary dict."""
    from contimg import catalog
    from contimg.config import current
    from contimg.state import StateDB

    sci = current().science
    pb_cut = sci.photometry_pb_cut if pb_cut is None else pb_cut
    reference_min_snr = (sci.reference_min_snr if reference_min_snr is None
                         else reference_min_snr)
    ese_preset = sci.ese_preset if ese_preset is None else ese_preset

    p = Path(image_path)
    if not p.name.endswith(".fits"):
        p = p.with_name(p.name + "-image.fits")
    t0 = time.perf_counter()
    with StateDB(db_path) as db:
        src = catalog.sources_table(db)
        if src["id"].size == 0:
            return dict(image=str(p), n_measured=0, skipped="no catalogue sources")
        img = read_image(p)
        res = measure(img, src["ra_deg"], src["dec_deg"], pb=pb_map(img), pb_cut=pb_cut,
                      threads=threads)
        _ensure_image(db, str(p), noise=img.header.get("NOISE"), group_id=group_id,
                      beam=dict(bmaj_deg=img.beam[0], bmin_deg=img.beam[1],
                                bpa_deg=img.beam[2]))
        out = record(db, str(p), img.t_mid, src["id"], res,
                     catalog.expected_flux(src, img.freq_hz),
                     reference_min_snr=reference_min_snr, ese_preset=ese_preset)
    out["seconds"] = time.perf_counter() - t0
    log.info("photometry %s: %d sources, scale %.4f +- %.4f (%d refs) in %.2f s", p,
             out["n_measured"], out["scale"], out["scale_err"], out["n_ref"], out["seconds"])
    return out


# ---------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------

def _threads() -> int:
    import os

    return max(1, min(8, os.cpu_count() or 1))


def cmd_photometry(args) -> int:
    import json

    sci = args.cfg.science
    if args.csv:
        from contimg import catalog

        if not args.catalog:
            raise ValueError("contimg photometry --csv needs --catalog FILE")
        src = catalog.read_catalog(args.catalog)
        for path in args.images:
            res = measure_image(path, src, pb_cut=sci.photometry_pb_cut, threads=_threads())
            print(f"# {path}: t_mid {res['t_mid']:.1f}, {int(res['measured'].sum())} sources")
            print("name,flux_jy,err_jy,peak_jy,rms_jy,pb,flags")
            for k in np.flatnonzero(res["measured"]):
                print(f"{src['name'][k]},{res['flux_jy'][k]:.6g},{res['err_jy'][k]:.3g},"
                      f"{res['peak_jy'][k]:.6g},{res['rms_jy'][k]:.3g},{res['pb'][k]:.4f},"
                      f"{'|'.join(flag_names(int(res['flags'][k])))}")
        return 0
    db_path = args.cfg.paths.db
    if args.catalog:
        from contimg import catalog
        from contimg.state import StateDB

        with StateDB(db_path) as db:
            catalog.load_into_db(db, args.catalog, radius_arcsec=sci.match_radius_arcsec)
    for path in args.images:
        out = stage_photometry(path, db_path, pb_cut=sci.photometry_pb_cut,
                               reference_min_snr=sci.reference_min_snr,
                               ese_preset=sci.ese_preset, threads=_threads())
        print(json.dumps(out, default=float))
    return 0


def add_subcommands(sub):
    from contimg.config import add_options

    s = sub.add_parser("photometry", help="forced photometry of catalogue sources in images")
    s.add_argument("images", nargs="+", help="restored images (<prefix>-image.fits)")
    s.add_argument("--catalog", help="catalogue file, loaded into the database first (or, "
                   "with --csv, measured)")
    s.add_argument("--csv", action="store_true",
                   help="measure the --catalog sources and print CSV; store nothing")
    add_options(s, "paths.db", "science.photometry_pb_cut", "science.reference_min_snr",
                "science.ese_preset", "science.match_radius_arcsec")
    s.set_defaults(func=cmd_photometry)
