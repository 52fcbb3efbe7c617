#!/usr/bin/env python
"""Cost of one training step per method: time and peak memory of `Trainer.run_step`, same model and batch.

    OMP_NUM_THREADS=1 python benchmarks/step_cost.py [--backbone resnet18] [--crop 64] [--batch 2] \
        [--warmup 3] [--steps 10] [--device cpu] [--ablations] [--profile-steps 3] [--set KEY=VALUE ...]

For each method (source_only, self_training, sdca, bida, lpcgma; with --ablations also LPCGMA with
PIX, the Gaussian prototypes or PMC switched off) a fresh Python process builds the trainer on the
synthetic benchmark (`synthetic` config: model, crop, batch from the flags, tracking off), runs the
method's preparation pass (SDCA's statistics: one batch), then `--warmup` steps and `--steps` timed
steps of `Trainer.run_step` on the trainer's own source/target streams (drawing a batch is not
timed); `--set` overrides apply to every method (precision, memory format, torch.compile: the
GPU study of BENCHMARKS.md). Reported per method: the median step time (process CPU time, the fair clock on a shared
machine with one thread, and wall time; on CUDA wall time after a synchronize) with its min–max, and
the peak memory of a step:

* CPU: after the timed steps (and the refit timing), `--memory-steps` more steps with glibc's mmap
  threshold fixed at 128 KiB (mallopt; the timings are taken before, with the usual allocator), so that every
  tensor of a step is its own mapping and what a step frees goes back to the system instead of
  staying in a heap where the next step would reuse it unseen. Per step: the peak resident set
  (VmHWM, reset through /proc/self/clear_refs) minus the resident set when it starts — activations,
  gradients and temporaries on top of the resting model, teacher, optimiser state and data; the
  largest over those steps is reported, with the process's peak resident set. One process per
  method, so peaks and allocator state never mix. (With --in-process, for tests, the allocator is
  left alone and heap reuse hides part of the peak; without clear_refs the figure is ru_maxrss over
  the whole process life. The output says which.)
* CUDA: torch.cuda.max_memory_allocated over the timed steps, minus the memory allocated when they
  start.

Ratios are to self_training (the issue's target: LPCGMA ≤ 1.25× self-training). LPCGMA runs with
``method.gmm_warmup_iters`` = `--warmup`, so the timed steps are steady-state steps with every term
on (PMC, PIX, the teacher's source pass for the prototype memory, forward alignment, reverse update);
the EM refit (every ``method.gmm_refit_every`` steps) falls in the last warm-up step, and is timed on
its own and reported amortised over its interval.

``--profile-steps N`` (default 3; 0 = off) profiles N LPCGMA steps with torch.profiler (CPU
activities) in a process of its own, after the same warm-up, and prints the time per phase —
labels put around the method's parts by this script (`record_function` wrappers installed on the
instance: nothing in the package changes) — and the top operators by self time.

Prints markdown tables and the command that produced them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared benchmark helpers
from proc_memory import reset_peak_rss, rss_kib  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")

BASELINE = "self_training"
# name → (method.name, extra overrides)
METHODS: dict[str, tuple[str, list[str]]] = {
    "source_only": ("source_only", []),
    "self_training": ("self_training", []),
    "sdca": ("sdca", ["method.sdca_init_batches=1"]),
    "bida": ("bida", []),
    "lpcgma": ("lpcgma", []),
}
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "lpcgma −pix": ("lpcgma", ["method.use_pix=false"]),
    "lpcgma −gmm": ("lpcgma", ["method.use_gmm_forward=false", "method.use_gmm_reverse=false"]),
    "lpcgma −pmc": ("lpcgma", ["method.use_pmc=false"]),
    # the two cost options: no backward through PIX's strong view, the prototype memory filled from
    # the student's (detached) source embeddings instead of a teacher forward on the source batch
    "lpcgma lean": ("lpcgma", ["method.pix_strong_grad=false", "method.gmm_memory_features=student"]),
}
ALL = {**METHODS, **ABLATIONS}
RESULT_TAG = "STEP_COST_RESULT "
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


# ------------------------------------------------------------------------------------ memory
def _fix_malloc_threshold() -> bool:
    """glibc: serve every allocation ≥ 128 KiB by its own mmap and trim the heap (no dynamic threshold)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024) == 1
        libc.malloc_trim(0)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def rss_peak(step: Callable[[], None], steps: int, fix_malloc: bool = True) -> dict[str, Any]:
    """Peak RSS of `steps` more steps above the resident set before each (CPU memory, after the timing).

    glibc's mmap threshold is fixed first, so that tensors freed by one step go back to the system
    instead of staying in the heap (where the next step would reuse them unseen by the RSS).
    """
    fixed = fix_malloc and _fix_malloc_threshold()
    step_kib, peak_kib = 0, 0
    for _ in range(max(1, steps)):
        reset = reset_peak_rss()
        rss0 = rss_kib("VmRSS")
        step()
        hwm = rss_kib("VmHWM") if reset else None
        if hwm is None or rss0 is None:  # whole-process peak (ru_maxrss, KiB on Linux)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return {"peak_mib": peak / 1024, "step_mib": (peak - (rss0 or 0)) / 1024, "mem_kind": "ru_maxrss"}
        step_kib, peak_kib = max(step_kib, hwm - rss0), max(peak_kib, hwm)
    return {"peak_mib": peak_kib / 1024, "step_mib": step_kib / 1024, "mem_kind": "rss" if fixed else "rss-heap"}


# ---------------------------------------------------------------------------------- labelling
class Labeller:
    """Wraps callables in torch.profiler.record_function with hierarchical names ("step/forward/PIX …/…")."""

    def __init__(self) -> None:
        self.stack: list[str] = []

    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        from torch.profiler import record_function

        self.stack.append(name)
        try:
            with record_function("/".join(self.stack)):
                yield
        finally:
            self.stack.pop()

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        """Replace `obj.attr` (a bound method or module function) by a labelled call of it."""
        inner: Callable[..., Any] = getattr(obj, attr)

        @functools.wraps(inner)
        def labelled(*args: Any, **kwargs: Any) -> Any:
            with self.label(name):
                return inner(*args, **kwargs)

        setattr(obj, attr, labelled)


def install_labels(trainer: Any, lab: Labeller) -> None:
    """Label LPCGMA's parts (instance attributes and the method module's imported loss function)."""
    import lpcgma.methods.lpcgma as lpcgma_module

    method = trainer.method
    lab.wrap(method, "train_step", "forward")
    lab.wrap(method, "base_step", "self-training base (source CE, teacher on target, ClassMix, student on mix)")
    lab.wrap(method, "_pmc", "PMC (anchor sampling + supervised InfoNCE)")
    lab.wrap(method, "_pix", "PIX (student on strong view + view contrast)")
    lab.wrap(method.prototypes, "push", "prototype memory push")
    lab.wrap(method.prototypes, "refit", "EM refit")
    lab.wrap(lpcgma_module, "forward_alignment_loss", "GMM forward alignment loss")
    lab.wrap(method, "after_step", "after_step")
    lab.wrap(method.prototypes, "reverse_update", "GMM reverse update")
    lab.wrap(method.teacher, "update", "EMA teacher update")
    lab.wrap(method.teacher, "forward", "teacher forward")
    lab.wrap(method, "forward_student", "student forward")


# ------------------------------------------------------------------------------------ workers
def build_config(method: str, args: argparse.Namespace, out_dir: Path) -> Any:
    from lpcgma.config import load_config, resolve_config_path

    name, extra = ALL[method]
    overrides = [
        f"method.name={name}",
        f"model.backbone={args.backbone}",
        f"data.crop_size={args.crop}",
        f"data.batch_size={args.batch}",
        f"data.synthetic_tiles={args.tiles}",
        f"data.synthetic_tile_size={max(128, args.crop)}",
        "data.num_workers=0",
        f"train.device={args.device}",
        "train.iters=100000",  # the LR schedule stays near its peak; nothing is evaluated or saved
        "train.resume=false",
        "train.progress=false",
        "tracking.enabled=false",
        f"train.out_dir={out_dir}",
        *extra,
        *args.set,
    ]
    if name == "lpcgma":
        overrides.append(f"method.gmm_warmup_iters={max(1, args.warmup)}")
    return load_config(resolve_config_path("synthetic"), overrides)


def measure(method: str, args: argparse.Namespace, profile_only: bool = False) -> dict[str, Any]:
    """Build the trainer for `method`, warm up, time `args.steps` steps and measure memory; or, with
    `profile_only`, profile `args.profile_steps` steps instead (its own process: the profiler's
    allocations stay out of the memory figures)."""
    import torch

    from lpcgma.engine.trainer import Trainer

    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="lpcgma-stepcost-") as tmp:
        cfg = build_config(method, args, Path(tmp) / "run")
        trainer = Trainer(cfg, device=device)
        trainer.maybe_resume(None)  # a fresh run: the method's preparation pass (SDCA's statistics)
        src_it, tgt_it = trainer.streams()

        def step() -> None:
            trainer.run_step(next(src_it), next(tgt_it))
            trainer.step += 1

        for _ in range(args.warmup):
            step()
        if profile_only:
            return {"method": method, "profile": profile_steps(trainer, step, args)}
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            alloc0 = torch.cuda.memory_allocated()
        cpu_times, wall_times = [], []
        for _ in range(args.steps):
            source, target = next(src_it), next(tgt_it)
            w0, c0 = time.perf_counter(), time.process_time()
            trainer.run_step(source, target)
            if cuda:
                torch.cuda.synchronize()
            cpu_times.append(time.process_time() - c0)
            wall_times.append(time.perf_counter() - w0)
            trainer.step += 1
        result: dict[str, Any] = {
            "method": method,
            "cpu_s": statistics.median(cpu_times),
            "wall_s": statistics.median(wall_times),
            "all_cpu_s": cpu_times,
            "all_wall_s": wall_times,
            "threads": torch.get_num_threads(),
            "params_m": sum(p.numel() for p in trainer.method.student.parameters()) / 1e6,
        }
        if cuda:
            result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            result["step_mib"] = (torch.cuda.max_memory_allocated() - alloc0) / 2**20
            result["mem_kind"] = "cuda"
            result.update(host_syncs(step, args.sync_steps))
        if ALL[method][0] == "lpcgma":
            result.update(refit_cost(trainer, args, cuda))
        if not cuda:  # last: it changes the allocator's settings for the rest of the process
            result.update(rss_peak(step, args.memory_steps, fix_malloc=not args.in_process))
    return result


def host_syncs(step: Callable[[], None], steps: int) -> dict[str, Any]:
    """CUDA: host–device synchronisations inside `steps` more steps (torch.cuda sync debug mode).

    Every synchronising call (`.item()`, `.cpu()`, `nonzero`, a data-dependent shape, …) raises a
    warning whose location is the Python line that made it; counted per step and by line.
    """
    import warnings
    from collections import Counter

    import torch

    if steps < 1:
        return {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = Counter(
        f"{'/'.join(Path(w.filename).parts[-3:])}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    )
    return {"syncs_per_step": sum(sites.values()) / steps, "sync_sites": sites.most_common(10)}


def refit_cost(trainer: Any, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """Time of one EM refit of the prototypes (median of 3) and its share per step over its interval."""
    import torch

    m = trainer.method.options
    if not (m.use_gmm_forward or m.use_gmm_reverse):
        return {}
    times = []
    for r in range(3):
        g = torch.Generator(device=trainer.device).manual_seed(r)
        w0 = time.perf_counter()
        trainer.method.prototypes.refit(m.gmm_em_iters, g)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - w0)
    t = statistics.median(times)
    return {
        "refit_s": t,
        "refit_every": m.gmm_refit_every,
        "refit_per_step_s": t / m.gmm_refit_every,
        "memory_filled": int(trainer.method.prototypes.count.sum()),
    }


def profile_steps(trainer: Any, step: Callable[[], None], args: argparse.Namespace) -> dict[str, Any]:
    """Per-phase times (ms per step) and the top operators of `args.profile_steps` LPCGMA steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import lpcgma.methods.lpcgma as lpcgma_module

    lab = Labeller()
    loss_fn = lpcgma_module.forward_alignment_loss
    install_labels(trainer, lab)

    def labelled_step() -> None:
        with lab.label("step"):
            step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()

    n = args.profile_steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    try:
        labelled_step()  # one unprofiled step through the wrappers
        with profile(activities=activities) as prof:
            for _ in range(n):
                labelled_step()
    finally:
        lpcgma_module.forward_alignment_loss = loss_fn  # the wrappers on the instance die with it
    phases: dict[str, float] = {}
    first: dict[str, float] = {}
    backward = 0.0
    optimizer = 0.0
    for e in prof.events():
        if e.name == "step" or e.name.startswith("step/"):
            phases[e.name] = phases.get(e.name, 0.0) + e.cpu_time_total / 1e3 / n
            first[e.name] = min(first.get(e.name, float("inf")), e.time_range.start)
        elif e.name.startswith("autograd::engine::evaluate_function"):
            backward += e.cpu_time_total / 1e3 / n
        elif e.name.startswith("Optimizer."):
            optimizer += e.cpu_time_total / 1e3 / n
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top_ops, max_name_column_width=60)
    phases = {k: phases[k] for k in sorted(phases, key=lambda k: first[k])}  # in the order they first ran
    return {"phases": phases, "backward_ms": backward, "optimizer_ms": optimizer, "top_ops": table, "steps": n}


# ------------------------------------------------------------------------------------ report
def run_in_subprocess(method: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", method]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"{method}: worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if not lines:
        raise RuntimeError(f"{method}: worker printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len(RESULT_TAG) :])  # type: ignore[no-any-return]


def print_profile(p: dict[str, Any]) -> None:
    phases: dict[str, float] = p["phases"]
    total = phases.get("step", 0.0)
    print(f"\n### Where an LPCGMA step goes (torch.profiler, CPU, mean of {p['steps']} steps)\n")
    print("| phase | ms / step | share of the step |")
    print("|---|---|---|")
    for name in phases:
        if name == "step":
            continue
        depth = name.count("/")
        label = name.split("/")[-1]
        indent = "&nbsp;&nbsp;" * (depth - 1) + ("└ " if depth > 1 else "")
        ms = phases[name]
        print(f"| {indent}{label} | {ms:.1f} | {ms / total:.0%} |")
    print(f"| backward (autograd, whole loss) | {p['backward_ms']:.1f} | {p['backward_ms'] / total:.0%} |")
    print(f"| optimiser (zero_grad + AdamW step) | {p['optimizer_ms']:.1f} | {p['optimizer_ms'] / total:.0%} |")
    print(f"| **whole step** | **{total:.1f}** | 100% |")
    print(f"\nTop operators by self CPU time ({p['steps']} profiled steps):\n")
    print("```")
    print(p["top_ops"].rstrip())
    print("```")


def report(
    results: list[dict[str, Any]], profile: dict[str, Any] | None, args: argparse.Namespace, argv: list[str]
) -> None:
    clock = "wall_s" if args.device == "cuda" else "cpu_s"
    base = next((r for r in results if r["method"] == BASELINE), None)
    kind = results[0]["mem_kind"] if results else "rss"
    mem_col = {
        "rss": "step peak RSS above resting (MiB)",
        "rss-heap": "step peak RSS above resting (MiB; glibc heap reuse hides part)",
        "ru_maxrss": "process peak RSS (ru_maxrss) above resting (MiB)",
        "cuda": "step peak CUDA allocated above resting (MiB)",
    }[kind]
    peak_col = "process peak RSS (MiB)" if kind != "cuda" else "peak CUDA allocated (MiB)"
    r0 = results[0]
    print(
        f"\n## Step cost: {args.backbone} (student {r0['params_m']:.1f} M params), crop {args.crop}, "
        f"batch {args.batch} + {args.batch}, {args.device}, {r0['threads']} thread(s); median of {args.steps} "
        f"steps after {args.warmup} warm-up steps; one process per method"
        f"{'; ' + ' '.join(args.set) if args.set else ''}\n"
    )
    clock_name = "CPU" if clock == "cpu_s" else "wall"
    print(
        f"| method | {clock_name} s / step (median) | {clock_name} min–max | "
        f"{'wall' if clock == 'cpu_s' else 'CPU'} s / step (median) | "
        f"time × self-training | {mem_col} | memory × self-training | {peak_col} |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        other = r["wall_s"] if clock == "cpu_s" else r["cpu_s"]
        spread = r["all_cpu_s"] if clock == "cpu_s" else r["all_wall_s"]
        t_ratio = f"{r[clock] / base[clock]:.2f}×" if base else "–"
        m_ratio = f"{r['step_mib'] / base['step_mib']:.2f}×" if base and base["step_mib"] > 0 else "–"
        print(
            f"| {r['method']} | {r[clock]:.3f} | {min(spread):.3f}–{max(spread):.3f} | {other:.3f} | {t_ratio} | "
            f"{r['step_mib']:.0f} | {m_ratio} | {r['peak_mib']:.0f} |"
        )
    print()
    for r in results:
        if "refit_s" in r:
            print(
                f"- {r['method']}: EM refit of the prototypes ({r['memory_filled']} embeddings in memory) "
                f"{r['refit_s'] * 1e3:.1f} ms, every {r['refit_every']} steps = "
                f"{r['refit_per_step_s'] * 1e3:.3f} ms per step amortised (not in the timed steps)"
            )
    for r in results:
        if "syncs_per_step" in r:
            where = ", ".join(f"{site} ×{n}" for site, n in r["sync_sites"]) or "none"
            print(f"- {r['method']}: {r['syncs_per_step']:g} host–device synchronisations per step ({where})")
    lpc = next((r for r in results if r["method"] == "lpcgma"), None)
    if lpc and base:
        ratio = (lpc[clock] + lpc.get("refit_per_step_s", 0.0)) / base[clock]
        verdict = "met" if ratio <= 1.25 else "**not met**"
        print(f"- LPCGMA / self-training, refit amortised: {ratio:.2f}× (target ≤ 1.25×: {verdict})")
    if kind == "ru_maxrss":
        print("- /proc/self/clear_refs unavailable: memory is the whole process's peak (ru_maxrss)")
    if profile is not None:
        print_profile(profile)
    env = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
    print(f"\ncommand: {env}python {shlex.join(['benchmarks/step_cost.py', *argv])}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=sorted(ALL), default=list(METHODS), metavar="METHOD",
                   help=f"methods to measure (default: {' '.join(METHODS)}; also {', '.join(ABLATIONS)})")  # fmt: skip
    p.add_argument("--ablations", action="store_true", help="also LPCGMA without PIX / the prototypes / PMC, and lean")
    p.add_argument("--backbone", default="resnet18", help="model.backbone (resnet18, resnet50, resnet101)")
    p.add_argument("--crop", type=int, default=64, help="data.crop_size")
    p.add_argument("--batch", type=int, default=2, help="data.batch_size (images per domain)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (LPCGMA's first EM refit among them)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--memory-steps", type=int, default=2, help="CPU: extra steps for the memory peak (max)")
    p.add_argument("--sync-steps", type=int, default=2, help="CUDA: steps run in sync debug mode (0 = skip)")
    p.add_argument("--tiles", type=int, default=8, help="synthetic tiles per domain and split")
    p.add_argument("--profile-steps", type=int, default=3, help="LPCGMA steps to profile (0 = no profile)")
    p.add_argument("--top-ops", type=int, default=15, help="operators listed in the profile")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every method, e.g. train.amp=false (repeatable)")  # fmt: skip
    p.add_argument("--in-process", action="store_true",
                   help="measure every method in this process (fast; memory figures then mix): for tests")  # fmt: skip
    p.add_argument("--worker", choices=sorted(ALL), help=argparse.SUPPRESS)
    p.add_argument("--profile-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ablations:
        args.methods += [a for a in ABLATIONS if a not in args.methods]
    if args.steps < 1:
        p.error("--steps must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print its tables; returns the per-method results (for tests)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(measure(args.worker, args, args.profile_only)))
        return []
    results = []
    for method in args.methods:
        r = measure(method, args) if args.in_process else run_in_subprocess(method, argv)
        results.append(r)
        print(f"{method}: {r['cpu_s']:.3f} s CPU, {r['wall_s']:.3f} s wall per step, "
              f"{r['step_mib']:.0f} MiB step peak", flush=True)  # fmt: skip
    profile = None
    if args.profile_steps > 0 and "lpcgma" in args.methods:
        if args.in_process:
            profile = measure("lpcgma", args, profile_only=True)["profile"]
        else:
            profile = run_in_subprocess("lpcgma", [*argv, "--profile-only"])["profile"]
    report(results, profile, args, argv)
    return results


if __name__ == "__main__":
    main()
