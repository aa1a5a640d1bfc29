"""Group → MS on a real LocalCluster: reads run where the files are, the MS is complete."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from distributed import Client, LocalCluster, WorkerPlugin

from contimg.convert import convert_group
from contimg.io.ms import open_ms
from contimg.io.uvh5 import open_group


class SeeOnly(WorkerPlugin):
    """Make a worker unable to open HDF5 files outside its directories (like a node)."""

    name = "see-only"

    def __init__(self, dirs_by_name):
        self.dirs_by_name = dirs_by_name

    def setup(self, worker):
        import h5py

        dirs = [os.path.realpath(d) + "/" for d in self.dirs_by_name[str(worker.name)]]
        real_file = getattr(h5py, "_real_File", h5py.File)
        h5py._real_File = real_file

        opened = h5py._opened = []

        def guarded(name, *a, **kw):
            if isinstance(name, (str, os.PathLike)):
                if not any(os.path.realpath(name).startswith(d) for d in dirs):
                    raise OSError(f"{name}: not visible on worker {worker.name}")
                opened.append(os.path.realpath(name))
            return real_file(name, *a, **kw)

        h5py.File = guarded


def _opened_files():
    import h5py

    out = list(getattr(h5py, "_opened", []))
    h5py._opened.clear()
    return out


@pytest.fixture(scope="module")
def split_group(small_group, tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    a, b = root / "node-a", root / "node-b"
    a.mkdir()
    b.mkdir()
    files = []
    for i, f in enumerate(small_group.files):
        dst = (a if i < 2 else b) / f.name
        shutil.copy(f, dst)
        files.append(str(dst))
    return files, str(a), str(b)


@pytest.fixture(scope="module")
def cluster(split_group):
    _, a, b = split_group
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                      dashboard_address=":0") as cl, \
            Client(cl, set_as_default=False) as client:
        client.register_plugin(SeeOnly({"0": [a], "1": [b]}))
        yield client


def _workers_by_name(client):
    return {str(w["name"]): addr for addr, w in client.scheduler_info()["workers"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["configured", "discovered"])
def test_each_read_runs_where_its_file_is(cluster, split_group, tmp_path, how):
    files, a, b = split_group
    placement = {"0": [a], "1": [b]} if how == "configured" else None
    ms = tmp_path / "group.ms"
    cluster.run(_opened_files)  # forget what discovery opened so far
    summary = convert_group(cluster, files, ms, placement=placement, n_subbands=4).result()
    assert summary["ms"] == str(ms)
    names = _workers_by_name(cluster)
    opened = cluster.run(_opened_files)
    seen_a = set(opened[names["0"]])
    seen_b = set(opened[names["1"]])
    real = [os.path.realpath(f) for f in files]
    assert seen_a == set(real[:2]) and seen_b == set(real[2:])  # each file read where it is
    # the MS is complete: every visibility equals the group's
    ref = open_group(files, n_subbands=4)
    got = open_ms(ms)
    np.testing.assert_array_equal(got.VISIBILITY.values, ref.VISIBILITY.values)
    np.testing.assert_array_equal(got.FLAG.values, ref.FLAG.values)


@pytest.mark.slow
def test_wrong_placement_fails_cleanly(cluster, split_group, tmp_path):
    """Control: pin the reads to the wrong nodes and the conversion must fail, leaving
    nothing at the output path (this is what proves the pinning above is real)."""
    files, a, b = split_group
    ms = tmp_path / "bad.ms"
    fut = convert_group(cluster, files, ms, placement={"0": [b], "1": [a]}, n_subbands=4)
    with pytest.raises(Exception, match="not visible on worker"):
        fut.result()
    assert not ms.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("bad.ms")]


def test_bad_input_leaves_nothing(tmp_path, small_group):
    src = tmp_path / "in"
    src.mkdir()
    for f in small_group.files:
        shutil.copy(f, src / f.name)
    victim = src / small_group.files[1].name
    with open(victim, "r+b") as fh:
        fh.truncate(os.path.getsize(victim) // 2)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "contimg.cli", "convert", str(src), "--out",
                        str(out), "--subbands", "4", "--placement", "any"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed" in r.stdout and victim.name in r.stdout
    assert os.listdir(out) == []


def test_cli_converts_a_directory(tmp_path, small_group):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "contimg.cli", "convert",
                        str(small_group.files[0].parent), "--out", str(out), "--subbands", "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 converted, 0 failed" in r.stdout
    ms = out / f"{small_group.stamp}.ms"
    ref = open_group(small_group.files, n_subbands=4)
    got = open_ms(ms)
    np.testing.assert_array_equal(got.VISIBILITY.values, ref.VISIBILITY.values)
    np.testing.assert_allclose(got.UVW.values, ref.UVW.values, atol=1e-9)


def test_flagging_during_conversion_writes_the_flaggers_flags(small_group, tmp_path):
    """convert_group(flag=True): the MS holds exactly the flags the flagging graph gives
    on the same Dataset (computed here with numpy-backed dask), FLAG_ROW agrees, and the
    data are untouched."""
    import numpy as np
    from casacore import tables as ct

    from contimg.convert import convert_group
    from contimg.io.ms import open_ms
    from contimg.io.uvh5 import open_group
    from graphs.flag import flag_dataset

    ds = open_group(small_group.files, n_subbands=4)
    want = flag_dataset(ds)["FLAG"].values
    assert 0.001 < want.mean() < 0.5          # the small group has RFI: something to find
    from distributed import Client, LocalCluster

    ms = tmp_path / "f.ms"
    with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None) as lc, \
            Client(lc, set_as_default=False) as client:
        res = convert_group(client, small_group.files, ms, placement="any", flag=True,
                            n_subbands=4).result()
        with pytest.raises(ValueError, match="placement='any'"):
            convert_group(client, small_group.files, tmp_path / "g.ms", flag=True,
                          placement={"x": ["/nowhere"]}, n_subbands=4)
    assert res["flagged"] == pytest.approx(want.mean())
    back = open_ms(ms)
    np.testing.assert_array_equal(back.FLAG.values, want)
    np.testing.assert_array_equal(back.VISIBILITY.values, ds.VISIBILITY.values)
    with ct.table(str(ms), ack=False) as tb:
        np.testing.assert_array_equal(tb.getcol("FLAG_ROW"),
                                      want.all(axis=(2, 3)).reshape(-1))
    with ct.table(str(ms) + "::HISTORY", ack=False) as tb:
        assert any("RFI flags" in m for m in tb.getcol("MESSAGE"))
    import json

    summ = json.loads((tmp_path / "f.ms.flag_summary.json").read_text())
    assert summ["after"]["overall"] == pytest.approx(want.mean())
    np.testing.assert_allclose(summ["after"]["channel"], want.mean(axis=(0, 1, 3)))
    assert res["flag_summary"] == str(tmp_path / "f.ms.flag_summary.json")
