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
    r = _run("demo", "--small", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "converted 1 group(s)" in r.stdout
    ms = sorted((tmp_path / "ms").glob("*.ms"))
    assert len(ms) == 1
    ds = open_ms(ms[0])
    assert ds.sizes["frequency"] == 16 * 12 and ds.sizes["time"] == 24
    assert ds.sizes["baseline_id"] == 24 * 25 // 2


def test_simulate_then_info(tmp_path):
    r = _run("simulate", "--out", str(tmp_path), "--antennas", "6", "--subbands", "2",
             "--channels", "4", "--integrations", "3")
    assert r.returncode == 0, r.stderr
    r = _run("info", str(tmp_path), "--subbands", "2")
    assert r.returncode == 0, r.stderr
    assert "21 (117 antennas in table)" in r.stdout and "channels       8:" in r.stdout


def test_info_reports_bad_input_in_one_line(tmp_path):
    (tmp_path / "2026-01-01T00:00:00_sb00.hdf5").write_bytes(b"not hdf5 at all")
    r = _run("info", str(tmp_path), "--subbands", "1")
    assert r.returncode == 2
    assert "2026-01-01T00:00:00_sb00.hdf5: cannot open as HDF5" in r.stderr
    assert "Traceback" not in r.stderr
