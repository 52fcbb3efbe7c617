"""How good would a model's pseudo-labels be at each teacher scale set? (`method.teacher_scales`)

    python experiments/probe_teacher_scales.py runs/source_models/KEY/model
    python experiments/probe_teacher_scales.py CHECKPOINT_DIR --sets 1 0.75,1.5 0.75,1,1.5 --crop-scales 0.75 1 1.5

Labels the target training tiles with the checkpoint's student, as a teacher would at the start of
adaptation, once per (crop scale, teacher scale set): each whole tile is resized by the crop scale
(the random rescale a training crop gets), and the class probabilities are averaged over the tile
resized again by each factor of the set (sliding window, evaluation's window and stride), then
compared with the tiles' masks. A row per pair: pixel accuracy, the share of pixels over the
confidence threshold δ and their accuracy, mIoU of the pseudo-labels, and the largest confusion
(the error with the most pixels: true class → pseudo-label, as a share of the true class's pixels).
It needs target labels (a benchmark); the data and model settings are the checkpoint's
`config.yaml`, with the overrides given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from lpcgma.config import ConfigError, load_config, replace
from lpcgma.data.build import build_datasets
from lpcgma.engine.checkpoint import read_checkpoint
from lpcgma.engine.evaluate import confusion_matrix, sliding_window_scores
from lpcgma.engine.evaluator import Evaluator
from lpcgma.methods import build_method


class InputError(ValueError):
    """Bad input: one line for the user, exit code 2."""


def parse_sets(texts: Sequence[str]) -> list[tuple[float, ...]]:
    """'0.75,1.5' → (0.75, 1.5), each factor in (0, 4]."""
    sets = []
    for text in texts:
        try:
            factors = tuple(float(t) for t in text.split(","))
        except ValueError as e:
            raise InputError(f"--sets: {text!r} is not comma-separated numbers") from e
        if not all(0 < f <= 4 for f in factors):
            raise InputError(f"--sets: {text!r}: expected factors in (0, 4]")
        sets.append(factors)
    return sets


def confusion_row(cm: torch.Tensor, confident: torch.Tensor, names: Sequence[str]) -> dict[str, float | str]:
    """Accuracy, confident share/accuracy, mIoU and the largest confusion of one pseudo-labelling
    (`cm`: all labelled pixels, `confident`: those over δ; rows true class, columns pseudo-label)."""
    cm, confident = cm.double(), confident.double()
    total = cm.sum().clamp_min(1)
    iou = cm.diag() / (cm.sum(0) + cm.sum(1) - cm.diag()).clamp_min(1)
    off = cm - torch.diag(cm.diag())  # the errors, in pixels
    true_c, label_c = divmod(int(off.argmax()), len(names))
    share = float(off[true_c, label_c] / cm[true_c].sum().clamp_min(1))
    return {
        "accuracy": float(cm.diag().sum() / total),
        "confident share": float(confident.sum() / total),
        "confident accuracy": float(confident.diag().sum() / confident.sum().clamp_min(1)),
        "mIoU": float(iou.mean()),
        "largest confusion": f"{names[true_c]} → {names[label_c]} {100 * share:.0f} %",
    }


def probe(checkpoint: Path, overrides: Sequence[str], sets: list[tuple[float, ...]], crop_scales: Sequence[float],
          threshold: float, max_tiles: int) -> list[dict[str, float | str]]:  # fmt: skip
    """One row per (crop scale, teacher scale set): see the module doc."""
    cfg = load_config(checkpoint / "config.yaml", overrides)
    if not cfg.data.target_labels:
        raise InputError("data.target_labels=false: the probe compares pseudo-labels with the target masks")
    cfg = replace(cfg, {"model.pretrained": False, "train.device": "cpu"})
    data = build_datasets(cfg.data)
    names = list(data.classes.names)
    method = build_method(cfg, names)
    method.load_student(read_checkpoint(checkpoint, map_location="cpu")["method"])
    method.eval()
    evaluator = Evaluator(cfg, data, method, torch.device("cpu"))
    window, stride, c = cfg.train.eval_window, cfg.train.eval_stride, len(names)
    n = min(len(data.target_train), max_tiles) if max_tiles > 0 else len(data.target_train)
    counts = {(s, f): (torch.zeros(c, c), torch.zeros(c, c)) for s in crop_scales for f in sets}
    for i in range(n):
        sample = evaluator.eval_transform(data.target_train[i])
        image, mask = sample["image"], torch.as_tensor(sample["mask"]).long()
        for crop, factors in counts:
            scores = [
                sliding_window_scores(lambda x: evaluator.predict(x, method.student), image, c, window, stride,
                                      scale=crop * f)
                for f in factors
            ]  # fmt: skip
            confidence, labels = (sum(scores) / len(scores)).max(dim=0)
            every, sure = counts[(crop, factors)]
            every += confusion_matrix(labels, mask, c).float()  # the ignore label is never counted
            keep = confidence >= threshold
            sure += confusion_matrix(labels[keep], mask[keep], c).float()
    rows = []
    for (crop, factors), (every, sure) in counts.items():
        row: dict[str, float | str] = {"crop scale": f"{crop:g}", "teacher scales": ",".join(f"{f:g}" for f in factors)}
        rows.append({**row, **confusion_row(every, sure, names)})
    return rows


def markdown(rows: list[dict[str, float | str]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{100 * v:.1f}" if isinstance(v, float) else v for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder (state.pt + config.yaml), e.g. a source model's")
    p.add_argument("--sets", nargs="+", default=["1", "0.75,1.5", "0.75,1,1.5"], help="teacher scale sets")
    p.add_argument("--crop-scales", type=float, nargs="+", default=[1.0], help="the crops' own rescale")
    p.add_argument("--threshold", type=float, default=0.968, help="confidence threshold δ")
    p.add_argument("--tiles", type=int, default=0, help="at most this many target tiles (0: all)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (data settings)")
    args = p.parse_args(argv)
    try:
        if not (args.checkpoint / "state.pt").is_file() or not (args.checkpoint / "config.yaml").is_file():
            raise InputError(f"{args.checkpoint}: expected a checkpoint folder with state.pt and config.yaml")
        if not all(0 < s <= 4 for s in args.crop_scales):
            raise InputError(f"--crop-scales: expected factors in (0, 4], got {args.crop_scales}")
        if not 0 <= args.threshold <= 1:
            raise InputError(f"--threshold: expected a value in [0, 1], got {args.threshold}")
        sets = parse_sets(args.sets)
        rows = probe(args.checkpoint, args.overrides, sets, args.crop_scales, args.threshold, args.tiles)
    except (InputError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
