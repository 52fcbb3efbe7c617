#!/usr/bin/env python
"""Anchor-sampled pixel contrast (LPCGMA's PMC and PIX) vs a naive all-pixel contrast, by image size.

    OMP_NUM_THREADS=1 python benchmarks/contrast_scaling.py [--sizes 16 24 32 48 64 96 128 192 256] [--dim 64] \
        [--images 2] [--repeats 3] [--naive-budget-gb 4]

Inputs: L2-normalised embeddings of D = `--dim` on s × s feature maps (s = `--sizes`; at DeepLabv2's
output stride 8 an s² map is a (8s)² crop), `--images` images per domain, 7 classes drawn with
LoveDA-like frequencies; on the target 30 % of the pixels are unconfident (ignored). Each loss runs
forward + backward (gradients into the embeddings), as in a training step:

* PMC, sampled — what `LPCGMA._pmc` does (lpcgma.losses.contrast): class frequencies,
  `anchor_keep_probs`, `sample_anchors` (Bernoulli keep at r = 0.05 with minority boost α = 0.5,
  capped at 4096 anchors), `supervised_infonce` over the anchors of both domains (N = 2·images·s²
  pixels to sample from);
* PMC, naive — every valid pixel of both domains an anchor against every other pixel (N × N), the
  supervised InfoNCE written out here;
* PIX, sampled — what `LPCGMA._pix` does: 1024 random target pixels, `pixel_view_contrast` between the
  two views' embeddings (images·s² pixels to sample from);
* PIX, naive — every target pixel against every pixel of the other view, both directions (n × n).

The naive losses are checked against the package's functions on all pixels (same value) at the
smallest size. Time: median CPU time (`--clock`) of `--repeats` calls after one warm-up call (a
single call when one takes more than `--long-call-s`), in this process. Memory: the peak resident
set of one call above the resident set before it (VmHWM, reset through /proc/self/clear_refs),
measured in a child process per size started with glibc's mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_ = 128 KiB): every tensor above 128 KiB is its own mapping, returned to the
system when freed, so one measurement does not inherit another's freed heap (and the page faults
this costs stay out of the timings). The naive loss is skipped at sizes where its peak, predicted
from the largest size measured so far (peak ∝ N²), would exceed `--naive-budget-gb`.

Prints markdown tables and the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared benchmark helpers
from proc_memory import reset_peak_rss, rss_kib  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS)
from torch import Tensor  # noqa: E402

from lpcgma.losses.contrast import (  # noqa: E402
    anchor_keep_probs,
    pixel_view_contrast,
    sample_anchors,
    supervised_infonce,
    update_class_freq,
)

IGNORE = 255
# LoveDA-like class frequencies (background, building, road, water, barren, forest, agriculture)
CLASS_FREQ = [0.35, 0.15, 0.08, 0.07, 0.05, 0.12, 0.18]
TARGET_IGNORED = 0.3  # target pixels below the pseudo-label threshold
RESULT_TAG = "CONTRAST_SCALING_MEMORY "
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
# LPCGMAConfig defaults
TAU, BASE_RATE, BOOST, MAX_ANCHORS, PIX_PIXELS = 0.1, 0.05, 0.5, 4096, 1024


# ------------------------------------------------------------------------------------ memory
# ------------------------------------------------------------------------------- naive losses
def naive_supervised_contrast(z: Tensor, y: Tensor, tau: float) -> Tensor:
    """Every valid pixel an anchor against every other valid pixel; positives: same class (N × N)."""
    n = z.shape[0]
    valid = y != IGNORE
    sim = z @ z.T / tau
    others = valid[None, :] & ~torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(~others, -1e9)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = others & valid[:, None] & (y[:, None] == y[None, :])
    n_pos = pos.sum(1)
    per_anchor = -(log_prob * pos).sum(1) / n_pos.clamp_min(1)
    return per_anchor[n_pos > 0].mean()


def naive_view_contrast(z_a: Tensor, z_b: Tensor, y: Tensor, tau: float) -> Tensor:
    """Every valid pixel of each view against every pixel of the other view (n × n), both directions."""

    def one_way(a: Tensor, b: Tensor) -> Tensor:
        n = a.shape[0]
        valid = y != IGNORE
        logits = a @ b.T / tau
        negatives = valid[:, None] & valid[None, :] & (y[:, None] != y[None, :])
        kept = negatives | torch.eye(n, dtype=torch.bool, device=a.device)
        per_anchor = torch.logsumexp(logits.masked_fill(~kept, -1e9), dim=1) - logits.diagonal()
        return per_anchor[valid & negatives.any(1)].mean()

    return 0.5 * (one_way(z_a, z_b) + one_way(z_b, z_a))


# ------------------------------------------------------------------------------------- inputs
def make_inputs(size: int, dim: int, images: int, seed: int) -> dict[str, Tensor]:
    """Source/target embeddings [P, D] (P = images·size²), labels, and the target's second view."""
    g = torch.Generator().manual_seed(seed)
    p = images * size * size
    freq = torch.tensor(CLASS_FREQ)

    def embed() -> Tensor:
        return torch.nn.functional.normalize(torch.randn(p, dim, generator=g), dim=1)

    y_src = torch.multinomial(freq, p, replacement=True, generator=g)
    y_tgt = torch.multinomial(freq, p, replacement=True, generator=g)
    y_tgt[torch.rand(p, generator=g) < TARGET_IGNORED] = IGNORE
    z_tgt = embed()
    z_strong = torch.nn.functional.normalize(z_tgt + 0.3 * torch.randn(p, dim, generator=g), dim=1)
    return {"z_src": embed(), "y_src": y_src, "z_tgt": z_tgt, "y_tgt": y_tgt, "z_strong": z_strong}


def loss_fn(name: str, x: dict[str, Tensor]) -> tuple[Callable[[], Tensor], list[Tensor], int]:
    """(a call computing the loss from fresh leaves, the leaves, pixels it draws from)."""
    leaves = [t.clone().requires_grad_(True) for t in (x["z_src"], x["z_tgt"], x["z_strong"])]
    z_src, z_tgt, z_strong = leaves
    y = torch.cat([x["y_src"], x["y_tgt"]])
    n_pmc, n_pix = y.numel(), x["y_tgt"].numel()
    freq = update_class_freq(torch.zeros(len(CLASS_FREQ)), y, 0.0)
    anchors = [0]

    def pmc_sampled() -> Tensor:
        keep = sample_anchors(y, anchor_keep_probs(freq, BASE_RATE, BOOST), MAX_ANCHORS)
        anchors[0] = keep.numel()
        return supervised_infonce(torch.cat([z_src, z_tgt])[keep], y[keep], TAU)

    def pmc_naive() -> Tensor:
        anchors[0] = int((y != IGNORE).sum())
        return naive_supervised_contrast(torch.cat([z_src, z_tgt]), y, TAU)

    def pix_sampled() -> Tensor:
        idx = torch.randperm(n_pix)[:PIX_PIXELS]
        anchors[0] = idx.numel()
        return pixel_view_contrast(z_tgt[idx], z_strong[idx], x["y_tgt"][idx], TAU)

    def pix_naive() -> Tensor:
        anchors[0] = int((x["y_tgt"] != IGNORE).sum())
        return naive_view_contrast(z_tgt, z_strong, x["y_tgt"], TAU)

    fns = {"pmc_sampled": pmc_sampled, "pmc_naive": pmc_naive, "pix_sampled": pix_sampled, "pix_naive": pix_naive}
    f = fns[name]

    def call() -> Tensor:
        for t in leaves:
            t.grad = None
        loss = f()
        loss.backward()
        return loss.detach()

    call.anchors = anchors  # type: ignore[attr-defined]
    return call, leaves, n_pmc if name.startswith("pmc") else n_pix


def measure_time(name: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Median time of one loss at one size (this process, the usual allocator)."""
    x = make_inputs(size, args.dim, args.images, args.seed)
    call, _, pixels = loss_fn(name, x)
    clock = CLOCK[args.clock]
    torch.manual_seed(args.seed)
    t0 = clock()
    call()  # warm-up
    first = clock() - t0
    times = [first] if first > args.long_call_s else []
    for _ in range(args.repeats if not times else 0):
        t0 = clock()
        call()
        times.append(clock() - t0)
    return {
        "pixels": pixels,
        "anchors": call.anchors[0],  # type: ignore[attr-defined]
        "time_s": statistics.median(times),
        "calls": len(times),
    }


def measure_memory(names: list[str], size: int, args: argparse.Namespace) -> dict[str, float]:
    """Peak RSS above resting (MiB) of one call of each loss at one size, one after the other."""
    peaks: dict[str, float] = {}
    for name in names:
        loss_fn(name, make_inputs(4, args.dim, args.images, args.seed))[0]()  # libraries' first-call set-up
        call, _, _ = loss_fn(name, make_inputs(size, args.dim, args.images, args.seed))
        torch.manual_seed(args.seed)
        hwm_reset = reset_peak_rss()
        rss0 = rss_kib("VmRSS")
        call()
        hwm = rss_kib("VmHWM") if hwm_reset else None
        peaks[name] = (hwm - rss0) / 1024 if hwm is not None and rss0 is not None else float("nan")
        del call
    return peaks


def memory_in_child(names: list[str], size: int, argv: list[str]) -> dict[str, float]:
    """`measure_memory` in a fresh process with glibc's mmap threshold fixed (see the docstring)."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--memory-worker", str(size), "--names", *names]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker failed (exit {proc.returncode}) at {size}²:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG) :])  # type: ignore[no-any-return]


def check_naive(args: argparse.Namespace) -> tuple[float, float]:
    """|naive − package| on all pixels at a small size, for PMC and PIX."""
    x = make_inputs(check_size(args), args.dim, args.images, args.seed)
    y = torch.cat([x["y_src"], x["y_tgt"]])
    z = torch.cat([x["z_src"], x["z_tgt"]])
    pmc = abs(float(naive_supervised_contrast(z, y, TAU)) - float(supervised_infonce(z, y, TAU)))
    za, zb, yt = x["z_tgt"], x["z_strong"], x["y_tgt"]
    pix = abs(float(naive_view_contrast(za, zb, yt, TAU)) - float(pixel_view_contrast(za, zb, yt, TAU)))
    return pmc, pix


def check_size(args: argparse.Namespace) -> int:
    return min(16, *args.sizes)


# ------------------------------------------------------------------------------------- report
def run(args: argparse.Namespace, argv: list[str]) -> dict[str, list[dict[str, Any]]]:
    budget_mib = args.naive_budget_gb * 1024
    results: dict[str, list[dict[str, Any]]] = {"pmc": [], "pix": []}
    per_pair: dict[str, float | None] = {"pmc": None, "pix": None}  # naive peak MiB per pixel pair so far
    for size in sorted(args.sizes):
        pixels = {"pmc": 2 * args.images * size * size, "pix": args.images * size * size}
        predicted = {k: (per_pair[k] or args.prior_bytes_per_pair / 2**20) * pixels[k] ** 2 for k in pixels}
        names = [f"{k}_sampled" for k in pixels] + [f"{k}_naive" for k in pixels if predicted[k] <= budget_mib]
        peaks = measure_memory(names, size, args) if args.in_process else memory_in_child(names, size, argv)
        for loss in ("pmc", "pix"):
            sampled = {**measure_time(f"{loss}_sampled", size, args), "peak_mib": peaks[f"{loss}_sampled"]}
            if f"{loss}_naive" in names:
                naive = {**measure_time(f"{loss}_naive", size, args), "peak_mib": peaks[f"{loss}_naive"]}
                if naive["peak_mib"] >= 1.0:  # measurable (not NaN, not below the RSS resolution)
                    per_pair[loss] = naive["peak_mib"] / pixels[loss] ** 2
                note = f"{naive['time_s']:.3f} s, {naive['peak_mib']:.0f} MiB"
            else:
                naive = {"skipped": predicted[loss]}
                note = f"skipped (predicted {predicted[loss] / 1024:.1f} GiB)"
            results[loss].append({"size": size, "sampled": sampled, "naive": naive})
            print(
                f"{loss} {size}²: sampled {sampled['time_s'] * 1e3:.1f} ms, {sampled['peak_mib']:.1f} MiB; "
                f"naive {note}",
                flush=True,
            )
    return results


def print_tables(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    titles = {
        "pmc": "PMC: anchor-sampled supervised InfoNCE (cap 4096 anchors) vs all pixels of both domains",
        "pix": f"PIX: {PIX_PIXELS} sampled pixels vs all target pixels (two views, both directions)",
    }
    for loss, rows in results.items():
        print(f"\n### {titles[loss]}\n")
        print(
            "| embeddings (crop at stride 8) | pixels | sampled: anchors | sampled: time (ms) | sampled: peak (MiB) "
            "| naive: pairs | naive: time (ms) | naive: peak (MiB) | naive / sampled time |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            s, nv, size = r["sampled"], r["naive"], r["size"]
            n = s["pixels"]
            head = (
                f"| {args.images}+{args.images} × {size}² ({8 * size}²) | {n} | {s['anchors']} | "
                f"{s['time_s'] * 1e3:.1f} | {s['peak_mib']:.1f} | {n * n / 1e6:.3g} M |"
            )
            if loss == "pix":
                head = head.replace(f"{args.images}+{args.images} ×", f"{args.images} ×", 1)
            if "skipped" in nv:
                over = f"skipped: predicted {nv['skipped'] / 1024:.1f} GiB > {args.naive_budget_gb:g} GiB"
                print(f"{head} {over} | – | – |")
            else:
                print(f"{head} {nv['time_s'] * 1e3:.0f} | {nv['peak_mib']:.0f} | {nv['time_s'] / s['time_s']:.0f}× |")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 24, 32, 48, 64, 96, 128, 192, 256],
                   help="side s of the s × s embedding maps")  # fmt: skip
    p.add_argument("--dim", type=int, default=64, help="embedding dimension D")
    p.add_argument("--images", type=int, default=2, help="images per domain")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (median)")
    p.add_argument("--long-call-s", type=float, default=3.0, help="a warm-up call longer than this is the only one")
    p.add_argument("--naive-budget-gb", type=float, default=4.0, help="skip the naive loss above this predicted peak")
    p.add_argument("--prior-bytes-per-pair", type=float, default=64.0,
                   help="naive peak bytes per pixel pair assumed before any measurement")  # fmt: skip
    p.add_argument("--clock", choices=sorted(CLOCK), default="cpu", help="process CPU time or wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--in-process", action="store_true", help="memory measured here too (no child, default allocator): for tests"
    )
    p.add_argument("--memory-worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--names", nargs="+", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run the benchmark and print its tables; returns the rows (for tests)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.memory_worker:
        print(RESULT_TAG + json.dumps(measure_memory(args.names, args.memory_worker, args)))
        return {}
    d_pmc, d_pix = check_naive(args)
    print(f"naive vs package on all pixels at {check_size(args)}²: |ΔPMC| = {d_pmc:.2e}, |ΔPIX| = {d_pix:.2e}")
    results = run(args, argv)
    print(
        f"\n## Pixel contrast: anchor-sampled vs all pixels (D = {args.dim}, forward + backward, "
        f"{args.clock} time: median of {args.repeats} after a warm-up, one call above {args.long_call_s:g} s; "
        f"peak RSS above resting; torch {torch.__version__}, {torch.get_num_threads()} thread(s))"
    )
    print_tables(results, args)
    env = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
    print(f"\ncommand: {env}python {shlex.join(['benchmarks/contrast_scaling.py', *argv])}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    return results


if __name__ == "__main__":
    main()
