"""Self-training with an EMA teacher, confidence-weighted pseudo-labels and ClassMix (DACS).

L_base = CE(student(x_s), y_s) + λ_st · CE_w(student(x_t'), ŷ_t), x_t' the ClassMix-ed target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lpcgma.config import SelfTrainingConfig
from lpcgma.losses.segmentation import cross_entropy, pseudo_label_weight, pseudo_labels
from lpcgma.methods.base import Batch, Method, StepOutput
from lpcgma.methods.mixing import classmix_masks, mix
from lpcgma.methods.views import strong_view
from lpcgma.models import upsample_logits


@dataclass
class TargetPass:
    """What one self-training step computed on the target side (reused by subclasses)."""

    teacher_out: dict[str, Tensor]  # teacher outputs on the clean target
    pseudo: Tensor  # ŷ_t at input resolution [B,H,W]
    confidence: Tensor  # q_t [B,H,W]
    images: Tensor  # the (mixed) target images the student saw [B,3,H,W]
    student_out: dict[str, Tensor]  # student outputs on those images
    mixed_labels: Tensor  # labels of the mixed image [B,H,W]
    mix_mask: Tensor | None  # ClassMix paste mask [B,H,W] (True = source pixel)


class SelfTraining(Method):
    """DACS-style self-training: the common base of LPCGMA, SDCA and BiDA."""

    uses_teacher = True

    @property
    def mcfg(self) -> SelfTrainingConfig:
        assert isinstance(self.cfg.method, SelfTrainingConfig)
        return self.cfg.method

    def target_pass(self, source: Batch, target: Batch) -> tuple[Tensor, dict[str, Tensor], TargetPass]:
        """Teacher pseudo-labels, optional ClassMix, student forward and weighted target CE."""
        assert self.teacher is not None
        m = self.mcfg
        size = target["image"].shape[-2:]
        t_out = self.teacher(target["image"])
        pseudo, conf = pseudo_labels(upsample_logits(t_out["logits"], size))
        self.record_pseudo_labels(pseudo, conf, target, m.pseudo_threshold)
        weight = pseudo_label_weight(conf, m.pseudo_threshold, m.pseudo_weighting)
        images, labels, mask = target["image"], pseudo, None
        if m.classmix:
            mask = classmix_masks(source["mask"])
            images = mix(mask, source["image"], target["image"])
            labels = mix(mask, source["mask"], pseudo)
            weight = torch.where(mask, torch.ones_like(weight), weight)
        if m.strong_augment:
            images = strong_view(images, irrg_prob=0.0)
        s_out = self.forward_student(images)
        loss = cross_entropy(upsample_logits(s_out["logits"], size), labels, weight)
        logs = {"loss/target_st": loss.detach(), "pseudo/confident_frac": (conf >= m.pseudo_threshold).float().mean()}
        return loss, logs, TargetPass(t_out, pseudo, conf, images, s_out, labels, mask)

    def base_step(
        self, source: Batch, target: Batch
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor], TargetPass]:
        """L_base and its logs, plus the student's source outputs and the target pass."""
        src_loss, logs, src_out = self.supervised_loss(source, "source")
        if self.mcfg.lambda_st > 0:
            st_loss, st_logs, tp = self.target_pass(source, target)
        else:
            with torch.no_grad():
                st_loss, st_logs, tp = self.target_pass(source, target)
            st_loss = st_loss.detach() * 0
        logs.update(st_logs)
        return src_loss + self.mcfg.lambda_st * st_loss, logs, src_out, tp

    def train_step(self, source: Batch, target: Batch, step: int) -> StepOutput:
        loss, logs, _, _ = self.base_step(source, target)
        return StepOutput(loss, logs)
