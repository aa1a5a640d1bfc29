"""A small but real state database and products directory for the operator app's tests
(and a live server in a thread): groups in every state with events and stage timings, a
real tiny Measurement Set with CASA B and G tables written for it, FITS images with
thumbnails, sources with photometry, and files that must never be served."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import numpy as np

PASSWORDS = {"vera": "viewer-pass-1", "otto": "operator-pass-1", "ada": "admin-pass-1"}
ROLES = {"vera": "viewer", "otto": "operator", "ada": "admin"}
T0 = time.time() - 6 * 3600
NPIX = 128


def _fits(path, rng, *, ra0=150.0, dec0=54.5, cell_deg=0.01, sources=()):
    from astropy.io import fits
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [NPIX / 2 + 1, NPIX / 2 + 1]
    w.wcs.cdelt = [-cell_deg, cell_deg]
    data = rng.normal(0, 0.002, (NPIX, NPIX)).astype(np.float32)
    yy, xx = np.mgrid[:NPIX, :NPIX]
    for ra, dec, flux in sources:
        px, py = w.world_to_pixel_values(ra, dec)
        data += flux * np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / 4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(data[None, None], header=w.to_header()).writeto(path, overwrite=True)
    return path


def _group(db, gid, t_start, state, *, error=None, timings=None):
    db.add_file(f"/data/incoming/{gid}_sb00.hdf5", subband=0, timestamp=t_start, group_id=gid,
                t_start=t_start, n_expected=1)
    db.set_file_status(f"/data/incoming/{gid}_sb00.hdf5", "ready")
    db.transition(gid, "pending", reason="all subbands")
    if state == "pending":
        return
    db.claim(gid, owner="testhost:1")
    for stage, sec in (timings or {}).items():
        db.record_stage(gid, 1, stage, "ok", sec, t_start)
    if state == "completed":
        db.transition(gid, "completed", expect="in_progress")
    elif state == "failed":
        db.transition(gid, "failed", expect="in_progress", reason=error)


def build(root: Path) -> dict:
    """Populate ``root`` (state/, products/, outside/); returns what tests need."""
    from contimg import runtime

    runtime.configure()      # offline astropy (IERS) as every contimg process has it
    from contimg.app.accounts import Accounts
    from contimg.pipeline import register_image_result
    from contimg.caltables import write_caltable
    from contimg.io.ms import write_ms
    from contimg.io.uvh5 import open_group
    from contimg.simulate import SimConfig, simulate_group
    from contimg.state import StateDB

    rng = np.random.default_rng(14)
    products = root / "products"
    db = StateDB(root / "state" / "pipeline.sqlite3")
    stamps = [time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(T0 + 300 * i)) for i in range(6)]
    states = ["completed", "completed", "failed", "completed", "pending", "in_progress"]
    for i, (gid, st) in enumerate(zip(stamps, states)):
        _group(db, gid, T0 + 300 * i, st, error="convert: subband 3 unreadable" if
               st == "failed" else None,
               timings={"convert": 12.0 + i, "flag": 4.0, "image": 20.0, "total": 40.0 + i})

    # a real tiny MS, and CASA tables written for it
    sim = simulate_group(root / "incoming", stamps[1], cfg=SimConfig(n_ant=6, n_subbands=2,
                                                                     n_chan=4, n_times=2))
    ms = products / "ms" / f"{stamps[1]}.ms"
    ms.parent.mkdir(parents=True, exist_ok=True)
    write_ms(open_group(sim.files, n_subbands=2), str(ms))
    from casacore import tables as ct

    with ct.table(str(ms / "ANTENNA"), ack=False) as t:
        nant = t.nrows()       # every station; only the simulated ones have solutions
    nchan = 8
    absent = np.arange(nant)[None, :, None, None] >= 6
    amp = 1.0 + 0.1 * np.arange(nant)[:, None, None] * np.ones((1, nchan, 2))
    ph = np.linspace(-0.5, 0.5, nchan)[None, :, None] * np.ones((nant, 1, 2))
    bp = (amp * np.exp(1j * ph))[None].astype(np.complex64)
    cal = products / "cal"
    cal.mkdir(parents=True, exist_ok=True)
    t_tr = T0 + 300
    write_caltable(str(cal / f"{stamps[1]}.B"), str(ms), kind="B", times_unix=[t_tr],
                   cparam=bp, flag=np.broadcast_to(absent, bp.shape), snr=np.full(bp.shape, 50.0),
                   convention="casa")
    g = np.exp(1j * np.linspace(0, 0.3, 3))[:, None, None, None] * np.ones((3, nant, 1, 2))
    write_caltable(str(cal / f"{stamps[1]}.G"), str(ms), kind="G",
                   times_unix=t_tr + np.arange(3) * 60.0, cparam=g.astype(np.complex64),
                   flag=np.broadcast_to(absent, g.shape),
                   snr=np.full(g.shape, 30.0), convention="casa")
    cs = db.register_calset(f"{stamps[1]}", calibrator="3C147", t_transit=t_tr, refant=0,
                            tables={"B": str(cal / f"{stamps[1]}.B"),
                                    "G": str(cal / f"{stamps[1]}.G")})
    db.register_calset("2026-01-01T00:00:00", calibrator="3C286", t_transit=T0 - 86400,
                       status="rejected", reason="bandpass SNR 2.1 below 5")
    db.register_ms(ms, group_id=stamps[1], t_start=T0 + 300, nbytes=12345,
                   flagged_fraction=0.031, calset_id=cs, status="calibrated")

    # images (with thumbnails and QA as the image stage leaves them) and sources
    srcs = [("J1000+5430", 150.0, 54.5, 1.2), ("J1001+5440", 150.25, 54.66, 0.4)]
    images = {}
    for gid in (stamps[0], stamps[1], stamps[3]):
        p = _fits(products / "images" / f"{gid}-image.fits", rng,
                  sources=[(r, d, f) for _, r, d, f in srcs])
        _fits(products / "images" / f"{gid}-residual.fits", rng)
        # as the image stage's registration does it (thumbnail and QA included)
        register_image_result(db, {"paths": {"image": str(p), "residual": str(p).replace(
            "-image", "-residual")}, "noise": 0.002, "peak": 1.2, "n_components": 37,
            "n_major": 3, "beam": (30.0, 20.0, 10.0)}, group_id=gid,
            ms_path=str(ms) if gid == stamps[1] else None, calset_id=cs)
        images[gid] = db.query("SELECT rowid AS id FROM images WHERE path=?", (str(p),))[0]["id"]
    # registered paths that must never be served: outside the products directory
    secret = _fits(root / "outside" / "secret.fits", rng)
    db.register_image(secret, group_id=stamps[2], products={
        "image": str(secret), "residual": str(products / "images" / ".." / ".." / "outside"
                                              / "secret.fits")})
    bad_id = db.query("SELECT rowid AS id FROM images WHERE path=?", (str(secret),))[0]["id"]
    (products / "images" / "escape.fits").symlink_to(secret)
    db.register_image(products / "images" / "escape.fits", group_id=stamps[2])
    link_id = db.query("SELECT rowid AS id FROM images WHERE path LIKE '%escape.fits'")[0]["id"]
    sids = []
    for name, ra, dec, flux in srcs:
        sid = db.add_source(name, ra, dec, flux, origin="test")
        sids.append(sid)
        for data_i, gid in ((0, stamps[0]), (1, stamps[1]), (3, stamps[3])):
            db.add_photometry(sid, products / "images" / f"{gid}-image.fits",
                              t_mid=T0 + 300 * data_i + 150, flux_jy=flux * (1 + 0.01 * rng.normal()),
                              err_jy=0.002)
    with db.transaction() as con:   # two ESE candidates, as the variability code stores them
        con.executemany(
            "INSERT INTO ese_candidates (source_id, preset, score, t_start, t_end, depth_jy, "
            "depth_sigma, n_epochs, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            [(sids[0], "default", 6.5, T0, T0 + 900, 0.3, 6.0, 3, T0, T0),
             (sids[1], "default", 9.0, T0, T0 + 900, 0.1, 8.0, 3, T0, T0)])
    acc = Accounts(db)
    tokens = {}
    for name, pw in PASSWORDS.items():
        acc.add(name, ROLES[name], pw)
        tokens[name] = acc.new_token(name, "tests")
    db.close()
    return dict(db_path=root / "state" / "pipeline.sqlite3", products=products,
                groups=stamps, states=dict(zip(stamps, states)), images=images,
                bad_image=bad_id, link_image=link_id, calset=cs, sources=sids, tokens=tokens,
                ms=ms, secret=secret)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveApp:
    """The app's server on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, data: dict, *, scheduler: str = "", max_failures: int = 3,
                 backoff_s: float = 1.0):
        from contimg.app.server import AppContext
        from contimg.state import StateDB

        self.ctx = AppContext(db=StateDB(data["db_path"]), products=data["products"],
                              cookie_secret="t" * 48, scheduler=scheduler,
                              max_failures=max_failures, backoff_s=backoff_s)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None

    def __enter__(self):
        from contimg.app.server import make_server

        ready, err = threading.Event(), []

        def run():
            asyncio.set_event_loop(asyncio.new_event_loop())
            try:
                self.server = make_server(self.ctx, port=self.port, address="127.0.0.1")
                self.server.start()
            except Exception as exc:
                err.append(exc)
                ready.set()
                return
            ready.set()
            self.server.io_loop.start()

        self.thread = threading.Thread(target=run, daemon=True, name="contimg-app")
        self.thread.start()
        ready.wait(60)
        if err:
            raise err[0]
        return self

    def __exit__(self, *exc):
        loop = self.server.io_loop

        def stop():
            self.server.stop()
            loop.stop()

        loop.add_callback(stop)
        self.thread.join(10)
