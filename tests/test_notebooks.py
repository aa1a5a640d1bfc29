"""The notebooks run top to bottom in a real Jupyter kernel (nbclient), and their cells
show what they say they show: every notebook has its checks here, cell by cell."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _text(cell) -> str:
    """Everything a code cell showed: its streams and its result's plain text."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            data = out.get("data", {})
            parts.append(data.get("text/plain", "") + data.get("text/html", ""))
    return "".join(parts)


def _result(cell) -> str:
    (res,) = [o for o in cell["outputs"] if o["output_type"] == "execute_result"]
    return res["data"]["text/plain"]


def _check_reprocess(cells):
    assert "Client" in _text(cells["cell-1"])                         # the cluster is up
    assert re.search(r"Dask dashboard: http://127\.0\.0\.1:\d+/status", _text(cells["cell-1"]))
    ds = _text(cells["cell-2"])                                        # the Dataset's repr
    for name in ("VISIBILITY", "FLAG", "WEIGHT", "UVW", "baseline_id", "frequency"):
        assert name in ds, name
    frac = float(re.search(r"flagged fraction ([0-9.]+)", _text(cells["cell-3"])).group(1))
    assert 0.0 <= frac < 0.5
    assert "frequency" in _text(cells["cell-3"])                       # per-channel series
    m = re.search(r"configured strategy ([0-9.]+), threshold 4.0 ([0-9.]+)",
                  _text(cells["cell-reflag"]))                         # reflagged, compared
    assert 0 < float(m.group(1)) < float(m.group(2)) < 0.5
    assert _result(cells["cell-reflag"]) == "True"
    assert _result(cells["cell-4"]) == "True"                          # MS round trip
    assert ast.literal_eval(_result(cells["cell-6"])) == {
        "flag": "ok", "calibrate": "ok", "apply": "ok", "image": "ok", "photometry": "ok"}
    m = re.search(r"peak ([0-9.]+) Jy/beam \(reported ([0-9.]+)\), noise ([0-9.]+)",
                  _text(cells["cell-7"]))
    peak, reported, noise = (float(x) for x in m.groups())
    assert peak == pytest.approx(reported, abs=1e-3) and peak > 20 * noise > 0
    assert _result(cells["cell-7"]) == "True"                          # registered


def _images(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def _check_quick_start(cells):
    assert re.search(r"Dask dashboard: http://127\.0\.0\.1:\d+/status", _text(cells["cell-1"]))
    assert "3 groups, 16 subband files each" in _text(cells["cell-2"])
    counts = ast.literal_eval(_result(cells["cell-3"]))               # the stream's outcome
    assert counts["completed"] == 3 and counts["failed"] == 0
    m = re.search(r"(\d+) images; peak ([0-9.]+) Jy/beam, noise ([0-9.]+)", _text(cells["cell-4"]))
    n, peak, noise = int(m.group(1)), float(m.group(2)), float(m.group(3))
    assert n == 3 and peak > 50 * noise > 0                             # the calibrator shows
    assert _images(cells["cell-4"]) == 1
    m = re.search(r"source (\d+): (\d+) epochs, normalised flux ([0-9.]+) Jy", _text(cells["cell-5"]))
    assert int(m.group(2)) >= 2 and float(m.group(3)) > 0               # seen in several groups
    assert _images(cells["cell-5"]) == 1


def _check_monitor(cells):
    assert set(ast.literal_eval(_result(cells["cell-1"]))) == {"scheduler", "n0", "n1"}
    text = _text(cells["cell-2"])
    assert "worker n0 at tcp://127.0.0.1:" in text and "worker n1 at tcp://127.0.0.1:" in text
    assert ast.literal_eval(_result(cells["cell-3"]))["completed"] == 2
    timings = _result(cells["cell-4"])                                  # from the database
    assert "convert" in timings and "flag" in timings and "image" in timings
    assert len(re.findall(r"2026-01-15T\d\d:\d\d:\d\d", timings)) == 2
    text = _text(cells["cell-5"])                                       # the workers' records
    assert "reads on their holder: 8/8" in text
    assert "{'n0': ['sb00', 'sb01'], 'n1': ['sb02', 'sb03']}" in text
    assert "cpu_s" in _result(cells["cell-5"])
    assert _images(cells["cell-6"]) == 1
    assert "stopped: ['n0', 'n1', 'scheduler']" in _text(cells["cell-7"])


CHECKS = {"01_reprocess_a_group.ipynb": _check_reprocess,
          "02_quick_start.ipynb": _check_quick_start,
          "03_monitor_a_cluster.ipynb": _check_monitor}


def test_every_notebook_has_checks():
    assert {p.name for p in NOTEBOOKS} == set(CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_shows_what_it_says(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_cwd = os.getcwd()
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        os.chdir(env_cwd)
    cells = {c["id"]: c for c in nb.cells if c["cell_type"] == "code"}
    for c in cells.values():
        errors = [o for o in c.get("outputs", []) if o["output_type"] == "error"]
        assert not errors, (c["id"], errors)
    CHECKS[path.name](cells)
