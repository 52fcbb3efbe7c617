"""Scoring a method's evaluated network: target and source mIoU, the label-free criteria, precise BN.

One `Evaluator` serves the training loop (`Trainer` evaluates through it on its schedule),
`lpcgma evaluate` and the source stage's reference score (both load a checkpoint into a bare
`Method` and score it without building an optimiser or training streams). Whole tiles are
predicted by a sliding window (`train.eval_window` / `train.eval_stride`, test scale
`data.eval_scale`); the evaluated network is `Method.eval_net` (the student, or the weight average
of ``train.eval_ema``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lpcgma import comm
from lpcgma.config import ExperimentConfig, replace
from lpcgma.data.build import DomainData, build_datasets
from lpcgma.data.stream import TrainStream, augmented_stream
from lpcgma.data.transforms import EvalTransform
from lpcgma.engine.checkpoint import is_model_only
from lpcgma.engine.evaluate import confusion_matrix, metrics_from_confusion, rescale_image, sliding_window_scores
from lpcgma.engine.label_free import label_free_metrics, subsample
from lpcgma.methods import Method, build_method
from lpcgma.methods.base import pixel_rows
from lpcgma.models import upsample_logits
from lpcgma.models.batchnorm import recompute_bn_stats

# Seed of the fixed evaluation subsamples (label-free target tiles, SND pixels, source tiles): the
# same whatever train.seed, so that runs and trials on the same data are scored on the same pixels.
EVAL_SUBSAMPLE_SEED = 0
PRECISE_BN_SEED = 1_000_003  # the precise-BN streams' seeds: PRECISE_BN_SEED + domain index

Metrics = dict[str, float]


def resolve_device(name: str) -> torch.device:
    """`train.device`: ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_settings(cfg: ExperimentConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    """(autocast on, its dtype): `train.amp` on CUDA only; bfloat16 when asked for and supported."""
    use_amp = cfg.train.amp and device.type == "cuda"
    bf16 = cfg.train.amp_dtype == "bfloat16" and (not use_amp or torch.cuda.is_bf16_supported())
    return use_amp, torch.bfloat16 if bf16 else torch.float16


def centre_crop(image: Tensor, size: int) -> Tensor:
    """The central (at most) size × size window of an image [C, H, W]."""
    h, w = image.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[..., top : top + size, left : left + size]


class Evaluator:
    """Evaluates `method` on `data` as `cfg.train` and `cfg.data` describe (see the module doc)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        data: DomainData,
        method: Method,
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.cfg, self.data, self.method, self.device = cfg, data, method, device
        self.class_names = list(data.classes.names)
        self.memory_format = memory_format
        self.use_amp, self.amp_dtype = amp_settings(cfg, device)
        self.eval_transform = EvalTransform(data.mean, data.std)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision as `train.amp` / `train.amp_dtype` ask (a no-op off CUDA)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    # ------------------------------------------------------------------------------ precise BN
    @functools.cached_property
    def precise_bn_streams(self) -> list[TrainStream]:
        """One stream per domain the student trains on, with seeds of their own (not the training
        streams'), read from their first batch at every evaluation: the same crops each time."""
        datasets = {"source": self.data.source_train, "target": self.data.target_train}
        d, mean, std = self.cfg.data, self.data.mean, self.data.std
        rank, world = comm.rank(), comm.world_size()
        return [
            augmented_stream(datasets[domain], d, mean, std, PRECISE_BN_SEED + i, rank, world)  # type: ignore[arg-type]
            for i, domain in enumerate(self.method.student_domains)
        ]

    def precise_bn(self) -> int:
        """Recompute the BatchNorm statistics of the student (given to the EMA teacher) and of the
        weight average, if any, each over the same `train.precise_bn_batches` fixed batches of every
        domain the student trains on (interleaved; uniform tiles, no rare-class sampling); returns the
        number of batches per network (0: off). Collective: every rank calls it."""
        n = self.cfg.train.precise_bn_batches
        if n == 0:
            return 0
        average = self.method.average
        for net in [self.method.student] + ([average.net] if average is not None else []):
            count = self._recompute_bn(net, n)
        if self.method.teacher is not None:
            self.method.teacher.copy_buffers(self.method.student)
        return count

    def _recompute_bn(self, net: torch.nn.Module, n: int) -> int:
        iterators = [stream.batches(0) for stream in self.precise_bn_streams]

        def images() -> Iterator[Tensor]:
            for _ in range(n):
                for it in iterators:
                    yield next(it)["image"].to(self.device, non_blocking=True, memory_format=self.memory_format)

        try:
            with self.autocast():
                return recompute_bn_stats(net, images())
        finally:
            for it in iterators:
                it.close()  # type: ignore[attr-defined]

    # ------------------------------------------------------------------------------ prediction
    def predict(self, images: Tensor, net: torch.nn.Module | None = None) -> Tensor:
        """Logits of `net` (default: the evaluated `Method.eval_net`) at input size for images [N,3,H,W]."""
        net = self.method.eval_net if net is None else net
        with self.autocast():
            return upsample_logits(net(images)["logits"], (images.shape[-2], images.shape[-1]))

    def tile_scores(self, image: Tensor, net: torch.nn.Module | None = None) -> Tensor:
        """Class scores [C, H, W] of one normalised whole tile [3, H, W] by the sliding window
        (softmax scores averaged over the overlapping windows, at the test scale)."""
        t, c = self.cfg.train, len(self.class_names)
        return sliding_window_scores(
            lambda x: self.predict(x, net), image.to(self.device), c, t.eval_window, t.eval_stride,
            scale=self.cfg.data.eval_scale,
        )  # fmt: skip

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, num_previews: int = 0) -> tuple[Metrics, Tensor | None, list[dict[str, Any]]]:
        """Every evaluation metric, the target confusion matrix and a few target prediction previews.

        Target metrics (``target_miou``, …) over whole tiles when the target has labels (else no
        confusion matrix and no previews), ``source_miou`` on `train.source_eval_tiles` source
        validation tiles, the label-free criteria (`label_free_metrics`) and the method's diagnostics.
        """
        self.method.eval()
        t = self.cfg.train
        metrics: Metrics = {}
        cm: Tensor | None = None
        previews: list[dict[str, Any]] = []
        if self.cfg.data.target_labels:
            everything = range(len(self.data.target_eval))  # type: ignore[arg-type]
            metrics, cm, previews = self.evaluate_tiles(self.data.target_eval, everything, "target_", num_previews)
        if t.source_eval_tiles:
            tiles = subsample(len(self.data.source_eval), t.source_eval_tiles, EVAL_SUBSAMPLE_SEED)  # type: ignore[arg-type]
            metrics.update(self.evaluate_tiles(self.data.source_eval, tiles.tolist(), "source_")[0])
        if t.label_free_tiles:
            metrics.update(self.label_free_metrics())
        metrics.update(self.method.diagnostics())
        return metrics, cm, previews

    def evaluate_tiles(
        self, dataset: Any, indices: Sequence[int], prefix: str, num_previews: int = 0
    ) -> tuple[Metrics, Tensor, list[dict[str, Any]]]:
        """Metrics (keys `prefix`…) over whole labelled tiles by sliding window, and previews of the first few."""
        c = len(self.class_names)
        cm = torch.zeros((c, c), dtype=torch.long)
        previews: list[dict[str, Any]] = []
        for n, i in enumerate(indices):
            raw = dataset[i]
            sample = self.eval_transform(raw)
            pred = self.tile_scores(sample["image"]).argmax(0).cpu()
            cm += confusion_matrix(pred, sample["mask"], c)
            if n < num_previews:
                previews.append({"name": raw["name"], "image": raw["image"], "mask": raw["mask"], "pred": pred})
        return metrics_from_confusion(cm, self.class_names, prefix=prefix), cm, previews

    @torch.no_grad()
    def label_free_metrics(self) -> Metrics:
        """The criteria of `label_free.TARGET_LABEL_FREE` on unlabelled target tiles; no mask is used.

        `train.label_free_tiles` target_train tiles (a fixed subsample: the same in every run on the
        same data) are resized to the test scale `data.eval_scale` and centre-cropped to
        `train.eval_window`; the evaluated network (`eval_net`) predicts each crop and its horizontal
        flip, the EMA teacher (if any) the crop: up to three forward passes per tile, at the network's
        output resolution. SND uses `train.snd_pixels` of those pixels (fixed subsample).
        """
        self.method.eval()
        t = self.cfg.train
        teacher, model = self.method.teacher, self.method.eval_net
        tiles = subsample(len(self.data.target_train), t.label_free_tiles, EVAL_SUBSAMPLE_SEED)  # type: ignore[arg-type]
        probs: list[Tensor] = []
        embeds: list[Tensor] = []
        flipped: list[Tensor] = []
        taught: list[Tensor] = []
        for i in tiles.tolist():
            image = rescale_image(self.eval_transform(self.data.target_train[i])["image"], self.cfg.data.eval_scale)
            x = centre_crop(image, t.eval_window)[None].to(self.device)
            with self.autocast():
                out = model(x)
                flip_logits = model(x.flip(-1))["logits"].flip(-1)
                teacher_logits = teacher(x)["logits"] if teacher is not None else None
            probs.append(pixel_rows(out["logits"].float().softmax(1)))
            embeds.append(pixel_rows(out["embed"].float()))
            flipped.append(pixel_rows(flip_logits.float().softmax(1)))
            if teacher_logits is not None:
                taught.append(pixel_rows(teacher_logits.float().softmax(1)))
        return label_free_metrics(
            torch.cat(probs),
            torch.cat(embeds),
            teacher_probs=torch.cat(taught) if taught else None,
            flip_probs=torch.cat(flipped),
            snd_pixels=t.snd_pixels,
            seed=EVAL_SUBSAMPLE_SEED,
        )


def evaluate_checkpoint(
    cfg: ExperimentConfig, method_state: dict[str, Any], num_previews: int = 0
) -> tuple[Metrics, Tensor | None, list[dict[str, Any]]]:
    """`Evaluator.evaluate` of a checkpoint's method state under `cfg`'s data and evaluation settings
    (its BatchNorm statistics as stored): a bare method, no optimiser and no training streams. A
    model (`is_model_only`: ``checkpoints/best``, an MLflow model) is scored as that network alone,
    with no teacher or method state: the label-free criteria that need a teacher are left out."""
    cfg = replace(cfg, {"model.pretrained": False})  # the checkpoint holds every weight
    if is_model_only(method_state):  # the weights are already the evaluated network's (the average's, if kept)
        cfg = replace(cfg, {"method": {"name": "source_only"}, "train.eval_ema": 0.0})
    data = build_datasets(cfg.data)
    device = resolve_device(cfg.train.device)
    method = build_method(cfg, list(data.classes.names)).to(device)
    method.load_state_dict(method_state)
    return Evaluator(cfg, data, method, device).evaluate(num_previews)
