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
from lpcgma.data.stream import TrainStream, augmented_stream
from lpcgma.engine.checkpoint import (
    latest_checkpoint,
    model_state,
    prune_checkpoints,
    read_checkpoint,
    rng_state,
    set_rng_state,
    step_dir,
    write_checkpoint,
)
from lpcgma.engine.evaluator import Evaluator, resolve_device
from lpcgma.engine.label_free import (
    CRITERIA,
    TARGET_LABEL_FREE,
    Criterion,
    find_criterion,
    is_better,
)
from lpcgma.engine.source_stage import check_model_compatible, ensure_source_model
from lpcgma.methods import METHODS, Method, build_method

SELECTION_METRIC = "target_miou"  # the default of train.select_by


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
    # the teacher's target pseudo-labels against the target masks since the last evaluation, [2, C, C]
    # (`Method.pseudo_label_confusion`): rank 0, when the method has pseudo-labels and the target labels
    pseudo_confusion: Tensor | None = None


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
        self.offline_masks: dict[int, Tensor] = {}  # OfflineTargetLabelling: this rank's target labels
        self.best_metric = -math.inf if self.selection.mode == "max" else math.inf
        self.best_step = -1
        self.evaluator = Evaluator(cfg, self.data, self.method, self.device, self.memory_format)
        fp16 = self.evaluator.use_amp and self.evaluator.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    # ------------------------------------------------------------------------------------ setup
    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        groups = self.method.param_groups(o)
        for g in groups:
            g["initial_lr"] = g["lr"]
        # on a GPU the fused kernels (one launch per step for all parameters); the CPU keeps the
        # default implementation, so that CPU results stay as measured (fused rounds differently)
        fused = self.device.type == "cuda"
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=fused)
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, fused=fused)

    @functools.cached_property
    def train_streams(self) -> tuple[TrainStream, TrainStream]:
        """The source and target streams, built once (rare-class histograms are computed here)."""
        d, seed = self.cfg.data, self.cfg.train.seed
        target = self.data.target_train
        if self._offline_labels_from() is not None:
            target = _OfflineMasks(target, self.offline_masks)
        rcs = d.rcs_temperature if d.rcs_enabled else None
        mean, std, rank, world = self.data.mean, self.data.std, self.rank, self.world_size
        return (
            augmented_stream(self.data.source_train, d, mean, std, seed * 2 + 1, rank, world, rcs, source=True),  # type: ignore[arg-type]
            augmented_stream(target, d, mean, std, seed * 2 + 2, rank, world),  # type: ignore[arg-type]
        )

    def streams(self) -> tuple[Iterator[dict[str, Tensor]], Iterator[dict[str, Tensor]]]:
        """Batch iterators of both domains from the current step on."""
        src, tgt = self.train_streams
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
        """Write step_<N>/ (resumable; unless not `step_folder`) and best/ (the model, `model_state`)
        when `is_best`; keep the 2 most recent step folders. Returns the step folder (None when not written)."""
        config_yaml = dump_config(self.cfg)
        state = self.state_dict()
        path = write_checkpoint(step_dir(self.ckpt_root, self.step), state, config_yaml) if step_folder else None
        if is_best:  # every best evaluation, checkpoint step or not: best/ is never stale
            write_checkpoint(self.ckpt_root / "best", model_state(state), config_yaml)
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
        src_it, _ = self.streams()
        device_batches = (self.to_device(b) for b in src_it)
        self.method.prepare(device_batches, len(self.data.source_train))  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------- step
    def to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A batch on the device; images ([B, C, H, W]) in the networks' memory format."""
        out = {}
        for k, v in batch.items():
            fmt = self.memory_format if v.dim() == 4 else torch.preserve_format
            out[k] = v.to(self.device, non_blocking=True, memory_format=fmt)
        return out

    def run_step(self, source: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
        """One optimisation step; returns the method's logs (tensors, no host sync)."""
        self.method.train()
        source, target = self.to_device(source), self.to_device(target)
        with self.evaluator.autocast():
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
        evaluator, dataset = self.evaluator, self.data.target_train

        def tiles() -> Iterator[tuple[int, Tensor]]:  # averaged softmax scores of the sliding window
            for i in self.train_streams[1].shard.tolist():
                yield i, evaluator.tile_scores(evaluator.eval_transform(dataset[i])["image"], net)

        self.offline_masks.update(self.method.make_offline_labels(tiles()))

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
        src_it, tgt_it = self.streams()
        bar = self._progress_bar()
        metrics: dict[str, float] = {}
        last_ckpt: Path | None = latest_checkpoint(self.ckpt_root) if self.is_main else None
        window: list[dict[str, Tensor]] = []
        t0 = time.perf_counter()
        offline_from = self._offline_labels_from()
        while self.step < cfg.iters:
            if offline_from is not None and self.step >= offline_from and not self.offline_masks:
                self._make_offline_target_labels()
                tgt_it = self.train_streams[1].batches(self.step)  # new loader workers see the labels
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
            self.evaluator.precise_bn()
        pseudo_confusion: Tensor | None = None
        if do_eval and self.is_main:
            pseudo_confusion = self.method.pseudo_label_confusion()  # evaluate() reports and resets the counts
            metrics, confusion, previews = self.evaluator.evaluate(self.cfg.tracking.log_overlays)
            metric, mode = self.selection
            score = metrics.get(metric, math.nan)
            if is_better(score, self.best_metric, mode):
                self.best_metric, self.best_step, is_best = score, self.step, True
            metrics["best_" + metric] = self.best_metric
            self._write_jsonl({"step": self.step, **metrics})
            if pseudo_confusion is not None:
                self._write_pseudo_confusion(pseudo_confusion)
        ckpt = self.save_checkpoint(is_best, step_folder=do_ckpt) if (do_ckpt or is_best) and self.is_main else None
        best = self.ckpt_root / "best" if is_best and self.is_main else None
        comm.barrier()
        if do_eval or do_ckpt:
            report = EvalReport(self.step, metrics, confusion, ckpt, is_best, previews, best, pseudo_confusion)
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

    def _write_pseudo_confusion(self, counts: Tensor) -> None:
        """One line of ``pseudo_confusion.jsonl``: the step, the class names and the pseudo-label counts
        (``every`` labelled target pixel, ``confident`` ones; rows: true class, columns: pseudo-label)."""
        record = {
            "step": self.step,
            "classes": self.class_names,
            "every": counts[0].tolist(),
            "confident": counts[1].tolist(),
        }
        with open(self.out_dir / "pseudo_confusion.jsonl", "a") as f:
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
