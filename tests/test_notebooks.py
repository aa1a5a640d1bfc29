"""The notebooks run top to bottom (their code cells, in order, in one namespace)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = json.loads(path.read_text())
    ns = {}
    try:
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                src = "".join(cell["source"])
                exec(compile(src, f"{path.name}", "exec"), ns)
        if "back" in ns and "ds" in ns:  # the MS round trip came back equal
            assert bool((ns["back"].VISIBILITY == ns["ds"].VISIBILITY).all().compute())
    finally:
        if "client" in ns:
            ns["client"].close()
            ns["client"].cluster.close()
