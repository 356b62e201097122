"""YAML values into the schema's types: `from_dict` walks a dataclass, `_coerce` turns each value
into its field's type or names the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

from accelvit.config.schema import (
    ConfigError,
    RampConfig,
    _excerpt,
)


def _unknown(key: str, name: str, names: list[str], where: str = "") -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    parent = key.rpartition(".")[0]
    suggestion = f"{parent}.{close[0]}" if close and parent else (close[0] if close else "")
    hint = f" (did you mean '{suggestion}'?)" if close else f" (known: {', '.join(names)})"
    prefix = f"{where}: " if where and where != key else ""
    return f"{prefix}unknown key '{key}'{hint}"


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> Any:
    if _is_optional(tp):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _is_optional(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def from_dict(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from a dict, checking keys and types; `path` names it in errors."""
    if cls is RampConfig and isinstance(data, (int, float)) and not isinstance(data, bool):
        data = {"shape": "constant", "start": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'recipe'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(_unknown(f"{path}.{key}" if path else str(key), str(key), names))
    values = {}
    for name in names:
        if name in data:
            key = f"{path}.{name}" if path else name
            values[name] = _coerce(hints[name], data[name], key)
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if _is_optional(tp):
        return None if value is None else _coerce(_unwrap_optional(tp), value, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected a list")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected one of {list(typing.get_args(tp))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e9 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {_excerpt(value)}: expected a string")
        return value
    raise TypeError(f"unsupported recipe type {tp} for {key}")  # a bug in this module
