"""Label-free model-selection criteria: scores of target predictions that need no target labels.

In real UDA the target has no labels, yet hyperparameters and checkpoints must be chosen. Each
criterion here is a pure function of tensors whose rows are pixels; `CRITERIA` maps a criterion
name to the metric key the trainer reports and its mode (whether lower or higher is better). It
is the one place these modes are defined: the trainer's ``train.select_by`` and ``lpcgma tune
--objective`` both resolve names through `resolve_objective`.

- ``entropy`` (min): mean per-pixel prediction entropy, in nats.
- ``im`` (min): information maximisation, mean entropy − entropy of the mean class marginal: low
  when predictions are confident *and* spread over the classes (a collapse onto one class is
  confident but scores log C worse than a diverse prediction).
- ``snd`` (max): soft neighbourhood density (Saito et al., ICCV 2021): for each sampled pixel, the
  entropy of a softmax (temperature 0.05) over its cosine similarities to the other sampled
  pixels, averaged; high when target pixels form dense soft neighbourhoods. ``snd`` uses the
  softmax class probabilities as features (the paper's choice; every method trains them),
  ``snd_embed`` the projection-head embeddings (trained only by the contrastive methods).
- ``agreement`` (max): fraction of pixels where student and EMA teacher predict the same class
  (methods with a teacher only).
- ``flip_agreement`` (max): fraction of pixels where the prediction of the horizontally flipped
  image, flipped back, predicts the same class as the prediction of the image.
- ``source_miou`` (max): mIoU on source validation tiles (labelled, so no target labels needed).
- ``target_miou`` (max): mIoU on labelled target tiles: the oracle criterion the others are
  judged against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

Mode = Literal["max", "min"]
T = TypeVar("T")
SND_TEMPERATURE = 0.05  # Saito et al. 2021


class Criterion(NamedTuple):
    """A model-selection criterion: the metric key the trainer reports and its mode."""

    metric: str
    mode: Mode


CRITERIA: dict[str, Criterion] = {
    "target_miou": Criterion("target_miou", "max"),
    "source_miou": Criterion("source_miou", "max"),
    "entropy": Criterion("target_entropy", "min"),
    "im": Criterion("target_im", "min"),
    "snd": Criterion("target_snd", "max"),
    "snd_embed": Criterion("target_snd_embed", "max"),
    "agreement": Criterion("target_agreement", "max"),
    "flip_agreement": Criterion("target_flip_agreement", "max"),
}
# The criteria computed from unlabelled target tiles (train.label_free_tiles).
TARGET_LABEL_FREE = ("entropy", "im", "snd", "snd_embed", "agreement", "flip_agreement")


def find_criterion(name: str) -> Criterion | None:
    """The criterion called `name`, or whose metric key is `name`; None when neither."""
    if name in CRITERIA:
        return CRITERIA[name]
    return next((c for c in CRITERIA.values() if c.metric == name), None)


def is_better(value: float, best: float, mode: str) -> bool:
    """Whether `value` beats `best` under `mode` ("max": larger, "min": smaller); NaN never does.
    The one "better than" of the project: best checkpoint, best trial, promotion."""
    return value > best if mode == "max" else value < best


def best_of(items: Iterable[T], mode: str, key: Callable[[T], Any] | None = None) -> T:
    """The best of `items` under `mode` (max or min of `key`, default the item itself)."""
    pick = max if mode == "max" else min
    return pick(items, key=key) if key is not None else pick(items)  # type: ignore[type-var, return-value]


def resolve_objective(objective: str, mode: str | None = None) -> tuple[str, Mode]:
    """(metric key, mode) of a criterion name or a reported metric key.

    The mode comes from `CRITERIA`; an explicit `mode` wins; a metric key the registry does not
    know is maximised unless `mode` says otherwise.
    """
    if mode is not None and mode not in ("max", "min"):
        raise ValueError(f"mode = {mode!r} is invalid: expected 'max' or 'min'")
    if not objective:
        raise ValueError(f"objective is empty: expected a criterion name ({', '.join(CRITERIA)}) or a metric key")
    found = find_criterion(objective)
    metric = found.metric if found else objective
    resolved = mode or (found.mode if found else "max")
    return metric, resolved  # type: ignore[return-value]


# ------------------------------------------------------------------------------------- criteria
def pixel_entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) of each row of class probabilities [N, C] → [N]; 0·log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def mean_entropy(probs: Tensor) -> Tensor:
    """Mean prediction entropy (nats) over pixels of probabilities [N, C]; lower = more confident."""
    return pixel_entropy(probs).mean()


def information_maximisation(probs: Tensor) -> Tensor:
    """Mean entropy − entropy of the mean class marginal, of probabilities [N, C]; lower is better.

    In [−log C, 0] (the marginal's entropy is at least the mean entropy): −log C for confident
    one-hot predictions spread evenly over the classes; 0 for predictions all of one class, and
    for uniform predictions.
    """
    return mean_entropy(probs) - pixel_entropy(probs.mean(0))


def soft_neighbourhood_density(features: Tensor, temperature: float = SND_TEMPERATURE) -> Tensor:
    """SND of features [N, D] (N ≥ 2): mean entropy of each row's softmax over its cosine
    similarities to the other rows, divided by `temperature`; higher is better."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features have shape {tuple(features.shape)}: expected [N, D] with N >= 2")
    if not temperature > 0:
        raise ValueError(f"temperature = {temperature!r} is invalid: expected > 0")
    f = F.normalize(features.float(), dim=1)
    sim = (f @ f.T) / temperature
    sim.fill_diagonal_(-torch.inf)  # a pixel is not its own neighbour
    return pixel_entropy(sim.softmax(dim=1)).mean()


def argmax_agreement(probs_a: Tensor, probs_b: Tensor) -> Tensor:
    """Fraction of rows where two predictions [N, C] pick the same class; higher is better."""
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"predictions have shapes {tuple(probs_a.shape)} and {tuple(probs_b.shape)}: expected equal")
    return (probs_a.argmax(-1) == probs_b.argmax(-1)).float().mean()


def subsample(n_total: int, n: int, seed: int) -> Tensor:
    """`n` distinct indices of range(n_total) drawn with `seed` (all of them, in order, when n ≥ n_total)."""
    if n >= n_total:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


def label_free_metrics(
    probs: Tensor,
    embed: Tensor,
    teacher_probs: Tensor | None = None,
    flip_probs: Tensor | None = None,
    snd_pixels: int = 1024,
    seed: int = 0,
) -> dict[str, float]:
    """Every target criterion of `TARGET_LABEL_FREE`, keyed by its metric key.

    `probs` [N, C] are the student's softmax outputs on unlabelled target pixels, `embed` [N, D]
    its embeddings of the same pixels, `teacher_probs` the EMA teacher's outputs (no ``agreement``
    without it), `flip_probs` the student's outputs on the flipped images, flipped back. SND uses
    `snd_pixels` pixels drawn with `seed`.
    """
    if embed.shape[0] != probs.shape[0]:
        raise ValueError(f"embed has {embed.shape[0]} rows but probs {probs.shape[0]}: expected one row per pixel")
    probs = probs.float()
    idx = subsample(probs.shape[0], snd_pixels, seed).to(probs.device)
    values = {
        "entropy": mean_entropy(probs),
        "im": information_maximisation(probs),
        "snd": soft_neighbourhood_density(probs[idx]),
        "snd_embed": soft_neighbourhood_density(embed[idx]),
    }
    if teacher_probs is not None:
        values["agreement"] = argmax_agreement(probs, teacher_probs)
    if flip_probs is not None:
        values["flip_agreement"] = argmax_agreement(probs, flip_probs)
    return {CRITERIA[name].metric: float(v) for name, v in values.items()}


__all__ = [
    "CRITERIA",
    "SND_TEMPERATURE",
    "TARGET_LABEL_FREE",
    "Criterion",
    "argmax_agreement",
    "find_criterion",
    "information_maximisation",
    "label_free_metrics",
    "mean_entropy",
    "pixel_entropy",
    "resolve_objective",
    "soft_neighbourhood_density",
    "subsample",
]
