"""Frozen dataclasses built from parsed YAML, the fields' hints and metadata checked: every
refusal is one ConfigError line naming the dotted key.

A field's metadata may give ``min``/``max`` bounds, ``choices``, ``upper`` (upper-cased),
``auto`` (the int accepts ``'auto'``: True for the CPU count, else that value), ``internal``
(not a key of the file) and, on a ``Mapping`` of dataclasses, ``defaults`` (name -> the entry
an entry of that name starts from).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError


def given_keys(data: Mapping[str, Any]) -> list[str]:
    """The dotted keys of ``data``, two levels deep (a section's own keys)."""
    keys = list(data)
    for section, sub in data.items():
        if isinstance(sub, Mapping):
            keys += [f"{section}.{key}" for key in sub]
    return keys


def build(cls: type, data: Any, prefix: str, base: Any = None) -> Any:
    """``cls`` from a mapping; fields it leaves out keep their defaults (or ``base``'s)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{prefix}{key}: unknown key (known here: {known})")
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, f"{prefix}{name}", fields[name].metadata)
    return cls(**values) if base is None else dataclasses.replace(base, **values)


def _convert(hint: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value, f"{key}.")
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner, value, key, meta)
    if origin is Mapping:
        _, value_type = typing.get_args(hint)
        if not isinstance(value, Mapping) or not value:
            raise ConfigError(f"{key}: must be a non-empty mapping of name -> settings")
        out = {}
        for name, sub in value.items():
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
                raise ConfigError(f"{key}: bad name {name!r} (use 1-64 of A-Z a-z 0-9 . _ -)")
            base = meta.get("defaults", {}).get(name)
            out[name] = build(value_type, sub if sub is not None else {}, f"{key}.{name}.", base)
        return types.MappingProxyType(out)
    if origin is tuple:
        (item_type, _) = typing.get_args(hint)
        if not isinstance(value, list | tuple) or not value:
            raise ConfigError(f"{key}: must be a non-empty list, got {show(value)}")
        return tuple(_convert(item_type, v, f"{key}[{i}]", {}) for i, v in enumerate(value))
    if hint is int and "auto" in meta and value == "auto":
        return (os.cpu_count() or 1) if meta["auto"] is True else meta["auto"]
    return _scalar(hint, value, key, meta)


def _scalar(hint: type, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {show(value)}")
        return value
    if hint is int and (not isinstance(value, int) or isinstance(value, bool)):
        auto = " or 'auto'" if "auto" in meta else ""
        raise ConfigError(f"{key}: must be an integer{auto}, got {show(value)}")
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: must be a number, got {show(value)}")
        value = float(value)
    if hint is str and (not isinstance(value, str) or not value):
        raise ConfigError(f"{key}: must be a non-empty string, got {show(value)}")
    if meta.get("upper"):
        value = value.upper()
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"{key}: must be {bounds}, got {show(value)}")
    if choices and value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {show(value)}")
    return value


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
