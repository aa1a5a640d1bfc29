"""contimg convert / open_any on UVH5 that is not a DSA-110 group: single files of any
telescope (made here with pyuvdata), named <stem>.ms, telescope and phase centre from
the file (issue 13 item 5)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from foreign_uvh5 import write_foreign_uvh5

from contimg.io.ms import open_ms
from contimg.io.uvh5 import UVH5Error, find_inputs, open_any, product_stem
from kernels.constants import SECONDS_PER_DAY, UNIX_JD0


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    d = tmp_path_factory.mktemp("foreign")
    path = d / "obs_southern.uvh5"
    uvd = write_foreign_uvh5(path, descending=True)
    return path, uvd


def _as_grid(uvd, arr):
    """pyuvdata (Nblts, Nfreqs, Npols) in time-major blt order -> (time, bl, freq asc, pol)."""
    out = arr.reshape(uvd.Ntimes, uvd.Nbls, uvd.Nfreqs, uvd.Npols)
    if uvd.freq_array[0] > uvd.freq_array[-1]:
        out = out[:, :, ::-1]
    return out


def test_open_any_reads_a_single_file_of_another_telescope(foreign):
    path, uvd = foreign
    ds = open_any(str(path))
    assert ds.attrs["telescope_name"] == "TESTARRAY"
    np.testing.assert_allclose(ds.attrs["telescope_location"], uvd.telescope._location.xyz(),
                               atol=1e-6)
    assert list(ds.polarization.values) == ["RR", "LL"]
    np.testing.assert_array_equal(ds.frequency.values, np.sort(uvd.freq_array))
    np.testing.assert_array_equal(ds.VISIBILITY.values, _as_grid(uvd, uvd.data_array))
    np.testing.assert_allclose(ds.UVW.values, uvd.uvw_array.reshape(uvd.Ntimes, uvd.Nbls, 3),
                               atol=1e-9)
    np.testing.assert_allclose(ds.time.values,
                               (np.unique(uvd.time_array) - UNIX_JD0) * SECONDS_PER_DAY,
                               atol=1e-5)
    # the phase centre, by name, from the file's catalogue
    np.testing.assert_allclose(ds.PHASE_CENTER_RA.values, 1.2, atol=1e-12)
    np.testing.assert_allclose(ds.PHASE_CENTER_DEC.values, -0.6, atol=1e-12)
    assert list(ds.phase_center_name.values) == ["MYSRC"] * 3
    np.testing.assert_array_equal(ds.antenna_number.values, uvd.telescope.antenna_numbers)


def test_open_any_dispatches_groups_and_refuses_mixtures(foreign, small_group, tmp_path):
    path, _ = foreign
    grp = open_any(small_group.files, n_subbands=4)
    assert grp.attrs["telescope_name"] == "DSA-110" and grp.sizes["frequency"] == 32
    assert len(grp.attrs["chunk_files"]) == 4
    one = open_any(small_group.files[0])           # one subband on its own: one file
    assert one.sizes["frequency"] == 8
    d = tmp_path / "one"
    d.mkdir()
    shutil.copy(path, d / path.name)
    assert open_any(d).attrs["telescope_name"] == "TESTARRAY"
    other = tmp_path / "second.uvh5"
    shutil.copy(path, other)
    with pytest.raises(UVH5Error, match="one at a time"):
        open_any([str(path), str(other)])
    shutil.copy(path, d / "again.h5")
    with pytest.raises(UVH5Error, match="2 UVH5 files"):
        open_any(d)


def test_find_inputs_and_names(foreign, small_group, tmp_path):
    path, _ = foreign
    d = tmp_path / "mixed"
    d.mkdir()
    for f in small_group.files:
        shutil.copy(f, d / f.name)
    shutil.copy(path, d / "other.hdf5")
    shutil.copy(path, d / "third.uvh5")
    (d / "notes.txt").write_text("not data")
    units = find_inputs([str(d)])
    assert len(units) == 3
    assert sorted(os.path.basename(f) for f in units[0]) == sorted(
        f.name for f in small_group.files)
    assert [product_stem(u) for u in units] == [small_group.stamp, "other", "third"]


def test_cli_converts_a_file_of_another_telescope(foreign, tmp_path):
    from casacore import tables as ct
    from pyuvdata import UVData

    path, uvd = foreign
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "contimg.cli", "convert", str(path), "--out",
                        str(out), "--placement", "any", "--workers", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 converted, 0 failed" in r.stdout
    ms = out / "obs_southern.ms"
    assert ms.is_dir()
    with ct.table(f"{ms}::OBSERVATION", ack=False) as tb:
        assert tb.getcol("TELESCOPE_NAME") == ["TESTARRAY"]
    with ct.table(f"{ms}::FIELD", ack=False) as tb:
        assert list(tb.getcol("NAME")) == ["MYSRC"]
        np.testing.assert_allclose(tb.getcol("PHASE_DIR")[0, 0], [1.2, -0.6], atol=1e-12)
    got = open_ms(ms)
    ref = open_any(str(path))
    np.testing.assert_array_equal(got.VISIBILITY.values, ref.VISIBILITY.values)
    np.testing.assert_allclose(got.UVW.values, ref.UVW.values, atol=1e-9)
    np.testing.assert_allclose(got.time.values, ref.time.values, atol=1e-6)
    assert got.attrs["telescope_name"] == "TESTARRAY"
    assert list(got.phase_center_name.values) == ["MYSRC"] * 3
    # and pyuvdata reads the MS back as the data it wrote
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = UVData.from_file(str(ms))
    back.reorder_freqs(channel_order="freq")
    np.testing.assert_array_equal(
        back.data_array.reshape(uvd.Ntimes, uvd.Nbls, uvd.Nfreqs, 2),
        _as_grid(uvd, uvd.data_array))
    assert back.phase_center_catalog[back.phase_center_id_array[0]]["cat_name"] == "MYSRC"
