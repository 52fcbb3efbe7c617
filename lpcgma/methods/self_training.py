"""Self-training with an EMA teacher, confidence-weighted pseudo-labels and ClassMix (DACS).

L_base = CE(student(x_s), y_s) + λ_st · CE_w(student(x_t'), ŷ_t), x_t' the ClassMix-ed target.
With ``method.pseudo_prior=em`` the teacher's probabilities are moved to the target's class prior
(estimated online by EM) before ŷ_t and its confidence are taken (`lpcgma.losses.label_shift`).
With ``method.class_thresholds`` the threshold δ of the weighting is per class, δ_c = a running
median of q over the pixels labelled c, capped at δ (`lpcgma.losses.offline_pseudo_labels`).
With ``method.teacher_scales`` the teacher's probabilities are averaged over resized copies of the
target crop before anything else reads them (multi-scale pseudo-labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lpcgma.config import ExperimentConfig, SelfTrainingConfig
from lpcgma.losses.contrast import update_class_freq
from lpcgma.losses.label_shift import em_prior_step, prior_corrected_probs
from lpcgma.losses.offline_pseudo_labels import running_class_thresholds
from lpcgma.losses.segmentation import cross_entropy, pseudo_label_weight
from lpcgma.methods.base import Batch, Method, StepOutput
from lpcgma.methods.mixing import classmix_masks, mix
from lpcgma.methods.views import strong_view
from lpcgma.models import upsample_logits


@dataclass
class TargetPass:
    """What one self-training step computed on the target side (reused by subclasses)."""

    teacher_out: dict[str, Tensor]  # teacher outputs on the clean target (+ LPCGMA: source_embed)
    pseudo: Tensor  # ŷ_t at input resolution [B,H,W]
    confidence: Tensor  # q_t [B,H,W]
    images: Tensor  # the (mixed) target images the student saw [B,3,H,W]
    student_out: dict[str, Tensor]  # student outputs on those images
    mixed_labels: Tensor  # labels of the mixed image [B,H,W]
    mix_mask: Tensor | None  # ClassMix paste mask [B,H,W] (True = source pixel)


class SelfTraining(Method):
    """DACS-style self-training: the common base of LPCGMA, SDCA and BiDA."""

    uses_teacher = True
    source_prior: Tensor  # running class frequencies of the source labels [C] (pseudo_prior=em only)
    target_prior: Tensor  # online-EM estimate of the target's class frequencies [C] (pseudo_prior=em only)
    prior_steps: Tensor  # EM steps taken (0: the priors start from the next source batch)
    class_threshold: Tensor  # running per-class confidence thresholds δ_c [C] (class_thresholds only)

    def __init__(self, cfg: ExperimentConfig, class_names: Sequence[str]) -> None:
        super().__init__(cfg, class_names)
        if self.options.pseudo_prior == "em":  # checkpointed: a resumed run continues its estimates
            uniform = torch.full((self.num_classes,), 1.0 / self.num_classes)
            self.register_buffer("source_prior", uniform.clone())
            self.register_buffer("target_prior", uniform.clone())
            self.register_buffer("prior_steps", torch.zeros((), dtype=torch.long))
        if self.options.class_thresholds:  # checkpointed too; every class starts at δ
            self.register_buffer("class_threshold", torch.full((self.num_classes,), self.options.pseudo_threshold))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: Tensor) -> Tensor:
        """The teacher's class probabilities [B,C,…] for pseudo-labels: as they are, or (``em``)
        moved from the running source prior to the running target prior."""
        probs = teacher_logits.detach().float().softmax(dim=1)
        if self.options.pseudo_prior != "em":
            return probs
        return prior_corrected_probs(probs, self.target_prior, self.source_prior)

    @torch.no_grad()
    def pseudo_labels(self, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Pseudo-labels ŷ and their confidence q = max of `teacher_probs`, both [B,…]."""
        conf, labels = self.teacher_probs(teacher_logits).max(dim=1)
        return labels, conf

    @torch.no_grad()
    def update_priors(self, source_labels: Tensor, target_logits: Tensor) -> None:
        """``em`` only: the source prior follows the running class frequency of the source labels, the
        target prior takes one online EM step on this target batch. Both start from the first source batch."""
        if self.options.pseudo_prior != "em":
            return
        momentum = self.options.prior_momentum
        if int(self.prior_steps) == 0:  # both priors start from the first source batch's frequencies
            self.source_prior.copy_(update_class_freq(self.source_prior, source_labels, 0.0))
            self.target_prior.copy_(self.source_prior)
        else:
            self.source_prior.copy_(update_class_freq(self.source_prior, source_labels, momentum))
        corrected = self.teacher_probs(target_logits)
        self.target_prior.copy_(em_prior_step(self.target_prior, corrected, momentum))
        self.prior_steps += 1

    @torch.no_grad()
    def confidence_threshold(self, pseudo: Tensor, confidence: Tensor) -> float | Tensor:
        """The threshold each pseudo-label's confidence is compared with: δ, or (``class_thresholds``)
        δ_{ŷ} per pixel [B,H,W] after one running update of δ_c on this batch."""
        m = self.options
        if not m.class_thresholds:
            return m.pseudo_threshold
        self.class_threshold.copy_(
            running_class_thresholds(
                self.class_threshold, confidence, pseudo, m.pseudo_threshold, m.class_threshold_momentum
            )
        )
        return self.class_threshold[pseudo]

    def diagnostics(self) -> dict[str, float]:
        report = super().diagnostics()
        if self.options.class_thresholds:
            for name, delta in zip(self.class_names, self.class_threshold.tolist(), strict=True):
                report[f"threshold/{name}"] = delta
        if self.options.pseudo_prior == "em":  # the estimates, beside pseudo/true_share when labels exist
            for name, p in zip(self.class_names, self.target_prior.tolist(), strict=True):
                report[f"prior/target/{name}"] = p
        return report

    @property
    def options(self) -> SelfTrainingConfig:
        """This method's own config section (`cfg.method`), typed."""
        assert isinstance(self.cfg.method, SelfTrainingConfig)
        return self.cfg.method

    @torch.no_grad()
    def teacher_forward(self, source: Batch, target: Batch) -> dict[str, Tensor]:
        """The teacher's outputs on the clean target images (a subclass that also needs the teacher on
        the source runs both here, in one pass)."""
        assert self.teacher is not None
        return self.teacher(target["image"])  # type: ignore[no-any-return]

    @torch.no_grad()
    def multiscale_teacher_logits(self, images: Tensor, logits: Tensor) -> Tensor:
        """The teacher's target logits [B,C,h,w] as every later use takes them: `logits` (its output on
        `images`) as they are, or with ``method.teacher_scales`` ≠ (1,) the log of its class
        probabilities averaged over `images` resized by each factor, at the logits' resolution."""
        scales = self.options.teacher_scales
        if tuple(scales) == (1.0,):
            return logits
        assert self.teacher is not None
        size = logits.shape[-2:]
        total = torch.zeros_like(logits, dtype=torch.float32)
        for scale in scales:
            if scale == 1.0:
                scaled = logits
            else:
                resized = F.interpolate(images, scale_factor=scale, mode="bilinear", antialias=scale < 1)
                scaled = upsample_logits(self.teacher(resized)["logits"], size)
            total += scaled.float().softmax(dim=1)
        return (total / len(scales)).clamp_min(1e-12).log()

    def target_pass(self, source: Batch, target: Batch) -> tuple[Tensor, dict[str, Tensor], TargetPass]:
        """Teacher pseudo-labels, optional ClassMix, student forward and weighted target CE."""
        m = self.options
        size = target["image"].shape[-2:]
        t_out = self.teacher_forward(source, target)
        t_out["logits"] = self.multiscale_teacher_logits(target["image"], t_out["logits"])
        self.update_priors(source["mask"], t_out["logits"])
        pseudo, conf = self.pseudo_labels(upsample_logits(t_out["logits"], size))
        threshold = self.confidence_threshold(pseudo, conf)
        self.record_pseudo_labels(pseudo, conf, target, threshold)
        weight = pseudo_label_weight(conf, threshold, m.pseudo_weighting)
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
        logs = {"loss/target_st": loss.detach(), "pseudo/confident_frac": (conf >= threshold).float().mean()}
        return loss, logs, TargetPass(t_out, pseudo, conf, images, s_out, labels, mask)

    def base_step(
        self, source: Batch, target: Batch
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor], TargetPass]:
        """L_base and its logs, plus the student's source outputs and the target pass."""
        src_loss, logs, src_out = self.supervised_loss(source, "source")
        if self.options.lambda_st > 0:
            st_loss, st_logs, tp = self.target_pass(source, target)
        else:
            with torch.no_grad():
                st_loss, st_logs, tp = self.target_pass(source, target)
            st_loss = st_loss.detach() * 0
        logs.update(st_logs)
        return src_loss + self.options.lambda_st * st_loss, logs, src_out, tp

    def train_step(self, source: Batch, target: Batch, step: int) -> StepOutput:
        loss, logs, _, _ = self.base_step(source, target)
        return StepOutput(loss, logs)
