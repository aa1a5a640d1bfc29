"""contimg's configuration: one typed, frozen object that owns every default.

:func:`load_config` builds a :class:`Config` from four layers, each overriding the one
before, field by field:

1. the defaults declared with the sections (:mod:`contimg.config_sections`; the field
   machinery is :mod:`contimg.config_fields`);
2. a TOML file (``contimg --config FILE``, else ``$CONTIMG_CONFIG``) with one table per
   section (``[paths]``, ``[dask]``, ``[stream]``, ``[flag]``, ``[calibrate]``,
   ``[image]``, ``[science]``, ``[app]``);
3. the operators' environment variables (:data:`ENVIRONMENT` lists them; their meaning
   is today's pipeline's);
4. command-line options (``overrides``), which are derived from the fields below: a
   field's metadata gives its flag names, help and choices (:func:`add_options`).

An unknown key in the file, a value of the wrong type (file, environment or command
line) or an invalid combination raises :class:`ConfigError`, naming the key or the
variable and the problem. ``cfg.provenance["image.niter"]`` says where a value came
from: ``"default"``, ``"file:PATH"``, ``"env:NAME"`` or ``"cli"``; ``contimg config
show`` prints the effective configuration with it (:func:`to_toml` output loads back
to an equal configuration).

This module is the only one that reads environment variables. Library functions whose
parameter is ``None`` take the value from :func:`current`: the configuration the
command line installed with :func:`use`, else ``load_config()`` (file and environment
read afresh at each call). Dask workers of a ``LocalCluster`` the CLI starts get the
file through ``CONTIMG_CONFIG`` in their environment; the stream passes everything a
stage needs as arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tomllib
import types
from pathlib import Path
from typing import Any, Mapping

# the fields and sections live in two modules of their own; this one re-exports them
from contimg.config_fields import (
    ConfigError, _flag_strategy_class, _from_text, _from_value, _own_specs, _unpack,
    parse_threshold, setting,
)
from contimg.config_sections import (
    SECTIONS, STAGES, W_MODES, AppConfig, CalibrateConfig, Config, DaskConfig, FlagConfig,
    ImageConfig, PathsConfig, ScienceConfig, StreamSettings, _section_items, _spec,
)

__all__ = [
    "Config", "ConfigError", "PathsConfig", "DaskConfig", "StreamSettings", "FlagConfig",
    "CalibrateConfig", "ImageConfig", "ScienceConfig", "AppConfig", "SECTIONS",
    "ENVIRONMENT", "load_config", "current", "use", "add_options", "from_args",
    "to_toml", "to_table", "parse_threshold", "load_flag_strategy", "ensure_environment",
    "STAGES", "W_MODES", "setting",
]


# ---------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------

#: the operators' environment variables -> "section.field"
ENVIRONMENT: dict[str, str] = {
    spec.md["env"]: f"{name}.{spec.name}" for name, cls in SECTIONS.items()
    for spec in _own_specs(cls).values() if spec.md.get("env")}


def _read_toml(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what}: not valid TOML ({exc})") from None


def load_config(path=None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """The configuration from the defaults < ``path`` (else ``$CONTIMG_CONFIG``) <
    the environment ``env`` (default ``os.environ``) < ``overrides`` (``{"image.niter":
    50}`` or ``{"image": {"niter": 50}}``; the command line's)."""
    env = os.environ if env is None else env
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    prov: dict[str, str] = {}

    def put(section, name, value, source):
        values[section][name] = value
        prov[f"{section}.{name}"] = source

    if path is None and env.get("CONTIMG_CONFIG"):
        path, what = Path(env["CONTIMG_CONFIG"]), f"CONTIMG_CONFIG={env['CONTIMG_CONFIG']}"
    else:
        what = str(path)
    if path is not None:
        path = Path(path)
        for section, table in _read_toml(path, what).items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: {section!r} must be a table ([{section}]); "
                                  f"sections: {', '.join(SECTIONS)}")
            for name, raw in table.items():
                spec = _spec(section, name, str(path))
                put(section, name, _from_value(spec, raw, f"{path}: [{section}] {name}"),
                    f"file:{path}")
    for var, key in ENVIRONMENT.items():
        raw = env.get(var)
        if raw is not None and raw.strip():
            section, name = key.split(".")
            spec = _spec(section, name, var)
            put(section, name, _from_text(spec, raw, f"{var}={raw!r} ({key})"), f"env:{var}")
    for key, raw in _flatten(overrides or {}):
        section, _, name = key.partition(".")
        spec = _spec(section, name, key)
        put(section, name, _from_value(spec, raw, f"{key}"), "cli")
    sfile = values["flag"].get("strategy_file")
    if sfile is not None:
        data = _read_toml(Path(sfile), f"flag strategy {sfile}")
        table = data["flag"] if isinstance(data.get("flag"), dict) else data
        for name, raw in table.items():
            spec = _spec("flag", name, f"flag strategy {sfile}")
            if spec.name == "strategy_file":
                raise ConfigError(f"flag strategy {sfile}: strategy_file inside a strategy")
            put("flag", name, _from_value(spec, raw, f"{sfile}: {name}"), f"file:{sfile}")
    st = values["stream"]
    if "min_subbands" not in st and st.get("n_subbands", 16) < StreamSettings.min_subbands:
        st["min_subbands"] = st["n_subbands"]     # the default, for fewer subbands
    if values["paths"].get("db") is None:
        state = values["paths"].get("state_dir", PathsConfig.state_dir)
        values["paths"]["db"] = Path(state) / "db" / "pipeline.sqlite3"
        if "paths.state_dir" in prov:
            prov["paths.db"] = prov["paths.state_dir"]
    sections = {}
    for name, cls in SECTIONS.items():
        kw = values[name]
        if name == "flag":
            own = _own_specs(cls)
            kw = {k: v for k, v in kw.items() if k in own}
            kw["options"] = tuple((k, v) for k, v in values[name].items() if k not in own)
        try:
            sections[name] = cls(**kw)
        except (ValueError, TypeError) as exc:
            keys = sorted(k for k in prov if k.startswith(name + "."))
            came = "; ".join(f"{k} from {prov[k]}" for k in keys) or "defaults"
            raise ConfigError(f"[{name}]: {exc} ({came})") from None
    cfg = Config(**sections)
    full = {key: prov.get(key, "default") for key, _ in cfg.items()}
    return dataclasses.replace(cfg, provenance=types.MappingProxyType(full))


def _flatten(overrides: Mapping) -> list:
    out = []
    for key, value in overrides.items():
        if isinstance(value, Mapping) and "." not in key:
            out.extend((f"{key}.{k}", v) for k, v in value.items())
        else:
            out.append((key, value))
    return out


_ACTIVE: Config | None = None


def use(cfg: Config | None) -> Config | None:
    """Make ``cfg`` the configuration :func:`current` returns in this process (the CLI
    does, once); ``None`` goes back to reading the file and environment at each call.
    Returns the previous one."""
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, cfg
    return prev


def current() -> Config:
    """The configuration library defaults come from (see the module docstring)."""
    return _ACTIVE if _ACTIVE is not None else load_config()


def ensure_environment() -> None:
    """Set what this process's libraries read from the environment, unless the operator
    did: ``HDF5_USE_FILE_LOCKING=FALSE`` (subband files are read while the correlator
    may still hold them; HDF5 reads it when a file is opened). Called by
    :func:`contimg.runtime.configure`."""
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")


def child_environment(extra: Mapping[str, str]) -> dict:
    """The environment of a process contimg starts (``contimg cluster``): this one's,
    with ``extra`` (the configuration file, Dask settings) set or replaced."""
    return {**os.environ, **extra}


def load_flag_strategy(obj=None):
    """A :class:`graphs.flag.FlagStrategy` from a strategy, a mapping, a TOML file path or
    TOML text (top level or a ``[flag]`` table), or None (the configured ``[flag]``)."""
    cls = _flag_strategy_class()
    if isinstance(obj, cls):
        return obj
    if obj is None:
        return current().flag.strategy
    if isinstance(obj, Mapping):
        return cls.from_mapping(obj)
    s = str(obj)
    if isinstance(obj, os.PathLike) or ("\n" not in s and "=" not in s):
        data = _read_toml(Path(s), f"flag strategy {s}")
    else:
        try:
            data = tomllib.loads(s)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"flag strategy: not valid TOML ({exc}): {s[:80]!r}") from None
    return cls.from_mapping(data)


# ---------------------------------------------------------------------------------
# output: TOML and a table
# ---------------------------------------------------------------------------------

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")) \
            if not math.isfinite(v) else repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (tuple, list, frozenset, set)):
        items = sorted(v) if isinstance(v, (frozenset, set)) else v
        return "[" + ", ".join(_toml_value(x) for x in items) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: Config, *, sources: bool = True) -> str:
    """The configuration as a TOML file (loads back equal); each line says where its
    value came from. Unset optional values are comments."""
    lines = ["# contimg configuration: defaults < file < environment < command line"]
    for name in SECTIONS:
        lines.append(f"\n[{name}]")
        for key, value in _section_items(cfg, name):
            src = cfg.provenance.get(f"{name}.{key}", "default")
            note = f"  # {src}" if sources else ""
            if value is None:
                lines.append(f"# {key} = (unset){note}")
            else:
                lines.append(f"{key} = {_toml_value(value)}{note}")
    return "\n".join(lines) + "\n"


def to_table(cfg: Config) -> str:
    """The configuration as aligned ``key  value  source`` lines."""
    rows = [(k, "-" if v is None else _toml_value(v), cfg.provenance.get(k, "default"))
            for k, v in cfg.items()]
    w0 = max(len(r[0]) for r in rows)
    w1 = min(60, max(len(r[1]) for r in rows))
    return "\n".join(f"{k:<{w0}}  {v:<{w1}}  {s}" for k, v, s in rows) + "\n"


# ---------------------------------------------------------------------------------
# the command line, derived from the fields
# ---------------------------------------------------------------------------------

def add_options(parser: argparse.ArgumentParser, *keys: str) -> None:
    """Add the command-line options of configuration fields (``"stream.poll_s"``, or
    ``"stream.*"`` for every field of a section that has flags). An option the user does
    not give leaves the value to the file, the environment or the default."""
    for key in keys:
        section, _, name = key.partition(".")
        specs = (list(_own_specs(SECTIONS[section]).values()) if name == "*"
                 else [_spec(section, name, "add_options")])
        for spec in specs:
            if spec.md.get("flags"):
                _add_option(parser, section, spec)
            elif name != "*":
                raise ValueError(f"{key}: this field has no command-line flag")


def _add_option(parser, section, spec):
    flags = spec.md["flags"]
    dest = f"{section}.{spec.name}"
    base, container, _ = _unpack(spec.hint)
    default = spec.default
    shown = ",".join(sorted(default)) if isinstance(default, frozenset) else default
    extra = [dest]
    if shown not in (None, "", ","):
        extra.append(f"default {shown!s}")
    if spec.md.get("env"):
        extra.append(f"env {spec.md['env']}")
    help_ = f"{spec.md['help']} [{'; '.join(extra)}]".replace("%", "%%")
    kw = dict(dest=dest, default=argparse.SUPPRESS, help=help_)
    if base is bool and container is None:
        off = flags[0].startswith("--no-")
        kw["action"] = "store_false" if off else "store_true"
        kw["help"] = ("turn off: " if off else "turn on: ") + help_
    else:
        def parse(text, spec=spec, flag=flags[0]):
            try:
                return _from_text(spec, text, flag)
            except ConfigError as exc:
                raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag}: ")) from None

        parse.__name__ = spec.name
        kw["type"] = parse
        if spec.md.get("metavar"):
            kw["metavar"] = spec.md["metavar"]
        elif spec.md.get("choices") and container is None:
            kw["metavar"] = "{" + ",".join(spec.md["choices"]) + "}"
        else:
            kw["metavar"] = flags[0].lstrip("-").upper().replace("-", "_")
    parser.add_argument(*flags, **kw)


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    """The configuration of a parsed command line: ``args.config`` (the file) and every
    ``section.field`` option given."""
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    return load_config(getattr(args, "config", None), env, overrides)
