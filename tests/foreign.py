"""Foreign Measurement Sets for interop tests: MSs that contimg did not write.

Session-scoped pytest fixtures (registered from ``conftest.py``), each built once per
session in a few seconds and shrunken (12 antennas, 8 channels, 6 integrations per scan):

* ``casa_sim_ms`` -- made by CASA's own ``simulator`` (casatools, run in a subprocess:
  casatools bundles its own casacore): VLA antennas (a Y of 12 pads), circular feeds
  (RR, LL), three fields observed one scan each -- the calibrator ``3C286`` at its
  field's phase centre, ``TGT1`` and ``TGT2`` each with one tracked point source off the
  phase centre -- with TIME as CASA writes it. CASA predicts each source's unit-flux
  visibilities (``sm.predict``, no primary beam); here they are scaled by the source's
  spectrum, put only into the rows of the source's own field, corrupted by known
  antenna gains and bandpasses and given thermal noise (numpy, fixed seed).
* ``casa_sim_ms_4pol`` -- the same with RR, RL, LR, LL (the sources are unpolarised: RL
  and LR are noise times the cross-hand gains).
* ``pyuvdata_ms`` -- another telescope's data (12 ATA-like 6.1 m antennas, linear feeds,
  XX/YY), simulated with pyuvdata (each source's visibilities phased to the source, then
  re-phased by ``UVData.phase`` to its field's centre, so the geometry is pyuvdata's
  own), corrupted likewise, written as UVH5 (``uvh5``) and with pyuvdata's ``write_ms``.
  Two fields: the calibrator ``3C147`` and ``TGT`` with a source off the phase centre.

Each fixture returns a :class:`ForeignMS` (frozen; the MS must not be modified by a
test -- take ``fms.copy(tmp_path)``). Conventions of the truth it carries:

* ``gains`` (nant, 2) complex and ``bandpass`` (nant, nchan, 2): per antenna and feed
  (R, L or X, Y), constant in time, in the MS's (CASA's) convention: the DATA of row
  (ANTENNA1 = i, ANTENNA2 = j), correlation (p, q) is
  ``g[i, p] b[i, :, p] conj(g[j, q] b[j, :, q]) * model + noise`` -- what CASA's
  ``bandpass`` / ``gaincal`` solve for (up to the reference antenna's phase).
* ``sources``: name, field, ra/dec (ICRS radians), ``flux_jy`` at ``ref_freq_hz``,
  ``alpha``; ``catalog``: a CSV catalogue with the calibrator (its exact simulated
  power law) and a decoy calibrator near the calibrator field's declination that no
  field observes.
* ``sigma``: the noise standard deviation per real/imaginary part of each visibility.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from casarun import run_casa

SEED = 20260315


@dataclasses.dataclass(frozen=True)
class ForeignMS:
    """A foreign MS and the truth it was simulated from (see the module docstring)."""

    path: str
    writer: str                       # "casa-simulator" or "pyuvdata"
    telescope: str
    corr: tuple                       # correlation names in the MS order
    fields: dict                      # FIELD id -> name
    field_dirs: dict                  # name -> (ra, dec) ICRS radians (phase centres)
    scans: dict                       # field name -> (first, last) TIME of its rows (MS s)
    calibrator: str                   # the calibrator's name (= its field's name)
    sources: tuple                    # dicts: name, field, ra, dec, flux_jy, alpha, ref_freq_hz
    catalog: str                      # CSV catalogue: calibrator + an unobserved decoy
    freqs: np.ndarray                 # (nchan,) Hz
    gains: np.ndarray                 # (nant, 2) complex, MS convention
    bandpass: np.ndarray              # (nant, nchan, 2) complex, MS convention
    sigma: float
    dish_diameter_m: float
    uvh5: str | None = None           # pyuvdata: the UVH5 the MS was written from

    def copy(self, dest) -> str:
        """A private copy of the MS under ``dest`` (a directory); its path."""
        dest = Path(dest) / os.path.basename(self.path)
        shutil.copytree(self.path, dest)
        return str(dest)

    def source(self, name):
        return next(s for s in self.sources if s["name"] == name)

    def spectrum(self, name):
        """(nchan,) flux density of source ``name`` at the MS's channels."""
        s = self.source(name)
        return s["flux_jy"] * (self.freqs / s["ref_freq_hz"]) ** s["alpha"]

    def field_id(self, name):
        return next(i for i, n in self.fields.items() if n == name)

    @property
    def parallel(self):
        """Indices of the parallel-hand correlations (RR/LL or XX/YY) in ``corr``."""
        return tuple(i for i, c in enumerate(self.corr) if c[0] == c[1])


# ---------------------------------------------------------------------------------
# truth shared by the simulators
# ---------------------------------------------------------------------------------

def _truth_gains(nant, nchan, seed):
    """Gains (nant, 2) and bandpasses (nant, nchan, 2): |g| 0.8..1.2, any phase;
    bandpass amplitude ripples of ~10 % and a phase slope (delay) plus a wiggle."""
    rng = np.random.default_rng(seed)
    g = rng.uniform(0.8, 1.2, (nant, 2)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (nant, 2)))
    x = np.linspace(-1, 1, nchan)[None, :, None]
    amp = 1 + 0.1 * np.sin(2 * np.pi * (x * rng.uniform(0.5, 1.5, (nant, 1, 2))
                                        + rng.uniform(0, 1, (nant, 1, 2))))
    ph = rng.uniform(-1.0, 1.0, (nant, 1, 2)) * x + 0.2 * np.sin(3 * x + rng.uniform(
        0, 2 * np.pi, (nant, 1, 2)))
    return g, amp * np.exp(1j * ph)


def _corrupt(model, a1, a2, corr_feeds, g, b, sigma, rng):
    """model (nrow, nchan) per correlation list -> DATA (nrow, nchan, ncorr)."""
    nrow, nchan = model.shape
    out = np.empty((nrow, nchan, len(corr_feeds)), np.complex128)
    for k, (p, q) in enumerate(corr_feeds):
        m = model if p == q else 0.0          # unpolarised sky: no cross-hand signal
        gi = g[a1, p][:, None] * b[a1, :, p]
        gj = g[a2, q][:, None] * b[a2, :, q]
        out[..., k] = gi * np.conj(gj) * m
    out += sigma * (rng.standard_normal(out.shape) + 1j * rng.standard_normal(out.shape))
    return out.astype(np.complex64)


def _catalog_csv(path, cal, decoy):
    rows = ["name,ra_deg,dec_deg,flux_jy,alpha,ref_freq_hz"]
    for s in (cal, decoy):
        rows.append(f"{s['name']},{float(np.degrees(s['ra']))!r},"
                    f"{float(np.degrees(s['dec']))!r},{float(s['flux_jy'])!r},"
                    f"{float(s['alpha'])!r},{float(s['ref_freq_hz'])!r}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------
# CASA simulator
# ---------------------------------------------------------------------------------

CASA_SIM = r"""
import json, sys
import numpy as np
from casatools import simulator, measures, table, componentlist
p = json.load(open(sys.argv[1]))
me, sm, tb, cl = measures(), simulator(), table(), componentlist()
ms = p["ms"]
sm.open(ms)
n = len(p["east"])
sm.setconfig(telescopename=p["telescope"], x=p["east"], y=p["north"], z=p["up"],
             dishdiameter=[p["dish"]] * n, mount=["alt-az"] * n,
             antname=[f"ea{i:02d}" for i in range(n)], padname=[f"N{i:02d}" for i in range(n)],
             coordsystem="local", referencelocation=me.observatory(p["telescope"]))
sm.setspwindow(spwname="L", freq=f"{p['f0']}Hz", deltafreq=f"{p['df']}Hz",
               freqresolution=f"{p['df']}Hz", nchannels=p["nchan"], stokes=p["stokes"])
sm.setfeed(mode="perfect R L", pol=[""])
for f in p["fields"]:
    sm.setfield(sourcename=f["name"], sourcedirection=me.direction(
        "J2000", f"{f['ra']}rad", f"{f['dec']}rad"))
sm.setlimits(shadowlimit=0.001, elevationlimit="8.0deg")
sm.setauto(autocorrwt=0.0)
sm.settimes(integrationtime=f"{p['tint']}s", usehourangle=True,
            referencetime=me.epoch("utc", p["date"]))
for s in p["scans"]:
    sm.observe(s["field"], "L", starttime=f"{s['start']}s", stoptime=f"{s['stop']}s")
sm.setdata(fieldid=list(range(len(p["fields"]))))
sm.setvp(dovp=False)
for i, s in enumerate(p["sources"]):
    cl.done()
    cl.addcomponent(dir=me.direction("J2000", f"{s['ra']}rad", f"{s['dec']}rad"),
                    flux=1.0, fluxunit="Jy", freq=f"{p['f0']}Hz", shape="point")
    name = f"{ms}.src{i}.cl"
    cl.rename(name)
    cl.close()
    sm.predict(complist=name, incremental=False)
    tb.open(ms)
    np.save(f"{ms}.src{i}.npy", tb.getcol("DATA")[0].T)     # (nrow, nchan), RR
    tb.close()
sm.close()
"""


def _vla_y(nant=12):
    """Local east/north offsets (m) of ``nant`` pads on the VLA's Y (arms at 5, 125 and
    245 degrees from north), D-configuration-like spacings."""
    per = nant // 3
    dist = 40.0 * 1.9 ** np.arange(per)
    ang = np.radians([5.0, 125.0, 245.0])
    east = np.concatenate([dist * np.sin(a) for a in ang])
    north = np.concatenate([dist * np.cos(a) for a in ang])
    return east, north


def build_casa_sim_ms(workdir, *, stokes="RR LL", seed=SEED, nchan=8, ntime=6):
    """Simulate with CASA (see the module docstring); returns a :class:`ForeignMS`."""
    from casacore import tables as ct

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ms = workdir / ("casa_sim_4pol.ms" if stokes.count(" ") == 3 else "casa_sim.ms")
    arcmin = np.radians(1 / 60)
    cal = dict(name="3C286", field="3C286", ra=np.radians(202.784533),
               dec=np.radians(30.509155), flux_jy=15.0, alpha=-0.45, ref_freq_hz=1.4e9)
    f1 = dict(name="TGT1", ra=np.radians(205.0), dec=np.radians(33.0))
    f2 = dict(name="TGT2", ra=np.radians(200.5), dec=np.radians(28.5))
    s1 = dict(name="S1", field="TGT1", ra=f1["ra"] + 1.5 * arcmin / np.cos(f1["dec"]),
              dec=f1["dec"] + 1.0 * arcmin, flux_jy=2.0, alpha=-0.7, ref_freq_hz=1.4e9)
    s2 = dict(name="S2", field="TGT2", ra=f2["ra"] - 1.0 * arcmin / np.cos(f2["dec"]),
              dec=f2["dec"] + 2.0 * arcmin, flux_jy=1.0, alpha=0.0, ref_freq_hz=1.4e9)
    decoy = dict(name="DECOY", ra=cal["ra"] + np.radians(40.0), dec=cal["dec"] + np.radians(
        0.3), flux_jy=20.0, alpha=-0.7, ref_freq_hz=1.4e9)
    sources = [cal, s1, s2]
    fields = [dict(name=cal["name"], ra=cal["ra"], dec=cal["dec"]), f1, f2]
    tint = 10.0
    scans, t = [], -600.0
    for f in fields:
        scans.append(dict(field=f["name"], start=t, stop=t + ntime * tint))
        t += ntime * tint + 20.0
    east, north = _vla_y()
    f0, df = 1.40e9, 4e6
    p = dict(ms=str(ms), telescope="VLA", east=east.tolist(), north=north.tolist(),
             up=[0.0] * east.size, dish=25.0, f0=f0, df=df, nchan=nchan, stokes=stokes,
             tint=tint, date="2026/03/20", scans=scans,
             fields=[{k: f[k] for k in ("name", "ra", "dec")} for f in fields],
             sources=[dict(ra=s["ra"], dec=s["dec"]) for s in sources])
    (workdir / "sim.json").write_text(json.dumps(p))
    run_casa(workdir, CASA_SIM, workdir / "sim.json", name="casa_sim.py")
    corr = tuple(stokes.split())
    feeds = {"R": 0, "L": 1}
    corr_feeds = [(feeds[c[0]], feeds[c[1]]) for c in corr]
    with ct.table(str(ms), readonly=False, ack=False) as tb:
        a1, a2 = tb.getcol("ANTENNA1"), tb.getcol("ANTENNA2")
        fid = tb.getcol("FIELD_ID")
        time = tb.getcol("TIME")
        with ct.table(str(ms / "SPECTRAL_WINDOW"), ack=False) as sw:
            freqs = sw.getcell("CHAN_FREQ", 0)
        nant = ct.table(str(ms / "ANTENNA"), ack=False).nrows()
        model = np.zeros((a1.size, freqs.size), complex)
        names = [f["name"] for f in fields]
        for i, s in enumerate(sources):
            unit = np.load(f"{ms}.src{i}.npy")
            spec = s["flux_jy"] * (freqs / s["ref_freq_hz"]) ** s["alpha"]
            rows = fid == names.index(s["field"])
            model[rows] += unit[rows] * spec
            os.remove(f"{ms}.src{i}.npy")
            shutil.rmtree(f"{ms}.src{i}.cl", ignore_errors=True)
        g, b = _truth_gains(nant, freqs.size, seed)
        sigma = 0.05
        data = _corrupt(model, a1, a2, corr_feeds, g, b, sigma, np.random.default_rng(seed + 1))
        tb.putcol("DATA", data)
        tb.putcol("CORRECTED_DATA", data)
        tb.putcol("MODEL_DATA", np.ones_like(data))     # CASA's default (clearcal) model
        tb.putcol("SIGMA", np.full((a1.size, len(corr)), sigma * np.sqrt(2), np.float32))
        tb.putcol("WEIGHT", np.full((a1.size, len(corr)), 1 / (2 * sigma ** 2), np.float32))
    scan_t = {n: (float(time[fid == i].min()), float(time[fid == i].max()))
              for i, n in enumerate(names)}
    return ForeignMS(
        path=str(ms), writer="casa-simulator", telescope="VLA", corr=corr,
        fields=dict(enumerate(names)),
        field_dirs={f["name"]: (f["ra"], f["dec"]) for f in fields}, scans=scan_t,
        calibrator=cal["name"], sources=tuple(sources),
        catalog=_catalog_csv(workdir / "catalog.csv", cal, decoy), freqs=freqs, gains=g,
        bandpass=b, sigma=sigma, dish_diameter_m=25.0)


# ---------------------------------------------------------------------------------
# pyuvdata
# ---------------------------------------------------------------------------------

ATA = dict(lat=40.817431, lon=-121.472814, alt=1019.222)


def build_pyuvdata_ms(workdir, **kw):
    """Simulate with pyuvdata (see the module docstring); returns a :class:`ForeignMS`."""
    import warnings

    with warnings.catch_warnings():
        return _build_pyuvdata_ms(workdir, **kw)


def _build_pyuvdata_ms(workdir, *, seed=SEED + 7, nchan=8, ntime=6, nant=12):
    import warnings

    from astropy import units as u
    from astropy.coordinates import EarthLocation
    from astropy.time import Time
    from casacore import tables as ct
    from pyuvdata import Telescope, UVData

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    loc = EarthLocation.from_geodetic(ATA["lon"] * u.deg, ATA["lat"] * u.deg,
                                      ATA["alt"] * u.m)
    # antennas: a random 12-element layout within ~300 m (ENU -> ECEF offsets)
    enu = np.column_stack([rng.uniform(-150, 150, nant), rng.uniform(-150, 150, nant),
                           rng.uniform(-1, 1, nant)])
    lat, lon = np.radians(ATA["lat"]), np.radians(ATA["lon"])
    rot = np.array([[-np.sin(lon), -np.sin(lat) * np.cos(lon), np.cos(lat) * np.cos(lon)],
                    [np.cos(lon), -np.sin(lat) * np.sin(lon), np.cos(lat) * np.sin(lon)],
                    [0.0, np.cos(lat), np.sin(lat)]])
    pos = enu @ rot.T
    warnings.simplefilter("ignore")      # pyuvdata's notes on known telescopes and uvw
    tel = Telescope.new(name="ATA", location=loc, antenna_positions=pos,
                        antenna_names=[f"1{c}{i}" for i, c in zip(range(nant), "abcdefghijkl")],
                        antenna_numbers=list(range(nant)), antenna_diameters=[6.1] * nant,
                        instrument="ATA", feeds=["x", "y"], feed_angle=[np.pi / 2, 0.0],
                        mount_type="alt-az", update_from_known=False)
    cal = dict(name="3C147", field="3C147", ra=np.radians(85.650575),
               dec=np.radians(49.852009), flux_jy=22.0, alpha=-0.7, ref_freq_hz=1.4e9)
    tgt = dict(name="TGT", ra=np.radians(88.0), dec=np.radians(47.0))
    arcmin = np.radians(1 / 60)
    src = dict(name="S3", field="TGT", ra=tgt["ra"] + 3.0 * arcmin / np.cos(tgt["dec"]),
               dec=tgt["dec"] - 2.0 * arcmin, flux_jy=3.0, alpha=-0.7, ref_freq_hz=1.4e9)
    decoy = dict(name="DECOY", ra=cal["ra"] - np.radians(60.0), dec=cal["dec"] + np.radians(
        0.2), flux_jy=20.0, alpha=-0.7, ref_freq_hz=1.4e9)
    freqs = 1.36e9 + 5e6 * np.arange(nchan)
    tint = 10.0
    # start near the calibrator's transit at ATA (LST = its RA)
    t0 = Time("2024-03-01T00:00:00", scale="utc", location=loc)
    lst0 = t0.sidereal_time("mean").rad
    dt_day = ((cal["ra"] - lst0) % (2 * np.pi)) / (2 * np.pi) / 1.0027379
    jd0 = t0.jd + dt_day - 300 / 86400
    antpairs = [(i, j) for i in range(nant) for j in range(i + 1, nant)]
    g, b = _truth_gains(nant, nchan, seed + 1)
    parts = []
    for k, (field, members) in enumerate(((cal, [cal]), (tgt, [src]))):
        times = jd0 + (k * (ntime * tint + 30) + tint * (np.arange(ntime) + 0.5)) / 86400
        total = None
        for s in members:
            uvd = UVData.new(freq_array=freqs, polarization_array=np.array([-5, -6]), times=times,
                             telescope=tel, antpairs=antpairs, do_blt_outer=True,
                             integration_time=tint, channel_width=5e6,
                             phase_center_catalog={0: dict(
                                 cat_name=s["name"], cat_type="sidereal", cat_lon=s["ra"],
                                 cat_lat=s["dec"], cat_frame="icrs")},
                             vis_units="Jy", empty=True)
            spec = s["flux_jy"] * (freqs / s["ref_freq_hz"]) ** s["alpha"]
            uvd.data_array[:] = spec[None, :, None]
            if s is not field:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    uvd.phase(lon=field["ra"], lat=field["dec"], cat_name=field["name"],
                              cat_type="sidereal", phase_frame="icrs")
            if total is None:
                total = uvd
            else:
                total.data_array += uvd.data_array
        parts.append(total)
    uvd = parts[0] + parts[1]
    a1, a2 = uvd.ant_1_array, uvd.ant_2_array
    sigma = 0.05
    # pyuvdata's convention: V_12 = <E_1 E_2*>: the same form as the MS truth above
    uvd.data_array[:] = _corrupt(uvd.data_array[..., 0], a1, a2, [(0, 0), (1, 1)], g, b,
                                 sigma, np.random.default_rng(seed + 2))
    uvd.nsample_array[:] = 1.0
    uvd.history += "contimg tests/foreign.py: simulated"
    h5 = workdir / "ata_sim.uvh5"
    uvd.write_uvh5(str(h5), clobber=True)
    ms = workdir / "ata_sim.ms"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uvd.write_ms(str(ms), clobber=True)
    # the truth in the MS's convention: check which of g / conj(g) the written DATA carry
    with ct.table(str(ms), ack=False) as tb:
        d = tb.getcol("DATA")
        m1, m2 = tb.getcol("ANTENNA1"), tb.getcol("ANTENNA2")
        fid = tb.getcol("FIELD_ID")
        time = tb.getcol("TIME")
    with ct.table(str(ms / "FIELD"), ack=False) as tf:
        fnames = list(tf.getcol("NAME"))
    calrows = fid == fnames.index(cal["name"])
    spec = cal["flux_jy"] * (freqs / cal["ref_freq_hz"]) ** cal["alpha"]
    best = None
    for conj in (False, True):
        gg, bb = (np.conj(g), np.conj(b)) if conj else (g, b)
        pred = _corrupt(np.broadcast_to(spec, (int(calrows.sum()), nchan)), m1[calrows],
                        m2[calrows], [(0, 0), (1, 1)], gg, bb, 0.0, rng)
        r = float(np.sqrt(np.mean(np.abs(d[calrows] - pred) ** 2)))
        if best is None or r < best[0]:
            best = (r, gg, bb)
    if best[0] > 3 * sigma:
        raise AssertionError(f"{ms}: DATA do not match the simulated truth (rms {best[0]})")
    names = fnames
    scan_t = {n: (float(time[fid == i].min()), float(time[fid == i].max()))
              for i, n in enumerate(names)}
    return ForeignMS(
        path=str(ms), writer="pyuvdata", telescope="ATA", corr=("XX", "YY"),
        fields=dict(enumerate(names)),
        field_dirs={cal["name"]: (cal["ra"], cal["dec"]), tgt["name"]: (tgt["ra"], tgt["dec"])},
        scans=scan_t, calibrator=cal["name"], sources=(cal, src),
        catalog=_catalog_csv(workdir / "catalog.csv", cal, decoy), freqs=freqs,
        gains=best[1], bandpass=best[2], sigma=sigma, dish_diameter_m=6.1, uvh5=str(h5))


# ---------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------

def _need(module):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


@pytest.fixture(scope="session")
def casa_sim_ms(tmp_path_factory):
    """CASA-simulated VLA MS, RR/LL, fields 3C286 (calibrator), TGT1, TGT2."""
    _need("casatools")
    return build_casa_sim_ms(tmp_path_factory.mktemp("casa_sim"))


@pytest.fixture(scope="session")
def casa_sim_ms_4pol(tmp_path_factory):
    """As ``casa_sim_ms`` with RR, RL, LR, LL."""
    _need("casatools")
    return build_casa_sim_ms(tmp_path_factory.mktemp("casa_sim_4pol"), stokes="RR RL LR LL")


@pytest.fixture(scope="session")
def pyuvdata_ms(tmp_path_factory):
    """ATA-like XX/YY data simulated with pyuvdata, UVH5 + pyuvdata ``write_ms``; fields
    3C147 (calibrator) and TGT."""
    _need("pyuvdata")
    return build_pyuvdata_ms(tmp_path_factory.mktemp("pyuvdata_ms"))
