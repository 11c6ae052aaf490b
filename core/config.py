"""Configuration as a dataclass tree: loaded from YAML, overridden from the CLI, written back resolved.

Unknown keys are errors that name the key and the keys that exist.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, TypeVar

import yaml

from updp.core.errors import UpdpError
from updp.core.fileio import write_text

T = TypeVar("T")


class ConfigError(UpdpError):
    """A config file or value that does not fit the schema."""


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build ``cls`` from nested dicts; unknown keys raise ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{path or '<root>'}' must be a mapping, not {type(data).__name__}")
    types_ = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{where}'{hint}")
        tp = types_[key]
        kwargs[key] = from_dict(tp, value, where) if _is_dataclass_type(tp) else _coerce(value, tp, where)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"config section '{path or '<root>'}': {e}") from None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _coerce(value, args[0], where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{where}' must be a list")
        return list(value) if origin is list else tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{where}' must be {tp.__name__}, got {value!r}")
    return value


def load_yaml(cls: type[T], path: str | os.PathLike) -> T:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config '{path}': {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    return from_dict(cls, data)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def write_yaml(path: str | os.PathLike, obj) -> None:
    write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def override(obj: T, changes: dict[str, Any]) -> T:
    """``changes`` maps dotted keys (``search.trials``) to values; None values are skipped."""
    for key, value in changes.items():
        if value is None:
            continue
        head, _, rest = key.partition(".")
        if rest:
            obj = dataclasses.replace(obj, **{head: override(getattr(obj, head), {rest: value})})
        else:
            obj = dataclasses.replace(obj, **{head: value})
    return obj


# --- options: a config field declared once, its command-line flag generated from it ---------------

def option(default: Any = dataclasses.MISSING, help: str = "", flag: str | None = None,  # noqa: A002
           choices: tuple | None = None, metavar: str | None = None, *, factory=None) -> Any:
    """A config field with its command-line flag (``flag`` None: reachable with ``--set KEY=VALUE`` only)."""
    meta = {"flag": flag, "help": help, "choices": choices, "metavar": metavar}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Flag:
    key: str  # dotted config key, e.g. search.trials
    flag: str  # e.g. --trials
    type: Any
    help: str
    choices: tuple | None
    metavar: str | None


def flags(cls, prefix: str = "") -> list[Flag]:
    """Every field of the dataclass tree ``cls`` that has a command-line flag, in declaration order."""
    out = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            out += flags(tp, key + ".")
        elif f.metadata.get("flag"):
            m = f.metadata
            out.append(Flag(key, m["flag"], tp, m["help"], m["choices"], m["metavar"]))
    return out


def set_key(obj: T, assignment: str) -> T:
    """``obj`` with ``KEY=VALUE`` applied (``--set search.trials=100``); VALUE is read as YAML, then type-checked."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set '{assignment}': write KEY=VALUE, e.g. --set search.trials=100")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: '{text}' is not a valid value") from None
    data = to_dict(obj)
    node, parts = data, key.split(".")
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            from_dict(type(obj), _nested(parts[:i + 1], value))  # names the unknown key
            raise ConfigError(f"--set {key}: '{'.'.join(parts[:i + 1])}' is not a config section")
        node = node[part]
    if parts[-1] not in node or isinstance(node[parts[-1]], dict):
        from_dict(type(obj), _nested(parts, value))  # unknown key: the error names it and the close ones
        raise ConfigError(f"--set {key}: '{key}' is a section; set one of its keys")
    node[parts[-1]] = value
    return from_dict(type(obj), data)


def _nested(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out
