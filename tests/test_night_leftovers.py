"""Issue 19 items 13 and 14: group names, clear refusals to write, and product modes.

Each test reproduces one of the issue's findings (it fails on the code before the fix):
a group keeps the name of the first file seen although its products are named after the
earliest; ``contimg calibrate`` into a read-only directory ends in a traceback;
``contimg image`` computes the whole image before finding it cannot write it; products
follow the process umask (world-writable under ``umask 000``); the LocalCluster's
dashboard listens on every interface.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from contimg import telescope as tel
from contimg.state import StateDB

T0 = dt.datetime(2026, 3, 1, 8, 0, 0)


def _stamp(dt_s=0):
    return (T0 + dt.timedelta(seconds=dt_s)).strftime("%Y-%m-%dT%H:%M:%S")


# ---------------------------------------------------------------------------- item 13
def test_group_renamed_when_an_earlier_subband_arrives(tmp_path):
    """sb01 (2 s later in name) is seen first, sb00 after it: the group is named after
    the earliest timestamp (its products' name), its files and events follow, and the
    first name still finds it."""
    from contimg.stream import Stream

    from test_stream import _cfg

    cfg = _cfg(tmp_path)
    cfg.incoming.mkdir()
    late_name = cfg.incoming / tel.subband_filename(_stamp(2), 1)
    late_name.write_bytes(b"x")
    s = Stream(cfg, None)
    try:
        s.scan()
        (g,) = s.db.groups()
        assert g["group_id"] == _stamp(2)
        (cfg.incoming / tel.subband_filename(_stamp(0), 0)).write_bytes(b"x")
        (cfg.incoming / tel.subband_filename(_stamp(1), 2)).write_bytes(b"x")
        s.scan()
        (g,) = s.db.groups()
        assert g["group_id"] == _stamp(0), "the group must carry the earliest timestamp"
        assert g["t_start"] == pytest.approx(T0.replace(tzinfo=dt.timezone.utc).timestamp())
        files = s.db.files(_stamp(0))
        assert sorted(f["subband"] for f in files) == [0, 1, 2]
        assert s.db.group(_stamp(2))["group_id"] == _stamp(0)     # the old name finds it
        assert any("renamed from" in (e["reason"] or "") for e in s.db.events(_stamp(0)))
        assert s.db.query("PRAGMA foreign_key_check") == []
    finally:
        s.db.close()


def test_rename_group_only_while_collecting(tmp_path):
    db = StateDB(tmp_path / "db.sqlite3")
    db.add_file("/x/a.hdf5", subband=1, timestamp=10.0, group_id="B", t_start=10.0,
                n_expected=4)
    db.transition("B", "pending", expect="collecting")
    assert db.rename_group("B", "A", t_start=5.0) is False
    assert db.group("B")["state"] == "pending" and db.group("A") is None
    db.close()


@contextmanager
def _read_only(path: Path):
    """A directory nobody can write into, root included (a read-only tmpfs when root,
    else mode 0555)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"cannot mount a read-only tmpfs: {r.stderr}"
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=True)
    else:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


@pytest.fixture(scope="module")
def small_ms(small_group, small_cfg, tmp_path_factory):
    """The shrunken group as an MS (DATA), and its Dataset."""
    from contimg.io.ms import write_ms
    from contimg.io.uvh5 import open_group

    ds = open_group(small_group.files, n_subbands=small_cfg.n_subbands).compute()
    path = tmp_path_factory.mktemp("small_ms") / "g.ms"
    write_ms(ds, path)
    return str(path), ds


def test_calibrate_into_a_read_only_directory_is_refused_before_solving(
        small_ms, tmp_path, capsys, monkeypatch):
    """``contimg calibrate`` into a read-only directory: one line naming the directory,
    exit 2, before anything is solved (it used to solve, then end in a traceback)."""
    from contimg import calibrate, cli

    solved = []
    real = calibrate.solve_dataset
    monkeypatch.setattr(calibrate, "solve_dataset",
                        lambda *a, **k: solved.append(1) or real(*a, **k))
    ro = tmp_path / "cal-ro"
    with _read_only(ro):
        rc = cli.main(["calibrate", small_ms[0], "--out-dir", str(ro)])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(ro) in err and "not writable" in err and "Traceback" not in err
    assert not solved, "the calibration was solved before its output was checked"


def test_image_checks_its_output_before_computing(small_group, tmp_path, capsys,
                                                 monkeypatch):
    """``contimg image`` into a read-only directory: refused at once, naming it, without
    computing the image (it used to compute everything, then fail to write)."""
    from contimg import cli, imaging

    computed = []
    monkeypatch.setattr(imaging, "image_dataset",
                        lambda *a, **k: computed.append(1) or pytest.fail("computed"))
    ro = tmp_path / "img-ro"
    with _read_only(ro):
        rc = cli.main(["image", *map(str, small_group.files), "--out", str(ro / "x"),
                       "--niter", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and str(ro) in err and "not writable" in err
    assert not computed


def test_writable_dir_creates_and_names(tmp_path):
    from contimg.io.files import writable_dir

    d = tmp_path / "a" / "b"
    assert writable_dir(d) == d and d.is_dir() and not list(d.iterdir())
    with _read_only(tmp_path / "ro"):
        with pytest.raises(PermissionError, match=str(tmp_path / "ro" / "sub")):
            writable_dir(tmp_path / "ro" / "sub")


# ---------------------------------------------------------------------------- item 14
def test_parse_mode_refuses_world_writable_modes():
    from contimg.config import ConfigError, load_config
    from contimg.io.files import dir_mode, parse_mode

    assert parse_mode("0640") == parse_mode("640") == parse_mode("0o640") == 0o640
    assert dir_mode(0o644) == 0o755 and dir_mode(0o640) == 0o750 and dir_mode(0o600) == 0o700
    for bad in ("0666", 0o777, "0646", "u+w", 640, "0244"):
        with pytest.raises(ValueError):
            parse_mode(bad)
    assert load_config(env={}).paths.product_mode == 0o644
    assert load_config(env={}, overrides={"paths.product_mode": "0640"}
                       ).paths.product_mode == 0o640
    with pytest.raises(ConfigError, match="world-writable"):
        load_config(env={}, overrides={"paths.product_mode": "0666"})


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of everything under ``root`` (itself included)."""
    out = {str(root): stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        if not p.is_symlink():
            out[str(p)] = stat.S_IMODE(p.stat().st_mode)
    return out


@contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask", [0o000, 0o077])
@pytest.mark.parametrize("mode", [None, "0640"])
def test_products_get_the_configured_mode_whatever_the_umask(small_ms, tmp_path, umask,
                                                             mode):
    """Under umask 000 (products used to be world-writable) and 077 (unreadable by the
    group): an MS (and CORRECTED_DATA added to it), a calibration table, FITS images, a
    thumbnail, a mosaic and their directories come out with the configured mode."""
    import numpy as np
    from astropy.wcs import WCS

    from contimg import config
    from contimg.app.products import make_thumbnail
    from contimg.calibrate import apply_ms
    from contimg.caltables import write_caltable
    from contimg.io.files import make_dirs
    from contimg.io.fits import write_fits
    from contimg.io.ms import write_ms
    from contimg.mosaic import write_mosaic

    fmode = 0o644 if mode is None else int(mode, 8)
    dmode = fmode | ((fmode & 0o444) >> 2)
    ms_src, ds = small_ms
    prev = config.use(config.load_config(
        env={}, overrides={} if mode is None else {"paths.product_mode": mode}))
    try:
        with _umask(umask):
            out = make_dirs(tmp_path / "products" / "ms")
            ms = out / "g.ms"
            write_ms(ds, ms)
            nant = ds.sizes["antenna"] if "antenna" in ds.sizes else \
                int(ds.ANTENNA_POSITION.shape[0])
            cal = make_dirs(tmp_path / "products" / "cal") / "g.G"
            write_caltable(str(cal), str(ms), kind="G", times_unix=[float(ds.time[0])],
                           cparam=np.ones((1, nant, 1, 2), np.complex64),
                           flag=np.zeros((1, nant, 1, 2), bool))
            apply_ms(str(ms), [str(cal)])      # casacore adds the column's files
            img = make_dirs(tmp_path / "products" / "images") / "g-image.fits"
            hdr = WCS(naxis=2).to_header()
            write_fits(img, np.ones((16, 16)), hdr)
            make_thumbnail(img, img.with_suffix(".png"))
            w = WCS(naxis=2)
            write_mosaic(tmp_path / "products" / "mosaics" / "night.fits",
                         np.ones((8, 8)), np.ones((8, 8)), np.ones((8, 8)), w, (0, 0, 0))
    finally:
        config.use(prev)
    modes = _modes(tmp_path / "products")
    wrong = {p: oct(m) for p, m in modes.items()
             if m != (dmode if os.path.isdir(p) else fmode)}
    assert not wrong, f"products not {oct(fmode)} (dirs {oct(dmode)}): {wrong}"
    assert not any(m & stat.S_IWOTH for m in modes.values())
    assert any(p.endswith(".png") for p in modes) and len(modes) > 20
