"""Variability statistics from running sums against a recomputation from the whole
history; the ESE detector on injected dips and on steady light curves; the photometry
stage's normalisation and storage."""

from __future__ import annotations

import numpy as np
import pytest

from contimg import variability as var
from contimg.state import StateDB


def _db_with_sources(path, n):
    db = StateDB(path)
    with db.transaction() as con:
        con.executemany("INSERT INTO sources (name, ra_deg, dec_deg, flux_jy) VALUES "
                        "(?,?,?,?)", [(f"S{i}", i * 0.01, 50.0, 1.0) for i in range(n)])
    return db


def test_running_sums_equal_the_history(tmp_path):
    rng = np.random.default_rng(5)
    n_src, n_ep = 30, 25
    f = rng.normal(1.0, 0.05, (n_ep, n_src)) * rng.uniform(0.1, 2, n_src)
    e = rng.uniform(0.01, 0.05, (n_ep, n_src))
    t = 1.7e9 + np.arange(n_ep) * 86400.0
    with _db_with_sources(tmp_path / "db.sqlite3", n_src) as db:
        ids = np.arange(1, n_src + 1)
        for k in range(n_ep):
            order = rng.permutation(n_src)          # any order of sources
            var.update(db, ids[order], np.full(n_src, t[k]), f[k, order], e[k, order])
        rows = {r["source_id"]: r for r in db.query("SELECT * FROM source_stats")}
    for s in range(n_src):
        r = rows[s + 1]
        w = 1 / e[:, s] ** 2
        mean = np.sum(w * f[:, s]) / w.sum()
        assert r["n"] == n_ep
        assert r["eta"] == pytest.approx(np.sum(w * (f[:, s] - mean) ** 2) / (n_ep - 1),
                                         rel=1e-9)
        assert r["v"] == pytest.approx(np.std(f[:, s], ddof=1) / np.mean(f[:, s]), rel=1e-9)
        devs = [abs(f[k, s] - np.sum(w[:k] * f[:k, s]) / w[:k].sum())
                / np.sqrt(e[k, s] ** 2 + 1 / w[:k].sum()) for k in range(2, n_ep)]
        assert r["max_dev"] == pytest.approx(max(devs), rel=1e-9)
        # |Vs| of the chosen pairs (consecutive, and new vs faintest/brightest so far)
        best = 0.0
        for k in range(1, n_ep):
            prev = list(range(k))
            cands = {k - 1, min(prev, key=lambda i: f[i, s]), max(prev, key=lambda i: f[i, s])}
            for i in cands:
                best = max(best, abs(f[k, s] - f[i, s]) / np.hypot(e[k, s], e[i, s]))
        assert r["max_vs"] == pytest.approx(best, rel=1e-9)
        assert r["min_flux"] == pytest.approx(f[:, s].min())
        assert (r["t_first"], r["t_last"]) == (t[0], t[-1])


def _light_curve(rng, n=60, s=1.0, sigma=0.02, dip=None, edges=0.0):
    t = 1.7e9 + np.arange(n) * 86400.0 + rng.uniform(0, 3600, n)
    f = np.full(n, s)
    if dip is not None:
        a, b, depth = dip
        f[a:b] -= depth
        if edges:
            f[max(0, a - 1)] += edges
            f[min(n - 1, b)] += edges
    return t, f + rng.normal(0, sigma, n), np.full(n, sigma)


def test_ese_detector_finds_dips_and_spares_steady_sources():
    rng = np.random.default_rng(11)
    found = 0
    for k in range(40):
        a = int(rng.integers(5, 45))
        L = int(rng.integers(3, 12))
        t, f, e = _light_curve(rng, dip=(a, a + L, 6 * 0.02))   # 6 sigma per epoch
        ev = var.detect_ese(t, f, e, "default")
        if ev is not None:
            found += 1
            # the window is the injected one to within a bin at each end
            assert abs((ev["t_start"] - t[a]) / 86400) <= 1.5
            assert abs((ev["t_end"] - t[a + L - 1]) / 86400) <= 1.5
    assert found >= 38
    fp = sum(var.detect_ese(*_light_curve(rng), "default") is not None for _ in range(300))
    assert fp <= 3
    # one outlier is not a dip; brighter edges raise the score
    t, f, e = _light_curve(rng)
    f[30] -= 0.5
    assert var.detect_ese(t, f, e, "sensitive") is None
    t, f, e = _light_curve(np.random.default_rng(1), dip=(20, 30, 0.15))
    t2, f2, e2 = _light_curve(np.random.default_rng(1), dip=(20, 30, 0.15), edges=0.1)
    a, b = var.detect_ese(t, f, e), var.detect_ese(t2, f2, e2)
    assert b["edge_sigma"] > 3 and b["score"] > a["score"]
    with pytest.raises(ValueError, match="unknown ESE preset"):
        var.detect_ese(t, f, e, "bold")


def test_presets_order_by_sensitivity():
    rng = np.random.default_rng(2)
    hits = {p: 0 for p in var.PRESETS}
    for _ in range(60):
        t, f, e = _light_curve(rng, dip=(20, 24, 3.5 * 0.02))
        for p in hits:
            hits[p] += var.detect_ese(t, f, e, p) is not None
    assert hits["conservative"] <= hits["default"] <= hits["sensitive"]
    assert hits["sensitive"] > hits["conservative"]
