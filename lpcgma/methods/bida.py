"""BiDA (Lee et al., 2022): bi-directional pixel-prototype contrast with dynamic pseudo-labels.

Features are the ASPP branch outputs concatenated (as in the released code). Per image: source
prototypes from labels, target prototypes from the target pseudo-labels (the teacher classifier's,
or with ``bida_hybrid_rule=agree`` the hybrid ones: those that agree with the non-parametric label
transfer to calibrated source prototypes). Forward contrast
(target pixels vs source prototypes) and backward contrast (source pixels vs target prototypes),
cosine logits ×10, classes present in both images only. Loss (code defaults):
CE_s + 0.3·CE_t + 0.4·entropy + 0.2·(FCL + BCL). Where the paper's description and the released
code differ, the defaults follow the released code (undetached prototypes, absent classes at cosine
−1, the classifier's static labels, no calibration, its entropy term) and the paper's choices are
options (`bida_*` keys; docs/METHODS.md lists each difference, RESULTS.md measures both).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lpcgma import comm
from lpcgma.config import BiDAConfig, ExperimentConfig
from lpcgma.losses.bidirectional import (
    RELEASED_TARGET_ENTROPY_WEIGHT,
    AbsentRule,
    calibration_alpha,
    class_prototypes,
    dynamic_pseudo_labels,
    entropy_loss,
    hybrid_pseudo_labels,
    prototype_contrast_loss,
    released_entropy_loss,
    update_bias,
)
from lpcgma.losses.segmentation import cross_entropy, downsample_labels, pseudo_labels
from lpcgma.methods.base import Batch, Method, StepOutput


def _pixels(t: Tensor) -> Tensor:
    """[B, D, h, w] → [B, h·w, D]."""
    return t.flatten(2).transpose(1, 2)


class BiDA(Method):
    """See the module docstring."""

    uses_teacher = True
    bias: Tensor  # class-wise domain bias b_k (buffer)

    def __init__(self, cfg: ExperimentConfig, class_names: Sequence[str]) -> None:
        super().__init__(cfg, class_names)
        dim = self.num_classes * len(cfg.model.aspp_dilations)
        self.register_buffer("bias", torch.zeros(self.num_classes, dim))

    @property
    def options(self) -> BiDAConfig:
        """This method's own config section (`cfg.method`), typed."""
        assert isinstance(self.cfg.method, BiDAConfig)
        return self.cfg.method

    def train_step(self, source: Batch, target: Batch, step: int) -> StepOutput:
        m = self.options
        ce_s, logs, src_out = self.supervised_loss(source, "source")
        tgt_out = self.forward_student(target["image"])
        size = src_out["logits"].shape[-2:]
        y_s = downsample_labels(source["mask"], size).flatten(1)  # [B, N]
        f_s, f_t = _pixels(src_out["aspp"]), _pixels(tgt_out["aspp"])
        assert self.teacher is not None
        static, static_conf = pseudo_labels(self.teacher(target["image"])["logits"])
        protos_s, present_s = class_prototypes(f_s, y_s, self.num_classes)  # [B, C, D]
        if m.bida_hybrid_rule == "static":  # the classifier's labels alone: no label transfer to compute
            hybrid = static.flatten(1)
        else:
            alpha = calibration_alpha(step, self.cfg.train.iters) if m.bida_calibration else 0.0
            dynamic, dyn_conf = dynamic_pseudo_labels(
                f_t.detach(), protos_s.detach(), present_s, m.bida_scale, m.bida_dynamic_threshold, self.bias, alpha
            )
            hybrid = hybrid_pseudo_labels(
                static.flatten(1), static_conf.flatten(1), dynamic, dyn_conf, m.bida_hybrid_rule
            )
        # diagnostics: the hybrid labels where kept ("confident"), the teacher's elsewhere
        kept = (hybrid != 255).view_as(static)
        self.record_pseudo_labels(torch.where(kept, hybrid.view_as(static), static), kept.float(), target, 0.5)
        protos_t, present_t = class_prototypes(f_t, hybrid, self.num_classes)
        both = present_s & present_t
        weight = both.float()
        anchors_s, anchors_t = (protos_s, protos_t)  # undetached: the released code
        if m.bida_detach_prototypes:
            anchors_s, anchors_t = protos_s.detach(), protos_t.detach()
        absent = m.bida_absent_prototypes
        mask_s, mask_t = (None, None) if absent == "zero" else (present_s, present_t)
        rule: AbsentRule = "negative" if absent == "negative" else "drop"
        fcl = prototype_contrast_loss(f_t, hybrid, anchors_s, weight, m.bida_scale, mask_s, rule)
        bcl = prototype_contrast_loss(f_s, y_s, anchors_t, weight, m.bida_scale, mask_t, rule)
        logits_t = tgt_out["logits"]
        ce_t = cross_entropy(logits_t, hybrid.view(-1, *size))
        if m.bida_entropy == "released":
            h_s, h_t = released_entropy_loss(src_out["logits"]), released_entropy_loss(logits_t)
            ent = h_s + RELEASED_TARGET_ENTROPY_WEIGHT * h_t
        else:
            ent = entropy_loss(logits_t)
        if m.bida_calibration:  # the bias only shifts the dynamic labels' prototypes (one all-reduce a step)
            with torch.no_grad():
                new_bias = update_bias(self.bias, protos_t, protos_s, both, m.bida_bias_momentum)
                self.bias.copy_(comm.all_reduce_mean_(new_bias))
        loss = ce_s + m.lambda_st * ce_t + m.lambda_entropy * ent + m.lambda_contrast * (fcl + bcl)
        logs.update(
            {
                "loss/target_st": ce_t.detach(),
                "loss/entropy": ent.detach(),
                "loss/fcl": fcl.detach(),
                "loss/bcl": bcl.detach(),
                "pseudo/hybrid_frac": (hybrid != 255).float().mean(),
            }
        )
        return StepOutput(loss, logs)
