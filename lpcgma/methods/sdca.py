"""SDCA (Li et al., 2021): semantic distribution-aware contrastive adaptation.

Source CE + the closed-form distribution-aware contrastive bound against per-class source feature
statistics (exact cumulative pooled mean and diagonal variance), at feature level (the projection
embeddings) and at logit level, on source pixels (labels) and confident target pixels (the
model's own predictions, q ≥ 0.9). Statistics are initialised by one pass of the (source-only
initialised: ``model.init_checkpoint``) network over the source set, then updated every step.

Optional final self-training round (``method.final_st_iters`` > 0), as the paper's last stage: the
last final_st_iters steps train on source CE + CE on fixed offline target pseudo-labels. At the first
step of the round the student is copied into ``final_st_labeller`` (frozen; part of the state); the
trainer has it predict this rank's target_train tiles whole, by sliding window as evaluation does
(`make_offline_labels`), and serves the labels as the target tiles' masks, so that the stream crops,
rescales and flips them with the images (every label stays on its pixel). Class c keeps the pixels
with confidence ≥ min(median confidence of c, ``final_st_threshold_cap``), medians over all ranks'
tiles (`lpcgma.losses.offline_pseudo_labels`). On resume the labels are not in the checkpoint: they
are made again from the checkpointed labeller, the same computation on the same weights and tiles.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from lpcgma import comm
from lpcgma.config import ExperimentConfig, SDCAConfig
from lpcgma.losses.distribution import confident_pseudo_labels, pooled_stats_update, sdca_loss
from lpcgma.losses.offline_pseudo_labels import apply_class_thresholds, class_median_thresholds
from lpcgma.losses.segmentation import IGNORE_INDEX, cross_entropy, downsample_labels
from lpcgma.methods.base import Batch, Method, StepOutput, pixel_rows
from lpcgma.models import upsample_logits


class SDCA(Method):
    """See the module docstring; no EMA teacher (as in the released code)."""

    feat_mean: Tensor
    feat_var: Tensor
    logit_mean: Tensor
    logit_var: Tensor
    final_st_started: Tensor  # these three only with method.final_st_iters > 0
    final_st_thresholds: Tensor
    final_st_kept: Tensor

    def __init__(self, cfg: ExperimentConfig, class_names: Sequence[str]) -> None:
        super().__init__(cfg, class_names)
        c, d = self.num_classes, cfg.model.proj_dim
        for level, dim in (("feat", d), ("logit", c)):
            self.register_buffer(f"{level}_count", torch.zeros(c, dtype=torch.float64))
            self.register_buffer(f"{level}_mean", torch.zeros(c, dim))
            self.register_buffer(f"{level}_var", torch.zeros(c, dim))
        self.final_st_labeller: nn.Module | None = None
        if self.options.final_st_iters > 0:  # state only when the round is on: other checkpoints keep their keys
            self.final_st_labeller = copy.deepcopy(self.student).requires_grad_(False)  # no RNG drawn
            self.register_buffer("final_st_started", torch.zeros((), dtype=torch.bool))  # labeller holds the weights
            self.register_buffer("final_st_thresholds", torch.full((c,), math.inf))  # θ_c of the last labelling
            self.register_buffer("final_st_kept", torch.zeros(()))  # fraction of target pixels labelled
        self._final_st_labelled = False  # this process made the offline labels (the round's steps need them)

    @property
    def options(self) -> SDCAConfig:
        """This method's own config section (`cfg.method`), typed."""
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
        m = self.options
        n = m.sdca_init_batches or max(1, num_source_tiles // self.cfg.data.batch_size)
        self.student.eval()
        for _ in range(n):
            batch = next(source_batches)
            self._update_stats(self.student(batch["image"]), batch["mask"])
        self.student.train()

    def _terms(self, out: dict[str, Tensor], labels_f: Tensor) -> Tensor:
        m = self.options
        y = labels_f.reshape(-1)
        feat = sdca_loss(pixel_rows(out["embed"]), y, self.feat_mean, self.feat_var, m.sdca_tau, m.sdca_normalize_stats)
        logit = sdca_loss(
            pixel_rows(out["logits"]), y, self.logit_mean, self.logit_var, m.sdca_tau, m.sdca_normalize_stats
        )
        return m.lambda_feat * feat + m.lambda_logit * logit

    def train_step(self, source: Batch, target: Batch, step: int) -> StepOutput:
        m = self.options
        start = self.offline_labels_from()
        if start is not None and step >= start:
            return self._final_st_step(source, target)
        ce, logs, src_out = self.supervised_loss(source, "source")
        y_src = downsample_labels(source["mask"], src_out["logits"].shape[-2:])
        tgt_out = self.forward_student(target["image"])
        y_tgt, q_tgt = confident_pseudo_labels(tgt_out["logits"], m.sdca_target_threshold)
        self.record_pseudo_labels(tgt_out["logits"].argmax(1), q_tgt, target, m.sdca_target_threshold)
        l_src = self._terms(src_out, y_src)
        l_tgt = self._terms(tgt_out, y_tgt)
        self._update_stats(src_out, source["mask"])
        logs.update({"loss/sdca_source": l_src.detach(), "loss/sdca_target": l_tgt.detach()})
        logs["pseudo/confident_frac"] = (y_tgt != 255).float().mean()
        return StepOutput(ce + l_src + l_tgt, logs)

    # ------------------------------------------------------------- final self-training round
    def offline_labels_from(self) -> int | None:
        """The first step of the final self-training round (None: no round)."""
        n = self.options.final_st_iters
        return self.cfg.train.iters - n if n > 0 else None

    @torch.no_grad()
    def begin_offline_labelling(self) -> nn.Module:
        """The network that makes the offline labels, in eval mode: a frozen copy of the student taken
        the first time this is called (the first step of the round) and kept in the state from then on.
        Collective: rank 0's copy goes to every rank (ranks keep their own BatchNorm running statistics;
        the checkpoint holds rank 0's), so that all ranks label with the network a resumed run loads."""
        assert self.final_st_labeller is not None, "method.final_st_iters is 0: no final self-training round"
        if not bool(self.final_st_started):
            self.final_st_labeller.load_state_dict(self.student.state_dict())
            for t in self.final_st_labeller.state_dict().values():
                comm.broadcast_(t)
            self.final_st_started.fill_(True)
        return self.final_st_labeller.eval()

    @torch.no_grad()
    def make_offline_labels(self, tiles: Iterable[tuple[int, Tensor]]) -> dict[int, Tensor]:
        """Offline pseudo-labels (uint8 [H, W], 255 = ignored, on the CPU) of this rank's tiles from
        (tile index, whole-tile class probabilities [C, H, W]) pairs.

        Thresholds θ_c = min(median confidence of class c, ``final_st_threshold_cap``) over the tiles of
        every rank (counts all-reduced; every rank must call this at the same step). Confidences are held
        as float16 on the CPU while the thresholds are found (the thresholds are applied to the same
        values). Records θ and the kept fraction in the state (``final_st_thresholds``, ``final_st_kept``).
        """
        c = self.num_classes
        assert c < IGNORE_INDEX, "offline labels are stored as uint8 with 255 = ignore"
        names: list[int] = []
        conf: list[Tensor] = []
        pred: list[Tensor] = []
        for index, probs in tiles:
            q, y = probs.float().max(dim=0)
            names.append(index)
            conf.append(q.to(torch.float16).cpu())
            pred.append(y.to(torch.uint8).cpu())
        device = self.final_st_thresholds.device

        def all_ranks(t: Tensor) -> Tensor:  # collectives on the training device (NCCL needs CUDA tensors)
            return comm.all_reduce_sum_(t.to(device)).cpu()

        flat_conf = torch.cat([q.reshape(-1) for q in conf]) if conf else torch.zeros(0, dtype=torch.float16)
        flat_pred = torch.cat([y.reshape(-1) for y in pred]) if pred else torch.zeros(0, dtype=torch.uint8)
        thresholds = class_median_thresholds(flat_conf, flat_pred, c, self.options.final_st_threshold_cap, all_ranks)
        del flat_conf, flat_pred
        labels = {i: apply_class_thresholds(q, y, thresholds) for i, q, y in zip(names, conf, pred, strict=True)}
        counts = torch.tensor(
            [sum(int((y != IGNORE_INDEX).sum()) for y in labels.values()), sum(y.numel() for y in labels.values())],
            dtype=torch.int64,
        )
        kept, total = all_ranks(counts).tolist()
        self.final_st_thresholds.copy_(thresholds)
        self.final_st_kept.fill_(kept / max(total, 1))
        self._final_st_labelled = True
        return labels

    def _final_st_step(self, source: Batch, target: Batch) -> StepOutput:
        """Source CE (× ``final_st_source_weight``) + CE on the offline labels, which the trainer serves
        as the target batch's masks."""
        if not self._final_st_labelled:
            raise RuntimeError(
                "SDCA's final self-training round (method.final_st_iters) trains on offline target "
                "pseudo-labels served as the target masks: make them first with begin_offline_labelling and "
                "make_offline_labels (the Trainer does, at step train.iters - method.final_st_iters)"
            )
        w = self.options.final_st_source_weight
        logs: dict[str, Tensor] = {}
        loss = torch.zeros((), device=target["image"].device)
        if w > 0:
            ce, logs, _ = self.supervised_loss(source, "source")
            loss = w * ce
        labels = target["mask"]
        out = self.forward_student(target["image"])
        target_ce = cross_entropy(upsample_logits(out["logits"], labels.shape[-2:]), labels)
        logs["loss/final_st_target"] = target_ce.detach()
        logs["pseudo/final_st_kept"] = self.final_st_kept.detach().clone()
        logs["pseudo/final_st_labelled_frac"] = (labels != IGNORE_INDEX).float().mean()
        return StepOutput(loss + target_ce, logs)

    def diagnostics(self) -> dict[str, float]:
        """Pseudo-label diagnostics; once the round has begun, the kept fraction and each predicted
        class's threshold θ_c."""
        out = super().diagnostics()
        if self.final_st_labeller is None or not bool(self.final_st_started):
            return out
        out["diag/final_st_kept"] = float(self.final_st_kept)
        for name, value in zip(self.class_names, self.final_st_thresholds.tolist(), strict=True):
            if math.isfinite(value):
                out[f"diag/final_st_threshold/{name}"] = value
        return out
