"""Field and scan geometry of visibility data, and the calibrators each scan observes.

Two kinds of observation reach the calibrator search:

* a **drift scan** (DSA-110: the telescope stays put and every integration has its own
  meridian phase centre -- one FIELD per integration in our MSs): a calibrator is
  observed when it *transits* inside the beam during the data
  (:func:`contimg.sky.find_transits`, unchanged);
* **pointed (tracked) scans** (any other telescope, CASA's simulator, ``split`` or
  ``importuvfits`` output): consecutive integrations with one phase centre. A
  catalogue source within the primary beam of a pointed scan (its half-power radius,
  ``0.514 lambda / D`` for the data's dish diameter at the data's mean frequency,
  unless a radius is given) is "in the beam" for the whole scan; its "transit" time is
  the middle of the scan.

:func:`scans` splits the integrations into scans; :func:`find_field_calibrators` lists
the calibrators observed (brightest apparent flux first), each as a
:class:`FieldTransit` that names its field and the integrations of its scans;
:func:`no_calibrator_message` explains an empty result, naming the fields and the
nearest catalogue source. :func:`ms_geometry` reads what this needs from an MS without
reading its data.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

from contimg import sky as _sky
from contimg import telescope as tel

log = logging.getLogger(__name__)

__all__ = ["Scan", "FieldTransit", "Geometry", "scans", "ms_geometry", "dataset_geometry",
           "utc_time", "DishBeamSource", "through_own_beam",
           "beam_radius_deg", "find_field_calibrators", "no_calibrator_message"]

#: Airy half-power radius in units of lambda / D
_HWHM = 0.5145
#: phase centres equal within this (rad) belong to one pointing
_SAME_DIR = 1e-7


@dataclass
class Scan:
    """Consecutive integrations of one field (pointed) or the whole drift."""

    kind: str                     # "pointed" or "drift"
    field_id: int | None
    field_name: str
    ra: float                     # phase centre (ICRS rad; a drift: its middle integration)
    dec: float
    index: np.ndarray             # integration indices (into the data's times)
    t_start: float                # unix seconds, first and last integration
    t_end: float

    def describe(self):
        import datetime as dt

        def hms(t):
            return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%H:%M:%S")

        name = (f"field {self.field_id} {self.field_name!r}" if self.field_id is not None
                else f"pointing {self.field_name!r}" if self.field_name else "pointing")
        return (f"{name} ({math.degrees(self.ra):.4f}, {math.degrees(self.dec):+.4f} deg; "
                f"{self.kind} {hms(self.t_start)}-{hms(self.t_end)} UTC)")


@dataclass
class FieldTransit(_sky.Transit):
    """A calibrator observed by the data: a :class:`contimg.sky.Transit` that also names
    its field and the integrations in which it is in the beam (``index``)."""

    field_id: int | None = None
    field_name: str = ""
    kind: str = "drift"
    index: np.ndarray | None = None
    separation_deg: float = 0.0    # from the pointed scan's phase centre

    def as_dict(self):
        d = super().as_dict()
        d.update(field_id=self.field_id, field_name=self.field_name, kind=self.kind,
                 separation_deg=self.separation_deg,
                 n_integrations=None if self.index is None else int(len(self.index)))
        return d


@dataclass
class Geometry:
    """What the search needs: per-integration times, phase centres and FIELD ids."""

    times: np.ndarray             # (ntime,) unix seconds, ascending
    ra: np.ndarray                # (ntime,) ICRS rad
    dec: np.ndarray
    field_id: np.ndarray | None = None   # (ntime,) FIELD ids, when known
    field_names: dict = field(default_factory=dict)   # id -> name
    dish_diameter_m: float = tel.DISH_DIAMETER_M
    freq_hz: float = 1.4e9
    source: str = "the data"      # for messages (the MS path)


def beam_radius_deg(dish_diameter_m, freq_hz):
    """Half-power radius (deg) of an Airy beam of a dish at ``freq_hz``."""
    return math.degrees(_HWHM * tel.SPEED_OF_LIGHT / float(freq_hz) / float(dish_diameter_m))


def scans(geom: Geometry):
    """The scans of ``geom``: runs of consecutive integrations of one field and one
    phase centre. When every run is a single integration and the phase centres move
    (one FIELD per integration, as DSA-110 drift scans are written), the whole data are
    one drift scan."""
    t, ra, dec = geom.times, geom.ra, geom.dec
    n = t.size
    if n == 0:
        return []
    fid = geom.field_id
    brk = np.zeros(n, bool)
    brk[0] = True
    if n > 1:
        moved = (np.abs(np.diff(np.unwrap(ra))) * np.cos(dec[1:]) > _SAME_DIR) | (
            np.abs(np.diff(dec)) > _SAME_DIR)
        brk[1:] = moved
        if fid is not None:
            brk[1:] |= fid[1:] != fid[:-1]
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], n)
    if n > 1 and starts.size == n and _drifts(ra, dec):
        mid = n // 2
        return [Scan("drift", None, "", float(ra[mid]), float(dec[mid]), np.arange(n),
                     float(t[0]), float(t[-1]))]
    out = []
    for s, e in zip(starts, ends):
        f = None if fid is None else int(fid[s])
        name = geom.field_names.get(f, "") if f is not None else ""
        out.append(Scan("pointed", f, name, float(ra[s]), float(dec[s]), np.arange(s, e),
                        float(t[s]), float(t[e - 1])))
    return out


def _drifts(ra, dec):
    """Phase centres that move steadily in RA at one declination (a drift scan)."""
    dra = np.diff(np.unwrap(ra))
    return bool((np.all(dra > 0) or np.all(dra < 0)) and np.ptp(dec) < 1e-3)


def dataset_geometry(ds, *, field_id=None, field_names=None, source="the data"):
    """:class:`Geometry` of a contract Dataset (``time``, ``PHASE_CENTER_RA/DEC``,
    ``ANTENNA_DISH_DIAMETER`` and ``frequency`` when present)."""
    dish = tel.DISH_DIAMETER_M
    if "ANTENNA_DISH_DIAMETER" in ds:
        d = np.asarray(ds.ANTENNA_DISH_DIAMETER.values, float)
        d = d[np.isfinite(d) & (d > 0)]
        if d.size:
            dish = float(np.median(d))
    freq = float(np.mean(ds.frequency.values)) if "frequency" in ds.coords else 1.4e9
    return Geometry(times=np.asarray(ds.time.values, float),
                    ra=np.asarray(ds.PHASE_CENTER_RA.values, float),
                    dec=np.asarray(ds.PHASE_CENTER_DEC.values, float),
                    field_id=None if field_id is None else np.asarray(field_id, int),
                    field_names=dict(field_names or {}), dish_diameter_m=dish, freq_hz=freq,
                    source=ds.attrs.get("ms_path", source))


def utc_time(tb, path):
    """MAIN's TIME (MJD seconds) in UTC, converted from its measure reference (TAI, ...)
    as :func:`contimg.io.ms.open_ms` does when the reader knows how."""
    time = tb.getcol("TIME")
    try:
        from contimg.io.ms.measures import time_to_utc
    except ImportError:                  # a reader that takes TIME as UTC
        return time
    return time_to_utc(time, tb.getcolkeywords("TIME").get("MEASINFO", {}), path)


def ms_geometry(ms_path, field_ids=None):
    """:class:`Geometry` of an MS from TIME, FIELD_ID, FIELD, ANTENNA and
    SPECTRAL_WINDOW (no data read); ``field_ids`` restricts it to those fields."""
    from casacore import tables as ct

    from contimg.io.ms import ms_fields
    from kernels.constants import MJD_UNIX_OFFSET_S

    ms_path = os.fspath(ms_path)
    if not os.path.isfile(os.path.join(ms_path, "table.dat")):
        raise FileNotFoundError(f"{ms_path}: not a Measurement Set (no table.dat)")
    with ct.table(ms_path, ack=False) as tb:
        time = utc_time(tb, ms_path)
        fid = tb.getcol("FIELD_ID")
    if field_ids is not None:
        keep = np.isin(fid, np.asarray(list(field_ids), int))
        time, fid = time[keep], fid[keep]
    fields = ms_fields(ms_path)
    ut, first = np.unique(time, return_index=True)
    f = fid[first].astype(int)
    ra = np.array([fields[i]["ra"] for i in f], float)
    dec = np.array([fields[i]["dec"] for i in f], float)
    with ct.table(os.path.join(ms_path, "ANTENNA"), ack=False) as t:
        dish = t.getcol("DISH_DIAMETER") if "DISH_DIAMETER" in t.colnames() else []
    dish = np.asarray(dish, float)
    dish = dish[np.isfinite(dish) & (dish > 0)]
    with ct.table(os.path.join(ms_path, "SPECTRAL_WINDOW"), ack=False) as t:
        freq = float(np.mean(t.getcell("CHAN_FREQ", 0)))
    return Geometry(times=ut - MJD_UNIX_OFFSET_S, ra=ra, dec=dec, field_id=f,
                    field_names={d["id"]: d["name"] for d in fields},
                    dish_diameter_m=float(np.median(dish)) if dish.size else
                    tel.DISH_DIAMETER_M, freq_hz=freq, source=ms_path)


def _pointed_matches(cat, sc, geom, radius, freq_hz):
    out = []
    for s in cat:
        sep = float(_sky.separation(sc.ra, sc.dec, s.ra, s.dec))
        if math.degrees(sep) > radius:
            continue
        peak = float(tel.airy_beam(sep, geom.freq_hz, geom.dish_diameter_m))
        resp = np.zeros(geom.times.size)
        resp[sc.index] = peak
        out.append(FieldTransit(
            source=s, t_transit=0.5 * (sc.t_start + sc.t_end),
            dec_offset_deg=math.degrees(s.dec - sc.dec), peak_response=peak,
            apparent_flux_jy=float(s.flux(freq_hz)) * peak,
            integration=int(sc.index[len(sc.index) // 2]), in_data=True, response=resp,
            field_id=sc.field_id, field_name=sc.field_name, kind="pointed",
            index=np.asarray(sc.index), separation_deg=math.degrees(sep)))
    return out


def find_field_calibrators(geom: Geometry, catalog=None, *, radius_deg=None, topn=None,
                           freq_hz=1.4e9):
    """Calibrators the data observe, brightest apparent flux (at ``freq_hz``) first.

    Drift scans: :func:`contimg.sky.find_transits` on the drift's integrations (radius
    ``radius_deg`` or ``$CAL_MATCH_RADIUS_DEG`` in declination). Pointed scans: catalogue
    sources within ``radius_deg`` (default: the primary beam's half-power radius) of
    the scan's phase centre; a source seen in several scans of the same field is one
    :class:`FieldTransit` whose ``index`` holds all their integrations. The ``topn``
    (``$CAL_MATCH_TOPN``) brightest are kept.
    """
    cat = _sky.default_catalog(catalog)
    topn = _sky.match_topn() if topn is None else int(topn)
    out = []
    for sc in scans(geom):
        if sc.kind == "drift":
            idx = sc.index
            for tr in _sky.find_transits(cat, times_unix=geom.times[idx], ra0=geom.ra[idx],
                                         dec0=geom.dec[idx], radius_deg=radius_deg,
                                         topn=len(cat), freq_hz=freq_hz):
                out.append(FieldTransit(**{k: getattr(tr, k) for k in (
                    "source", "t_transit", "dec_offset_deg", "peak_response",
                    "apparent_flux_jy", "integration", "in_data", "response",
                    "group_index")}, kind="drift", index=np.asarray(idx)))
            continue
        radius = (beam_radius_deg(geom.dish_diameter_m, geom.freq_hz)
                  if radius_deg is None else float(radius_deg))
        out.extend(_pointed_matches(cat, sc, geom, radius, freq_hz))
    # one entry per (source, field): merge the scans of a field that see a source
    merged = {}
    for tr in out:
        key = (tr.name, tr.field_id if tr.kind == "pointed" else None, tr.kind)
        if key in merged:
            m = merged[key]
            m.index = np.union1d(m.index, tr.index)
            m.response = np.maximum(m.response, tr.response)
            m.t_transit = float(np.mean(geom.times[m.index]))
            m.integration = int(m.index[len(m.index) // 2])
        else:
            merged[key] = tr
    res = sorted(merged.values(), key=lambda t: -t.apparent_flux_jy)[:topn]
    for tr in res:
        log.info("calibrator %s in the beam of %s (%s, %.2f Jy apparent at %.3f GHz)",
                 tr.name, f"field {tr.field_id} {tr.field_name!r}" if tr.field_id is not None
                 else "the drift", tr.kind, tr.apparent_flux_jy, freq_hz / 1e9)
    return res


@dataclass(frozen=True)
class DishBeamSource(_sky.Source):
    """A catalogue source seen through a pointed scan's own primary beam: ``flux`` is
    the spectrum times ``airy(sep, D) / airy(sep, D_DSA-110)``, so that the model's
    apparent flux (:func:`contimg.sky.apparent_flux`: spectrum times the DSA-110
    beam) is the spectrum times the data's beam (dish ``dish_m``, separation ``sep``
    from the scan's phase centre, rad)."""

    sep: float = 0.0
    dish_m: float = tel.DISH_DIAMETER_M

    def flux(self, freq_hz):
        f = np.asarray(freq_hz, float)
        ours = tel.airy_beam(self.sep, f, self.dish_m)
        dsa = np.maximum(tel.airy_beam(self.sep, f), 1e-12)
        return _sky.Source.flux(self, f) * ours / dsa


def through_own_beam(transits, geom: Geometry):
    """``transits`` with the sources of pointed scans as :class:`DishBeamSource` (the
    data's dish), for the model of a solve; drift transits unchanged."""
    import dataclasses

    out = []
    for tr in transits:
        if tr.kind == "pointed" and geom.dish_diameter_m != tel.DISH_DIAMETER_M:
            src = DishBeamSource(**{f.name: getattr(tr.source, f.name)
                                    for f in dataclasses.fields(_sky.Source)},
                                 sep=math.radians(tr.separation_deg),
                                 dish_m=geom.dish_diameter_m)
            tr = dataclasses.replace(tr, source=src)
        out.append(tr)
    return out


def no_calibrator_message(geom: Geometry, catalog=None, *, radius_deg=None):
    """Why :func:`find_field_calibrators` found nothing: the scans searched, the radius,
    and the catalogue source nearest to any of them."""
    cat = _sky.default_catalog(catalog)
    parts, best = [], None
    for sc in scans(geom):
        if sc.kind == "drift":
            r = _sky.match_radius_deg() if radius_deg is None else float(radius_deg)
            ra = np.degrees(geom.ra[sc.index])
            dec = math.degrees(float(np.median(geom.dec[sc.index])))
            parts.append(f"drift scan at dec {dec:.3f} deg during RA {ra[0]:.3f}.."
                         f"{ra[-1]:.3f} deg (transits within {r:g} deg in declination)")
        else:
            r = (beam_radius_deg(geom.dish_diameter_m, geom.freq_hz) if radius_deg is None
                 else float(radius_deg))
            parts.append(f"{sc.describe()} (within {r:.3f} deg)")
        for s in cat:
            sep = math.degrees(float(_sky.separation(sc.ra, sc.dec, s.ra, s.dec)))
            if best is None or sep < best[0]:
                best = (sep, s.name, sc)
    msg = (f"{geom.source}: no calibrator of {cat.origin or 'the catalogue'} ({len(cat)} "
           f"sources) in the primary beam of " + "; ".join(parts[:10])
           + (f" ... ({len(parts)} scans)" if len(parts) > 10 else ""))
    if best is not None:
        sc = best[2]
        where = (f"field {sc.field_id} {sc.field_name!r}" if sc.field_id is not None
                 else "the data")
        msg += f"; nearest: {best[1]} at {best[0]:.3f} deg from {where}"
    return msg
