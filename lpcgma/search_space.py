"""Search spaces: YAML files of dotted config keys → distributions, validated before a search starts.

A search space file maps each dotted config key (the same name as the config field, the CLI
override and the MLflow param) to a distribution::

    method.tau_pmc:
      type: loguniform          # uniform | loguniform | int | choice
      low: 0.03
      high: 0.3
      comment: contrast temperature τ_pmc

    method.gaussians_per_class:
      type: choice
      values: [2, 4, 8]
      comment: Gaussians per class K

``int`` bounds are inclusive. Every file is checked as a whole before anything starts: an unknown
key, a wrong distribution type, low ≥ high, values of the wrong type for the config field, and bounds
the config refuses (K < 1, a temperature ≤ 0, a threshold outside [0, 1], ...) each raise
`SearchSpaceError` naming the file and the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import numpy as np
import yaml

from lpcgma.config import (
    METHOD_CONFIGS,
    ConfigError,
    ExperimentConfig,
    flatten,
    packaged_file,
    replace,
    valid_keys,
)

DistType = Literal["uniform", "loguniform", "int", "choice"]
DIST_TYPES: tuple[str, ...] = ("uniform", "loguniform", "int", "choice")
_ENTRY_FIELDS = {"type", "low", "high", "values", "comment"}
_INT64 = 2**63 - 1


class SearchSpaceError(ValueError):
    """A search space file is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Param:
    """One searched config key and its distribution."""

    key: str  # dotted config key, e.g. method.tau_pmc
    type: str  # uniform | loguniform | int | choice
    low: float | int | None = None  # numeric bounds (int: inclusive)
    high: float | int | None = None
    values: tuple[Any, ...] = ()  # choice values
    comment: str = ""

    def to_tune(self) -> Any:
        """The Ray Tune distribution of this parameter."""
        from ray import tune

        if self.type == "uniform":
            return tune.uniform(float(self.low), float(self.high))  # type: ignore[arg-type]
        if self.type == "loguniform":
            return tune.loguniform(float(self.low), float(self.high))  # type: ignore[arg-type]
        if self.type == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # type: ignore[arg-type]  # inclusive high
        return tune.choice(list(self.values))

    def sample(self, rng: np.random.Generator) -> Any:
        """One value drawn from this distribution (Ray-free: the local sweep's sampler)."""
        if self.type == "uniform":
            return float(rng.uniform(float(self.low), float(self.high)))  # type: ignore[arg-type]
        if self.type == "loguniform":
            lo, hi = math.log(float(self.low)), math.log(float(self.high))  # type: ignore[arg-type]
            return float(math.exp(rng.uniform(lo, hi)))
        if self.type == "int":
            return int(rng.integers(int(self.low), int(self.high) + 1))  # type: ignore[arg-type]  # inclusive high
        return self.values[int(rng.integers(len(self.values)))]

    def contains(self, value: Any) -> bool:
        if self.type == "choice":
            return any(_same(value, v) for v in self.values)
        try:
            return bool(self.low <= value <= self.high)  # type: ignore[operator]
        except TypeError:
            return False


@dataclass(frozen=True)
class SearchSpace:
    """The parameters of a search space file, in file order."""

    path: str
    params: tuple[Param, ...]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def to_tune(self) -> dict[str, Any]:
        """``{dotted key: tune distribution}`` — the Tuner's flat ``param_space``."""
        return {p.key: p.to_tune() for p in self.params}

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """``{dotted key: value}``: one random point of the space (each key drawn independently)."""
        return {p.key: p.sample(rng) for p in self.params}

    def __len__(self) -> int:
        return len(self.params)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _err(path: str, key: str | None, msg: str) -> SearchSpaceError:
    where = f"search space '{path}'" + (f", key '{key}'" if key is not None else "")
    return SearchSpaceError(f"{where}: {msg}")


# ------------------------------------------------------------------------------------ locating
def packaged_search_spaces() -> list[str]:
    """Names of the search spaces installed with the package (``smoke``, ``synthetic``, ...)."""
    folder = resources.files("lpcgma") / "search_spaces"
    return sorted(f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml"))


def resolve_search_space(name: str | Path) -> Path:
    """A search space file, or a packaged one by name (``loveda`` → lpcgma/search_spaces/loveda.yaml).

    Packaged files come from the installed package, never from a script's folder, so scripts run by
    ``ray submit`` find them.
    """
    p = Path(name)
    if p.is_file():
        return p
    packaged = packaged_file("search_spaces", name)
    if packaged is not None:
        return packaged
    raise SearchSpaceError(
        f"search space '{name}' is neither a file nor a packaged search space; packaged: {packaged_search_spaces()}"
    )


# ------------------------------------------------------------------------------------ loading
def _field_types(method: str) -> dict[str, Any]:
    """Dotted key → field type annotation for the config tree of `method`."""
    out: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in fields(cls):
            tp = hints[f.name]
            if prefix == "" and f.name == "method":
                walk(METHOD_CONFIGS[method], "method.")
            elif is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")  # type: ignore[arg-type]
            else:
                out[prefix + f.name] = tp

    walk(ExperimentConfig, "")
    return out


def _number(path: str, key: str, name: str, value: Any, integer: bool) -> float | int:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if integer else "a number"
        raise _err(path, key, f"'{name}' must be {kind}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _err(path, key, f"'{name}' must be finite, got {value!r}")
    if integer:
        if isinstance(value, float):
            if not value.is_integer():
                raise _err(path, key, f"'{name}' must be an integer, got {value!r}")
            value = int(value)
        if abs(value) > _INT64:
            raise _err(path, key, f"'{name}' = {value!r} is out of the 64-bit integer range")
    elif abs(value) > 1e300:
        raise _err(path, key, f"'{name}' = {value!r} is too large")
    return value


def _parse_entry(path: str, key: str, entry: Any, field_type: Any) -> Param:
    if not isinstance(entry, Mapping):
        raise _err(path, key, f"expected a mapping with 'type' and bounds or values, got {entry!r}")
    extra = sorted(str(k) for k in entry if k not in _ENTRY_FIELDS)
    if extra:
        raise _err(path, key, f"unknown field(s) {extra}; allowed: {sorted(_ENTRY_FIELDS)}")
    dist = entry.get("type")
    if dist not in DIST_TYPES:
        raise _err(path, key, f"'type' = {dist!r} is not a distribution; expected one of {list(DIST_TYPES)}")
    comment = entry.get("comment", "")
    if comment is None:
        comment = ""
    if not isinstance(comment, str):
        raise _err(path, key, f"'comment' must be a string, got {comment!r}")
    origin = get_origin(field_type)
    numeric = field_type in (int, float)
    if dist == "choice":
        for f in ("low", "high"):
            if f in entry:
                raise _err(path, key, f"a choice takes 'values', not '{f}'")
        values = entry.get("values")
        if not isinstance(values, list) or not values:
            raise _err(path, key, f"'values' must be a non-empty list, got {values!r}")
        for v in values:
            if v is not None and not isinstance(v, (bool, int, float, str)):
                raise _err(path, key, f"choice values must be scalars (number, string, bool), got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise _err(path, key, f"choice values must be finite, got {v!r}")
        return Param(key, "choice", values=tuple(values), comment=comment)
    if "values" in entry:
        raise _err(path, key, f"a {dist} distribution takes 'low' and 'high', not 'values'")
    if not numeric:
        kind = (
            "one of " + str(list(get_args(field_type)))
            if origin is Literal
            else getattr(field_type, "__name__", str(field_type))
        )
        raise _err(path, key, f"the config field is {kind}, not a number: use type 'choice'")
    if dist == "int" and field_type is not int:
        raise _err(path, key, "the config field is a float: use 'uniform' or 'loguniform', not 'int'")
    if dist in ("uniform", "loguniform") and field_type is int:
        raise _err(path, key, f"the config field is an integer: use 'int' or 'choice', not '{dist}'")
    for f in ("low", "high"):
        if f not in entry:
            raise _err(path, key, f"a {dist} distribution needs '{f}'")
    low = _number(path, key, "low", entry["low"], dist == "int")
    high = _number(path, key, "high", entry["high"], dist == "int")
    if low >= high:
        raise _err(path, key, f"low ({low!r}) must be < high ({high!r})")
    if dist == "loguniform" and low <= 0:
        raise _err(path, key, f"a loguniform distribution needs low > 0, got {low!r}")
    return Param(key, dist, low=low, high=high, comment=comment)


def _check_against_config(path: str, param: Param, base: ExperimentConfig) -> Param:
    """Every value the distribution can produce at its edges must be a valid config value.

    Returns the parameter with choice values converted to the config field's type (``2`` → ``2.0``
    for a float field), so that sampled values and the defaults compare equal.
    """
    probes = list(param.values) if param.type == "choice" else [param.low, param.high]
    converted = []
    for value in probes:
        try:
            converted.append(flatten(replace(base, {param.key: value}))[param.key])
        except ConfigError as e:
            raise _err(path, param.key, f"value {value!r} is refused by the config: {e}") from e
    if param.type != "choice":
        return param
    for i, v in enumerate(converted):
        if any(_same(v, w) for w in converted[:i]):
            raise _err(path, param.key, f"choice value {param.values[i]!r} is listed twice (as {v!r})")
    return dataclasses.replace(param, values=tuple(converted))


def parse_search_space(
    data: Any,
    path: str = "<search space>",
    method: str = "lpcgma",
    base: ExperimentConfig | None = None,
) -> SearchSpace:
    """Validate a parsed search space mapping for `method` (and against `base` when given)."""
    if base is not None:
        method = base.method.name
    if method not in METHOD_CONFIGS:
        raise _err(path, "method.name", f"unknown method {method!r}; expected one of {sorted(METHOD_CONFIGS)}")
    if data is None or (isinstance(data, Mapping) and not data):
        raise _err(path, None, "the file is empty: it needs at least one 'dotted.key: {type: ...}' entry")
    if not isinstance(data, Mapping):
        raise _err(
            path,
            None,
            f"expected a mapping of dotted config keys to distributions, got {type(data).__name__}",
        )
    for key in data:
        if not isinstance(key, str):
            raise _err(path, str(key), "keys must be dotted config key strings, e.g. method.tau_pmc")
    if "method.name" in data:
        raise _err(
            path,
            "method.name",
            "the method is set by the base config (method.name=...), not searched: run one search per method",
        )
    valid = set(valid_keys(method))
    types = _field_types(method)
    cfg = base if base is not None else ExperimentConfig(method=METHOD_CONFIGS[method]())
    params: list[Param] = []
    for key, entry in data.items():
        if key not in valid:
            raise _err(path, key, f"unknown config key for method '{method}'; valid keys: {', '.join(sorted(valid))}")
        params.append(_check_against_config(path, _parse_entry(path, key, entry, types[key]), cfg))
    return SearchSpace(path, tuple(params))


def load_search_space(
    path: str | Path,
    method: str = "lpcgma",
    base: ExperimentConfig | None = None,
) -> SearchSpace:
    """Load and validate a search space file (or packaged name) for `method` / base config `base`."""
    try:
        file = resolve_search_space(path)
    except OSError as e:  # pragma: no cover - odd names on odd filesystems
        raise _err(str(path), None, f"cannot be read: {e}") from e
    shown = str(file)
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise _err(shown, None, f"cannot be read: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _err(shown, None, f"is not valid YAML: {e}") from e
    except (ValueError, RecursionError) as e:  # e.g. timestamps out of range, deep nesting
        raise _err(shown, None, f"is not valid YAML: {e}") from e
    return parse_search_space(data, shown, method, base)


def defaults_point(space: SearchSpace, cfg: ExperimentConfig) -> dict[str, Any]:
    """The literature defaults (the base config's value of every searched key), for ``points_to_evaluate``.

    A choice whose values do not include the default is refused: the defaults trial could not be run.
    Numeric defaults outside the bounds are kept (Optuna evaluates them and warns).
    """
    flat = flatten(cfg)
    point: dict[str, Any] = {}
    for p in space.params:
        value = flat[p.key]
        if p.type == "choice" and not p.contains(value):
            raise _err(
                space.path,
                p.key,
                f"the base config's value {value!r} is not among the choices {list(p.values)}: "
                "add it so the literature-defaults trial can run",
            )
        if p.type == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        point[p.key] = value
    return point


def values_close(a: Any, b: Any) -> bool:
    """Whether a sampled value equals a point's value: numbers up to float rounding, others by ``==``."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


def space_mapping(space: SearchSpace) -> dict[str, Any]:
    """`space` as the mapping a search space file holds (what `parse_search_space` reads back)."""
    out: dict[str, Any] = {}
    for p in space.params:
        entry: dict[str, Any] = {"type": p.type, "comment": p.comment}
        if p.type == "choice":
            entry["values"] = list(p.values)
        else:
            entry["low"], entry["high"] = p.low, p.high
        out[p.key] = entry
    return out


__all__ = [
    "DIST_TYPES",
    "Param",
    "SearchSpace",
    "SearchSpaceError",
    "defaults_point",
    "load_search_space",
    "packaged_search_spaces",
    "parse_search_space",
    "resolve_search_space",
    "space_mapping",
    "values_close",
]
