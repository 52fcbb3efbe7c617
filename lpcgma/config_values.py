"""Typed values of config keys: the one error type (`ConfigError`) and the conversion of YAML and
command-line values to a field's declared type (Literal choices, tuples, bool, int, float, str).

Every message names the dotted key and says what was expected, so that every entry point can print it
as its one line (exit code 2)."""

from __future__ import annotations

import re
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names it."""


def check_value(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise ConfigError naming `key` and `value` unless `ok`."""
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {expected}")


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field type `tp`, or raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected one of {list(choices)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected a list ({e})") from e
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected a list")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce_value(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {len(args)} values")
        return tuple(coerce_value(v, a, key) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value.strip())  # str.strip and int() disagree on what is space (e.g. "0\x1f")
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected a string")
    raise ConfigError(f"config key '{key}': unsupported field type {tp!r}")  # pragma: no cover
