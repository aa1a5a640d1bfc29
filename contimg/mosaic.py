"""Primary-beam-weighted linear mosaics of the images of a time window.

For member images ``i`` with apparent (not PB-corrected) image ``I_i``, primary beam
``P_i`` and noise ``s_i`` (the header's NOISE, else the image's robust rms), each
reprojected (``reproject.reproject_interp``, bicubic) onto one celestial grid::

    mosaic = sum_i (P_i I_i / s_i^2) / sum_i (P_i^2 / s_i^2)
    weight = sum_i P_i^2 / s_i^2                  noise = 1 / sqrt(weight)

over the pixels where ``P_i >= pb_min`` (0.2). The mosaic is flux-correct (a source has
its true flux density in every member image's PB-corrected map, so in their weighted
mean) and ``noise`` is its rms for independent member images. The grid: the members'
pixel size, SIN about the mean centre when the members span less than 30 deg in RA, else
CAR (a long drift-scan strip). Each member is reprojected only onto its own footprint.

Plans and members are recorded in the state database (``mosaics``,
``mosaic_members``); ``build`` writes ``<out>.fits``, ``<out>-weight.fits`` and
``<out>-noise.fits`` (each to a temporary name, then renamed) and records them.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from contimg.io.files import finalise, make_dirs
from kernels.constants import SECONDS_PER_DAY, UNIX_MJD0

log = logging.getLogger(__name__)

DEFAULT_PB_MIN = 0.2


def parse_time(text) -> float:
    """ISO-8601 (UTC unless it says otherwise) or Unix seconds -> Unix seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip()
    try:
        return float(s)
    except ValueError:
        pass
    try:
        d = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"bad time {text!r}: expected ISO-8601 UTC "
                         "(2026-01-15T08:00:00) or Unix seconds") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return d.timestamp()


def _image_time(row) -> float | None:
    if row.get("t_mid") is not None:
        return row["t_mid"]
    from contimg.photometry import read_image

    try:
        return read_image(row["path"]).t_mid
    except (OSError, ValueError) as exc:
        log.warning("mosaic plan: skipping %s: %s", row["path"], exc)
        return None


def plan(db, name: str, since, until) -> dict:
    """Record a mosaic of the continuum images whose mid time is in ``[since, until)``.
    Re-planning a name replaces its members (unless it was built)."""
    t0, t1 = parse_time(since), parse_time(until)
    if not t1 > t0:
        raise ValueError(f"mosaic {name}: --until must be after --since")
    rows = db.query("SELECT i.path, COALESCE(f.t_mid, g.t_start + 154.6) AS t_mid "
                    "FROM images i LEFT JOIN image_flux_scale f ON f.image_path = i.path "
                    "LEFT JOIN groups g ON g.group_id = i.group_id "
                    "WHERE i.kind = 'continuum' ORDER BY i.path")
    members = [r["path"] for r in rows if (t := _image_time(r)) is not None and t0 <= t < t1]
    now = time.time()
    with db.transaction() as con:
        old = con.execute("SELECT id, status FROM mosaics WHERE name=?", (name,)).fetchone()
        if old and old["status"] == "built":
            raise ValueError(f"mosaic {name}: already built; choose another name")
        con.execute("INSERT INTO mosaics (name, t_start, t_end, status, n_images, created_at)"
                    " VALUES (?,?,?,'planned',?,?) ON CONFLICT(name) DO UPDATE SET "
                    "t_start=excluded.t_start, t_end=excluded.t_end, status='planned', "
                    "n_images=excluded.n_images, error=NULL",
                    (name, t0, t1, len(members), now))
        mid = con.execute("SELECT id FROM mosaics WHERE name=?", (name,)).fetchone()["id"]
        con.execute("DELETE FROM mosaic_members WHERE mosaic_id=?", (mid,))
        con.executemany("INSERT INTO mosaic_members (mosaic_id, image_path) VALUES (?,?)",
                        [(mid, p) for p in members])
    log.info("mosaic %s: %d images in [%s, %s)", name, len(members), since, until)
    return dict(name=name, id=mid, t_start=t0, t_end=t1, members=members)


def _member(path):
    from contimg.photometry import pb_map, read_image

    img = read_image(path)
    pb = pb_map(img)
    if pb is None:
        # no PB beside the image: the drift-averaged Airy model on every pixel
        from contimg.photometry import model_pb

        ny, nx = img.data.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        ra, dec = img.wcs.pixel_to_world_values(xx, yy)
        pb = model_pb(img, ra, dec)
    noise = img.header.get("NOISE")
    if not noise:
        v = img.data[np.isfinite(img.data)]
        noise = 1.482602218505602 * float(np.median(np.abs(v - np.median(v))))
    return img, pb, float(noise)


def output_wcs(images, cell_deg: float):
    """The mosaic grid covering every member (``images``: photometry.Image)."""
    from astropy.wcs import WCS

    corners = []
    for img in images:
        ny, nx = img.data.shape
        cx = np.array([0, nx - 1, 0, nx - 1, (nx - 1) / 2])
        cy = np.array([0, 0, ny - 1, ny - 1, (ny - 1) / 2])
        ra, dec = img.wcs.pixel_to_world_values(cx, cy)
        corners.append(np.stack([ra, dec], axis=1))
    c = np.concatenate(corners)
    ra_c = np.degrees(np.angle(np.mean(np.exp(1j * np.radians(c[:, 0])))))
    dra = (c[:, 0] - ra_c + 180.0) % 360.0 - 180.0
    dec_c = 0.5 * (c[:, 1].min() + c[:, 1].max())
    wide = np.ptp(dra) > 30.0
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---CAR", "DEC--CAR"] if wide else ["RA---SIN", "DEC--SIN"]
    w.wcs.crval = [ra_c % 360.0, dec_c if not wide else 0.0]
    w.wcs.cdelt = [-cell_deg, cell_deg]
    w.wcs.crpix = [1.0, 1.0]
    if wide:   # CAR about the equator: the strip's declinations are plain rows
        w.wcs.crval = [ra_c % 360.0, 0.0]
    x, y = w.world_to_pixel_values(c[:, 0], c[:, 1])
    pad = 2
    w.wcs.crpix = [1.0 - np.floor(x.min()) + pad, 1.0 - np.floor(y.min()) + pad]
    nx = int(np.ceil(x.max()) - np.floor(x.min())) + 2 * pad + 1
    ny = int(np.ceil(y.max()) - np.floor(y.min())) + 2 * pad + 1
    return w, (ny, nx)


def make_mosaic(paths, *, pb_min: float = DEFAULT_PB_MIN, cell_arcsec: float | None = None):
    """Build the mosaic of the images ``paths`` (``*-image.fits``); returns
    ``(mosaic, weight, noise, wcs, beam)`` (NaN where no member reaches ``pb_min``)."""
    from reproject import reproject_interp

    if not paths:
        raise ValueError("mosaic: no member images")
    members = [_member(p) for p in paths]
    cell = (cell_arcsec / 3600.0 if cell_arcsec else
            min(m[0].cell_deg for m in members))
    wcs, shape = output_wcs([m[0] for m in members], cell)
    num = np.zeros(shape, dtype=np.float32)      # 4 bytes a pixel: a night's strip is big
    den = np.zeros(shape, dtype=np.float32)
    for img, pb, s in members:
        ny, nx = img.data.shape
        bx = np.r_[np.linspace(0, nx - 1, 33), np.full(33, nx - 1), np.linspace(0, nx - 1, 33),
                   np.zeros(33)]
        by = np.r_[np.zeros(33), np.linspace(0, ny - 1, 33), np.full(33, ny - 1),
                   np.linspace(0, ny - 1, 33)]
        ox, oy = wcs.world_to_pixel_values(*img.wcs.pixel_to_world_values(bx, by))
        x0, x1 = max(0, int(np.floor(ox.min())) - 2), min(shape[1], int(np.ceil(ox.max())) + 3)
        y0, y1 = max(0, int(np.floor(oy.min())) - 2), min(shape[0], int(np.ceil(oy.max())) + 3)
        sub = wcs[y0:y1, x0:x1]
        sub_shape = (y1 - y0, x1 - x0)
        data = np.where(np.isfinite(img.data), img.data, 0.0)
        d, fd = reproject_interp((data, img.wcs), sub, shape_out=sub_shape, order="bicubic")
        p, fp = reproject_interp((pb, img.wcs), sub, shape_out=sub_shape, order="bilinear")
        ok = (fd > 0) & (fp > 0) & np.isfinite(d) & np.isfinite(p) & (p >= pb_min)
        w = np.where(ok, p / (s * s), 0.0)
        num[y0:y1, x0:x1] += np.where(ok, w * d, 0.0)
        den[y0:y1, x0:x1] += w * np.where(ok, p, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mosaic = np.where(den > 0, num / den, np.nan)
        noise = np.where(den > 0, 1.0 / np.sqrt(den), np.nan)
    beams = np.array([m[0].beam for m in members])
    beam = (float(beams[:, 0].max()), float(beams[:, 1].max()), float(np.median(beams[:, 2])))
    return mosaic, den, noise, wcs, beam


def _write(path: Path, data, wcs, beam, bunit: str, kind: str, extra: dict):
    from astropy.io import fits

    from contimg import __version__

    h = wcs.to_header()
    h["BUNIT"] = bunit
    h["BMAJ"], h["BMIN"], h["BPA"] = beam
    h["ORIGIN"] = f"contimg {__version__}"
    h["IMAGETYP"] = kind
    for k, v in extra.items():
        h[k] = v
    tmp = path.with_name(path.name + ".tmp")
    fits.PrimaryHDU(np.asarray(data, dtype=np.float32), header=h).writeto(
        tmp, overwrite=True, output_verify="exception")
    os.replace(finalise(tmp), path)
    return path


def write_mosaic(out: Path, mosaic, weight, noise, wcs, beam, *, n_images=0, t0=None,
                 t1=None) -> dict:
    out = Path(out)
    make_dirs(out.parent)
    stem = out.name[:-5] if out.name.endswith(".fits") else out.name
    extra = {"NIMAGES": (n_images, "member images")}
    if t0 is not None:
        extra["MJD-BEG"] = t0 / SECONDS_PER_DAY + UNIX_MJD0
        extra["MJD-END"] = t1 / SECONDS_PER_DAY + UNIX_MJD0
    paths = {"mosaic": out.with_name(stem + ".fits"),
             "weight": out.with_name(stem + "-weight.fits"),
             "noise": out.with_name(stem + "-noise.fits")}
    _write(paths["weight"], weight, wcs, beam, "", "weight", extra)
    _write(paths["noise"], noise, wcs, beam, "JY/BEAM", "noise", extra)
    _write(paths["mosaic"], mosaic, wcs, beam, "JY/BEAM", "mosaic", extra)
    return {k: str(v) for k, v in paths.items()}


def build(db, name: str, output=None, *, pb_min: float = DEFAULT_PB_MIN,
          out_dir=None, cell_arcsec: float | None = None) -> dict:
    """Build the planned mosaic ``name`` and record its products."""
    rows = db.query("SELECT * FROM mosaics WHERE name=?", (name,))
    if not rows:
        raise ValueError(f"mosaic {name}: not planned (contimg mosaic plan --name {name})")
    m = rows[0]
    members = [r["image_path"] for r in db.query(
        "SELECT image_path FROM mosaic_members WHERE mosaic_id=? ORDER BY image_path",
        (m["id"],))]
    if output is None:
        base = Path(out_dir) if out_dir else db.path.parent / "mosaics"
        output = base / f"{name}.fits"
    t = time.perf_counter()
    try:
        mos, wt, noise, wcs, beam = make_mosaic(members, pb_min=pb_min,
                                                cell_arcsec=cell_arcsec)
        paths = write_mosaic(Path(output), mos, wt, noise, wcs, beam, n_images=len(members),
                             t0=m["t_start"], t1=m["t_end"])
    except Exception as exc:
        with db.transaction() as con:
            con.execute("UPDATE mosaics SET status='failed', error=? WHERE id=?",
                        (f"{type(exc).__name__}: {exc}", m["id"]))
        raise
    med_noise = float(np.nanmedian(noise)) if np.isfinite(noise).any() else None
    with db.transaction() as con:
        con.execute("UPDATE mosaics SET status='built', path=?, products=?, noise_jy=?, "
                    "n_images=?, error=NULL, built_at=? WHERE id=?",
                    (paths["mosaic"], json.dumps(paths), med_noise, len(members),
                     time.time(), m["id"]))
    log.info("mosaic %s: %d images -> %s in %.1f s", name, len(members), paths["mosaic"],
             time.perf_counter() - t)
    return dict(name=name, n_images=len(members), noise_jy=med_noise, **paths)


def nightly_due(db, now: float, hour_utc: int) -> dict | None:
    """The previous night's mosaic when it is due: at or after ``hour_utc`` today (UTC),
    the window ``[hour_utc yesterday, hour_utc today)`` named ``night-YYYY-MM-DD`` (the
    day the window starts), unless already planned. None otherwise."""
    d = _dt.datetime.fromtimestamp(now, _dt.timezone.utc)
    end = d.replace(hour=int(hour_utc), minute=0, second=0, microsecond=0)
    if d < end:
        end -= _dt.timedelta(days=1)
    start = end - _dt.timedelta(days=1)
    name = f"night-{start:%Y-%m-%d}"
    if db.query("SELECT 1 FROM mosaics WHERE name=?", (name,)):
        return None
    return dict(name=name, since=start.timestamp(), until=end.timestamp())


def stage_nightly_mosaic(db_path=None, *, now: float | None = None, hour_utc: int | None,
                         out_dir=None, cell_arcsec: float | None = None) -> dict | None:
    """The stream's scheduled job (``SCHED_MOSAIC_HOUR_UTC`` /
    ``science.mosaic_hour_utc``): plan and build the previous night's mosaic once it is
    due; None when nothing is due (or no hour is configured, or no images)."""
    from contimg.state import StateDB

    if hour_utc is None:
        return None
    with StateDB(db_path) as db:
        due = nightly_due(db, time.time() if now is None else now, hour_utc)
        if due is None:
            return None
        p = plan(db, due["name"], due["since"], due["until"])
        if not p["members"]:
            log.info("mosaic %s: no images in the window", due["name"])
            return dict(name=due["name"], n_images=0)
        return build(db, due["name"], out_dir=out_dir, cell_arcsec=cell_arcsec)


class NightlySchedule:
    """The streaming service's nightly mosaic: from ``hour_utc``
    (``SCHED_MOSAIC_HOUR_UTC`` / ``science.mosaic_hour_utc``) on, the previous day's
    mosaic, once, as one task on ``client`` (:func:`stage_nightly_mosaic`); :meth:`tick`
    (every pass of the stream's loop) looks at most once a minute. ``hour_utc`` None:
    never."""

    def __init__(self, client, db, out_dir, hour_utc: int | None, every_s: float = 60.0):
        self.client, self.db, self.out_dir = client, db, Path(out_dir)
        self.hour_utc, self.every_s = hour_utc, every_s
        self.future = None
        self.checked = 0.0

    def tick(self, now: float | None = None):
        now = time.time() if now is None else now
        if self.hour_utc is None or now - self.checked < self.every_s:
            return
        self.checked = now
        if self.future is not None:
            if self.future.done():
                fut, self.future = self.future, None
                try:
                    log.info("nightly mosaic: %s", fut.result())
                except Exception as exc:  # noqa: BLE001 - recorded in the mosaics table
                    log.error("nightly mosaic failed: %s: %s", type(exc).__name__, exc)
            return
        if nightly_due(self.db, now, self.hour_utc) is not None:
            self.future = self.client.submit(
                stage_nightly_mosaic, str(self.db.path), hour_utc=self.hour_utc,
                out_dir=str(self.out_dir), pure=False, key=f"mosaic-{time.time_ns()}")


# ---------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------

def cmd_mosaic(args) -> int:
    from contimg.state import StateDB

    with StateDB(args.cfg.paths.db) as db:
        if args.mosaic_cmd == "plan":
            p = plan(db, args.name, args.since, args.until)
            print(f"mosaic {p['name']}: {len(p['members'])} image(s)")
            for m in p["members"]:
                print(f"  {m}")
        elif args.mosaic_cmd == "build":
            r = build(db, args.name, args.output, pb_min=args.pb_min,
                      cell_arcsec=args.cell)
            print(f"mosaic {r['name']}: {r['n_images']} image(s) -> {r['mosaic']} "
                  f"(median noise {r['noise_jy']:.3g} Jy/beam)")
        else:
            for r in db.query("SELECT * FROM mosaics ORDER BY t_start"):
                print(f"{r['name']:<24} {r['status']:<8} {r['n_images'] or 0:>4} images  "
                      f"{r['path'] or ''}")
    return 0


def add_subcommands(sub):
    from contimg.config import add_options

    p = sub.add_parser("mosaic", help="primary-beam-weighted mosaics of a time window")
    msub = p.add_subparsers(dest="mosaic_cmd", required=True)
    s = msub.add_parser("plan", help="record the images of a time window as a mosaic")
    s.add_argument("--name", required=True)
    s.add_argument("--since", required=True, help="ISO-8601 UTC or Unix seconds")
    s.add_argument("--until", required=True, help="ISO-8601 UTC or Unix seconds")
    add_options(s, "paths.db")
    s.set_defaults(func=cmd_mosaic)
    s = msub.add_parser("build", help="build a planned mosaic (FITS + weight + noise)")
    s.add_argument("name")
    s.add_argument("--output", help="mosaic FITS path (default: <db dir>/mosaics/NAME.fits)")
    s.add_argument("--pb-min", type=float, default=DEFAULT_PB_MIN)
    s.add_argument("--cell", type=float, default=None,
                   help="mosaic pixel (arcsec; default: the members' own)")
    add_options(s, "paths.db")
    s.set_defaults(func=cmd_mosaic)
    s = msub.add_parser("list", help="planned and built mosaics")
    add_options(s, "paths.db")
    s.set_defaults(func=cmd_mosaic)
