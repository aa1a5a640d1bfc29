"""Light-curve statistics (updated per epoch from running sums) and the ESE detector.

Per source, ``source_stats`` keeps ``n``, ``sum 1/e^2``, ``sum f/e^2``, ``sum f^2/e^2``,
``sum f``, ``sum f^2`` of its normalised flux densities ``f`` with errors ``e``, from which:

* ``eta`` — the weighted reduced chi^2 about the weighted mean,
  ``(sum w f^2 - (sum w f)^2 / sum w) / (n - 1)``;
* ``v`` — the modulation index, the unbiased standard deviation over the mean;
* ``max_dev`` — the largest deviation of an epoch, in sigma, from the weighted mean of the
  epochs before it (``|f - mean| / sqrt(e^2 + 1/sum w)``);
* ``max_vs``/``m_at_max_vs`` — the two-epoch statistics of Mooley et al. (2016),
  ``Vs = (f1 - f2) / sqrt(e1^2 + e2^2)`` and ``m = 2 (f1 - f2) / (f1 + f2)``, for the
  pair with the largest ``|Vs|`` among each new epoch and the previous epoch, the
  faintest and the brightest so far (so no history is re-read).

A new epoch costs one row read and one row written per source, whatever the history.

ESE candidates (:func:`detect_ese`): the light curve, binned to ``bin_days``, is searched
for the contiguous window (``min_days`` to ``max_days`` long, at least ``min_epochs``
bins) whose weighted mean lies furthest below the weighted mean outside it, in units of
the two means' errors. The errors include the source's own excess scatter (from the MAD
of the light curve about its median, beyond the stated errors). A window counts when its
significance ``z >= min_z``, at least ``min_frac`` of its bins lie below the baseline,
the dip is ``min_rel_depth`` of the baseline or more, and it keeps ``loo_frac * min_z``
without its deepest bin (one outlier is not a dip). Brighter edges (the caustics of an
ESE: the bin just before and just after the window) add their significance above the
baseline to the score. The detector runs
on a source when its new epoch deviates by ``trigger`` sigma or when it already is a
candidate.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from kernels.constants import SECONDS_PER_DAY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ESEPreset:
    min_z: float           # dip significance
    min_frac: float        # fraction of the window's bins below the baseline
    min_epochs: int        # bins in the dip
    min_rel_depth: float   # depth / baseline
    loo_frac: float        # significance without the deepest bin, in units of min_z
    trigger: float         # new-epoch deviation (sigma) that makes the detector look
    min_days: float = 1.0
    max_days: float = 200.0
    bin_days: float = 1.0
    min_bins: int = 8      # light-curve bins needed at all


PRESETS = {
    "conservative": ESEPreset(min_z=7.0, min_frac=0.8, min_epochs=3, min_rel_depth=0.05,
                              loo_frac=0.8, trigger=3.0),
    "default": ESEPreset(min_z=5.5, min_frac=0.7, min_epochs=3, min_rel_depth=0.02,
                         loo_frac=0.7, trigger=2.5),
    "sensitive": ESEPreset(min_z=4.5, min_frac=0.6, min_epochs=2, min_rel_depth=0.0,
                           loo_frac=0.6, trigger=2.0),
}

_STAT_COLS = ("n", "sum_w", "sum_wf", "sum_wf2", "sum_f", "sum_f2", "max_dev", "max_vs",
              "m_at_max_vs", "last_flux", "last_err", "min_flux", "min_err", "max_flux",
              "max_err", "t_first", "t_last")


def preset(name) -> ESEPreset:
    if isinstance(name, ESEPreset):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown ESE preset {name!r} (one of {', '.join(PRESETS)})")
    return PRESETS[name]


def _chunks(ids, n=30000):
    for a in range(0, len(ids), n):
        yield ids[a:a + n]


def _read_stats(db, ids) -> dict:
    """Current running sums of ``ids`` as arrays aligned with ``ids`` (zeros/NaN when a
    source has none yet)."""
    ids = np.asarray(ids, dtype=np.int64)
    pos = {int(s): k for k, s in enumerate(ids)}
    out = {c: np.zeros(ids.size) if c.startswith(("n", "sum")) else np.full(ids.size, np.nan)
           for c in _STAT_COLS}
    cols = ", ".join(("source_id",) + _STAT_COLS)
    for part in _chunks([int(i) for i in ids]):
        rows = db.query(f"SELECT {cols} FROM source_stats WHERE source_id IN "
                        f"({','.join('?' * len(part))})", part)
        for r in rows:
            k = pos[r["source_id"]]
            for c in _STAT_COLS:
                if r[c] is not None:
                    out[c][k] = r[c]
    return out


def eta_of(db, ids) -> np.ndarray:
    """``eta`` of each source (NaN without two epochs)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.full(ids.size, np.nan)
    pos = {int(s): k for k, s in enumerate(ids)}
    for part in _chunks([int(i) for i in ids]):
        for r in db.query(f"SELECT source_id, eta FROM source_stats WHERE source_id IN "
                          f"({','.join('?' * len(part))})", part):
            if r["eta"] is not None:
                out[pos[r["source_id"]]] = r["eta"]
    return out


def _pair(f1, e1, f2, e2):
    with np.errstate(invalid="ignore", divide="ignore"):
        vs = (f1 - f2) / np.sqrt(e1 * e1 + e2 * e2)
        m = 2.0 * (f1 - f2) / (f1 + f2)
    return vs, m


def update_sums(s: dict, t, f, e) -> tuple[dict, np.ndarray]:
    """One new epoch ``(t, f, e)`` per source into the running sums ``s`` (arrays, as
    :func:`_read_stats` returns them); returns the new sums and each epoch's deviation
    from the weighted mean of the epochs before it (NaN with fewer than 2)."""
    s = {k: v.copy() for k, v in s.items()}
    w = 1.0 / (e * e)
    n0 = s["n"]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean0 = s["sum_wf"] / s["sum_w"]
        dev = np.abs(f - mean0) / np.sqrt(e * e + 1.0 / s["sum_w"])
    dev[n0 < 2] = np.nan
    s["max_dev"] = np.fmax(s["max_dev"], dev)
    best_vs = np.full(f.size, np.nan)
    best_m = np.full(f.size, np.nan)
    for fk, ek in (("last_flux", "last_err"), ("min_flux", "min_err"),
                   ("max_flux", "max_err")):
        vs, m = _pair(f, e, s[fk], s[ek])
        better = np.abs(vs) > np.nan_to_num(np.abs(best_vs), nan=-1.0)
        best_vs = np.where(better, vs, best_vs)
        best_m = np.where(better, m, best_m)
    better = np.abs(best_vs) > np.nan_to_num(np.abs(s["max_vs"]), nan=-1.0)
    s["max_vs"] = np.where(better, np.abs(best_vs), s["max_vs"])
    s["m_at_max_vs"] = np.where(better, best_m, s["m_at_max_vs"])
    lower = ~(f >= s["min_flux"])
    s["min_flux"], s["min_err"] = np.where(lower, f, s["min_flux"]), np.where(lower, e, s["min_err"])
    upper = ~(f <= s["max_flux"])
    s["max_flux"], s["max_err"] = np.where(upper, f, s["max_flux"]), np.where(upper, e, s["max_err"])
    s["last_flux"], s["last_err"] = f.astype(float), e.astype(float)
    s["n"] = n0 + 1
    s["sum_w"] = s["sum_w"] + w
    s["sum_wf"] = s["sum_wf"] + w * f
    s["sum_wf2"] = s["sum_wf2"] + w * f * f
    s["sum_f"] = s["sum_f"] + f
    s["sum_f2"] = s["sum_f2"] + f * f
    s["t_first"] = np.fmin(s["t_first"], t)
    s["t_last"] = np.fmax(s["t_last"], t)
    return s, dev


def derived(s: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(eta, v)`` from running sums (NaN with fewer than 2 epochs)."""
    n = s["n"]
    with np.errstate(invalid="ignore", divide="ignore"):
        eta = (s["sum_wf2"] - s["sum_wf"] ** 2 / s["sum_w"]) / (n - 1)
        mean = s["sum_f"] / n
        var = (s["sum_f2"] / n - mean * mean) * n / (n - 1)
        v = np.sqrt(np.clip(var, 0, None)) / mean
    eta[n < 2] = np.nan
    v[n < 2] = np.nan
    return eta, v


def update(db, ids, t, f, e) -> dict:
    """Add one epoch per source (``ids`` unique) to the running statistics in ``db``.
    Returns ``{"n_updated", "deviation"}`` (each epoch's sigma-deviation, aligned with
    ``ids``)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return dict(n_updated=0, deviation=np.zeros(0))
    if np.unique(ids).size != ids.size:
        raise ValueError("variability.update: one epoch per source at a time")
    s, dev = update_sums(_read_stats(db, ids), np.asarray(t, float), np.asarray(f, float),
                         np.asarray(e, float))
    eta, v = derived(s)
    now = time.time()
    cols = ("source_id",) + _STAT_COLS + ("eta", "v", "updated_at")
    arrays = [ids] + [s[c] for c in _STAT_COLS] + [eta, v, np.full(ids.size, now)]
    rows = [tuple(None if (isinstance(x, float) and math.isnan(x)) else x for x in r)
            for r in zip(*(a.tolist() for a in arrays))]
    upd = ", ".join(f"{c}=excluded.{c}" for c in cols[1:])
    with db.transaction() as con:
        con.executemany(f"INSERT INTO source_stats ({', '.join(cols)}) VALUES "
                        f"({','.join('?' * len(cols))}) ON CONFLICT(source_id) DO UPDATE "
                        f"SET {upd}", rows)
    return dict(n_updated=int(ids.size), deviation=dev)


# ---------------------------------------------------------------------------------
# ESE detector
# ---------------------------------------------------------------------------------

def bin_light_curve(t, f, e, bin_days):
    """Weighted means of ``f`` in bins of ``bin_days`` (t in unix seconds)."""
    t, f, e = (np.asarray(a, dtype=np.float64) for a in (t, f, e))
    ok = np.isfinite(t) & np.isfinite(f) & np.isfinite(e) & (e > 0)
    t, f, e = t[ok], f[ok], e[ok]
    if t.size == 0:
        return t, f, e
    # bins centred on the first epoch's time of day: a daily transit's few minutes of
    # drift never splits or merges days
    k = np.floor((t - t.min()) / (bin_days * SECONDS_PER_DAY) + 0.5).astype(np.int64)
    uk, inv = np.unique(k, return_inverse=True)
    w = 1.0 / (e * e)
    sw = np.bincount(inv, w)
    return (np.bincount(inv, w * t) / sw, np.bincount(inv, w * f) / sw, 1.0 / np.sqrt(sw))


def detect_ese(t, f, e, preset_name="default") -> dict | None:
    """The best ESE-like dip of one light curve, or None. Returns the evidence: window
    (``t_start``, ``t_end``, ``n_epochs``), ``baseline``, ``depth_jy``, ``depth_sigma``
    (``z``), ``edge_sigma``, ``frac_below``, ``z_loo``, ``score``, the excess scatter and
    the binned light curve."""
    p = preset(preset_name)
    tb, fb, eb = bin_light_curve(t, f, e, p.bin_days)
    n = tb.size
    if n < max(p.min_bins, p.min_epochs + 2):
        return None
    base = float(np.median(fb))
    mad = 1.482602218505602 * float(np.median(np.abs(fb - base)))
    extra = math.sqrt(max(0.0, mad * mad - float(np.median(eb * eb))))
    ee = np.sqrt(eb * eb + extra * extra)
    w = 1.0 / (ee * ee)
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cwf = np.concatenate([[0.0], np.cumsum(w * fb)])
    cbelow = np.concatenate([[0], np.cumsum(fb < base)])
    i, j = np.triu_indices(n)                      # window [i, j] inclusive
    dur = (tb[j] - tb[i]) / SECONDS_PER_DAY
    cnt = j - i + 1
    keep = (cnt >= p.min_epochs) & (cnt <= n - 2) & (dur >= p.min_days - 1e-9) & \
        (dur <= p.max_days)
    i, j, cnt = i[keep], j[keep], cnt[keep]
    if i.size == 0:
        return None
    w_in = cw[j + 1] - cw[i]
    f_in = (cwf[j + 1] - cwf[i]) / w_in
    w_out = cw[n] - w_in
    f_out = (cwf[n] - (cwf[j + 1] - cwf[i])) / w_out
    z = (f_out - f_in) / np.sqrt(1.0 / w_in + 1.0 / w_out)
    frac = (cbelow[j + 1] - cbelow[i]) / cnt
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = (f_out - f_in) / np.abs(f_out)
    ok = (z >= p.min_z) & (frac >= p.min_frac) & (rel >= p.min_rel_depth)
    for k in np.flatnonzero(ok)[np.argsort(-z[ok])][:50]:
        a, b = int(i[k]), int(j[k])
        sl = slice(a, b + 1)
        deep = a + int(np.argmin(fb[sl]))
        m = np.ones(n, dtype=bool)
        m[deep] = False
        win = np.zeros(n, dtype=bool)
        win[sl] = True
        wi, wo = w[win & m], w[~win]
        z_loo = ((np.sum(wo * fb[~win]) / wo.sum() - np.sum(wi * fb[win & m]) / wi.sum())
                 / math.sqrt(1.0 / wi.sum() + 1.0 / wo.sum()))
        if z_loo < p.loo_frac * p.min_z:
            continue
        edges = np.r_[max(0, a - 1):a, b + 1:min(n, b + 2)].astype(np.int64)
        edge_z = 0.0
        if edges.size:
            we = w[edges]
            edge_z = float((np.sum(we * fb[edges]) / we.sum() - f_out[k])
                           / math.sqrt(1.0 / we.sum() + 1.0 / w_out[k]))
        score = float(z[k] + max(edge_z, 0.0))
        return dict(score=score, t_start=float(tb[a]), t_end=float(tb[b]),
                    n_epochs=int(cnt[k]), baseline=float(f_out[k]),
                    depth_jy=float(f_out[k] - f_in[k]), depth_sigma=float(z[k]),
                    rel_depth=float(rel[k]), edge_sigma=edge_z, frac_below=float(frac[k]),
                    z_loo=float(z_loo), excess_scatter=extra, preset=asdict(p),
                    light_curve=dict(t=tb.tolist(), f=fb.tolist(), e=eb.tolist()))
    return None


def light_curves(db, ids) -> dict:
    """``{source_id: (t, f, e)}`` of the normalised, unflagged photometry."""
    out = {int(i): ([], [], []) for i in ids}
    ids = [int(i) for i in ids]
    for part in _chunks(ids, 5000):
        rows = db.query("SELECT source_id, t_mid, norm_flux_jy, norm_err_jy FROM photometry "
                        f"WHERE flags = 0 AND source_id IN ({','.join('?' * len(part))}) "
                        "ORDER BY source_id, t_mid", part)
        for r in rows:
            lc = out[r["source_id"]]
            lc[0].append(r["t_mid"])
            lc[1].append(r["norm_flux_jy"])
            lc[2].append(r["norm_err_jy"])
    return {k: tuple(np.asarray(x, dtype=float) for x in v) for k, v in out.items()}


def detect(db, ids, preset_name="default") -> list[dict]:
    """Run the detector on the light curves of ``ids``; store, update or withdraw their
    candidates of this preset. Returns the candidates found."""
    p = preset(preset_name)
    name = preset_name if isinstance(preset_name, str) else "custom"
    found = []
    now = time.time()
    lcs = light_curves(db, ids)
    with db.transaction() as con:
        for sid, (t, f, e) in lcs.items():
            ev = detect_ese(t, f, e, p)
            if ev is None:
                con.execute("DELETE FROM ese_candidates WHERE source_id=? AND preset=? AND "
                            "status='new'", (sid, name))
                continue
            ev["source_id"] = sid
            found.append(ev)
            con.execute(
                "INSERT INTO ese_candidates (source_id, preset, score, t_start, t_end, "
                "depth_jy, depth_sigma, edge_sigma, n_epochs, evidence, created_at, "
                "updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(source_id, preset)"
                " DO UPDATE SET score=excluded.score, t_start=excluded.t_start, "
                "t_end=excluded.t_end, depth_jy=excluded.depth_jy, "
                "depth_sigma=excluded.depth_sigma, edge_sigma=excluded.edge_sigma, "
                "n_epochs=excluded.n_epochs, evidence=excluded.evidence, "
                "updated_at=excluded.updated_at",
                (sid, name, ev["score"], ev["t_start"], ev["t_end"], ev["depth_jy"],
                 ev["depth_sigma"], ev["edge_sigma"], ev["n_epochs"], json.dumps(ev), now,
                 now))
    return found


def detect_updated(db, ids, deviation, preset_name="default") -> list[dict]:
    """The detector on the sources of a new epoch that deviated by the preset's trigger
    or already are candidates."""
    p = preset(preset_name)
    ids = np.asarray(ids, dtype=np.int64)
    look = set(ids[np.nan_to_num(np.asarray(deviation), nan=0.0) >= p.trigger].tolist())
    name = preset_name if isinstance(preset_name, str) else "custom"
    cands = {r["source_id"] for r in db.query(
        "SELECT source_id FROM ese_candidates WHERE preset=?", (name,))}
    look |= cands & set(ids.tolist())
    return detect(db, sorted(look), preset_name) if look else []


# ---------------------------------------------------------------------------------
# CLI: contimg sources list|show|candidates
# ---------------------------------------------------------------------------------

def _fmt(x, spec=".4g"):
    return "-" if x is None else format(x, spec)


def cmd_sources(args) -> int:
    from contimg.state import StateDB

    with StateDB(args.cfg.paths.db) as db:
        if args.sources_cmd == "list":
            order = {"eta": "st.eta", "v": "st.v", "max_dev": "st.max_dev",
                     "name": "s.name", "flux": "s.flux_jy"}[args.sort]
            rows = db.query(
                "SELECT s.id, s.name, s.ra_deg, s.dec_deg, s.flux_jy, s.origin, st.n, st.eta,"
                " st.v, st.max_dev, st.max_vs, st.m_at_max_vs FROM sources s LEFT JOIN "
                "source_stats st ON st.source_id = s.id WHERE COALESCE(st.eta, 0) >= ? "
                f"ORDER BY {order} IS NULL, {order} {'ASC' if args.sort == 'name' else 'DESC'}"
                " LIMIT ?", (args.min_eta, args.limit))
            print(f"{'id':>6} {'name':<24} {'ra_deg':>10} {'dec_deg':>9} {'cat_Jy':>8} "
                  f"{'n':>5} {'eta':>8} {'V':>7} {'maxdev':>7} {'|Vs|':>7} {'m':>7}")
            for r in rows:
                print(f"{r['id']:>6} {r['name'][:24]:<24} {r['ra_deg']:>10.5f} "
                      f"{r['dec_deg']:>9.5f} {_fmt(r['flux_jy']):>8} {r['n'] or 0:>5} "
                      f"{_fmt(r['eta']):>8} {_fmt(r['v'], '.3f'):>7} "
                      f"{_fmt(r['max_dev'], '.2f'):>7} {_fmt(r['max_vs'], '.2f'):>7} "
                      f"{_fmt(r['m_at_max_vs'], '.3f'):>7}")
        elif args.sources_cmd == "show":
            key = args.source
            rows = db.query("SELECT * FROM sources WHERE name=? OR CAST(id AS TEXT)=?",
                            (key, key))
            if not rows:
                print(f"no source {key!r}")
                return 1
            s = rows[0]
            st = db.query("SELECT * FROM source_stats WHERE source_id=?", (s["id"],))
            print(json.dumps({"source": s, "stats": st[0] if st else None}, indent=1,
                             default=str))
            print("t_mid_utc,flux_jy,err_jy,norm_flux_jy,norm_err_jy,pb,flags,image")
            import datetime as _dt

            for r in db.query("SELECT * FROM photometry WHERE source_id=? ORDER BY t_mid",
                              (s["id"],)):
                t = _dt.datetime.fromtimestamp(r["t_mid"], _dt.timezone.utc).isoformat(
                    timespec="seconds")
                print(f"{t},{r['flux_jy']:.6g},{r['err_jy']:.3g},{_fmt(r['norm_flux_jy'], '.6g')},"
                      f"{_fmt(r['norm_err_jy'], '.3g')},{_fmt(r['pb'], '.3f')},{r['flags']},"
                      f"{r['image_path']}")
        elif args.sources_cmd == "scales":
            rows = db.query("SELECT * FROM image_flux_scale ORDER BY t_mid DESC LIMIT ?",
                            (args.limit,))
            print(f"{'t_mid (UTC)':<20} {'scale':>7} {'err':>7} {'refs':>5} {'QA':<4} image")
            import datetime as _dt

            for r in rows:
                t = _dt.datetime.fromtimestamp(r["t_mid"], _dt.timezone.utc).strftime(
                    "%Y-%m-%dT%H:%M:%S")
                off = scale_is_off(r["scale"], r["scale_err"], args.tolerance)
                print(f"{t:<20} {_fmt(r['scale'], '.4f'):>7} {_fmt(r['scale_err'], '.4f'):>7}"
                      f" {r['n_ref']:>5} {'OFF' if off else 'ok':<4} {r['image_path']}")
        else:
            preset_ = None if args.all_presets else args.cfg.science.ese_preset
            rows = db.query(
                "SELECT c.*, s.name FROM ese_candidates c JOIN sources s ON s.id=c.source_id"
                " WHERE c.score >= ? AND (? IS NULL OR c.preset = ?) ORDER BY c.score DESC "
                "LIMIT ?", (args.min_score, preset_, preset_, args.limit))
            print(f"{'source':<24} {'preset':<12} {'score':>7} {'depth_sig':>9} "
                  f"{'depth_Jy':>9} {'edge_sig':>8} {'n':>3}  window (UTC)")
            import datetime as _dt

            for r in rows:
                a, b = (_dt.datetime.fromtimestamp(x, _dt.timezone.utc).strftime("%Y-%m-%d")
                        for x in (r["t_start"], r["t_end"]))
                print(f"{r['name'][:24]:<24} {r['preset']:<12} {r['score']:>7.2f} "
                      f"{r['depth_sigma']:>9.2f} {r['depth_jy']:>9.4g} {r['edge_sigma']:>8.2f}"
                      f" {r['n_epochs']:>3}  {a} .. {b}")
    return 0


def scale_is_off(scale, scale_err, tolerance=0.1) -> bool:
    """QA: an image's flux scale is off (bad calibration?) when it has none or differs
    from 1 by more than ``tolerance`` and by more than 5 of its errors."""
    if scale is None:
        return True
    return abs(scale - 1.0) > tolerance and abs(scale - 1.0) > 5 * (scale_err or 0.0)


def add_subcommands(sub):
    from contimg.config import add_options

    p = sub.add_parser("sources", help="catalogue sources, light-curve statistics, ESE "
                       "candidates")
    ssub = p.add_subparsers(dest="sources_cmd", required=True)
    s = ssub.add_parser("list", help="sources with their variability statistics")
    s.add_argument("--sort", choices=("eta", "v", "max_dev", "name", "flux"), default="eta")
    s.add_argument("--min-eta", type=float, default=0.0)
    s.add_argument("--limit", type=int, default=50)
    add_options(s, "paths.db")
    s.set_defaults(func=cmd_sources)
    s = ssub.add_parser("show", help="one source: statistics and light curve (CSV)")
    s.add_argument("source", help="name or id")
    add_options(s, "paths.db")
    s.set_defaults(func=cmd_sources)
    s = ssub.add_parser("scales", help="per-image flux-scale corrections (QA: OFF)")
    s.add_argument("--tolerance", type=float, default=0.1)
    s.add_argument("--limit", type=int, default=50)
    add_options(s, "paths.db")
    s.set_defaults(func=cmd_sources)
    s = ssub.add_parser("candidates", help="ESE candidates by score")
    add_options(s, "science.ese_preset")
    s.add_argument("--all-presets", action="store_true",
                   help="candidates of every preset (default: the configured one)")
    s.add_argument("--min-score", type=float, default=0.0)
    s.add_argument("--limit", type=int, default=50)
    add_options(s, "paths.db")
    s.set_defaults(func=cmd_sources)
