"""Issue 19 item 4: where a stage's graphs run is decided per thread, never process-wide.

A Dask worker (or a driver with an in-process cluster) runs several stages at once in one
process. ``contimg.pipeline.local_dask`` used to set ``scheduler="threads"`` in the
process-wide ``dask.config``: every other thread then saw it, and a stage leaving could
restore a value another had changed meanwhile. Now a stage marks only its own thread
(``graphs.scheduling.local_threads``) and the compute sites (imaging, calibration, MS
reading) ask ``graphs.scheduling`` where to run.
"""

from __future__ import annotations

import copy
import threading
import time

import dask
import dask.array as da
import distributed  # noqa: F401 - merges its defaults into dask.config before any snapshot
import numpy as np
import pytest

from graphs import scheduling


def _config():
    return copy.deepcopy(dask.config.config)


def test_stage_setting_is_per_thread_and_leaves_dask_config_alone():
    """Two overlapping stages and a bystander thread: each stage thread is on local
    threads while inside, the bystander never is, and ``dask.config`` never changes
    (sampled all along by the bystander)."""
    from contimg.pipeline import local_dask

    before = _config()
    inside, bystander, changed = [], [], []
    stop = threading.Event()

    def stage(delay, hold):
        time.sleep(delay)
        with local_dask():
            time.sleep(hold)
            inside.append(scheduling.threads())
        inside.append(scheduling.threads())   # None again once out

    def watch():
        while not stop.is_set():
            bystander.append(scheduling.threads())
            if dask.config.config != before:
                changed.append(dask.config.get("scheduler", None))
            time.sleep(0.005)

    w = threading.Thread(target=watch)
    w.start()
    ts = [threading.Thread(target=stage, args=a) for a in ((0, 0.2), (0.05, 0.3))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    w.join()
    assert not changed, f"dask.config changed while stages ran (scheduler={changed[:3]})"
    assert set(bystander) == {None}
    assert sorted(x is None for x in inside) == [False, False, True, True]
    assert all(x is None or x >= 1 for x in inside)
    assert dask.config.config == before


def test_local_threads_nest_and_restore():
    assert scheduling.threads() is None
    with scheduling.local_threads(3):
        assert scheduling.options() == {"scheduler": "threads", "num_workers": 3}
        assert scheduling.rechunk_method() == "tasks"
        with scheduling.local_threads(1):
            assert scheduling.threads() == 1
        assert scheduling.threads() == 3
    assert scheduling.threads() is None and scheduling.options() == {}
    assert scheduling.rechunk_method() is None


def _image_inputs(seed):
    """A small random row Dataset + uvw cube for graphs.image's computing helpers."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    uvw = rng.normal(0, 300.0, (400, 3))
    uvw_l = da.from_array(uvw, chunks=(50, 3))
    dsr = xr.Dataset({"UVW_L": (("row", "uvw"), uvw_l)})
    return dsr, da.from_array(uvw, chunks=(37, 3))


@pytest.mark.timeout(300)
def test_driver_graphs_run_locally_beside_a_distributed_client():
    """With a distributed client active in the process (the default scheduler), two
    threads run stage code at once (graphs.image's planning reductions, an MS-free
    calibration quality count, rechunks); every graph they compute runs on local
    threads: none reaches the distributed scheduler. A graph computed outside a stage
    still goes to the client (the counter works), and ``dask.config`` is unchanged."""
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    from contimg.calibrate import _nonfinite_note
    from contimg.pipeline import local_dask
    from graphs import image as gi

    class Count(SchedulerPlugin):
        def __init__(self):
            self.graphs = 0

        def update_graph(self, scheduler, **kw):
            self.graphs += 1

    before = _config()
    errors, done = [], []
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        counter = Count()
        cluster.scheduler.add_plugin(counter, name="count-graphs")

        def stage(seed):
            try:
                import xarray as xr

                dsr, uvw = _image_inputs(seed)
                for _ in range(5):
                    with local_dask():
                        plan = gi.imaging_plan_rows(dsr, 64, 1e-3)
                        fit = gi.coplanar_fit(uvw, 0.1)
                        vis = da.from_array(
                            np.ones((4, 6, 8, 2), np.complex64), chunks=(1, 6, 4, 2))
                        ds = xr.Dataset({"VISIBILITY": (("t", "b", "f", "p"), vis),
                                         "FLAG": (("t", "b", "f", "p"), vis.real < 0)})
                        note = _nonfinite_note(ds, np.ones(6, bool))
                        (tot,) = scheduling.compute(
                            vis.rechunk({0: -1, 2: -1}, method=scheduling.rechunk_method())
                            .sum())
                        assert note == "" and tot == 4 * 6 * 8 * 2
                        assert plan is not None and np.isfinite(fit.rms_w)
                    done.append(seed)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

        ts = [threading.Thread(target=stage, args=(s,)) for s in (1, 2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        reached_in_stages = counter.graphs
        # outside a stage, dask's choice stands: the client gets the graph
        assert da.ones(10, chunks=5).sum().compute() == 10
        reached_outside = counter.graphs - reached_in_stages
        assert client.status == "running"
    assert not errors, errors
    assert len(done) == 10
    assert reached_in_stages == 0, f"{reached_in_stages} stage graphs reached the scheduler"
    assert reached_outside >= 1, "the counter must see a graph sent to the client"
    assert dask.config.get("scheduler", None) == before.get("scheduler")
    assert dask.config.config == before


@pytest.mark.timeout(600)
def test_two_images_at_once_stay_local_and_match(small_group, small_cfg):
    """The image stage's own graphs (Stokes I, weights, gridding index, PSF + dirty,
    every major cycle): two images made at once in two threads of a process whose
    default scheduler is a distributed client run on local threads (none reaches the
    scheduler) and equal the synchronous scheduler's image."""
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    from contimg.imaging import image_dataset
    from contimg.io.uvh5 import open_group
    from contimg.pipeline import local_dask

    kw = dict(npix=128, cell_arcsec=20.0, niter=60, auto_threshold_sigma=0.0,
              threshold=0.0, mgain=0.5, grid_tasks=2)
    ds = open_group(small_group.files, n_subbands=small_cfg.n_subbands).compute()
    with dask.config.set(scheduler="sync"):
        ref = image_dataset(ds, **kw)

    class Count(SchedulerPlugin):
        graphs = 0

        def update_graph(self, scheduler, **k):
            Count.graphs += 1

    before = _config()
    out, errors = {}, []
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster, Client(cluster):
        cluster.scheduler.add_plugin(Count(), name="count-graphs")

        def stage(tag):
            try:
                with local_dask():
                    out[tag] = image_dataset(ds, **kw)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

        ts = [threading.Thread(target=stage, args=(t,)) for t in "ab"]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors, errors
    assert Count.graphs == 0, f"{Count.graphs} image graphs reached the scheduler"
    assert ref.n_major >= 2, "CLEAN must run several major cycles to test them"
    for tag in "ab":
        np.testing.assert_allclose(out[tag].image, ref.image, rtol=0,
                                   atol=1e-5 * np.abs(ref.image).max())
    assert dask.config.config == before
