"""Gaussian multiprototype state: per-class memory of source embeddings, GMM refits, reverse refinement.

`GaussianPrototypes` keeps everything as buffers, so the method's ``state_dict()`` checkpoints it:

- ``memory`` [C, M, D]: a ring buffer per class of recent (detached, teacher) source embeddings,
  with ``count`` [C] (filled slots, ≤ M) and ``ptr`` [C] (next slot to write);
- the current per-class GMM (``means``, ``variances``, ``log_weights``, ``active``) and ``fitted``.

Distributed data parallel (DDP) — DECISION, the simple correct approach: every rank must hold the
same prototypes. `push` all-gathers each rank's per-class subsample and writes the gathered rows in
rank order, so every rank's memory is identical; `refit` is a deterministic function of the memory
and the generator (seed it identically on every rank, e.g. from (seed, step)); `reverse_update`
all-reduces its sufficient statistics before the momentum update. `sync_()` broadcasts rank 0's
state: call it after building or loading (resume) and, if you like, after each refit to remove any
floating-point drift between ranks. Without a process group all of this is single-process.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lpcgma import comm
from lpcgma.losses.gmm import GMMParams, batched_em, class_scores, component_log_prob, gmm_mean_log_likelihood
from lpcgma.losses.precision import float32

_NEG = -1e9  # finite stand-in for −inf when taking a softmax over components


def _rank_within_class(labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable grouping of `labels` (all in [0, C)) by class.

    Returns (order, rank, counts): `labels[order]` is sorted by class keeping the input order within
    a class, `rank[i]` is the position of `order[i]` within its class, `counts` [C] the class sizes.
    """
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    counts = torch.zeros(num_classes, dtype=torch.long, device=labels.device).index_add_(
        0, sorted_labels, torch.ones_like(sorted_labels)
    )  # not bincount: on CUDA it reads max(labels) back to the host
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(labels.numel(), device=labels.device) - starts[sorted_labels]
    return order, rank, counts


class GaussianPrototypes(nn.Module):
    """Per-class K-component diagonal GMMs over source embeddings, with their memory.

    `num_classes` C, `dim` D, `k` K (gaussians_per_class), `memory_per_class` M
    (gmm_memory_per_class), `var_floor` ε (gmm_var_floor), `push_per_class`: at most this many
    embeddings of a class are written per `push` per rank (a random subsample).
    """

    memory: Tensor
    count: Tensor
    ptr: Tensor
    means: Tensor
    variances: Tensor
    log_weights: Tensor
    active: Tensor
    fitted: Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        k: int,
        memory_per_class: int,
        var_floor: float = 1e-4,
        push_per_class: int = 256,
    ) -> None:
        super().__init__()
        if min(num_classes, dim, k, memory_per_class, push_per_class) < 1 or var_floor <= 0:
            raise ValueError("num_classes, dim, k, memory_per_class, push_per_class must be ≥ 1 and var_floor > 0")
        self.num_classes, self.dim, self.k = num_classes, dim, k
        self.memory_per_class = memory_per_class
        self.var_floor = var_floor
        self.push_per_class = min(push_per_class, memory_per_class)
        c, m, d = num_classes, memory_per_class, dim
        self.register_buffer("memory", torch.zeros(c, m, d))
        self.register_buffer("count", torch.zeros(c, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(c, dtype=torch.long))
        self.register_buffer("means", torch.zeros(c, k, d))
        self.register_buffer("variances", torch.ones(c, k, d))
        self.register_buffer("log_weights", torch.full((c, k), float("-inf")))
        self.register_buffer("active", torch.zeros(c, k, dtype=torch.bool))
        self.register_buffer("fitted", torch.tensor(False))
        self._fitted_host = False  # `fitted` mirrored on the host once True: no device read per step
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_fitted_host", False))

    @property
    def is_fitted(self) -> bool:
        """Whether a GMM has been fitted; reads the device flag (a host–device sync) only until it is True."""
        if not self._fitted_host:
            self._fitted_host = bool(self.fitted)
        return self._fitted_host

    # ------------------------------------------------------------------------------------ memory
    def memory_valid(self) -> Tensor:
        """[C, M] bool: which memory slots hold an embedding."""
        slots = torch.arange(self.memory_per_class, device=self.count.device)
        return slots[None, :] < self.count[:, None]

    @torch.no_grad()
    @float32
    def push(self, z: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> None:
        """Write source embeddings `z` [N, D] with `labels` [N] (255 = skip) into the class rings.

        At most `push_per_class` embeddings per class per call (a uniformly random subsample, drawn
        with `generator`); under DDP the subsamples of all ranks are gathered and written everywhere.
        """
        z = z.detach().reshape(-1, self.dim).to(self.memory.dtype)
        y = labels.reshape(-1).to(device=z.device, dtype=torch.long)
        c, p = self.num_classes, self.push_per_class
        valid = (y >= 0) & (y < c)
        perm = torch.randperm(y.numel(), generator=generator, device=y.device)
        grouped = torch.where(valid, y, torch.full_like(y, c))[perm]  # invalid → an extra class C
        order, rank, _ = _rank_within_class(grouped, c + 1)
        rows, cls = perm[order], grouped[order]  # input rows grouped by class, in random order within one
        keep = (rank < p) & (cls < c)
        # the picked rows as a fixed-size [C, P] table (−1 = none): no data-dependent shape, so no host
        # sync; the rows not picked all go to one spare cell, dropped afterwards
        cell = torch.where(keep, cls * p + rank, torch.full_like(rank, c * p))
        table = torch.full((c * p + 1,), -1, dtype=torch.long, device=y.device)
        table = table.scatter_(0, cell, torch.where(keep, rows, torch.full_like(rows, -1)))[: c * p].view(c, p)
        picked, exists = z[table.clamp(min=0)], table >= 0  # [C, P, D], [C, P]
        if comm.is_distributed():  # every rank's table, in rank order within each class
            picked = comm.all_gather_stack(picked).transpose(0, 1).reshape(c, -1, self.dim)
            exists = comm.all_gather_stack(exists).transpose(0, 1).reshape(c, -1)
        self._write(picked, exists)

    def _write(self, z: Tensor, exists: Tensor) -> None:
        """Ring-write, per class, the rows of `z` [C, S, D] where `exists` [C, S], in their order; at most
        M per class. Fixed-size tensor operations only (no host–device synchronisation)."""
        c, m = self.num_classes, self.memory_per_class
        first = torch.argsort((~exists).to(torch.uint8), dim=1, stable=True)[:, :m]  # existing rows first
        present = exists.gather(1, first)  # [C, S'] with S' = min(S, M)
        rows = z.gather(1, first[..., None].expand(-1, -1, self.dim))
        slot = (self.ptr[:, None] + torch.arange(first.shape[1], device=z.device)) % m  # distinct per class
        cls = torch.arange(c, device=z.device)[:, None].expand_as(slot)
        self.memory[cls, slot] = torch.where(present[..., None], rows, self.memory[cls, slot])
        written = present.sum(dim=1)
        self.ptr.copy_((self.ptr + written) % m)
        self.count.copy_((self.count + written).clamp(max=m))

    # -------------------------------------------------------------------------------------- fits
    def params(self) -> GMMParams:
        """A snapshot (clones) of the current GMM; safe to use in a loss graph across later updates."""
        return GMMParams(self.means.clone(), self.variances.clone(), self.log_weights.clone(), self.active.clone())

    def _set_params(self, p: GMMParams) -> None:
        self.means.copy_(p.means)
        self.variances.copy_(p.variances)
        self.log_weights.copy_(p.log_weights)
        self.active.copy_(p.active)

    @torch.no_grad()
    @float32
    def refit(self, iters: int, generator: torch.Generator | None = None) -> GMMParams:
        """Run `iters` EM iterations on the memory for all classes at once and store the result.

        Warm-started from the current GMM once fitted (k-means++ the first time, and for classes
        whose number of active components changed). Returns the new parameters.
        """
        init = self.params() if self.is_fitted else None
        p = batched_em(self.memory, self.memory_valid(), self.k, iters, self.var_floor, init, generator)
        self._set_params(p)
        self.fitted.fill_(True)
        self._fitted_host = True
        return self.params()

    @torch.no_grad()
    @float32
    def reverse_update(
        self,
        z_t: Tensor,
        pseudo: Tensor,
        conf: Tensor,
        threshold: float,
        momentum: float,
        min_count: int = 2,
    ) -> Tensor:
        """Reverse alignment: move components toward the reliable target pixels they are responsible for.

        A target pixel (`z_t` [N, D], pseudo-label `pseudo` [N], confidence `conf` [N]) is reliable
        when q ≥ `threshold` and the posterior of its most likely component of class ŷ is ≥ 0.5. For
        every component with at least `min_count` reliable pixels (summed over ranks):
        μ ← m·μ + (1 − m)·mean(z), σ² ← max(m·σ² + (1 − m)·var(z), ε), m = `momentum`; weights
        are unchanged. No-op before the first fit. Returns the number of reliable pixels used
        (0-dim; summed over ranks).
        Call it after backward (the trainer's ``after_step``).
        """
        c, k, d = self.means.shape
        z = z_t.detach().reshape(-1, d).to(self.means.dtype)
        y = pseudo.reshape(-1).to(device=z.device, dtype=torch.long)
        q = conf.reshape(-1).to(z.device)
        p = self.params()
        valid = (y >= 0) & (y < c)
        ys = torch.where(valid, y, torch.zeros_like(y))
        lp = component_log_prob(z, p)  # [N, C, K]
        own = lp.gather(1, ys[:, None, None].expand(-1, 1, k)).squeeze(1)  # [N, K]
        own_active = p.active[ys]
        post = own.masked_fill(~own_active, _NEG).softmax(-1)
        top, best = post.max(-1)
        reliable = valid & (q >= threshold) & own_active.any(-1) & (top >= 0.5)
        w = reliable.to(z.dtype)[:, None]
        slot = ys * k + best
        stats = torch.zeros(c * k, 1 + 2 * d, dtype=z.dtype, device=z.device)
        stats.index_add_(0, slot, torch.cat([w, z * w, z * z * w], dim=1))
        comm.all_reduce_sum_(stats)
        stats = stats.view(c, k, 1 + 2 * d)
        n, s1, s2 = stats[..., :1], stats[..., 1 : 1 + d], stats[..., 1 + d :]
        mu_b = s1 / n.clamp_min(1.0)
        var_b = (s2 / n.clamp_min(1.0) - mu_b * mu_b).clamp_min(self.var_floor)
        upd = (n >= min_count) & p.active[..., None]
        self.means.copy_(torch.where(upd, momentum * p.means + (1 - momentum) * mu_b, p.means))
        new_var = (momentum * p.variances + (1 - momentum) * var_b).clamp_min(self.var_floor)
        self.variances.copy_(torch.where(upd, new_var, p.variances))
        return n.sum()

    # ------------------------------------------------------------------------------- diagnostics
    @torch.no_grad()
    @float32
    def diagnostics(self, z_src: Tensor, y_src: Tensor, z_tgt: Tensor, y_tgt: Tensor) -> dict[str, float]:
        """Scalar health metrics of the prototypes (host floats, for logging at evaluation time).

        - ``gmm_src_loglik`` / ``gmm_tgt_loglik``: mean log p(z | y) under the GMM of the pixel's
          class (source labels / target labels or pseudo-labels), over pixels of fitted classes;
        - ``gmm_occupancy_c{c}_k{k}``: fraction of class c's source pixels whose most likely
          component is k (active components only);
        - ``gmm_active_components``: number of active components;
        - ``gmm_tgt_intra_var``: mean over target classes (≥ 2 pixels) of the per-dimension variance
          of their features, averaged over dimensions;
        - ``gmm_mean_var``: the fitted variance averaged over active components and dimensions (falling
          over a run, with ``gmm_tgt_intra_var``: the embeddings are collapsing onto the prototypes);
        - ``gmm_src_accuracy``: share of source pixels of fitted classes whose highest GMM class score
          is their own class (how well the prototypes still separate labelled source features).
        """
        c, k, d = self.means.shape
        p = self.params()
        class_ok = p.active.any(-1)

        def prepared(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            """Features [N, D], labels (ignored → 0) and which labels are class ids."""
            z, y = z.reshape(-1, d).to(p.means.dtype), y.reshape(-1).to(z.device)
            labelled = (y >= 0) & (y < c)
            return z, torch.where(labelled, y, torch.zeros_like(y)), labelled

        def own_loglik(scores: Tensor, ys: Tensor, ok: Tensor) -> Tensor:
            s = scores.gather(1, ys[:, None]).squeeze(1)
            return torch.where(ok, s, torch.zeros_like(s)).sum() / ok.sum().clamp_min(1)

        zs, ys, labelled = prepared(z_src, y_src)
        ok = labelled & class_ok[ys]  # source pixels of fitted classes
        src_scores = class_scores(zs, p)
        own = component_log_prob(zs, p).gather(1, ys[:, None, None].expand(-1, 1, k)).squeeze(1)
        best = own.masked_fill(~p.active[ys], _NEG).argmax(-1)
        occ = torch.zeros(c * k, dtype=zs.dtype, device=zs.device)
        occ.index_add_(0, ys * k + best, ok.to(zs.dtype))
        occ = occ.view(c, k) / occ.view(c, k).sum(-1, keepdim=True).clamp_min(1.0)

        zt, yts, okt = prepared(z_tgt, y_tgt)
        wt = okt.to(zt.dtype)[:, None]
        sums = torch.zeros(c, 1 + 2 * d, dtype=zt.dtype, device=zt.device)
        sums.index_add_(0, yts, torch.cat([wt, zt * wt, zt * zt * wt], dim=1))
        n, s1, s2 = sums[:, :1], sums[:, 1 : 1 + d], sums[:, 1 + d :]
        mean = s1 / n.clamp_min(1.0)
        var = ((s2 - n * mean * mean) / (n - 1).clamp_min(1.0)).clamp_min(0).mean(1)  # unbiased
        present = n.squeeze(1) >= 2
        intra = torch.where(present, var, torch.zeros_like(var)).sum() / present.sum().clamp_min(1)

        src_hit = (src_scores.argmax(-1) == ys) & ok
        out = {
            "gmm_src_loglik": own_loglik(src_scores, ys, ok),
            "gmm_src_accuracy": src_hit.sum() / ok.sum().clamp_min(1),
            "gmm_mean_var": p.variances[p.active].mean() if bool(p.active.any()) else torch.zeros(()),
            "gmm_tgt_loglik": own_loglik(class_scores(zt, p), yts, okt & class_ok[yts]),
            "gmm_active_components": p.active.sum().to(zs.dtype),
            "gmm_tgt_intra_var": intra,
        }
        logs = {key: float(v) for key, v in out.items()}
        occ_list, act_list = occ.tolist(), p.active.tolist()
        for ci in range(c):
            for ki in range(k):
                if act_list[ci][ki]:
                    logs[f"gmm_occupancy_c{ci}_k{ki}"] = occ_list[ci][ki]
        return logs

    @torch.no_grad()
    def memory_log_likelihood(self) -> Tensor:
        """Mean log-likelihood of each class's memory under its current GMM: [C] (0 for empty classes)."""
        return gmm_mean_log_likelihood(self.memory, self.memory_valid(), self.params())

    # -------------------------------------------------------------------------------------- DDP
    @torch.no_grad()
    def sync_(self, src: int = 0) -> None:
        """Overwrite every buffer with rank `src`'s copy (no-op without a process group)."""
        if not comm.is_distributed():
            return
        for buf in self.buffers():
            if buf.dtype == torch.bool:
                tmp = buf.to(torch.uint8)
                comm.broadcast_(tmp, src=src)
                buf.copy_(tmp.bool())
            else:
                comm.broadcast_(buf, src=src)


__all__ = ["GaussianPrototypes"]
