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
import time
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


def _run_cli(args, env=None, cwd=None):
    import subprocess
    import sys

    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]),
                                        env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "contimg.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)
