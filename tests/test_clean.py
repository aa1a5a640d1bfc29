"""CLEAN minor cycles, beam fit and restore on synthetic images with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernels import clean as kc

N = 128
CELL = math.radians(2.0 / 3600)


def _psf():
    """A Gaussian main lobe (8" x 5", PA 30 deg) with a ring sidelobe, peak 1."""
    g = kc.gaussian_image((N, N), math.radians(8 / 3600), math.radians(5 / 3600), 30.0, CELL)
    x = np.arange(N)[:, None] - N // 2
    y = np.arange(N)[None, :] - N // 2
    r = np.hypot(x, y)
    ring = -0.08 * np.exp(-0.5 * ((r - 9) / 2.0) ** 2)
    return g + ring


def _convolve(psf, comps):
    img = np.zeros((N, N))
    for (x, y), f in comps.items():
        sh = np.roll(np.roll(psf, x - N // 2, axis=0), y - N // 2, axis=1)
        img += f * sh
    return img


SOURCES = {(40, 70): 5.0, (90, 30): 2.0, (64, 64): -1.0}


@pytest.mark.parametrize("algo", ["hogbom", "clark"])
def test_clean_recovers_point_sources(algo):
    psf = _psf()
    res = _convolve(psf, SOURCES)
    model = np.zeros_like(res)
    mask = np.zeros((1, 1), bool)
    for _ in range(30):  # "major cycles": exact residual from the true sky
        if algo == "hogbom":
            n, _ = kc.hogbom_minor(res, psf, model, 0.2, 10000, 1e-4, mask, False)
        else:
            n, _ = kc.clark_minor(res, psf, model, 0.2, 10000, 1e-4, mask, False, N // 2 - 1,
                                  100000)
        res = _convolve(psf, SOURCES) - _convolve(psf, {
            (int(i), int(j)): model[i, j] for i, j in zip(*np.nonzero(model))})
        if n == 0 or np.abs(res).max() < 1e-4:
            break
    for (x, y), f in SOURCES.items():
        assert model[x, y] == pytest.approx(f, abs=2e-3)
    assert np.abs(model).sum() == pytest.approx(sum(abs(f) for f in SOURCES.values()),
                                                rel=2e-3)
    assert np.abs(res).max() < 1e-3


def test_mask_is_honoured():
    psf = _psf()
    res = _convolve(psf, SOURCES)
    model = np.zeros_like(res)
    mask = np.zeros((N, N), bool)
    mask[80:100, 20:40] = True  # only around the 2 Jy source
    kc.hogbom_minor(res, psf, model, 0.2, 1000, 1e-3, mask, True)
    assert np.all(model[~mask] == 0)
    assert model[90, 30] == pytest.approx(2.0, rel=0.02)


def test_fit_beam_recovers_gaussian():
    bmaj, bmin, bpa = math.radians(9 / 3600), math.radians(6 / 3600), -35.0
    psf = kc.gaussian_image((N, N), bmaj, bmin, bpa, CELL)
    fmaj, fmin, fpa = kc.fit_beam(psf, CELL)
    assert fmaj == pytest.approx(bmaj, rel=1e-3)
    assert fmin == pytest.approx(bmin, rel=1e-3)
    assert fpa == pytest.approx(bpa, abs=0.1)
    # PA convention: the image's first axis points west, the second north; a beam at
    # PA 90 (east-west) is elongated along the first axis
    psf = kc.gaussian_image((N, N), bmaj, bmin, 90.0, CELL)
    assert psf[N // 2 + 3, N // 2] > psf[N // 2, N // 2 + 3]
    assert abs(kc.fit_beam(psf, CELL)[2]) == pytest.approx(90.0, abs=0.1)


def test_restore_puts_flux_under_the_beam():
    bmaj, bmin, bpa = math.radians(8 / 3600), math.radians(5 / 3600), 20.0
    model = np.zeros((N, N))
    model[50, 60] = 3.0
    img = kc.restore(model, np.zeros((N, N)), bmaj, bmin, bpa, CELL)
    ref = 3.0 * kc.gaussian_image((N, N), bmaj, bmin, bpa, CELL, centre=(50, 60))
    np.testing.assert_allclose(img, ref, atol=1e-6)


def test_restore_of_many_components_equals_the_fft_convolution():
    """Beams added per component (sparse models) and scipy's FFT convolution (dense
    ones) give the same image, including components within a beam of the edges."""
    from scipy import signal

    bmaj, bmin, bpa = math.radians(8 / 3600), math.radians(5 / 3600), 20.0
    rng = np.random.default_rng(3)
    model = np.zeros((N, N))
    for x, y in [(0, 0), (1, N - 2), (N - 1, 40), (30, 3)] + [
            tuple(rng.integers(0, N, 2)) for _ in range(26)]:
        model[x, y] += rng.normal(0, 1.0)
    resid = rng.normal(0, 0.01, (N, N))
    img = kc.restore(model, resid, bmaj, bmin, bpa, CELL)
    s = 2.0 * math.sqrt(2.0 * math.log(2.0))
    h = int(math.ceil(5.0 * bmaj / s / CELL)) + 1
    k = kc.gaussian_image((2 * h + 1, 2 * h + 1), bmaj, bmin, bpa, CELL, centre=(h, h))
    ref = resid + signal.oaconvolve(model, k, mode="same")
    assert np.count_nonzero(model) * k.size < model.size     # the per-component path
    np.testing.assert_allclose(img, ref, atol=1e-9)
    dense = rng.normal(0, 1.0, (N, N))                         # the FFT path
    np.testing.assert_allclose(kc.restore(dense, resid, bmaj, bmin, bpa, CELL),
                               resid + signal.oaconvolve(dense, k, mode="same"), atol=1e-9)


def test_robust_sigma():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 200)) * 0.01
    x[100, 100] = 50.0
    assert kc.robust_sigma(x) == pytest.approx(0.01, rel=0.03)
