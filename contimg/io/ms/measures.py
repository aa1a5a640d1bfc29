"""Measure references of a Measurement Set turned into the contract's frames, and the
conjugation convention of the MS's writer.

- TIME: the column's ``MEASINFO`` reference (UTC, TAI/IAT, TT/TDT, TDB, TCG, TCB,
  UT1) -> UTC (:func:`time_to_utc`). CASA's importuvfits, for one, writes TAI.
- Directions (FIELD.PHASE_DIR): a fixed ``Ref`` or a per-row ``VarRefCol``; ICRS,
  J2000, B1950, B1950_VLA, GALACTIC, SUPERGAL and ECLIPTIC -> ICRS by casacore's
  measures (:func:`direction_to_icrs`); time-dependent frames (APP, JMEAN, AZEL, ...)
  are refused with the file and the frame named.
- Conjugation (:func:`ms_conjugation`): ``"ms"`` (DATA = conj(V), UVW = -uvw: CASA's
  convention, what pyuvdata >= 3 and :func:`~contimg.io.ms.write_ms` write) or
  ``"pyuvdata"`` (DATA and UVW as pyuvdata holds them: pyuvdata 2.x wrote that).
  Detected as pyuvdata does: the MAIN keyword ``pyuvdata_flip_conj`` when present
  (True -> "ms"), else a HISTORY row whose APPLICATION names pyuvdata -> "pyuvdata",
  else "ms".
"""

from __future__ import annotations

import logging

import numpy as np

from contimg.io.ms.common import MSFormatError, read_subtable

__all__ = ["direction_to_icrs", "time_to_utc", "ms_conjugation", "CONJUGATIONS",
           "time_reference"]

log = logging.getLogger(__name__)

CONJUGATIONS = ("auto", "ms", "pyuvdata")

#: casacore epoch reference codes -> astropy time scales
_TIME_SCALES = {"UTC": "utc", "TAI": "tai", "IAT": "tai", "TT": "tt", "TDT": "tt",
                "ET": "tt", "TDB": "tdb", "TCG": "tcg", "TCB": "tcb", "UT1": "ut1",
                "UT": "ut1"}


def time_reference(measinfo):
    """The epoch reference of a TIME column's MEASINFO (UTC when absent)."""
    ref = measinfo.get("Ref") if isinstance(measinfo, dict) else measinfo
    return str(ref or "UTC").upper()


def time_to_utc(mjd_s, measinfo, path, column="TIME"):
    """MJD seconds in the column's reference -> MJD seconds UTC (float64)."""
    mjd_s = np.asarray(mjd_s, dtype=np.float64)
    ref = time_reference(measinfo)
    if ref == "UTC":
        return mjd_s
    scale = _TIME_SCALES.get(ref)
    if scale is None:
        raise MSFormatError(f"{path}: {column} uses the {ref} time reference; open_ms "
                            f"converts {sorted(_TIME_SCALES)} to UTC")
    from astropy.time import Time

    day = np.floor(mjd_s / 86400.0)
    frac = (mjd_s - day * 86400.0) / 86400.0
    try:
        t = Time(day, frac, format="mjd", scale=scale)
        u = t.utc
    except Exception as exc:  # e.g. UT1 beyond the offline IERS tables
        raise MSFormatError(f"{path}: cannot convert {column} from {ref} to UTC "
                            f"({exc})") from exc
    offset = ((u.jd1 - t.jd1) + (u.jd2 - t.jd2)) * 86400.0
    log.info("%s: %s is %s; converted to UTC (%+.3f s)", path, column, ref,
             float(np.median(offset)))
    return mjd_s + offset


#: fixed (time-independent) casacore direction references open_ms converts
FIXED_FRAMES = ("ICRS", "J2000", "B1950", "B1950_VLA", "GALACTIC", "SUPERGAL", "ECLIPTIC")


def _convert(ra, dec, ref, path, column):
    """One frame -> ICRS with casacore's measures (the library the MS's writers use:
    its J2000 frame bias differs from astropy's FK5 by up to ~30 mas)."""
    if ref == "ICRS":
        return ra, dec
    if ref not in FIXED_FRAMES:
        raise MSFormatError(f"{path}: {column} uses the {ref} frame; open_ms converts "
                            f"{', '.join(FIXED_FRAMES)} directions to ICRS")
    from casacore.measures import measures

    dm = measures()
    out_ra, out_dec = np.empty(ra.size), np.empty(dec.size)
    for i, (r, d) in enumerate(zip(ra.ravel(), dec.ravel(), strict=True)):
        m = dm.measure(dm.direction(ref, f"{float(r)!r}rad", f"{float(d)!r}rad"), "ICRS")
        out_ra[i], out_dec[i] = m["m0"]["value"], m["m1"]["value"]
    return np.mod(out_ra, 2 * np.pi).reshape(ra.shape), out_dec.reshape(dec.shape)


def direction_to_icrs(ra, dec, measinfo, path, column, ref_codes=None):
    """Directions in the column's MEASINFO reference -> ICRS (radians).

    ``measinfo``: the column's MEASINFO keyword (or a reference name); with a
    ``VarRefCol`` the per-row reference codes ``ref_codes`` (that column's values)
    choose each row's frame among ``TabRefTypes``."""
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    if not isinstance(measinfo, dict):
        measinfo = {"Ref": measinfo}
    if "VarRefCol" in measinfo and ref_codes is not None:
        table = dict(zip((int(c) for c in measinfo["TabRefCodes"]),
                         (str(t).upper() for t in measinfo["TabRefTypes"]), strict=True))
        refs = np.array([table.get(int(c), "?") for c in np.asarray(ref_codes).ravel()])
        out_ra, out_dec = ra.copy(), dec.copy()
        for ref in np.unique(refs):
            m = refs == ref
            out_ra[m], out_dec[m] = _convert(ra[m], dec[m], ref, path, column)
        return out_ra, out_dec
    return _convert(ra, dec, str(measinfo.get("Ref") or "J2000").upper(), path, column)


def _history_mentions_pyuvdata(path):
    try:
        hist, _ = read_subtable(path, "HISTORY", ["APPLICATION"])
    except MSFormatError:
        return False
    return any("pyuvdata" in str(a).lower() for a in hist.get("APPLICATION", []))


def ms_conjugation(path, keywords, option="auto"):
    """(convention, why): ``"ms"`` or ``"pyuvdata"`` for the MS at ``path`` whose MAIN
    keywords are ``keywords``; ``option`` other than "auto" forces it."""
    if option not in CONJUGATIONS:
        raise ValueError(f"conjugation={option!r}: expected one of {CONJUGATIONS}")
    if option != "auto":
        return option, "requested"
    if "pyuvdata_flip_conj" in keywords:
        flip = bool(keywords["pyuvdata_flip_conj"])
        return ("ms" if flip else "pyuvdata"), f"pyuvdata_flip_conj={flip}"
    if _history_mentions_pyuvdata(path):
        return "pyuvdata", "written by pyuvdata 2.x (HISTORY), no pyuvdata_flip_conj"
    return "ms", "MS convention (no pyuvdata marks)"
