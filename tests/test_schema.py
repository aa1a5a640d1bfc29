import numpy as np
import pytest
import xarray as xr

from contimg.io.uvh5 import open_group
from graphs import contract


@pytest.fixture
def ds(small_group):
    return open_group(small_group.files, n_subbands=4)


def test_reader_output_conforms(ds):
    assert contract.check(ds) == []


def test_each_violation_is_named(ds):
    bad = ds.drop_vars("WEIGHT")
    bad["FLAG"] = bad.FLAG.astype("int8")
    bad = bad.assign_coords(frequency=bad.frequency.values[::-1])
    del bad.attrs["telescope_name"]
    problems = contract.check(bad, check_values=False)
    assert "missing data variable 'WEIGHT' ('time', 'baseline_id', 'frequency', 'polarization')" \
        in problems
    assert "FLAG has dtype int8, expected bool" in problems
    assert "missing attribute 'telescope_name'" in problems
    with pytest.raises(contract.SchemaError, match="WEIGHT"):
        contract.validate(bad)


def test_value_checks(ds):
    rev = ds.assign_coords(frequency=("frequency", ds.frequency.values[::-1],
                                      ds.frequency.attrs))
    assert contract.check(rev) == ["frequency must be strictly ascending"]
    a1 = ds.baseline_antenna1_id.values.copy()
    a1[3] = 500
    oob = ds.assign_coords(baseline_antenna1_id=("baseline_id", a1))
    assert any("index the antenna table" in p for p in contract.check(oob))
    swapped = ds.assign_coords(
        baseline_antenna1_id=("baseline_id", ds.baseline_antenna2_id.values),
        baseline_antenna2_id=("baseline_id", ds.baseline_antenna1_id.values))
    assert "baseline_antenna1_id must be <= baseline_antenna2_id" in contract.check(swapped)
    t = ds.time.values.copy()
    t[1] = np.nan
    assert "time has non-finite values" in contract.check(
        ds.assign_coords(time=("time", t, ds.time.attrs)))


def test_transposed_variable_is_named(ds):
    bad = ds.assign(VISIBILITY=ds.VISIBILITY.transpose("baseline_id", "time", ...))
    assert contract.check(bad, check_values=False) == [
        "VISIBILITY has dims ('baseline_id', 'time', 'frequency', 'polarization'), expected "
        "('time', 'baseline_id', 'frequency', 'polarization')"]


# ---------------------------------------------------------------------------------
# the constructor both readers use
# ---------------------------------------------------------------------------------

def _tiny_parts():
    """Parts of a 2-integration, 3-antenna, 4-channel Dataset, in loose dtypes."""
    rng = np.random.default_rng(3)
    shape = (2, 3, 4, 2)
    return dict(
        vis=(rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64),
        flag=rng.random(shape) < 0.2, weight=np.ones(shape, np.float32),
        uvw=rng.normal(size=(2, 3, 3)), time=[1.7e9, 1.7e9 + 12.5], integration_time=12.5,
        antenna1=[0, 0, 1], antenna2=[1, 2, 2], frequency=1.4e9 + np.arange(4) * 2e5,
        channel_width=2e5, polarizations=("XX", "YY"), phase_center_ra=[1.0, 1.001],
        phase_center_dec=[0.9, 0.9], antenna_position=[[1.0, 2, 3], [4, 5, 6], [7, 8, 9]],
        antenna_dish_diameter=[4.65] * 3, antenna_name=["a", "b", "c"],
        antenna_number=np.array([5, 6, 7], np.int64), telescope_name="T",
        telescope_location=np.array([4.0, 5, 6]), attrs={"source_files": ["f"]})


def test_constructor_builds_the_documented_dataset():
    """The constructor's Dataset is, to the last attribute and dtype, the contract as the
    module docstring describes it (written out here by hand)."""
    p = _tiny_parts()
    vdims = ("time", "baseline_id", "frequency", "polarization")
    want = xr.Dataset(
        data_vars={
            "VISIBILITY": (vdims, p["vis"]), "FLAG": (vdims, p["flag"]),
            "WEIGHT": (vdims, p["weight"]),
            "UVW": (("time", "baseline_id", "uvw_label"), p["uvw"],
                    {"units": "m", "frame": "icrs", "convention": "x2 - x1"}),
            "PHASE_CENTER_RA": (("time",), np.array([1.0, 1.001]),
                                {"units": "rad", "frame": "icrs"}),
            "PHASE_CENTER_DEC": (("time",), np.array([0.9, 0.9]),
                                 {"units": "rad", "frame": "icrs"}),
            "ANTENNA_POSITION": (("antenna_id", "cartesian_pos_label"),
                                 np.arange(1.0, 10.0).reshape(3, 3),
                                 {"units": "m", "frame": "ITRF"}),
            "ANTENNA_DISH_DIAMETER": (("antenna_id",), np.full(3, 4.65), {"units": "m"}),
        },
        coords={
            "time": ("time", np.array([1.7e9, 1.7e9 + 12.5]),
                     {"units": "s", "scale": "utc", "format": "unix",
                      "integration_time": 12.5}),
            "baseline_id": ("baseline_id", np.arange(3, dtype=np.int32)),
            "baseline_antenna1_id": ("baseline_id", np.array([0, 0, 1], np.int32)),
            "baseline_antenna2_id": ("baseline_id", np.array([1, 2, 2], np.int32)),
            "frequency": ("frequency", p["frequency"], {"units": "Hz", "channel_width": 2e5}),
            "polarization": ("polarization", np.array(["XX", "YY"])),
            "uvw_label": ("uvw_label", np.array(["u", "v", "w"])),
            "antenna_id": ("antenna_id", np.arange(3, dtype=np.int32)),
            "antenna_name": ("antenna_id", np.array(["a", "b", "c"])),
            "antenna_number": ("antenna_id", np.array([5, 6, 7], np.int32)),
            "cartesian_pos_label": ("cartesian_pos_label", np.array(["x", "y", "z"])),
        },
        attrs={"telescope_name": "T", "telescope_location": [4.0, 5.0, 6.0],
               "source_files": ["f"], "visibility_convention": contract.VISIBILITY_CONVENTION},
    )
    got = contract.visibility_dataset(**p)
    xr.testing.assert_identical(got, want)
    for name in ("baseline_antenna1_id", "antenna_number", "time", "polarization"):
        assert got[name].dtype == want[name].dtype, name


def test_constructor_names_the_source_of_a_bad_part():
    p = _tiny_parts()
    p["vis"] = p["vis"].astype(np.complex128)  # big arrays are never cast
    with pytest.raises(contract.SchemaError, match="(?s)sb07.hdf5.*VISIBILITY has dtype "
                       "complex128, expected complex64") as err:
        contract.visibility_dataset(**p, name="sb07.hdf5")
    assert err.value.problems == ["VISIBILITY has dtype complex128, expected complex64"]


def test_both_readers_build_the_same_dataset(ds, tmp_path):
    """UVH5 -> Dataset and UVH5 -> MS -> Dataset: the same variables, coordinates,
    dtypes and attributes (time to the MS's float64 rounding; the MS reader adds
    ``ms_path`` and ``ms_conjugation``)."""
    from contimg.io.ms import open_ms, write_ms

    back = open_ms(write_ms(ds, tmp_path / "g.ms")).compute()
    assert back.attrs.pop("ms_path") == str(tmp_path / "g.ms")
    assert back.attrs.pop("ms_conjugation") == "ms"
    np.testing.assert_allclose(back.time.values, ds.time.values, rtol=0, atol=1e-6)
    back = back.assign_coords(time=ds.time)
    xr.testing.assert_identical(back, ds.compute())
