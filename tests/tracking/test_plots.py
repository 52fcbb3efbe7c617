"""The evaluation figures are real PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lpcgma.data.classes import LOVEDA_CLASSES
from lpcgma.tracking import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_confusion_matrix_and_iou_bars(tmp_path: Path) -> None:
    names = LOVEDA_CLASSES.names
    cm = torch.randint(0, 100, (len(names), len(names)))
    cm[4] = 0  # a class absent from the ground truth
    p1 = plots.save_figure(plots.confusion_matrix_figure(cm, names), tmp_path / "cm.png")
    ious = plots.class_ious({"target_iou/road": 0.5, "target_iou/water": 0.25, "target_miou": 0.3})
    assert ious == {"road": 0.5, "water": 0.25}
    p2 = plots.save_figure(plots.iou_bar_figure(ious, names, LOVEDA_CLASSES.palette), tmp_path / "iou.png")
    p3 = plots.save_figure(plots.legend_figure(names, LOVEDA_CLASSES.palette), tmp_path / "legend.png")
    assert all(_is_png(p) for p in (p1, p2, p3))


def test_pseudo_label_figure_only_with_diagnostics(tmp_path: Path) -> None:
    from lpcgma.losses.pseudo_quality import pseudo_label_counts, pseudo_label_report

    names = LOVEDA_CLASSES.names
    truth = torch.randint(0, len(names), (2, 16, 16))
    counts = pseudo_label_counts(truth.flip(-1), torch.rand(2, 16, 16), truth, 0.5, len(names))
    metrics = pseudo_label_report(counts, names)
    fig = plots.pseudo_label_figure(metrics, names, "pseudo-labels, step 4")
    assert fig is not None and _is_png(plots.save_figure(fig, tmp_path / "pseudo.png"))
    assert plots.pseudo_label_figure({"target_miou": 0.3}, names) is None


def test_overlay_uses_the_palette(tmp_path: Path) -> None:
    image = torch.randint(0, 256, (3, 16, 20), dtype=torch.uint8)
    mask = torch.full((16, 20), 1)
    mask[0, 0] = 255  # ignore → black
    pred = torch.full((16, 20), 2)
    strip = plots.overlay_strip(image, mask, pred, LOVEDA_CLASSES.palette)
    assert strip.shape == (16, 4 * 20 + 3 * 4, 3) and strip.dtype == np.uint8
    gt = strip[:, 24:44]
    assert tuple(gt[1, 1]) == LOVEDA_CLASSES.palette[1] and tuple(gt[0, 0]) == (0, 0, 0)
    assert tuple(strip[5, 48 + 5]) == LOVEDA_CLASSES.palette[2]
    path = plots.save_png(strip, tmp_path / "o.png")
    assert _is_png(path) and Image.open(path).size == (92, 16)
