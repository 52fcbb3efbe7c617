"""Source-only training (the lower reference) and the oracle (trained on target labels)."""

from __future__ import annotations

import torch

from lpcgma.config import SourceOnlyConfig
from lpcgma.losses.contrast import sample_anchors, supervised_infonce
from lpcgma.losses.segmentation import downsample_labels
from lpcgma.methods.base import Batch, Method, StepOutput, pixel_rows

PROJECTION_ANCHORS = 1024  # pixels per step in the projection head's contrast (uniformly sampled)


class SourceOnly(Method):
    """Supervised CE on the labelled source domain only.

    With ``method.lambda_proj`` > 0 (the source stage's ``source_stage.projection_contrast``) the
    projection head also learns a supervised pixel contrast (temperature ``method.tau_proj``) on
    detached backbone features: the segmenter trains exactly as without it, and the embedding space
    a contrastive method starts from is no longer random.
    """

    student_domains = ("source",)

    def train_step(self, source: Batch, target: Batch, step: int) -> StepOutput:
        m = self.cfg.method
        assert isinstance(m, SourceOnlyConfig)
        if m.lambda_proj == 0:
            loss, logs, _ = self.supervised_loss(source, "source")
            return StepOutput(loss, logs)
        loss, logs, out = self.supervised_loss(source, "source", detach_embed=True)
        labels = downsample_labels(source["mask"], out["embed"].shape[-2:]).reshape(-1)
        uniform = torch.ones(self.num_classes, device=labels.device)
        keep = sample_anchors(labels, uniform, PROJECTION_ANCHORS)
        contrast = supervised_infonce(pixel_rows(out["embed"])[keep], labels[keep], m.tau_proj)
        logs["loss/projection"] = contrast.detach()
        return StepOutput(loss + m.lambda_proj * contrast, logs)


class Oracle(Method):
    """Supervised CE on the target domain's own labels: the upper reference no UDA method has."""

    student_domains = ("target",)

    def train_step(self, source: Batch, target: Batch, step: int) -> StepOutput:
        loss, logs, _ = self.supervised_loss(target, "target")
        return StepOutput(loss, logs)
