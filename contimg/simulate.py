"""A realistic DSA-110 UVH5 simulator.

Writes groups of 16 subband files exactly as the telescope does: names
``YYYY-MM-DDTHH:MM:SS_sbNN.hdf5`` (timestamps jittered by a few seconds between
subbands), descending frequency (sb00 highest, channels descending inside each file),
48 channels of 244.140625 kHz, 24 integrations of 12.884902 s, XX/YY, the pointing
declination in ``Header/extra_keywords/phase_center_dec``, and visibilities phased to
the meridian (HA = 0) at each integration's time (one sidereal phase centre per
integration in the file's ``phase_center_catalog``).

Content: point sources with spectral indices seen through the 4.65 m Airy primary
beam (optionally a bright calibrator that transits in a chosen group), per-antenna
complex bandpasses and slowly varying gains, thermal noise at a chosen SEFD, and
injected RFI (narrow-band persistent lines, broad-band bursts, bad antennas and bad
channels). The truth (sky, true gains, RFI mask) is saved beside the files in
``<stamp>_truth.npz``. Everything is deterministic from the seed.

The header is written by pyuvdata itself (``initialize_uvh5_file``), so any UVH5 reader
accepts it; the data are written with h5py in one contiguous block per file.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time as _time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from contimg import telescope as tel
from kernels.constants import SECONDS_PER_DAY, UNIX_JD0
from kernels.predict import apply_gains, predict_uniform

log = logging.getLogger(__name__)


CALIBRATOR_NAME = "SIMCAL"   # the name of the simulator's transiting calibrator
CALIBRATOR_CATALOG = "calibrators.csv"   # written beside the files of a calibrator group


@dataclass
class RFIConfig:
    """Injected interference. Amplitudes are in units of the per-visibility noise σ."""

    n_lines: int = 3            # narrow-band persistent lines (1-2 channels each)
    n_bursts: int = 2           # broad-band bursts (1 integration, part of the band)
    n_bad_antennas: int = 1     # antennas whose data are garbage
    n_bad_channels: int = 2     # channels with very high noise on every baseline
    min_snr: float = 5.0        # weakest injected RFI, in σ
    max_snr: float = 50.0       # strongest injected RFI, in σ


#: group-size knobs beyond DSA-110 (:func:`scaled`): more antennas extend the T layout's
#: arms, more channels per subband split the same band finer, more integrations make
#: longer groups
MAX_ANTENNAS = 2048
MAX_CHAN_PER_SUBBAND = 48 * 64
SCALE_AXES = ("antennas", "channels", "times")


@dataclass
class SimConfig:
    """What to simulate. Defaults: a full-size DSA-110 group."""

    n_ant: int = tel.N_CORRELATED
    n_subbands: int = tel.N_SUBBANDS
    n_chan: int = tel.N_CHAN_PER_SUBBAND
    n_times: int = tel.N_INTEGRATIONS
    dec_deg: float = tel.DEFAULT_DEC_DEG
    sefd_jy: float = 5800.0
    noise: bool = True
    source_density: float = 1.0      # sources per square degree above min_flux
    min_flux_jy: float = 0.05
    max_flux_jy: float = 2.0
    min_apparent_flux_jy: float = 0.002  # sources fainter than this in the beam are left out
    max_sep_deg: float = 6.0             # main lobe and first sidelobe of the 4.65 m Airy beam
    calibrator_flux_jy: float = 20.0  # flux at 1.4 GHz of the transiting calibrator
    calibrator_alpha: float = -0.7
    gains: bool = True
    rfi: RFIConfig | None = field(default_factory=RFIConfig)
    name_jitter_s: float = 2.0       # file-name timestamps differ by up to this much
    seed: int = 1
    threads: int = 2

    def __post_init__(self):
        if not 1 <= self.n_subbands <= tel.N_SUBBANDS:
            raise ValueError(f"n_subbands must be 1..{tel.N_SUBBANDS}, got {self.n_subbands}")
        if not 2 <= self.n_ant <= MAX_ANTENNAS:
            raise ValueError(f"n_ant must be 2..{MAX_ANTENNAS}, got {self.n_ant} (beyond "
                             f"{tel.N_STATIONS} the T layout's arms are extended)")
        if not 1 <= self.n_chan <= MAX_CHAN_PER_SUBBAND:
            raise ValueError(f"n_chan must be 1..{MAX_CHAN_PER_SUBBAND}, got {self.n_chan} "
                             f"(beyond {tel.N_CHAN_PER_SUBBAND} the channels get narrower)")
        if self.n_times < 1:
            raise ValueError(f"n_times must be >= 1, got {self.n_times}")


@dataclass
class SimulatedGroup:
    stamp: str                  # group name: the earliest file-name timestamp
    files: list[Path]
    truth: Path
    start: _dt.datetime | None = None  # exact UTC start of the first integration

    def load_truth(self) -> dict:
        return load_truth(self.truth)


# ---------------------------------------------------------------------------------
# sky
# ---------------------------------------------------------------------------------

def make_sky(cfg: SimConfig, dec_icrs_deg: float) -> dict:
    """Sources in a strip of +-6 deg around the pointing declination, all RAs."""
    rng = np.random.default_rng([cfg.seed, 7])
    half = 6.0
    d0, d1 = np.radians(dec_icrs_deg - half), np.radians(dec_icrs_deg + half)
    area = 2 * np.pi * (np.sin(min(d1, np.pi / 2)) - np.sin(max(d0, -np.pi / 2)))
    area_deg2 = area * (180 / np.pi) ** 2
    n = rng.poisson(cfg.source_density * area_deg2)
    ra = rng.uniform(0, 2 * np.pi, n)
    dec = np.arcsin(rng.uniform(np.sin(d0), np.sin(min(d1, np.pi / 2)), n))
    # N(>S) ~ S^-1.5 between min and max flux
    a = -1.5
    u = rng.uniform(0, 1, n)
    smin, smax = cfg.min_flux_jy, cfg.max_flux_jy
    flux = (smin ** a + u * (smax ** a - smin ** a)) ** (1 / a)
    alpha = rng.normal(-0.7, 0.2, n)
    names = np.array([f"SIM{i:05d}" for i in range(n)])
    return dict(ra=ra, dec=dec, flux=flux, alpha=alpha, name=names,
                ref_freq=np.full(n, 1.4e9))


def _add_source(sky, name, ra, dec, flux, alpha):
    for key, val in (("ra", ra), ("dec", dec), ("flux", flux), ("alpha", alpha),
                     ("ref_freq", 1.4e9)):
        sky[key] = np.append(sky[key], val)
    sky["name"] = np.append(sky["name"], name)


def _apparent_geometry(meta, sky, ntime, nbl):
    from pyuvdata.utils import phasing

    uv = meta["uv"]
    loc = uv.telescope.location
    tsel = slice(None, None, nbl)  # time-major blts: one row per integration
    app_ra0, app_dec0 = uv.phase_center_app_ra[tsel], uv.phase_center_app_dec[tsel]
    uvw_app = phasing.calc_uvw(
        app_ra=uv.phase_center_app_ra, app_dec=uv.phase_center_app_dec,
        frame_pa=np.zeros(uv.Nblts), lst_array=uv.lst_array, use_ant_pos=True,
        antenna_positions=uv.telescope.antenna_positions,
        antenna_numbers=uv.telescope.antenna_numbers,
        ant_1_array=uv.ant_1_array, ant_2_array=uv.ant_2_array,
        telescope_lat=loc.lat.rad, telescope_lon=loc.lon.rad,
    ).reshape(ntime, nbl, 3)
    nsrc = len(sky["ra"])
    if nsrc == 0:
        z = np.zeros((ntime, 0))
        return uvw_app, (z, z, z)
    t = np.repeat(meta["times_jd"], nsrc)
    app_ra, app_dec = phasing.transform_icrs_to_app(
        time_array=t, ra=np.tile(sky["ra"], ntime), dec=np.tile(sky["dec"], ntime),
        telescope_loc=loc)
    app_ra = np.asarray(app_ra).reshape(ntime, nsrc)
    app_dec = np.asarray(app_dec).reshape(ntime, nsrc)
    return uvw_app, _lmn(app_ra, app_dec, app_ra0[:, None], app_dec0[:, None])


def _lmn(ra, dec, ra0, dec0):
    """Direction cosines of (ra, dec) about (ra0, dec0); returns l, m, n - 1."""
    dra = ra - ra0
    cd = np.cos(dec)
    l = cd * np.sin(dra)
    m = np.sin(dec) * np.cos(dec0) - cd * np.sin(dec0) * np.cos(dra)
    n = np.sin(dec) * np.sin(dec0) + cd * np.cos(dec0) * np.cos(dra)
    return l, m, n - 1.0


# ---------------------------------------------------------------------------------
# instrument
# ---------------------------------------------------------------------------------

def layout_enu(n_ant: int = tel.N_CORRELATED) -> tuple[np.ndarray, list[str]]:
    """Station positions (ENU metres) and names: DSA-110's 117 (:func:`telescope.t_layout_enu`)
    and, for ``n_ant`` beyond them, more stations that continue the east-west and
    north-south arms outwards at the arms' spacing (alternately east, west, north),
    so that a larger simulated array keeps the T's shape."""
    enu, names = tel.t_layout_enu()
    extra = n_ant - enu.shape[0]
    if extra <= 0:
        return enu, names
    rng = np.random.default_rng([110, n_ant])
    pos = np.zeros((extra, 3))
    k = np.arange(extra)
    step = 1 + k // 3
    ew_step, ns_step = 400.0 / 50, 440.0 / 51
    east, west, north = k % 3 == 0, k % 3 == 1, k % 3 == 2
    pos[east, 0] = 200.0 + step[east] * ew_step
    pos[west, 0] = -200.0 - step[west] * ew_step
    pos[north, 1] = 440.0 + step[north] * ns_step
    pos[:, :2] += rng.normal(scale=0.3, size=(extra, 2))
    pos[:, 2] += rng.normal(scale=0.5, size=extra)
    return (np.concatenate([enu, pos]),
            names + [f"pad{enu.shape[0] + i + 1}" for i in range(extra)])


def scaled(factor: float, axis: str = "antennas", base: SimConfig | None = None) -> SimConfig:
    """A simulator configuration whose groups hold ``factor`` times the visibilities of
    ``base`` (default: a full DSA-110 group), grown along one ``axis``:

    * ``"antennas"``: the smallest antenna count whose baselines (with autos) reach
      ``factor`` times ``base``'s (e.g. 96 -> 136 for 2x, 193 for 4x); beyond 117
      stations the T layout's arms are extended (:func:`layout_enu`);
    * ``"channels"``: ``factor`` times the channels per subband over the same band
      (narrower channels; 48 -> 96 for 2x);
    * ``"times"``: ``factor`` times the integrations per group (longer groups).

    The other fields are ``base``'s. Channels and times need ``factor * base`` to be a
    whole number.
    """
    from dataclasses import replace

    base = base or SimConfig()
    factor = float(factor)
    if not factor > 0:
        raise ValueError(f"scale factor must be > 0, got {factor}")
    if axis == "antennas":
        want = factor * base.n_ant * (base.n_ant + 1) / 2
        n = int(np.ceil((np.sqrt(1 + 8 * want) - 1) / 2 - 1e-9))
        return replace(base, n_ant=max(2, n))
    if axis not in ("channels", "times"):
        raise ValueError(f"scale axis must be one of {', '.join(SCALE_AXES)}, got {axis!r}")
    key = "n_chan" if axis == "channels" else "n_times"
    n = factor * getattr(base, key)
    if abs(n - round(n)) > 1e-6 or round(n) < 1:
        raise ValueError(f"scaling {axis} ({getattr(base, key)}) by {factor:g} gives "
                         f"{n:g}: not a whole number")
    return replace(base, **{key: int(round(n))})


def n_visibilities(cfg: SimConfig) -> int:
    """Complex visibilities of one group (baselines with autos x channels x times x 2 pol)."""
    return (cfg.n_ant * (cfg.n_ant + 1) // 2 * cfg.n_subbands * cfg.n_chan * cfg.n_times
            * len(tel.POLARIZATIONS))


def _antenna_params(cfg: SimConfig, n_stations: int):
    rng = np.random.default_rng([cfg.seed, 11])
    p = dict(
        delay_ns=rng.normal(0, 1.5, (n_stations, 2)),
        bp_amp=rng.uniform(0.8, 1.2, (n_stations, 2)),
        ripple_amp=rng.uniform(0.02, 0.08, (n_stations, 2)),
        ripple_period_mhz=rng.uniform(20, 60, (n_stations, 2)),
        ripple_phase=rng.uniform(0, 2 * np.pi, (n_stations, 2)),
        phase0=rng.uniform(-np.pi, np.pi, (n_stations, 2)),
        g_amp_var=rng.uniform(0.01, 0.04, (n_stations, 2)),
        g_amp_period_h=rng.uniform(1, 4, (n_stations, 2)),
        g_amp_phase=rng.uniform(0, 2 * np.pi, (n_stations, 2)),
        g_ph_var=rng.uniform(0.05, 0.3, (n_stations, 2)),
        g_ph_period_h=rng.uniform(0.5, 3, (n_stations, 2)),
        g_ph_phase=rng.uniform(0, 2 * np.pi, (n_stations, 2)),
    )
    return p


def true_bandpass(params, stations, freqs_hz) -> np.ndarray:
    """(nant, nchan, 2) complex bandpass of the given station indices."""
    f = np.asarray(freqs_hz)[None, :, None]
    s = np.asarray(stations)
    amp = params["bp_amp"][s][:, None, :] * (
        1 + params["ripple_amp"][s][:, None, :]
        * np.sin(2 * np.pi * (f - 1.3e9) / (params["ripple_period_mhz"][s][:, None, :] * 1e6)
                 + params["ripple_phase"][s][:, None, :]))
    phase = (2 * np.pi * params["delay_ns"][s][:, None, :] * 1e-9 * (f - 1.4e9)
             + params["phase0"][s][:, None, :])
    return amp * np.exp(1j * phase)


def true_gains(params, stations, times_unix) -> np.ndarray:
    """(ntime, nant, 2) slowly varying complex gains at absolute unix times."""
    t_h = (np.asarray(times_unix) / 3600.0)[:, None, None]
    s = np.asarray(stations)
    amp = 1 + params["g_amp_var"][s][None] * np.sin(
        2 * np.pi * t_h / params["g_amp_period_h"][s][None] + params["g_amp_phase"][s][None])
    ph = params["g_ph_var"][s][None] * np.sin(
        2 * np.pi * t_h / params["g_ph_period_h"][s][None] + params["g_ph_phase"][s][None])
    return amp * np.exp(1j * ph)


# ---------------------------------------------------------------------------------
# metadata (via pyuvdata, so the header is what every UVH5 reader expects)
# ---------------------------------------------------------------------------------

def _metadata(cfg: SimConfig, start: _dt.datetime):
    from astropy import units as u
    from astropy.coordinates import EarthLocation
    from pyuvdata import Telescope, UVData
    from pyuvdata.utils import phasing, times as uvtimes

    enu_all, names_all = layout_enu(cfg.n_ant)
    stations = (tel.correlated_subset(cfg.n_ant) if cfg.n_ant <= tel.N_STATIONS
                else np.arange(cfg.n_ant))
    lat, lon = np.radians(tel.SITE_LAT_DEG), np.radians(tel.SITE_LON_DEG)
    rel_ecef = enu_all @ tel.enu_to_ecef_rotation(lat, lon).T
    location = EarthLocation.from_geodetic(tel.SITE_LON_DEG * u.deg, tel.SITE_LAT_DEG * u.deg,
                                           tel.SITE_ALT_M * u.m)
    telescope = Telescope.new(
        name=tel.TELESCOPE_NAME, location=location, antenna_positions=rel_ecef,
        antenna_names=names_all, antenna_numbers=np.arange(len(names_all)),
        instrument=tel.TELESCOPE_NAME, antenna_diameters=np.full(len(names_all),
                                                                 tel.DISH_DIAMETER_M),
        mount_type="alt-az", feeds=["x", "y"], feed_angle=[np.pi / 2, 0.0],
    )
    t0 = start.replace(tzinfo=_dt.timezone.utc).timestamp()
    times_unix = t0 + (np.arange(cfg.n_times) + 0.5) * tel.INTEGRATION_S
    times_jd = times_unix / SECONDS_PER_DAY + UNIX_JD0
    lst = uvtimes.get_lst_for_time(times_jd, telescope_loc=location)
    dec_app = np.radians(cfg.dec_deg)
    ra_icrs, dec_icrs = phasing.calc_sidereal_coords(
        time_array=times_jd, app_ra=lst, app_dec=np.full_like(lst, dec_app),
        telescope_loc=location, coord_frame="icrs")
    ra_icrs = np.asarray(ra_icrs, dtype=float).reshape(-1)
    dec_icrs = np.asarray(dec_icrs, dtype=float).reshape(-1)
    catalog = {}
    for i in range(cfg.n_times):
        catalog[i] = dict(cat_name=f"meridian_{i:02d}", cat_type="sidereal",
                          cat_lon=float(ra_icrs[i]), cat_lat=float(dec_icrs[i]),
                          cat_frame="icrs", cat_epoch=2000.0, cat_times=None,
                          cat_pm_ra=None, cat_pm_dec=None, cat_vrad=None, cat_dist=None,
                          info_source="user")
    antpairs = [(int(stations[i]), int(stations[j]))
                for i in range(len(stations)) for j in range(i, len(stations))]
    nbl = len(antpairs)
    freqs0 = tel.subband_frequencies(0, cfg.n_chan)
    with warnings.catch_warnings():
        # pyuvdata computes the uvw of the (empty) object from the antenna positions
        warnings.simplefilter("ignore", UserWarning)
        uv = _new_uvdata(UVData, freqs0, times_jd, telescope, antpairs, catalog, nbl, cfg)
    # Exact per-integration ICRS uvw (pyuvdata's calc_uvw reuses one rotation for
    # integrations that share an hour angle and declination, which meridian phasing
    # makes all of them; that leaves ~5 mm errors in u, v).
    from contimg.uvw import compute_uvw

    loc_xyz = np.array([location.x.value, location.y.value, location.z.value])
    a1 = np.array([p[0] for p in antpairs])
    a2 = np.array([p[1] for p in antpairs])
    uv.uvw_array = compute_uvw(rel_ecef + loc_xyz, a1, a2, times_unix, ra_icrs, dec_icrs,
                               telescope_location=loc_xyz).reshape(-1, 3)
    uv.extra_keywords["phase_center_dec"] = float(dec_app)
    uv.extra_keywords["ha_phase_center"] = 0.0
    uv.extra_keywords["simulated"] = True
    return dict(uv=uv, stations=stations, times_unix=times_unix, times_jd=times_jd,
                lst=lst, ra_icrs=ra_icrs, dec_icrs=dec_icrs, nbl=nbl,
                ant1=np.array([p[0] for p in antpairs]),
                ant2=np.array([p[1] for p in antpairs]))


def _new_uvdata(UVData, freqs0, times_jd, telescope, antpairs, catalog, nbl, cfg):
    return UVData.new(
        freq_array=freqs0, polarization_array=["xx", "yy"], times=times_jd,
        telescope=telescope, antpairs=antpairs, do_blt_outer=True,
        time_axis_faster_than_bls=False, integration_time=tel.INTEGRATION_S,
        channel_width=tel.subband_channel_width(cfg.n_chan), update_telescope_from_known=False,
        phase_center_catalog=catalog,
        phase_center_id_array=np.repeat(np.arange(cfg.n_times), nbl),
        vis_units="uncalib", history="Simulated by contimg.simulate",
        x_orientation="east",
    )


# ---------------------------------------------------------------------------------
# one group
# ---------------------------------------------------------------------------------

def _group_seed(cfg: SimConfig, t0: float) -> list[int]:
    return [cfg.seed, int(round(t0))]


def _plan_rfi(cfg: SimConfig, rng, ntime, nchan_total, stations):
    """RFI events and the truth mask (ntime, nchan_total) in ascending-frequency order."""
    r = cfg.rfi
    tf = np.zeros((ntime, nchan_total), bool)
    events = []
    if r is None:
        return tf, events, np.array([], int), np.array([], int)
    for _ in range(r.n_lines):
        c = int(rng.integers(0, nchan_total))
        width = int(rng.integers(1, 3))
        t_a = int(rng.integers(0, max(ntime // 2, 1)))
        t_b = int(rng.integers(t_a + 1, ntime + 1))
        snr = float(np.exp(rng.uniform(np.log(r.min_snr), np.log(r.max_snr))))
        sl = (slice(t_a, t_b), slice(c, min(c + width, nchan_total)))
        tf[sl] = True
        events.append(("line", sl, snr))
    for _ in range(r.n_bursts):
        t = int(rng.integers(0, ntime))
        c_a = int(rng.integers(0, nchan_total // 2 + 1))
        c_b = int(rng.integers(c_a + max(nchan_total // 4, 1), nchan_total + 1))
        snr = float(np.exp(rng.uniform(np.log(r.min_snr), np.log(r.max_snr))))
        sl = (slice(t, t + 1), slice(c_a, c_b))
        tf[sl] = True
        events.append(("burst", sl, snr))
    bad_chan = np.sort(rng.choice(nchan_total, size=min(r.n_bad_channels, nchan_total),
                                  replace=False)) if r.n_bad_channels else np.array([], int)
    tf[:, bad_chan] = True
    bad_ant = (np.sort(rng.choice(stations, size=min(r.n_bad_antennas, len(stations)),
                                  replace=False)) if r.n_bad_antennas else np.array([], int))
    return tf, events, bad_chan, bad_ant


def simulate_group(outdir, start="2026-01-15T08:00:00", cfg: SimConfig | None = None,
                   calibrator: bool | dict = False, sky: dict | None = None,
                   progress=None) -> SimulatedGroup:
    """Write one group of subband files into ``outdir``; return its paths and truth.

    ``start`` is the start of the first integration (UTC). ``calibrator=True`` adds a
    bright source (``cfg.calibrator_flux_jy``) that transits the meridian at the
    middle of this group; a dict ``{"name", "ra", "dec", "flux", "alpha"}`` (radians,
    Jy at 1.4 GHz) places one explicitly. ``sky`` overrides the generated sky.
    """
    cfg = cfg or SimConfig()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if isinstance(start, str):
        start = _dt.datetime.fromisoformat(start)
    start = start.replace(tzinfo=None)  # file names keep whole seconds, times do not
    tic = _time.perf_counter()
    meta = _metadata(cfg, start)
    uv = meta["uv"]
    ntime, nbl = cfg.n_times, meta["nbl"]
    stations = meta["stations"]
    t0 = meta["times_unix"][0]
    rng = np.random.default_rng(_group_seed(cfg, t0))

    if sky is None:
        sky = make_sky(cfg, float(np.degrees(np.mean(meta["dec_icrs"]))))
    else:
        sky = {k: np.asarray(v) for k, v in sky.items()}
    if calibrator:
        mid = ntime // 2
        if calibrator is True:
            calibrator = dict(name=CALIBRATOR_NAME, ra=float(meta["ra_icrs"][mid]),
                              dec=float(meta["dec_icrs"][mid]),
                              flux=cfg.calibrator_flux_jy, alpha=cfg.calibrator_alpha)
        _add_source(sky, calibrator["name"], calibrator["ra"], calibrator["dec"],
                    calibrator["flux"], calibrator.get("alpha", -0.7))

    # Geometry in the apparent (of date) frame, where the delay b.(s - s0) is exact:
    # apparent uvw towards each integration's phase centre and apparent source
    # positions (this includes aberration, which differs across a 3 deg field).
    uvw, (l, m, n1) = _apparent_geometry(meta, sky, ntime, nbl)
    sep = np.arccos(np.clip(n1 + 1.0, -1, 1))                       # (ntime, nsrc)
    fmin = tel.subband_frequencies(tel.N_SUBBANDS - 1)[-1]
    apparent = sky["flux"][None, :] * tel.airy_beam(sep, fmin)
    keep = np.max(apparent, axis=0) > cfg.min_apparent_flux_jy
    keep &= np.min(sep, axis=0) < np.radians(cfg.max_sep_deg)
    lmn = np.ascontiguousarray(np.stack([l[:, keep], m[:, keep], n1[:, keep]], axis=-1))
    src_flux, src_alpha = sky["flux"][keep], sky["alpha"][keep]
    src_sep = sep[:, keep]
    log.info("group %s: %d sources in the beam, %d antennas, %d baselines",
             start.isoformat(), int(keep.sum()), len(stations), nbl)

    params = _antenna_params(cfg, max(tel.N_STATIONS, cfg.n_ant))
    nchan_total = cfg.n_subbands * cfg.n_chan
    # ascending-frequency axis of the whole group (for the truth)
    freqs_desc = np.concatenate([tel.subband_frequencies(sb, cfg.n_chan)
                                 for sb in range(cfg.n_subbands)])
    freqs_asc = freqs_desc[::-1]
    gains_t = (true_gains(params, stations, meta["times_unix"]) if cfg.gains
               else np.ones((ntime, len(stations), 2), complex))
    bandpass_asc = (true_bandpass(params, stations, freqs_asc) if cfg.gains
                    else np.ones((len(stations), nchan_total, 2), complex))
    sigma = cfg.sefd_jy / np.sqrt(2 * tel.subband_channel_width(cfg.n_chan) * tel.INTEGRATION_S)

    tf_asc, events, bad_chan_asc, bad_ant_st = _plan_rfi(cfg, rng, ntime, nchan_total, stations)
    station_index = {int(s): i for i, s in enumerate(stations)}
    ant1_idx = np.array([station_index[a] for a in meta["ant1"]], np.int64)
    ant2_idx = np.array([station_index[a] for a in meta["ant2"]], np.int64)
    bad_ant_idx = np.array([station_index[int(a)] for a in bad_ant_st], np.int64)
    autos = ant1_idx == ant2_idx
    rfi_phase_seed = rng.integers(0, 2**31)

    stamps = []
    for sb in range(cfg.n_subbands):
        jitter = 0 if sb == 0 or cfg.name_jitter_s <= 0 else int(
            rng.integers(-cfg.name_jitter_s, cfg.name_jitter_s + 1))
        stamps.append((start + _dt.timedelta(seconds=jitter)).strftime("%Y-%m-%dT%H:%M:%S"))

    def one_subband(sb):
        freqs = tel.subband_frequencies(sb, cfg.n_chan)                      # descending
        asc_idx = nchan_total - 1 - (sb * cfg.n_chan + np.arange(cfg.n_chan))  # positions in asc axis
        srng = np.random.default_rng(_group_seed(cfg, t0) + [sb])
        beam = tel.airy_beam(src_sep[:, :, None], freqs[None, None, :])      # (t, s, c)
        spec = (freqs[None, :] / 1.4e9) ** src_alpha[:, None]                # (s, c)
        flux = np.ascontiguousarray(src_flux[None, :, None] * spec[None] * beam)
        model = np.zeros((ntime, nbl, cfg.n_chan), np.complex128)
        out = np.zeros((ntime, nbl, cfg.n_chan, 2), np.complex64)
        if cfg.noise:
            out.real = srng.standard_normal(out.shape, dtype=np.float32)
            out.imag = srng.standard_normal(out.shape, dtype=np.float32)
            out *= np.float32(sigma)
            out[:, autos] = (out[:, autos].real * np.float32(np.sqrt(2.0))).astype(np.complex64)
        if lmn.shape[1]:
            predict_uniform(uvw, lmn, flux, float(freqs[0]), float(freqs[1] - freqs[0])
                            if cfg.n_chan > 1 else 0.0, model, 0, nbl)
        # autocorrelations see the system temperature plus the sky in the beam
        model[:, autos, :] += cfg.sefd_jy
        apply_gains(model, gains_t, np.ascontiguousarray(bandpass_asc[:, asc_idx, :]),
                    ant1_idx, ant2_idx, np.array([0, 1]), out, 0, nbl)
        del model
        # interference, added after the gains (it enters at the receivers' inputs but
        # its amplitude is arbitrary anyway); the same events on every baseline
        tf = tf_asc[:, asc_idx]
        if tf.any():
            prng = np.random.default_rng([rfi_phase_seed, sb])
            for kind, sl, snr in events:
                sub = np.zeros((ntime, nchan_total), bool)
                sub[sl] = True
                sub = sub[:, asc_idx]
                ti, ci = np.nonzero(sub)
                if ti.size == 0:
                    continue
                amp = snr * sigma * np.abs(gains_t).mean() * np.abs(bandpass_asc).mean()
                scale = prng.uniform(1.0, 2.0, nbl)
                phase = prng.uniform(0, 2 * np.pi, (ti.size, nbl))
                val = (amp * scale[None, :] * np.exp(1j * phase)).astype(np.complex64)
                val[:, autos] = np.abs(val[:, autos])
                for pol in range(2):
                    out[ti, :, ci, pol] += val
            for c in np.nonzero(np.isin(asc_idx, bad_chan_asc))[0]:
                amp = 30 * sigma
                noise = prng.standard_normal((ntime, nbl, 2)) + 1j * prng.standard_normal(
                    (ntime, nbl, 2))
                out[:, :, c, :] += (amp * noise).astype(np.complex64)
        if bad_ant_idx.size:
            prng = np.random.default_rng([rfi_phase_seed, sb, 99])
            bad_bl = np.isin(ant1_idx, bad_ant_idx) | np.isin(ant2_idx, bad_ant_idx)
            nb = int(bad_bl.sum())
            amp = 20 * sigma
            garbage = amp * (prng.standard_normal((ntime, nb, cfg.n_chan, 2))
                             + 1j * prng.standard_normal((ntime, nb, cfg.n_chan, 2)))
            out[:, bad_bl] += garbage.astype(np.complex64)
        out[:, autos] = out[:, autos].real  # autocorrelations are real
        path = outdir / tel.subband_filename(stamps[sb], sb)
        _write_uvh5(uv, freqs, out.reshape(ntime * nbl, cfg.n_chan, 2), path)
        if progress:
            progress(sb)
        return path

    with ThreadPoolExecutor(max_workers=max(1, cfg.threads)) as pool:
        files = list(pool.map(one_subband, range(cfg.n_subbands)))

    stamp = min(stamps)  # a group is named by its earliest file-name timestamp
    truth_path = outdir / f"{stamp}_truth.npz"
    tmp = truth_path.with_name(truth_path.name + ".tmp.npz")
    np.savez(
        tmp,
        config=np.array(repr(asdict(cfg))),
        times_unix=meta["times_unix"], freqs_hz=freqs_asc,
        antenna_numbers=stations, bandpass=bandpass_asc, gains=gains_t,
        rfi_tf_mask=tf_asc, bad_channels=bad_chan_asc, bad_antennas=bad_ant_st,
        sigma=sigma, sefd_jy=cfg.sefd_jy,
        phase_center_ra=meta["ra_icrs"], phase_center_dec=meta["dec_icrs"],
        sky_ra=sky["ra"], sky_dec=sky["dec"], sky_flux=sky["flux"], sky_alpha=sky["alpha"],
        sky_name=sky["name"], sky_ref_freq=sky["ref_freq"], sky_in_beam=keep,
        calibrator=np.array(calibrator["name"] if calibrator else ""),
    )
    os.replace(tmp, truth_path)
    log.info("simulated group %s (%d files) in %.1f s", stamp, len(files),
             _time.perf_counter() - tic)
    return SimulatedGroup(stamp=stamp, files=files, truth=truth_path, start=start)


_HEADER_LOCK = __import__("threading").Lock()


def _write_uvh5(uv, freqs_desc, vis, path: Path):
    """Header by pyuvdata, data by h5py in one block; temp file then rename."""
    import h5py

    tmp = path.with_name(path.name + ".part")
    with _HEADER_LOCK:  # the metadata object is shared between subband threads
        _write_header(uv, freqs_desc, tmp)
    with h5py.File(tmp, "r+") as f:
        # whole-array writes: h5py broadcasts a scalar row by row (minutes per file)
        f["Data/visdata"][...] = np.ascontiguousarray(vis)
        f["Data/nsamples"][...] = np.ones(vis.shape, np.float32)
        f["Data/flags"][...] = np.zeros(vis.shape, bool)
    os.replace(tmp, path)


def _write_header(uv, freqs_desc, tmp: Path):
    uv.freq_array = np.asarray(freqs_desc, dtype=float)
    uv.Nfreqs = freqs_desc.size
    uv.channel_width = np.full(freqs_desc.size, tel.subband_channel_width(freqs_desc.size))
    uv.flex_spw_id_array = np.zeros(freqs_desc.size, dtype=int)
    if tmp.exists():
        tmp.unlink()
    uv.initialize_uvh5_file(str(tmp), clobber=True, chunks=None, flags_compression=None,
                            nsample_compression=None, data_write_dtype="c8")


def load_truth(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def simulate(outdir, n_groups=1, start="2026-01-15T08:00:00", cfg: SimConfig | None = None,
             calibrator_group: int | None = None, progress=None) -> list[SimulatedGroup]:
    """Simulate ``n_groups`` consecutive groups (5 min apart in file time) sharing one sky.

    ``calibrator_group``: index of the group in which a bright calibrator transits (it
    is part of the sky of every group, so neighbours see it drift through the beam);
    its catalogue entry is written beside the files as ``calibrators.csv``
    (:func:`write_calibrator_catalog`), for ``contimg calibrate --catalog`` or
    ``VLA_CATALOG``.
    """
    cfg = cfg or SimConfig()
    if isinstance(start, str):
        start = _dt.datetime.fromisoformat(start)
    group_len = _dt.timedelta(seconds=cfg.n_times * tel.INTEGRATION_S)
    sky = None
    cal = None
    starts = [start + g * group_len for g in range(n_groups)]
    if calibrator_group is not None:
        meta = _metadata(cfg, starts[0] + calibrator_group * group_len)
        mid = cfg.n_times // 2
        cal = dict(name=CALIBRATOR_NAME, ra=float(meta["ra_icrs"][mid]),
                   dec=float(meta["dec_icrs"][mid]), flux=cfg.calibrator_flux_jy,
                   alpha=cfg.calibrator_alpha)
    out = []
    for g in range(n_groups):
        g_start = starts[g]
        if sky is None:
            meta = _metadata(cfg, g_start)
            sky = make_sky(cfg, float(np.degrees(np.mean(meta["dec_icrs"]))))
            if cal is not None:
                _add_source(sky, cal["name"], cal["ra"], cal["dec"], cal["flux"], cal["alpha"])
        out.append(simulate_group(outdir, g_start, cfg, sky=sky, progress=progress))
    if cal is not None:
        path = write_calibrator_catalog(out, Path(outdir) / CALIBRATOR_CATALOG)
        log.info("wrote the calibrator catalogue %s (for contimg calibrate --catalog, or "
                 "VLA_CATALOG)", path)
    return out


def write_calibrator_catalog(groups, path) -> Path | None:
    """Write the simulated calibrator(s) of ``groups`` (SimulatedGroups, or paths of
    their ``*_truth.npz`` files) as a CSV calibrator catalogue
    (``name, ra_deg, dec_deg, flux_jy, alpha, ref_freq_hz``, the columns
    :func:`contimg.sky.load_csv` reads), so that the pipeline can be told about a
    fictitious calibrator as it is told about real ones (``--catalog`` / ``VLA_CATALOG``).
    Returns the path, or None when no group has a calibrator."""
    rows = {}
    for g in groups:
        t = g.load_truth() if hasattr(g, "load_truth") else dict(np.load(g))
        # the group's own transiting calibrator, or one that simulate() put in the sky
        # every group shares (then the truth names no calibrator)
        name = str(t["calibrator"]) or CALIBRATOR_NAME
        hit = np.flatnonzero(t["sky_name"] == name)
        if hit.size == 0:
            continue
        i = int(hit[0])
        rows[name] = (name, np.degrees(t["sky_ra"][i]), np.degrees(t["sky_dec"][i]),
                      float(t["sky_flux"][i]), float(t["sky_alpha"][i]),
                      float(t["sky_ref_freq"][i]))
    if not rows:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write("name,ra_deg,dec_deg,flux_jy,alpha,ref_freq_hz\n")
        for r in rows.values():
            fh.write(f"{r[0]},{r[1]:.9f},{r[2]:.9f},{r[3]:.6g},{r[4]:.6g},{r[5]:.6g}\n")
    os.replace(tmp, path)
    return path
