"""Baseline-dependent averaging for imaging: the kernel against a brute-force average,
the choice of bins against the smearing budget, and images with and without it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from kernels import averaging as ka
from kernels.constants import SPEED_OF_LIGHT as C


def _brute(vis, wgt, uvw, freq, tf, ff, chan0):
    nt, nb, nf = vis.shape
    rows = []
    for b in range(nb):
        for t0 in range(0, nt, tf[b]):
            for f0 in range(0, nf, ff[b]):
                ts = slice(t0, min(nt, t0 + tf[b]))
                fs = slice(f0, min(nf, f0 + ff[b]))
                w = wgt[ts, b, fs].astype(np.float64)
                w = np.where(w > 0, w, 0.0)
                uvl = (uvw[ts, b, None, :] * freq[None, fs, None] / C)
                tm = (t0 + min(nt, t0 + tf[b]) - 1) // 2
                fm = (f0 + min(nf, f0 + ff[b]) - 1) // 2
                if w.sum() > 0:
                    v = (w * vis[ts, b, fs]).sum() / w.sum()
                    u = (w[..., None] * uvl).sum(axis=(0, 1)) / w.sum()
                else:
                    v, u = 0.0, uvw[tm, b] * freq[fm] / C
                rows.append((v, w.sum(), u, tm, chan0 + fm))
    return rows


def test_bda_average_matches_brute_force():
    rng = np.random.default_rng(3)
    nt, nb, nf = 7, 5, 10
    vis = (rng.normal(size=(nt, nb, nf)) + 1j * rng.normal(size=(nt, nb, nf))).astype(
        np.complex64)
    wgt = rng.uniform(0.5, 2.0, size=(nt, nb, nf)).astype(np.float32)
    wgt[rng.uniform(size=wgt.shape) < 0.2] = 0.0  # flagged samples
    wgt[:, 2, :] = 0.0                            # a fully flagged baseline
    uvw = rng.normal(size=(nt, nb, 3)) * 300.0
    freq = 1.3e9 + 2.4e5 * np.arange(nf)
    tf = np.array([1, 2, 3, 7, 4], dtype=np.int64)  # partial last bins included
    ff = np.array([1, 3, 2, 10, 4], dtype=np.int64)
    counts = ka.bda_count(nt, nf, tf, ff)
    start = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
    n = int(counts.sum())
    out = (np.zeros(n, np.complex64), np.zeros(n, np.float32), np.zeros((n, 3)),
           np.zeros(n, np.int32), np.zeros(n, np.int32))
    ka.bda_average(vis, wgt, uvw, freq, tf, ff, start, 16, *out)
    ref = _brute(vis, wgt, uvw, freq, tf, ff, 16)
    assert len(ref) == n
    for k, (v, w, u, tm, fm) in enumerate(ref):
        assert out[0][k] == pytest.approx(v, rel=1e-5, abs=1e-6)
        assert out[1][k] == pytest.approx(w, rel=1e-6)
        np.testing.assert_allclose(out[2][k], u, rtol=1e-12, atol=1e-9)
        assert (out[3][k], out[4][k]) == (tm, fm)
    assert np.all(out[1][start[2]:start[2] + counts[2]] == 0)


def test_bda_factors_within_budget_and_fewest_visibilities():
    rng = np.random.default_rng(5)
    nt, nb, nfc = 24, 40, 48
    # baselines from 5 m to 3 km, moving like Earth-rotation tracks
    lengths = np.geomspace(5.0, 3000.0, nb)
    ang = rng.uniform(0, 2 * np.pi, nb)
    t = np.arange(nt)[:, None] * 12.9 * 7.29e-5
    uvw = np.stack([lengths * np.cos(ang + t), lengths * np.sin(ang + t),
                    0.3 * lengths * np.cos(ang)[None].repeat(nt, 0)], axis=-1)
    freq = 1.311e9 + 244140.625 * np.arange(768)
    theta, loss = math.radians(1.3), 0.01
    tf, ff = ka.bda_factors(uvw, freq, 244140.625, theta, loss, nfc)
    uvmax = np.hypot(uvw[..., 0], uvw[..., 1]).max(0)
    duv = np.sqrt((np.diff(uvw, axis=0) ** 2).sum(-1)).max(0)
    got = ka.smearing_loss(uvmax, duv, 244140.625, freq.max(), theta, tf, ff)
    assert np.all((got <= loss) | ((tf == 1) & (ff == 1)))
    # brute force: no bin within budget has fewer output visibilities
    for b in range(nb):
        best = min(ka.bda_count(nt, nfc, a, c)
                   for a, c in itertools.product(range(1, nt + 1), range(1, nfc + 1))
                   if ka.smearing_loss(uvmax[b], duv[b], 244140.625, freq.max(), theta, a, c)
                   <= loss or (a, c) == (1, 1))  # (1, 1): the data as they are
        assert ka.bda_count(nt, nfc, tf[b], ff[b]) == best
    # short baselines average hard, the longest not at all
    assert tf[0] * ff[0] >= 100 and tf[-1] * ff[-1] == 1
    assert np.all(ka.bda_factors(uvw, freq, 244140.625, theta, 0.0, nfc)[0] == 1)


def test_smearing_loss_is_the_decorrelation_of_a_point_source():
    """Averaging exp(2 pi i u l) over the bin's uv span loses what smearing_loss says."""
    uvmax, theta, dnu, fmax = 1500.0, math.radians(1.2), 244140.625, 1.5e9
    for ff in (1, 4, 16):
        f = 1.45e9 + dnu * (np.arange(ff * 64) / 64.0)
        u = uvmax * f / C
        got = abs(np.exp(2j * np.pi * u * math.sin(theta)).mean())
        exp = 1.0 - ka.smearing_loss(uvmax, 0.0, dnu, fmax, math.sin(theta), 1, ff)
        assert got == pytest.approx(exp, abs=2e-4)
