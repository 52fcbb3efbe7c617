"""Figures logged with each evaluation: confusion matrix, per-class IoU bars, prediction overlays.

Matplotlib figures are built with the object API (`matplotlib.figure.Figure` + Agg canvas), never
through pyplot's global state, so plotting is safe in Ray workers and threads and needs no display.
Overlays are plain image strips (PIL) at the tile's own resolution, coloured with the dataset's
palette: image | ground truth | prediction | prediction blended over the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

RGB = tuple[int, int, int]
IGNORE_COLOUR = (0, 0, 0)


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _rgb01(rgb: Sequence[int]) -> tuple[float, float, float]:
    return (rgb[0] / 255, rgb[1] / 255, rgb[2] / 255)


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Render `fig` to a PNG file (Agg canvas) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def colorize(mask: Any, palette: Sequence[RGB]) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a class-id mask; ignore (255) and unknown ids are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = IGNORE_COLOUR
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[_as_numpy(mask).astype(np.int64).clip(0, 255)]


def draw_confusion(ax: Any, confusion: Any, class_names: Sequence[str], predicted: str = "predicted") -> Any:
    """Draw a row-normalised confusion matrix (rows: ground truth, columns: `predicted`, the axis
    label) on `ax`, each cell's fraction written in it (up to 20 classes); returns the image."""
    cm = _as_numpy(confusion).astype(np.float64)
    c = len(class_names)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(c), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(c), labels=list(class_names))
    ax.set_xlabel(predicted)
    ax.set_ylabel("ground truth")
    if c <= 20:
        for i in range(c):
            for j in range(c):
                v = norm[i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
    return im


def confusion_matrix_figure(
    confusion: Any, class_names: Sequence[str], title: str = "", predicted: str = "predicted"
) -> Figure:
    """Row-normalised confusion matrix (rows: ground truth, columns: `predicted`, the axis label)."""
    size = max(4.0, 0.6 * len(class_names) + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    im = draw_confusion(ax, confusion, class_names, predicted)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.tight_layout()
    return fig


def iou_bar_figure(
    ious: Mapping[str, float], class_names: Sequence[str], palette: Sequence[RGB], title: str = ""
) -> Figure:
    """Per-class IoU bars in the class colours; classes absent from the evaluation are marked n/a."""
    c = len(class_names)
    values = [ious.get(n, np.nan) for n in class_names]
    colours = [_rgb01(palette[i]) if i < len(palette) else (0.5, 0.5, 0.5) for i in range(c)]
    fig = Figure(figsize=(max(5.0, 0.8 * c + 2.0), 3.6))
    ax = fig.add_subplot()
    heights = [0.0 if np.isnan(v) else v for v in values]
    ax.bar(range(c), heights, color=colours, edgecolor="black", linewidth=0.8)
    for i, v in enumerate(values):
        ax.text(
            i,
            (0.0 if np.isnan(v) else v) + 0.02,
            "n/a" if np.isnan(v) else f"{v:.2f}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    present = [v for v in values if not np.isnan(v)]
    title = title or "per-class IoU"
    if present:
        miou = float(np.mean(present))
        ax.axhline(miou, color="black", linestyle="--", linewidth=1.0, label=f"mIoU {miou:.3f}")
        ax.legend(loc="upper right", frameon=False, fontsize=8)
        title = f"{title} (mIoU {miou:.3f})"
    ax.set_xticks(range(c), labels=list(class_names), rotation=30, ha="right")
    ax.set_ylim(0.0, 1.08)
    ax.set_ylabel("IoU")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def pseudo_label_figure(metrics: Mapping[str, float], class_names: Sequence[str], title: str = "") -> Figure | None:
    """Pseudo-label diagnostics of one evaluation (`lpcgma.losses.pseudo_quality`): per class, the
    precision, recall and confident share of the teacher's pseudo-labels (left) and their class
    distribution beside the truth's (right). None when the metrics hold no pseudo-label diagnostics."""
    if not any(k.startswith("pseudo/label_share/") for k in metrics):
        return None
    c = len(class_names)
    x = np.arange(c)

    def series(key: str) -> list[float]:
        return [float(metrics.get(f"pseudo/{key}/{n}", np.nan)) for n in class_names]

    fig = Figure(figsize=(max(9.0, 1.4 * c + 3.0), 3.8))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    keys = ("precision", "recall", "confident_share")
    for k, key in enumerate(keys):
        left.bar(x + (k - 1) * 0.27, np.nan_to_num(series(key)), width=0.27, label=key.replace("_", " "))
    left.set_ylim(0.0, 1.05)
    left.set_title("pseudo-labels vs target masks")
    for k, key in enumerate(("label_share", "true_share")):
        right.bar(x + (k - 0.5) * 0.4, series(key), width=0.4, label="pseudo-labels" if k == 0 else "truth")
    right.set_title("class distribution")
    for ax in (left, right):
        ax.set_xticks(x, labels=list(class_names), rotation=30, ha="right")
        ax.legend(loc="upper right", frameon=False, fontsize=8)
    accuracy = metrics.get("pseudo/accuracy")
    suffix = f" (pixel accuracy {accuracy:.3f})" if accuracy is not None else ""
    fig.suptitle((title or "pseudo-label diagnostics") + suffix)
    fig.tight_layout()
    return fig


def class_ious(metrics: Mapping[str, float], prefix: str = "target_iou/") -> dict[str, float]:
    """Per-class IoUs from an evaluation's metrics (``target_iou/<class>``)."""
    return {k.removeprefix(prefix): float(v) for k, v in metrics.items() if k.startswith(prefix)}


def overlay_strip(image: Any, mask: Any, pred: Any, palette: Sequence[RGB], alpha: float = 0.5) -> np.ndarray:
    """uint8 [H, 4W + 3·gap, 3]: image | ground truth | prediction | prediction over the image."""
    img = _as_numpy(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.dtype != np.uint8:
        scale = 255.0 if float(img.max(initial=0.0)) <= 1.0 else 1.0
        img = (img.astype(np.float64) * scale).clip(0, 255).astype(np.uint8)
    gt = colorize(mask, palette)
    pr = colorize(pred, palette)
    blend = (img.astype(np.float64) * (1 - alpha) + pr.astype(np.float64) * alpha).astype(np.uint8)
    h = img.shape[0]
    gap = np.full((h, 4, 3), 255, dtype=np.uint8)
    return np.concatenate([img, gap, gt, gap, pr, gap, blend], axis=1)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 array as PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")
    return path


def legend_figure(class_names: Sequence[str], palette: Sequence[RGB]) -> Figure:
    """The class colours of the overlays and predictions."""
    from matplotlib.patches import Patch

    fig = Figure(figsize=(2.6, 0.3 * len(class_names) + 0.4))
    handles = [Patch(facecolor=_rgb01(palette[i]), edgecolor="black", label=name) for i, name in enumerate(class_names)]
    handles.append(Patch(facecolor=_rgb01(IGNORE_COLOUR), edgecolor="black", label="ignore / no data"))
    fig.legend(handles=handles, loc="center", frameon=False)
    return fig


def safe_name(name: str) -> str:
    """A file-name-safe version of a tile name."""
    stem = Path(str(name)).stem or "tile"
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)


__all__ = [
    "class_ious",
    "colorize",
    "confusion_matrix_figure",
    "draw_confusion",
    "iou_bar_figure",
    "legend_figure",
    "overlay_strip",
    "pseudo_label_figure",
    "safe_name",
    "save_figure",
    "save_png",
]
