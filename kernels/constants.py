"""Physical and time constants shared by kernels, graphs and contimg (the one copy).

Plain Python floats, usable inside numba kernels (they become compile-time constants).
"""

from __future__ import annotations

import math

__all__ = [
    "SPEED_OF_LIGHT",
    "SECONDS_PER_DAY",
    "UNIX_JD0",
    "UNIX_MJD0",
    "MJD_UNIX_OFFSET_S",
    "SIDEREAL_DAY_S",
    "ARCSEC",
]

#: Speed of light in vacuum, m/s (exact, SI).
SPEED_OF_LIGHT = 299792458.0

#: Seconds in a (UTC, non-leap) day.
SECONDS_PER_DAY = 86400.0

#: Julian Date of the unix epoch 1970-01-01T00:00:00 UTC.
UNIX_JD0 = 2440587.5

#: Modified Julian Date of the unix epoch (MJD = JD - 2400000.5).
UNIX_MJD0 = 40587.0

#: MS TIME (MJD seconds, UTC) = unix seconds + this (= UNIX_MJD0 * SECONDS_PER_DAY).
MJD_UNIX_OFFSET_S = UNIX_MJD0 * SECONDS_PER_DAY

#: Mean sidereal day, SI seconds: a fixed direction's hour angle advances 2 pi in it.
SIDEREAL_DAY_S = 86164.0905

#: One arcsecond in radians.
ARCSEC = math.pi / (180.0 * 3600.0)
