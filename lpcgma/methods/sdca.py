"""SDCA (Li et al., 2021): semantic distribution-aware contrastive adaptation.

Source CE + the closed-form distribution-aware contrastive bound against per-class source feature
statistics (exact cumulative pooled mean and diagonal variance), at feature level (the projection
embeddings) and at logit level, on source pixels (labels) and confident target pixels (the
model's own predictions, q ≥ 0.9). Statistics are initialised by one pass of the (source-only
initialised: ``model.init_checkpoint``) network over the source set, then updated every step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from lpcgma import comm
from lpcgma.config import ExperimentConfig, SDCAConfig
from lpcgma.losses.distribution import confident_pseudo_labels, pooled_stats_update, sdca_loss
from lpcgma.losses.segmentation import downsample_labels
from lpcgma.methods.base import Batch, Method, StepOutput, pixel_rows


class SDCA(Method):
    """See the module docstring; no EMA teacher (as in the released code)."""

    feat_mean: Tensor
    feat_var: Tensor
    logit_mean: Tensor
    logit_var: Tensor

    def __init__(self, cfg: ExperimentConfig, class_names: Sequence[str]) -> None:
        super().__init__(cfg, class_names)
        c, d = self.num_classes, cfg.model.proj_dim
        for level, dim in (("feat", d), ("logit", c)):
            self.register_buffer(f"{level}_count", torch.zeros(c, dtype=torch.float64))
            self.register_buffer(f"{level}_mean", torch.zeros(c, dim))
            self.register_buffer(f"{level}_var", torch.zeros(c, dim))

    @property
    def scfg(self) -> SDCAConfig:
        assert isinstance(self.cfg.method, SDCAConfig)
        return self.cfg.method

    @torch.no_grad()
    def _update_stats(self, out: dict[str, Tensor], labels: Tensor) -> None:
        """Fold source pixels (all ranks' pixels, so statistics stay identical) into the statistics."""
        y = comm.all_gather_cat(downsample_labels(labels, out["logits"].shape[-2:]).reshape(-1))
        for level, key in (("feat", "embed"), ("logit", "logits")):
            x = comm.all_gather_cat(pixel_rows(out[key]).detach().float())
            count, mean, var = pooled_stats_update(
                getattr(self, f"{level}_count"), getattr(self, f"{level}_mean"), getattr(self, f"{level}_var"), x, y
            )
            getattr(self, f"{level}_count").copy_(count)
            getattr(self, f"{level}_mean").copy_(mean)
            getattr(self, f"{level}_var").copy_(var)

    @torch.no_grad()
    def prepare(self, source_batches: Iterator[Batch], num_source_tiles: int) -> None:
        m = self.scfg
        n = m.sdca_init_batches or max(1, num_source_tiles // self.cfg.data.batch_size)
        self.student.eval()
        for _ in range(n):
            batch = next(source_batches)
            self._update_stats(self.student(batch["image"]), batch["mask"])
        self.student.train()

    def _terms(self, out: dict[str, Tensor], labels_f: Tensor) -> Tensor:
        m = self.scfg
        y = labels_f.reshape(-1)
        feat = sdca_loss(pixel_rows(out["embed"]), y, self.feat_mean, self.feat_var, m.sdca_tau, m.sdca_normalize_stats)
        logit = sdca_loss(
            pixel_rows(out["logits"]), y, self.logit_mean, self.logit_var, m.sdca_tau, m.sdca_normalize_stats
        )
        return m.lambda_feat * feat + m.lambda_logit * logit

    def train_step(self, source: Batch, target: Batch, step: int) -> StepOutput:
        m = self.scfg
        ce, logs, src_out = self.supervised_loss(source, "source")
        y_src = downsample_labels(source["mask"], src_out["logits"].shape[-2:])
        tgt_out = self.forward_student(target["image"])
        y_tgt, _ = confident_pseudo_labels(tgt_out["logits"], m.sdca_target_threshold)
        l_src = self._terms(src_out, y_src)
        l_tgt = self._terms(tgt_out, y_tgt)
        self._update_stats(src_out, source["mask"])
        logs.update({"loss/sdca_source": l_src.detach(), "loss/sdca_target": l_tgt.detach()})
        logs["pseudo/confident_frac"] = (y_tgt != 255).float().mean()
        return StepOutput(ce + l_src + l_tgt, logs)
