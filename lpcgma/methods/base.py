"""The method seam: a UDA method owns its networks and state and computes one step's loss."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lpcgma.config import ExperimentConfig, OptimConfig
from lpcgma.losses.pseudo_quality import pseudo_label_counts, pseudo_label_report
from lpcgma.losses.segmentation import downsample_labels
from lpcgma.models import EMATeacher, build_model, upsample_logits

Batch = dict[str, Tensor]


def model_weights(method_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model in a checkpoint's method state, as one network's state dict: the weight average's
    (``average.net.*``, kept with ``train.eval_ema`` > 0) when present, else the student's."""
    for prefix in ("average.net.", "student."):
        weights = {k.removeprefix(prefix): v for k, v in method_state.items() if k.startswith(prefix)}
        if weights:
            return weights
    return {}


def pixel_rows(t: Tensor) -> Tensor:
    """Feature maps [B, D, h, w] → one row per pixel [B·h·w, D]."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


@dataclass
class StepOutput:
    """The loss to back-propagate and scalar tensors to log (kept as tensors: no host sync)."""

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """Base of every method: a student network, optionally an EMA teacher, and method state.

    Subclasses implement `train_step`; everything they must checkpoint is a submodule or buffer.
    With ``train.eval_ema`` > 0 the method also keeps `average`, an exponential moving average of the
    student's weights: the network that is evaluated, saved as the model and promoted (`eval_net`).
    The trainer may route the student's forward through a DDP wrapper (`set_student_forward`)
    without the wrapper entering `state_dict`.
    """

    uses_teacher: bool = False
    student_domains: tuple[str, ...] = ("source", "target")  # the domains whose images the student trains on
    pseudo_counts: Tensor  # pseudo-label diagnostics since the last report [2, C, C] (not checkpointed)

    def __init__(self, cfg: ExperimentConfig, class_names: Sequence[str]) -> None:
        super().__init__()
        self.cfg = cfg
        self.class_names = list(class_names)
        num_classes = self.num_classes = len(class_names)
        self.student = build_model(cfg.model, num_classes)
        self.teacher = EMATeacher(self.student, cfg.model.ema_momentum) if self.uses_teacher else None
        self.average = EMATeacher(self.student, cfg.train.eval_ema) if cfg.train.eval_ema > 0 else None
        self._student_forward: list[nn.Module] = [self.student]  # a list keeps DDP out of state_dict
        counts = torch.zeros(2, num_classes, num_classes, dtype=torch.long)
        self.register_buffer("pseudo_counts", counts, persistent=False)

    def set_student_forward(self, module: nn.Module) -> None:
        """Route student forward passes through `module` (e.g. DistributedDataParallel(student))."""
        self._student_forward = [module]

    @property
    def eval_net(self) -> nn.Module:
        """The network evaluated and saved as the model: the weight average, else the student."""
        return self.student if self.average is None else self.average.net

    def forward_student(self, images: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        return self._student_forward[0](images, **kwargs)  # type: ignore[no-any-return]

    def train_step(self, source: Batch, target: Batch, step: int) -> StepOutput:
        raise NotImplementedError

    def prepare(self, source_batches: Iterator[Batch], num_source_tiles: int) -> None:
        """Called once before the first step of a fresh run (not on resume): e.g. SDCA's
        initial statistics pass. `source_batches` yields batches already on the device."""

    def load_student(self, state: dict[str, Tensor]) -> None:
        """Initialise every network (student, teacher, weight average) from the model of a
        checkpoint's method state (`model_weights`)."""
        weights = model_weights(state)
        for copy in (self.student, self.teacher, self.average):
            if copy is not None:
                (copy.net if isinstance(copy, EMATeacher) else copy).load_state_dict(weights)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after each optimiser step (EMA teacher update and any state refinement)."""
        for ema in (self.teacher, self.average):
            if ema is not None:
                ema.update(self.student, step)

    @torch.no_grad()
    def record_pseudo_labels(
        self, pseudo: Tensor, confidence: Tensor, target: Batch, threshold: float | Tensor
    ) -> None:
        """Count target pseudo-labels [B, h, w] (and which pass `threshold`, a number or per pixel)
        against the target masks, for the diagnostics of `lpcgma.losses.pseudo_quality`; nothing without
        target labels. Never a training signal: the counts only feed `diagnostics()`. No host sync."""
        if not self.cfg.data.target_labels:
            return
        truth = target["mask"]
        if truth.shape[-2:] != pseudo.shape[-2:]:
            truth = downsample_labels(truth, pseudo.shape[-2:])
        self.pseudo_counts += pseudo_label_counts(pseudo, confidence, truth, threshold, self.num_classes)

    def pseudo_label_confusion(self) -> Tensor | None:
        """The pseudo-label counts since the last `diagnostics()` report, [2, C, C] on the CPU ([0] every
        labelled target pixel, [1] the confident ones; rows: true class, columns: pseudo-label), or None
        when nothing was counted (no target labels, or a method without pseudo-labels). A copy: read it
        before `diagnostics()`, which resets the counts."""
        counts = self.pseudo_counts.detach().cpu().clone()
        return counts if int(counts[0].sum()) > 0 else None

    def diagnostics(self) -> dict[str, float]:
        """Method metrics reported at each evaluation: the base reports the pseudo-label diagnostics
        of the steps since the last report (this rank's batches; `record_pseudo_labels`) and resets them."""
        report = pseudo_label_report(self.pseudo_counts, self.class_names)
        self.pseudo_counts.zero_()
        return report

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        """Backbone at the base LR, decoder and heads at ×head_lr_mult."""
        groups: list[dict[str, Any]] = [
            {"params": self.student.encoder_parameters(), "lr": optim.lr, "name": "encoder"},
            {"params": self.student.head_parameters(), "lr": optim.lr * optim.head_lr_mult, "name": "head"},
        ]
        return groups

    def supervised_loss(
        self, batch: Batch, prefix: str, **forward_kwargs: Any
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """CE of the student on a labelled batch; returns (loss, logs, student outputs)."""
        from lpcgma.losses.segmentation import cross_entropy

        out = self.forward_student(batch["image"], **forward_kwargs)
        logits = upsample_logits(out["logits"], batch["mask"].shape[-2:])
        loss = cross_entropy(logits, batch["mask"])
        return loss, {f"loss/{prefix}_ce": loss.detach()}, out
