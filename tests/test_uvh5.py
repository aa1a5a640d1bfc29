"""UVH5 reader: any valid UVH5, one chunk per subband, and clear errors."""

import os
import shutil
import tracemalloc

import dask
import h5py
import numpy as np
import pytest

from contimg.io.uvh5 import GroupError, UVH5Error, find_groups, open_group, open_uvh5
from graphs import contract
from kernels.constants import SECONDS_PER_DAY


def _canonical(uv):
    """pyuvdata object -> (time, baseline a1<=a2 sorted, freq ascending, pol) arrays."""
    uv = uv.copy()
    uv.conjugate_bls("ant1<ant2")
    uv.reorder_freqs(channel_order="freq")
    uv.reorder_blts("time", minor_order="baseline")
    idx = {int(n): i for i, n in enumerate(uv.telescope.antenna_numbers)}
    a1 = np.array([idx[int(a)] for a in uv.ant_1_array])
    a2 = np.array([idx[int(a)] for a in uv.ant_2_array])
    nt = uv.Ntimes
    key = (a1 * 100000 + a2).reshape(nt, -1)
    order = np.argsort(key[0])
    shp = (nt, uv.Nbls, uv.Nfreqs, uv.Npols)
    return dict(vis=uv.data_array.reshape(shp)[:, order],
                flag=uv.flag_array.reshape(shp)[:, order],
                nsample=uv.nsample_array.reshape(shp)[:, order],
                uvw=uv.uvw_array.reshape(nt, uv.Nbls, 3)[:, order],
                freq=uv.freq_array, a1=a1.reshape(nt, -1)[0, order],
                a2=a2.reshape(nt, -1)[0, order])


def _other_telescope(seed=3, nant=7, ntimes=5, nfreq=11, pols=("xx", "yy", "xy", "yx")):
    """A HERA-like, zenith-drift (unprojected) pyuvdata object with random data."""
    from astropy import units as u
    from astropy.coordinates import EarthLocation
    from pyuvdata import Telescope, UVData

    rng = np.random.default_rng(seed)
    loc = EarthLocation.from_geodetic(21.4283 * u.deg, -30.7215 * u.deg, 1051.7 * u.m)
    pos = rng.normal(scale=60, size=(nant, 3))
    nums = np.arange(nant) * 3 + 10                  # non-contiguous antenna numbers
    telescope = Telescope.new(name="HERA-LIKE", location=loc, antenna_positions=pos,
                              antenna_numbers=nums, antenna_names=[f"HH{n}" for n in nums],
                              instrument="hera-like", mount_type="fixed", feeds=["x", "y"],
                              feed_angle=[np.pi / 2, 0])
    times = 2460000.25 + np.arange(ntimes) * 10.7 / SECONDS_PER_DAY
    freqs = 100e6 + np.arange(nfreq) * 97.65625e3     # ascending
    antpairs = [(int(nums[i]), int(nums[j])) for i in range(nant) for j in range(i, nant)]
    uv = UVData.new(freq_array=freqs, polarization_array=list(pols), times=times,
                    telescope=telescope, antpairs=antpairs, do_blt_outer=True,
                    time_axis_faster_than_bls=True, integration_time=10.7,
                    channel_width=97.65625e3, update_telescope_from_known=False, empty=True)
    shape = uv.data_array.shape
    uv.data_array = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(complex)
    auto = uv.ant_1_array == uv.ant_2_array
    uv.data_array[auto] = np.abs(uv.data_array[auto])
    uv.flag_array = rng.uniform(size=shape) < 0.1
    uv.nsample_array = rng.uniform(0.5, 1, size=shape).astype(float)
    return uv


@pytest.mark.interop
@pytest.mark.parametrize("variant", ["plain", "baseline-major+conj", "compressed+int32",
                                     "shuffled-rows"])
def test_reads_what_pyuvdata_writes_other_telescopes(tmp_path, variant):
    # the HERA correlator's integer (r, i) compound type
    int32_dtype = np.dtype([("r", "<i4"), ("i", "<i4")])
    uv = _other_telescope()
    kw = {}
    if variant == "baseline-major+conj":
        uv.reorder_blts("baseline", minor_order="time")
        uv.conjugate_bls("ant2<ant1")                  # every cross row stored as (a2, a1)
    elif variant == "compressed+int32":
        uv.data_array = np.round(uv.data_array * 1000)
        kw = dict(data_compression="lzf", data_write_dtype=int32_dtype)
    elif variant == "shuffled-rows":
        uv.reorder_blts(order=np.random.default_rng(0).permutation(uv.Nblts))
    path = tmp_path / "other.uvh5"
    uv.write_uvh5(str(path), **kw)
    ds = open_uvh5(path)
    contract.validate(ds)
    ref = _canonical(uv)
    assert ds.attrs["telescope_name"] == "HERA-LIKE"
    assert list(ds.polarization.values) == ["XX", "YY", "XY", "YX"]
    np.testing.assert_array_equal(ds.baseline_antenna1_id.values, ref["a1"])
    np.testing.assert_array_equal(ds.baseline_antenna2_id.values, ref["a2"])
    np.testing.assert_allclose(ds.VISIBILITY.values, ref["vis"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ds.FLAG.values, ref["flag"])
    np.testing.assert_allclose(ds.WEIGHT.values, ref["nsample"], rtol=1e-6)
    np.testing.assert_allclose(ds.UVW.values, ref["uvw"], atol=1e-9)
    np.testing.assert_array_equal(ds.frequency.values, ref["freq"])
    np.testing.assert_array_equal(ds.antenna_number.values, uv.telescope.antenna_numbers)
    # zenith-drift data: the phase centre is the zenith, i.e. dec = latitude (ICRS ~ +-0.3 deg)
    assert np.degrees(ds.PHASE_CENTER_DEC.values) == pytest.approx(-30.72, abs=0.5)


def test_group_is_lazy_one_chunk_per_subband(small_group):
    ds = open_group(small_group.files, n_subbands=4)
    contract.validate(ds)
    assert ds.VISIBILITY.data.chunks[2] == (8, 8, 8, 8)
    assert np.all(np.diff(ds.frequency.values) > 0)
    names = {k[0] if isinstance(k, tuple) else k for k in ds.VISIBILITY.data.dask.keys()}
    assert any("uvh5-visibility-sb03" in n for n in names)
    # time chunks on request
    ds2 = open_group(small_group.files, n_subbands=4, chunks={"time": 2})
    assert ds2.VISIBILITY.data.chunks[0] == (2, 2, 2)
    np.testing.assert_array_equal(ds2.VISIBILITY.values, ds.VISIBILITY.values)


def test_find_groups_by_timestamp(tmp_path, small_group):
    for f in small_group.files:
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(small_group.files[0], tmp_path / "2026-01-15T08:05:09_sb00.hdf5")
    (tmp_path / "notes.hdf5").write_bytes(b"")
    groups = find_groups(tmp_path)
    assert [len(g) for g in groups] == [4, 1]


# ---- bad input --------------------------------------------------------------------

def _copy_group(group, dst):
    dst.mkdir(parents=True, exist_ok=True)
    return [shutil.copy(f, dst / f.name) for f in group.files]


def test_truncated_file_is_named(tmp_path, small_group):
    files = _copy_group(small_group, tmp_path)
    size = os.path.getsize(files[2])
    with open(files[2], "r+b") as fh:
        fh.truncate(size // 3)
    with pytest.raises(UVH5Error, match=r"sb02\.hdf5: cannot open as HDF5 \(truncated"):
        open_group(files, n_subbands=4)


def test_missing_visdata_is_named(tmp_path, small_group):
    files = _copy_group(small_group, tmp_path)
    with h5py.File(files[1], "r+") as f:
        del f["Data/visdata"]
    with pytest.raises(UVH5Error, match=r"sb01\.hdf5: missing Data/visdata"):
        open_group(files, n_subbands=4)


def test_wrong_data_shape_is_named(tmp_path, small_group):
    files = _copy_group(small_group, tmp_path)
    with h5py.File(files[3], "r+") as f:
        d = f["Data/flags"][()]
        del f["Data/flags"]
        f["Data/flags"] = d[:-1]
    with pytest.raises(UVH5Error, match=r"sb03\.hdf5: Data/flags has shape"):
        open_group(files, n_subbands=4)


def test_mismatched_antennas_are_named(tmp_path, small_group):
    files = _copy_group(small_group, tmp_path)
    with h5py.File(files[2], "r+") as f:
        pos = f["Header/antenna_positions"][()]
        pos[5] += 0.5
        f["Header/antenna_positions"][...] = pos
    with pytest.raises(GroupError, match=r"sb02\.hdf5: antenna positions differ"):
        open_group(files, n_subbands=4)


def test_mismatched_times_are_named(tmp_path, small_group):
    files = _copy_group(small_group, tmp_path)
    with h5py.File(files[1], "r+") as f:
        f["Header/time_array"][...] = f["Header/time_array"][()] + 5.0 / SECONDS_PER_DAY
    with pytest.raises(GroupError, match=r"sb01\.hdf5: integration times differ .* 5\.0"):
        open_group(files, n_subbands=4)


def test_duplicate_subband_is_named(tmp_path, small_group):
    files = _copy_group(small_group, tmp_path)
    dup = tmp_path / (small_group.stamp[:-2] + "30_sb01.hdf5")
    shutil.copy(files[1], dup)
    with pytest.raises(GroupError, match=r"duplicate subband sb01"):
        open_group(files + [dup], n_subbands=4)


def test_wrong_name_is_named(tmp_path, small_group):
    files = _copy_group(small_group, tmp_path)
    bad = tmp_path / "group_sb01.hdf5"
    os.rename(files[1], bad)
    files[1] = bad
    with pytest.raises(GroupError, match=r"group_sb01\.hdf5: not a DSA-110 subband file name"):
        open_group(files, n_subbands=4)


def test_non_contiguous_frequencies_are_named(tmp_path, small_group):
    files = _copy_group(small_group, tmp_path)
    with h5py.File(files[2], "r+") as f:
        f["Header/freq_array"][...] = f["Header/freq_array"][()] - 10e6
    with pytest.raises(GroupError, match=r"sb02\.hdf5: frequencies .* not contiguous"):
        open_group(files, n_subbands=4)


def test_missing_subband_is_an_error_or_flagged_fill(tmp_path, small_group):
    files = _copy_group(small_group, tmp_path)
    del files[2]
    with pytest.raises(GroupError, match=r"missing subband\(s\) sb02"):
        open_group(files, n_subbands=4)
    ds = open_group(files, n_subbands=4, allow_missing=True)
    full = open_group(small_group.files, n_subbands=4)
    assert ds.attrs["missing_subbands"] == [2]
    np.testing.assert_allclose(ds.frequency.values, full.frequency.values, rtol=0, atol=1e-3)
    # sb02 is the third-highest subband: channels 8..15 in ascending order of 4x8
    sl = slice(8, 16)
    assert ds.FLAG.values[:, :, sl].all() and not ds.VISIBILITY.values[:, :, sl].any()
    keep = np.r_[0:8, 16:32]
    np.testing.assert_array_equal(ds.VISIBILITY.values[:, :, keep],
                                  full.VISIBILITY.values[:, :, keep])


def test_corrupt_data_block_fails_at_read_time_naming_the_file(tmp_path, small_group):
    files = _copy_group(small_group, tmp_path)
    with h5py.File(files[0], "r") as f:
        offset = f["Data/visdata"].id.get_offset()
    ds = open_group(files, n_subbands=4)
    # chop the file in the middle of the visibility block: the header still reads
    with open(files[0], "r+b") as fh:
        fh.truncate(offset + 100)
    with pytest.raises(UVH5Error, match=r"sb00\.hdf5: cannot read Data/visdata"):
        ds.VISIBILITY.values


# ---- memory -----------------------------------------------------------------------

@pytest.mark.slow
def test_full_group_sum_is_bounded_by_chunk_memory(full_group):
    ds = open_group(full_group.files)
    chunk_bytes = ds.VISIBILITY.data.blocks[0, 0, 0, 0].nbytes
    assert ds.VISIBILITY.data.numblocks == (1, 1, 16, 1)
    tracemalloc.start()
    try:
        with dask.config.set(scheduler="threads", num_workers=2):
            total = np.abs(ds.VISIBILITY).sum().compute()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\npeak traced memory {peak / 2**20:.0f} MiB for a {ds.VISIBILITY.nbytes / 2**20:.0f} "
          f"MiB group ({chunk_bytes / 2**20:.0f} MiB chunks)")
    assert float(total) > 0
    # two threads, each holding one chunk and its |V|: a few chunks, never the group
    assert peak < 5 * chunk_bytes
    assert peak < 0.4 * ds.VISIBILITY.nbytes


def test_row_layout_fast_path_equals_general_path(small_group):
    """The DSA-110 (time-major, ascending baselines) shortcut gives exactly what the
    general np.unique path gives, and irregular layouts fall through to the general one."""
    import h5py
    import numpy as np

    from contimg.io.uvh5 import _row_layout

    with h5py.File(small_group.files[0], "r") as f:
        h = f["Header"]
        t = h["time_array"][()]
        key = h["ant_1_array"][()].astype(np.int64) * 1000 + h["ant_2_array"][()]
        uvw = h["uvw_array"][()]
    conj = np.zeros(t.size, bool)
    conj[::7] = True
    for perm in (np.arange(t.size), np.random.default_rng(1).permutation(t.size)):
        fast = _row_layout(t[perm], key[perm], conj[perm], uvw[perm], "f")
        slow = _row_layout(t[perm], key[perm], conj[perm], uvw[perm], "f", fast=False)
        for a, b in zip(fast, slow, strict=True):
            np.testing.assert_array_equal(a, b)
    assert fast[2].min() >= 0 and not np.array_equal(fast[2].ravel(), np.arange(t.size))
