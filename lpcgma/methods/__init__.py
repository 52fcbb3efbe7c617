"""UDA methods by name: each owns its networks and state and computes one step's loss."""

from __future__ import annotations

from collections.abc import Sequence

from lpcgma.config import METHOD_CONFIGS, ConfigError, ExperimentConfig
from lpcgma.methods.base import Batch, Method, StepOutput
from lpcgma.methods.bida import BiDA
from lpcgma.methods.lpcgma import LPCGMA
from lpcgma.methods.sdca import SDCA
from lpcgma.methods.self_training import SelfTraining
from lpcgma.methods.source_only import Oracle, SourceOnly

METHODS: dict[str, type[Method]] = {
    "source_only": SourceOnly,
    "oracle": Oracle,
    "self_training": SelfTraining,
    "lpcgma": LPCGMA,
    "sdca": SDCA,
    "bida": BiDA,
}


def build_method(cfg: ExperimentConfig, class_names: Sequence[str]) -> Method:
    """The method named by `cfg.method.name`."""
    name = cfg.method.name
    if name not in METHODS:
        known = sorted(set(METHODS) | set(METHOD_CONFIGS))
        raise ConfigError(f"config key 'method.name' = {name!r} is not available: expected one of {known}")
    return METHODS[name](cfg, class_names)


__all__ = ["METHODS", "Batch", "Method", "StepOutput", "build_method"]
