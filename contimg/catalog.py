"""Source catalogues: read CSV, FITS and VOTable lists (NVSS and FIRST as VizieR serves
them), store their sources once in the state database, and write the simulator's sky
as a catalogue.

Columns are found by name, case-insensitively:

* position: ``ra_deg``/``ra``/``RAJ2000``/``_RAJ2000``, ``dec_deg``/``dec``/``DEJ2000``/
  ``_DEJ2000``; numbers are degrees, strings sexagesimal (RA in hours, as VizieR writes
  ``RAJ2000`` "hh mm ss.ss");
* flux density: ``flux_jy`` (Jy), ``flux_mjy`` (mJy), NVSS ``S1.4`` (mJy), FIRST ``Fint``
  then ``Fpeak`` (mJy), or ``flux``; errors ``e_flux_jy``/``flux_err_jy``, NVSS
  ``e_S1.4``, FIRST ``Rms`` (mJy). A column's own unit (FITS ``TUNIT``, VOTable
  ``unit``) wins over the name's convention;
* name: ``name``, ``NVSS``, ``FIRST``, ``source``, ``id``; else a J2000 name is made
  from the position. Optional ``alpha`` (spectral index) and ``ref_freq_hz``.

Loading deduplicates by position (``astropy.coordinates.match_to_catalog_sky``): rows
of one file closer than the match radius keep the brightest, and a row within the
radius of a source already in the database is counted as matched, not added again.
Every source records the catalogue that first brought it (``sources.catalog_id``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MATCH_RADIUS_ARCSEC = 10.0

_RA = ("ra_deg", "ra", "raj2000", "_raj2000", "radeg", "ra_icrs")
_DEC = ("dec_deg", "dec", "dej2000", "_dej2000", "decj2000", "dedeg", "dec_icrs", "de_icrs")
# (column, unit when the column has none)
_FLUX = (("flux_jy", "Jy"), ("flux_mjy", "mJy"), ("s1.4", "mJy"), ("fint", "mJy"),
         ("fpeak", "mJy"), ("flux", "Jy"), ("s1400", "mJy"), ("total_flux", "Jy"))
_ERR = (("e_flux_jy", "Jy"), ("flux_err_jy", "Jy"), ("e_flux_mjy", "mJy"),
        ("e_s1.4", "mJy"), ("e_fint", "mJy"), ("rms", "mJy"), ("e_flux", "Jy"))
_NAME = ("name", "nvss", "first", "source", "id")
FORMATS = {".csv": "ascii.csv", ".txt": "ascii.csv", ".fits": "fits", ".fit": "fits",
           ".fits.gz": "fits", ".vot": "votable", ".xml": "votable", ".votable": "votable"}


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for ext, fmt in sorted(FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(ext):
            return fmt
    raise ValueError(f"{path}: unknown catalogue format (expected one of "
                     f"{', '.join(sorted(FORMATS))})")


def _col(table, names):
    low = {c.lower(): c for c in table.colnames}
    for n in names:
        if n in low:
            return low[n]
    return None


def _to_jy(column, default_unit: str, where: str) -> np.ndarray:
    from astropy import units as u

    vals = np.ma.filled(np.ma.asarray(column, dtype=np.float64), np.nan)
    unit = getattr(column, "unit", None)
    if unit is None or str(unit) in ("", "None"):
        unit = u.Unit(default_unit)
    else:
        unit = u.Unit(str(unit), parse_strict="silent")
    for cand in (unit, unit * u.beam):        # mJy/beam: a peak, read as a flux density
        try:
            return vals * cand.to(u.Jy)
        except u.UnitConversionError:
            pass
    raise ValueError(f"{where}: column {column.name!r} has unit {unit}, "
                     "not a flux density")


def _first_jy(table, choices, where: str) -> np.ndarray:
    """The first of ``choices`` (``(column, default unit)``) present, in Jy; else NaN."""
    for name, unit in choices:
        c = _col(table, (name,))
        if c is not None:
            return _to_jy(table[c], unit, where)
    return np.full(len(table), np.nan)


def _positions(table, where: str) -> tuple[np.ndarray, np.ndarray]:
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    cra, cdec = _col(table, _RA), _col(table, _DEC)
    if cra is None or cdec is None:
        raise ValueError(f"{where}: no position columns (RA: one of {', '.join(_RA)}; "
                         f"Dec: one of {', '.join(_DEC)}); columns are {table.colnames}")
    ra, dec = table[cra], table[cdec]
    if ra.dtype.kind in "US" or dec.dtype.kind in "US":
        try:
            c = SkyCoord([str(x) for x in ra], [str(x) for x in dec],
                         unit=(u.hourangle, u.deg), frame="icrs")
        except ValueError as exc:
            raise ValueError(f"{where}: cannot read sexagesimal positions: {exc}") from None
        return c.ra.deg, c.dec.deg
    ra_v = np.ma.filled(np.ma.asarray(ra, dtype=np.float64), np.nan)
    dec_v = np.ma.filled(np.ma.asarray(dec, dtype=np.float64), np.nan)
    for col, v in ((ra, ra_v), (dec, dec_v)):
        unit = getattr(col, "unit", None)
        if unit is not None and str(unit) not in ("", "deg", "None"):
            v *= u.Unit(str(unit)).to(u.deg)
    return ra_v, dec_v


def jname(ra_deg, dec_deg) -> str:
    """``Jhhmmss.s+ddmmss`` from a position in degrees."""
    h = (ra_deg % 360.0) / 15.0
    hh, mm = int(h), int((h * 60) % 60)
    ss = (h * 3600) % 60
    sign = "+" if dec_deg >= 0 else "-"
    d = abs(dec_deg)
    dd, dm, ds = int(d), int((d * 60) % 60), int((d * 3600) % 60)
    return f"J{hh:02d}{mm:02d}{ss:04.1f}{sign}{dd:02d}{dm:02d}{ds:02d}"


def read_catalog(path) -> dict:
    """Read a catalogue file into arrays ``name, ra_deg, dec_deg, flux_jy, flux_err_jy,
    alpha, ref_freq_hz`` (NaN where unknown) plus ``format``; clear errors for a missing
    file, an unknown format, missing columns or bad values."""
    from astropy.table import Table

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such catalogue file")
    fmt = _format_of(path)
    try:
        t = Table.read(path, format=fmt)
    except Exception as exc:  # astropy raises many kinds for a malformed file
        raise ValueError(f"{path}: cannot read as {fmt}: {exc}") from None
    if len(t) == 0:
        raise ValueError(f"{path}: the catalogue has no rows")
    where = str(path)
    ra, dec = _positions(t, where)
    bad = ~(np.isfinite(ra) & np.isfinite(dec)) | (np.abs(dec) > 90)
    if bad.any():
        raise ValueError(f"{where}: row {int(np.flatnonzero(bad)[0]) + 1}: bad position")
    n = len(t)
    flux, err = _first_jy(t, _FLUX, where), _first_jy(t, _ERR, where)
    cname = _col(t, _NAME)
    names = ([str(x).strip() for x in t[cname]] if cname is not None
             else [jname(a, b) for a, b in zip(ra, dec)])
    if cname is not None and _col(t, ("nvss",)) == cname:
        names = [f"NVSS {x}" for x in names]
    elif cname is not None and _col(t, ("first",)) == cname:
        names = [f"FIRST {x}" for x in names]
    calpha = _col(t, ("alpha", "spectral_index", "spindex"))
    alpha = (np.ma.filled(np.ma.asarray(t[calpha], dtype=float), np.nan) if calpha
             else np.full(n, np.nan))
    cref = _col(t, ("ref_freq_hz",))
    ref = (np.ma.filled(np.ma.asarray(t[cref], dtype=float), np.nan) if cref
           else np.full(n, 1.4e9))
    return dict(name=np.array(names, dtype=object), ra_deg=np.asarray(ra, float) % 360.0,
                dec_deg=np.asarray(dec, float), flux_jy=flux, flux_err_jy=err,
                alpha=alpha, ref_freq_hz=ref, format=fmt)


def _dedup_within(cat: dict, radius_arcsec: float) -> np.ndarray:
    """Indices to keep: of rows closer than the radius, the brightest (then first)."""
    n = len(cat["ra_deg"])
    if n < 2:
        return np.arange(n)
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(cat["ra_deg"] * u.deg, cat["dec_deg"] * u.deg)
    i1, i2, sep, _ = c.search_around_sky(c, radius_arcsec * u.arcsec)
    pair = i1 < i2
    flux = np.nan_to_num(cat["flux_jy"], nan=-np.inf)
    drop = set()
    for a, b in zip(i1[pair], i2[pair]):
        if a in drop or b in drop:
            continue
        drop.add(b if flux[a] >= flux[b] else a)
    return np.array([i for i in range(n) if i not in drop], dtype=np.int64)


def load_into_db(db, path, *, name: str | None = None,
                 radius_arcsec: float = DEFAULT_MATCH_RADIUS_ARCSEC) -> dict:
    """Read ``path`` and add its sources to the state database ``db`` (a StateDB);
    returns ``{"catalog", "n_rows", "n_new", "n_matched", "n_duplicates"}``."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    path = Path(path)
    cat = read_catalog(path)
    name = name or path.stem
    keep = _dedup_within(cat, radius_arcsec)
    n_dup = len(cat["ra_deg"]) - keep.size
    known = db.query("SELECT id, name, ra_deg, dec_deg FROM sources")
    matched = np.zeros(keep.size, dtype=bool)
    if known and keep.size:
        kc = SkyCoord(np.array([r["ra_deg"] for r in known]) * u.deg,
                      np.array([r["dec_deg"] for r in known]) * u.deg)
        nc = SkyCoord(cat["ra_deg"][keep] * u.deg, cat["dec_deg"][keep] * u.deg)
        _, sep, _ = nc.match_to_catalog_sky(kc)
        matched = sep.arcsec <= radius_arcsec
    known_names = {r["name"] for r in known}

    def num(x):
        return None if not math.isfinite(x) else float(x)

    now = time.time()
    with db.transaction() as con:
        con.execute("INSERT INTO catalogs (name, path, format, n_rows, loaded_at) "
                    "VALUES (?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET path=excluded.path, "
                    "format=excluded.format, n_rows=excluded.n_rows, "
                    "loaded_at=excluded.loaded_at",
                    (name, str(path.resolve()), cat["format"], len(cat["ra_deg"]), now))
        cid = con.execute("SELECT id FROM catalogs WHERE name=?", (name,)).fetchone()["id"]
        rows = []
        for j, i in enumerate(keep):
            if matched[j]:
                continue
            sname = str(cat["name"][i])
            if sname in known_names:   # same name, another position: keep both
                sname = f"{name}:{sname}"
            known_names.add(sname)
            rows.append((sname, float(cat["ra_deg"][i]), float(cat["dec_deg"][i]),
                         num(cat["flux_jy"][i]), num(cat["flux_err_jy"][i]),
                         num(cat["alpha"][i]), num(cat["ref_freq_hz"][i]), name, cid))
        con.executemany("INSERT INTO sources (name, ra_deg, dec_deg, flux_jy, flux_err_jy, "
                        "alpha, ref_freq_hz, origin, catalog_id) VALUES (?,?,?,?,?,?,?,?,?)",
                        rows)
        con.execute("UPDATE catalogs SET n_new=?, n_matched=? WHERE id=?",
                    (len(rows), int(matched.sum()), cid))
    log.info("catalogue %s (%s): %d rows, %d new, %d matched, %d duplicates", name, path,
             len(cat["ra_deg"]), len(rows), int(matched.sum()), n_dup)
    return dict(catalog=name, n_rows=len(cat["ra_deg"]), n_new=len(rows),
                n_matched=int(matched.sum()), n_duplicates=int(n_dup))


def sources_table(db, ids=None) -> dict:
    """Every source (or those with ``ids``) as arrays: id, name, ra_deg, dec_deg,
    flux_jy, alpha, ref_freq_hz (NaN where unknown)."""
    sql = "SELECT id, name, ra_deg, dec_deg, flux_jy, alpha, ref_freq_hz FROM sources"
    rows = db.query(sql + " ORDER BY id")
    if ids is not None:
        want = set(int(i) for i in ids)
        rows = [r for r in rows if r["id"] in want]

    def arr(k, default=np.nan):
        return np.array([default if r[k] is None else r[k] for r in rows], dtype=float)

    return dict(id=np.array([r["id"] for r in rows], dtype=np.int64),
                name=np.array([r["name"] for r in rows], dtype=object),
                ra_deg=arr("ra_deg"), dec_deg=arr("dec_deg"), flux_jy=arr("flux_jy"),
                alpha=arr("alpha"), ref_freq_hz=arr("ref_freq_hz", 1.4e9))


def expected_flux(sources: dict, freq_hz: float) -> np.ndarray:
    """Catalogue flux density scaled to ``freq_hz`` by the spectral index (none: flat)."""
    alpha = np.nan_to_num(sources["alpha"], nan=0.0)
    ref = np.nan_to_num(sources["ref_freq_hz"], nan=1.4e9)
    return sources["flux_jy"] * (freq_hz / ref) ** alpha


def write_sky_catalog(truth, path) -> Path:
    """Write a simulated sky as a CSV catalogue (``name, ra_deg, dec_deg, flux_jy, alpha,
    ref_freq_hz``). ``truth``: a ``*_truth.npz`` path, a SimulatedGroup, or a dict with
    ``sky_*`` (or ``ra``/``dec`` radians, ``flux``, ``alpha``, ``name``) arrays."""
    if hasattr(truth, "load_truth"):
        truth = truth.load_truth()
    elif not isinstance(truth, dict):
        with np.load(truth, allow_pickle=False) as z:
            truth = {k: z[k] for k in z.files}
    pre = "sky_" if "sky_ra" in truth else ""
    n = len(truth[pre + "ra"])
    ref = truth.get(pre + "ref_freq", np.full(n, 1.4e9))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write("name,ra_deg,dec_deg,flux_jy,alpha,ref_freq_hz\n")
        for i in range(n):
            fh.write(f"{truth[pre + 'name'][i]},{math.degrees(truth[pre + 'ra'][i]):.9f},"
                     f"{math.degrees(truth[pre + 'dec'][i]):.9f},"
                     f"{float(truth[pre + 'flux'][i]):.8g},{float(truth[pre + 'alpha'][i]):.6g},"
                     f"{float(ref[i]):.8g}\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------

def cmd_catalog_load(args) -> int:
    from contimg.state import StateDB

    with StateDB(args.cfg.paths.db) as db:
        for f in args.files:
            r = load_into_db(db, f, name=args.name if len(args.files) == 1 else None,
                             radius_arcsec=args.cfg.science.match_radius_arcsec)
            print(f"{f}: catalogue {r['catalog']}: {r['n_rows']} rows, {r['n_new']} new "
                  f"sources, {r['n_matched']} already known, {r['n_duplicates']} duplicates")
    return 0


def add_subcommands(sub):
    from contimg.config import add_options

    p = sub.add_parser("catalog", help="source catalogues for forced photometry")
    csub = p.add_subparsers(dest="catalog_cmd", required=True)
    s = csub.add_parser("load", help="load CSV / FITS / VOTable catalogues (NVSS, FIRST)")
    s.add_argument("files", nargs="+")
    s.add_argument("--name", help="catalogue name (default: the file name's stem)")
    add_options(s, "paths.db", "science.match_radius_arcsec")
    s.set_defaults(func=cmd_catalog_load)
