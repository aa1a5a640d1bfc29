"""FITS images of :func:`contimg.imaging.image_dataset`'s products.

The header is an astropy :class:`~astropy.wcs.WCS` (:func:`image_wcs`: RA/Dec in the
SIN projection, with ``PV2_1``/``PV2_2`` for a w-snapshot's slant orthographic
projection, frequency, Stokes; the observation's dates and place) turned into cards by
``WCS.to_header()``, plus the keywords that are not WCS (units, restoring beam,
telescope, CLEAN's figures). A WCS reader gets back what was written, with nothing for
astropy's "fix" routines to add (no ``FITSFixedWarning``).
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import os
import warnings
from pathlib import Path

import numpy as np

from contimg import telescope as tel
from contimg.io.files import finalise
from kernels.constants import SECONDS_PER_DAY, UNIX_MJD0

__all__ = ["image_header", "image_wcs", "site_obsgeo", "observation_keywords", "write_fits"]


def _iso(unix: float) -> str:
    return _dt.datetime.fromtimestamp(unix, _dt.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3]


def site_obsgeo(itrf=None) -> tuple:
    """``OBSGEO-X/Y/Z`` (ITRF, m) and ``OBSGEO-L/B/H`` of the telescope at ``itrf``
    (default DSA-110's site), the geodetic ones derived from the geocentric ones as
    wcslib does, so that a reader finds the two consistent (wcslib warns and fixes
    otherwise, e.g. 3 m in height)."""
    xyz = tel.site_itrf() if itrf is None else np.asarray(itrf, dtype=float).reshape(3)
    return _obsgeo(tuple(float(x) for x in xyz))


@functools.lru_cache(maxsize=16)
def _obsgeo(xyz: tuple) -> tuple:
    from astropy.wcs import WCS, FITSFixedWarning

    w = WCS(naxis=2)
    w.wcs.obsgeo = list(xyz) + [np.nan] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)   # the derivation we asked for
        w.fix()
    return tuple(float(x) for x in w.wcs.obsgeo)


def observation_keywords(source=None) -> dict:
    """``telescope``, ``location`` (ITRF m) and ``object`` of the data an image was
    made from: a contract Dataset (or its attrs mapping); DSA-110's when unknown.

    object: the phase centre's name when the data have one (``phase_center_name``),
    else the group's start (``group <timestamp>``), else the MS / file name."""
    attrs = getattr(source, "attrs", source) or {}
    name = str(attrs.get("telescope_name") or tel.TELESCOPE_NAME)
    loc = attrs.get("telescope_location")
    loc = tel.site_itrf() if loc is None else np.asarray(loc, dtype=float).reshape(3)
    obj = ""
    coords = getattr(source, "coords", {})
    if "phase_center_name" in coords:
        names = sorted({str(n) for n in np.asarray(coords["phase_center_name"].values)})
        if len(names) == 1 and names[0]:
            obj = names[0]
    if not obj and attrs.get("group_start"):
        obj = f"group {attrs['group_start']}"
    if not obj:
        src = attrs.get("ms_path") or (list(attrs.get("source_files") or [""]) or [""])[0]
        obj = Path(str(src)).name if src else ""
    return {"telescope": name, "location": loc, "object": obj or f"{name} data"}


def image_wcs(prod, location=None):
    """The 4-D WCS (RA, Dec, FREQ, STOKES) of an :class:`~contimg.imaging.ImageProducts`
    (pixels ``[ix west, iy north]``, the phase centre at pixel ``npix // 2``);
    ``location``: the telescope's ITRF position (default DSA-110's)."""
    from astropy.wcs import WCS

    npix = prod.image.shape[0]
    ra0, dec0 = prod.phase_center
    cdeg = math.degrees(prod.cell_rad)
    w = WCS(naxis=4)
    c = w.wcs
    c.ctype = ["RA---SIN", "DEC--SIN", "FREQ", "STOKES"]
    c.cunit = ["deg", "deg", "Hz", ""]
    c.crpix = [npix // 2 + 1, npix // 2 + 1, 1.0, 1.0]
    c.crval = [math.degrees(ra0) % 360.0, math.degrees(dec0), prod.freq_hz, 1.0]
    c.cdelt = [-cdeg, cdeg, prod.bandwidth_hz, 1.0]
    if any(prod.slant):
        # a w-snapshot image (see image_dataset's w_mode): slant orthographic
        c.set_pv([(2, 1, float(prod.slant[0])), (2, 2, float(prod.slant[1]))])
    c.radesys = "ICRS"
    c.equinox = 2000.0
    c.lonpole = 180.0
    c.latpole = math.degrees(dec0)
    c.specsys = "TOPOCENT"
    # DATE-OBS/MJD-OBS: start of the data; DATE-AVG/MJD-AVG: its middle (FITS WCS)
    start = _dt.datetime.fromisoformat(prod.date_obs).replace(tzinfo=_dt.timezone.utc)
    c.dateobs = prod.date_obs
    c.mjdobs = start.timestamp() / SECONDS_PER_DAY + UNIX_MJD0
    c.dateavg = _iso(prod.time_mid_unix)
    c.mjdavg = prod.time_mid_unix / SECONDS_PER_DAY + UNIX_MJD0
    c.timesys = "UTC"
    c.dateref = "1858-11-17"          # MJD 0, so that nothing needs fixing on reading
    c.mjdref = [0.0, 0.0]
    c.obsgeo = list(site_obsgeo(location))
    return w


def image_header(prod, kind: str, bunit: str, source=None):
    """The FITS header of one image of ``prod``: :func:`image_wcs` as cards plus units,
    restoring beam, telescope and CLEAN's figures. ``source``: the Dataset imaged (its
    telescope, location and phase-centre name go in TELESCOP, OBSGEO-*, OBJECT; see
    :func:`observation_keywords`)."""
    from astropy.io import fits

    from contimg import __version__

    obs = observation_keywords(source)

    h = fits.Header()
    h["BSCALE"] = 1.0
    h["BZERO"] = 0.0
    h["BUNIT"] = bunit
    h["BTYPE"] = "Intensity"
    h.update(image_wcs(prod, obs["location"]).to_header())
    # wcslib writes OBSGEO-X/Y/Z only, and a reader's wcslib derives (with a warning)
    # the geodetic ones: they are written too
    for axis, value in zip("LBH", site_obsgeo(obs["location"])[3:], strict=True):
        h[f"OBSGEO-{axis}"] = value
    bmaj, bmin, bpa = prod.beam
    h["BMAJ"] = (math.degrees(bmaj), "beam major axis FWHM, deg")
    h["BMIN"] = (math.degrees(bmin), "beam minor axis FWHM, deg")
    h["BPA"] = (bpa, "beam PA, deg E of N")
    h["TELESCOP"] = obs["telescope"]
    h["INSTRUME"] = obs["telescope"]
    h["OBJECT"] = obs["object"]
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
    os.replace(finalise(tmp), path)
    return path
