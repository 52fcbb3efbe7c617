"""The iteration-based adaptation loop: one source batch and one target batch per step.

Reads top to bottom: build → resume → for each step: `run_step` → periodic log / eval / checkpoint
(callbacks receive each). The loop knows nothing of Ray or MLflow; they are callbacks. With
torch.distributed initialised (Ray Train), gradients are averaged across ranks after each backward,
every rank draws from its own data shard, and rank 0 evaluates and writes checkpoints.
"""

from __future__ import annotations

import functools
import json
import math
import random
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import Tensor

from lpcgma import comm
from lpcgma.config import ConfigError, ExperimentConfig, dump_config
from lpcgma.data.build import DomainData, build_datasets
from lpcgma.data.stream import TrainStream
from lpcgma.data.transforms import EvalTransform, TrainTransform
from lpcgma.engine.checkpoint import (
    latest_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    rng_state,
    set_rng_state,
    step_dir,
    write_checkpoint,
)
from lpcgma.engine.evaluate import confusion_matrix, metrics_from_confusion, rescale_image, sliding_window_logits
from lpcgma.engine.label_free import (
    CRITERIA,
    TARGET_LABEL_FREE,
    Criterion,
    find_criterion,
    is_better,
    label_free_metrics,
    subsample,
)
from lpcgma.engine.source_stage import check_model_compatible, ensure_source_model
from lpcgma.methods import METHODS, Method, build_method
from lpcgma.methods.base import pixel_rows
from lpcgma.models import upsample_logits
from lpcgma.models.batchnorm import recompute_bn_stats

SELECTION_METRIC = "target_miou"  # the default of train.select_by
# Seed of the fixed evaluation subsamples (label-free target tiles, SND pixels, source tiles): the
# same whatever train.seed, so that runs and trials on the same data are scored on the same pixels.
EVAL_SUBSAMPLE_SEED = 0
PRECISE_BN_SEED = 1_000_003  # the precise-BN streams' seeds: PRECISE_BN_SEED + domain index


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the loss terms."""


@dataclass
class EvalReport:
    """What one evaluation produced; handed to callbacks."""

    step: int
    metrics: dict[str, float]
    confusion: Tensor | None  # target [C, C] on rank 0; None elsewhere and without target labels
    checkpoint: Path | None  # the step checkpoint written at this step (rank 0), if any
    is_best: bool
    previews: list[dict[str, Any]] = field(default_factory=list)  # a few tiles: image, mask, pred, name
    best_checkpoint: Path | None = None  # checkpoints/best, when this evaluation is the best so far (rank 0)


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    final_metrics: dict[str, float]
    best_metric: float
    best_step: int
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    selection_metric: str = SELECTION_METRIC  # the metric key `best_metric` is the best value of


class Callback:
    """Hooks into the loop. Subclasses override what they need; all hooks run on every rank."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_log(self, step: int, logs: dict[str, float]) -> None: ...

    def on_eval(self, report: EvalReport) -> None: ...

    def on_train_end(self, result: TrainResult) -> None: ...

    def on_exception(self, error: BaseException) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def check_reported(cfg: ExperimentConfig, metric: str, what: str) -> None:
    """Raise ConfigError naming `what` when the evaluations of `cfg` never report `metric`."""
    t = cfg.train
    label_free = {CRITERIA[name].metric: name for name in TARGET_LABEL_FREE}
    problem = ""
    if metric in label_free:
        if t.label_free_tiles == 0:
            problem = "the label-free criteria are off (train.label_free_tiles=0)"
        elif label_free[metric] == "agreement" and not getattr(METHODS.get(cfg.method.name), "uses_teacher", False):
            problem = f"method.name={cfg.method.name} has no EMA teacher to agree with"
    elif metric.startswith("source_") and t.source_eval_tiles == 0:
        problem = "source evaluation is off (train.source_eval_tiles=0)"
    elif metric.startswith("target_") and not cfg.data.target_labels:
        usable = ", ".join(n for n in CRITERIA if n != "target_miou")
        problem = f"data.target_labels=false leaves no target labels; expected a label-free criterion: {usable}"
    if problem:
        raise ConfigError(f"{what} = {metric!r} is never reported: {problem}")


def selection_criterion(cfg: ExperimentConfig) -> Criterion:
    """The criterion ``train.select_by`` names (checked to be reported under `cfg`)."""
    found = find_criterion(cfg.train.select_by)
    if found is None:
        raise ConfigError(
            f"config key 'train.select_by' = {cfg.train.select_by!r} is invalid: expected one of "
            f"{list(CRITERIA)} or their metric keys {[c.metric for c in CRITERIA.values()]}"
        )
    check_reported(cfg, found.metric, "config key 'train.select_by'")
    return found


@runtime_checkable
class OfflineTargetLabelling(Protocol):
    """A method whose last steps train on fixed target labels it makes once (SDCA's final
    self-training round). From step `offline_labels_from()` on, the trainer has the network of
    `begin_offline_labelling()` predict this rank's target_train tiles whole (sliding window, as
    evaluation does), turns the probabilities into label maps with `make_offline_labels` and serves
    those as the target tiles' masks: the stream crops, rescales and flips them with the images."""

    def offline_labels_from(self) -> int | None: ...  # first step on the offline labels (None: never)

    def begin_offline_labelling(self) -> torch.nn.Module: ...  # the labelling network, in eval mode

    def make_offline_labels(self, tiles: Iterable[tuple[int, Tensor]]) -> dict[int, Tensor]: ...


class _OfflineMasks(torch.utils.data.Dataset[dict[str, Any]]):
    """`dataset` whose masks are `masks[tile]` once `masks` is filled (a tile missing then is an error:
    never the tile's own mask); the dataset as it is while `masks` is empty."""

    def __init__(self, dataset: Any, masks: Mapping[int, Tensor]) -> None:
        self.dataset, self.masks = dataset, masks

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        return {**sample, "mask": self.masks[index]} if self.masks else sample  # type: ignore[no-any-return]


def _centre_crop(image: Tensor, size: int) -> Tensor:
    """The central (at most) size × size window of an image [C, H, W]."""
    h, w = image.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[..., top : top + size, left : left + size]


def poly_lr_factor(step: int, total: int, warmup: int, power: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then (1 − t/T)^power decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1.0 - step / max(1, total)) ** power


class Trainer:
    """Trains one method on one (source, target) pair as described by an ExperimentConfig."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        callbacks: Sequence[Callback] = (),
        device: torch.device | None = None,
        data: DomainData | None = None,
    ) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.rank, self.world_size = comm.rank(), comm.world_size()
        self.is_main = self.rank == 0
        self.device = device or resolve_device(cfg.train.device)
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.data = data or build_datasets(cfg.data)
        self.class_names = list(self.data.classes.names)
        self.method: Method = build_method(cfg, self.class_names).to(self.device)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        if cfg.train.channels_last:
            self.method.to(memory_format=self.memory_format)
        if cfg.train.compile:
            self.method.set_student_forward(cast(torch.nn.Module, torch.compile(self.method.student)))
        self.selection = selection_criterion(cfg)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: poly_lr_factor(s, cfg.train.iters, cfg.optim.warmup_iters, cfg.optim.poly_power),
        )
        self.step = 0
        self._offline_masks: dict[int, Tensor] = {}  # OfflineTargetLabelling: this rank's target labels
        self.best_metric = -math.inf if self.selection.mode == "max" else math.inf
        self.best_step = -1
        self.eval_transform = EvalTransform(self.data.mean, self.data.std)
        self.use_amp = cfg.train.amp and self.device.type == "cuda"
        bf16 = cfg.train.amp_dtype == "bfloat16" and (not self.use_amp or torch.cuda.is_bf16_supported())
        self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

    # ------------------------------------------------------------------------------------ setup
    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        groups = self.method.param_groups(o)
        for g in groups:
            g["initial_lr"] = g["lr"]
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)

    def _stream(self, dataset: Any, seed: int, rcs_temperature: float | None = None) -> TrainStream:
        """Training-augmented batches of `dataset` (this rank's shard), `data.batch_size` each."""
        d = self.cfg.data
        return TrainStream(
            dataset,
            TrainTransform(d.crop_size, d.scale_range, d.hflip, d.photometric, self.data.mean, self.data.std),
            batch_size=d.batch_size,
            seed=seed,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=d.num_workers,
            rcs_temperature=rcs_temperature,
        )

    @functools.cached_property
    def _train_streams(self) -> tuple[TrainStream, TrainStream]:
        """The source and target streams, built once (rare-class histograms are computed here)."""
        d, seed = self.cfg.data, self.cfg.train.seed
        target = self.data.target_train
        if self._offline_labels_from() is not None:
            target = _OfflineMasks(target, self._offline_masks)
        rcs = d.rcs_temperature if d.rcs_enabled else None
        return self._stream(self.data.source_train, seed * 2 + 1, rcs), self._stream(target, seed * 2 + 2)

    @functools.cached_property
    def _precise_bn_streams(self) -> list[TrainStream]:
        """One stream per domain the student trains on, with seeds of their own (not the training
        streams'), read from their first batch at every evaluation: the same crops each time."""
        datasets = {"source": self.data.source_train, "target": self.data.target_train}
        domains = self.method.student_domains
        return [self._stream(datasets[d], PRECISE_BN_SEED + i) for i, d in enumerate(domains)]

    def _streams(self) -> tuple[Iterator[dict[str, Tensor]], Iterator[dict[str, Tensor]]]:
        """Batch iterators of both domains from the current step on."""
        src, tgt = self._train_streams
        return src.batches(self.step), tgt.batches(self.step)

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "method_name": self.cfg.method.name,
            "class_names": self.class_names,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.best_metric = float(state["best_metric"])
        self.best_step = int(state["best_step"])

    def save_checkpoint(self, is_best: bool, step_folder: bool = True) -> Path | None:
        """Write step_<N>/ (unless not `step_folder`) and best/ when `is_best`; keep the 2 most recent
        step folders. Returns the step folder (None when not written)."""
        config_yaml = dump_config(self.cfg)
        state = self.state_dict()
        path = write_checkpoint(step_dir(self.ckpt_root, self.step), state, config_yaml) if step_folder else None
        if is_best:  # every best evaluation, checkpoint step or not: best/ is never stale
            write_checkpoint(self.ckpt_root / "best", state, config_yaml)
        prune_checkpoints(self.ckpt_root, keep=2)
        return path

    def maybe_resume(self, resume_from: str | Path | None) -> None:
        """Resume from `resume_from`, else from the newest checkpoint in out_dir (train.resume)."""
        path = Path(resume_from) if resume_from else None
        if path is None and self.cfg.train.resume:
            path = latest_checkpoint(self.ckpt_root)
        if path is None:
            self._start_fresh()
            return
        if path is not None:
            self.load_state_dict(read_checkpoint(path, map_location="cpu"))
            if self.world_size > 1:  # the checkpoint holds rank 0's RNG: give each rank its own stream
                torch.manual_seed(self.cfg.train.seed * 1000 + self.step * 7 + self.rank)

    def _start_fresh(self) -> None:
        """A new run: optional warm start of the student (``model.init_checkpoint``, or the shared
        source model of ``source_stage.enabled``), then the method's preparation pass."""
        init = self.cfg.model.init_checkpoint
        if self.cfg.source_stage.enabled:
            init = str(ensure_source_model(self.cfg, allow_training=self.world_size == 1).checkpoint)
        if init:
            check_model_compatible(self.cfg, init, self.class_names)
            self.method.load_student(read_checkpoint(init, map_location="cpu")["method"])
        src_it, _ = self._streams()
        device_batches = (self._to_device(b) for b in src_it)
        self.method.prepare(device_batches, len(self.data.source_train))  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------- step
    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A batch on the device; images ([B, C, H, W]) in the networks' memory format."""
        out = {}
        for k, v in batch.items():
            fmt = self.memory_format if v.dim() == 4 else torch.preserve_format
            out[k] = v.to(self.device, non_blocking=True, memory_format=fmt)
        return out

    def run_step(self, source: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
        """One optimisation step; returns the method's logs (tensors, no host sync)."""
        self.method.train()
        source, target = self._to_device(source), self._to_device(target)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            out = self.method.train_step(source, target, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        if self.world_size > 1:
            comm.average_gradients(self.method.student.parameters())
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.method.student.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.method.after_step(self.step)
        logs = dict(out.logs)
        logs["loss/total"] = out.loss.detach()
        return logs

    # ------------------------------------------------------------------------------- evaluation
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
        iterators = [stream.batches(0) for stream in self._precise_bn_streams]

        def images() -> Iterator[Tensor]:
            for _ in range(n):
                for it in iterators:
                    yield next(it)["image"].to(self.device, non_blocking=True, memory_format=self.memory_format)

        try:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                return recompute_bn_stats(net, images())
        finally:
            for it in iterators:
                it.close()  # type: ignore[attr-defined]

    def predict(self, images: Tensor, net: torch.nn.Module | None = None) -> Tensor:
        """Logits of `net` (default: the evaluated `Method.eval_net`) at input size for images [N,3,H,W]."""
        net = self.method.eval_net if net is None else net
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            return upsample_logits(net(images)["logits"], (images.shape[-2], images.shape[-1]))

    @torch.no_grad()
    def evaluate(self, num_previews: int = 0) -> tuple[dict[str, float], Tensor | None, list[dict[str, Any]]]:
        """Every evaluation metric, the target confusion matrix and a few target prediction previews.

        Target metrics (``target_miou``, …) over whole tiles when the target has labels (else no
        confusion matrix and no previews), ``source_miou`` on `train.source_eval_tiles` source
        validation tiles, the label-free criteria (`label_free_metrics`) and the method's diagnostics.
        """
        self.method.eval()
        t = self.cfg.train
        metrics: dict[str, float] = {}
        cm: Tensor | None = None
        previews: list[dict[str, Any]] = []
        if self.cfg.data.target_labels:
            everything = range(len(self.data.target_eval))  # type: ignore[arg-type]
            metrics, cm, previews = self._evaluate_tiles(self.data.target_eval, everything, "target_", num_previews)
        if t.source_eval_tiles:
            tiles = subsample(len(self.data.source_eval), t.source_eval_tiles, EVAL_SUBSAMPLE_SEED)  # type: ignore[arg-type]
            metrics.update(self._evaluate_tiles(self.data.source_eval, tiles.tolist(), "source_")[0])
        if t.label_free_tiles:
            metrics.update(self.label_free_metrics())
        metrics.update(self.method.diagnostics())
        return metrics, cm, previews

    def _evaluate_tiles(
        self, dataset: Any, indices: Sequence[int], prefix: str, num_previews: int = 0
    ) -> tuple[dict[str, float], Tensor, list[dict[str, Any]]]:
        """Metrics (keys `prefix`…) over whole labelled tiles by sliding window, and previews of the first few."""
        t = self.cfg.train
        c = len(self.class_names)
        cm = torch.zeros((c, c), dtype=torch.long)
        previews: list[dict[str, Any]] = []
        for n, i in enumerate(indices):
            raw = dataset[i]
            sample = self.eval_transform(raw)
            image = sample["image"].to(self.device)
            scale = self.cfg.data.eval_scale
            logits = sliding_window_logits(self.predict, image, c, t.eval_window, t.eval_stride, scale=scale)
            pred = logits.argmax(0).cpu()
            cm += confusion_matrix(pred, sample["mask"], c)
            if n < num_previews:
                previews.append({"name": raw["name"], "image": raw["image"], "mask": raw["mask"], "pred": pred})
        return metrics_from_confusion(cm, self.class_names, prefix=prefix), cm, previews

    @torch.no_grad()
    def label_free_metrics(self) -> dict[str, float]:
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
            x = _centre_crop(image, t.eval_window)[None].to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
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

    # --------------------------------------------------------------------- offline target labels
    def _offline_labels_from(self) -> int | None:
        m = self.method
        return m.offline_labels_from() if isinstance(m, OfflineTargetLabelling) else None

    @torch.no_grad()
    def _make_offline_target_labels(self) -> None:
        """Label this rank's shard of target_train tiles once (`OfflineTargetLabelling`); on a resumed
        run again, from the labelling network in the checkpoint. Collective: every rank calls it."""
        assert isinstance(self.method, OfflineTargetLabelling)
        net = self.method.begin_offline_labelling()
        t, c = self.cfg.train, len(self.class_names)

        def tiles() -> Iterator[tuple[int, Tensor]]:  # sliding_window_logits averages softmax scores
            for i in self._train_streams[1].shard.tolist():
                image = self.eval_transform(self.data.target_train[i])["image"].to(self.device)
                scale = self.cfg.data.eval_scale
                yield (
                    i,
                    sliding_window_logits(
                        lambda x: self.predict(x, net), image, c, t.eval_window, t.eval_stride, scale=scale
                    ),
                )

        self._offline_masks.update(self.method.make_offline_labels(tiles()))

    # ------------------------------------------------------------------------------------- loop
    def fit(self, resume_from: str | Path | None = None) -> TrainResult:
        """Train to `train.iters`, evaluating and checkpointing on schedule; return the result."""
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_config(self.cfg))
        self.maybe_resume(resume_from)
        for cb in self.callbacks:
            cb.on_train_start(self)
        try:
            result = self._loop()
        except BaseException as e:
            for cb in self.callbacks:
                cb.on_exception(e)
            raise
        for cb in self.callbacks:
            cb.on_train_end(result)
        return result

    def _loop(self) -> TrainResult:
        cfg = self.cfg.train
        src_it, tgt_it = self._streams()
        bar = self._progress_bar()
        metrics: dict[str, float] = {}
        last_ckpt: Path | None = latest_checkpoint(self.ckpt_root) if self.is_main else None
        window: list[dict[str, Tensor]] = []
        t0 = time.perf_counter()
        offline_from = self._offline_labels_from()
        while self.step < cfg.iters:
            if offline_from is not None and self.step >= offline_from and not self._offline_masks:
                self._make_offline_target_labels()
                tgt_it = self._train_streams[1].batches(self.step)  # new loader workers see the labels
            logs = self.run_step(next(src_it), next(tgt_it))
            window.append(logs)
            self.step += 1
            done = self.step == cfg.iters
            if self.step % cfg.log_every == 0 or done:
                floats = self._reduce_logs(window)
                window = []
                floats["lr"] = self.optimizer.param_groups[0]["lr"]
                floats["time/step_s"] = (time.perf_counter() - t0) / max(1, cfg.log_every)
                t0 = time.perf_counter()
                self._write_jsonl({"step": self.step, **floats})
                for cb in self.callbacks:
                    cb.on_log(self.step, floats)
                if bar is not None:
                    bar.set_postfix(loss=f"{floats['loss/total']:.3f}", refresh=False)
            if cfg.is_eval_step(self.step) or cfg.is_checkpoint_step(self.step):
                metrics, ckpt = self._eval_and_checkpoint(done)
                last_ckpt = ckpt or last_ckpt
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return TrainResult(
            step=self.step,
            out_dir=self.out_dir,
            final_metrics=metrics,
            best_metric=self.best_metric,
            best_step=self.best_step,
            best_checkpoint=(self.ckpt_root / "best") if (self.ckpt_root / "best").exists() else None,
            last_checkpoint=last_ckpt,
            selection_metric=self.selection.metric,
        )

    def _eval_and_checkpoint(self, done: bool) -> tuple[dict[str, float], Path | None]:
        cfg = self.cfg.train
        do_eval, do_ckpt = cfg.is_eval_step(self.step), cfg.is_checkpoint_step(self.step)
        metrics: dict[str, float] = {}
        confusion: Tensor | None = None
        previews: list[dict[str, Any]] = []
        is_best = False
        if do_eval:
            self.precise_bn()
        if do_eval and self.is_main:
            metrics, confusion, previews = self.evaluate(self.cfg.tracking.log_overlays)
            metric, mode = self.selection
            score = metrics.get(metric, math.nan)
            if is_better(score, self.best_metric, mode):
                self.best_metric, self.best_step, is_best = score, self.step, True
            metrics["best_" + metric] = self.best_metric
            self._write_jsonl({"step": self.step, **metrics})
        ckpt = self.save_checkpoint(is_best, step_folder=do_ckpt) if (do_ckpt or is_best) and self.is_main else None
        best = self.ckpt_root / "best" if is_best and self.is_main else None
        comm.barrier()
        if do_eval or do_ckpt:
            report = EvalReport(self.step, metrics, confusion, ckpt, is_best, previews, best)
            for cb in self.callbacks:
                cb.on_eval(report)
        return metrics, ckpt

    def _reduce_logs(self, window: list[dict[str, Tensor]]) -> dict[str, float]:
        """Mean of each log over the window (one host sync per log interval); NaN/inf → error."""
        keys = sorted({k for logs in window for k in logs})
        stacked = torch.stack([torch.stack([logs[k].float() for logs in window if k in logs]).mean() for k in keys])
        values = stacked.cpu().tolist()
        floats = dict(zip(keys, values, strict=True))
        bad = [k for k in keys if k.startswith("loss/") and not math.isfinite(floats[k])]
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step}: " + ", ".join(f"{k}={floats[k]}" for k in bad)
            )
        return floats

    def _write_jsonl(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _progress_bar(self) -> Any:
        if not (self.cfg.train.progress and self.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.train.iters, initial=self.step, desc=self.cfg.method.name, dynamic_ncols=True)


def train(
    cfg: ExperimentConfig, callbacks: Sequence[Callback] = (), resume_from: str | Path | None = None
) -> TrainResult:
    """Build a Trainer for `cfg` and run it to the end."""
    return Trainer(cfg, callbacks).fit(resume_from)
