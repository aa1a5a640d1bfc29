"""The ``contimg`` command line.

    contimg simulate --out DIR [--groups N] [--calibrator-group K] [shrink options]
    contimg info PATH...            open a group (files or a directory) and describe it
    contimg convert INPUT... --out DIR [--scheduler ADDRESS] [--placement FILE.json]
    contimg flag PATH.ms [--strategy FILE.toml] [--restore NAME] [--list]
    contimg stream --incoming DIR --output DIR [--scheduler ADDRESS]   the main job
    contimg backfill --incoming DIR --output DIR | --ms PATH...        what was missed
    contimg status [--db PATH]      the queue; contimg housekeeping: stale state, temporaries
    contimg calibrate PATH.ms [--catalog FILE] [--refant N] [--register] [--db PATH]   B/G tables
    contimg apply PATH.ms [TABLE...] [--db PATH]   write CORRECTED_DATA
    contimg demo [--out DIR]        the main job on embedded defaults (see README)
    contimg image INPUT... --out PREFIX [--size N --cell ARCSEC --niter K ...]
    contimg config show [--format toml|table]   the effective configuration and its sources

Settings come from contimg.config: defaults < a TOML file (contimg --config FILE, or
$CONTIMG_CONFIG) < the operators' environment variables < these options, each of
which is a configuration field (shown in its help as [section.field]).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("contimg.cli")


def _setup_logging(verbose: int):
    level = logging.WARNING if verbose < 0 else (logging.INFO if verbose == 0 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("distributed", "bokeh", "tornado", "numba"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    logging.getLogger("bokeh.server.util").setLevel(logging.ERROR)  # the dashboard's host note


def _add_sim_options(p):
    p.add_argument("--antennas", type=int, default=None, help="correlated antennas (default 96)")
    p.add_argument("--subbands", type=int, default=None, help="subbands per group (default 16)")
    p.add_argument("--channels", type=int, default=None,
                   help="channels per subband (default 48; fewer = wider channels)")
    p.add_argument("--integrations", type=int, default=None, help="integrations per group (24)")
    p.add_argument("--dec", type=float, default=None, help="pointing declination, degrees")
    p.add_argument("--sefd", type=float, default=None, help="system equivalent flux density, Jy")
    p.add_argument("--no-rfi", action="store_true", help="inject no interference")
    p.add_argument("--no-noise", action="store_true", help="no thermal noise")
    p.add_argument("--no-gains", action="store_true", help="unit gains and bandpass")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scale", type=float, default=None, metavar="F",
                   help="groups F times larger than the options above give (default a "
                        "full DSA-110 group), along --scale-axis")
    p.add_argument("--scale-axis", default="antennas", choices=("antennas", "channels", "times"),
                   help="what grows with --scale: antennas (baselines), channels per "
                        "subband, or integrations per group")


def _sim_config(args):
    from contimg.simulate import SimConfig

    kw = dict(seed=args.seed)
    for opt, key in (("antennas", "n_ant"), ("subbands", "n_subbands"), ("channels", "n_chan"),
                     ("integrations", "n_times"), ("dec", "dec_deg"), ("sefd", "sefd_jy")):
        v = getattr(args, opt)
        if v is not None:
            kw[key] = v
    if args.no_rfi:
        kw["rfi"] = None
    if args.no_noise:
        kw["noise"] = False
    if args.no_gains:
        kw["gains"] = False
    if getattr(args, "scale", None):
        from contimg.simulate import scaled

        return scaled(args.scale, args.scale_axis, SimConfig(**kw))
    return SimConfig(**kw)


def cmd_simulate(args):
    from contimg.simulate import simulate

    cfg = _sim_config(args)
    t0 = time.perf_counter()
    done = []

    def progress(sb):
        done.append(sb)
        log.info("wrote subband %02d (%d/%d)", sb, len(done) % cfg.n_subbands or cfg.n_subbands,
                 cfg.n_subbands)

    groups = simulate(args.out, n_groups=args.groups, start=args.start, cfg=cfg,
                      calibrator_group=args.calibrator_group, progress=progress)
    for g in groups:
        print(f"{g.stamp}: {len(g.files)} files, truth {g.truth}")
    print(f"simulated {len(groups)} group(s) in {time.perf_counter() - t0:.1f} s -> {args.out}")
    return 0


def _describe(ds) -> str:
    import numpy as np

    f = ds.frequency.values
    t = ds.time.values
    lines = [
        f"telescope      {ds.attrs.get('telescope_name')}",
        f"files          {len(ds.attrs.get('source_files', []))}"
        + (f" (missing subbands: {ds.attrs['missing_subbands']})"
           if ds.attrs.get("missing_subbands") else ""),
        f"integrations   {t.size} x {ds.time.attrs.get('integration_time', float('nan')):.6f} s",
        f"baselines      {ds.sizes['baseline_id']} ({ds.sizes['antenna_id']} antennas in table)",
        f"channels       {f.size}: {f[0] / 1e6:.4f} .. {f[-1] / 1e6:.4f} MHz ascending, "
        f"width {ds.frequency.attrs['channel_width'] / 1e3:.3f} kHz",
        f"polarizations  {', '.join(map(str, ds.polarization.values))}",
        f"phase centre   dec {np.degrees(np.median(ds.PHASE_CENTER_DEC.values)):.4f} deg (ICRS), "
        f"RA {np.degrees(ds.PHASE_CENTER_RA.values[0]):.4f} .. "
        f"{np.degrees(ds.PHASE_CENTER_RA.values[-1]):.4f} deg",
        f"visibilities   {ds.VISIBILITY.size / 1e6:.1f} M complex64 "
        f"({ds.VISIBILITY.nbytes / 2**30:.2f} GiB), chunks of "
        f"{max(ds.VISIBILITY.data.chunksize[2], 1)} channels",
    ]
    return "\n".join(lines)


def _quiet_distributed():
    """distributed sets its own per-module log levels; keep them at WARNING unless -v."""
    if logging.getLogger("contimg").getEffectiveLevel() <= logging.DEBUG:
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("distributed", "bokeh", "tornado")):
            logging.getLogger(name).setLevel(logging.WARNING)


def _client(cfg, config_file=None):
    """A client of ``[dask] scheduler``, else of a LocalCluster of ``[dask] workers``
    processes whose workers run :func:`contimg.runtime.configure` (preload) and read the
    same configuration file."""
    import dask
    from distributed import Client, LocalCluster

    _quiet_distributed()
    dask.config.set({"distributed.logging.distributed": "warning"})

    if cfg.dask.scheduler:
        return Client(cfg.dask.scheduler)
    workers = cfg.dask.workers
    n = max(1, (os.cpu_count() or 2) // workers)
    env = {"CONTIMG_CONFIG": str(Path(config_file).resolve())} if config_file else {}
    cluster = LocalCluster(n_workers=workers, threads_per_worker=n, processes=True,
                           dashboard_address=cfg.dask.dashboard_address, memory_limit="auto",
                           preload=["contimg.runtime"], env=env)
    return Client(cluster)


def cmd_info(args):
    from contimg.io.uvh5 import open_group, open_uvh5

    cfg = args.cfg
    paths = args.paths if len(args.paths) > 1 else args.paths[0]
    if isinstance(paths, str) and os.path.isfile(paths) and not args.group:
        ds = open_uvh5(paths)
    else:
        ds = open_group(paths, allow_missing=args.allow_missing,
                        n_subbands=cfg.stream.n_subbands)
    print(_describe(ds))
    if args.stats:
        from graphs.summary import group_summary

        with _client(cfg, args.config):
            s = group_summary(ds).compute()
        print(f"flagged        {float(s.flag_fraction) * 100:.2f} %")
    return 0


def _groups_from_inputs(inputs, tolerance):
    """DSA-110 groups and, each on its own, other UVH5 files (any telescope)."""
    from contimg.io.uvh5 import find_inputs

    return find_inputs(inputs, tolerance_s=tolerance)


def cmd_convert(args):
    from contimg.convert import convert_many, parse_placement

    st = args.cfg.stream
    groups = _groups_from_inputs(args.inputs, st.tolerance_s)
    if not groups:
        print(f"contimg convert: no UVH5 files in {', '.join(args.inputs)} (DSA-110 subbands "
              "*_sbNN.hdf5, or *.uvh5 / *.hdf5 / *.h5 files of any telescope)",
              file=sys.stderr)
        return 2
    placement = parse_placement(st.placement)
    t0 = time.perf_counter()
    total = len(groups)
    count = [0]

    def progress(stamp, summary, error):
        count[0] += 1
        if error:
            print(f"[{count[0]}/{total}] {stamp}: FAILED: {error}", flush=True)
        else:
            rate = summary["nbytes"] / summary["seconds"] / 2**20
            print(f"[{count[0]}/{total}] {stamp}: {summary['ms']} in {summary['seconds']:.1f} s "
                  f"({rate:.0f} MiB/s)", flush=True)

    with _client(args.cfg, args.config) as client:
        print(f"converting {total} group(s) on {client.dashboard_link or client.scheduler.address}"
              , flush=True)
        report = convert_many(client, groups, args.out, placement=placement,
                              overwrite=args.overwrite, in_flight=st.in_flight,
                              progress=progress, n_subbands=st.n_subbands,
                              allow_missing=args.allow_missing)
    wall = time.perf_counter() - t0
    print(f"\nsummary: {len(report.done)} converted, {len(report.failed)} failed, "
          f"{wall:.1f} s wall")
    for stamp, err in report.failed:
        print(f"  failed {stamp}: {err}")
    return 0 if not report.failed else 1


def cmd_flag(args):
    from contimg import flagging

    if args.list:
        for v in flagging.list_flag_versions(args.ms):
            print(f"{v['name']}: {v.get('comment', '')}")
        return 0
    if args.restore:
        flagging.restore_flags(args.ms, args.restore)
        print(f"restored flags of {args.ms} from version {args.restore!r}")
        return 0
    t0 = time.perf_counter()

    def progress(done, total):
        log.info("flags written: block %d/%d", done, total)

    summary_path = args.summary or flagging.default_summary_path(args.ms)
    s = flagging.flag_ms(args.ms, strategy=args.cfg.flag.strategy, backup=not args.no_backup,
                         backup_name=args.backup_name, progress=progress,
                         summary_path=summary_path)
    before, after = s["before"]["overall"], s["after"]["overall"]
    worst = sorted(s["after"]["antenna"].items(), key=lambda kv: -kv[1])[:5]
    print(f"{args.ms}: flagged {before * 100:.2f} % -> {after * 100:.2f} % "
          f"in {time.perf_counter() - t0:.1f} s")
    if s.get("backup"):
        name = s["backup"]["name"] if isinstance(s["backup"], dict) else s["backup"]
        print(f"  previous flags saved as version {name!r} "
              f"(restore: contimg flag {args.ms} --restore {name})")
    print("  most flagged antennas: " + ", ".join(f"{n} {f * 100:.1f} %" for n, f in worst))
    print(f"  summary: {summary_path}")
    return 0


def _install_stop(stream):
    import signal

    def handler(signum, frame):
        log.warning("signal %d: finishing the stage in progress, then stopping (the group "
                    "is re-queued and resumed on the next start)", signum)
        stream.stop()

    signal.signal(signal.SIGTERM, handler)


def _print_outcome(stream, db, t0):
    c = db.counts()
    print(f"\n{len(stream.completed)} group(s) completed, {len(stream.failed)} failed in "
          f"{time.perf_counter() - t0:.1f} s; queue now: "
          + ", ".join(f"{k} {v}" for k, v in c.items()))


def cmd_stream(args):
    from contimg.state import StateDB
    from contimg.stream import Stream, StreamConfig

    cfg = StreamConfig.from_config(args.cfg)
    db = StateDB(cfg.db_path)
    t0 = time.perf_counter()
    with _client(args.cfg, args.config) as client:
        print(f"contimg stream: {cfg.incoming} -> {cfg.output}; state {db.path}; "
              f"Dask {client.dashboard_link or client.scheduler.address}", flush=True)
        stream = Stream(cfg, client, db=db)
        _install_stop(stream)
        try:
            stream.run(until_idle=args.until_idle, timeout=args.timeout)
        except KeyboardInterrupt:
            stream.stop()
    _print_outcome(stream, db, t0)
    return 1 if stream.failed and not stream.completed else 0   # every group failed: say so


def cmd_backfill(args):
    from contimg.state import StateDB
    from contimg.stream import Stream, StreamConfig, output_lock, process_ms

    cfg = StreamConfig.from_config(args.cfg)
    db = StateDB(cfg.db_path)
    lock = output_lock(cfg.output)   # before any change: not while a stream serves it
    if args.retry_failed:
        for g in db.groups("failed"):
            db.transition(g["group_id"], "pending", expect="failed", retries=0,
                          reason="backfill --retry-failed")
    for gid in args.group or []:
        g = db.group(gid)
        if g is None:
            raise ValueError(f"group {gid}: not in {db.path}")
        db.requeue(gid, reason="backfill --group")
    t0 = time.perf_counter()
    with _client(args.cfg, args.config) as client:
        if args.ms:
            for ms in args.ms:
                res = process_ms(client, db, ms, cfg)
                print(f"{ms}: " + ", ".join(f"{k} {v.get('status')}" for k, v in res.items()))
            return 0
        lock.close()                 # the stream takes it again
        stream = Stream(cfg, client, db=db)
        stream.run(once=True)
    _print_outcome(stream, db, t0)
    return 0 if not stream.failed else 1


def _fmt_s(x):
    return "-" if x is None else f"{x:.1f}"


def cmd_status(args):
    rc = _print_status(args.cfg.paths.db, args.limit, args.json)
    if not args.json:   # per-stage timings (and the workers' CPU records, issue 16)
        from contimg.cluster import stage_table
        from contimg.state import StateDB

        print("\n".join(stage_table(StateDB(args.cfg.paths.db), args.cfg.dask.task_log)))
    return rc


def _print_status(path, limit, as_json):
    import json

    from contimg.state import StateDB

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no state database (pass --db, set PIPELINE_DB "
                                "or [paths] db)")
    db = StateDB(path)
    counts = db.counts()
    groups = db.groups()[-limit:] if limit else db.groups()
    if as_json:
        print(json.dumps({"db": str(db.path), "counts": counts, "groups": groups,
                          "calibration_sets": db.list_calsets()}, indent=1, default=str))
        return 0
    print(f"state database {db.path} (schema {db.version})")
    print("queue: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if groups:
        print(f"\n{'group':<20} {'state':<11} {'sb':>5} {'try':>3} {'total s':>7}  "
              f"stages (s)")
    for g in groups:
        stages = {t["stage"]: t for t in db.timings(g["group_id"])
                  if t["attempt"] == g["attempts"]}
        total = stages.pop("total", {}).get("seconds")
        st = " ".join(f"{k}={'skip' if v['status'] == 'skipped' else _fmt_s(v['seconds'])}"
                      + ("!" if v["status"] == "failed" else "") for k, v in stages.items())
        print(f"{g['group_id']:<20} {g['state']:<11} {g['n_present']:>2}/{g['n_expected']:<2} "
              f"{g['attempts']:>3} {_fmt_s(total):>7}  {st}")
        if g["error"] and g["state"] != "completed":
            print(f"{'':<20} reason: {g['error'][:300]}")
        elif g["missing"]:
            print(f"{'':<20} missing {', '.join(f'{s:02d}' for s in g['missing'])} "
                  "(processed with those subbands flagged)")
    bad = db.query("SELECT path, status, reason FROM hdf5_files WHERE status IN "
                   "('bad','duplicate','late') ORDER BY first_seen DESC LIMIT 20")
    if bad:
        print("\nfiles set aside:")
        for f in bad:
            print(f"  {f['status']:<9} {f['path']}: {f['reason'][:200]}")
    cal = db.list_calsets()
    if cal:
        print("\ncalibration sets:")
        for c in cal:
            print(f"  {c['name']} {c['status']} {c['calibrator'] or ''} refant {c['refant']}"
                  + (f": {c['reason']}" if c["reason"] else ""))
    return 0


def cmd_housekeeping(args):
    from contimg.state import StateDB
    from contimg.stream import housekeeping

    cfg = args.cfg
    db = StateDB(cfg.paths.db)
    rep = housekeeping(db, output=cfg.paths.output, stale_after_s=cfg.stream.stale_after_s,
                       collecting_timeout_s=cfg.stream.collecting_timeout_s,
                       tmp_age_s=cfg.stream.tmp_age_hours * 3600)
    print(f"housekeeping on {db.path}: {len(rep['resumed'])} stale in-progress group(s) back "
          f"to pending, {len(rep['expired'])} stale collecting group(s) failed, "
          f"{len(rep['removed'])} temporary path(s) removed")
    for k in ("resumed", "expired", "removed"):
        for item in rep[k]:
            print(f"  {k}: {item}")
    return 0


def cmd_demo(args):
    from contimg.simulate import SimConfig, simulate, write_calibrator_catalog
    from contimg.state import StateDB
    from contimg.stream import Stream, StreamConfig

    out = Path(args.out or tempfile.mkdtemp(prefix="contimg-demo-"))
    incoming = out / "incoming"
    cfg = SimConfig(n_ant=24, n_chan=12) if args.small else SimConfig()
    cal_group = min(1, args.groups - 1)
    print(f"contimg demo: simulating {args.groups} DSA-110 group(s) "
          f"({cfg.n_ant} antennas, {cfg.n_subbands}x{cfg.n_chan} channels, "
          f"{cfg.n_times} integrations; a calibrator transits in group {cal_group}) into "
          f"{incoming}", flush=True)
    t0 = time.perf_counter()
    groups = simulate(incoming, n_groups=args.groups, cfg=cfg, calibrator_group=cal_group)
    print(f"  simulated in {time.perf_counter() - t0:.1f} s", flush=True)
    # the simulated calibrator is not a real one: tell the pipeline about it as an
    # operator would (a CSV catalogue, as --catalog or $VLA_CATALOG)
    catalog = write_calibrator_catalog(groups, out / "calibrators.csv")
    print(f"  calibrator catalogue: {catalog}", flush=True)
    db = StateDB(out / "state" / "pipeline.sqlite3")
    # the simulated sky as a source catalogue, so the groups get forced photometry
    from contimg.catalog import load_into_db, write_sky_catalog

    load_into_db(db, write_sky_catalog(groups[0], out / "sky.csv"), name="simulated-sky")
    image = args.cfg.image
    if args.small:
        image = dataclasses.replace(image, npix=1024, cell_arcsec=12.0)
    scfg = StreamConfig.from_config(
        args.cfg, incoming=incoming, output=out / "products", db_path=db.path,
        n_subbands=cfg.n_subbands, min_subbands=min(cfg.n_subbands, args.cfg.stream.min_subbands),
        settle_s=0.5, poll_s=0.5, placement="any",
        catalog=None if catalog is None else str(catalog), image=image)
    t1 = time.perf_counter()
    with _client(args.cfg, args.config) as client:
        print(f"  Dask dashboard: {client.dashboard_link}\n  streaming "
              f"{incoming} -> {scfg.output} (log below)", flush=True)
        stream = Stream(scfg, client, db=db)
        stream.run(until_idle=True)
    print(f"\nprocessed {len(stream.completed)} group(s) in {time.perf_counter() - t1:.1f} s "
          f"({len(stream.failed)} failed)")
    _print_status(db.path, 0, False)
    print(f"\nproducts: {scfg.output}\n  Measurement Sets: {scfg.output / 'ms'}\n"
          f"  calibration:      {scfg.output / 'cal'}\n  images:           "
          f"{scfg.output / 'images'}\n  state database:   {db.path}  (contimg status --db "
          f"{db.path})\n  simulated input and truth: {incoming}")
    return 0 if not stream.failed and len(stream.completed) == len(groups) else 1


def cmd_config(args):
    """``contimg config show``: the effective configuration and where each value came from."""
    from contimg.config import to_table, to_toml

    print(to_toml(args.cfg) if args.format == "toml" else to_table(args.cfg), end="")
    return 0


STREAM_OPTIONS = (
    "paths.incoming", "paths.output", "paths.db", "dask.scheduler", "dask.workers",
    "stream.n_subbands", "stream.tolerance_s", "stream.poll_s", "stream.settle_s",
    "stream.bad_file_grace_s", "stream.group_timeout_s", "stream.incomplete",
    "stream.min_subbands", "stream.in_flight", "stream.image_slots", "stream.max_retries",
    "stream.stale_after_s", "stream.skip", "stream.placement", "flag.strategy_file",
    "calibrate.catalog", "calibrate.refant", "image.npix", "image.cell_arcsec", "image.niter",
    "stream.memory_limit",
)


def build_parser():
    from contimg.config import add_options

    p = argparse.ArgumentParser(prog="contimg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="configuration file (TOML, a table per section; default "
                        "$CONTIMG_CONFIG); see `contimg config show`")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="write simulated DSA-110 UVH5 groups")
    s.add_argument("--out", required=True, help="directory for the subband files")
    s.add_argument("--groups", type=int, default=1)
    s.add_argument("--start", default="2026-01-15T08:00:00", help="UTC start of the first group")
    s.add_argument("--calibrator-group", type=int, default=None,
                   help="index of the group in which a bright calibrator transits")
    _add_sim_options(s)
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("info", help="open UVH5 files (one file or a group) and describe them")
    s.add_argument("paths", nargs="+")
    s.add_argument("--group", action="store_true", help="treat a single file as a group")
    s.add_argument("--allow-missing", action="store_true",
                   help="fill missing subbands with flagged data instead of failing")
    s.add_argument("--stats", action="store_true", help="also compute flag statistics")
    add_options(s, "stream.n_subbands", "dask.scheduler")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("convert", help="convert UVH5 (DSA-110 subband groups, or single files of "
                       "any telescope: <stem>.ms) to Measurement Sets",
                       description="Convert UVH5 to Measurement Sets in --out: DSA-110 "
                       "subband files (*_sbNN.hdf5) grouped by time into <timestamp>.ms, "
                       "and any other UVH5 file (any telescope; telescope, antennas and "
                       "phase centres from the file) into <stem>.ms.")
    s.add_argument("inputs", nargs="+", help="directories and/or UVH5 files (DSA-110 subband "
                   "groups or single files of any telescope)")
    s.add_argument("--out", required=True, help="directory for the Measurement Sets")
    s.add_argument("--allow-missing", action="store_true",
                   help="convert incomplete groups, missing subbands flagged")
    s.add_argument("--overwrite", action="store_true", help="replace existing Measurement Sets")
    add_options(s, "dask.scheduler", "dask.workers", "stream.placement", "stream.n_subbands",
                "stream.in_flight", "stream.tolerance_s")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("flag", help="flag RFI in an existing Measurement Set, in place")
    s.add_argument("ms", help="the Measurement Set")
    s.add_argument("--backup-name", default=None,
                   help="name of the flag version that keeps the previous flags "
                        "(default contimg_flag_N, in <ms>.flagversions as CASA's flagmanager)")
    s.add_argument("--no-backup", action="store_true", help="do not keep the previous flags")
    s.add_argument("--summary", default=None,
                   help="where to write the JSON flag summary (default <ms>.flag_summary.json)")
    s.add_argument("--restore", default=None, metavar="NAME",
                   help="restore the flags saved as version NAME instead of flagging")
    s.add_argument("--list", action="store_true", help="list the saved flag versions")
    add_options(s, "flag.strategy_file")
    s.set_defaults(func=cmd_flag)

    s = sub.add_parser("stream", help="the streaming service: watch, group, process, register")
    add_options(s, *STREAM_OPTIONS)
    s.add_argument("--until-idle", action="store_true",
                   help="exit once nothing is collecting, pending or in progress")
    s.add_argument("--timeout", type=float, default=None, help="exit after this many seconds")
    s.set_defaults(func=cmd_stream)

    s = sub.add_parser("backfill", help="process what is already on disk and was missed")
    add_options(s, *STREAM_OPTIONS)
    s.add_argument("--retry-failed", action="store_true",
                   help="also re-queue every failed group")
    s.add_argument("--group", action="append", help="re-queue this group (repeatable)")
    s.add_argument("--ms", nargs="+", default=None,
                   help="run the stages after conversion on these Measurement Sets instead")
    s.set_defaults(func=cmd_backfill)

    s = sub.add_parser("status", help="print the queue and the recent groups")
    add_options(s, "paths.db")
    s.add_argument("--limit", type=int, default=20, help="groups to list (0: all)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("housekeeping", help="reset stale groups, expire stale collecting "
                                             "groups, remove old temporary outputs")
    add_options(s, "paths.db", "paths.output", "stream.stale_after_s",
                "stream.collecting_timeout_s", "stream.tmp_age_hours")
    s.set_defaults(func=cmd_housekeeping)

    from contimg.calibrate import add_subcommands as _calibration_subcommands

    _calibration_subcommands(sub)  # contimg calibrate / contimg apply (issue 5)
    from contimg.science import add_subcommands as _science_subcommands

    _science_subcommands(sub)  # catalog, photometry, sources, mosaic (issue 15)

    s = sub.add_parser("demo", help="the main job on embedded defaults (simulated data)")
    s.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    s.add_argument("--groups", type=int, default=3)
    s.add_argument("--small", action="store_true", help="shrunken groups, for a quick look")
    add_options(s, "dask.scheduler")
    s.set_defaults(func=cmd_demo)

    from contimg.imaging import add_image_parser

    add_image_parser(sub)

    s = sub.add_parser("config", help="the configuration: `contimg config show`")
    verbs = s.add_subparsers(dest="verb", required=True)
    v = verbs.add_parser("show", help="print the effective configuration and where each "
                         "value came from (default, file:PATH, env:NAME, cli)")
    v.add_argument("--format", choices=("toml", "table"), default="toml",
                   help="toml (loads back as a configuration file) or an aligned table")
    v.set_defaults(func=cmd_config)

    from contimg.cluster import add_subcommands as _cluster_subcommands

    _cluster_subcommands(sub)  # contimg cluster up|down|status|scheduler|worker (issue 16)
    from contimg.app.cli import add_subcommands as _app_subcommands

    _app_subcommands(sub)  # contimg app / users, demo --app (issue 14; after "demo")
    return p


def main(argv=None):
    from contimg import config, runtime

    args = build_parser().parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        # every handler finds the effective configuration in args.cfg; library calls
        # in this process see it too (config.current), until main returns
        args.cfg = config.from_args(args)
        prev = config.use(args.cfg)
        try:
            runtime.configure()
            return args.func(args)
        finally:
            config.use(prev)
    except (ValueError, OSError) as exc:
        # bad input: one clear line, no traceback (use -v for one)
        if args.verbose:
            raise
        print(f"contimg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
