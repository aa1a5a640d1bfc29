"""The README's main command and the simulate/info commands, run as a user would."""

import subprocess
import sys

import pytest

from contimg.io.ms import open_ms


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "contimg.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    """The README's main command (shrunken groups): three groups streamed through every
    stage, a calibration set solved on the calibrator transit and applied to all."""
    from contimg.state import StateDB

    r = _run("demo", "--small", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "processed 3 group(s)" in r.stdout and "(0 failed)" in r.stdout
    ms = sorted((tmp_path / "products" / "ms").glob("*.ms"))
    assert len(ms) == 3
    ds = open_ms(ms[0])
    assert ds.sizes["frequency"] == 16 * 12 and ds.sizes["time"] == 24
    assert ds.sizes["baseline_id"] == 24 * 25 // 2
    db = StateDB(tmp_path / "state" / "pipeline.sqlite3")
    assert db.counts()["completed"] == 3
    (cal,) = db.list_calsets("valid")
    images = db.images()
    assert len(images) == 3 and all(im["calset_id"] == cal["id"] for im in images)
    for im in images:
        assert (tmp_path / "products" / "images").joinpath(im["path"]).exists()
    for g in db.groups():
        stages = {t["stage"]: t["status"] for t in db.timings(g["group_id"])}
        assert stages["apply"] == "ok" and stages["image"] == "ok"
        assert stages["photometry"] == "ok"     # the simulated sky is the catalogue
    n = db.query("SELECT COUNT(DISTINCT image_path) AS i, COUNT(*) AS n FROM photometry")[0]
    assert n["i"] == 3 and n["n"] >= 3
    assert len(db.query("SELECT * FROM image_flux_scale")) == 3
    assert "calibration sets:" in r.stdout and "valid" in r.stdout


def test_simulate_then_info(tmp_path):
    r = _run("simulate", "--out", str(tmp_path), "--antennas", "6", "--subbands", "2",
             "--channels", "4", "--integrations", "3")
    assert r.returncode == 0, r.stderr
    r = _run("info", str(tmp_path), "--subbands", "2")
    assert r.returncode == 0, r.stderr
    assert "21 (117 antennas in table)" in r.stdout and "channels       8:" in r.stdout
    # the same setting from a configuration file (contimg --config), and the option wins
    conf = tmp_path / "contimg.toml"
    conf.write_text("[stream]\nn_subbands = 2\n")
    r2 = _run("--config", str(conf), "info", str(tmp_path))
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == r.stdout
    r3 = _run("--config", str(conf), "info", str(tmp_path), "--subbands", "3")
    assert r3.returncode == 2 and "missing subband(s) sb02" in r3.stderr


def test_info_reports_bad_input_in_one_line(tmp_path):
    (tmp_path / "2026-01-01T00:00:00_sb00.hdf5").write_bytes(b"not hdf5 at all")
    r = _run("info", str(tmp_path), "--subbands", "1")
    assert r.returncode == 2
    assert "2026-01-01T00:00:00_sb00.hdf5: cannot open as HDF5" in r.stderr
    assert "Traceback" not in r.stderr


def test_flag_command_flags_backs_up_and_restores(tmp_path, small_group):
    import numpy as np

    from contimg.io.ms import write_ms
    from contimg.io.uvh5 import open_group

    ms = tmp_path / "g.ms"
    write_ms(open_group(small_group.files, n_subbands=4), ms)
    r = _run("flag", str(ms))
    assert r.returncode == 0, r.stderr
    assert "flagged 0.00 % ->" in r.stdout and "contimg_flag_1" in r.stdout
    assert (tmp_path / "g.ms.flag_summary.json").exists()
    assert open_ms(ms).FLAG.values.mean() > 0.01
    assert "contimg_flag_1" in _run("flag", str(ms), "--list").stdout
    assert _run("flag", str(ms), "--restore", "contimg_flag_1").returncode == 0
    assert not np.any(open_ms(ms).FLAG.values)
    r = _run("flag", str(tmp_path / "missing.ms"))
    assert r.returncode == 2 and "missing.ms" in r.stderr
