import numpy as np
import pytest

from contimg import schema
from contimg.io.uvh5 import open_group


@pytest.fixture
def ds(small_group):
    return open_group(small_group.files, n_subbands=4)


def test_reader_output_conforms(ds):
    assert schema.check(ds) == []


def test_each_violation_is_named(ds):
    bad = ds.drop_vars("WEIGHT")
    bad["FLAG"] = bad.FLAG.astype("int8")
    bad = bad.assign_coords(frequency=bad.frequency.values[::-1])
    del bad.attrs["telescope_name"]
    problems = schema.check(bad, check_values=False)
    assert "missing data variable 'WEIGHT' ('time', 'baseline_id', 'frequency', 'polarization')" \
        in problems
    assert "FLAG has dtype int8, expected bool" in problems
    assert "missing attribute 'telescope_name'" in problems
    with pytest.raises(schema.SchemaError, match="WEIGHT"):
        schema.validate(bad)


def test_value_checks(ds):
    rev = ds.assign_coords(frequency=("frequency", ds.frequency.values[::-1],
                                      ds.frequency.attrs))
    assert schema.check(rev) == ["frequency must be strictly ascending"]
    a1 = ds.baseline_antenna1_id.values.copy()
    a1[3] = 500
    oob = ds.assign_coords(baseline_antenna1_id=("baseline_id", a1))
    assert any("index the antenna table" in p for p in schema.check(oob))
    swapped = ds.assign_coords(
        baseline_antenna1_id=("baseline_id", ds.baseline_antenna2_id.values),
        baseline_antenna2_id=("baseline_id", ds.baseline_antenna1_id.values))
    assert "baseline_antenna1_id must be <= baseline_antenna2_id" in schema.check(swapped)
    t = ds.time.values.copy()
    t[1] = np.nan
    assert "time has non-finite values" in schema.check(
        ds.assign_coords(time=("time", t, ds.time.attrs)))


def test_transposed_variable_is_named(ds):
    bad = ds.assign(VISIBILITY=ds.VISIBILITY.transpose("baseline_id", "time", ...))
    assert schema.check(bad, check_values=False) == [
        "VISIBILITY has dims ('baseline_id', 'time', 'frequency', 'polarization'), expected "
        "('time', 'baseline_id', 'frequency', 'polarization')"]
