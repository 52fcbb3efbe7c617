r"""Batched EM for all classes at once (lpcgma.losses.gmm.batched_em) vs sklearn per class.

Same data (L2-normalised embeddings drawn around K planted centres per class), same number of EM
iterations, k-means++ seeding on both sides, diagonal covariances. Prints a markdown table row:
time of each (median of --repeats, after one warm-up), speed-up, mean log-likelihood of each
(averaged over classes) and their relative difference.

    python benchmarks/gmm_fit.py --classes 7 --samples 20000 --dim 64 --k 4 --iters 20 \
        --repeats 3 --device cpu
    python benchmarks/gmm_fit.py --profile     # + where the batched EM's time goes

`--profile` adds torch.profiler's top operators of one batched fit and a GEMM-shape probe: the
E-step's per-class product [M, 2D]·[2D, K] (K = 4 output columns) against one product of the
same FLOP count with C·K output columns, in GFLOP/s — the kernel efficiency that bounds the fit.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import sklearn
import torch
from sklearn.mixture import GaussianMixture

from lpcgma.losses.gmm import batched_em, gmm_mean_log_likelihood

# wall: elapsed time; cpu: this process's CPU time (robust to other load on a shared machine when
# run single-threaded, OMP_NUM_THREADS=1; with several threads it also counts spin-waiting)
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def make_data(classes: int, samples: int, dim: int, k: int, noise: float, seed: int) -> np.ndarray:
    """[C, M, D] float32 unit vectors scattered around K random unit centres per class."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, k, dim))
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    comp = rng.integers(0, k, (classes, samples))
    x = np.take_along_axis(centres, comp[..., None], axis=1) + noise * rng.standard_normal((classes, samples, dim))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x.astype(np.float32)


def time_torch(x: np.ndarray, args: argparse.Namespace) -> tuple[list[float], float]:
    device = torch.device(args.device)
    xt = torch.from_numpy(x).to(device)
    valid = torch.ones(xt.shape[:2], dtype=torch.bool, device=device)

    def fit(seed: int) -> tuple[float, float]:
        g = torch.Generator(device=device).manual_seed(seed)
        t0 = CLOCK[args.clock]()
        params = batched_em(xt, valid, args.k, args.iters, args.var_floor, None, g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = CLOCK[args.clock]() - t0
        return elapsed, float(gmm_mean_log_likelihood(xt, valid, params).mean())

    fit(args.seed)  # warm-up (allocations, kernels)
    times, lls = [], []
    for r in range(args.repeats):
        elapsed, ll = fit(args.seed + r)
        times.append(elapsed)
        lls.append(ll)
    return times, statistics.mean(lls)


def time_sklearn(x: np.ndarray, args: argparse.Namespace) -> tuple[list[float], float]:
    def fit(seed: int) -> float:
        scores = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 never "converges"
            for xc in x:
                gm = GaussianMixture(
                    args.k,
                    covariance_type="diag",
                    init_params="k-means++",
                    max_iter=args.iters,
                    tol=0.0,
                    reg_covar=args.var_floor,
                    random_state=seed,
                ).fit(xc)
                scores.append(gm.score(xc))
        return statistics.mean(scores)

    fit(args.seed)
    times, lls = [], []
    for r in range(args.repeats):
        t0 = CLOCK[args.clock]()
        ll = fit(args.seed + r)
        times.append(CLOCK[args.clock]() - t0)
        lls.append(ll)
    return times, statistics.mean(lls)


def gemm_probe(args: argparse.Namespace) -> list[str]:
    """GFLOP/s of the E-step's batched thin product vs one wide product of the same FLOP count."""
    device = torch.device(args.device)
    c, m, d2, k = args.classes, args.samples, 2 * args.dim, args.k
    feats = torch.randn(c, m, d2, device=device)
    w = torch.randn(c, k, d2, device=device)
    wide = torch.randn(c * k, d2, device=device)
    flops = 2.0 * c * m * d2 * k
    shapes = {
        f"bmm [{c}×{m}×{d2}]·[{c}×{d2}×{k}] (E-step, per class)": lambda: torch.bmm(feats, w.transpose(1, 2)),
        f"mm [{m}×{d2}]·[{d2}×{c * k}] (same FLOPs, one wide GEMM)": lambda: feats[0] @ wide.T,
    }
    rows = []
    for name, fn in shapes.items():
        fn()
        best = float("inf")
        for _ in range(10):
            t0 = CLOCK[args.clock]()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, CLOCK[args.clock]() - t0)
        rows.append(f"| {name} | {best * 1e3:.2f} ms | {flops / best / 1e9:.1f} GFLOP/s |")
    return rows


def profile_fit(x: np.ndarray, args: argparse.Namespace) -> str:
    """torch.profiler's top operators (self CPU time) of one batched fit, after a warm-up fit."""
    from torch.profiler import profile

    xt = torch.from_numpy(x).to(args.device)
    valid = torch.ones(xt.shape[:2], dtype=torch.bool, device=xt.device)
    g = torch.Generator(device=xt.device).manual_seed(args.seed)
    batched_em(xt, valid, args.k, args.iters, args.var_floor, None, g)
    with profile() as prof:
        batched_em(xt, valid, args.k, args.iters, args.var_floor, None, g)
    return str(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--samples", type=int, default=20000, help="samples per class")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="Gaussians per class")
    ap.add_argument("--iters", type=int, default=20, help="EM iterations (both sides, no early stop)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--var-floor", type=float, default=1e-6, help="ours: variance floor; sklearn: reg_covar")
    ap.add_argument("--noise", type=float, default=0.05, help="per-dimension noise around the centres")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=sorted(CLOCK), default="wall", help="wall time or process CPU time")
    ap.add_argument("--profile", action="store_true", help="also profile one batched fit and probe GEMM shapes")
    args = ap.parse_args(argv)

    x = make_data(args.classes, args.samples, args.dim, args.k, args.noise, args.seed)
    sk_times, sk_ll = time_sklearn(x, args)
    th_times, th_ll = time_torch(x, args)
    sk_t, th_t = statistics.median(sk_times), statistics.median(th_times)
    print(
        f"torch {torch.__version__} ({args.device}, {torch.get_num_threads()} threads), "
        f"scikit-learn {sklearn.__version__}; C={args.classes} M={args.samples} D={args.dim} "
        f"K={args.k} iters={args.iters}, {args.clock} clock, median of {args.repeats}"
    )
    print(f"all times (s): sklearn {[round(t, 3) for t in sk_times]}, batched {[round(t, 3) for t in th_times]}")
    print(
        "| C×M×D, K, iters | sklearn per class (s) | batched_em (s) | speed-up | LL sklearn | LL batched | rel. diff |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.classes}×{args.samples}×{args.dim}, {args.k}, {args.iters} | {sk_t:.3f} | {th_t:.3f} | "
        f"{sk_t / th_t:.2f}× | {sk_ll:.4f} | {th_ll:.4f} | {(th_ll - sk_ll) / abs(sk_ll):+.2%} |"
    )
    if args.profile:
        print(profile_fit(x, args))
        print("| product | best of 10 | throughput |\n|---|---|---|")
        print("\n".join(gemm_probe(args)))


if __name__ == "__main__":
    main()
