"""Calibrator catalogue, spectra, transit finder and primary-beam response.

Built in: the Perley & Butler (2017, ApJS 230, 7) flux-density standards that are
compact at DSA-110's resolution (~20 arcsec at 1.4 GHz): 3C48, 3C138, 3C147, 3C196,
3C286, 3C295, 3C380 and 3C123, with their published polynomial spectra
``log10 S[Jy] = sum_k a_k log10(nu[GHz])^k`` (the coefficients CASA ships in
``PerleyButler2017Coeffs``, latest epoch) and J2000 positions from the VLA calibrator
manual. The very extended standards (Cyg A, Cas A, Tau A, Vir A, Her A, Hya A, ...)
are left out: they are not point sources for a 2 km array.

Loadable (:func:`load_catalog`):

* the VLA calibrator list text format (``1331+305   J2000  A 13h31m08.288060s
  30d30'32.958850"  Aug01  3C286`` followed by a band table with ``20cm    L  P P P P
  15.00``); the 20 cm flux is the reference flux at 1.4 GHz and the spectral index
  comes from the 20 cm and 6 cm (or 90 cm) fluxes when both are present, else -0.7;
* CSV with a header: ``name``, ``ra_deg`` (or ``ra``), ``dec_deg`` (or ``dec``),
  ``flux_jy`` (or ``flux``, ``flux_20cm_jy``), optional ``alpha`` (spectral index,
  default -0.7) and ``ref_freq_hz`` (default 1.4 GHz). ``ra``/``dec`` may also be
  sexagesimal (``13:31:08.29``, ``+30:30:33.0``);
* SQLite with a table ``calibrators`` (or ``sources``, or the only table) holding the
  same columns as the CSV.

Environment (operators' names): ``VLA_CATALOG`` (path of the catalogue to use
instead of the built-in one: SQLite or CSV, or the VLA list format),
``CAL_MATCH_RADIUS_DEG`` (largest |dec - pointing dec| of a match, default 1.5, half
the beam FWHM), ``CAL_MATCH_TOPN`` (keep the N brightest apparent matches, default
3), ``PIPELINE_POINTING_DEC_DEG`` (pointing declination when the data do not say).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import sqlite3
from dataclasses import dataclass, field

import numpy as np

from contimg import telescope as tel
from kernels.constants import SIDEREAL_DAY_S

log = logging.getLogger(__name__)


__all__ = [
    "Source", "Catalog", "Transit", "builtin_catalog", "load_catalog", "default_catalog",
    "find_transits", "apparent_flux", "beam_response", "match_radius_deg", "match_topn",
    "pointing_dec_deg",
]


@dataclass(frozen=True)
class Source:
    """A point source. Positions ICRS/J2000 radians; flux density in Jy.

    The spectrum is the Perley-Butler polynomial when ``coeffs`` is set
    (``log10 S = sum a_k log10(nu/GHz)^k``), otherwise a power law
    ``flux_jy * (nu / ref_freq_hz) ** alpha``.
    """

    name: str
    ra: float
    dec: float
    flux_jy: float = 0.0
    alpha: float = -0.7
    ref_freq_hz: float = 1.4e9
    coeffs: tuple = ()
    origin: str = "user"

    def flux(self, freq_hz):
        """Flux density (Jy) at ``freq_hz`` (scalar or array)."""
        f = np.asarray(freq_hz, float)
        if self.coeffs:
            x = np.log10(f / 1e9)
            return 10.0 ** np.polyval(self.coeffs[::-1], x)
        return self.flux_jy * (f / self.ref_freq_hz) ** self.alpha


# Perley & Butler 2017, latest-epoch coefficients (CASA's PerleyButler2017Coeffs).
_PB2017 = {
    "3C48": (1.3253, -0.7553, -0.1914, 0.0498),
    "3C138": (1.0088, -0.4981, -0.1552, -0.0102, 0.0223),
    "3C147": (1.4516, -0.6961, -0.2007, 0.0640, -0.0464, 0.0289),
    "3C196": (1.2872, -0.8530, -0.1534, -0.0200, 0.0201),
    "3C286": (1.2481, -0.4507, -0.1798, 0.0357),
    "3C295": (1.4701, -0.7658, -0.2780, -0.0347, 0.0399),
    "3C380": (1.2320, -0.7909, 0.0947, 0.0976, -0.1794, -0.1566),
    "3C123": (1.8017, -0.7884, -0.1035, -0.0248, 0.0090),
}
# J2000 positions (VLA calibrator manual).
_POS = {
    "3C48": ("01h37m41.2994s", "+33d09m35.133s"),
    "3C138": ("05h21m09.8860s", "+16d38m22.051s"),
    "3C147": ("05h42m36.1379s", "+49d51m07.234s"),
    "3C196": ("08h13m36.0561s", "+48d13m02.636s"),
    "3C286": ("13h31m08.2881s", "+30d30m32.959s"),
    "3C295": ("14h11m20.519s", "+52d12m09.97s"),
    "3C380": ("18h29m31.7809s", "+48d44m46.161s"),
    "3C123": ("04h37m04.3753s", "+29d40m13.819s"),
}


# ---------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------

_HMS = re.compile(r"^\s*([+-]?\d+)[h: ]\s*(\d+)[m: ]\s*([\d.]+)s?\s*$")
_DMS = re.compile(r"""^\s*([+-]?)(\d+)[d: ]\s*(\d+)['m: ]\s*([\d.]+)(?:"|s|'')?\s*$""")


def parse_ra(text) -> float:
    """Right ascension in radians from degrees (a number) or ``HHhMMmSS.ss``/``HH:MM:SS``."""
    if isinstance(text, (int, float, np.floating)):
        return math.radians(float(text))
    s = str(text).strip()
    m = _HMS.match(s)
    if m:
        h, mi, se = float(m.group(1)), float(m.group(2)), float(m.group(3))
        return math.radians(15.0 * (h + mi / 60 + se / 3600))
    try:
        return math.radians(float(s))
    except ValueError:
        raise ValueError(f"cannot parse right ascension {text!r}") from None


def parse_dec(text) -> float:
    """Declination in radians from degrees (a number) or ``+DDdMMmSS.s``/``DD:MM:SS``."""
    if isinstance(text, (int, float, np.floating)):
        return math.radians(float(text))
    s = str(text).strip()
    m = _DMS.match(s)
    if m:
        sign = -1.0 if m.group(1) == "-" else 1.0
        d, mi, se = float(m.group(2)), float(m.group(3)), float(m.group(4))
        return math.radians(sign * (d + mi / 60 + se / 3600))
    try:
        return math.radians(float(s))
    except ValueError:
        raise ValueError(f"cannot parse declination {text!r}") from None


@dataclass
class Catalog:
    """A list of :class:`Source` with lookup by name."""

    sources: list = field(default_factory=list)
    origin: str = ""

    def __len__(self):
        return len(self.sources)

    def __iter__(self):
        return iter(self.sources)

    def __getitem__(self, name):
        for s in self.sources:
            if s.name.upper() == str(name).upper():
                return s
        raise KeyError(f"{name}: not in catalogue {self.origin or ''}".strip())

    def names(self):
        return [s.name for s in self.sources]

    def __add__(self, other):
        return Catalog(list(self.sources) + list(other.sources),
                       origin=f"{self.origin}+{other.origin}")


def builtin_catalog() -> Catalog:
    """The Perley-Butler 2017 standards compact at DSA-110's resolution."""
    out = []
    for name, coeffs in _PB2017.items():
        ra, dec = _POS[name]
        src = Source(name=name, ra=parse_ra(ra), dec=parse_dec(dec), coeffs=coeffs,
                     origin="Perley & Butler 2017")
        out.append(Source(name=name, ra=src.ra, dec=src.dec,
                          flux_jy=float(src.flux(1.4e9)), alpha=float(np.log(
                              src.flux(1.5e9) / src.flux(1.3e9)) / np.log(1.5 / 1.3)),
                          coeffs=coeffs, origin="Perley & Butler 2017"))
    return Catalog(out, origin="builtin:PB2017")


def _row_source(row: dict, where: str) -> Source:
    low = {str(k).strip().lower(): v for k, v in row.items() if k is not None}

    def pick(*names, required=True, default=None):
        for n in names:
            if n in low and low[n] not in (None, ""):
                return low[n]
        if required:
            raise ValueError(f"{where}: missing column {names[0]!r} (also accepted: "
                             f"{', '.join(names[1:]) or 'none'})")
        return default

    name = str(pick("name", "source", "id"))
    ra = pick("ra_deg", "ra")
    dec = pick("dec_deg", "dec")
    try:
        ra_r = parse_ra(float(ra)) if _is_number(ra) else parse_ra(ra)
        dec_r = parse_dec(float(dec)) if _is_number(dec) else parse_dec(dec)
        flux = float(pick("flux_jy", "flux", "flux_20cm_jy", "s1400", "flux_1400_jy"))
        alpha = float(pick("alpha", "spectral_index", "spindex", required=False,
                           default=-0.7))
        ref = float(pick("ref_freq_hz", "ref_freq", required=False, default=1.4e9))
    except ValueError as exc:
        raise ValueError(f"{where}: source {name!r}: {exc}") from None
    if not (flux > 0 and math.isfinite(flux)):
        raise ValueError(f"{where}: source {name!r}: flux must be > 0, got {flux}")
    return Source(name=name, ra=ra_r, dec=dec_r, flux_jy=flux, alpha=alpha,
                  ref_freq_hz=ref, origin=where)


def _is_number(x):
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def load_csv(path) -> Catalog:
    """Read a CSV catalogue (see the module docstring for the columns)."""
    path = os.fspath(path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: no sources (empty CSV or header only)")
    return Catalog([_row_source(r, f"{path} line {i + 2}") for i, r in enumerate(rows)],
                   origin=path)


def load_sqlite(path, table=None) -> Catalog:
    """Read a SQLite catalogue: table ``calibrators``/``sources`` (or the only table)."""
    path = os.fspath(path)
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        con.row_factory = sqlite3.Row
        tables = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")]
        if table is None:
            for cand in ("calibrators", "sources", "vla_calibrators", "catalog"):
                if cand in tables:
                    table = cand
                    break
            else:
                if len(tables) == 1:
                    table = tables[0]
                else:
                    raise ValueError(f"{path}: no table 'calibrators' or 'sources' "
                                     f"(tables: {tables})")
        if table not in tables:
            raise ValueError(f"{path}: no table {table!r} (tables: {tables})")
        rows = [dict(r) for r in con.execute(f'SELECT * FROM "{table}"')]
    finally:
        con.close()
    if not rows:
        raise ValueError(f"{path}: table {table!r} is empty")
    return Catalog([_row_source(r, f"{path}:{table} row {i + 1}")
                    for i, r in enumerate(rows)], origin=path)


_VLA_HEAD = re.compile(
    r"^(\S+)\s+J2000\s+\S+\s+(\d+h\d+m[\d.]+s)\s+([+-]?\d+d\d+'[\d.]+\")\s*(.*)$")
_VLA_BAND = re.compile(r"^\s*(\d+(?:\.\d+)?)(cm|mm)\s+(\S+)\s+(?:[A-Z?]\s+){4}\s*([\d.]+)")


def load_vla_list(path) -> Catalog:
    """Read the VLA calibrator list text format (J2000 entries, band fluxes)."""
    path = os.fspath(path)
    out = []
    cur = None
    bands = {}

    def close():
        if cur is None:
            return
        name, ra, dec = cur
        f20 = bands.get(20.0)
        if f20 is None:
            log.debug("%s: %s has no 20 cm flux; skipped", path, name)
            return
        alpha = -0.7
        for lam in (6.0, 90.0):
            if lam in bands and bands[lam] > 0:
                nu_other = tel.SPEED_OF_LIGHT / (lam / 100)
                alpha = math.log(bands[lam] / f20) / math.log(nu_other / 1.4e9)
                break
        out.append(Source(name=name, ra=parse_ra(ra), dec=parse_dec(dec), flux_jy=f20,
                          alpha=alpha, origin=path))

    with open(path, errors="replace") as fh:
        for line in fh:
            m = _VLA_HEAD.match(line.strip())
            if m:
                close()
                alt = m.group(4).split()
                name = m.group(1)
                if alt and not re.match(r"^[A-Z][a-z]{2}\d{2}$", alt[-1]):
                    name = alt[-1]  # a common name (3C286) beats the IAU one
                cur = (name, m.group(2), m.group(3).replace("'", "m").replace('"', "s"))
                bands = {}
                continue
            b = _VLA_BAND.match(line)
            if b and cur is not None:
                lam = float(b.group(1)) / (10.0 if b.group(2) == "mm" else 1.0)
                try:
                    bands[lam] = float(b.group(4))
                except ValueError:
                    pass
    close()
    if not out:
        raise ValueError(f"{path}: no J2000 entries with a 20 cm flux (not a VLA "
                         "calibrator list?)")
    return Catalog(out, origin=path)


def load_catalog(path) -> Catalog:
    """Load a user catalogue: SQLite, CSV or the VLA calibrator list (by content)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: calibrator catalogue not found")
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith(b"SQLite format 3"):
        return load_sqlite(path)
    text = head.decode("utf-8", "replace")
    if "J2000" in text and re.search(r"\d+h\d+m", text):
        return load_vla_list(path)
    return load_csv(path)


def default_catalog(catalog=None) -> Catalog:
    """Resolve a catalogue argument: a Catalog, a path, a list of Sources, or None
    (the configured ``[calibrate] catalog``, i.e. ``$VLA_CATALOG``, if set, else the
    built-in Perley-Butler list)."""
    if isinstance(catalog, Catalog):
        return catalog
    if catalog is None:
        path = _config().catalog
        return builtin_catalog() if path is None else load_catalog(path)
    if isinstance(catalog, (str, os.PathLike)):
        return load_catalog(catalog)
    return Catalog(list(catalog), origin="list")


def _config():
    from contimg.config import current

    return current().calibrate


def match_radius_deg() -> float:
    """The configured match radius (``$CAL_MATCH_RADIUS_DEG``; 1.5 deg, half the beam
    FWHM, by default)."""
    return _config().match_radius_deg


def match_topn() -> int:
    """The configured number of matches kept (``$CAL_MATCH_TOPN``; 3 by default)."""
    return _config().match_topn


def pointing_dec_deg(default=None):
    """The configured pointing declination (``$PIPELINE_POINTING_DEC_DEG``, degrees) or
    ``default``."""
    v = _config().pointing_dec_deg
    return default if v is None else v


# ---------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------

def separation(ra0, dec0, ra, dec):
    """Great-circle separation (radians); broadcasts."""
    s = (np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(ra - ra0))
    return np.arccos(np.clip(s, -1.0, 1.0))


def beam_response(ra0, dec0, ra, dec, freq_hz):
    """Primary-beam power response (Airy, 4.65 m) of sources at ``(ra, dec)`` for
    pointings ``(ra0, dec0)`` (ntime,) at ``freq_hz`` (nchan,): (ntime, nsrc, nchan)."""
    sep = separation(np.asarray(ra0, float)[:, None], np.asarray(dec0, float)[:, None],
                     np.asarray(ra, float)[None, :], np.asarray(dec, float)[None, :])
    return tel.airy_beam(sep[..., None], np.asarray(freq_hz, float)[None, None, :])


def apparent_flux(sources, ra0, dec0, freq_hz):
    """(ntime, nsrc, nchan) flux seen through the primary beam: spectrum x beam."""
    freq_hz = np.asarray(freq_hz, float)
    spec = np.stack([s.flux(freq_hz) for s in sources]) if sources else np.zeros((0, freq_hz.size))
    beam = beam_response(ra0, dec0, [s.ra for s in sources], [s.dec for s in sources],
                         freq_hz)
    return spec[None] * beam


@dataclass
class Transit:
    """A calibrator crossing the meridian near the pointing declination."""

    source: Source
    t_transit: float              # unix seconds of meridian crossing
    dec_offset_deg: float         # source dec - pointing dec
    peak_response: float          # beam power response at transit (at 1.4 GHz)
    apparent_flux_jy: float       # flux x peak response at 1.4 GHz
    integration: int | None = None  # index of the nearest integration of the data
    in_data: bool = False         # transit falls inside the data's time range
    response: np.ndarray | None = None  # (ntime,) beam response per integration, 1.4 GHz
    group_index: int | None = None  # group of a time grid (see find_transits)

    @property
    def name(self):
        return self.source.name

    def as_dict(self):
        return dict(name=self.name, ra_deg=math.degrees(self.source.ra),
                    dec_deg=math.degrees(self.source.dec), t_transit=self.t_transit,
                    dec_offset_deg=self.dec_offset_deg, peak_response=self.peak_response,
                    apparent_flux_jy=self.apparent_flux_jy, integration=self.integration,
                    in_data=self.in_data, group_index=self.group_index)


def meridian_ra_icrs(times_unix, dec_rad=None):
    """ICRS right ascension of the local meridian (HA = 0) at OVRO at unix times.

    Apparent sidereal time, rotated from the true equator and equinox of date to ICRS
    with astropy (offline), at the given declination (default the pointing)."""
    from astropy import units as u
    from astropy.coordinates import ICRS, TETE, EarthLocation
    from astropy.time import Time

    from contimg.runtime import astropy_offline

    astropy_offline()
    t = Time(np.atleast_1d(np.asarray(times_unix, float)), format="unix", scale="utc")
    loc = EarthLocation.from_geodetic(tel.SITE_LON_DEG * u.deg, tel.SITE_LAT_DEG * u.deg,
                                      tel.SITE_ALT_M * u.m)
    lst = t.sidereal_time("apparent", longitude=loc.lon)
    dec = np.radians(tel.DEFAULT_DEC_DEG) if dec_rad is None else dec_rad
    app = TETE(ra=lst, dec=np.broadcast_to(dec, lst.shape) * u.rad, obstime=t)
    icrs = app.transform_to(ICRS())
    return icrs.ra.rad, icrs.dec.rad


def find_transits(catalog=None, *, times_unix=None, ra0=None, dec0=None, start=None,
                  end=None, dec_deg=None, radius_deg=None, topn=None, freq_hz=1.4e9,
                  group_start=None, group_length_s=None):
    """Calibrators that cross the meridian inside the primary beam.

    Two ways to ask:

    * for data: ``times_unix`` (ntime,) with the data's per-integration meridian
      phase centres ``ra0, dec0`` (ICRS radians). A transit is *in the data* when the
      source's RA lies inside the phase centres' RA span (half an integration of
      margin each side); its time is interpolated between the phase centres. The
      beam response at each integration is returned.
    * for a time range: ``start, end`` (unix) at ``dec_deg`` (default
      ``$PIPELINE_POINTING_DEC_DEG``, else 54.57); transit times come from the
      meridian's ICRS RA (astropy, offline). With ``group_start`` and
      ``group_length_s`` each transit gets the index of the group it falls in.

    Matches need ``|dec - pointing dec| <= radius_deg`` (``$CAL_MATCH_RADIUS_DEG``,
    1.5); the ``topn`` (``$CAL_MATCH_TOPN``, 3) brightest by apparent flux are kept,
    sorted brightest first.
    """
    cat = default_catalog(catalog)
    radius = match_radius_deg() if radius_deg is None else float(radius_deg)
    topn = match_topn() if topn is None else int(topn)
    out = []
    if times_unix is not None:
        times = np.asarray(times_unix, float)
        ra0 = np.unwrap(np.asarray(ra0, float))
        dec0 = np.asarray(dec0, float)
        pdec = float(np.median(dec0))
        dt = float(np.median(np.diff(times))) if times.size > 1 else tel.INTEGRATION_S
        rate = (ra0[-1] - ra0[0]) / (times[-1] - times[0]) if times.size > 1 else \
            2 * np.pi / SIDEREAL_DAY_S
        for s in cat:
            ddec = math.degrees(s.dec - pdec)
            if abs(ddec) > radius:
                continue
            # RA of the source relative to the first phase centre, in (-pi, pi]
            dra = (s.ra - ra0[0] + np.pi) % (2 * np.pi) - np.pi
            t_tr = times[0] + dra / rate
            lo, hi = times[0] - 0.5 * dt, times[-1] + 0.5 * dt
            resp = beam_response(ra0, dec0, [s.ra], [s.dec], [freq_hz])[:, 0, 0]
            peak = float(tel.airy_beam(abs(s.dec - pdec), freq_hz))
            out.append(Transit(source=s, t_transit=float(t_tr), dec_offset_deg=ddec,
                               peak_response=peak,
                               apparent_flux_jy=float(s.flux(freq_hz)) * peak,
                               integration=int(np.abs(times - t_tr).argmin()),
                               in_data=bool(lo <= t_tr <= hi), response=resp))
        out = [t for t in out if t.in_data]
    else:
        if start is None or end is None:
            raise ValueError("give either times_unix with ra0/dec0, or start and end")
        pdec_deg = dec_deg if dec_deg is not None else pointing_dec_deg(tel.DEFAULT_DEC_DEG)
        pdec = math.radians(pdec_deg)
        ra_s, _ = meridian_ra_icrs([start], pdec)
        rate = 2 * np.pi / SIDEREAL_DAY_S
        for s in cat:
            ddec = math.degrees(s.dec) - pdec_deg
            if abs(ddec) > radius:
                continue
            dra = (s.ra - ra_s[0]) % (2 * np.pi)
            t = start + dra / rate
            # refine once with the exact meridian RA at the estimate
            while t <= end:
                ra_t, _ = meridian_ra_icrs([t], pdec)
                t_ref = t + (((s.ra - ra_t[0] + np.pi) % (2 * np.pi)) - np.pi) / rate
                if start <= t_ref <= end:
                    peak = float(tel.airy_beam(abs(s.dec - pdec), freq_hz))
                    gi = (int((t_ref - group_start) // group_length_s)
                          if group_start is not None and group_length_s else None)
                    out.append(Transit(source=s, t_transit=float(t_ref), dec_offset_deg=ddec,
                                       peak_response=peak,
                                       apparent_flux_jy=float(s.flux(freq_hz)) * peak,
                                       group_index=gi))
                t += SIDEREAL_DAY_S
        out.sort(key=lambda tr: tr.t_transit)
        return out
    out.sort(key=lambda tr: -tr.apparent_flux_jy)
    return out[:topn]
