"""A real multi-process Dask cluster on loopback (issue 16): ``contimg cluster up`` starts
``dask scheduler`` and one ``dask worker`` per node from the command line; ``contimg
stream`` with ``placement = "nodes"`` reads each subband on the worker whose directory
holds it. Checked from the workers' own task records (the preload plugin's log), and
from the state database; then kill -9 of a worker mid-stream, then a node gone for good.

Groups are small (10 antennas, 4 subbands x 8 channels, 6 integrations); subbands 00, 01
live in node n0's directory, 02, 03 in n1's, and nowhere else: the stream scans both
nodes' directories and groups the subbands across them (no incoming directory of links).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contimg.simulate import SimConfig, simulate_group
from contimg.state import StateDB

SIM = SimConfig(n_ant=10, n_subbands=4, n_chan=8, n_times=6, rfi=None)
GROUP_S = 6 * 12.884901888
ROOT = Path(__file__).resolve().parents[1]
HOLDER = {0: "n0", 1: "n0", 2: "n1", 3: "n1"}       # subband -> node


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def contimg(*args, timeout=300, check=True):
    cmd = [sys.executable, "-m", "contimg.cli", *map(str, args)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def write_config(root: Path, scheduler: str, worker_port: int, extra: str = "") -> Path:
    nodes = {n: root / "nodes" / n for n in ("n0", "n1")}
    for d in nodes.values():
        d.mkdir(parents=True, exist_ok=True)
    cfg = root / "contimg.toml"
    cfg.write_text(f"""
[dask]
scheduler = "{scheduler}"
nodes = [{", ".join(f'"{n}={d}"' for n, d in nodes.items())}]
worker_threads = 1
worker_port = {worker_port}
no_workers_timeout = 6.0
task_log = "{root / 'tasks'}"
run_dir = "{root / 'run'}"
dashboard_address = "127.0.0.1:0"

[stream]
placement = "nodes"
n_subbands = 4
min_subbands = 3
settle_s = 0.3
poll_s = 0.2
group_timeout_s = 20.0
max_retries = 1
skip = ["calibrate", "apply", "image", "photometry"]
{extra}
""")
    return cfg


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    sport, wport, _ = _free_ports(3)
    cfg = write_config(root, f"tcp://127.0.0.1:{sport}", wport)
    out = contimg("--config", cfg, "cluster", "up", timeout=180)
    assert "cluster up" in out.stdout
    try:
        yield root, cfg
    finally:
        contimg("--config", cfg, "cluster", "down", check=False)


def place_groups(root, name, n, start):
    """``n`` groups simulated; each subband written into its holder node's own directory
    (no incoming directory, no links: the stream scans every node's directory). The
    previous test's files are cleared first (its stream has ended; each test has its own
    database). Returns [file names]."""
    for f in (root / "nodes").glob("*/*.hdf5"):
        f.unlink()
    names = []
    for i in range(n):
        g = simulate_group(root / name / f"sim{i}", start + dt.timedelta(seconds=i * GROUP_S),
                           cfg=SIM)
        for f in g.files:
            f = Path(f)
            os.replace(f, root / "nodes" / HOLDER[_sb(f.name)] / f.name)
            names.append(f.name)
    return names


def _sb(name) -> int:
    return int(name.split("_sb")[1][:2])


def stream(root, cfg, name, *, wait=True, timeout=240):
    args = [sys.executable, "-m", "contimg.cli", "--config", str(cfg), "stream",
            "--output", str(root / name / "out"),
            "--db", str(root / name / "db.sqlite3"), "--until-idle", "--timeout", "200"]
    p = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    if wait:
        p.wait(timeout)
    return p


def records(root):
    out = []
    for p in (root / "tasks").glob("*.jsonl"):
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def reads(root, names):
    return [r for r in records(root) if r["stage"] == "read" and r.get("file") in names]


def _worker_pids(cfg_path):
    """{worker name: worker process pid}, asked of the workers themselves."""
    from distributed import Client

    sched = [ln.split('"')[1] for ln in cfg_path.read_text().splitlines()
             if ln.startswith("scheduler")][0]
    with Client(sched, timeout=10, set_as_default=False) as c:
        info = c.scheduler_info()["workers"]
        pids = c.run(os.getpid)
    return {str(info[a]["name"]): pid for a, pid in pids.items()}


@pytest.mark.slow
def test_every_subband_is_read_on_its_holder(cluster):
    root, cfg = cluster
    st = contimg("--config", cfg, "cluster", "status")
    assert "n0" in st.stdout and "n1" in st.stdout and "not connected" not in st.stdout
    names = place_groups(root, "local", 2, dt.datetime(2026, 1, 15, 8, 0, 0))
    p = stream(root, cfg, "local")
    log = p.stdout.read()
    assert p.returncode == 0, log
    db = StateDB(root / "local" / "db.sqlite3")
    groups = db.groups()
    assert sorted(g["state"] for g in groups) == ["completed"] * 2, log
    # the workers' own records: every subband of every group read once per time block,
    # each on the worker of the node that holds its file, and that worker says so
    rs = reads(root, names)
    assert sorted(r["file"] for r in rs) == sorted(names)
    for r in rs:
        assert r["worker"] == HOLDER[_sb(r["file"])], r
        assert r["on_holder"] is True, r
    # stage tasks carry readable keys (stage-group-...) and are timed in the records
    gids = [g["group_id"] for g in groups]
    stages = {r["stage"] for r in records(root) if r["group"] in gids}
    assert {"convert", "flag"} <= stages
    out = contimg("--config", cfg, "status", "--db", root / "local" / "db.sqlite3").stdout
    assert "convert=" in out and "flag=" in out
    # contimg status: per-stage timings, with the workers' CPU seconds per group
    table = out.split("per stage over 2 completed group(s):")[1].splitlines()
    rows = {ln.split()[0]: ln.split()[1:] for ln in table[2:] if ln.strip()}
    assert {"convert", "flag"} <= set(rows) and float(rows["flag"][2]) > 0, out
    # the app's Cluster page shows the same table, from the same task records
    from types import SimpleNamespace

    from contimg.app.cluster import ClusterView

    view = ClusterView(SimpleNamespace(db=db, task_log=str(root / "tasks"), scheduler=""))
    view.update_timings()
    shown = view.timings.object
    assert "per stage over 2 completed group(s)" in shown and "CPU s/group" in shown, shown
    assert shown.startswith('<pre id="stage-timings">') and shown.endswith("</pre>"), shown
    body = shown[len('<pre id="stage-timings">'):-len("</pre>")]
    flag_row = [ln for ln in body.splitlines() if ln.split()[:1] == ["flag"]]
    assert flag_row and float(flag_row[0].split()[3]) == float(rows["flag"][2]), shown
    assert len(list((root / "local" / "out" / "ms").glob("*.ms"))) == 2


@pytest.mark.slow
def test_kill9_worker_mid_stream_completes_every_group_once(cluster):
    root, cfg = cluster
    names = place_groups(root, "kill", 3, dt.datetime(2026, 1, 15, 9, 0, 0))
    before = _worker_pids(cfg)
    p = stream(root, cfg, "kill", wait=False)
    db_path = root / "kill" / "db.sqlite3"
    # the moment a read of ours has run: the stream is inside its first group
    deadline = time.monotonic() + 120
    while not reads(root, names) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    os.kill(before["n1"], signal.SIGKILL)
    log, _ = p.communicate(timeout=240)
    assert p.returncode == 0, log
    db = StateDB(db_path)
    groups = db.groups()
    assert sorted(g["state"] for g in groups) == ["completed"] * 3, log
    # exactly once: one MS per group, no temporary left, one completion event each
    assert len(list((root / "kill" / "out" / "ms").glob("*.ms"))) == 3
    for g in groups:
        events = [e for e in db.events(g["group_id"]) if e["to_state"] == "completed"]
        assert len(events) == 1, events
    assert not [q for q in (root / "kill" / "out").rglob("*") if ".tmp-" in q.name]
    # the nanny restarted n1 (another process) and reads of n1's files still ran there
    after = _worker_pids(cfg)
    assert after["n1"] != before["n1"]
    for r in reads(root, names):
        assert r["worker"] == HOLDER[_sb(r["file"])] and r["on_holder"], r


@pytest.mark.slow
def test_scheduler_restart_mid_stream_loses_and_duplicates_nothing(cluster):
    """kill -9 of the scheduler inside a group, started again on the same address (by
    `cluster up`'s supervisor, as systemd would): the stream's client reconnects, the
    group in flight is re-queued without spending a retry, the workers come back, and
    every group completes once."""
    root, cfg = cluster
    names = place_groups(root, "sched", 2, dt.datetime(2026, 1, 15, 11, 0, 0))
    pids_file = root / "run" / "pids.json"
    pids = json.loads(pids_file.read_text())
    p = stream(root, cfg, "sched", wait=False)
    deadline = time.monotonic() + 120
    while not reads(root, names) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    # the dask scheduler process under `cluster up`'s supervisor, which starts it again
    sup = pids["scheduler"]
    (sched,) = map(int, Path(f"/proc/{sup}/task/{sup}/children").read_text().split())
    os.kill(sched, signal.SIGKILL)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    db = StateDB(root / "sched" / "db.sqlite3")
    groups = db.groups()
    assert sorted(g["state"] for g in groups) == ["completed"] * 2, log
    assert all(g["retries"] == 0 for g in groups), groups        # no retry spent
    lost = [e for g in groups for e in db.events(g["group_id"])
            if "scheduler connection lost" in (e["reason"] or "")]
    assert lost, log                                               # it was hit mid-group
    for g in groups:
        assert len([e for e in db.events(g["group_id"]) if e["to_state"] == "completed"]) == 1
    assert len(list((root / "sched" / "out" / "ms").glob("*.ms"))) == 2


@pytest.mark.slow
def test_a_node_gone_for_good_fails_its_groups_naming_the_subbands(cluster):
    """The only holder of sb02/sb03 is gone (nanny and worker killed): the group fails
    after no_workers_timeout with a reason naming those files (max_retries 1: twice)."""
    root, cfg = cluster
    pids = json.loads((root / "run" / "pids.json").read_text())
    os.killpg(pids["n1"], signal.SIGKILL)
    names = place_groups(root, "gone", 1, dt.datetime(2026, 1, 15, 10, 0, 0))
    p = stream(root, cfg, "gone")
    log = p.stdout.read()
    assert p.returncode == 1, log         # every group failed: the stream says so
    (g,) = StateDB(root / "gone" / "db.sqlite3").groups()
    assert g["state"] == "failed"
    on_n1 = [n for n in names if HOLDER[_sb(n)] == "n1"]
    assert all(n in g["error"] for n in on_n1), g["error"]
    assert "n1" in g["error"] and "_sb00" not in g["error"]


def test_the_deploy_files_agree_with_the_code():
    """deploy/: the configuration loads (16 nodes, placement by node, TLS scheduler), each
    unit's contimg command line parses, every variable of contimg.env is documented and
    the operators' variables in it are the ones config.py knows."""
    import shlex

    from contimg import config as C
    from contimg.cli import build_parser
    from contimg.cluster import node_placement, worker_command

    cfg = C.load_config(ROOT / "deploy" / "contimg.toml", env={})
    assert len(cfg.dask.nodes) == 16 and cfg.stream.placement == "nodes"
    assert cfg.dask.scheduler.startswith("tls://")
    assert len(node_placement(cfg.dask.nodes)) == 16
    assert "--name" in worker_command(cfg, "corr16")
    parser = build_parser()
    units = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
    assert {u.name for u in units} >= {"dask-scheduler.service", "dask-worker@.service",
                                      "contimg-stream.service", "contimg-app.service",
                                      "contimg-housekeeping.service"}
    for unit in units:
        text = unit.read_text().replace("\\\n", " ")
        assert "EnvironmentFile=/etc/contimg/contimg.env" in text, unit.name
        (line,) = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
        argv = shlex.split(line.removeprefix("ExecStart="))
        assert argv[0].endswith("/contimg"), unit.name
        parser.parse_args([a.replace("%i", "corr01") for a in argv[1:]])
    lines = (ROOT / "deploy" / "contimg.env").read_text().splitlines()
    names = set()
    for i, ln in enumerate(lines):
        if ln and not ln.startswith("#"):
            name = ln.split("=", 1)[0]
            names.add(name)
            above = lines[i - 1]
            assert above.startswith("#") or lines[i - 1].split("=")[0] in names, name
    known = set(C.ENVIRONMENT) | {"CONTIMG_CONFIG", "DASK_CONFIG", "HDF5_USE_FILE_LOCKING",
                                  "OMP_NUM_THREADS", "MKL_NUM_THREADS"}
    assert names <= known, names - known
    C.load_config(ROOT / "deploy" / "contimg.toml",
                  env={k: v for k, v in (ln.split("=", 1) for ln in lines
                                         if ln and not ln.startswith("#"))})


def test_the_node_list_is_checked_and_places_files_by_directory(tmp_path):
    from contimg import config as C
    from contimg.cluster import holders, node_placement, parse_nodes

    with pytest.raises(ValueError, match="'corr01' is not 'name=incoming directory'"):
        parse_nodes(["corr01"])
    with pytest.raises(ValueError, match="node 'a' listed twice"):
        parse_nodes(["a=/x", "a=/y"])
    with pytest.raises(C.ConfigError, match="nodes: 'x=' is not"):
        C.load_config(env={}, overrides={"dask.nodes": ["x="]})
    with pytest.raises(ValueError, match=r"needs the node list: \[dask\] nodes"):
        node_placement(())
    (tmp_path / "a").mkdir()
    (tmp_path / "ab").mkdir()
    f = tmp_path / "a" / "2026-01-15T08:00:00_sb00.hdf5"
    g = tmp_path / "ab" / "2026-01-15T08:00:00_sb01.hdf5"
    link = tmp_path / "in.hdf5"
    link.symlink_to(g)
    place = node_placement([f"a={tmp_path / 'a'}", f"ab={tmp_path / 'ab'}"])
    # by the real path, and a directory is not the prefix of its sibling's name
    assert holders(place, [str(f), str(link)]) == {str(f): ["a"], str(link): ["ab"]}


def test_the_stream_groups_subbands_across_the_node_directories(tmp_path):
    """placement "nodes": the stream scans every node's own directory (no incoming
    directory of links) and groups one group's subbands across them; a file also
    reachable through a link in the incoming directory counts once; without placement
    by node only the incoming directory is scanned, as before."""
    from contimg import config as C
    from contimg.stream import Stream, StreamConfig

    a, b, inc = tmp_path / "a", tmp_path / "b", tmp_path / "in"
    for d in (a, b, inc):
        d.mkdir()
    g = simulate_group(tmp_path / "sim", dt.datetime(2026, 1, 15, 8, 0, 0), cfg=SIM)
    for f in map(Path, g.files):
        os.replace(f, (a if _sb(f.name) < 2 else b) / f.name)
    sb00 = next(a.glob("*_sb00.hdf5"))
    (inc / sb00.name).symlink_to(sb00)
    over = {"dask.nodes": [f"n0={a}", f"n1={b}"], "stream.placement": "nodes",
            "stream.n_subbands": 4, "paths.output": str(tmp_path / "out"),
            "paths.db": str(tmp_path / "db.sqlite3")}
    cfg = StreamConfig.from_config(C.load_config(env={}, overrides=over))
    assert cfg.scan_dirs == (a, b) and cfg.incoming == a      # no [paths] incoming: n0's
    for with_inc in (False, True):
        if with_inc:
            (tmp_path / "db.sqlite3").unlink()
            cfg = StreamConfig.from_config(C.load_config(
                env={}, overrides=dict(over, **{"paths.incoming": str(inc)})))
            assert cfg.scan_dirs == (inc, a, b)
        stream = Stream(cfg, client=None)
        stream.scan(once=True)
        stream.update_groups(once=True)
        (grp,) = stream.db.groups()
        assert grp["state"] == "pending", grp
        files = stream.db.files(grp["group_id"])
        assert sorted(f["subband"] for f in files) == [0, 1, 2, 3], files
        assert all(f["status"] == "ready" for f in files), files
        assert {Path(f["path"]).parent for f in files if f["subband"] >= 2} == {b}
    one = StreamConfig.from_config(C.load_config(env={}, overrides=dict(
        over, **{"paths.incoming": str(inc), "stream.placement": "any"})))
    assert one.scan_dirs == (inc,) and one.incoming_dirs == ()
