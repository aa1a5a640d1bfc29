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
    ds = _text(cells["cell-2"])                                        # the Dataset's repr
    for name in ("VISIBILITY", "FLAG", "WEIGHT", "UVW", "baseline_id", "frequency"):
        assert name in ds, name
    frac = float(re.search(r"flagged fraction ([0-9.]+)", _text(cells["cell-3"])).group(1))
    assert 0.0 <= frac < 0.5
    assert "frequency" in _text(cells["cell-3"])                       # per-channel series
    assert _result(cells["cell-4"]) == "True"                          # MS round trip
    assert ast.literal_eval(_result(cells["cell-6"])) == {
        "flag": "ok", "calibrate": "ok", "apply": "ok", "image": "ok", "photometry": "ok"}
    m = re.search(r"peak ([0-9.]+) Jy/beam \(reported ([0-9.]+)\), noise ([0-9.]+)",
                  _text(cells["cell-7"]))
    peak, reported, noise = (float(x) for x in m.groups())
    assert peak == pytest.approx(reported, abs=1e-3) and peak > 20 * noise > 0
    assert _result(cells["cell-7"]) == "True"                          # registered


CHECKS = {"01_reprocess_a_group.ipynb": _check_reprocess}


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
