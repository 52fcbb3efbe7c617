"""LPCGMA: self-training + local pixel contrast (PMC, PIX) + global Gaussian multiprototype alignment.

L = L_base + λ_pmc·L_PMC + λ_pix·L_PIX + λ_fwd·L_FWD; reverse alignment moves the prototypes after
each optimiser step. Every term has a switch (``method.use_pmc`` …) so ablations are config changes;
the GMM terms start after ``method.gmm_warmup_iters``. See docs/METHODS.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lpcgma import comm
from lpcgma.config import ExperimentConfig, LPCGMAConfig
from lpcgma.losses.contrast import (
    anchor_keep_probs,
    pixel_view_contrast,
    sample_anchor_slots,
    sample_anchors,
    supervised_infonce,
    update_class_freq,
)
from lpcgma.losses.gmm import forward_alignment_loss
from lpcgma.losses.segmentation import IGNORE_INDEX, downsample_labels
from lpcgma.methods.base import Batch, StepOutput, pixel_rows
from lpcgma.methods.self_training import SelfTraining, TargetPass
from lpcgma.methods.views import strong_view
from lpcgma.prototypes import GaussianPrototypes

log = logging.getLogger(__name__)


class LPCGMA(SelfTraining):
    """The product's method; see the module docstring."""

    class_freq: Tensor  # running class frequencies ν_c (buffer)

    def __init__(self, cfg: ExperimentConfig, class_names: Sequence[str]) -> None:
        super().__init__(cfg, class_names)
        num_classes = self.num_classes
        m = self.options
        self.register_buffer("class_freq", torch.zeros(num_classes))
        self.prototypes = GaussianPrototypes(
            num_classes,
            cfg.model.proj_dim,
            m.gaussians_per_class,
            m.gmm_memory_per_class,
            m.gmm_var_floor,
            push_per_class=m.gmm_push_per_class,
        )
        self._last: dict[str, Tensor] = {}  # features of the latest step, for reverse update & diagnostics
        if (m.use_gmm_forward or m.use_gmm_reverse) and m.gmm_warmup_iters >= cfg.train.iters:
            log.warning(
                "method.gmm_warmup_iters=%d >= train.iters=%d: the Gaussian terms (forward alignment, reverse "
                "update) never run in this run; lower method.gmm_warmup_iters (e.g. 50 for 400 steps)",
                m.gmm_warmup_iters,
                cfg.train.iters,
            )

    @property
    def options(self) -> LPCGMAConfig:
        """This method's own config section (`cfg.method`), typed."""
        assert isinstance(self.cfg.method, LPCGMAConfig)
        return self.cfg.method

    @torch.no_grad()
    def teacher_forward(self, source: Batch, target: Batch) -> dict[str, Tensor]:
        """The teacher on the clean target and, when the Gaussian memory takes teacher features of the
        source, on the source too: one forward over both batches (exact, the teacher runs in eval
        mode: no batch statistics), the source embeddings returned as ``source_embed``."""
        m = self.options
        memory_from_teacher = (m.use_gmm_forward or m.use_gmm_reverse) and m.gmm_memory_features == "teacher"
        x_tgt, x_src = target["image"], source["image"]
        if not memory_from_teacher or x_tgt.shape[1:] != x_src.shape[1:]:
            return super().teacher_forward(source, target)
        assert self.teacher is not None
        both = self.teacher(torch.cat([x_tgt, x_src]))
        n = x_tgt.shape[0]
        return {**{k: v[:n] for k, v in both.items()}, "source_embed": both["embed"][n:]}

    # -------------------------------------------------------------------------------- the step
    def train_step(self, source: Batch, target: Batch, step: int) -> StepOutput:
        m = self.options
        loss, logs, src_out, tp = self.base_step(source, target)
        size = src_out["embed"].shape[-2:]
        y_src = downsample_labels(source["mask"], size).reshape(-1)
        z_src = pixel_rows(src_out["embed"])
        # target side at feature resolution: the (mixed) student view and its labels/confidence
        y_mix, q_mix = self._mixed_targets(tp, size)
        z_mix = pixel_rows(tp.student_out["embed"])
        # teacher's clean-target pseudo-labels at feature resolution (reverse alignment, diagnostics)
        t_pseudo, t_conf = self.pseudo_labels(tp.teacher_out["logits"])
        t_pseudo, t_conf = t_pseudo.reshape(-1), t_conf.reshape(-1)

        confident_t = torch.where(t_conf >= m.pmc_target_threshold, t_pseudo, torch.full_like(t_pseudo, IGNORE_INDEX))
        with torch.no_grad():
            new_freq = update_class_freq(self.class_freq, torch.cat([y_src, confident_t]), m.freq_momentum)
            self.class_freq.copy_(comm.all_reduce_mean_(new_freq))

        if m.use_pmc and m.lambda_pmc > 0:
            l_pmc, anchors = self._pmc(z_src, y_src, z_mix, y_mix, q_mix)
            loss = loss + m.lambda_pmc * l_pmc
            logs["loss/pmc"] = l_pmc.detach()
            logs["pmc/anchors"] = anchors.float()
        if m.use_pix and m.lambda_pix > 0:
            l_pix = self._pix(tp, y_mix)
            loss = loss + m.lambda_pix * l_pix
            logs["loss/pix"] = l_pix.detach()

        gmm_on = m.use_gmm_forward or m.use_gmm_reverse
        if gmm_on:
            if m.gmm_memory_features == "teacher":
                with torch.no_grad():
                    embed = tp.teacher_out.get("source_embed")
                    if embed is None:  # source and target crops of different sizes: a pass of its own
                        embed = self.teacher(source["image"])["embed"]  # type: ignore[misc]
                    z_memory = pixel_rows(embed)
            else:
                z_memory = z_src.detach()
            self.prototypes.push(z_memory, y_src)
            if step + 1 >= m.gmm_warmup_iters and (
                not self.prototypes.is_fitted or (step + 1 - m.gmm_warmup_iters) % m.gmm_refit_every == 0
            ):
                # the same generator on every rank: identical memory → identical fit
                seed = self.cfg.train.seed * 1_000_003 + step
                self.prototypes.refit(m.gmm_em_iters, torch.Generator(device=z_src.device).manual_seed(seed))
        if m.use_gmm_forward and m.lambda_fwd > 0 and step >= m.gmm_warmup_iters and self.prototypes.is_fitted:
            target_only = tp.mix_mask is None
            q_fwd = q_mix if target_only else torch.where(self._pasted(tp, size), torch.zeros_like(q_mix), q_mix)
            l_fwd = forward_alignment_loss(
                z_mix, y_mix, q_fwd, self.prototypes.params(), m.tau_gmm, m.fwd_threshold, m.fwd_confidence_weighting
            )
            loss = loss + m.lambda_fwd * l_fwd
            logs["loss/gmm_fwd"] = l_fwd.detach()

        self._last = {
            "z_src": z_src.detach(),
            "y_src": y_src,
            "z_tgt": pixel_rows(tp.teacher_out["embed"]).detach(),
            "y_tgt": t_pseudo,
            "q_tgt": t_conf,
        }
        return StepOutput(loss, logs)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        super().after_step(step)
        m = self.options
        if m.use_gmm_reverse and step >= m.gmm_warmup_iters and self.prototypes.is_fitted and self._last:
            self.prototypes.reverse_update(
                self._last["z_tgt"], self._last["y_tgt"], self._last["q_tgt"], m.rev_threshold, m.rev_momentum
            )

    # ------------------------------------------------------------------------------- the terms
    def _mixed_targets(self, tp: TargetPass, size: tuple[int, int] | Any) -> tuple[Tensor, Tensor]:
        """Labels and confidence of the student's (mixed) target view at feature resolution."""
        y = downsample_labels(tp.mixed_labels, size).reshape(-1)
        conf = (
            tp.confidence
            if tp.mix_mask is None
            else torch.where(tp.mix_mask, torch.ones_like(tp.confidence), tp.confidence)
        )
        q = torch.nn.functional.interpolate(conf[:, None], size=size, mode="nearest").reshape(-1)
        return y, q

    @staticmethod
    def _pasted(tp: TargetPass, size: tuple[int, int] | Any) -> Tensor:
        assert tp.mix_mask is not None
        return downsample_labels(tp.mix_mask.long(), size).reshape(-1).bool()

    def _pmc(self, z_src: Tensor, y_src: Tensor, z_mix: Tensor, y_mix: Tensor, q_mix: Tensor) -> tuple[Tensor, Tensor]:
        """Probability-masked supervised contrast over anchors of both domains, and the number of anchors."""
        m = self.options
        y_t = torch.where(q_mix >= m.pmc_target_threshold, y_mix, torch.full_like(y_mix, IGNORE_INDEX))
        z = torch.cat([z_src, z_mix])
        y = torch.cat([y_src, y_t])
        keep_probs = anchor_keep_probs(self.class_freq, m.base_rate, m.minority_boost)
        if m.static_anchors:
            slots, valid = sample_anchor_slots(y, keep_probs, m.max_anchors)
            y_slots = torch.where(valid, y[slots], torch.full_like(y[slots], IGNORE_INDEX))  # invalid: no part
            return supervised_infonce(z[slots], y_slots, m.tau_pmc), valid.sum()
        keep = sample_anchors(y, keep_probs, m.max_anchors)
        return supervised_infonce(z[keep], y[keep], m.tau_pmc), torch.full((), keep.numel(), device=z.device)

    def _pix(self, tp: TargetPass, y_mix: Tensor) -> Tensor:
        """Pixel contrast between the student's (mixed) target view and a strong photometric view.

        With `pix_strong_grad` false the strong view's forward runs without gradient: its embeddings
        are a stop-gradient target and only the (mixed) view learns from the term — one backward pass
        less per step.
        """
        m = self.options
        z_weak = pixel_rows(tp.student_out["embed"])
        with torch.set_grad_enabled(m.pix_strong_grad and torch.is_grad_enabled()):
            z_strong = pixel_rows(self.forward_student(strong_view(tp.images, m.pix_irrg_prob))["embed"])
        n = z_weak.shape[0]
        idx = torch.randperm(n, device=z_weak.device)[: m.pix_pixels]
        return pixel_view_contrast(z_weak[idx], z_strong[idx], y_mix[idx], m.tau_pix)

    # ----------------------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        m = self.options
        out = super().diagnostics()
        keep = anchor_keep_probs(self.class_freq, m.base_rate, m.minority_boost).cpu().tolist()
        for name, p in zip(self.class_names, keep, strict=True):
            out[f"diag/keep_rate/{name}"] = float(p)
        if self._last and self.prototypes.is_fitted:
            last = self._last
            reliable = last["q_tgt"] >= m.fwd_threshold
            y_tgt = torch.where(reliable, last["y_tgt"], torch.full_like(last["y_tgt"], IGNORE_INDEX))
            diag = self.prototypes.diagnostics(last["z_src"], last["y_src"], last["z_tgt"], y_tgt)
            out.update({f"diag/{k}": v for k, v in diag.items()})
        return out
