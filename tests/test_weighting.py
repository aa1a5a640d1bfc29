"""Stokes I, re-phasing and imaging weights against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import weighting as kw
from kernels.constants import SPEED_OF_LIGHT as C


def _data(rng, nrow=300, nchan=5):
    uvw = rng.uniform(-800, 800, (nrow, 3))
    freq = np.linspace(1.3e9, 1.5e9, nchan)
    vis = (rng.standard_normal((nrow, nchan, 2)) + 1j * rng.standard_normal((nrow, nchan, 2))
           ).astype(np.complex64)
    flag = rng.uniform(size=(nrow, nchan, 2)) < 0.1
    weight = rng.uniform(0.5, 2.0, (nrow, nchan, 2)).astype(np.float32)
    return uvw, freq, vis, flag, weight


def test_stokes_i_against_reference():
    rng = np.random.default_rng(1)
    _, _, vis, flag, weight = _data(rng)
    weight[0, 0, 1] = 0.0
    v, w = kw.stokes_i(vis, flag, weight)
    ok = ~flag.any(axis=2) & (weight > 0).all(axis=2)
    np.testing.assert_allclose(v[ok], 0.5 * (vis[..., 0] + vis[..., 1])[ok], rtol=1e-6)
    np.testing.assert_allclose(w[ok], (4 / (1 / weight[..., 0] + 1 / weight[..., 1]))[ok],
                               rtol=1e-6)
    assert np.all(w[~ok] == 0) and np.all(v[~ok] == 0)
    assert w[0, 0] == 0


def test_rephase_against_direct_phases():
    rng = np.random.default_rng(2)
    nrow, nchan = 50, 4
    freq = np.linspace(1.3e9, 1.5e9, nchan)
    vis = (rng.standard_normal((nrow, nchan)) + 1j * rng.standard_normal((nrow, nchan))
           ).astype(np.complex64)
    w_old, w_new = rng.uniform(-3e3, 3e3, nrow), rng.uniform(-3e3, 3e3, nrow)
    ref = vis * np.exp(2j * np.pi * (w_old - w_new)[:, None] * freq[None] / C)
    out = kw.rephase(vis.copy(), w_old, w_new, freq)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def _brute_density(uvw, freq, w, n, du):
    g = np.zeros((n, n))
    for r in range(uvw.shape[0]):
        for c in range(freq.size):
            if w[r, c] == 0:
                continue
            u, v = uvw[r, 0] * freq[c] / C, uvw[r, 1] * freq[c] / C
            if u < 0 or (u == 0 and v < 0):
                u, v = -u, -v
            iu, iv = int(np.floor(u / du + 0.5)) + n // 2, int(np.floor(v / du + 0.5)) + n // 2
            if 0 <= iu < n and 0 <= iv < n:
                g[iu, iv] += w[r, c]
    return g


@pytest.mark.parametrize("weighting", ["natural", "uniform", "briggs"])
def test_imaging_weights_against_reference(weighting):
    rng = np.random.default_rng(3)
    uvw, freq, vis, flag, weight = _data(rng)
    _, w = kw.stokes_i(vis, flag, weight)
    n, du = 64, 150.0
    grid = kw.density_grid(uvw, freq, w, n, n, du, du)
    ref = _brute_density(uvw, freq, w, n, du)
    np.testing.assert_allclose(grid, ref, rtol=1e-12)
    f2 = kw.briggs_f2(grid, w.sum(), 0.0)
    assert f2 == pytest.approx(25.0 / ((ref ** 2).sum() / w.sum()))
    wi = kw.imaging_weights(uvw, freq, w, weighting, grid, du, du, f2)
    # brute force per visibility
    exp = np.zeros_like(wi)
    for r in range(uvw.shape[0]):
        for c in range(freq.size):
            if w[r, c] == 0:
                continue
            u, v = uvw[r, 0] * freq[c] / C, uvw[r, 1] * freq[c] / C
            if u < 0 or (u == 0 and v < 0):
                u, v = -u, -v
            iu, iv = int(np.floor(u / du + 0.5)) + n // 2, int(np.floor(v / du + 0.5)) + n // 2
            if not (0 <= iu < n and 0 <= iv < n):
                exp[r, c] = w[r, c] if weighting == "natural" else 0.0
                continue
            d = ref[iu, iv]
            exp[r, c] = {"natural": w[r, c], "uniform": w[r, c] / d,
                         "briggs": w[r, c] / (1 + f2 * d)}[weighting]
    np.testing.assert_allclose(wi, exp, rtol=1e-5)
    if weighting == "uniform":  # every occupied cell ends up with total weight 1
        g2 = kw.density_grid(uvw, freq, wi, n, n, du, du)
        np.testing.assert_allclose(g2[ref > 0], 1.0, rtol=1e-5)


def test_briggs_limits():
    rng = np.random.default_rng(4)
    uvw, freq, vis, flag, weight = _data(rng, nrow=2000)
    _, w = kw.stokes_i(vis, flag, weight)
    n, du = 32, 200.0
    grid = kw.density_grid(uvw, freq, w, n, n, du, du)
    nat = kw.imaging_weights(uvw, freq, w, "natural")
    uni = kw.imaging_weights(uvw, freq, w, "uniform", grid, du, du)
    inside = uni > 0
    for robust, ref in ((5.0, nat), (-5.0, uni)):
        f2 = kw.briggs_f2(grid, w.sum(), robust)
        b = kw.imaging_weights(uvw, freq, w, "briggs", grid, du, du, f2)
        ratio = b[inside] / ref[inside]
        # a constant factor apart (normalisation does not matter)
        assert np.std(ratio) / np.mean(ratio) < 1e-2


def test_bad_weighting_name():
    with pytest.raises(ValueError, match="weighting must be one of"):
        kw.imaging_weights(np.zeros((1, 3)), np.ones(1), np.ones((1, 1)), "robust")
