"""The loss math runs in float32 under bf16 autocast (the trainer's mixed precision on a GPU).

CPU autocast with bfloat16 reproduces what `train.amp` does on a GPU: matmuls drop to bf16 even on
float32 inputs. Every decorated function must give exactly its float32 result inside autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lpcgma.losses.bidirectional import class_prototypes, dynamic_pseudo_labels, prototype_contrast_loss
from lpcgma.losses.contrast import pixel_view_contrast, supervised_infonce
from lpcgma.losses.distribution import class_moments, sdca_logits, sdca_loss
from lpcgma.losses.gmm import batched_em, class_scores, forward_alignment_loss, gmm_mean_log_likelihood
from lpcgma.losses.precision import float32

C, D, N = 4, 16, 96
gen = torch.Generator().manual_seed(0)
Z = F.normalize(torch.randn(N, D, generator=gen), dim=1)
Z2 = F.normalize(Z + 0.1 * torch.randn(N, D, generator=gen), dim=1)
Y = torch.randint(0, C, (N,), generator=gen)
MEAN, VAR = torch.randn(C, D, generator=gen), torch.rand(C, D, generator=gen) + 0.1
X = F.normalize(torch.randn(C, 64, D, generator=gen), dim=-1)
VALID = torch.ones(C, 64, dtype=torch.bool)
GMM = batched_em(X, VALID, 2, 5, 1e-4, generator=torch.Generator().manual_seed(0))
PROTOS, PRESENT = class_prototypes(Z, Y, C)

CASES: dict[str, Callable[[], Any]] = {
    "supervised_infonce": lambda: supervised_infonce(Z, Y, 0.1),
    "pixel_view_contrast": lambda: pixel_view_contrast(Z, Z2, Y, 0.1),
    "sdca_logits": lambda: sdca_logits(Z, MEAN, VAR, 100.0),
    "sdca_loss": lambda: sdca_loss(Z, Y, MEAN, VAR, 100.0),
    "class_moments": lambda: class_moments(Z, Y, C),
    "class_scores": lambda: class_scores(Z, GMM),
    "forward_alignment_loss": lambda: forward_alignment_loss(Z, Y, torch.ones(N), GMM, 0.1, 0.5, True),
    "gmm_mean_log_likelihood": lambda: gmm_mean_log_likelihood(X, VALID, GMM),
    "batched_em": lambda: batched_em(X, VALID, 2, 3, 1e-4, generator=torch.Generator().manual_seed(1)),
    "class_prototypes": lambda: class_prototypes(Z, Y, C),
    "prototype_contrast_loss": lambda: prototype_contrast_loss(Z, Y, PROTOS, PRESENT.float(), 10.0, PRESENT),
    "dynamic_pseudo_labels": lambda: dynamic_pseudo_labels(Z2, PROTOS, PRESENT),
}


def _flat(x: Any) -> list[torch.Tensor]:
    return [t for v in x for t in _flat(v)] if isinstance(x, tuple) else [x]


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_gives_its_float32_result_inside_bf16_autocast(name: str) -> None:
    expected = _flat(CASES[name]())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _flat(CASES[name]())
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=name)


def test_bf16_autocast_would_change_these_results() -> None:
    """The premise: without the decorator, autocast drops SDCA's variance term below resolution."""
    raw = sdca_logits.__wrapped__  # type: ignore[attr-defined]
    exact = raw(Z, MEAN, VAR, 100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = raw(Z, MEAN, VAR, 100.0)
    assert rounded.dtype == torch.bfloat16
    assert (rounded.float() - exact).abs().max() > 1e-5


def test_float32_keeps_float64_and_casts_half_inputs() -> None:
    @float32
    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b

    a = torch.randn(3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul(a, a).dtype == torch.float32
        assert matmul(a.bfloat16(), a).dtype == torch.float32
        assert matmul(a.double(), a.double()).dtype == torch.float64
    assert matmul(a, a).dtype == torch.float32  # outside autocast: called as is
