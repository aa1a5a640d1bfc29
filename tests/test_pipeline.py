"""The stage spine (contimg.pipeline): one ordered list of stages and one runner, used by
the stream, ``contimg backfill --ms`` and the notebooks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from contimg import pipeline
from contimg.pipeline import PIPELINE, GroupRun, Stage, run_stages


class _DB:
    """What the register steps use of a StateDB, recorded."""

    path = Path("unused.sqlite3")

    def __init__(self):
        self.calls = []

    def register_ms(self, ms, **kw):
        self.calls.append(("ms", kw.get("status")))

    def register_image(self, path, **kw):
        self.calls.append(("image", path))


def _run(**kw):
    return GroupRun(ms="/x/g.ms", name="g", t_mid=0.0, db=_DB(), output=Path("/x"), **kw)


def test_stage_names_and_what_a_retry_may_keep():
    assert pipeline.STAGES == ("convert", "flag", "calibrate", "apply", "image",
                               "photometry")
    assert pipeline.REUSABLE == ("convert", "flag", "calibrate", "apply")
    assert not hasattr(pipeline, "stage_available")
    from contimg import config

    assert config.STAGES == pipeline.STAGES     # the configuration's --skip choices


def test_runner_order_skip_done_reuse_and_register_steps():
    seen, before = [], []

    def execute(run, stage, kwargs):
        seen.append((stage.name, sorted(kwargs)))
        return {"status": "ok", "seconds": 1.0, "flagged": 0.25, "calset_id": 7,
                "calset": "c", "paths": {"image": "/x/images/g-image.fits"}}

    run = run_stages(_run(image_options={"npix": 64}), execute, skip={"calibrate"},
                     done={"flag": {"status": "ok", "flagged": 0.5, "during": "convert"}},
                     before=lambda r, s: before.append(s.name))
    # flag came from the conversion, calibrate was skipped: apply and image ran, in order
    assert seen == [("apply", ["db_path", "t_mid"]), ("image", ["options", "prefix"]),
                    ("photometry", ["db_path", "group_id", "image"])]
    assert before == ["apply", "image", "photometry"]
    assert run.results["calibrate"] == {"status": "skipped", "reason": "disabled"}
    assert run.results["flag"]["flagged"] == 0.5
    # the register steps ran for every result, the kept flag result included
    assert run.db.calls == [("ms", "flagged"), ("ms", "calibrated"),
                            ("image", "/x/images/g-image.fits")]
    assert run.summary == {"flagged": 0.5, "applied": "c",
                           "image": "/x/images/g-image.fits",
                           "photometry": {"sources": None, "ese_candidates": None,
                                          "scale": None}}
    assert run.calset_id == 7

    # a retry keeps what an earlier attempt made, without running it again
    seen.clear()
    run = run_stages(_run(), execute, reuse={
        "flag": lambda: {"status": "ok", "flagged": 0.1, "reused_from_attempt": 1}})
    assert [s for s, _ in seen] == ["calibrate", "apply", "image", "photometry"]
    assert run.summary["flagged"] == 0.1


def test_a_new_stage_is_one_entry():
    """A stage added after the image (as photometry will be) runs with the others and
    sees their results."""
    got = {}

    def photometry_kwargs(run):
        return {"image": run.results["image"]["paths"]["image"]}

    def register(run, res):
        got["registered"] = res

    stages = PIPELINE + (Stage("photometry", lambda ms, image: {}, photometry_kwargs,
                               register),)

    def execute(run, stage, kwargs):
        if stage.name == "photometry":
            return {"status": "ok", "measured": kwargs["image"]}
        return {"status": "skipped", "reason": "test",
                "paths": {"image": "/x/g-image.fits"}}

    run = run_stages(_run(), execute, stages=stages)
    assert list(run.results) == ["flag", "calibrate", "apply", "image", "photometry"]
    assert got["registered"] == {"status": "ok", "measured": "/x/g-image.fits"}


@pytest.mark.slow
def test_process_ms_on_threads_leaves_no_table_open_and_no_fits_warning(tmp_path, caplog):
    """``contimg backfill --ms`` on an in-process cluster (threads: the stage's check of
    open tables sees the caller's too): no "dask-ms table(s) still open" and no
    astropy FITSFixedWarning, and the products are registered."""
    from distributed import Client, LocalCluster

    from contimg.io.ms import write_ms
    from contimg.io.uvh5 import open_group
    from contimg.simulate import SimConfig, simulate_group
    from contimg.state import StateDB

    cfg = SimConfig(n_ant=10, n_subbands=4, n_chan=8, n_times=6, rfi=None)
    g = simulate_group(tmp_path / "raw", cfg=cfg)
    ms = write_ms(open_group(g.files, n_subbands=4), tmp_path / "g.ms")
    db = StateDB(tmp_path / "db.sqlite3")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as lc, Client(lc) as client:
        with caplog.at_level(logging.WARNING):
            res = pipeline.process_ms(client, db, ms, output=tmp_path / "out",
                                      skip={"calibrate", "apply"},
                                      image_options=dict(npix=256, cell_arcsec=20.0,
                                                         niter=20))
    assert res["flag"]["status"] == "ok" and res["image"]["status"] == "ok"
    assert res["calibrate"]["reason"] == "disabled"
    text = [r.getMessage() for r in caplog.records]
    assert not [t for t in text if "still open" in t], text
    assert not [t for t in text if "FITSFixedWarning" in t], text
    (img,) = db.images()
    assert Path(img["path"]).exists()
    (m,) = db.measurement_sets()
    assert m["status"] == "flagged"
