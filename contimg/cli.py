"""The ``contimg`` command line.

    contimg simulate --out DIR [--groups N] [--calibrator-group K] [shrink options]
    contimg info PATH...            open a group (files or a directory) and describe it
    contimg convert INPUT... --out DIR [--scheduler ADDRESS] [--placement FILE.json]
    contimg flag PATH.ms [--strategy FILE.toml] [--restore NAME] [--list]
    contimg demo [--out DIR]        the main job on embedded defaults (see README)
"""

from __future__ import annotations

import argparse
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


def _client(scheduler):
    import dask
    from distributed import Client, LocalCluster

    _quiet_distributed()
    dask.config.set({"distributed.logging.distributed": "warning"})

    if scheduler:
        return Client(scheduler)
    n = max(1, (os.cpu_count() or 2))
    cluster = LocalCluster(n_workers=1, threads_per_worker=n, processes=True,
                           dashboard_address=":0", memory_limit="auto")
    return Client(cluster)


def cmd_info(args):
    from contimg.io.uvh5 import open_group, open_uvh5

    paths = args.paths if len(args.paths) > 1 else args.paths[0]
    if isinstance(paths, str) and os.path.isfile(paths) and not args.group:
        ds = open_uvh5(paths)
    else:
        ds = open_group(paths, allow_missing=args.allow_missing, n_subbands=args.subbands)
    print(_describe(ds))
    if args.stats:
        from graphs.summary import group_summary

        with _client(args.scheduler):
            s = group_summary(ds).compute()
        print(f"flagged        {float(s.flag_fraction) * 100:.2f} %")
    return 0


def _groups_from_inputs(inputs, tolerance):
    from contimg.io.uvh5 import find_groups

    groups = []
    loose = []
    for item in inputs:
        if os.path.isdir(item):
            groups.extend(find_groups(item, tolerance_s=tolerance))
        elif os.path.exists(item):
            loose.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    if loose:
        # group loose files by their names, as find_groups does for a directory
        from contimg import telescope as tel

        named = sorted(loose, key=lambda p: tel.parse_subband_filename(p).timestamp)
        cur = []
        for p in named:
            ts = tel.parse_subband_filename(p).timestamp
            if cur and (ts - tel.parse_subband_filename(cur[0]).timestamp).total_seconds() \
                    > tolerance:
                groups.append(cur)
                cur = []
            cur.append(p)
        if cur:
            groups.append(cur)
    return groups


def cmd_convert(args):
    import json

    from contimg.convert import convert_many

    groups = _groups_from_inputs(args.inputs, args.tolerance)
    if not groups:
        print("contimg convert: no subband files found", file=sys.stderr)
        return 2
    placement = None
    if args.placement == "any":
        placement = "any"
    elif args.placement:
        with open(args.placement) as fh:
            placement = json.load(fh)
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

    with _client(args.scheduler) as client:
        print(f"converting {total} group(s) on {client.dashboard_link or client.scheduler.address}"
              , flush=True)
        report = convert_many(client, groups, args.out, placement=placement,
                              overwrite=args.overwrite, in_flight=args.in_flight,
                              progress=progress, n_subbands=args.subbands,
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
    s = flagging.flag_ms(args.ms, strategy=args.strategy, backup=not args.no_backup,
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


def cmd_demo(args):
    from contimg.convert import convert_many
    from contimg.io.uvh5 import open_group
    from contimg.simulate import SimConfig, simulate
    from graphs.flag import flag_dataset, flag_summary
    from graphs.summary import group_summary

    out = Path(args.out or tempfile.mkdtemp(prefix="contimg-demo-"))
    incoming = out / "incoming"
    cfg = SimConfig(n_ant=24, n_chan=12) if args.small else SimConfig()
    print(f"contimg demo: simulating {args.groups} DSA-110 group(s) "
          f"({cfg.n_ant} antennas, {cfg.n_subbands}x{cfg.n_chan} channels, "
          f"{cfg.n_times} integrations; calibrator transits in group 0) into {incoming}",
          flush=True)
    t0 = time.perf_counter()
    groups = simulate(incoming, n_groups=args.groups, cfg=cfg, calibrator_group=0)
    print(f"  simulated in {time.perf_counter() - t0:.1f} s", flush=True)
    with _client(args.scheduler) as client:
        print(f"  Dask dashboard: {client.dashboard_link}", flush=True)
        for g in groups:
            t1 = time.perf_counter()
            ds = open_group(g.files, n_subbands=cfg.n_subbands)
            print(f"\ngroup {g.stamp}\n" + _describe(ds), flush=True)
            s = group_summary(ds).compute()
            f = flag_summary(flag_dataset(ds)).compute()
            print(f"  read, summarised and RFI-flagged on the cluster in "
                  f"{time.perf_counter() - t1:.1f} s: mean |V| (cross) "
                  f"{float(s.mean_cross_amplitude_per_channel.mean()):.3f}, "
                  f"flagged {float(f.flag_fraction) * 100:.2f} %", flush=True)
        t2 = time.perf_counter()
        report = convert_many(client, [[str(p) for p in g.files] for g in groups],
                              out / "ms", placement=None, n_subbands=cfg.n_subbands)
        for stamp, summary in report.done:
            print(f"  MS {summary['ms']} ({summary['seconds']:.1f} s)")
        for stamp, err in report.failed:
            print(f"  FAILED {stamp}: {err}")
        print(f"  converted {len(report.done)} group(s) in {time.perf_counter() - t2:.1f} s")
    print(f"\nproducts: {out}\n  subband files and truth: {incoming}\n"
          f"  Measurement Sets:        {out / 'ms'}")
    return 0 if not report.failed else 1


def build_parser():
    p = argparse.ArgumentParser(prog="contimg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
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
    s.add_argument("--subbands", type=int, default=16, help="subbands expected in a group")
    s.add_argument("--allow-missing", action="store_true",
                   help="fill missing subbands with flagged data instead of failing")
    s.add_argument("--stats", action="store_true", help="also compute flag statistics")
    s.add_argument("--scheduler", default=None, help="address of a Dask scheduler")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("convert", help="convert groups of UVH5 subband files to Measurement Sets")
    s.add_argument("inputs", nargs="+", help="directories and/or subband files")
    s.add_argument("--out", required=True, help="directory for the Measurement Sets")
    s.add_argument("--scheduler", default=None,
                   help="address of a Dask scheduler (default: a LocalCluster)")
    s.add_argument("--placement", default=None,
                   help="JSON file {worker name|address|host: [directories]} saying which "
                        "worker reads which files; 'any' for no restriction; default: ask "
                        "each worker which files it can open")
    s.add_argument("--subbands", type=int, default=16, help="subbands per group (16)")
    s.add_argument("--allow-missing", action="store_true",
                   help="convert incomplete groups, missing subbands flagged")
    s.add_argument("--overwrite", action="store_true", help="replace existing Measurement Sets")
    s.add_argument("--in-flight", type=int, default=2, help="groups converted at once")
    s.add_argument("--tolerance", type=float, default=60.0,
                   help="file-name timestamps of one group differ by at most this (s)")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("flag", help="flag RFI in an existing Measurement Set, in place")
    s.add_argument("ms", help="the Measurement Set")
    s.add_argument("--strategy", default=None,
                   help="flagging strategy: a TOML file (keys of graphs.flag.FlagStrategy); "
                        "default: the DSA-110 defaults")
    s.add_argument("--backup-name", default=None,
                   help="name of the flag version that keeps the previous flags "
                        "(default contimg_flag_N, in <ms>.flagversions as CASA's flagmanager)")
    s.add_argument("--no-backup", action="store_true", help="do not keep the previous flags")
    s.add_argument("--summary", default=None,
                   help="where to write the JSON flag summary (default <ms>.flag_summary.json)")
    s.add_argument("--restore", default=None, metavar="NAME",
                   help="restore the flags saved as version NAME instead of flagging")
    s.add_argument("--list", action="store_true", help="list the saved flag versions")
    s.set_defaults(func=cmd_flag)

    s = sub.add_parser("demo", help="the main job on embedded defaults (simulated data)")
    s.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    s.add_argument("--groups", type=int, default=1)
    s.add_argument("--small", action="store_true", help="a shrunken group, for a quick look")
    s.add_argument("--scheduler", default=None, help="address of a Dask scheduler")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        # bad input: one clear line, no traceback (use -v for one)
        if args.verbose:
            raise
        print(f"contimg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
