"""GaussianPrototypes: ring-buffer memory, refits, reverse alignment, checkpoints, DDP consistency."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lpcgma import comm
from lpcgma.losses.gmm import GMMParams, forward_alignment_loss
from lpcgma.prototypes import GaussianPrototypes


def rows(t: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in t.tolist()}


# ------------------------------------------------------------------------------------------ memory
def test_push_fills_rings_and_overwrites_the_oldest() -> None:
    protos = GaussianPrototypes(num_classes=2, dim=3, k=2, memory_per_class=4, push_per_class=4)
    g = torch.Generator().manual_seed(0)
    a = torch.arange(9, dtype=torch.float32).view(3, 3)
    protos.push(a, torch.tensor([0, 0, 255]), generator=g)
    assert protos.count.tolist() == [2, 0] and protos.ptr.tolist() == [2, 0]
    assert rows(protos.memory[0, :2]) == rows(a[:2])
    b = 100 + torch.arange(9, dtype=torch.float32).view(3, 3)
    protos.push(b, torch.tensor([0, 0, 0]), generator=g)
    assert protos.count.tolist() == [4, 0] and protos.ptr.tolist() == [1, 0]
    mem = rows(protos.memory[0])
    assert rows(b) <= mem and len(mem & rows(a[:2])) == 1  # one of the two oldest was overwritten
    assert protos.memory_valid().tolist() == [[True] * 4, [False] * 4]
    assert torch.all(protos.memory[1] == 0)


def test_push_subsamples_each_class_and_skips_ignored_pixels() -> None:
    protos = GaussianPrototypes(num_classes=3, dim=2, k=1, memory_per_class=50, push_per_class=5)
    z = torch.randn(100, 2)
    labels = torch.cat(
        [torch.zeros(60, dtype=torch.long), torch.ones(3, dtype=torch.long), torch.full((37,), 255)]
    )
    protos.push(z, labels, generator=torch.Generator().manual_seed(0))
    assert protos.count.tolist() == [5, 3, 0]
    assert rows(protos.memory[0, :5]) <= rows(z[:60])
    assert rows(protos.memory[1, :3]) == rows(z[60:63])
    protos.push(z[:5], torch.full((5,), 255))  # nothing valid: nothing written
    assert protos.count.tolist() == [5, 3, 0] and protos.ptr.tolist() == [5, 3, 0]


class SyncingOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operators that read device data back to the host on CUDA (a host–device sync):
    `.item()` / `bool()`, `nonzero`, `masked_select`, `unique`, and indexing with a boolean mask."""

    NAMES = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.__name__
        bool_index = name.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args
            if isinstance(a, (list, tuple))
            for i in a
        )
        if bool_index or any(n in name for n in self.NAMES):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def reference_push(protos: GaussianPrototypes, z: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> None:
    """The earlier push (boolean selections: data-dependent shapes), the reference for the fixed-size one."""
    c, m = protos.num_classes, protos.memory_per_class
    y = labels.reshape(-1).long()
    valid = (y >= 0) & (y < c)
    perm = torch.randperm(y.numel(), generator=g)
    grouped = torch.where(valid, y, torch.full_like(y, c))[perm]
    order = torch.argsort(grouped, stable=True)
    counts = torch.bincount(grouped, minlength=c + 1)
    rank = torch.arange(y.numel()) - (torch.cumsum(counts, 0) - counts)[grouped[order]]
    take = perm[order][(rank < protos.push_per_class) & (grouped[order] < c)]
    for row in take.tolist():  # rows arrive grouped by class: plain ring writes in that order
        k = int(y[row])
        protos.memory[k, protos.ptr[k]] = z[row]
        protos.ptr[k] = (protos.ptr[k] + 1) % m
        protos.count[k] = min(int(protos.count[k]) + 1, m)


def test_push_matches_the_boolean_selection_reference_and_never_syncs() -> None:
    g = torch.Generator().manual_seed(3)
    ours = GaussianPrototypes(num_classes=4, dim=3, k=1, memory_per_class=6, push_per_class=4)
    ref = GaussianPrototypes(num_classes=4, dim=3, k=1, memory_per_class=6, push_per_class=4)
    for step in range(5):  # rings wrap, classes appear and vanish, ignored pixels are skipped
        z = torch.randn(40, 3, generator=g)
        labels = torch.randint(0, 6, (40,), generator=g)
        labels[labels >= 4] = 255
        labels[labels == step % 4] = 255
        with SyncingOps() as mode:
            ours.push(z, labels, generator=torch.Generator().manual_seed(step))
        assert mode.seen == []
        reference_push(ref, z, labels, torch.Generator().manual_seed(step))
        assert torch.equal(ours.count, ref.count) and torch.equal(ours.ptr, ref.ptr)
        assert torch.equal(ours.memory, ref.memory)
    with SyncingOps() as mode:  # the detector does see the reference's boolean selection
        reference_push(ref, z, labels, torch.Generator().manual_seed(0))
    assert mode.seen


# ------------------------------------------------------------------------------------------- refit
def test_refit_with_tiny_and_empty_classes_then_a_warm_refit() -> None:
    g = torch.Generator().manual_seed(0)
    protos = GaussianPrototypes(num_classes=3, dim=4, k=3, memory_per_class=64, var_floor=1e-4)
    z = torch.randn(70, 4, generator=g)
    labels = torch.tensor([0, 0] + [2] * 68)  # class 0: 2 samples, class 1: none
    protos.push(z, labels, generator=g)
    p = protos.refit(iters=5, generator=g)
    assert bool(protos.fitted)
    assert p.active.sum(-1).tolist() == [2, 0, 3]
    for t in (p.means, p.variances, protos.memory_log_likelihood()):
        assert torch.isfinite(t).all()
    # class 1 arrives: the warm refit gives it components (k-means++ for it, warm start for the rest)
    protos.push(torch.randn(20, 4, generator=g) + 5, torch.ones(20, dtype=torch.long), generator=g)
    before = protos.params()
    p2 = protos.refit(iters=0, generator=g)
    assert p2.active.sum(-1).tolist() == [2, 3, 3]
    torch.testing.assert_close(p2.means[1].mean(0), torch.full((4,), 5.0), atol=1.0, rtol=0)
    torch.testing.assert_close(p2.means[2], before.means[2])  # iters=0 warm start: unchanged


# ------------------------------------------------------------------------------ reverse alignment
def fitted_prototypes(means: torch.Tensor, var: float = 0.05) -> GaussianPrototypes:
    c, k, d = means.shape
    protos = GaussianPrototypes(num_classes=c, dim=d, k=k, memory_per_class=8, var_floor=1e-4)
    protos._set_params(
        GMMParams(
            means,
            torch.full((c, k, d), var),
            torch.full((c, k), -math.log(k)),
            torch.ones(c, k, dtype=torch.bool),
        )
    )
    protos.fitted.fill_(True)
    return protos


def test_reverse_update_moves_components_toward_reliable_target_features_only() -> None:
    means = torch.tensor([[[0.0, 0.0], [4.0, 0.0]], [[0.0, 4.0], [4.0, 4.0]]])
    protos = fitted_prototypes(means)
    reliable = torch.tensor([[0.2, 0.1], [0.3, -0.1], [0.1, 0.3]])  # near class 0 component 0
    unreliable = torch.tensor([[0.5, 0.5], [-0.4, 0.2]])  # same place, low confidence
    z = torch.cat([reliable, unreliable, torch.tensor([[0.0, 0.0]])])
    pseudo = torch.tensor([0, 0, 0, 0, 0, 255])
    conf = torch.tensor([0.99, 0.99, 0.99, 0.5, 0.6, 1.0])
    m = 0.9
    n = protos.reverse_update(z, pseudo, conf, threshold=0.95, momentum=m)
    assert n.item() == 3
    expected = means.clone()
    expected[0, 0] = m * means[0, 0] + (1 - m) * reliable.mean(0)
    torch.testing.assert_close(protos.means, expected)
    var_b = reliable.var(0, unbiased=False).clamp_min(1e-4)
    torch.testing.assert_close(protos.variances[0, 0], m * 0.05 + (1 - m) * var_b)
    torch.testing.assert_close(protos.variances[1], torch.full((2, 2), 0.05))


def test_reverse_update_ignores_pixels_without_a_responsible_component() -> None:
    # three equally weighted components on an equilateral triangle: the centroid's posterior is 1/3 each
    tri = torch.tensor([[1.0, 0.0], [-0.5, math.sqrt(3) / 2], [-0.5, -math.sqrt(3) / 2]])
    protos = fitted_prototypes(tri[None])
    z = torch.zeros(4, 2)
    n = protos.reverse_update(z, torch.zeros(4, dtype=torch.long), torch.ones(4), threshold=0.5, momentum=0.5)
    assert n.item() == 0
    torch.testing.assert_close(protos.means, tri[None])


def test_reverse_update_before_any_fit_is_a_no_op() -> None:
    protos = GaussianPrototypes(num_classes=2, dim=3, k=2, memory_per_class=8)
    state = {k: v.clone() for k, v in protos.state_dict().items()}
    n = protos.reverse_update(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 0]), torch.ones(5), 0.5, 0.9)
    assert n.item() == 0
    for key, v in protos.state_dict().items():
        assert torch.equal(v, state[key])


def test_empty_class_never_produces_nan() -> None:
    g = torch.Generator().manual_seed(0)
    protos = GaussianPrototypes(num_classes=3, dim=4, k=2, memory_per_class=32)
    protos.push(torch.randn(40, 4, generator=g), torch.tensor([0, 2] * 20), generator=g)
    protos.refit(iters=3, generator=g)
    z = torch.randn(12, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 1] * 3)
    protos.reverse_update(z, labels, torch.ones(12), threshold=0.5, momentum=0.9)
    for t in (protos.means, protos.variances):
        assert torch.isfinite(t).all()
    logs = protos.diagnostics(z, labels, z, labels)
    assert all(math.isfinite(v) for v in logs.values())
    assert logs["gmm_active_components"] == 4.0
    assert not any(key.startswith("gmm_occupancy_c1") for key in logs)
    zz = z.clone().requires_grad_(True)
    loss = forward_alignment_loss(zz, labels, torch.ones(12), protos.params(), 1.0, 0.5, True)
    loss.backward()
    assert torch.isfinite(loss) and zz.grad is not None and torch.isfinite(zz.grad).all()


def test_diagnostics_values() -> None:
    means = torch.tensor([[[0.0, 0.0], [4.0, 0.0]], [[0.0, 4.0], [4.0, 4.0]]])
    protos = fitted_prototypes(means)
    z_src = torch.tensor([[0.1, 0.0], [3.9, 0.0], [4.1, 0.1], [0.0, 4.0]])
    y_src = torch.tensor([0, 0, 0, 1])
    z_tgt = torch.tensor([[0.0, 0.0], [2.0, 0.0], [9.0, 9.0]])
    y_tgt = torch.tensor([0, 0, 255])
    logs = protos.diagnostics(z_src, y_src, z_tgt, y_tgt)
    assert logs["gmm_occupancy_c0_k0"] == pytest.approx(1 / 3)
    assert logs["gmm_occupancy_c0_k1"] == pytest.approx(2 / 3)
    assert logs["gmm_occupancy_c1_k0"] == pytest.approx(1.0)
    assert logs["gmm_occupancy_c1_k1"] == pytest.approx(0.0)
    assert logs["gmm_tgt_intra_var"] == pytest.approx((2.0 + 0.0) / 2)  # var of x = 2 (unbiased), y = 0
    assert logs["gmm_src_loglik"] > logs["gmm_tgt_loglik"]
    assert logs["gmm_mean_var"] == pytest.approx(0.05)
    assert logs["gmm_src_accuracy"] == pytest.approx(1.0)
    # a class-0 pixel sitting on class 1's component and an unlabelled pixel: 4 of 5 labelled right
    z_mixed = torch.cat([z_src, torch.tensor([[4.0, 3.9], [0.0, 0.0]])])
    y_mixed = torch.cat([y_src, torch.tensor([0, 255])])
    mixed = protos.diagnostics(z_mixed, y_mixed, z_tgt, y_tgt)
    assert mixed["gmm_src_accuracy"] == pytest.approx(4 / 5)


# ------------------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    protos = GaussianPrototypes(num_classes=3, dim=4, k=2, memory_per_class=16)
    protos.push(torch.randn(30, 4, generator=g), torch.randint(0, 2, (30,), generator=g), generator=g)
    protos.refit(iters=2, generator=g)
    state = protos.state_dict()
    assert set(state) == {"memory", "count", "ptr", "means", "variances", "log_weights", "active", "fitted"}
    clone = GaussianPrototypes(num_classes=3, dim=4, k=2, memory_per_class=16)
    assert not clone.is_fitted
    clone.load_state_dict(state)
    assert clone.is_fitted  # the host mirror of `fitted` follows a loaded state
    for key, v in clone.state_dict().items():
        assert torch.equal(v, state[key])
    unfitted = GaussianPrototypes(num_classes=3, dim=4, k=2, memory_per_class=16).state_dict()
    reloaded = GaussianPrototypes(num_classes=3, dim=4, k=2, memory_per_class=16)
    reloaded.load_state_dict(state)
    assert reloaded.is_fitted
    reloaded.load_state_dict(unfitted)
    assert not reloaded.is_fitted  # …also back to unfitted
    a = protos.refit(iters=2, generator=torch.Generator().manual_seed(1))
    b = clone.refit(iters=2, generator=torch.Generator().manual_seed(1))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------- DDP
def test_comm_helpers_are_no_ops_without_a_process_group() -> None:
    assert not comm.is_distributed() and comm.world_size() == 1 and comm.rank() == 0
    t = torch.arange(3.0)
    assert comm.all_reduce_sum_(t) is t and comm.all_reduce_mean_(t) is t and comm.broadcast_(t) is t
    assert torch.equal(comm.all_gather_cat(t), torch.arange(3.0))
    protos = GaussianPrototypes(num_classes=2, dim=2, k=1, memory_per_class=4)
    protos.sync_()


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(100 + rank)  # rank-local data and subsampling
        protos = GaussianPrototypes(num_classes=3, dim=4, k=2, memory_per_class=40, push_per_class=8)
        for _ in range(3):
            n = 20 + 7 * rank  # ranks see different amounts of data
            protos.push(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g), generator=g)
        protos.refit(iters=4, generator=torch.Generator().manual_seed(7))  # identical seed on all ranks
        protos.reverse_update(
            torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g), torch.ones(30), 0.5, 0.9
        )
        # comm helpers used by the trainer: gradients averaged even when a rank lacks some
        a, b, unused = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        a.grad = torch.full((3,), float(rank + 1))  # ranks: 1, 2 → mean 1.5
        if rank == 0:
            b.grad = torch.full((3,), 4.0)  # rank 1 has none → mean 2.0
        comm.average_gradients([a, b, unused])
        mean = comm.all_reduce_mean_(torch.tensor([float(rank)]))
        comm.barrier()
        state = {**protos.state_dict(), "grad_a": a.grad, "grad_b": b.grad, "mean": mean}
        state["unused_has_grad"] = torch.tensor(unused.grad is not None)
        torch.save(state, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two gloo processes (~5-15 s here)
def test_ddp_ranks_hold_identical_prototypes(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert s0["count"].sum() > 0 and bool(s0["fitted"])
    assert s0["grad_a"].tolist() == [1.5] * 3 and s0["grad_b"].tolist() == [2.0] * 3
    assert s0["mean"].item() == 0.5 and not bool(s0["unused_has_grad"])
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
