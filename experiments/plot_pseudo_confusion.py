"""Plot a run's pseudo-label confusion matrices (`pseudo_confusion.jsonl`) side by side, one per evaluation.

    python experiments/plot_pseudo_confusion.py runs/synthetic --out results/pseudo_confusion.png
    python experiments/plot_pseudo_confusion.py RUN_DIR --out FILE --steps 100 400 --all-pixels

Each panel is the teacher's target pseudo-labels against the target masks, counted over the steps since
the previous evaluation, row-normalised (rows: true class, columns: pseudo-label): the confident
pixels (the default; those the threshold lets into the loss) or, with --all-pixels, every labelled
pixel. By default the first and the last evaluation. The lines also print, per evaluation, the
confident share and each class's most common wrong confident pseudo-label.
Works from any folder: it imports the installed `lpcgma` package only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lpcgma.tracking.plots import draw_confusion, save_figure

FILE = "pseudo_confusion.jsonl"


class InputError(ValueError):
    """Bad input: one line for the user, exit code 2."""


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The evaluations of `run_dir`'s pseudo_confusion.jsonl, checked: step, classes, two C×C matrices."""
    path = run_dir / FILE
    if not path.is_file():
        raise InputError(f"{path}: no such file (written by runs of a method with pseudo-labels and target labels)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
            c = len(record["classes"])
            for key in ("every", "confident"):
                if np.asarray(record[key]).shape != (c, c):
                    raise ValueError(f"'{key}' is not {c}×{c}")
            int(record["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}, line {n}: expected step, classes, every, confident: {e}") from e
        records.append(record)
    if not records:
        raise InputError(f"{path}: empty")
    return records


def pick(records: list[dict[str, Any]], steps: Sequence[int] | None) -> list[dict[str, Any]]:
    """The records of `steps` (default: the first and the last evaluation)."""
    if not steps:
        return [records[0], records[-1]] if len(records) > 1 else records
    by_step = {int(r["step"]): r for r in records}
    missing = [s for s in steps if s not in by_step]
    if missing:
        raise InputError(f"--steps {missing}: not evaluated; the file has steps {sorted(by_step)}")
    return [by_step[s] for s in steps]


def summary(record: dict[str, Any]) -> str:
    """One line: the confident share and each class's most common wrong confident pseudo-label."""
    every, confident = np.asarray(record["every"], float), np.asarray(record["confident"], float)
    names = record["classes"]
    parts = []
    for i, name in enumerate(names):
        row = confident[i].copy()
        if row.sum() == 0:
            continue
        row[i] = 0
        j = int(row.argmax())
        if row[j] > 0:
            parts.append(f"{name}→{names[j]} {row[j] / confident[i].sum():.0%}")
    share = confident.sum() / max(every.sum(), 1)
    return f"step {record['step']}: confident {share:.1%}; most common confident error per class: " + ", ".join(parts)


def figure(records: list[dict[str, Any]], key: str, title: str) -> Figure:
    """One row-normalised panel per record."""
    fig = Figure(figsize=(5.2 * len(records) + 0.6, 5.0))
    for k, record in enumerate(records):
        ax = fig.add_subplot(1, len(records), k + 1)
        draw_confusion(ax, record[key], record["classes"], predicted="pseudo-label")
        ax.set_title(f"evaluation at step {record['step']}: {int(np.sum(record[key]))} pixels", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (holds pseudo_confusion.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--steps", type=int, nargs="*", help="evaluation steps to plot (default: first and last)")
    parser.add_argument("--all-pixels", action="store_true", help="every labelled pixel, not only the confident")
    args = parser.parse_args(argv)
    try:
        records = read_records(args.run_dir)
        chosen = pick(records, args.steps)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for record in records:
        print(summary(record))
    key = "every" if args.all_pixels else "confident"
    which = "every labelled pixel's" if args.all_pixels else "confident"
    fig = figure(chosen, key, f"{args.run_dir.name}: {which} pseudo-labels against the target truth (row-normalised)")
    print(f"wrote {save_figure(fig, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
