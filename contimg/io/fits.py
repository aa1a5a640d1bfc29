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

__all__ = ["image_header", "image_wcs", "site_obsgeo", "write_fits"]


def _iso(unix: float) -> str:
    return _dt.datetime.fromtimestamp(unix, _dt.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3]


@functools.lru_cache(maxsize=1)
def site_obsgeo() -> tuple:
    """``OBSGEO-X/Y/Z`` (ITRF, m) and ``OBSGEO-L/B/H`` of the telescope, the geodetic
    ones derived from the geocentric ones as wcslib does, so that a reader finds the
    two consistent (wcslib warns and fixes otherwise, e.g. 3 m in height)."""
    from astropy.wcs import WCS, FITSFixedWarning

    w = WCS(naxis=2)
    w.wcs.obsgeo = [float(x) for x in tel.site_itrf()] + [np.nan] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)   # the derivation we asked for
        w.fix()
    return tuple(float(x) for x in w.wcs.obsgeo)


def image_wcs(prod):
    """The 4-D WCS (RA, Dec, FREQ, STOKES) of an :class:`~contimg.imaging.ImageProducts`
    (pixels ``[ix west, iy north]``, the phase centre at pixel ``npix // 2``)."""
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
    c.obsgeo = list(site_obsgeo())
    return w


def image_header(prod, kind: str, bunit: str):
    """The FITS header of one image of ``prod``: :func:`image_wcs` as cards plus units,
    restoring beam, telescope and CLEAN's figures."""
    from astropy.io import fits

    from contimg import __version__

    h = fits.Header()
    h["BSCALE"] = 1.0
    h["BZERO"] = 0.0
    h["BUNIT"] = bunit
    h["BTYPE"] = "Intensity"
    h.update(image_wcs(prod).to_header())
    # wcslib writes OBSGEO-X/Y/Z only, and a reader's wcslib derives (with a warning)
    # the geodetic ones: they are written too
    for axis, value in zip("LBH", site_obsgeo()[3:], strict=True):
        h[f"OBSGEO-{axis}"] = value
    bmaj, bmin, bpa = prod.beam
    h["BMAJ"] = (math.degrees(bmaj), "beam major axis FWHM, deg")
    h["BMIN"] = (math.degrees(bmin), "beam minor axis FWHM, deg")
    h["BPA"] = (bpa, "beam PA, deg E of N")
    h["TELESCOP"] = tel.TELESCOPE_NAME
    h["INSTRUME"] = tel.TELESCOPE_NAME
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
    os.replace(finalise(tmp), path)
    return path
