"""Typed values from YAML: a frozen dataclass built from a mapping, every key and value checked against its
annotations (unknown keys, wrong types, values outside a Literal are errors that name the key)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from pipeline.core.errors import ConfigError


def parse(cls: type, raw: Any, key: str, moved: Mapping[str, str] | None = None) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value against the annotations. `moved`: keys
    of older files (dotted, from the top), each with where its value goes now."""
    where = key or "params"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        bad = _join(key, str(unknown[0]))
        if bad in (moved or {}):
            raise ConfigError(f"{bad} has moved: {moved[bad]}")
        raise ConfigError(f"unknown key '{bad}' (valid keys here: {', '.join(names)})")
    values = {name: _coerce(hints[name], raw[name], _join(key, name), moved) for name in names if name in raw}
    return cls(**values)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(tp: Any, value: Any, key: str, moved: Mapping[str, str] | None) -> Any:
    """Check `value` against annotation `tp`; return it converted (int -> float, nested dataclasses)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, key, moved)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for alternative in inner:  # e.g. `int | Literal["all"]`: the first that accepts the value wins
            try:
                return _coerce(alternative, value, key, moved)
            except ConfigError as err:
                errors.append(str(err).removeprefix(f"{key} "))
        raise ConfigError(f"{key} {' or '.join(errors)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping; got {value!r}")
        return {str(k): _coerce(args[1], v, _join(key, str(k)), moved) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", moved) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads `1e-3` as a string (YAML 1.1 wants a dot in the mantissa).
        raise ConfigError(f"{key} must be a number; got the string {value!r} (write 1e-3 as 0.001 or 1.0e-3)")
    # bool is a subclass of int: `batch_size: true` must not pass as 1.
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {tp.__name__}; got {type(value).__name__} {value!r}")
    return value
