"""Multi-epoch simulation: a campaign of observations of one declination strip over many
days, with injected variability in known sources and the truth saved.

Every source is one of

* ``steady`` — constant flux density;
* ``ese``    — an extreme-scattering-event dip: the flux falls by ``depth`` (a fraction)
  for ``duration`` days, and for about half of them the epoch just before and just after
  the dip is brighter by ``depth / 2`` (the caustics);
* ``variable`` — random intrinsic variability: a red-noise (AR(1), 5-day correlation)
  modulation of index 0.05–0.3.

Two ways to use it:

* :func:`run_photometry_campaign` — the catalogue/photometry level: each epoch's measured
  flux densities are drawn from the per-epoch noise model of forced photometry
  (``rms / pb`` with the image's rms, a fixed PB response per source, and a random
  per-epoch flux-scale error) and fed through the same normalisation, storage,
  running-statistics and ESE code as the stream (:func:`contimg.photometry.record`). This is
  what the ESE bench uses (50+ epochs of 200+ sources without making 50 images).
* :func:`simulate_campaign_groups` — the visibility level: one group per epoch (later
  days at the same sidereal time, so the same strip of sky; shrink with a SimConfig),
  each with the sky's flux densities of that epoch, written with
  :func:`contimg.simulate.simulate_group`; image them and run ``contimg photometry``.

Both save the truth (``campaign_truth.npz``: kinds, true light curves, dip windows) and
the sky as a catalogue (``campaign_sky.csv``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kernels.constants import SIDEREAL_DAY_S

log = logging.getLogger(__name__)

KINDS = ("steady", "ese", "variable")


@dataclass
class CampaignConfig:
    n_sources: int = 300
    n_epochs: int = 60
    n_ese: int = 20
    n_variable: int = 20
    cadence_days: float = 1.0          # in sidereal days (same LST every epoch)
    start: str = "2026-01-15T08:00:00"
    min_flux_jy: float = 0.005
    max_flux_jy: float = 2.0
    rms_jy: float = 1e-3               # image rms per epoch (Jy/beam)
    scale_jitter: float = 0.02         # rms of the per-epoch flux-scale error
    ese_depth: tuple = (0.05, 0.6)     # fraction of the flux
    ese_days: tuple = (3, 20)
    seed: int = 1

    def __post_init__(self):
        if self.n_ese + self.n_variable > self.n_sources:
            raise ValueError("campaign: n_ese + n_variable exceeds n_sources")
        if self.n_epochs < 2:
            raise ValueError("campaign: n_epochs must be >= 2")


def light_curves(cfg: CampaignConfig, flux0: np.ndarray, rng) -> dict:
    """True light curves ``(n_sources, n_epochs)``, kinds and dip windows."""
    n, ne = flux0.size, cfg.n_epochs
    kind = np.array(["steady"] * n, dtype=object)
    order = rng.permutation(n)
    kind[order[:cfg.n_ese]] = "ese"
    kind[order[cfg.n_ese:cfg.n_ese + cfg.n_variable]] = "variable"
    true = np.repeat(flux0[:, None], ne, axis=1).astype(float)
    dip_start = np.full(n, -1)
    dip_len = np.zeros(n, dtype=int)
    depth = np.zeros(n)
    edges = np.zeros(n, dtype=bool)
    for i in np.flatnonzero(kind == "ese"):
        hi = max(1, min(cfg.ese_days[1], ne - 2))
        L = int(rng.integers(min(cfg.ese_days[0], hi), hi + 1))
        a = int(rng.integers(1, ne - L))     # an epoch before and after the dip
        d = rng.uniform(*cfg.ese_depth)
        dip_start[i], dip_len[i], depth[i] = a, L, d
        true[i, a:a + L] *= 1.0 - d
        if rng.random() < 0.5:
            edges[i] = True
            true[i, a - 1] *= 1.0 + d / 2
            true[i, a + L] *= 1.0 + d / 2
    phi = math.exp(-cfg.cadence_days / 5.0)
    for i in np.flatnonzero(kind == "variable"):
        mod = rng.uniform(0.05, 0.3)
        x = np.empty(ne)
        x[0] = rng.normal()
        for k in range(1, ne):
            x[k] = phi * x[k - 1] + math.sqrt(1 - phi * phi) * rng.normal()
        true[i] *= np.clip(1.0 + mod * x, 0.05, None)
    return dict(kind=kind, true=true, dip_start=dip_start, dip_len=dip_len, depth=depth,
                edges=edges)


def _epoch_times(cfg: CampaignConfig) -> np.ndarray:
    t0 = _dt.datetime.fromisoformat(cfg.start).replace(tzinfo=_dt.timezone.utc).timestamp()
    return t0 + np.arange(cfg.n_epochs) * cfg.cadence_days * SIDEREAL_DAY_S


def _save_truth(outdir: Path, cfg, times, sky, lc, extra=None) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "campaign_truth.npz"
    tmp = outdir / "campaign_truth.tmp.npz"
    np.savez(tmp, times=times, name=sky["name"].astype(str), ra=sky["ra"], dec=sky["dec"],
             flux=sky["flux"], kind=lc["kind"].astype(str), true=lc["true"],
             dip_start=lc["dip_start"], dip_len=lc["dip_len"], depth=lc["depth"],
             edges=lc["edges"], config=str(asdict(cfg)), **(extra or {}))
    tmp.replace(path)
    from contimg.catalog import write_sky_catalog

    write_sky_catalog(sky, outdir / "campaign_sky.csv")
    return path


def run_photometry_campaign(outdir, db_path, cfg: CampaignConfig | None = None,
                            *, ese_preset: str | None = "default", progress=None) -> dict:
    """Simulate the campaign at the photometry level and ingest every epoch into the
    state database ``db_path`` as the stream would. Returns the truth dict (``ids`` maps
    sources to database ids) and the per-epoch summaries."""
    from contimg import catalog
    from contimg.photometry import record
    from contimg.state import StateDB

    cfg = cfg or CampaignConfig()
    outdir = Path(outdir)
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_sources
    # fluxes log-uniform; positions in a 3 deg field at dec 54.6; PB response 0.25-1
    flux0 = np.exp(rng.uniform(math.log(cfg.min_flux_jy), math.log(cfg.max_flux_jy), n))
    ra, dec = rng.uniform(150.0, 155.0, n), rng.uniform(53.1, 56.1, n)
    while True:   # no two sources within 1 arcmin (a catalogue would merge them)
        from scipy.spatial import cKDTree

        pairs = cKDTree(np.stack([ra * math.cos(math.radians(54.6)), dec], 1)).query_pairs(
            1 / 60.0, output_type="ndarray")
        if not len(pairs):
            break
        j = np.unique(pairs[:, 1])
        ra[j], dec[j] = rng.uniform(150.0, 155.0, j.size), rng.uniform(53.1, 56.1, j.size)
    sky = dict(ra=np.radians(ra), dec=np.radians(dec), flux=flux0,
               alpha=np.zeros(n), name=np.array([f"CAMP{i:05d}" for i in range(n)]))
    pb = rng.uniform(0.25, 1.0, n)
    lc = light_curves(cfg, flux0, rng)
    times = _epoch_times(cfg)
    _save_truth(outdir, cfg, times, sky, lc, extra=dict(pb=pb))
    fac = 1.15          # the beam fit's error factor for beam-correlated noise
    sigma = fac * cfg.rms_jy / pb
    summaries = []
    with StateDB(db_path) as db:
        catalog.load_into_db(db, outdir / "campaign_sky.csv", name="campaign")
        src = catalog.sources_table(db)
        by_name = {str(nm): int(i) for nm, i in zip(src["name"], src["id"])}
        ids = np.array([by_name[str(nm)] for nm in sky["name"]], dtype=np.int64)
        for k, t in enumerate(times):
            scale = 1.0 + cfg.scale_jitter * rng.normal()
            meas = scale * lc["true"][:, k] + sigma * rng.normal(size=n)
            path = str(outdir / f"epoch{k:04d}-image.fits")   # a name: no file is made
            db.register_image(path, noise_jy=cfg.rms_jy)
            res = dict(measured=np.ones(n, bool), flux_jy=meas, err_jy=sigma,
                       peak_jy=meas * pb, rms_jy=np.full(n, cfg.rms_jy), pb=pb,
                       flags=np.zeros(n, dtype=np.int64))
            summaries.append(record(db, path, float(t), ids, res, flux0,
                                    ese_preset=ese_preset))
            summaries[-1]["true_scale"] = scale
            if progress:
                progress(k + 1, cfg.n_epochs)
    return dict(ids=ids, sigma=sigma, pb=pb, times=times, sky=sky, summaries=summaries,
                **lc)


def simulate_campaign_groups(outdir, sim_cfg=None, cfg: CampaignConfig | None = None,
                             progress=None) -> list:
    """One simulated group per epoch (``epochNNNN/``), later days at the same sidereal
    time, with the sky's flux densities of that epoch. Variability goes to sources of
    the generated sky within 3 deg of the first pointing (``cfg.n_sources`` is
    ignored: the sky decides). Returns the SimulatedGroups."""
    from contimg.simulate import SimConfig, _metadata, make_sky, simulate_group

    sim_cfg = sim_cfg or SimConfig()
    cfg = cfg or CampaignConfig()
    outdir = Path(outdir)
    rng = np.random.default_rng(cfg.seed)
    start = _dt.datetime.fromisoformat(cfg.start)
    meta = _metadata(sim_cfg, start)
    ra0 = float(np.mean(meta["ra_icrs"]))
    dec0 = float(np.mean(meta["dec_icrs"]))
    sky = make_sky(sim_cfg, math.degrees(dec0))
    near = np.flatnonzero(np.degrees(np.hypot((sky["ra"] - ra0) * math.cos(dec0),
                                              sky["dec"] - dec0)) < 3.0)
    n_var = min(near.size, cfg.n_ese + cfg.n_variable)
    ccfg = CampaignConfig(**{**asdict(cfg), "n_sources": max(n_var, near.size),
                             "n_ese": min(cfg.n_ese, n_var),
                             "n_variable": max(0, n_var - min(cfg.n_ese, n_var))})
    sub = light_curves(ccfg, sky["flux"][near], rng)
    lc = dict(kind=np.array(["steady"] * sky["flux"].size, dtype=object),
              true=np.repeat(sky["flux"][:, None], cfg.n_epochs, axis=1),
              dip_start=np.full(sky["flux"].size, -1),
              dip_len=np.zeros(sky["flux"].size, dtype=int),
              depth=np.zeros(sky["flux"].size), edges=np.zeros(sky["flux"].size, bool))
    for key in lc:
        lc[key][near] = sub[key]
    times = _epoch_times(cfg)
    _save_truth(outdir, cfg, times, sky, lc)
    groups = []
    for k, t in enumerate(times):
        day = dict(sky, flux=lc["true"][:, k])
        when = _dt.datetime.fromtimestamp(round(t), _dt.timezone.utc).replace(tzinfo=None)
        groups.append(simulate_group(outdir / f"epoch{k:04d}", when, sim_cfg, sky=day))
        if progress:
            progress(k + 1, cfg.n_epochs)
    return groups


# ---------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------

def cmd_simulate_campaign(args) -> int:
    cfg = CampaignConfig(n_sources=args.sources, n_epochs=args.epochs, n_ese=args.ese,
                         n_variable=args.variable, cadence_days=args.cadence_days,
                         start=args.start, seed=args.seed)
    if args.groups:
        from contimg.simulate import SimConfig

        sim = SimConfig(n_ant=args.antennas, n_subbands=args.subbands, n_chan=args.channels,
                        n_times=args.integrations, seed=args.seed)
        gs = simulate_campaign_groups(args.out, sim, cfg)
        print(f"simulated {len(gs)} epoch group(s) -> {args.out} "
              f"(truth: campaign_truth.npz, sky: campaign_sky.csv)")
        return 0
    out = run_photometry_campaign(args.out, args.cfg.paths.db, cfg,
                                  ese_preset=args.cfg.science.ese_preset)
    kinds = {k: int(np.sum(out["kind"] == k)) for k in KINDS}
    print(f"campaign: {cfg.n_epochs} epochs of {cfg.n_sources} sources {kinds} ingested "
          f"into {args.cfg.paths.db}; truth in {args.out}/campaign_truth.npz")
    return 0


def add_subcommands(sub):
    from contimg.config import add_options

    s = sub.add_parser("simulate-campaign",
                       help="many epochs with injected ESE dips / variability (truth saved)")
    s.add_argument("--out", required=True)
    s.add_argument("--epochs", type=int, default=60)
    s.add_argument("--sources", type=int, default=300)
    s.add_argument("--ese", type=int, default=20)
    s.add_argument("--variable", type=int, default=20)
    s.add_argument("--cadence-days", type=float, default=1.0, help="in sidereal days")
    s.add_argument("--start", default="2026-01-15T08:00:00")
    s.add_argument("--seed", type=int, default=1)
    add_options(s, "paths.db", "science.ese_preset")
    s.add_argument("--groups", action="store_true",
                   help="write one simulated UVH5 group per epoch instead")
    s.add_argument("--antennas", type=int, default=96)
    s.add_argument("--subbands", type=int, default=16)
    s.add_argument("--channels", type=int, default=48)
    s.add_argument("--integrations", type=int, default=24)
    s.set_defaults(func=cmd_simulate_campaign)
