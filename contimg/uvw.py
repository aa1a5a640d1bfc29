"""Baseline coordinates (UVW) towards per-integration ICRS phase centres.

Convention (the contract's, and pyuvdata's): ``uvw = x2 - x1`` (antenna 2 minus
antenna 1), projected on a right-handed basis ``(u, v, w) = (east, north, source)``
whose ``w`` axis points at the *apparent* place of the phase centre (topocentric,
observed: precession-nutation, annual and diurnal aberration, light deflection, polar
motion; no refraction), rotated about ``w`` by the frame position angle so that ``v``
follows ICRS north. This is pyuvdata's computation for a sidereal ICRS phase centre
(``calc_app_coords`` + ``calc_frame_pos_angle`` + ``calc_uvw``), which is what the
DSA-110 UVH5 files and today's pipeline carry; ``tests/test_ms.py`` holds the two to
better than a millimetre on 3 km baselines (they agree to a few micrometres).

The computation is vectorised over integrations: three ERFA calls (``atco13`` for the
apparent places, ``atoc13`` for the frame position angle, ``gst06a`` for sidereal time)
each take all integrations at once; antenna positions are projected once per
integration and baselines are differences of projected antennas.

Earth orientation (UT1-UTC, polar motion) comes from astropy's bundled IERS tables,
offline (see :func:`contimg.runtime.astropy_offline`).
"""

from __future__ import annotations

import logging

import erfa
import numpy as np

from contimg.runtime import astropy_offline
from kernels.constants import ARCSEC

__all__ = ["compute_uvw", "phase_center_basis"]

log = logging.getLogger(__name__)

#: Offset (radians) in apparent declination used to find the ICRS-north direction at
#: the phase centre (the half degree pyuvdata uses for its frame position angle).
_NORTH_OFFSET = np.pi / 360.0


def _earth_orientation(times_unix):
    """(jd1, jd2, dut1, xp, yp) for UTC unix times, from astropy's offline IERS tables."""
    from astropy.time import Time
    from astropy.utils import iers

    astropy_offline()
    t = Time(np.asarray(times_unix, dtype=np.float64), format="unix", scale="utc")
    # Outside the bundled IERS range, use the table's edge values (as pyuvdata does);
    # UT1-UTC changes by < 1 ms a day, far below a millimetre on our baselines.
    dut1, status = t.get_delta_ut1_utc(return_status=True)
    dut1 = np.asarray(dut1, dtype=np.float64)
    if np.any(np.isin(status, (iers.TIME_BEFORE_IERS_RANGE, iers.TIME_BEYOND_IERS_RANGE))):
        log.warning(
            "times outside the IERS table range; UT1-UTC extrapolated")
    table = iers.earth_orientation_table.get()
    xp, yp = table.pm_xy(t)
    return (
        np.asarray(t.utc.jd1), np.asarray(t.utc.jd2), dut1,
        np.asarray(xp.to_value("arcsec")) * ARCSEC,
        np.asarray(yp.to_value("arcsec")) * ARCSEC,
    )


def _wrap_dec(ra, dec):
    """Fold (ra, dec) points pushed over a pole back onto the sphere."""
    over = dec > np.pi / 2
    under = dec < -np.pi / 2
    ra = np.where(over | under, ra + np.pi, ra)
    dec = np.where(over, np.pi - dec, np.where(under, -np.pi - dec, dec))
    return np.mod(ra, 2 * np.pi), dec


def phase_center_basis(times_unix, ra_icrs, dec_icrs, telescope_location):
    """Unit vectors (u, v, w) in ITRS for each integration, shape (ntime, 3, 3).

    ``basis[t, 0]`` is the u axis, ``basis[t, 1]`` v and ``basis[t, 2]`` w, so that
    ``uvw = basis[t] @ (x2 - x1)`` for ITRS antenna positions x1, x2.

    Steps (pyuvdata's definition, vectorised over integrations):

    1. apparent place of the phase centre: ERFA ``atco13`` (ICRS -> observed, no
       refraction) gives the CIO-based RA ``rob``, declination ``dob`` and the
       equation of the origins ``eo``; the Greenwich hour angle is
       ``GAST + s' - (rob - eo)``;
    2. w is the ITRS unit vector at that hour angle and declination, u points east
       and v north in the apparent frame;
    3. the frame position angle rotates (u, v) so that v follows ICRS north: the
       points half a degree north and south of the apparent place (in apparent
       declination) are taken back to ICRS (``atoc13``) and the position angle of
       the southern point towards the northern one (``erfa.pas``) is the rotation.
       (This is pyuvdata's ``calc_frame_pos_angle``; measured at the southern point
       rather than at the centre it differs from the local position angle by about
       ``0.5 deg * pa * tan(dec)``, a rotation of ~1e-4 rad near the pole of the sky
       and ~5e-5 rad at dec +55 deg. We keep it so that our MS and pyuvdata agree.)
    """
    times = np.atleast_1d(np.asarray(times_unix, dtype=np.float64))
    ra = np.broadcast_to(np.asarray(ra_icrs, dtype=np.float64), times.shape).copy()
    dec = np.broadcast_to(np.asarray(dec_icrs, dtype=np.float64), times.shape).copy()
    if times.ndim != 1:
        raise ValueError(f"times must be 1-d, got shape {times.shape}")
    loc = np.asarray(telescope_location, dtype=np.float64)
    if loc.shape != (3,) or not np.all(np.isfinite(loc)):
        raise ValueError(f"telescope_location must be 3 finite ITRF metres, got {loc!r}")
    lon, lat, height = erfa.gc2gd(1, loc)  # WGS84 geodetic

    jd1, jd2, dut1, xp, yp = _earth_orientation(times)
    zeros = np.zeros_like(ra)
    _aob, _zob, _hob, dob, rob, eo = erfa.atco13(
        ra, dec, zeros, zeros, zeros, zeros, jd1, jd2, dut1, lon, lat, height,
        xp, yp, 0.0, 0.0, 0.0, 0.0,
    )
    app_ra = np.mod(rob - eo, 2 * np.pi)

    # Greenwich apparent sidereal time plus the TIO locator s' (pyuvdata's LST minus
    # the longitude); Greenwich hour angle of the apparent place.
    ut1_1, ut1_2 = erfa.utcut1(jd1, jd2, dut1)
    tt_1, tt_2 = erfa.taitt(*erfa.utctai(jd1, jd2))
    gast = erfa.gst06a(ut1_1, ut1_2, tt_1, tt_2) + erfa.sp00(tt_1, tt_2)
    gha = gast - app_ra

    # frame position angle between apparent and ICRS north
    eps = _NORTH_OFFSET
    ra_up, dec_up = _wrap_dec(app_ra, dob + eps)
    ra_dn, dec_dn = _wrap_dec(app_ra, dob - eps)
    two = lambda a: np.concatenate([a, a])  # noqa: E731
    icrs_ra, icrs_dec = erfa.atoc13(
        "R", np.concatenate([ra_dn, ra_up]) + two(eo), np.concatenate([dec_dn, dec_up]),
        two(jd1), two(jd2), two(dut1), lon, lat, height, two(xp), two(yp),
        0.0, 0.0, 0.0, 0.0,
    )
    n = times.size
    pa = -erfa.pas(icrs_ra[:n], icrs_dec[:n], icrs_ra[n:], icrs_dec[n:])

    sh, ch = np.sin(gha), np.cos(gha)
    sd, cd = np.sin(dob), np.cos(dob)
    w = np.stack([cd * ch, -cd * sh, sd], axis=-1)
    east = np.stack([sh, ch, np.zeros_like(sh)], axis=-1)
    north = np.stack([-sd * ch, sd * sh, cd], axis=-1)
    cp, sp = np.cos(pa)[:, None], np.sin(pa)[:, None]
    u_axis = cp * east - sp * north
    v_axis = sp * east + cp * north
    return np.stack([u_axis, v_axis, w], axis=1)


def compute_uvw(antenna_positions_itrf, ant1, ant2, times_unix, ra_icrs, dec_icrs, *,
                telescope_location=None):
    """UVW (metres, ``x2 - x1``) of every (time, baseline) for per-time ICRS phase centres.

    Parameters
    ----------
    antenna_positions_itrf : (nant, 3) float
        Absolute ITRF/ECEF antenna positions, metres.
    ant1, ant2 : (nbl,) int
        Indices into ``antenna_positions_itrf`` of the two antennas of each baseline.
    times_unix : (ntime,) float
        UTC unix seconds of each integration.
    ra_icrs, dec_icrs : float or (ntime,) float
        ICRS phase centre of each integration, radians.
    telescope_location : (3,) float, optional
        ITRF position of the observatory (the topocentre for diurnal aberration);
        defaults to the mean antenna position.

    Returns
    -------
    (ntime, nbl, 3) float64
    """
    pos = np.asarray(antenna_positions_itrf, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"antenna_positions_itrf must have shape (nant, 3), got {pos.shape}")
    a1 = np.asarray(ant1, dtype=np.intp)
    a2 = np.asarray(ant2, dtype=np.intp)
    if a1.shape != a2.shape or a1.ndim != 1:
        raise ValueError("ant1 and ant2 must be 1-d arrays of the same length")
    if a1.size and (min(a1.min(), a2.min()) < 0 or max(a1.max(), a2.max()) >= pos.shape[0]):
        raise ValueError(f"antenna indices must lie in 0..{pos.shape[0] - 1}")
    loc = pos.mean(axis=0) if telescope_location is None else np.asarray(
        telescope_location, dtype=np.float64)
    basis = phase_center_basis(times_unix, ra_icrs, dec_icrs, loc)  # (T, 3, 3)
    rel = pos - loc  # small numbers: better rounding
    proj = np.einsum("tij,aj->tai", basis, rel)  # (T, nant, 3)
    return proj[:, a2, :] - proj[:, a1, :]
