"""Measure references of a Measurement Set turned into the contract's frames.

Directions (FIELD.PHASE_DIR, ...) -> ICRS.
"""

from __future__ import annotations

from contimg.io.ms.common import MSFormatError

__all__ = ["direction_to_icrs"]


def direction_to_icrs(ra, dec, measinfo, path, column):
    """Directions in the column's MEASINFO reference frame -> ICRS (radians)."""
    ref = (measinfo.get("Ref") if isinstance(measinfo, dict) else measinfo) or "J2000"
    ref = str(ref).upper()
    if ref == "ICRS":
        return ra, dec
    if ref == "J2000":
        from astropy import units as u
        from astropy.coordinates import FK5, SkyCoord

        c = SkyCoord(ra * u.rad, dec * u.rad, frame=FK5(equinox="J2000")).icrs
        return c.ra.rad, c.dec.rad
    raise MSFormatError(f"{path}: {column} uses the {ref} frame; only J2000/ICRS "
                        "directions can be represented in the contract")
