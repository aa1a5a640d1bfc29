"""Race stress test: two threads of one process image at once, as Dask workers do.

A subprocess with a fresh (cold) numba cache images two small groups on a distributed
cluster of two worker threads in one process (``LocalCluster(processes=False)``), many
times: one group after the other (CLEAN's major cycles submit graph after graph) and
both groups at once from two client threads (two images in flight on the same
scheduler). Every image must be identical to the same group's image made on the
synchronous scheduler.

The race this guards against: ``graphs.image`` used to give its blockwise layers fixed
keys (``name="grid-residual"``, ``"stokes-i-rephase"``, ...). On a distributed
scheduler a key already held (a persisted Stokes I, the previous major cycle's residual
not yet released) is taken as the result of the new graph, so a major cycle got the
previous cycle's residual and one group's image got the other group's visibilities.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

ROUNDS = 4  # rounds of (one after the other, both at once)
KW = dict(npix=128, cell_arcsec=20.0, niter=150, auto_threshold_sigma=0.0, threshold=0.01,
          mgain=0.5, grid_tasks=2)


def _group(out, start):
    from contimg.simulate import SimConfig, simulate_group

    cfg = SimConfig(n_ant=24, n_subbands=2, n_chan=8, n_times=6, noise=False, gains=False,
                    rfi=None, threads=1)
    return simulate_group(out, start, cfg=cfg).files


def _worker(files_json, out_dir):
    """Subprocess body: reference images (sync scheduler), then the stress rounds."""
    import dask
    from distributed import Client, LocalCluster

    from contimg.imaging import image_dataset
    from contimg.io.uvh5 import open_group

    groups = json.loads(files_json)
    dss = [open_group(files, n_subbands=2).compute() for files in groups]
    with dask.config.set(scheduler="sync"):
        refs = [image_dataset(ds, **KW) for ds in dss]
    for g, ref in enumerate(refs):
        np.save(os.path.join(out_dir, f"ref-{g}.npy"), ref.image)
    results = {}

    def run(g, tag):
        results[tag] = image_dataset(dss[g], **KW)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster):
        for r in range(ROUNDS):
            for g in range(len(dss)):
                run(g, f"serial-{r}-{g}")
            threads = [threading.Thread(target=run, args=(g, f"concurrent-{r}-{g}"))
                       for g in range(len(dss))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    for tag, prod in results.items():
        np.save(os.path.join(out_dir, f"{tag}.npy"), prod.image)
    majors = [int(p.n_major) for p in results.values()]
    with open(os.path.join(out_dir, "done.json"), "w") as fh:
        json.dump({"n_images": len(results), "n_major": majors}, fh)


@pytest.mark.slow
def test_two_threads_of_one_process_give_identical_images(tmp_path):
    import datetime as dt

    starts = [dt.datetime(2026, 1, 15, 8, 0, 0), dt.datetime(2026, 1, 15, 9, 0, 0)]
    groups = [[str(f) for f in _group(tmp_path / f"g{i}", s)] for i, s in enumerate(starts)]
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, NUMBA_CACHE_DIR=tempfile.mkdtemp(dir=tmp_path),
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, json.dumps(groups), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = json.loads((out / "done.json").read_text())
    assert done["n_images"] == 4 * ROUNDS
    assert min(done["n_major"]) >= 2, "CLEAN must run several major cycles to test them"
    refs = [np.load(out / f"ref-{g}.npy") for g in range(2)]
    assert not np.allclose(refs[0], refs[1], atol=1e-3 * np.abs(refs[0]).max()), \
        "the two groups must give different images (else a mix-up cannot show)"
    bad = []
    for r in range(ROUNDS):
        for kind in ("serial", "concurrent"):
            for g in range(2):
                img = np.load(out / f"{kind}-{r}-{g}.npy")
                if not np.array_equal(img, refs[g]):
                    err = float(np.abs(img - refs[g]).max() / np.abs(refs[g]).max())
                    bad.append(f"{kind} round {r} group {g}: max |diff| {err:.2e} of the peak")
    assert not bad, "images differ from the synchronous scheduler's:\n" + "\n".join(bad)


def test_local_dask_holds_while_any_thread_is_inside():
    """``contimg.pipeline.local_dask`` in two overlapping threads (two stages on one
    worker): the second stays on local threads after the first leaves, and neither
    touches dask's process-wide configuration (the setting is per thread, see
    ``graphs.scheduling`` and tests/test_stage_dask.py)."""
    import time

    import dask

    from contimg.pipeline import local_dask
    from graphs import scheduling

    before = dask.config.get("scheduler", None)
    seen = []

    def first():
        with local_dask():
            time.sleep(0.2)

    def second():
        time.sleep(0.05)
        with local_dask():
            time.sleep(0.3)  # ``first`` leaves meanwhile
            seen.append((scheduling.threads() is not None, dask.config.get("scheduler", None)))

    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [(True, before)]
    assert dask.config.get("scheduler", None) == before


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
