"""Loss math in float32 whatever autocast context it is called from.

Under bf16/fp16 autocast (the trainer's `train.amp` on a GPU) matmuls run in half precision even on
float32 inputs. That breaks the terms whose values sit close together or far out: SDCA's variance
term (≈1e-5 beside a similarity of ≈1e-2 at τ = 100 is below bf16's resolution), Gaussian
log-likelihoods (hundreds, resolved to whole units in bf16), InfoNCE logits at τ = 0.1, and masks
with float32's lowest value (not representable in bf16). `float32` turns autocast off for the
call and casts its floating-point tensor arguments to float32; the network around it keeps its
mixed precision, and gradients flow back through the casts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])
_DEVICES = ("cuda", "cpu")


def _up(x: Any) -> Any:
    return x.float() if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != torch.float64 else x


def float32(fn: F) -> F:
    """Decorator: run `fn` with autocast off and its floating tensor arguments in float32 (float64 kept)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not any(torch.is_autocast_enabled(d) for d in _DEVICES):
            return fn(*args, **kwargs)
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*(_up(a) for a in args), **{k: _up(v) for k, v in kwargs.items()})

    return cast(F, wrapper)
