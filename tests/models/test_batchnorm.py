"""Precise BN: running statistics recomputed as the plain average over fixed batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lpcgma.config import ModelConfig
from lpcgma.models import build_model
from lpcgma.models.batchnorm import batchnorm_layers, recompute_bn_stats


def test_running_statistics_become_the_average_of_the_per_batch_statistics() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=0.1)
    bn.running_mean.fill_(7.0)  # a history that must not survive
    bn.running_var.fill_(0.01)
    batches = [torch.randn(2, 3, 5, 5) * s + m for s, m in ((1.0, 0.0), (2.0, 3.0), (0.5, -1.0))]
    weight = bn.weight.detach().clone()
    bn.eval()
    assert recompute_bn_stats(bn, batches) == 3
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches])
    variances = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for b in batches])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.momentum == 0.1 and not bn.training  # momentum and mode restored
    torch.testing.assert_close(bn.weight, weight)  # weights untouched


def test_a_network_gets_the_same_statistics_whatever_its_history() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", pretrained=False, proj_dim=8), 3)
    batches = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    recompute_bn_stats(model, batches)
    first = [b.clone() for layer in batchnorm_layers(model) for b in (layer.running_mean, layer.running_var)]
    model.train()
    with torch.no_grad():  # other batches move the running averages ...
        for _ in range(3):
            model(torch.randn(2, 3, 32, 32) * 3 + 1)
    moved = [b for layer in batchnorm_layers(model) for b in (layer.running_mean, layer.running_var)]
    assert not all(torch.allclose(a, b) for a, b in zip(first, moved, strict=True))
    recompute_bn_stats(model, batches)  # ... and the same fixed batches bring them back exactly
    again = [b for layer in batchnorm_layers(model) for b in (layer.running_mean, layer.running_var)]
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)
    assert model.training  # the mode it was in


def test_no_batches_is_an_error_and_restores_the_momentum() -> None:
    bn = nn.BatchNorm1d(2, momentum=0.3)
    with pytest.raises(ValueError, match="no batches"):
        recompute_bn_stats(bn, [])
    assert bn.momentum == 0.3
