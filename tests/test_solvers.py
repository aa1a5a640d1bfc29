"""kernels.solvers: StEFCal cell solver, sums, statistics, Jones application.

Synthetic data only (numpy in, numpy out): random antenna gains corrupt a random
model; the solver must recover them exactly without noise, at the Cramer-Rao level
with noise (and report that level honestly), and apply_jones must undo a corruption.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels import solvers


def _setup(nant=10, ntime=4, nchan=6, npol=2, seed=0, noise=0.0, autos=True):
    rng = np.random.default_rng(seed)
    pairs = [(p, q) for p in range(nant) for q in range(p if autos else p + 1, nant)]
    a1 = np.array([p for p, _ in pairs], np.int64)
    a2 = np.array([q for _, q in pairs], np.int64)
    nbl = a1.size
    g = (rng.uniform(0.5, 1.5, (nant, npol))
         * np.exp(1j * rng.uniform(-np.pi, np.pi, (nant, npol))))
    model = (rng.normal(size=(ntime, nbl, nchan, npol))
             + 1j * rng.normal(size=(ntime, nbl, nchan, npol))) * 5.0
    vis = g[a1][None, :, None, :] * np.conj(g[a2])[None, :, None, :] * model
    vis = vis + noise * (rng.normal(size=vis.shape) + 1j * rng.normal(size=vis.shape))
    flag = np.zeros(vis.shape, bool)
    weight = np.ones(vis.shape, np.float32)
    return dict(a1=a1, a2=a2, g=g, vis=vis.astype(np.complex64),
                model=model.astype(np.complex64), flag=flag, weight=weight, nant=nant)


def _sums(d, tbin=None, fbin=None, prior_t=None, prior_f=None):
    ntime, nbl, nchan, npol = d["vis"].shape
    nant = d["nant"]
    tbin = np.zeros(ntime, np.int64) if tbin is None else tbin
    fbin = np.zeros(nchan, np.int64) if fbin is None else fbin
    nct, ncf = tbin.max() + 1, fbin.max() + 1
    A = np.zeros((nct, ncf, npol, nbl), np.complex128)
    B = np.zeros(A.shape)
    C = np.zeros(A.shape)
    N = np.zeros(A.shape, np.int64)
    pt = np.ones((ntime, nant, npol), np.complex128) if prior_t is None else prior_t
    pf = np.ones((nant, nchan, npol), np.complex128) if prior_f is None else prior_f
    solvers.accumulate(d["vis"], d["model"], d["flag"], d["weight"], d["a1"], d["a2"], tbin,
                       fbin, pt, pf, A, B, C, N)
    return A, B, C, N


def _solve(A, B, C, N, a1, a2, nant, phase_only=False, max_iter=200):
    nct, ncf, npol = A.shape[:3]
    g = np.zeros((nct, ncf, npol, nant), np.complex128)
    err = np.zeros(g.shape)
    it = np.zeros((nct, ncf, npol), np.int64)
    conv = np.zeros((nct, ncf, npol), bool)
    chi2 = np.zeros((nct, ncf, npol))
    n = np.zeros((nct, ncf, npol), np.int64)
    solvers.solve_cells(A, B, C, N, a1, a2, nant, max_iter, 1e-10, phase_only, g, err, it,
                        conv, chi2, n)
    return g, err, it, conv, chi2, n


def _ref(g, ref=0):
    """Reference gains (..., nant) to antenna ``ref``: zero phase there."""
    r = g[..., ref:ref + 1]
    return g * np.conj(r) / np.abs(r)


def test_noise_free_gains_recovered_exactly():
    d = _setup(nant=12, seed=3)
    A, B, C, N = _sums(d)
    g, err, it, conv, chi2, n = _solve(A, B, C, N, d["a1"], d["a2"], d["nant"])
    assert conv.all()
    est = _ref(g[0, 0])                          # (npol, nant)
    true = _ref(d["g"].T)
    # float32 data: the solution is exact to single precision
    assert np.abs(est - true).max() < 1e-5
    # chi^2 ~ 0 (float32 rounding of |V|^2 sums only)
    assert chi2.max() < 1e-6 * C.sum()
    # autocorrelations never enter: N counts cross-correlations only
    ncross = np.count_nonzero(d["a1"] != d["a2"])
    assert n[0, 0, 0] == ncross * d["vis"].shape[0] * d["vis"].shape[2]


def test_sums_are_additive_over_chunks():
    d = _setup(seed=5, noise=1.0)
    whole = _sums(d)
    half1 = {**d, "vis": d["vis"][:, :, :3], "model": d["model"][:, :, :3],
             "flag": d["flag"][:, :, :3], "weight": d["weight"][:, :, :3]}
    half2 = {**d, "vis": d["vis"][:, :, 3:], "model": d["model"][:, :, 3:],
             "flag": d["flag"][:, :, 3:], "weight": d["weight"][:, :, 3:]}
    s1, s2 = _sums(half1), _sums(half2)
    for w, a, b in zip(whole, s1, s2):
        np.testing.assert_allclose(w, a + b, rtol=1e-12, atol=1e-9)


def test_chi2_from_sums_matches_brute_force():
    d = _setup(seed=7, noise=2.0)
    A, B, C, N = _sums(d)
    g, *_ = _solve(A, B, C, N, d["a1"], d["a2"], d["nant"])
    chi2, n, fisher = solvers.cell_statistics(A[0, 0, 0], B[0, 0, 0], C[0, 0, 0], N[0, 0, 0],
                                              d["a1"], d["a2"], g[0, 0, 0])
    cross = d["a1"] != d["a2"]
    gg = g[0, 0, 0][d["a1"]] * np.conj(g[0, 0, 0][d["a2"]])
    r = d["vis"][..., 0].astype(complex) - gg[None, :, None] * d["model"][..., 0]
    brute = np.sum(np.abs(r[:, cross]) ** 2)
    assert chi2 == pytest.approx(brute, rel=1e-6)


def test_noise_level_errors_and_reported_sigma():
    """Monte Carlo over 200 noise realisations (cells): the scatter of the solutions
    equals the error the solver reports (the Cramer-Rao bound sigma^2/sum|g|^2 B)."""
    nrep = 200
    d = _setup(nant=8, ntime=nrep, nchan=4, npol=1, seed=11, noise=1.5)
    tbin = np.arange(nrep, dtype=np.int64)          # one cell per "time"
    A, B, C, N = _sums(d, tbin=tbin)
    g, err, it, conv, chi2, n = _solve(A, B, C, N, d["a1"], d["a2"], d["nant"])
    assert conv.all()
    est = g[:, 0, 0]                                   # (nrep, nant)
    true = d["g"][:, 0]
    # remove the overall phase ambiguity by the best-fitting common rotation (this
    # adds no reference-antenna noise, unlike referencing to one antenna)
    rot = np.sum(true[None] * np.conj(est), axis=1)
    est = est * (rot / np.abs(rot))[:, None]
    emp = np.sqrt(np.mean(np.abs(est - true[None]) ** 2, axis=0))
    rep = np.sqrt(np.mean(err[:, 0, 0] ** 2, axis=0))
    # within 15 % per antenna (200 realisations: the rms is known to ~5 %; the fitted
    # common phase absorbs ~1/nant of the variance)
    np.testing.assert_allclose(emp, rep, rtol=0.15)
    # the noise estimate from chi^2: E|n|^2 = 2 * 1.5^2
    s2 = chi2[:, 0, 0] / (n[:, 0, 0] - d["nant"])
    assert np.mean(s2) == pytest.approx(2 * 1.5 ** 2, rel=0.03)


def test_phase_only_keeps_unit_amplitude():
    d = _setup(seed=13)
    A, B, C, N = _sums(d)
    g, *_ = _solve(A, B, C, N, d["a1"], d["a2"], d["nant"], phase_only=True)
    np.testing.assert_allclose(np.abs(g), 1.0, rtol=1e-12)
    # the phases are still those of the true gains when amplitudes are ignored...
    # only approximately (amplitude errors leak into the phase of a LS fit), but close
    est = np.angle(_ref(g[0, 0]))
    true = np.angle(_ref(d["g"].T))
    assert np.abs(np.angle(np.exp(1j * (est - true)))).max() < 0.3


def test_flagged_antenna_gets_no_solution_and_max_iter_is_reported():
    d = _setup(seed=17)
    bad = (d["a1"] == 3) | (d["a2"] == 3)
    d["flag"][:, bad] = True
    A, B, C, N = _sums(d)
    g, err, it, conv, chi2, n = _solve(A, B, C, N, d["a1"], d["a2"], d["nant"])
    assert np.all(g[..., 3] == 0) and np.all(np.isinf(err[..., 3]))
    assert np.all(np.isfinite(err[..., [0, 1, 2, 4]]))
    g1, err1, it1, conv1, *_ = _solve(A, B, C, N, d["a1"], d["a2"], d["nant"], max_iter=1)
    assert not conv1.any() and (it1 == 1).all()


def test_priors_enter_the_model():
    """Solving with a known per-channel prior returns the remaining factor only."""
    d = _setup(seed=19, nchan=5)
    rng = np.random.default_rng(1)
    bp = np.exp(1j * rng.uniform(-3, 3, (d["nant"], 5, 2))) * rng.uniform(0.8, 1.2,
                                                                          (d["nant"], 5, 2))
    corr = bp[d["a1"]] * np.conj(bp[d["a2"]])                  # (nbl, nchan, npol)
    d["vis"] = (d["vis"] * corr[None]).astype(np.complex64)
    A, B, C, N = _sums(d, prior_f=bp)
    g, *_ = _solve(A, B, C, N, d["a1"], d["a2"], d["nant"])
    assert np.abs(_ref(g[0, 0]) - _ref(d["g"].T)).max() < 1e-4


def test_apply_jones_undoes_corruption_and_propagates_flags():
    d = _setup(seed=23, nchan=4)
    ntime, nbl, nchan, npol = d["vis"].shape
    rng = np.random.default_rng(2)
    nant = d["nant"]
    gt = (rng.uniform(0.5, 1.5, (ntime, nant, npol))
          * np.exp(1j * rng.uniform(-3, 3, (ntime, nant, npol))))
    bf = (rng.uniform(0.5, 1.5, (nant, nchan, npol))
          * np.exp(1j * rng.uniform(-3, 3, (nant, nchan, npol))))
    a1, a2 = d["a1"], d["a2"]
    jones = (gt[:, a1, None, :] * np.conj(gt[:, a2, None, :]) * bf[None, a1]
             * np.conj(bf[None, a2]))
    vis = (d["model"] * jones).astype(np.complex64).reshape(ntime * nbl, nchan, npol)
    flag = np.zeros(vis.shape, bool)
    gtf = np.zeros(gt.shape, bool)
    gtf[1, 2, 0] = True
    bff = np.zeros(bf.shape, bool)
    bff[4, 3, 1] = True
    out = np.empty_like(vis)
    oflag = np.empty(vis.shape, bool)
    tidx = np.repeat(np.arange(ntime), nbl)
    solvers.apply_jones(vis, flag, np.tile(a1, ntime), np.tile(a2, ntime), tidx, gt, gtf, bf,
                        bff, out, oflag)
    out = out.reshape(ntime, nbl, nchan, npol)
    oflag = oflag.reshape(ntime, nbl, nchan, npol)
    ok = ~oflag
    np.testing.assert_allclose(out[ok], d["model"][ok], rtol=2e-5, atol=2e-5)
    exp = np.zeros(oflag.shape, bool)
    exp[1, (a1 == 2) | (a2 == 2), :, 0] = True
    exp[:, (a1 == 4) | (a2 == 4), 3, 1] = True
    np.testing.assert_array_equal(oflag, exp)
    assert np.all(out[oflag] == 0)


def test_predict_points_matches_brute_force_dft():
    """kernels.dft.predict_points (phase recurrence, complex64, every polarization)
    against the brute-force DFT of kernels.predict (one exp per sample)."""
    from kernels.dft import predict_points
    from kernels.predict import predict_dft

    rng = np.random.default_rng(4)
    uvw = rng.uniform(-2000, 2000, (3, 50, 3))
    lmn = rng.uniform(-0.03, 0.03, (3, 4, 3))
    lmn[..., 2] = np.sqrt(1 - lmn[..., 0] ** 2 - lmn[..., 1] ** 2) - 1
    freqs = 1.311e9 + np.arange(48) * 244140.625
    flux = rng.uniform(0.1, 20, (3, 4, 48))
    ref = np.zeros((3, 50, 48), np.complex128)
    predict_dft(uvw, lmn, flux, freqs, ref)
    out = np.empty((3, 50, 48, 2), np.complex64)
    predict_points(uvw, lmn, flux, freqs[0], freqs[1] - freqs[0], out)
    for p in range(2):
        # complex64 output: relative 1e-7 of the total flux
        np.testing.assert_allclose(out[..., p], ref, atol=1e-6 * flux.sum(axis=1).max())


def test_specialised_accumulators_equal_the_generic_one():
    """accumulate_bandpass / accumulate_gains (the fast paths the graphs use) give the
    generic accumulate's sums, priors and flags included (to float32 rounding: the
    data are complex64 and the fast paths may reorder the sums)."""
    d = _setup(seed=29, nchan=7, ntime=5, noise=1.0)
    ntime, nbl, nchan, npol = d["vis"].shape
    nant = d["nant"]
    rng = np.random.default_rng(3)
    d["flag"][rng.random(d["flag"].shape) < 0.1] = True
    d["weight"][:] = rng.uniform(0.5, 2.0, d["weight"].shape)
    pt = np.exp(1j * rng.uniform(-3, 3, (ntime, nant, npol)))
    pf = (rng.uniform(0.5, 1.5, (nant, nchan, npol))
          * np.exp(1j * rng.uniform(-3, 3, (nant, nchan, npol))))
    # bandpass: every channel a cell, all times in one
    ref = _sums(d, fbin=np.arange(nchan, dtype=np.int64), prior_t=pt)
    got = [np.zeros((npol, nbl, nchan), x) for x in (np.complex128, float, float, np.int64)]
    solvers.accumulate_bandpass(d["vis"], d["model"], d["flag"], d["weight"], d["a1"],
                                d["a2"], pt, *got)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g.transpose(2, 0, 1)[None], r, rtol=1e-6, atol=1e-9)
    # gains: intervals of two integrations, all channels in one
    tbin = np.arange(ntime, dtype=np.int64) // 2
    ref = _sums(d, tbin=tbin, prior_f=pf)
    got = [np.zeros((3, npol, nbl), x) for x in (np.complex128, float, float, np.int64)]
    solvers.accumulate_gains(d["vis"], d["model"], d["flag"], d["weight"], d["a1"], d["a2"],
                             tbin, pf, *got)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g[:, None], r, rtol=1e-6, atol=1e-9)
