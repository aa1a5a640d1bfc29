"""A real Dask cluster for contimg: one ``dask scheduler`` and one ``dask worker`` per node.

On the telescope every correlator node holds the subband files it wrote; the node list
is configuration (``[dask] nodes = ["corr01=/data/incoming", ...]``), not code. Each
node runs one worker named after the node (``dask worker ADDRESS --name corr01``), with
this module as its preload: the worker records every task it runs (:class:`TaskRecorder`).
With ``[stream] placement = "nodes"`` the stream restricts the read of each subband file
to the worker(s) of the node(s) whose directory holds it (Dask worker restrictions,
``allow_other_workers=False``); the MS is still written once, by one writer task.

``contimg cluster up`` starts the whole cluster on this machine (detached processes,
their ids and logs under ``[dask] run_dir``), ``down`` stops it, ``status`` lists the
workers and their nodes; ``contimg cluster scheduler`` and ``contimg cluster worker
NODE`` run one process in the foreground (what the systemd units run).

Faults: a worker runs under a nanny, which restarts it when it dies; with fixed ports
(``[dask] worker_port``) the restarted worker keeps its address, so reads restricted to
it run there again. A read whose only holder stays gone fails after ``[dask]
no_workers_timeout`` seconds (Dask's ``distributed.scheduler.no-workers-timeout``) with
an error naming the subband file (:func:`wait_for_holders` says the same before a group
starts).

Task records: each worker appends one JSON line per finished task to
``<task_log>/<worker name>.jsonl`` (and keeps the last ones in memory,
:func:`task_records`): key, stage and group (parsed from the readable key
``<stage>-<group>-...``), worker name and node, wall seconds and the CPU seconds of the
worker process while the task ran (exact per task with one thread per worker; tasks
running at once on one worker share it). :func:`stage_cpu` sums them per stage.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)

#: a stage task's readable key: <stage>-<group stamp>-... ; reads: read-<stamp>_sbNN-t<i>-...
_KEY = re.compile(r"^(?P<stage>[a-z_]+)-(?P<group>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)"
                  r"(?:_(?P<subband>sb\d\d))?")
PLUGIN_NAME = "contimg-task-recorder"


# ---------------------------------------------------------------------------- nodes
def parse_nodes(nodes) -> dict[str, Path]:
    """``["name=dir", ...]`` -> ``{name: absolute dir}`` (in order); a clear error for a
    malformed or repeated entry."""
    out: dict[str, Path] = {}
    for entry in nodes:
        name, sep, where = str(entry).partition("=")
        name, where = name.strip(), where.strip()
        if not sep or not name or not where:
            raise ValueError(f"[dask] nodes: {entry!r} is not 'name=incoming directory'")
        if name in out:
            raise ValueError(f"[dask] nodes: node {name!r} listed twice")
        out[name] = Path(where).absolute()
    return out


def node_placement(nodes) -> dict[str, list[str]]:
    """The stream's placement for ``placement = "nodes"``: ``{worker name: [dir]}``."""
    placed = parse_nodes(nodes)
    if not placed:
        raise ValueError("placement 'nodes' needs the node list: [dask] nodes = "
                         "['name=incoming directory', ...]")
    return {name: [str(d)] for name, d in placed.items()}


def holders(placement: dict, files) -> dict[str, list[str]]:
    """file -> the node names whose directory holds it (by real path)."""
    out = {}
    for f in files:
        real = os.path.realpath(f)
        out[f] = [name for name, dirs in placement.items()
                  for d in ([dirs] if isinstance(dirs, str) else dirs)
                  if real.startswith(os.path.realpath(d).rstrip("/") + "/")]
    return out


def wait_for_holders(client, placement: dict, files, timeout: float) -> None:
    """Before a group's reads are submitted: wait (at most ``timeout`` s) until every
    file has a connected worker on a node that holds it; else raise ``OSError`` naming
    each file whose only holder(s) are gone."""
    held = holders(placement, files)
    deadline = time.monotonic() + timeout
    while True:
        names = {str(w.get("name")) for w in client.scheduler_info()["workers"].values()}
        gone = {f: h for f, h in held.items() if h and not names.intersection(h)}
        if not gone:
            return
        if time.monotonic() > deadline:
            raise OSError("; ".join(
                f"{os.path.basename(f)}: its holder{'s' if len(h) > 1 else ''} "
                f"{', '.join(h)} not connected after {timeout:.0f} s" for f, h in gone.items()))
        time.sleep(0.5)


# ---------------------------------------------------------------------------- records
def parse_key(key) -> dict:
    """``{"stage", "group", "subband"}`` of a readable key (None where it says nothing)."""
    m = _KEY.match(str(key))
    if not m:
        return {"stage": str(key).split("-")[0], "group": None, "subband": None}
    return m.groupdict()


class TaskRecorder:
    """Worker plugin: one record per task this worker finished (see the module docstring).
    A plain class with the WorkerPlugin methods, so importing this module stays cheap."""

    name = PLUGIN_NAME

    def __init__(self, log_dir=None, node_dir=None):
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.node_dir = None if node_dir is None else str(node_dir)
        self.records: deque = deque(maxlen=20000)
        self._started: dict = {}
        self._lock = threading.Lock()
        self._fh = None

    def setup(self, worker):
        self.worker = worker
        self.worker_name = str(worker.name)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.log_dir / f"{self.worker_name}.jsonl", "a", buffering=1)

    def teardown(self, worker):
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def transition(self, key, start, finish, **kw):
        if finish == "executing":
            self._started[key] = (time.time(), time.process_time())
            return
        if start == "executing" and finish == "long-running":
            return          # seceded (e.g. the MS writer's worker_client): still running
        if start not in ("executing", "long-running") or key not in self._started:
            return
        t0, c0 = self._started.pop(key)
        rec = {"key": str(key), **parse_key(key), "worker": self.worker_name,
               "address": self.worker.address, "node_dir": self.node_dir,
               "pid": os.getpid(), "status": "ok" if finish == "memory" else finish,
               "start": t0, "seconds": round(time.time() - t0, 4),
               "cpu_s": round(time.process_time() - c0, 4)}
        if rec["stage"] == "read" and rec["subband"]:
            # the worker's own word on locality: is the file it read in its node directory?
            rec["file"] = f"{rec['group']}_{rec['subband']}.hdf5"
            rec["on_holder"] = bool(self.node_dir) and os.path.exists(
                os.path.join(self.node_dir, rec["file"]))
        with self._lock:
            self.records.append(rec)
            if self._fh is not None:
                self._fh.write(json.dumps(rec) + "\n")


def _plugin_class():
    """:class:`TaskRecorder` as a real ``distributed.WorkerPlugin`` subclass."""
    from distributed.diagnostics.plugin import WorkerPlugin

    return type("TaskRecorderPlugin", (TaskRecorder, WorkerPlugin), {})


async def dask_setup(worker):
    """Preload hook (``dask worker --preload contimg.cluster``): astropy offline etc.
    (:func:`contimg.runtime.configure`) and the task recorder, told this worker's node
    directory from ``[dask] nodes`` and its log directory from ``[dask] task_log``."""
    from contimg import config, runtime

    runtime.configure()
    cfg = config.current()
    node_dir = parse_nodes(cfg.dask.nodes).get(str(worker.name))
    plugin = _plugin_class()(cfg.dask.task_log, node_dir)
    await worker.plugin_add(plugin, name=PLUGIN_NAME)
    log.info("worker %s: node directory %s, task log %s", worker.name, node_dir,
             cfg.dask.task_log)


def _worker_records(dask_worker=None):
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    return list(plugin.records) if plugin is not None else []


def task_records(client=None, log_dir=None) -> list[dict]:
    """Task records: from the log directory's files (every worker that ever ran, killed
    ones included), else from the connected workers' memory."""
    if log_dir is not None:
        out = []
        for p in sorted(Path(log_dir).glob("*.jsonl")):
            for line in p.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:      # a line cut by kill -9
                    continue
        return out
    return [r for recs in client.run(_worker_records).values() for r in recs]


def stage_cpu(records, groups=None) -> dict[str, dict]:
    """``{stage: {"tasks", "seconds", "cpu_s"}}`` summed over the records (of ``groups``)."""
    out: dict[str, dict] = {}
    for r in records:
        if groups is not None and r.get("group") not in groups:
            continue
        s = out.setdefault(r["stage"], {"tasks": 0, "seconds": 0.0, "cpu_s": 0.0})
        s["tasks"] += 1
        s["seconds"] += r["seconds"]
        s["cpu_s"] += r["cpu_s"]
    return out


def reads_off_node(records) -> list[dict]:
    """Read tasks that ran on a worker whose node directory does not hold their file
    (should be none): the workers' own ``on_holder`` verdicts."""
    return [r for r in records if r["stage"] == "read" and not r.get("on_holder")]


# ---------------------------------------------------------------------------- processes
def _dask_cli() -> list[str]:
    exe = Path(sys.executable).with_name("dask")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dask"]


def _host_port(address: str) -> tuple[str, int, str]:
    m = re.fullmatch(r"(?:(?P<proto>\w+)://)?(?P<host>[^:/]+):(?P<port>\d+)", address)
    if not m:
        raise ValueError(f"[dask] scheduler {address!r}: expected tcp://host:port or "
                         "tls://host:port")
    return m["host"], int(m["port"]), m["proto"] or "tcp"


def dask_environment(cfg, config_file=None) -> dict:
    """Environment for the scheduler and worker processes: the contimg configuration
    file and the Dask settings contimg derives from it."""
    from contimg.config import child_environment

    extra = {"DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT": f"{cfg.dask.no_workers_timeout}s"}
    if config_file:
        extra["CONTIMG_CONFIG"] = str(Path(config_file).resolve())
    return child_environment(extra)


def scheduler_command(cfg) -> list[str]:
    host, port, proto = _host_port(cfg.dask.scheduler)
    return [*_dask_cli(), "scheduler", "--protocol", proto, "--host", host, "--port", str(port),
            "--dashboard-address", cfg.dask.dashboard_address]


def worker_command(cfg, node: str, index: int = 0) -> list[str]:
    nodes = parse_nodes(cfg.dask.nodes)
    if node not in nodes:
        raise ValueError(f"node {node!r} is not in [dask] nodes ({', '.join(nodes) or 'empty'})")
    cmd = [*_dask_cli(), "worker", cfg.dask.scheduler, "--name", node, "--nworkers", "1",
           "--nthreads", str(cfg.dask.worker_threads), "--preload", "contimg.cluster",
           "--memory-limit", "auto"]
    if cfg.dask.worker_port:
        cmd += ["--worker-port", str(cfg.dask.worker_port + index)]
    host, _, _ = _host_port(cfg.dask.scheduler)
    if host in ("127.0.0.1", "localhost"):
        cmd += ["--host", "127.0.0.1"]
    return cmd


#: what systemd's Restart=always does for the units: run the command again when it exits
#: (a worker's nanny restarts a dead worker process, but ends itself when the scheduler
#: goes away; the scheduler has no nanny)
_SUPERVISE = ('while :; do "$@"; echo "contimg cluster: $1 $2 exited ($?); restarting" >&2; '
              'sleep 1; done')


def _spawn(cmd, env, logfile: Path) -> subprocess.Popen:
    """Start ``cmd`` detached (its own session: ``down`` stops the whole group), run again
    whenever it exits."""
    fh = open(logfile, "ab")
    try:
        return subprocess.Popen(["sh", "-c", _SUPERVISE, "sh", *cmd], env=env, stdout=fh,
                                stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        fh.close()


def up(cfg, config_file=None, *, timeout: float = 120.0) -> dict:
    """Start the scheduler and one worker per node as detached processes, each run again
    when it exits (as the systemd units are); wait until every worker is connected. Returns ``{process name: pid}`` (also in run_dir/pids.json)."""
    from distributed import Client

    if not cfg.dask.scheduler:
        raise ValueError("contimg cluster up needs [dask] scheduler (e.g. tcp://127.0.0.1:8786)")
    nodes = parse_nodes(cfg.dask.nodes)
    if not nodes:
        raise ValueError("contimg cluster up needs [dask] nodes = ['name=dir', ...]")
    run = Path(cfg.dask.run_dir).absolute()
    run.mkdir(parents=True, exist_ok=True)
    if (run / "pids.json").exists() and any(_alive(p) for p in _pids(run).values()):
        raise RuntimeError(f"{run}: a cluster is already up (contimg cluster down first)")
    env = dask_environment(cfg, config_file)
    pids = {"scheduler": _spawn(scheduler_command(cfg), env, run / "scheduler.log").pid}
    for i, (name, d) in enumerate(nodes.items()):
        d.mkdir(parents=True, exist_ok=True)
        pids[name] = _spawn(worker_command(cfg, name, i), env, run / f"worker-{name}.log").pid
    _write_json(run / "pids.json", pids)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with Client(cfg.dask.scheduler, timeout=5, set_as_default=False) as client:
                client.wait_for_workers(len(nodes), timeout=max(1.0, deadline - time.monotonic()))
            break
        except (OSError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                down(cfg)
                raise RuntimeError(f"cluster did not come up in {timeout:.0f} s ({exc}); "
                                   f"logs in {run}") from None
            time.sleep(1.0)
    log.info("cluster up: scheduler %s, %d worker(s) (%s)", cfg.dask.scheduler, len(nodes),
             ", ".join(nodes))
    return pids


def _write_json(path: Path, obj):
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _pids(run: Path) -> dict:
    try:
        return json.loads((run / "pids.json").read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def down(cfg, *, timeout: float = 30.0) -> list[str]:
    """Stop what :func:`up` started (SIGTERM to each process group, SIGKILL after
    ``timeout``); returns the names stopped."""
    run = Path(cfg.dask.run_dir).absolute()
    pids = _pids(run)
    # workers first, so that they do not wait for a scheduler already gone
    order = [n for n in pids if n != "scheduler"] + (["scheduler"] if "scheduler" in pids else [])
    stopped = []
    for name in order:
        pid = pids[name]
        if not _alive(pid):
            continue
        with _ignore_gone():
            os.killpg(pid, signal.SIGTERM)
        stopped.append(name)
    deadline = time.monotonic() + timeout
    for name in stopped:
        while _alive(pids[name]) and time.monotonic() < deadline:
            _reap(pids[name])
            time.sleep(0.2)
        if _alive(pids[name]):
            with _ignore_gone():
                os.killpg(pids[name], signal.SIGKILL)
            _reap(pids[name])
    (run / "pids.json").unlink(missing_ok=True)
    return stopped


def _reap(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class _ignore_gone:
    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        return typ is not None and issubclass(typ, ProcessLookupError)


def status(cfg) -> dict:
    """The scheduler's workers: ``{"scheduler", "dashboard", "workers": [...]}``."""
    from distributed import Client

    nodes = parse_nodes(cfg.dask.nodes)
    with Client(cfg.dask.scheduler, timeout=10, set_as_default=False) as client:
        info = client.scheduler_info()
        dash = client.dashboard_link
    workers = [{"name": str(w.get("name")), "address": a, "threads": w.get("nthreads"),
                "node_dir": str(nodes.get(str(w.get("name")), "")),
                "executing": w.get("metrics", {}).get("executing", 0)}
               for a, w in sorted(info["workers"].items(), key=lambda x: str(x[1].get("name")))]
    missing = [n for n in nodes if n not in {w["name"] for w in workers}]
    return {"scheduler": cfg.dask.scheduler, "dashboard": dash, "workers": workers,
            "missing": missing}


def exec_process(cmd, env):
    """Replace this process by ``cmd`` (the foreground commands systemd runs)."""
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)


# ---------------------------------------------------------------------------- command line
def _effective_config(cfg) -> Path:
    """The effective configuration written under run_dir (what the processes read
    through CONTIMG_CONFIG, command-line options included)."""
    from contimg.config import to_toml

    run = Path(cfg.dask.run_dir).absolute()
    run.mkdir(parents=True, exist_ok=True)
    path = run / "contimg.toml"
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(to_toml(cfg, sources=False))
    os.replace(tmp, path)
    return path


def cmd_cluster(args):
    cfg = args.cfg
    if args.verb == "up":
        pids = up(cfg, _effective_config(cfg))
        print(f"cluster up: scheduler {cfg.dask.scheduler} (pid {pids['scheduler']}); "
              f"workers {', '.join(f'{n} (pid {p})' for n, p in pids.items() if n != 'scheduler')}; "
              f"logs in {Path(cfg.dask.run_dir).absolute()}")
    elif args.verb == "down":
        stopped = down(cfg)
        print(f"cluster down: stopped {', '.join(stopped) or 'nothing (not running)'}")
    elif args.verb == "status":
        st = status(cfg)
        print(f"scheduler {st['scheduler']}; dashboard {st['dashboard']}")
        for w in st["workers"]:
            print(f"  {w['name']:<12} {w['address']:<24} threads {w['threads']}  "
                  f"node {w['node_dir'] or '-'}")
        if st["missing"]:
            print(f"  not connected: {', '.join(st['missing'])}")
        return 1 if st["missing"] else 0
    elif args.verb == "scheduler":
        exec_process(scheduler_command(cfg), dask_environment(cfg, _effective_config(cfg)))
    elif args.verb == "worker":
        exec_process(worker_command(cfg, args.node),
                     dask_environment(cfg, _effective_config(cfg)))
    return 0


def add_subcommands(sub):
    from contimg.config import add_options

    s = sub.add_parser("cluster", help="a Dask scheduler and one worker per node "
                       "([dask] nodes): up, down, status, scheduler, worker NODE")
    verbs = s.add_subparsers(dest="verb", required=True)
    v = verbs.add_parser("up", help="start the scheduler and every node's worker here")
    add_options(v, "dask.scheduler", "dask.worker_threads", "dask.worker_port",
                "dask.no_workers_timeout", "dask.task_log", "dask.run_dir")
    v = verbs.add_parser("down", help="stop what `cluster up` started")
    add_options(v, "dask.run_dir")
    v = verbs.add_parser("status", help="the scheduler's workers and their nodes")
    add_options(v, "dask.scheduler")
    v = verbs.add_parser("scheduler", help="run the scheduler in the foreground (systemd)")
    add_options(v, "dask.scheduler", "dask.no_workers_timeout", "dask.run_dir")
    v = verbs.add_parser("worker", help="run one node's worker in the foreground (systemd)")
    v.add_argument("node", help="the node's name in [dask] nodes")
    add_options(v, "dask.scheduler", "dask.worker_threads", "dask.worker_port",
                "dask.task_log", "dask.run_dir")
    s.set_defaults(func=cmd_cluster)


# ---------------------------------------------------------------------------- status
def stage_table(db, task_log=None) -> list[str]:
    """Lines for ``contimg status``: per stage, over the completed groups' last attempts,
    the median and total wall seconds from the database, and the CPU seconds per group
    from the workers' task records when ``[dask] task_log`` is set."""
    import statistics

    done = [g for g in db.groups() if g["state"] == "completed"]
    if not done:
        return []
    per: dict[str, list[float]] = {}
    for g in done:
        for t in db.timings(g["group_id"]):
            if t["attempt"] == g["attempts"] and t["status"] == "ok" and t["stage"] != "total":
                per.setdefault(t["stage"], []).append(float(t["seconds"] or 0.0))
    cpu = {}
    if task_log is not None and Path(task_log).is_dir():
        gids = {g["group_id"] for g in done}
        cpu = stage_cpu(task_records(log_dir=task_log), groups=gids)
    lines = [f"\nper stage over {len(done)} completed group(s):",
             f"  {'stage':<12} {'median s':>9} {'total s':>9} {'CPU s/group':>12}"]
    for stage, secs in per.items():
        c = cpu.get(stage)
        cs = f"{c['cpu_s'] / len(done):12.2f}" if c else f"{'-':>12}"
        lines.append(f"  {stage:<12} {statistics.median(secs):9.2f} {sum(secs):9.1f} {cs}")
    return lines
