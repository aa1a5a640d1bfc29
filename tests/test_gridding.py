"""kernels.gridding against an explicit DFT with the w-term, its adjoint, and ducc0."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import gridding as g

C = g.SPEED_OF_LIGHT


# --------------------------------------------------------------------------- helpers


def problem(nrow=120, nchan=3, npix=(96, 80), fov_deg=12.0, seed=42, wscale=1.0):
    """Random uvw filling the uv-plane of a wide field (the w-term matters)."""
    rng = np.random.default_rng(seed)
    nx, ny = npix
    pixx = np.deg2rad(fov_deg) / nx
    pixy = np.deg2rad(fov_deg) / ny * 1.1
    f0 = 1.2e9
    freq = f0 + np.arange(nchan) * 2e6
    # |u| pixsize < 0.45 at the top frequency: the grid is well sampled
    umax = 0.45 / pixx / (freq[-1] / C)
    vmax = 0.45 / pixy / (freq[-1] / C)
    uvw = np.empty((nrow, 3))
    uvw[:, 0] = rng.uniform(-umax, umax, nrow)
    uvw[:, 1] = rng.uniform(-vmax, vmax, nrow)
    uvw[:, 2] = rng.uniform(-umax, umax, nrow) * wscale
    vis = rng.standard_normal((nrow, nchan)) + 1j * rng.standard_normal((nrow, nchan))
    return dict(uvw=uvw, freq=freq, vis=vis, nx=nx, ny=ny, pixx=pixx, pixy=pixy, rng=rng)


def lmn(nx, ny, pixx, pixy):
    l, m = np.meshgrid((np.arange(nx) - nx // 2) * pixx, (np.arange(ny) - ny // 2) * pixy,
                       indexing="ij")
    r2 = l * l + m * m
    nm1 = -r2 / (np.sqrt(1.0 - r2) + 1.0)
    return l, m, nm1


def dft_dirty(uvw, freq, vis, nx, ny, pixx, pixy, wgt=None, flags=None, apply_w=True,
              flip_w=False):
    """sum_k wgt Re[V exp(2 pi i (u l + v m - s w (n-1)))] / n  (s = -1 with flip_w)."""
    l, m, nm1 = lmn(nx, ny, pixx, pixy)
    if not apply_w:
        nm1 = np.zeros_like(nm1)
    sw = -1.0 if flip_w else 1.0
    res = np.zeros((nx, ny))
    for c in range(freq.size):
        uu = uvw * (freq[c] / C)
        v = vis[:, c].astype(np.complex128).copy()
        if wgt is not None:
            v *= wgt[:, c]
        if flags is not None:
            v[flags[:, c]] = 0
        ph = (np.multiply.outer(uu[:, 0], l) + np.multiply.outer(uu[:, 1], m)
              - sw * np.multiply.outer(uu[:, 2], nm1))
        res += np.tensordot(v, np.exp(2j * np.pi * ph), axes=1).real
    return res / (nm1 + 1.0) if apply_w else res


def dft_vis(uvw, freq, dirty, pixx, pixy, wgt=None, flags=None, apply_w=True):
    nx, ny = dirty.shape
    l, m, nm1 = lmn(nx, ny, pixx, pixy)
    if not apply_w:
        nm1 = np.zeros_like(nm1)
    img = dirty / (nm1 + 1.0) if apply_w else dirty
    out = np.zeros((uvw.shape[0], freq.size), dtype=np.complex128)
    for c in range(freq.size):
        uu = uvw * (freq[c] / C)
        ph = (np.multiply.outer(uu[:, 0], l) + np.multiply.outer(uu[:, 1], m)
              - np.multiply.outer(uu[:, 2], nm1))
        out[:, c] = np.tensordot(np.exp(-2j * np.pi * ph), img, axes=2)
    if wgt is not None:
        out *= wgt
    if flags is not None:
        out[flags] = 0
    return out


def rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def kw(p, eps, **extra):
    return dict(npix_x=p["nx"], npix_y=p["ny"], pixsize_x=p["pixx"], pixsize_y=p["pixy"],
                epsilon=eps, **extra)


# ------------------------------------------------------------------ against the DFT


@pytest.mark.parametrize("eps", [1e-4, 1e-6, 1e-7])
@pytest.mark.parametrize("wstack", [True, False])
def test_vis2dirty_matches_dft(eps, wstack):
    p = problem()
    wgt = p["rng"].uniform(0.5, 2.0, p["vis"].shape)
    ref = dft_dirty(p["uvw"], p["freq"], p["vis"], p["nx"], p["ny"], p["pixx"], p["pixy"],
                    wgt=wgt, apply_w=wstack)
    out = g.vis2dirty(p["uvw"], p["freq"], p["vis"], wgt, do_wstacking=wstack, **kw(p, eps))
    assert out.dtype == np.float64 and out.shape == (p["nx"], p["ny"])
    err = rel_l2(out, ref)
    assert err < eps, err
    assert err > 1e-3 * eps  # the accuracy knob really is used (not a DFT in disguise)


@pytest.mark.parametrize("eps", [1e-4, 1e-6])
def test_dirty2vis_matches_dft(eps):
    p = problem(nrow=80)
    dirty = p["rng"].standard_normal((p["nx"], p["ny"]))
    wgt = p["rng"].uniform(0.5, 2.0, p["vis"].shape)
    ref = dft_vis(p["uvw"], p["freq"], dirty, p["pixx"], p["pixy"], wgt=wgt)
    out = g.dirty2vis(p["uvw"], p["freq"], dirty, wgt, pixsize_x=p["pixx"],
                      pixsize_y=p["pixy"], epsilon=eps)
    assert out.dtype == np.complex128 and out.shape == p["vis"].shape
    assert rel_l2(out, ref) < eps


def test_w_term_matters_in_these_problems():
    """Guard: without the w-term the test problems would be wrong far beyond epsilon."""
    p = problem()
    ref = dft_dirty(p["uvw"], p["freq"], p["vis"], p["nx"], p["ny"], p["pixx"], p["pixy"])
    flat = g.vis2dirty(p["uvw"], p["freq"], p["vis"], do_wstacking=False, **kw(p, 1e-6))
    assert rel_l2(flat, ref) > 1e-2


def test_flip_w_gives_the_plus_w_convention():
    p = problem(nrow=60)
    ref = dft_dirty(p["uvw"], p["freq"], p["vis"], p["nx"], p["ny"], p["pixx"], p["pixy"],
                    flip_w=True)
    out = g.vis2dirty(p["uvw"], p["freq"], p["vis"], flip_w=True, **kw(p, 1e-6))
    assert rel_l2(out, ref) < 1e-6


def test_single_precision():
    p = problem()
    vis = p["vis"].astype(np.complex64)
    ref = dft_dirty(p["uvw"], p["freq"], vis, p["nx"], p["ny"], p["pixx"], p["pixy"])
    out = g.vis2dirty(p["uvw"], p["freq"], vis, **kw(p, 1e-4))
    assert out.dtype == np.float32
    assert rel_l2(out, ref) < 1e-4
    dirty = p["rng"].standard_normal((p["nx"], p["ny"])).astype(np.float32)
    v = g.dirty2vis(p["uvw"], p["freq"], dirty, pixsize_x=p["pixx"], pixsize_y=p["pixy"],
                    epsilon=1e-4)
    assert v.dtype == np.complex64
    assert rel_l2(v, dft_vis(p["uvw"], p["freq"], dirty, p["pixx"], p["pixy"])) < 1e-4
    with pytest.raises(ValueError, match="double precision"):
        g.vis2dirty(p["uvw"], p["freq"], vis, **kw(p, 1e-7))


# ------------------------------------------------------------------------ adjointness


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("wstack", [True, False])
def test_adjointness(single, wstack):
    p = problem(nrow=150, nchan=4)
    rng = p["rng"]
    vis = p["vis"].astype(np.complex64 if single else np.complex128)
    wgt = rng.uniform(0.5, 2.0, vis.shape).astype(np.float32 if single else np.float64)
    flags = rng.random(vis.shape) < 0.2
    img = rng.standard_normal((p["nx"], p["ny"])).astype(np.float32 if single else np.float64)
    eps = 1e-4 if single else 1e-6
    common = dict(pixsize_x=p["pixx"], pixsize_y=p["pixy"], epsilon=eps, do_wstacking=wstack)
    d = g.vis2dirty(p["uvw"], p["freq"], vis, wgt, flags, npix_x=p["nx"], npix_y=p["ny"],
                    **common)
    v = g.dirty2vis(p["uvw"], p["freq"], img, wgt, flags, **common)
    lhs = np.vdot(v.astype(np.complex128), vis.astype(np.complex128)).real
    rhs = np.vdot(img.astype(np.float64), d.astype(np.float64))
    scale = np.linalg.norm(v) * np.linalg.norm(vis) + np.linalg.norm(img) * np.linalg.norm(d)
    tol = 1e-5 if single else 1e-12
    assert abs(lhs - rhs) < tol * scale, (lhs, rhs)


# ------------------------------------------------------------------ flags and weights


def test_flags_and_weights_are_honoured():
    p = problem(nrow=100)
    rng = p["rng"]
    flags = rng.random(p["vis"].shape) < 0.3
    wgt = rng.uniform(0.5, 2.0, p["vis"].shape)
    bad = p["vis"].copy()
    bad[flags] = 1e6  # flagged garbage must not leak into the image
    out = g.vis2dirty(p["uvw"], p["freq"], bad, wgt, flags, **kw(p, 1e-6))
    ref = dft_dirty(p["uvw"], p["freq"], p["vis"], p["nx"], p["ny"], p["pixx"], p["pixy"],
                    wgt=wgt, flags=flags)
    assert rel_l2(out, ref) < 1e-6
    # zero weights act as flags
    w0 = np.where(flags, 0.0, wgt)
    out0 = g.vis2dirty(p["uvw"], p["freq"], bad, w0, **kw(p, 1e-6))
    assert rel_l2(out0, ref) < 1e-6
    # degridding: flagged visibilities come back as 0, the rest weighted
    img = rng.standard_normal((p["nx"], p["ny"]))
    v = g.dirty2vis(p["uvw"], p["freq"], img, wgt, flags, pixsize_x=p["pixx"],
                    pixsize_y=p["pixy"], epsilon=1e-6)
    assert np.all(v[flags] == 0)
    vref = dft_vis(p["uvw"], p["freq"], img, p["pixx"], p["pixy"], wgt=wgt, flags=flags)
    assert rel_l2(v, vref) < 1e-6


def test_prebuilt_index_gives_the_same_results():
    """make_index once, then vis2dirty/dirty2vis with index= == building it per call,
    and against the DFT (flags and zero weights honoured through the index)."""
    p = problem(nrow=100)
    rng = p["rng"]
    flags = rng.random(p["vis"].shape) < 0.3
    wgt = rng.uniform(0.5, 2.0, p["vis"].shape)
    bad = p["vis"].copy()
    bad[flags] = 1e6
    plan = g.plan_for(p["uvw"], p["freq"], p["nx"], p["ny"], p["pixx"], p["pixy"], 1e-6)
    idx = g.make_index(p["uvw"], p["freq"], plan, weights=wgt, flags=flags)
    for _ in range(2):  # reusable
        out = g.vis2dirty(p["uvw"], p["freq"], bad, wgt, **kw(p, 1e-6), plan=plan, index=idx)
        ref = g.vis2dirty(p["uvw"], p["freq"], bad, wgt, flags, **kw(p, 1e-6), plan=plan)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    dft = dft_dirty(p["uvw"], p["freq"], p["vis"], p["nx"], p["ny"], p["pixx"], p["pixy"],
                    wgt=wgt, flags=flags)
    assert rel_l2(out, dft) < 1e-6
    img = rng.standard_normal((p["nx"], p["ny"]))
    v = g.dirty2vis(p["uvw"], p["freq"], img, wgt, pixsize_x=p["pixx"], pixsize_y=p["pixy"],
                    epsilon=1e-6, plan=plan, index=idx)
    vref = g.dirty2vis(p["uvw"], p["freq"], img, wgt, flags, pixsize_x=p["pixx"],
                       pixsize_y=p["pixy"], epsilon=1e-6, plan=plan)
    np.testing.assert_allclose(v, vref, rtol=1e-12, atol=1e-12 * np.abs(vref).max())
    with pytest.raises(ValueError, match="plan"):
        g.vis2dirty(p["uvw"], p["freq"], bad, wgt, **kw(p, 1e-6), index=idx)
    with pytest.raises(ValueError, match="index built for"):
        g.dirty2vis(p["uvw"][:50], p["freq"], img, None, pixsize_x=p["pixx"],
                    pixsize_y=p["pixy"], epsilon=1e-6, plan=plan, index=idx)


def test_everything_flagged_gives_zeros():
    p = problem(nrow=20)
    flags = np.ones(p["vis"].shape, dtype=bool)
    out = g.vis2dirty(p["uvw"], p["freq"], p["vis"], None, flags, **kw(p, 1e-4))
    assert out.shape == (p["nx"], p["ny"]) and not out.any()


# ------------------------------------------------------------- chunked building blocks


def test_grid_chunks_sum_to_the_whole_and_planes_add_up():
    p = problem(nrow=160, nchan=4)
    uvw, freq, vis = p["uvw"], p["freq"], p["vis"]
    plan = g.plan_for(uvw, freq, p["nx"], p["ny"], p["pixx"], p["pixy"], 1e-6)
    whole = g.vis2dirty(uvw, freq, vis, plan=plan, **kw(p, 1e-6))
    # rows split in two chunks, channels in two: four stacks summed
    stack = None
    for rows in (slice(0, 70), slice(70, None)):
        for ch in (slice(0, 1), slice(1, None)):
            s = g.grid_chunk(uvw[rows], freq[ch], vis[rows, ch], plan)
            stack = s if stack is None else stack + s
    assert stack.shape == (plan.nplanes, plan.nu, plan.nv)
    img = g.grid_to_image(stack, plan)
    assert rel_l2(img, whole) < 1e-12
    # disjoint plane ranges add up
    half = plan.nplanes // 2
    parts = (g.grid_to_image(stack[:half], plan, planes=(0, half))
             + g.grid_to_image(stack[half:], plan, planes=(half, plan.nplanes)))
    assert rel_l2(parts, whole) < 1e-12
    # a chunk whose |w| lies outside the plan is refused
    with pytest.raises(ValueError, match="outside the plan"):
        g.grid_chunk(uvw * 3, freq, vis, plan)


def test_chunk_level_adjoints():
    p = problem(nrow=90, nchan=2)
    rng = p["rng"]
    plan = g.plan_for(p["uvw"], p["freq"], p["nx"], p["ny"], p["pixx"], p["pixy"], 1e-6)
    stack = g.grid_chunk(p["uvw"], p["freq"], p["vis"], plan)
    other = (rng.standard_normal(stack.shape) + 1j * rng.standard_normal(stack.shape))
    v = g.degrid_chunk(other, p["uvw"], p["freq"], plan)
    # Re<grid(vis), other> = Re<vis, degrid(other)>: the maps are only real-linear
    # (visibilities with w < 0 are gridded conjugated at -uvw)
    lhs = np.vdot(other, stack).real
    rhs = np.vdot(v, p["vis"]).real
    assert abs(lhs - rhs) < 1e-12 * np.linalg.norm(other) * np.linalg.norm(stack)
    img = rng.standard_normal((p["nx"], p["ny"]))
    fwd = g.grid_to_image(stack, plan)
    adj = g.image_to_grid(img, plan)
    a = np.vdot(img, fwd).real
    b = np.vdot(adj, stack).real
    scale = np.linalg.norm(img) * np.linalg.norm(fwd) + np.linalg.norm(adj) * np.linalg.norm(stack)
    assert abs(a - b) < 1e-13 * scale
    # image_to_grid + degrid_chunk == dirty2vis
    v2 = g.degrid_chunk(g.image_to_grid(img, plan), p["uvw"], p["freq"], plan)
    v3 = g.dirty2vis(p["uvw"], p["freq"], img, plan=plan, pixsize_x=p["pixx"],
                     pixsize_y=p["pixy"], epsilon=1e-6)
    assert rel_l2(v2, v3) < 1e-12


def test_threads_give_the_same_image():
    p = problem(nrow=200, nchan=4)
    plan = g.plan_for(p["uvw"], p["freq"], p["nx"], p["ny"], p["pixx"], p["pixy"], 1e-6)
    a = g.vis2dirty(p["uvw"], p["freq"], p["vis"], nthreads=1, plan=plan, **kw(p, 1e-6))
    b = g.vis2dirty(p["uvw"], p["freq"], p["vis"], nthreads=2, plan=plan, **kw(p, 1e-6))
    assert rel_l2(b, a) < 1e-13
    img = p["rng"].standard_normal((p["nx"], p["ny"]))
    common = dict(pixsize_x=p["pixx"], pixsize_y=p["pixy"], epsilon=1e-6, plan=plan)
    va = g.dirty2vis(p["uvw"], p["freq"], img, nthreads=1, **common)
    vb = g.dirty2vis(p["uvw"], p["freq"], img, nthreads=2, **common)
    assert rel_l2(vb, va) < 1e-13


def test_scipy_fft_fallback(monkeypatch):
    """Without ducc0 the FFTs go through scipy.fft and give the same images."""
    p = problem(nrow=80)
    img = p["rng"].standard_normal((p["nx"], p["ny"]))
    plan = g.plan_for(p["uvw"], p["freq"], p["nx"], p["ny"], p["pixx"], p["pixy"], 1e-6)
    common = dict(pixsize_x=p["pixx"], pixsize_y=p["pixy"], epsilon=1e-6, plan=plan)
    with_ducc = g.vis2dirty(p["uvw"], p["freq"], p["vis"], npix_x=p["nx"], npix_y=p["ny"],
                            **common)
    v_ducc = g.dirty2vis(p["uvw"], p["freq"], img, **common)
    from kernels.gridding import fft

    monkeypatch.setattr(fft, "_ducc_fft", None)
    out = g.vis2dirty(p["uvw"], p["freq"], p["vis"], npix_x=p["nx"], npix_y=p["ny"],
                      nthreads=2, **common)
    ref = dft_dirty(p["uvw"], p["freq"], p["vis"], p["nx"], p["ny"], p["pixx"], p["pixy"])
    assert rel_l2(out, ref) < 1e-6
    assert rel_l2(out, with_ducc) < 1e-12
    v = g.dirty2vis(p["uvw"], p["freq"], img, nthreads=2, **common)
    assert rel_l2(v, v_ducc) < 1e-12


# ------------------------------------------------------------------------- ducc0


def test_agrees_with_ducc0():
    wg = pytest.importorskip("ducc0.wgridder")
    p = problem(nrow=150, nchan=3)
    wgt = p["rng"].uniform(0.5, 2.0, p["vis"].shape)
    flags = p["rng"].random(p["vis"].shape) < 0.1
    for eps in (1e-4, 1e-6):
        ours = g.vis2dirty(p["uvw"], p["freq"], p["vis"], wgt, flags, **kw(p, eps))
        theirs = wg.vis2dirty(uvw=p["uvw"], freq=p["freq"], vis=p["vis"], wgt=wgt,
                              mask=(~flags).astype(np.uint8), npix_x=p["nx"], npix_y=p["ny"],
                              pixsize_x=p["pixx"], pixsize_y=p["pixy"], epsilon=eps,
                              do_wgridding=True)
        assert rel_l2(ours, theirs) < eps
        img = p["rng"].standard_normal((p["nx"], p["ny"]))
        ours_v = g.dirty2vis(p["uvw"], p["freq"], img, wgt, flags, pixsize_x=p["pixx"],
                             pixsize_y=p["pixy"], epsilon=eps)
        theirs_v = wg.dirty2vis(uvw=p["uvw"], freq=p["freq"], dirty=img, wgt=wgt,
                                mask=(~flags).astype(np.uint8), pixsize_x=p["pixx"],
                                pixsize_y=p["pixy"], epsilon=eps, do_wgridding=True)
        assert rel_l2(ours_v, theirs_v) < eps


# ------------------------------------------------------------------ kernel machinery


def _tool(name):
    """A generator script of tools/ (not an installed package), imported by path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tools_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_table_entry_reproduced():
    from kernels.gridding._es_table import ES_KERNELS

    W, sigma, eps1d, bw, e0 = next(r for r in ES_KERNELS if r[0] == 7 and r[1] == 1.5)
    assert g.kernel_error(W, sigma, bw * W, e0) == pytest.approx(eps1d, rel=1e-3)


def test_kernel_table_is_what_its_generator_writes(tmp_path):
    """tools/make_es_table.py: its optimiser finds the entry (W=7, sigma=1.5) again from
    its neighbour's optimum (as the generator walks the table), and its writer gives the
    checked-in file byte for byte."""
    from pathlib import Path

    import kernels.gridding._es_table as table

    gen = _tool("make_es_table")
    rows = [tuple(r) for r in table.ES_KERNELS]
    prev = next(r for r in rows if r[0] == 7 and r[1] == 1.45)
    W, sigma, eps1d, bw, e0 = next(r for r in rows if r[0] == 7 and r[1] == 1.5)
    err, bw2, e02 = gen.optimise(W, sigma, np.array(prev[3:]))
    assert err == pytest.approx(eps1d, rel=2e-2)
    assert bw2 == pytest.approx(bw, rel=2e-2) and e02 == pytest.approx(e0, rel=2e-2)
    out = tmp_path / "table.py"
    gen.write(rows, out)
    assert out.read_text() == Path(table.__file__).read_text()


def test_plan_respects_epsilon_and_sigma_bounds():
    plan = g.make_plan(256, 256, 1e-4, 1e-4, 1e-5, wmin=0, wmax=500, nvis=10**6,
                       sigma_min=1.5, sigma_max=2.0)
    assert 1.5 <= plan.sigma <= 2.0
    assert 2 * np.sqrt(3) * plan.eps1d <= 1e-5
    assert plan.nu >= 1.5 * 256 and plan.nu % 2 == 0
    with pytest.raises(ValueError):
        g.make_plan(256, 256, 1e-4, 1e-4, 1e-13)


def test_generated_loops_are_up_to_date():
    from pathlib import Path

    from kernels.gridding import _loops

    gen = _tool("gen_gridding_loops")
    assert Path(_loops.__file__).read_text() == gen.render(), \
        "stale: run python tools/gen_gridding_loops.py"
