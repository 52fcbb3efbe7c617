#!/usr/bin/env python
"""Data parallelism on CPU: 2 ranks vs 1 process at the same global batch (speed-up and quality).

    OMP_NUM_THREADS=1 python benchmarks/ddp_scaling.py [--iters 200] [--seeds 0 1] [--no-single-thread]

The `platform_overhead.py` trial (self-training on the synthetic benchmark, crops of 64², global
batch 4 + 4), trained to the end with each seed three ways:

* 1 process, 1 thread (batch 4);
* 1 process, as many threads as ranks below (batch 4): what a user gets without DDP on the same cores;
* 2 ranks × 1 thread, torch.distributed gloo (`torch.multiprocessing.spawn`), batch 2 per rank —
  the same Trainer code path Ray Train workers run (gradients all-reduced after each backward).

Speed-up compares the training phase (fit start → last file written: no process start or imports;
one evaluation at the end, by rank 0 alone), close to the steady-state step rate; quality is target
mIoU and the last logged loss. Prints a markdown table, one row per (setup, seed), and the means.
`--no-single-thread` skips the 1-thread runs (for quality at longer budgets: the two setups that use
all the cores); speed-ups are then relative to the multi-threaded single process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from statistics import mean

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from platform_overhead import standalone, standalone_two_ranks  # noqa: E402

RANKS = 2


def final_metrics(run_dir: Path) -> tuple[float, float]:
    """(target mIoU of the last evaluation, last logged total loss) of a run folder."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    miou = [r["target_miou"] for r in records if "target_miou" in r]
    loss = [r["loss/total"] for r in records if "loss/total" in r]
    if not miou or not loss:
        raise RuntimeError(f"{run_dir / 'metrics.jsonl'}: no target_miou / loss/total record")
    return float(miou[-1]), float(loss[-1])


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=200, help="training steps of each run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (train.seed)")
    p.add_argument("--no-single-thread", action="store_true", help="skip the 1 process × 1 thread runs")
    args = p.parse_args(argv)

    import torch

    root = Path(tempfile.mkdtemp(prefix="lpddp"))
    rows: list[dict[str, float | str]] = []
    try:
        for seed in args.seeds:
            extra = [  # one evaluation and checkpoint, at the end: rank 0 evaluates alone
                f"train.seed={seed}",
                f"train.eval_every={args.iters}",
                f"train.checkpoint_every={args.iters}",
                f"train.log_every={max(1, args.iters // 10)}",
            ]
            singles = [(f"1 process, {RANKS} threads", RANKS)]
            if not args.no_single_thread:
                singles.insert(0, ("1 process, 1 thread", 1))
            for setup, threads in singles:
                torch.set_num_threads(threads)
                out = root / f"s{seed}-t{threads}"
                wall, (_, body, _) = standalone(args.iters, out, extra)
                rows.append({"setup": setup, "seed": seed, "wall_s": wall, "train_s": body})
                rows[-1]["miou"], rows[-1]["loss"] = final_metrics(out)
            torch.set_num_threads(1)
            out = root / f"s{seed}-ddp"
            wall, (_, body, _) = standalone_two_ranks(args.iters, out, extra)
            rows.append({"setup": f"{RANKS} ranks × 1 thread (gloo)", "seed": seed, "wall_s": wall, "train_s": body})
            rows[-1]["miou"], rows[-1]["loss"] = final_metrics(out)  # rank 0 writes the run folder
    finally:
        shutil.rmtree(root, ignore_errors=True)

    reference = str(rows[0]["setup"])
    base = {r["seed"]: float(r["train_s"]) for r in rows if r["setup"] == reference}
    print(f"\n## DDP on CPU: {RANKS} ranks vs 1 process, global batch 4 + 4, {args.iters} steps\n")
    print(f"| setup | seed | wall (s) | training (s) | speed-up of training vs {reference} | target mIoU | last loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        speed = base[r["seed"]] / float(r["train_s"])
        r["speedup"] = speed
        print(
            f"| {r['setup']} | {r['seed']} | {float(r['wall_s']):.1f} | {float(r['train_s']):.1f} | {speed:.2f}× "
            f"| {100 * float(r['miou']):.1f} | {float(r['loss']):.3f} |"
        )
    print()
    for setup in dict.fromkeys(str(r["setup"]) for r in rows):
        mine = [r for r in rows if r["setup"] == setup]
        print(
            f"- {setup}: speed-up {mean(float(r['speedup']) for r in mine):.2f}×, "
            f"target mIoU {100 * mean(float(r['miou']) for r in mine):.1f} (mean of {len(mine)} seeds)"
        )
    print(f"- python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    return rows


if __name__ == "__main__":
    main()
