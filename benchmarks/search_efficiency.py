#!/usr/bin/env python
"""Search efficiency: best target mIoU reached vs training compute spent, for finished Tune searches.

    python benchmarks/search_efficiency.py --search "TPE + ASHA=runs/tune/lpcgma_synthetic_…" \
        --search "random, no early stopping=runs/tune/selection_nostop16" --out search_efficiency.png

Compute is counted in training iterations summed over every trial (a stopped trial costs what it
ran), which does not depend on the machine or on how many trials ran at once. The searches'
evaluations are replayed in the order they were reported (Tune's `timestamp`, then each trial's own
order); after each one the best target mIoU seen so far is recorded. Prints a markdown table — the
best target mIoU within 25 / 50 / 100 % of the smallest search's compute, and at each search's end —
and saves the curves as a PNG.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from lpcgma.distributed.trial_results import read_trial_rows

Curve = list[tuple[float, float]]  # (cumulative iterations, best metric so far)


def best_so_far(trials: dict[str, list[dict[str, float]]], metric: str = "target_miou") -> Curve:
    """The best-so-far curve of one search over cumulative training iterations."""
    events = []
    for trial_id, rows in trials.items():
        prev_step = 0.0
        for i, row in enumerate(rows):
            step = row.get("step", prev_step)
            events.append((row.get("timestamp", 0.0), trial_id, i, step - prev_step, row.get(metric)))
            prev_step = step
    events.sort()
    curve: Curve = []
    spent, best = 0.0, float("-inf")
    for _, _, _, cost, value in events:
        spent += max(cost, 0.0)
        if value is not None and value == value:  # not NaN
            best = max(best, value)
        curve.append((spent, best))
    return curve


def best_within(curve: Curve, budget: float) -> float:
    """Best metric reached within `budget` iterations (−inf if nothing was evaluated by then)."""
    reached = [best for spent, best in curve if spent <= budget]
    return reached[-1] if reached else float("-inf")


def _pct(value: float) -> str:
    return "–" if value == float("-inf") else f"{100 * value:.1f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--search", action="append", required=True, metavar="LABEL=FOLDER",
                   help="a finished local Tune experiment folder and its label (repeat)")  # fmt: skip
    p.add_argument("--metric", default="target_miou")
    p.add_argument("--out", help="PNG of the curves")
    args = p.parse_args(argv)
    curves: dict[str, Curve] = {}
    sizes: dict[str, int] = {}
    for item in args.search:
        label, sep, folder = item.partition("=")
        if not sep or not folder:
            p.error(f"--search {item!r}: expected LABEL=FOLDER")
        trials = read_trial_rows(folder)
        curves[label], sizes[label] = best_so_far(trials, args.metric), len(trials)
    common = min(c[-1][0] for c in curves.values())
    fractions = (0.25, 0.5, 1.0)
    head = [f"best within {int(f * 100)} % ({int(f * common)} it.)" for f in fractions]
    print(f"| search | trials | iterations spent | {' | '.join(head)} | best at its end |")
    print("|---|---|---|" + "---|" * len(fractions) + "---|")
    for label, curve in curves.items():
        cells = [_pct(best_within(curve, f * common)) for f in fractions]
        print(f"| {label} | {sizes[label]} | {int(curve[-1][0])} | {' | '.join(cells)} | {100 * curve[-1][1]:.1f} |")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, curve in curves.items():
            xs = [x for x, y in curve if y != float("-inf")]
            ys = [100 * y for x, y in curve if y != float("-inf")]
            ax.step(xs, ys, where="post", label=label)
        ax.axvline(common, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("training iterations spent (all trials)")
        ax.set_ylabel(f"best {args.metric} so far (%)")
        ax.legend()
        fig.tight_layout()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=120)
        print(f"\nplot: {args.out}")
    print(f"\ncommand: python {shlex.join(['benchmarks/search_efficiency.py', *argv])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
