"""Tiny torch.distributed helpers: collective ops when a process group is up, no-ops otherwise.

Every helper works in place on (or returns) tensors of the caller's device, so the same code runs
single-process, under DDP with gloo (CPU) or NCCL (GPU), and inside Ray Train workers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when torch.distributed is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum `t` over ranks, in place; returns `t`."""
    if is_distributed() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_(t: Tensor) -> Tensor:
    """Average `t` (floating point) over ranks, in place; returns `t`."""
    if is_distributed() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world_size())
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite `t` with rank `src`'s copy, in place; returns `t`."""
    if is_distributed() and world_size() > 1:
        dist.broadcast(t, src=src)
    return t


def all_gather_stack(t: Tensor) -> Tensor:
    """Every rank's `t` (the same shape on all ranks) stacked along a new dim 0 in rank order: [W, ...].

    No size exchange, so no host–device synchronisation. Returns `t[None]` when not distributed.
    """
    if not is_distributed() or world_size() == 1:
        return t[None]
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate every rank's `t` along dim 0, in rank order; leading sizes may differ per rank.

    Pads to the largest leading size for the collective and trims afterwards (one extra small
    all-gather of the sizes). Returns `t` itself when not distributed.
    """
    if not is_distributed() or world_size() == 1:
        return t
    n = world_size()
    size = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)], dim=0)


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed() and world_size() > 1:
        dist.barrier()


@torch.no_grad()
def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` over ranks with one flat all-reduce per (device, dtype).

    Used instead of DistributedDataParallel because UDA steps run the student several times
    (source, mixed target, views) before one backward, which DDP's reducer does not support.
    Every rank must pass the same parameters in the same order. A parameter without a gradient on
    some rank counts as zero there (so the buffers always match in size); one without a gradient
    on every rank keeps ``grad = None``, so the optimiser skips it on all ranks alike.
    """
    if not is_distributed() or world_size() == 1:
        return
    buckets: dict[tuple[str, torch.dtype], list[torch.nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            buckets.setdefault((str(p.device), p.dtype), []).append(p)
    for ps in buckets.values():
        device, dtype = ps[0].device, ps[0].dtype
        one = torch.ones(1, device=device, dtype=dtype)
        flat = torch.cat(
            [
                torch.zeros(p.numel() + 1, device=device, dtype=dtype)
                if p.grad is None
                else torch.cat([p.grad.reshape(-1), one])
                for p in ps
            ]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world_size())
        offset = 0
        for p in ps:
            n = p.numel()
            grad, had_grad = flat[offset : offset + n], flat[offset + n]
            offset += n + 1
            if p.grad is not None:
                p.grad.copy_(grad.view_as(p.grad))
            elif bool(had_grad > 0):
                p.grad = grad.view_as(p).clone()


__all__ = [
    "all_gather_cat",
    "all_gather_stack",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "average_gradients",
    "barrier",
    "broadcast_",
    "is_distributed",
    "rank",
    "world_size",
]
