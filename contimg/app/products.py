"""Products as the operator app shows them: thumbnails and QA made when an image is
registered, file paths checked before anything is served, calibration solutions and
image pixels read for the pages (decimated, so a page never holds a large array)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from contimg.io.files import finalise

log = logging.getLogger(__name__)

THUMB_PX = 256
VIEW_PX = 1024


class Forbidden(PermissionError):
    """A path that is not a registered product under the products directory."""


# ------------------------------------------------------------------ pixels
def read_plane(fits_path) -> tuple[np.ndarray, object]:
    """The first 2-D plane of a FITS image (memory-mapped) and its celestial WCS."""
    from astropy.io import fits
    from astropy.wcs import WCS

    with fits.open(fits_path, memmap=True) as hdul:
        hdu = hdul[0]
        data = hdu.data
        if data is None or data.ndim < 2:
            raise ValueError(f"{fits_path}: primary HDU has no 2-D image")
        while data.ndim > 2:
            data = data[0]
        wcs = WCS(hdu.header).celestial
        return np.array(data, dtype=np.float32), wcs


def decimate(a: np.ndarray, max_px: int) -> tuple[np.ndarray, int]:
    """Block-mean ``a`` down to at most ``max_px`` on a side; returns it and the step."""
    step = max(1, int(np.ceil(max(a.shape) / max_px)))
    if step == 1:
        return a, 1
    ny, nx = (a.shape[0] // step) * step, (a.shape[1] // step) * step
    return np.nanmean(a[:ny, :nx].reshape(ny // step, step, nx // step, step), axis=(1, 3)), step


def stretch(a: np.ndarray, lo_pct=0.5, hi_pct=99.9) -> np.ndarray:
    """asinh stretch between percentiles to 0..1 (NaN -> 0)."""
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros_like(a)
    lo, hi = np.percentile(finite, [lo_pct, hi_pct])
    if hi <= lo:
        hi = lo + 1.0
    x = np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo), 0, 1)
    return np.arcsinh(10 * x) / np.arcsinh(10)


def make_thumbnail(fits_path, png_path, size: int = THUMB_PX) -> Path:
    """A PNG thumbnail (at most ``size`` px, asinh stretch, north up) of a FITS image,
    written to a temporary name and renamed."""
    from PIL import Image

    data, _ = read_plane(fits_path)
    small, _ = decimate(data, size)
    img = Image.fromarray((stretch(small)[::-1] * 255).astype(np.uint8), mode="L")
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.name + f".tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(finalise(tmp), png_path)
    return png_path


def image_qa(image_path, res: dict) -> dict:
    """The QA of an imaging result for the images table (CLEAN components, major
    cycles, dynamic range) and its thumbnail, made now (``<image>.png``) so that no
    page has to open the FITS file for it. A thumbnail that cannot be made is logged
    and left out; it never fails the registration."""
    image_path = str(image_path)
    qa = {k: res[k] for k in ("n_components", "n_major") if res.get(k) is not None}
    peak, noise = res.get("peak_jy", res.get("peak")), res.get("noise_jy", res.get("noise"))
    if peak is not None and noise:
        qa["dynamic_range"] = float(peak) / float(noise)
    png = os.path.splitext(image_path)[0] + ".png"
    try:
        make_thumbnail(image_path, png)
        qa["thumbnail"] = png
    except Exception as exc:   # a thumbnail must never fail the image's registration
        log.warning("%s: no thumbnail: %s", image_path, exc)
    return qa


# ------------------------------------------------------------------ safe paths
def safe_product_path(path, products_dir) -> Path:
    """``path`` resolved, if it is an existing file inside ``products_dir`` (symlinks
    and ``..`` resolved on both sides); Forbidden otherwise."""
    if not path or products_dir is None:
        raise Forbidden("no products directory is configured")
    root = Path(os.path.realpath(products_dir))
    p = Path(os.path.realpath(path))
    if os.path.commonpath([root, p]) != str(root):
        raise Forbidden(f"{path} is outside the products directory")
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such product file")
    return p


# ------------------------------------------------------------------ calibration
def calibration_frames(tables: dict) -> dict:
    """Solutions of a calibration set as long tables for plotting, read from the CASA
    tables: ``bandpass`` (antenna, pol, freq_mhz, amp, phase_deg, snr, flag) and
    ``gain`` (antenna, pol, time, amp, phase_deg, snr, flag). Missing tables are
    absent from the result."""
    import pandas as pd

    from contimg.caltables import read_caltable

    out = {}
    for kind, path in (tables or {}).items():
        if not path or not os.path.exists(path):
            continue
        t = read_caltable(path, convention="casa")
        cp, fl, snr = t["cparam"], t["flag"], t["snr"]   # (nsol, nant, nchan, npol)
        nsol, nant, nchan, npol = cp.shape
        pols = ["XX", "YY"][:npol] if npol <= 2 else [str(i) for i in range(npol)]
        names = t["antenna_names"]
        if t["kind"] == "B":
            k = nsol // 2
            ant, ch, pol = np.meshgrid(np.arange(nant), np.arange(nchan), np.arange(npol),
                                       indexing="ij")
            c = cp[k]
            df = pd.DataFrame({"antenna": np.asarray(names)[ant.ravel()],
                               "pol": np.asarray(pols)[pol.ravel()],
                               "freq_mhz": t["freqs_hz"][ch.ravel()] / 1e6,
                               "amp": np.abs(c).ravel(),
                               "phase_deg": np.degrees(np.angle(c)).ravel(),
                               "snr": snr[k].ravel(), "flag": fl[k].ravel()})
            out["bandpass"] = df
        else:
            sol, ant, pol = np.meshgrid(np.arange(nsol), np.arange(nant), np.arange(npol),
                                        indexing="ij")
            c = cp[:, :, 0, :]
            df = pd.DataFrame({"antenna": np.asarray(names)[ant.ravel()],
                               "pol": np.asarray(pols)[pol.ravel()],
                               "time": pd.to_datetime(t["times_unix"][sol.ravel()], unit="s"),
                               "amp": np.abs(c).ravel(),
                               "phase_deg": np.degrees(np.angle(c)).ravel(),
                               "snr": snr[:, :, 0, :].ravel(),
                               "flag": fl[:, :, 0, :].ravel()})
            out["gain"] = df
    return out
