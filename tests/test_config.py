"""The configuration: defaults < TOML file < environment < command line, field by field;
every CLI option is a configuration field; only contimg/config.py reads the
environment; `contimg config show` loads back; bad values are named; importing contimg
changes no global state."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from contimg import config as C
from contimg.config import ConfigError, ImageConfig, load_config

ROOT = Path(__file__).resolve().parents[1]

#: a valid text for every operator environment variable, and the value it must give
ENV_SAMPLES = {
    "PIPELINE_DB": ("/data/db.sqlite3", Path("/data/db.sqlite3")),
    "PIPELINE_STATE_DIR": ("/data/state", Path("/data/state")),
    "PIPELINE_POINTING_DEC_DEG": ("30.5", 30.5),
    "VLA_CATALOG": ("/data/cal.csv", "/data/cal.csv"),
    "CAL_MATCH_RADIUS_DEG": ("0.25", 0.25),
    "CAL_MATCH_TOPN": ("2", 2),
    "IMG_IMSIZE": ("512", 512),
    "IMG_ROBUST": ("-0.5", -0.5),
    "IMG_NITER": ("123", 123),
    "IMG_THRESHOLD": ("0.5mJy", 5e-4),
    "SCHED_MOSAIC_HOUR_UTC": ("14", 14),
    "CONTIMG_APP_COOKIE_SECRET": ("s3cret", "s3cret"),
}


def _get(cfg, key):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def test_defaults_are_the_documented_ones():
    cfg = load_config(env={})
    assert set(cfg.provenance.values()) == {"default"}
    assert cfg.paths.db == Path("state/db/pipeline.sqlite3")
    assert cfg.image.npix == 2048 and cfg.image.niter == 1000 and cfg.image.robust == 0.0
    assert cfg.image.threshold == 0.0 and cfg.image.w_loss == 3e-3 and cfg.image.mgain == 0.8
    assert cfg.stream.image_mgain == 0.9 and cfg.stream.n_subbands == 16
    assert cfg.calibrate.match_radius_deg == 1.5 and cfg.calibrate.match_topn == 3
    assert cfg.science.photometry_pb_cut == 0.2 and cfg.science.mosaic_hour_utc is None
    assert cfg.app.port == 5006 and cfg.app.login_max_failures == 5
    from graphs.flag import FlagStrategy

    assert cfg.flag.strategy == FlagStrategy() and cfg.flag.threshold == 6.0
    assert load_config(env={}) == C.Config(paths=C.PathsConfig(db=cfg.paths.db))


def test_the_defaults_the_libraries_still_declare_agree():
    """Where a library keeps a literal default for direct callers, it is the config's."""
    from contimg.calibrate import solve_dataset
    from kernels.weighting import WEIGHTINGS

    sig = inspect.signature(solve_dataset).parameters
    c = C.CalibrateConfig()
    for name in ("gain_interval", "gain_mode", "min_snr"):
        assert sig[name].default == getattr(c, name), name
    weighting = next(f for f in dataclasses.fields(ImageConfig) if f.name == "weighting")
    assert set(weighting.metadata["choices"]) == set(WEIGHTINGS)


def test_precedence_field_by_field(tmp_path):
    strat = tmp_path / "strategy.toml"
    strat.write_text("threshold = 4.0\n")
    f = tmp_path / "contimg.toml"
    f.write_text(f"""
[paths]
output = "/data/products"
db = "/file/db.sqlite3"
[image]
npix = 1024
niter = 200
robust = -1.0
w_mode = "wstack"
[stream]
skip = ["image"]
in_flight = 3
[flag]
threshold = 5.0
mad_clip = 6.0
strategy_file = "{strat}"
[calibrate]
match_topn = 5
match_radius_deg = 2.0
[science]
mosaic_hour_utc = 3
""")
    env = {"IMG_NITER": "300", "IMG_ROBUST": "0.5", "IMG_THRESHOLD": "0.5mJy",
           "PIPELINE_DB": "/env/db.sqlite3", "CAL_MATCH_RADIUS_DEG": "0.75",
           "SCHED_MOSAIC_HOUR_UTC": "4", "CONTIMG_APP_COOKIE_SECRET": "k"}
    cli = {"image.niter": 400, "stream.in_flight": 4, "paths.incoming": "/data/in"}
    cfg = load_config(f, env=env, overrides=cli)
    file = f"file:{f}"
    expect = {
        # key: (value, source)
        "image.niter": (400, "cli"),                   # default < file < env < cli
        "image.robust": (0.5, "env:IMG_ROBUST"),       # file < env
        "image.npix": (1024, file),                    # file only
        "image.threshold": (5e-4, "env:IMG_THRESHOLD"),
        "image.w_mode": ("wstack", file),
        "image.cell_arcsec": (6.0, "default"),
        "paths.db": (Path("/env/db.sqlite3"), "env:PIPELINE_DB"),
        "paths.output": (Path("/data/products"), file),
        "paths.incoming": (Path("/data/in"), "cli"),
        "stream.skip": (frozenset({"image"}), file),
        "stream.in_flight": (4, "cli"),
        "stream.poll_s": (2.0, "default"),
        "flag.threshold": (4.0, f"file:{strat}"),      # the strategy file over [flag]
        "flag.mad_clip": (6.0, file),
        "flag.rho": (1.5, "default"),
        "calibrate.match_topn": (5, file),
        "calibrate.match_radius_deg": (0.75, "env:CAL_MATCH_RADIUS_DEG"),
        "science.mosaic_hour_utc": (4, "env:SCHED_MOSAIC_HOUR_UTC"),
        "app.cookie_secret": ("k", "env:CONTIMG_APP_COOKIE_SECRET"),
        "app.port": (5006, "default"),
    }
    for key, (value, source) in expect.items():
        assert _get(cfg, key) == value, key
        assert cfg.provenance[key] == source, key
    assert cfg.flag.strategy.threshold == 4.0 and cfg.flag.strategy.mad_clip == 6.0
    # the file named by CONTIMG_CONFIG when no path is given; an explicit path wins
    other = tmp_path / "other.toml"
    other.write_text("[image]\nnpix = 256\n")
    assert load_config(env={"CONTIMG_CONFIG": str(f)}).image.npix == 1024
    assert load_config(other, env={"CONTIMG_CONFIG": str(f)}).image.npix == 256
    # the database follows the state directory unless set
    cfg = load_config(env={"PIPELINE_STATE_DIR": "/st"})
    assert cfg.paths.db == Path("/st/db/pipeline.sqlite3")
    assert cfg.provenance["paths.db"] == "env:PIPELINE_STATE_DIR"


@pytest.mark.parametrize("var", sorted(ENV_SAMPLES))
def test_every_operator_variable_keeps_its_meaning(var):
    text, value = ENV_SAMPLES[var]
    key = C.ENVIRONMENT[var]
    cfg = load_config(env={var: text})
    assert _get(cfg, key) == pytest.approx(value) if isinstance(value, float) else \
        _get(cfg, key) == value
    assert cfg.provenance[key] == f"env:{var}"
    assert load_config(env={var: ""}) == load_config(env={})   # empty: not set


def test_the_variables_are_the_designs():
    assert set(C.ENVIRONMENT) == set(ENV_SAMPLES)


def test_library_defaults_follow_the_environment(monkeypatch, tmp_path):
    from contimg import imaging, sky, state

    monkeypatch.delenv("CONTIMG_CONFIG", raising=False)
    monkeypatch.setenv("IMG_IMSIZE", "256")
    monkeypatch.setenv("PIPELINE_DB", str(tmp_path / "x.sqlite3"))
    monkeypatch.setenv("CAL_MATCH_TOPN", "7")
    assert imaging.default_options()["npix"] == 256
    assert imaging.image_config(None, {"niter": 5}) == ImageConfig(npix=256, niter=5)
    assert state.default_db_path() == tmp_path / "x.sqlite3"
    assert sky.match_topn() == 7
    # a configuration installed with use() wins until it is removed
    prev = C.use(load_config(env={}))
    try:
        assert imaging.default_options()["npix"] == 2048 and sky.match_topn() == 3
    finally:
        C.use(prev)
    assert sky.match_topn() == 7


def test_calibration_defaults_come_from_the_configuration(tmp_path, monkeypatch):
    """calibrate_ms (the stream's calibrate stage calls it on a worker) takes the
    [calibrate] solver settings of the file the worker's CONTIMG_CONFIG names."""
    from contimg.calibrate import configured_solver_options

    monkeypatch.delenv("CONTIMG_CONFIG", raising=False)
    assert configured_solver_options() == dict(gain_interval=1, gain_mode="ap", min_snr=3.0)
    f = tmp_path / "c.toml"
    f.write_text('[calibrate]\ngain_mode = "p"\nmin_snr = 5\n')
    monkeypatch.setenv("CONTIMG_CONFIG", str(f))
    assert configured_solver_options(min_snr=2.0, max_iter=9) == dict(
        gain_interval=1, gain_mode="p", min_snr=2.0, max_iter=9)
    assert configured_solver_options()["min_snr"] == 5.0


def test_image_keyword_overrides():
    from contimg.imaging import image_config

    base = ImageConfig(npix=512, niter=10)
    c = image_config(base, {"niter": 20, "robust": None, "smear_radius_deg": 1.0})
    assert (c.npix, c.niter, c.robust, c.smear_radius_deg) == (512, 20, 0.0, 1.0)
    assert image_config(c, {"smear_radius_deg": None}).smear_radius_deg is None
    with pytest.raises(TypeError, match="nitre"):
        image_config(base, {"nitre": 3})
    with pytest.raises(ValueError, match="weighting"):
        image_config(base, {"weighting": "robust"})
    with pytest.raises(ValueError, match="npix must be even"):
        ImageConfig(npix=511)
    with pytest.raises(ValueError, match="niter"):
        ImageConfig(niter="many")


def test_stream_config_from_the_configuration(tmp_path):
    from contimg.stream import StreamConfig

    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({"node1": ["/data/a"]}))
    cfg = load_config(env={"VLA_CATALOG": "/c.csv"}, overrides={
        "paths.incoming": tmp_path / "in", "paths.output": tmp_path / "out",
        "stream.placement": str(nodes), "stream.poll_s": 0.5, "calibrate.refant": 3,
        "image.npix": 512, "flag.strategy_file": None})
    sc = StreamConfig.from_config(cfg)
    assert sc.incoming == tmp_path / "in" and sc.db_path == Path(cfg.paths.db).absolute()
    assert sc.poll_s == 0.5 and sc.placement == {"node1": ["/data/a"]}
    assert sc.catalog == "/c.csv" and sc.refant == 3 and sc.flag_strategy == cfg.flag.strategy
    assert sc.image_options["npix"] == 512 and sc.image_options["mgain"] == 0.9
    assert "grid_tasks" not in sc.image_options        # left to the image stage
    assert StreamConfig.from_config(cfg, placement=None).placement is None
    with pytest.raises(ValueError, match="incoming"):
        StreamConfig.from_config(load_config(env={}))
    bad = load_config(env={}, overrides={"stream.placement": str(tmp_path / "none.json"),
                                         "paths.incoming": "i", "paths.output": "o"})
    with pytest.raises(ValueError, match="none.json"):
        StreamConfig.from_config(bad)


# ---------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, match", [
    ("[image]\nnitre = 5\n", r"unknown key 'nitre' in \[image\] \(did you mean 'niter'\?\)"),
    ("[imaging]\nniter = 5\n", r"unknown section \[imaging\] \(did you mean 'image'\?\)"),
    ("[image]\nniter = 'many'\n", r"\[image\] niter: 'many' is not an integer"),
    ("[image]\nniter = 1.5\n", r"\[image\] niter: 1.5 is not an integer"),
    ("[stream]\npoll_s = true\n", r"\[stream\] poll_s: True is not a number"),
    ("[image]\nweighting = 'robust'\n", r"weighting: 'robust' not one of natural"),
    ("[stream]\nskip = ['image', 'flagging']\n", r"skip: 'flagging' not one of"),
    ("[stream]\nmin_subbands = 13\nn_subbands = 12\n", r"\[stream\]: min_subbands=13"),
    ("[flag]\ntreshold = 5.0\n", r"unknown key 'treshold' in \[flag\]"),
    ("[flag]\nsir_eta_time = 1.5\n", r"\[flag\]: invalid FlagStrategy: sir_eta_time"),
    ("image = 3\n", r"'image' must be a table"),
    ("[image\n", r"not valid TOML"),
])
def test_bad_file_values_are_named(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(f, env={})
    assert "bad.toml" in str(err.value) or "[stream]" in str(err.value) \
        or "[flag]" in str(err.value)


@pytest.mark.parametrize("var, text, match", [
    ("IMG_NITER", "many", r"IMG_NITER='many' \(image.niter\): 'many' is not an integer"),
    ("IMG_THRESHOLD", "5 parsecs", r"IMG_THRESHOLD='5 parsecs' \(image.threshold\)"),
    ("CAL_MATCH_TOPN", "0", r"match_topn must be >= 1.*env:CAL_MATCH_TOPN"),
    ("CAL_MATCH_RADIUS_DEG", "wide", r"CAL_MATCH_RADIUS_DEG='wide'.* is not a number"),
    ("SCHED_MOSAIC_HOUR_UTC", "25", r"mosaic_hour_utc must be 0..23"),
    ("CONTIMG_CONFIG", "/no/such.toml", r"CONTIMG_CONFIG=/no/such.toml: no such file"),
])
def test_bad_environment_values_are_named(var, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(env={var: text})


def test_bad_values_on_the_command_line(tmp_path, capsys):
    from contimg.cli import main

    with pytest.raises(SystemExit):
        main(["image", "x.ms", "--out", "o", "--size", "big"])
    assert "argument --size/--imsize: 'big' is not an integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["stream", "--skip", "image,paint"])
    assert "'paint' not one of" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "none.toml"), "config", "show"]) == 2
    assert "none.toml: no such file" in capsys.readouterr().err
    strat = tmp_path / "s.toml"
    strat.write_text("thresh = 3\n")
    assert main(["flag", "x.ms", "--strategy", str(strat)]) == 2
    assert "unknown key 'thresh' in [flag] (did you mean 'threshold'?)" in \
        capsys.readouterr().err


# ---------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------

#: options that say what to do in this invocation (inputs, outputs, actions), not how
#: the pipeline behaves; every other option must be a configuration field
INVOCATION = {
    "": {"help", "verbose", "quiet", "config", "command"},
    "simulate": {"*"},                          # the simulator's own settings (SimConfig)
    "info": {"paths", "group", "allow_missing", "stats"},
    "convert": {"inputs", "out", "allow_missing", "overwrite"},
    "flag": {"ms", "backup_name", "no_backup", "summary", "restore", "list"},
    "stream": {"until_idle", "timeout"},
    "backfill": {"retry_failed", "group", "ms"},
    "status": {"limit", "json"},
    "housekeeping": set(),
    "calibrate": {"ms", "out_dir", "name", "register", "json"},
    "apply": {"ms", "tables"},
    "demo": {"out", "groups", "small", "app"},
    "image": {"input", "out"},
    "config": {"verb"},
    "config show": {"format"},
    # science products (issue 15)
    "catalog": {"catalog_cmd"},
    "catalog load": {"files", "name"},
    "photometry": {"images", "catalog", "csv"},
    "sources": {"sources_cmd"},
    "sources list": {"sort", "min_eta", "limit"},
    "sources show": {"source"},
    "sources scales": {"tolerance", "limit"},
    "sources candidates": {"all_presets", "min_score", "limit"},
    "mosaic": {"mosaic_cmd"},
    "mosaic plan": {"name", "since", "until"},
    "mosaic build": {"name", "output", "pb_min", "cell"},
    "mosaic list": set(),
    "simulate-campaign": {"*"},                 # the campaign's own settings
    # operator app (issue 14)
    "app": set(),
    "users": set(),
    "users add": {"name", "role", "no_password"},
    "users remove": {"name"},
    "users passwd": {"name"},
    "users token": {"name", "label"},
    "users revoke": {"name", "id"},
    "users role": {"name", "role"},
    "users list": set(),
    # a real cluster (issue 16)
    "cluster": set(), "cluster up": set(), "cluster down": set(), "cluster status": set(),
    "cluster scheduler": set(), "cluster worker": {"node"},
}


def _walk(parser, name=""):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _walk(p, f"{name} {sub}".strip())


def test_every_cli_option_maps_to_a_configuration_field():
    from contimg.cli import build_parser

    exposed, commands = set(), set()
    for cmd, parser in _walk(build_parser()):
        commands.add(cmd)
        allowed = INVOCATION[cmd]
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) \
                    and action.dest in ("help", "command", "verb"):
                continue
            if "." not in action.dest:
                assert "*" in allowed or action.dest in allowed, \
                    f"contimg {cmd} {action.option_strings or action.dest}: not a " \
                    "configuration field (add it to contimg.config, or to INVOCATION " \
                    "if it only says what to do)"
                continue
            section, field = action.dest.split(".")
            spec = C._spec(section, field, "test")
            assert set(action.option_strings) <= set(spec.md["flags"]), action.dest
            assert action.default is argparse.SUPPRESS, action.dest   # no second default
            exposed.add(action.dest)
    assert commands == set(INVOCATION)
    # and every field that declares a flag is on some command
    flagged = {f"{s}.{n}" for s, cls in C.SECTIONS.items()
               for n, spec in C._own_specs(cls).items() if spec.md.get("flags")}
    assert flagged == exposed


POSITIONAL = {"info": ["d"], "convert": ["d", "--out", "o"], "flag": ["x.ms"], "calibrate": ["x.ms"],
              "apply": ["x.ms"], "image": ["x.ms", "--out", "o"], "catalog load": ["c.csv"],
              "photometry": ["g-image.fits"], "sources show": ["s"],
              "mosaic plan": ["--name", "n", "--since", "0", "--until", "1"],
              "mosaic build": ["n"], "simulate-campaign": ["--out", "o"],
              "users add": ["n", "--role", "viewer"], "users remove": ["n"],
              "users passwd": ["n"], "users token": ["n"], "users revoke": ["n"],
              "users role": ["n", "viewer"], "cluster worker": ["n"]}


def _sample(spec, tmp_path):
    base, container, _ = C._unpack(spec.hint)
    if spec.md.get("choices") and container is None:
        return spec.md["choices"][-1]
    if container is not None:
        return ",".join(spec.md["choices"][-2:])
    if spec.name == "strategy_file":
        p = tmp_path / "st.toml"
        p.write_text("threshold = 5.5\n")
        return str(p)
    if spec.name == "min_subbands":
        return "8"
    if spec.name == "memory_limit":
        return "6GiB"
    return {int: "24", float: "0.25", str: "x", Path: "/some/where"}[base]


def test_each_option_sets_its_field(tmp_path):
    """Every option of every command, given on a command line, lands in its field with
    provenance "cli"."""
    from contimg.cli import build_parser

    parser = build_parser()
    for cmd, sub in _walk(parser):
        for action in sub._actions:
            if "." not in action.dest:
                continue
            spec = C._spec(*action.dest.split("."), "test")
            argv = [*cmd.split(), *POSITIONAL.get(cmd, []), action.option_strings[0]]
            if action.nargs != 0:
                argv.append(_sample(spec, tmp_path))
            args = parser.parse_args(argv)
            if action.dest == "stream.n_subbands":
                args.__dict__["stream.min_subbands"] = 12
            cfg = C.from_args(args, env={})
            assert cfg.provenance[action.dest] == "cli", (cmd, action.dest)
            value = _get(cfg, action.dest)
            if action.nargs == 0:
                assert value is (not spec.default), (cmd, action.dest)
            elif spec.name != "strategy_file":
                assert value == C._from_text(spec, argv[-1], "t"), (cmd, action.dest)
    args = parser.parse_args(["flag", "x.ms", "--strategy", str(tmp_path / "st.toml")])
    assert C.from_args(args, env={}).flag.threshold == 5.5


def test_config_show_round_trip(tmp_path, capsys):
    from contimg.cli import main

    f = tmp_path / "c.toml"
    f.write_text('[image]\nsmear_radius_deg = 1.25\ndata_column = "DATA"\n'
                 '[stream]\nskip = ["apply", "image"]\n[flag]\nfreq_windows = [1, 4, 16]\n'
                 '[app]\naddress = "0.0.0.0"\noauth_secret = "q\\"uote\\\\ and ünï"\n')
    env = {"CONTIMG_CONFIG": str(f), "IMG_THRESHOLD": "2uJy", "IMG_NITER": "77",
           "PIPELINE_POINTING_DEC_DEG": "-10.25"}
    shown = subprocess.run([sys.executable, "-m", "contimg.cli", "config", "show"],
                           env={**_clean_env(), **env}, capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr
    assert "niter = 77  # env:IMG_NITER" in shown.stdout
    assert f"smear_radius_deg = 1.25  # file:{f}" in shown.stdout
    out = tmp_path / "shown.toml"
    out.write_text(shown.stdout)
    expected = load_config(env=env)
    again = load_config(out, env={})
    assert again == expected
    assert again.image.threshold == 2e-6 and again.flag.freq_windows == (1, 4, 16)
    assert again.app.oauth_secret == 'q"uote\\ and ünï'
    # every value in the table with its source
    assert main(["config", "show", "--format", "table"]) == 0
    table = capsys.readouterr().out
    assert len(table.splitlines()) == len(list(expected.items()))
    assert all(line.split()[-1] in ("default", "cli") or line.split()[-1].startswith(
        ("file:", "env:")) for line in table.splitlines())


def _clean_env():
    import os

    keep = {k: v for k, v in os.environ.items()
            if k not in C.ENVIRONMENT and k != "CONTIMG_CONFIG"}
    keep["PYTHONPATH"] = str(ROOT)
    return keep


def test_toml_values_round_trip_exactly():
    for v in (0.1, 1e-300, -2.5e17, math.inf, 3, True, "a\tb\n\x7f", ("x", "y"), (1, 2)):
        got = __import__("tomllib").loads(f"k = {C._toml_value(v)}")["k"]
        assert (tuple(got) if isinstance(got, list) else got) == v


# ---------------------------------------------------------------------------------
# environment reads and global state
# ---------------------------------------------------------------------------------

_ENV_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def environment_uses(source: str) -> list[int]:
    """Line numbers where ``source`` touches the process environment."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in _ENV_NAMES:
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and \
                any(a.name in _ENV_NAMES for a in node.names):
            lines.append(node.lineno)
    return lines


def test_the_scan_finds_environment_reads():
    assert environment_uses("import os\nx = os.environ.get('A')\n") == [2]
    assert environment_uses("import os as o\no.getenv('A')\n") == [2]
    assert environment_uses("from os import environ\n") == [1]
    assert environment_uses("import os\nos.path.join('a')\n") == []


def test_only_the_configuration_reads_the_environment():
    found = []
    for pkg in ("contimg", "graphs", "kernels"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "contimg" / "config.py":
                continue
            for line in environment_uses(path.read_text()):
                found.append(f"{path.relative_to(ROOT)}:{line}")
    assert found == []


_STATE = """
import copy, json, os, sys
import dask, distributed, astropy.utils.iers as iers   # their own import effects
def state():
    return json.dumps([copy.deepcopy(dask.config.config), dict(os.environ),
                       iers.conf.auto_download, iers.conf.auto_max_age], default=str,
                      sort_keys=True)
before = state()
import contimg, contimg.config, contimg.runtime, contimg.cli, contimg.stream
import contimg.imaging, contimg.io.uvh5, contimg.uvw, contimg.sky, contimg.state
contimg.cli.build_parser()
imported = state()
contimg.runtime.configure()
configured = state()
contimg.runtime.configure()
print(json.dumps([before == imported, imported == configured, configured == state(),
                  os.environ.get("HDF5_USE_FILE_LOCKING"), iers.conf.auto_download]))
"""


def test_importing_contimg_changes_no_global_state():
    env = _clean_env()
    env.pop("HDF5_USE_FILE_LOCKING", None)
    r = subprocess.run([sys.executable, "-c", _STATE], env=env, capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    unchanged, configure_did_nothing, idempotent, hdf5, download = json.loads(
        r.stdout.splitlines()[-1])
    assert unchanged
    # configure() does change the state (so the comparison can see a change), once
    assert not configure_did_nothing and idempotent
    assert hdf5 == "FALSE" and download is False


def test_configure_keeps_what_the_operator_set(monkeypatch):
    import dask

    from contimg import runtime

    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "TRUE")
    with dask.config.set({runtime._MALLOC_KEY: 131072}):
        runtime.configure()
        assert dask.config.get(runtime._MALLOC_KEY) == 131072
    import os

    assert os.environ["HDF5_USE_FILE_LOCKING"] == "TRUE"


def _worker_state():
    import os

    from astropy.utils import iers

    from contimg.config import current

    return (os.environ.get("HDF5_USE_FILE_LOCKING"), iers.conf.auto_download,
            current().image.niter)


def test_workers_preload_the_runtime_and_read_the_cli_file(tmp_path, monkeypatch):
    """The LocalCluster the CLI starts: its workers run runtime.configure() (preload)
    and see the configuration file given with --config; deploy/dask.yaml preloads too."""
    import yaml

    from contimg.cli import _client

    conf = yaml.safe_load((ROOT / "deploy" / "dask.yaml").read_text())
    assert "contimg.runtime" in conf["distributed"]["worker"]["preload"]
    f = tmp_path / "c.toml"
    f.write_text("[image]\nniter = 42\n")
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    monkeypatch.delenv("CONTIMG_CONFIG", raising=False)
    cfg = load_config(f, env={})
    with _client(cfg, str(f)) as client:
        (state,) = client.run(_worker_state).values()
    assert state == ["FALSE", False, 42] or state == ("FALSE", False, 42)


# ---------------------------------------------------------------------------------
# the flagging strategy's files
# ---------------------------------------------------------------------------------

def test_flag_strategy_files(tmp_path, monkeypatch):
    from contimg.config import load_flag_strategy
    from graphs.flag import FlagStrategy

    p = tmp_path / "flag.toml"
    p.write_text("[flag]\nthreshold = 7.5\nsir_eta_time = 0.2\n")
    st = load_flag_strategy(p)
    assert st.threshold == 7.5 and st.sir_eta_time == 0.2
    assert load_flag_strategy(str(p)) == st
    assert load_flag_strategy("threshold = 4.0\n").threshold == 4.0
    assert load_flag_strategy({"rho": 2.0}).rho == 2.0
    assert load_flag_strategy(st) is st
    monkeypatch.delenv("CONTIMG_CONFIG", raising=False)
    assert load_flag_strategy(None) == FlagStrategy()
    conf = tmp_path / "c.toml"
    conf.write_text("[flag]\nmad_clip = 5.0\n")
    monkeypatch.setenv("CONTIMG_CONFIG", str(conf))
    assert load_flag_strategy(None).mad_clip == 5.0   # the configured [flag] table
    with pytest.raises(ConfigError, match="nothing.toml: no such file"):
        load_flag_strategy(tmp_path / "nothing.toml")
    with pytest.raises(ValueError, match="unknown FlagStrategy keys"):
        load_flag_strategy("treshold = 4.0\n")
    with pytest.raises(TypeError, match="load_flag_strategy"):
        FlagStrategy.load(str(p))             # graphs/ reads no files
