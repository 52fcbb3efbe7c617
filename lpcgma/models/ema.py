"""Exponential-moving-average teacher of a student network (mean teacher)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher(nn.Module):
    """A frozen copy of the student, updated as θ_t ← m·θ_t + (1−m)·θ_s after each step.

    The momentum ramps as min(m, (step+1)/(step+10)) so that the teacher tracks the early student.
    Buffers (BatchNorm statistics) are copied. On every DDP rank the update is identical because
    the students are identical after each synchronised step.
    """

    def __init__(self, student: nn.Module, momentum: float) -> None:
        super().__init__()
        self.net = copy.deepcopy(student)
        self.net.requires_grad_(False)
        self.net.eval()
        self.momentum = momentum

    def train(self, mode: bool = True) -> EMATeacher:  # the teacher always predicts in eval mode
        super().train(mode)
        self.net.eval()
        return self

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        m = min(self.momentum, (step + 1) / (step + 10))
        t_params: list[torch.Tensor] = list(self.net.parameters())
        s_params: list[torch.Tensor] = [p.detach() for p in student.parameters()]
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, s_params, alpha=1 - m)
        self.copy_buffers(student)

    @torch.no_grad()
    def copy_buffers(self, student: nn.Module) -> None:
        """The teacher's buffers (BatchNorm statistics) become the student's."""
        for tb, sb in zip(self.net.buffers(), student.buffers(), strict=True):
            tb.copy_(sb)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x)  # type: ignore[no-any-return]
