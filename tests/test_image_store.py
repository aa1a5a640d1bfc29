"""Imaging from the compact averaged store on disk ([image] spill): the same images as
with the rows in memory, the store streamed in parts and removed afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_image import PS_CFG, PS_FLUX, PS_OFFSETS, START, _sky

CLEAN = dict(npix=384, cell_arcsec=8.0, niter=400, auto_threshold_sigma=0.0,
             threshold=2e-2, max_major=6, grid_tasks=2)


@pytest.fixture(scope="module")
def store_ds(tmp_path_factory):
    from contimg.io.uvh5 import open_group
    from contimg.simulate import simulate_group

    out = tmp_path_factory.mktemp("store_group")
    sky = _sky(PS_CFG, PS_OFFSETS, PS_FLUX, [0.0] * len(PS_FLUX))
    g = simulate_group(out, START, cfg=PS_CFG, sky=sky)
    return open_group(g.files, n_subbands=PS_CFG.n_subbands).compute()


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of at most 5000 rows: several parts per chunk and per gridding task."""
    import contimg.imaging_store as st

    monkeypatch.setattr(st, "ROWS_PER_PART", 5000)
    made = []
    orig = st.ImagingStore.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(st.ImagingStore, "__init__", init)
    return made


@pytest.mark.parametrize("w_mode,weighting", [("snapshot", "briggs"), ("wstack", "natural")])
def test_spilled_image_equals_in_memory(store_ds, small_parts, w_mode, weighting):
    from contimg.imaging import image_dataset

    mem = image_dataset(store_ds, spill=False, w_mode=w_mode, weighting=weighting, **CLEAN)
    disk = image_dataset(store_ds, spill=True, w_mode=w_mode, weighting=weighting, **CLEAN)
    (store,) = small_parts
    assert len(store.parts) >= 6 and len(store.groups(2)) == 2
    assert not store.root.exists()            # removed when the image is done
    assert disk.options["spill_parts"] == len(store.parts)
    assert mem.n_major >= 2 and disk.n_major == mem.n_major
    assert disk.n_components == mem.n_components
    peak = float(np.abs(mem.image).max())
    for name in ("dirty", "psf", "residual", "model", "image"):
        a, b = getattr(mem, name), getattr(disk, name)
        assert np.abs(a - b).max() < 1e-4 * peak, name
    np.testing.assert_allclose(disk.weight_sums, mem.weight_sums, rtol=1e-5)


def test_part_groups_balance_rows():
    from graphs.image_store import part_groups

    parts = [(f"p{i}", n) for i, n in enumerate([10, 10, 10, 10, 40, 10, 10])]
    g = part_groups(parts, 2)
    assert [sum(dict(parts)[d] for d in grp) for grp in g] == [40, 60]
    assert sorted(d for grp in g for d in grp) == sorted(d for d, _ in parts)
    assert part_groups(parts[:1], 4) == [["p0"]]


def test_store_is_removed_when_closed_or_dropped(tmp_path):
    import gc

    from contimg.imaging_store import ImagingStore

    with ImagingStore(dir=tmp_path) as st:
        (st.root / "x").write_text("1")
        assert st.root.is_dir()
    assert not st.root.exists()
    st = ImagingStore(dir=tmp_path)
    root = st.root
    del st
    gc.collect()
    assert not root.exists() and not list(tmp_path.iterdir())
