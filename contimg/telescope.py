"""DSA-110 facts: site, dish, band, integration, subband naming, and a simulated layout.

Real files carry their own antenna positions, frequencies and times, and the reader
always uses those; the constants here describe the telescope for the simulator, the
group finder and for defaults.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass

import numpy as np

from kernels.constants import SPEED_OF_LIGHT  # noqa: F401  (tel.SPEED_OF_LIGHT)

# --- site (OVRO) -------------------------------------------------------------------
SITE_LAT_DEG = 37.2314
SITE_LON_DEG = -118.2817
SITE_ALT_M = 1222.0
TELESCOPE_NAME = "DSA-110"

# --- dishes ------------------------------------------------------------------------
DISH_DIAMETER_M = 4.65
MOUNT = "alt-az"
N_STATIONS = 117
N_CORRELATED = 96

# --- band --------------------------------------------------------------------------
N_SUBBANDS = 16
N_CHAN_PER_SUBBAND = 48
CHANNEL_WIDTH_HZ = 244140.625
TOP_CHANNEL_HZ = 1498643188.4765625  # centre of channel 0 of sb00 (highest)

# --- time --------------------------------------------------------------------------
N_INTEGRATIONS = 24
INTEGRATION_S = 12.884902
GROUP_TOLERANCE_S = 60.0  # the 16 files of one group differ by up to +-60 s

POLARIZATIONS = ("XX", "YY")
POL_AIPS = {"XX": -5, "YY": -6, "XY": -7, "YX": -8, "RR": -1, "LL": -2, "RL": -3,
            "LR": -4, "I": 1, "Q": 2, "U": 3, "V": 4}
AIPS_POL = {v: k for k, v in POL_AIPS.items()}

DEFAULT_DEC_DEG = 54.57

_NAME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})_sb(\d{2})\.hdf5$", re.ASCII)


def subband_frequencies(sb: int, nchan: int = N_CHAN_PER_SUBBAND) -> np.ndarray:
    """Channel centres of subband ``sb`` in file order (descending, as DSA-110 writes).

    With fewer than 48 channels the subband keeps its band edges and the channels get
    wider (``subband_channel_width``), as if the correlator had averaged them.
    """
    width = subband_channel_width(nchan)
    top_edge = TOP_CHANNEL_HZ + 0.5 * CHANNEL_WIDTH_HZ
    return top_edge - (sb * nchan + np.arange(nchan) + 0.5) * width


def subband_channel_width(nchan: int = N_CHAN_PER_SUBBAND) -> float:
    return CHANNEL_WIDTH_HZ * N_CHAN_PER_SUBBAND / nchan


def subband_filename(timestamp: _dt.datetime | str, sb: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS_sbNN.hdf5``."""
    if isinstance(timestamp, _dt.datetime):
        timestamp = timestamp.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{timestamp}_sb{sb:02d}.hdf5"


@dataclass(frozen=True)
class SubbandName:
    timestamp: _dt.datetime
    subband: int

    @property
    def stamp(self) -> str:
        return self.timestamp.strftime("%Y-%m-%dT%H:%M:%S")


def parse_subband_filename(name: str) -> SubbandName:
    """Parse a DSA-110 subband file name; raise ValueError naming what is wrong."""
    import os

    base = os.path.basename(str(name))
    m = _NAME_RE.match(base)
    if not m:
        raise ValueError(
            f"{name}: not a DSA-110 subband file name "
            "(expected YYYY-MM-DDTHH:MM:SS_sbNN.hdf5)"
        )
    try:
        ts = _dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
    except ValueError as exc:
        raise ValueError(f"{name}: bad timestamp in file name ({exc})") from None
    sb = int(m.group(2))
    if not 0 <= sb < N_SUBBANDS:
        raise ValueError(f"{name}: subband {sb:02d} out of range 00..{N_SUBBANDS - 1:02d}")
    return SubbandName(ts, sb)


def site_itrf() -> np.ndarray:
    """ITRF (ECEF, WGS84) position of the array centre, metres."""
    from astropy import units as u
    from astropy.coordinates import EarthLocation

    loc = EarthLocation.from_geodetic(SITE_LON_DEG * u.deg, SITE_LAT_DEG * u.deg,
                                      SITE_ALT_M * u.m)
    return np.array([loc.x.to_value(u.m), loc.y.to_value(u.m), loc.z.to_value(u.m)])


def enu_to_ecef_rotation(lat_rad: float, lon_rad: float) -> np.ndarray:
    """Matrix R such that ``ecef_offset = R @ enu``."""
    sl, cl = np.sin(lat_rad), np.cos(lat_rad)
    so, co = np.sin(lon_rad), np.cos(lon_rad)
    return np.array([
        [-so, -sl * co, cl * co],
        [co, -sl * so, cl * so],
        [0.0, cl, sl],
    ])


def t_layout_enu(seed: int = 110) -> tuple[np.ndarray, list[str]]:
    """A procedural DSA-110-like T layout: (117, 3) ENU metres and station names.

    51 dishes on an east-west line 0-400 m, 51 on a north-south line 0-440 m that
    starts at the middle of the east-west line, and 15 outriggers out to ~2 km. Small
    deterministic jitter keeps baselines from being exactly redundant.
    """
    rng = np.random.default_rng(seed)
    ew = np.zeros((51, 3))
    ew[:, 0] = np.linspace(-200.0, 200.0, 51)
    ns = np.zeros((51, 3))
    ns[:, 1] = np.linspace(440.0 / 51, 440.0, 51)
    ang = np.linspace(0, 2 * np.pi, 15, endpoint=False) + 0.3
    rad = np.linspace(600.0, 2000.0, 15)
    out = np.stack([rad * np.cos(ang), rad * np.sin(ang), np.zeros(15)], axis=1)
    enu = np.concatenate([ew, ns, out])
    enu[:, :2] += rng.normal(scale=0.3, size=(enu.shape[0], 2))
    enu[:, 2] += rng.normal(scale=0.5, size=enu.shape[0])
    names = [f"pad{i + 1}" for i in range(enu.shape[0])]
    return enu, names


def correlated_subset(n: int = N_CORRELATED) -> np.ndarray:
    """Indices (into the 117 stations) of the ``n`` correlated antennas.

    Spread over the EW arm, the NS arm and the outriggers in the telescope's
    proportions (of 117: 51/51/15), so that a shrunken array keeps its shape.
    """
    groups = [np.arange(0, 51), np.arange(51, 102), np.arange(102, 117)]
    if n >= N_STATIONS:
        return np.arange(N_STATIONS)
    counts = [round(n * 51 / 117), round(n * 51 / 117)]
    counts.append(max(n - sum(counts), 0))
    idx = []
    for g, c in zip(groups, counts):
        c = min(c, g.size)
        idx.append(g[np.round(np.linspace(0, g.size - 1, c)).astype(int)] if c else g[:0])
    sel = np.unique(np.concatenate(idx))
    # fill from unused stations if rounding left us short
    if sel.size < n:
        rest = np.setdiff1d(np.arange(N_STATIONS), sel)
        sel = np.sort(np.concatenate([sel, rest[: n - sel.size]]))
    return sel[:n]


def airy_beam(sep_rad: np.ndarray, freq_hz: np.ndarray,
              diameter: float = DISH_DIAMETER_M) -> np.ndarray:
    """Power response of a uniformly illuminated dish, ``(2 J1(x)/x)**2``.

    ``sep_rad`` and ``freq_hz`` broadcast; x = pi D sin(sep) / lambda.
    """
    from scipy.special import j1

    x = np.pi * diameter * np.sin(np.asarray(sep_rad)) * np.asarray(freq_hz) / SPEED_OF_LIGHT
    x = np.asarray(x, dtype=float)
    out = np.ones_like(x)
    nz = np.abs(x) > 1e-12
    out[nz] = (2.0 * j1(x[nz]) / x[nz]) ** 2
    return out
