"""The machinery of contimg's configuration fields (see :mod:`contimg.config`).

:func:`setting` declares a field (default, help, environment variable, command-line
flags, choices, parser); :func:`_own_specs` lists a section's fields; :func:`_from_value`
and :func:`_from_text` turn a typed value (TOML, keyword, command line) or a text
(environment variable) into the field's type, raising :class:`ConfigError` that names
where the value came from and the problem. No environment is read here.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value or file is wrong; the message names it and the problem."""


def parse_threshold(text) -> float:
    """``"1e-3"``, ``"0.5mJy"``, ``"2uJy"``, ``"0.001Jy"`` -> Jy (float)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(|jy|mjy|ujy|µjy)\s*", str(text).lower())
    if not m:
        raise ValueError(f"threshold {text!r}: expected a number of Jy or e.g. '0.5mJy'")
    scale = {"": 1.0, "jy": 1.0, "mjy": 1e-3, "ujy": 1e-6, "µjy": 1e-6}[m.group(2)]
    return float(m.group(1)) * scale


def setting(default, help, *, env=None, flags=(), choices=None, parse=None, metavar=None):
    """A configuration field: its default, one line of help, the environment variable
    that sets it, its command-line flags (the first is the name; ``--no-X`` for a
    boolean that is on by default), the values it may take and a text parser."""
    md = {"help": help, "env": env, "flags": tuple(flags), "choices": choices,
          "parse": parse, "metavar": metavar}
    return field(default=default, metadata=md)


@dataclass(frozen=True)
class _Spec:
    name: str
    hint: Any
    default: Any
    md: Mapping


def _flag_strategy_class():
    from graphs.flag import FlagStrategy

    return FlagStrategy


@functools.cache
def _own_specs(cls) -> dict[str, _Spec]:
    hints = typing.get_type_hints(cls)
    return {f.name: _Spec(f.name, hints[f.name], f.default, f.metadata) for f in fields(cls)
            if f.init and not f.metadata.get("internal")}


@functools.cache
def _strategy_specs() -> dict[str, _Spec]:
    cls = _flag_strategy_class()
    hints = typing.get_type_hints(cls)
    return {f.name: _Spec(f.name, hints[f.name], f.default, {"help": ""}) for f in fields(cls)}


def _suggest(name, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unpack(hint):
    """(base type, container or None, optional)."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    origin = typing.get_origin(hint)
    if origin in (tuple, frozenset):
        return typing.get_args(hint)[0], origin, optional
    return hint, None, optional


_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "Path": "a path (string)"}


def _scalar(base, value, text: bool):
    if text:
        value = value.strip()
        if base is bool:
            low = value.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        return base(value)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if isinstance(value, bool):
        raise ValueError
    if base is int:
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        raise ValueError
    if base is float and isinstance(value, (int, float)):
        return float(value)
    if base is str and isinstance(value, str):
        return value
    if base is Path and isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise ValueError


def _convert(spec: _Spec, value, where: str, text: bool):
    base, container, optional = _unpack(spec.hint)
    parse = spec.md.get("parse")
    if value is None or (text and optional and not value.strip()):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    try:
        if parse is not None and (text or isinstance(value, str)):
            out = parse(value)
        elif container is not None:
            items = ([v for v in value.split(",") if v.strip()] if isinstance(value, str)
                     else list(value) if isinstance(value, (list, tuple, set, frozenset))
                     else None)
            if items is None:
                raise ValueError
            out = container(_scalar(base, v, isinstance(v, str) and base is not str)
                            for v in items)
            if container is frozenset and base is str:
                out = frozenset(v.strip() for v in out)
        else:
            out = _scalar(base, value, text)
    except (ValueError, TypeError) as exc:
        what = _WORDS.get(getattr(base, "__name__", ""), str(base))
        if container is not None:
            what = f"a list of {what.removeprefix('an ').removeprefix('a ')}s"
        detail = f" ({exc})" if str(exc) else ""
        raise ConfigError(f"{where}: {value!r} is not {what}{detail}") from None
    choices = spec.md.get("choices")
    if choices is not None:
        bad = sorted(set(out if container else [out]) - set(choices))
        if bad:
            raise ConfigError(f"{where}: {', '.join(map(repr, bad))} not one of "
                              f"{', '.join(choices)}")
    return out


def _from_value(spec, value, where):
    """A value from TOML, a keyword or the command line (already typed)."""
    return _convert(spec, value, where, text=False)


def _from_text(spec, text, where):
    """A value from an environment variable (text)."""
    return _convert(spec, text, where, text=True)
