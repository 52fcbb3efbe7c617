"""UDA methods by name: each owns its networks and state and computes one step's loss."""

from __future__ import annotations

from lpcgma.config import METHOD_CONFIGS, ConfigError, ExperimentConfig
from lpcgma.methods.base import Batch, Method, StepOutput
from lpcgma.methods.self_training import SelfTraining
from lpcgma.methods.source_only import Oracle, SourceOnly

METHODS: dict[str, type[Method]] = {
    "source_only": SourceOnly,
    "oracle": Oracle,
    "self_training": SelfTraining,
}


def build_method(cfg: ExperimentConfig, num_classes: int) -> Method:
    """The method named by `cfg.method.name`."""
    name = cfg.method.name
    if name not in METHODS:
        known = sorted(set(METHODS) | set(METHOD_CONFIGS))
        raise ConfigError(f"config key 'method.name' = {name!r} is not available: expected one of {known}")
    return METHODS[name](cfg, num_classes)


__all__ = ["METHODS", "Batch", "Method", "StepOutput", "build_method"]
