"""One imaging geometry (stored vs recomputed UVW, QA, FITS) and Stokes I from any
parallel hands (XX/YY, RR/LL, 2 or 4 correlations in any order)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tests.test_image import PS_CFG, PS_OFFSETS, _sky, _true_pixel, START

DIRTY = dict(npix=512, cell_arcsec=6.0, niter=0, weighting="natural")


@pytest.fixture(scope="module")
def geo_group(tmp_path_factory):
    from contimg.simulate import simulate_group

    out = tmp_path_factory.mktemp("geo_group")
    sky = _sky(PS_CFG, PS_OFFSETS[:3], [10.0, 3.0, 2.0], [0.0, 0.0, 0.0])
    return simulate_group(out, START, cfg=PS_CFG, sky=sky)


@pytest.fixture(scope="module")
def geo_ds(geo_group):
    from contimg.io.uvh5 import open_group

    return open_group(geo_group.files, n_subbands=PS_CFG.n_subbands).compute()


def _shifted_uvw(ds, dt):
    """Stored UVW as a writer with a TIME reference ``dt`` seconds off would store them
    (e.g. TAI read as UTC: 37 s)."""
    from contimg.uvw import compute_uvw

    return compute_uvw(ds.ANTENNA_POSITION.values, ds.baseline_antenna1_id.values,
                       ds.baseline_antenna2_id.values, ds.time.values + dt,
                       ds.PHASE_CENTER_RA.values, ds.PHASE_CENTER_DEC.values,
                       telescope_location=np.asarray(ds.attrs["telescope_location"]))


@pytest.fixture(scope="module")
def geo_ref(geo_ds):
    from contimg.imaging import image_dataset

    return image_dataset(geo_ds, **DIRTY)


def test_consistent_uvw_pass_the_check(geo_ref):
    qa = geo_ref.qa
    assert qa["uvw_source"] == "recompute"
    assert qa["uvw_ok"] is True
    # our reader's stored UVW and compute_uvw agree to micrometres
    assert qa["uvw_max_diff_m"] < 1e-4


def test_other_writers_uvw_image_in_the_right_place(geo_ds, geo_group, geo_ref, caplog):
    """Stored UVW from another TIME reference: the image is the same as with our own
    UVW (recomputed geometry at both ends), the check fails loudly; imaging with the
    stored UVW instead moves the source (the test can tell)."""
    from contimg.imaging import image_dataset

    ds = geo_ds.copy()
    ds["UVW"] = (ds.UVW.dims, _shifted_uvw(ds, 37.0))
    with caplog.at_level(logging.WARNING, logger="contimg.imaging_steps"):
        prod = image_dataset(ds, **DIRTY)
    assert any("stored UVW differ" in r.getMessage() for r in caplog.records)
    assert prod.qa["uvw_ok"] is False and prod.qa["uvw_max_diff_m"] > 1.0
    peak = float(np.abs(geo_ref.dirty).max())
    assert np.abs(prod.dirty - geo_ref.dirty).max() < 1e-4 * peak
    # the stored geometry (the MS's own UVW, rotated consistently) images the sky the
    # stored UVW describe: not the same image (the test can tell the two apart)
    st = image_dataset(ds, uvw_source="stored", **DIRTY)
    assert st.qa["uvw_source"] == "stored"
    assert np.abs(st.dirty - geo_ref.dirty).max() > 0.01 * peak
    truth = geo_group.load_truth()
    for i in range(3):
        px, py = _true_pixel(geo_ds, prod, truth["sky_ra"][i], truth["sky_dec"][i])
        x0, y0 = int(round(px)) - 3, int(round(py)) - 3
        sub = prod.dirty[x0:x0 + 7, y0:y0 + 7]
        ix, iy = np.unravel_index(np.argmax(sub), sub.shape)
        assert np.hypot(x0 + ix - px, y0 + iy - py) < 1.0, i


def test_stored_source_on_consistent_data_equals_recompute(geo_ds, geo_ref):
    from contimg.imaging import image_dataset

    st = image_dataset(geo_ds, uvw_source="stored", **DIRTY)
    assert np.abs(st.dirty - geo_ref.dirty).max() < 1e-4 * np.abs(geo_ref.dirty).max()


def test_uvw_check_lands_in_fits_and_result(geo_ds, tmp_path):
    from astropy.io import fits

    from contimg.imaging import image_ms

    ds = geo_ds.copy()
    ds["UVW"] = (ds.UVW.dims, _shifted_uvw(ds, 37.0))
    res = image_ms(ds, tmp_path / "g", npix=128, cell_arcsec=20.0, niter=0)
    assert res.qa["uvw_ok"] is False
    h = fits.getheader(res.paths["image"])
    assert h["UVWOK"] is False and h["UVWDIFF"] == pytest.approx(res.qa["uvw_max_diff_m"])
    assert h["UVWSRC"] == "recompute"
    res = image_ms(geo_ds, tmp_path / "h", npix=128, cell_arcsec=20.0, niter=0)
    assert fits.getheader(res.paths["image"])["UVWOK"] is True


# ---------------------------------------------------------------------------------
# Stokes I from any parallel hands
# ---------------------------------------------------------------------------------


def _four_pol(ds, order, hands=("XX", "YY"), cross=("XY", "YX")):
    """``ds`` with 4 correlations in ``order`` (labels); the cross hands carry junk
    (large, partly flagged) that Stokes I must not read."""
    rng = np.random.default_rng(1)
    lab = dict(zip(hands + cross, ["p", "q", "c1", "c2"]))
    src = {"p": 0, "q": 1}
    shape = ds.VISIBILITY.shape[:3]
    vis, flag, wt = [], [], []
    for o in order:
        k = lab[o]
        if k in src:
            vis.append(ds.VISIBILITY.values[..., src[k]])
            flag.append(ds.FLAG.values[..., src[k]])
            wt.append(ds.WEIGHT.values[..., src[k]])
        else:
            vis.append((1e3 * (rng.standard_normal(shape) + 1j)).astype(np.complex64))
            flag.append(rng.random(shape) < 0.5)
            wt.append(np.full(shape, 7.0, np.float32))
    out = ds.drop_vars(["VISIBILITY", "FLAG", "WEIGHT"]).drop_dims("polarization")
    dims = ds.VISIBILITY.dims
    out["VISIBILITY"] = (dims, np.stack(vis, -1))
    out["FLAG"] = (dims, np.stack(flag, -1))
    out["WEIGHT"] = (dims, np.stack(wt, -1))
    return out.assign_coords(polarization=list(order))


@pytest.mark.parametrize("order,hands", [
    (["XX", "YY"], ("XX", "YY")),
    (["RR", "LL"], ("RR", "LL")),
    (["XX", "XY", "YX", "YY"], ("XX", "YY")),
    (["YY", "YX", "XY", "XX"], ("XX", "YY")),
    (["RR", "RL", "LR", "LL"], ("RR", "LL")),
    (["LL", "RR"], ("RR", "LL")),
])
def test_stokes_i_from_any_parallel_hands(geo_ds, order, hands):
    """Stokes I (and its weight), plain and averaged, is (p + q) / 2 of the parallel
    hands whatever the feeds and order; the cross hands are never read."""
    from graphs.image import average_dataset, stokes_i_dataset
    from kernels.weighting import stokes_i

    cross = ("XY", "YX") if hands == ("XX", "YY") else ("RL", "LR")
    ds = _four_pol(geo_ds, order, hands, cross) if len(order) == 4 else None
    if ds is None:
        ds = geo_ds.assign_coords(polarization=list(hands))
        if order != list(hands):   # swapped order: swap the data too
            ds = _four_pol(geo_ds, order, hands, cross)
    ref = stokes_i_dataset(geo_ds).compute()
    got = stokes_i_dataset(ds).compute()
    np.testing.assert_array_equal(got.VIS_I.values, ref.VIS_I.values)
    np.testing.assert_array_equal(got.WEIGHT_I.values, ref.WEIGHT_I.values)
    # brute force: the mean of the two parallel hands where both are good
    v, w = stokes_i(geo_ds.VISIBILITY.values.reshape(-1, geo_ds.sizes["frequency"], 2),
                    geo_ds.FLAG.values.reshape(-1, geo_ds.sizes["frequency"], 2),
                    geo_ds.WEIGHT.values.reshape(-1, geo_ds.sizes["frequency"], 2))
    good = w > 0
    x = geo_ds.VISIBILITY.values.reshape(-1, geo_ds.sizes["frequency"], 2)
    np.testing.assert_allclose(v[good], 0.5 * (x[..., 0] + x[..., 1])[good], rtol=1e-6)
    uvw = geo_ds.UVW.values
    nb = geo_ds.sizes["baseline_id"]
    tf = np.full(nb, 2)
    ff = np.full(nb, 2)
    a = average_dataset(ds, uvw, tf, ff).compute()
    b = average_dataset(geo_ds, uvw, tf, ff).compute()
    np.testing.assert_array_equal(a.VIS_I.values, b.VIS_I.values)


@pytest.mark.parametrize("pols", [["XY", "YX"], ["XX"], ["XX", "LL"], ["RL", "LR"]])
def test_no_parallel_hands_is_a_clear_error(geo_ds, pols):
    from graphs.image import parallel_hands

    with pytest.raises(ValueError, match="parallel hands.*" + pols[0]):
        parallel_hands(pols)


def test_image_of_circular_feeds_equals_linear(geo_ds, geo_ref):
    from contimg.imaging import image_dataset

    ds = _four_pol(geo_ds, ["RR", "RL", "LR", "LL"], ("RR", "LL"), ("RL", "LR"))
    prod = image_dataset(ds, **DIRTY)
    np.testing.assert_array_equal(prod.dirty, geo_ref.dirty)


# ---------------------------------------------------------------------------------
# contimg image --field
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_field_ms(tmp_path_factory, geo_ds):
    """The group as an MS whose FIELD rows (one per integration) are named "A" (first
    half) and "B" (second half)."""
    from casacore import tables as ct

    from contimg.io.ms import write_ms

    path = tmp_path_factory.mktemp("fields") / "two.ms"
    write_ms(geo_ds, path)
    nt = geo_ds.sizes["time"]
    with ct.table(f"{path}::FIELD", readonly=False, ack=False) as tb:
        assert tb.nrows() == nt
        tb.putcol("NAME", ["A"] * (nt // 2) + ["B"] * (nt - nt // 2))
    return path


def test_cli_image_field_images_that_field_only(two_field_ms, geo_ds, tmp_path):
    import os
    import subprocess
    import sys

    from astropy.io import fits

    from contimg.imaging import image_dataset, image_ms

    nt = geo_ds.sizes["time"]
    opts = dict(npix=128, cell_arcsec=20.0, niter=0)
    res = subprocess.run([sys.executable, "-m", "contimg.cli", "image", str(two_field_ms),
                          "--out", str(tmp_path / "b"), "--field", "B", "--size", "128",
                          "--cell", "20", "--niter", "0"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-2000:]
    got = fits.getdata(tmp_path / "b-image.fits")[0, 0].T
    ref = image_dataset(geo_ds.isel(time=slice(nt // 2, None)), **opts).image
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    whole = image_dataset(geo_ds, **opts).image
    assert np.abs(got - whole).max() > 1e-2 * np.abs(ref).max()
    # by id (FIELD row 0 is in "A": one integration), and a clear error for a bad name
    r0 = image_ms(two_field_ms, tmp_path / "a0", field="0", **opts)
    one = image_dataset(geo_ds.isel(time=slice(0, 1)), **opts).image
    assert np.abs(fits.getdata(r0.paths["image"])[0, 0].T - one).max() < 1e-4 * np.abs(
        one).max()
    with pytest.raises(ValueError, match="C"):
        image_ms(two_field_ms, tmp_path / "c", field="C", **opts)


# ---------------------------------------------------------------------------------
# contimg image on any UVH5: single files go through contimg.io.uvh5.open_any
# ---------------------------------------------------------------------------------


def test_single_uvh5_files_go_through_open_any(geo_ds, geo_group, tmp_path, monkeypatch):
    import contimg.io.uvh5 as uv
    from contimg.imaging import _open_source

    seen = []

    def fake_open_any(paths, chunks=None):
        seen.append([p.name for p in paths])
        return geo_ds

    monkeypatch.setattr(uv, "open_any", fake_open_any, raising=False)
    other = tmp_path / "vla_obs.uvh5"
    other.write_bytes(b"")
    assert _open_source(other)[0] is geo_ds
    assert _open_source([str(other), str(tmp_path / "b.uvh5")])[0] is geo_ds
    one = geo_group.files[0]
    assert _open_source(one)[0] is geo_ds     # a single subband of a group: any UVH5
    assert seen == [["vla_obs.uvh5"], ["vla_obs.uvh5", "b.uvh5"], [one.name]]
    # a DSA-110 group (its subband files) still opens as a group
    ds, kind = _open_source([str(f) for f in geo_group.files])
    assert kind == "uvh5" and ds.sizes["frequency"] == geo_ds.sizes["frequency"]
    assert len(seen) == 3
