"""open_ms(field=...) and ms_fields: one field of a multi-field MS, by id or name."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_ms import make_dataset

from contimg.io.ms import UnknownFieldError, ms_fields, open_ms, write_ms


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """A drift-scan MS (one FIELD row per integration, 5 integrations) with names set:
    ids 0..4 are named "3C286", "J1", "0", "J1", "cal". Returns (path, Dataset)."""
    from casacore import tables as ct

    ds = make_dataset(nant=6, ntime=5, nsub=1, nchan=8)
    path = tmp_path_factory.mktemp("fields") / "multi.ms"
    write_ms(ds, path)
    with ct.table(f"{path}::FIELD", readonly=False, ack=False) as tb:
        assert tb.nrows() == 5
        tb.putcol("NAME", ["3C286", "J1", "0", "J1", "cal"])
    # straight from casacore, before anything opens the MS through dask-ms
    with ct.table(str(path), ack=False) as tb:
        _ROWS[str(path)] = (tb.getcol("FIELD_ID"), tb.getcol("DATA"))
    return str(path), ds


_ROWS = {}


def _casacore_rows(path, field_ids):
    """DATA of the rows of these FIELD ids (MS convention, MAIN's time-major order)."""
    fid, data = _ROWS[path]
    return data[np.isin(fid, field_ids)]


def test_ms_fields_lists_ids_names_and_icrs_centres(multi):
    path, ds = multi
    fields = ms_fields(path)
    assert [f["id"] for f in fields] == [0, 1, 2, 3, 4]
    assert [f["name"] for f in fields] == ["3C286", "J1", "0", "J1", "cal"]
    np.testing.assert_allclose([f["ra"] for f in fields], ds.PHASE_CENTER_RA.values,
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose([f["dec"] for f in fields], ds.PHASE_CENTER_DEC.values,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("field, ids", [(0, [0]), (2, [2]), ("3C286", [0]), ("cal", [4]),
                                        ("0", [2]),   # a name, even though it is digits
                                        ("4", [4]),   # no field named "4": the id
                                        ("J1", [1, 3])])  # two FIELD rows of one name
def test_field_selection_reads_exactly_that_fields_rows(multi, field, ids):
    path, ds = multi
    sub = open_ms(path, field=field)
    assert sub.sizes["time"] == len(ids)
    np.testing.assert_array_equal(sub.time.values, ds.time.values[ids])
    np.testing.assert_allclose(sub.PHASE_CENTER_RA.values, ds.PHASE_CENTER_RA.values[ids],
                               atol=1e-12)
    # what casacore's own row selection gives (MS convention: DATA = conj(VISIBILITY))
    data = _casacore_rows(path, ids)
    nbl = ds.sizes["baseline_id"]
    got = sub.VISIBILITY.values.reshape(len(ids) * nbl, *data.shape[1:])
    np.testing.assert_array_equal(got, np.conj(data).astype(np.complex64))
    np.testing.assert_array_equal(sub.VISIBILITY.values, ds.VISIBILITY.values[ids])
    np.testing.assert_array_equal(sub.FLAG.values, ds.FLAG.values[ids])
    np.testing.assert_allclose(sub.UVW.values, ds.UVW.values[ids], atol=1e-9)
    assert sub.attrs["ms_field_id"] == ids


@pytest.mark.parametrize("field", [5, -1, "nope", "17"])
def test_unknown_field_names_the_ms_and_lists_fields(multi, field):
    path, _ = multi
    with pytest.raises(UnknownFieldError) as exc:
        open_ms(path, field=field)
    assert isinstance(exc.value, ValueError)
    msg = str(exc.value)
    assert path in msg and repr(field) in msg
    for name in ("3C286", "J1", "cal"):
        assert name in msg


def test_field_without_rows_is_refused(multi, tmp_path):
    import shutil

    from casacore import tables as ct

    path, _ = multi
    copy = str(tmp_path / "norows.ms")
    shutil.copytree(path, copy)
    with ct.table(copy, readonly=False, ack=False) as tb:
        fid = tb.getcol("FIELD_ID")
        fid[fid == 4] = 0
        tb.putcol("FIELD_ID", fid)
    with pytest.raises(UnknownFieldError, match="no rows"):
        open_ms(copy, field="cal")


def test_without_field_all_rows_are_read_and_fields_logged(multi, caplog):
    path, ds = multi
    with caplog.at_level(logging.INFO, logger="contimg.io.ms.read"):
        full = open_ms(path)
    assert full.sizes["time"] == 5
    np.testing.assert_array_equal(full.VISIBILITY.values, ds.VISIBILITY.values)
    assert "ms_field_id" not in full.attrs
    text = caplog.text
    assert "5 fields" in text and "3C286" in text and "cal" in text
