"""BatchNorm running statistics: their update momentum, and "precise BN" (recomputing them).

In eval mode a BatchNorm layer normalises with running statistics, an exponential moving average of
the last training batches' statistics (PyTorch's momentum 0.1: about the last ten batches). With
small batches those are noisy, so an evaluation also measures *which* batches came last. Precise BN
(Detectron2's ``PreciseBN``, pycls, ``torch.optim.swa_utils.update_bn``) replaces them by the plain
average over a fixed set of batches, with the weights fixed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lpcgma import comm

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """Every BatchNorm layer of `model` updates its running statistics with `momentum`."""
    for m in batchnorm_layers(model):
        m.momentum = momentum


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Set every BatchNorm layer's running mean and variance to the average, over `batches`, of
    the per-batch mean and (unbiased) variance of its input; returns the number of batches.

    The model runs in train mode, without gradients, on each batch; momenta and the train/eval mode
    are restored afterwards, weights are not touched. With torch.distributed initialised each rank
    passes its own batches (as many as the others) and the statistics are averaged over ranks, so
    that every rank ends with the same buffers.
    """
    layers = batchnorm_layers(model)
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: batch k enters with weight 1/k
    model.train()
    n = 0
    try:
        for x in batches:
            model(x)
            n += 1
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    if n == 0:
        raise ValueError("recompute_bn_stats: no batches were given")
    for m in layers:
        if m.running_mean is not None and m.running_var is not None:
            comm.all_reduce_mean_(m.running_mean)
            comm.all_reduce_mean_(m.running_var)
    return n
