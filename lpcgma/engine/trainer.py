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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lpcgma import comm
from lpcgma.config import ExperimentConfig, dump_config
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
from lpcgma.engine.evaluate import confusion_matrix, metrics_from_confusion, sliding_window_logits
from lpcgma.methods import Method, build_method
from lpcgma.models import upsample_logits

SELECTION_METRIC = "target_miou"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the loss terms."""


@dataclass
class EvalReport:
    """What one evaluation produced; handed to callbacks."""

    step: int
    metrics: dict[str, float]
    confusion: Tensor | None  # [C, C] on rank 0, None elsewhere
    checkpoint: Path | None  # the checkpoint written at this step (rank 0), if any
    is_best: bool
    previews: list[dict[str, Any]] = field(default_factory=list)  # a few tiles: image, mask, pred, name


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    final_metrics: dict[str, float]
    best_metric: float
    best_step: int
    best_checkpoint: Path | None
    last_checkpoint: Path | None


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
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: poly_lr_factor(s, cfg.train.iters, cfg.optim.warmup_iters, cfg.optim.poly_power),
        )
        self.step = 0
        self.best_metric = -math.inf
        self.best_step = -1
        self.eval_transform = EvalTransform(self.data.mean, self.data.std)
        self.use_amp = cfg.train.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
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

    @functools.cached_property
    def _train_streams(self) -> tuple[TrainStream, TrainStream]:
        """The source and target streams, built once (rare-class histograms are computed here)."""
        d, seed = self.cfg.data, self.cfg.train.seed
        transform = TrainTransform(d.crop_size, d.scale_range, d.hflip, d.photometric, self.data.mean, self.data.std)
        rcs = d.rcs_temperature if d.rcs_enabled else None
        src, tgt = (
            TrainStream(
                dataset,  # type: ignore[arg-type]
                transform,
                batch_size=d.batch_size,
                seed=stream_seed,
                rank=self.rank,
                world_size=self.world_size,
                num_workers=d.num_workers,
                rcs_temperature=temperature,
            )
            for dataset, stream_seed, temperature in (
                (self.data.source_train, seed * 2 + 1, rcs),
                (self.data.target_train, seed * 2 + 2, None),
            )
        )
        return src, tgt

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

    def save_checkpoint(self, is_best: bool) -> Path:
        """Write step_<N>/ (and best/ when `is_best`), keep the 2 most recent step folders."""
        config_yaml = dump_config(self.cfg)
        state = self.state_dict()
        path = write_checkpoint(step_dir(self.ckpt_root, self.step), state, config_yaml)
        if is_best:
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
        """A new run: optional warm start of the student, then the method's preparation pass."""
        if self.cfg.model.init_checkpoint:
            self.method.load_student(read_checkpoint(self.cfg.model.init_checkpoint, map_location="cpu")["method"])
        src_it, _ = self._streams()
        device_batches = ({k: v.to(self.device) for k, v in b.items()} for b in src_it)
        self.method.prepare(device_batches, len(self.data.source_train))  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------- step
    def run_step(self, source: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
        """One optimisation step; returns the method's logs (tensors, no host sync)."""
        self.method.train()
        source = {k: v.to(self.device, non_blocking=True) for k, v in source.items()}
        target = {k: v.to(self.device, non_blocking=True) for k, v in target.items()}
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
    def predict(self, images: Tensor) -> Tensor:
        """Student logits at input size for normalised images [N,3,H,W]."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            return upsample_logits(self.method.student(images)["logits"], (images.shape[-2], images.shape[-1]))

    @torch.no_grad()
    def evaluate(self, num_previews: int = 0) -> tuple[dict[str, float], Tensor, list[dict[str, Any]]]:
        """Target metrics over whole tiles by sliding window, plus a few prediction previews."""
        self.method.eval()
        t = self.cfg.train
        c = len(self.class_names)
        cm = torch.zeros((c, c), dtype=torch.long)
        previews: list[dict[str, Any]] = []
        for i in range(len(self.data.target_eval)):  # type: ignore[arg-type]
            raw = self.data.target_eval[i]
            sample = self.eval_transform(raw)
            logits = sliding_window_logits(
                self.predict, sample["image"].to(self.device), c, t.eval_window, t.eval_stride
            )
            pred = logits.argmax(0).cpu()
            cm += confusion_matrix(pred, sample["mask"], c)
            if i < num_previews:
                previews.append({"name": raw["name"], "image": raw["image"], "mask": raw["mask"], "pred": pred})
        metrics = metrics_from_confusion(cm, self.class_names, prefix="target_")
        metrics.update(self.method.diagnostics())
        return metrics, cm, previews

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
        while self.step < cfg.iters:
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
            if self.step % cfg.eval_every == 0 or self.step % cfg.checkpoint_every == 0 or done:
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
        )

    def _eval_and_checkpoint(self, done: bool) -> tuple[dict[str, float], Path | None]:
        cfg = self.cfg.train
        do_eval = self.step % cfg.eval_every == 0 or done
        do_ckpt = self.step % cfg.checkpoint_every == 0 or done
        metrics: dict[str, float] = {}
        confusion: Tensor | None = None
        previews: list[dict[str, Any]] = []
        is_best = False
        if do_eval and self.is_main:
            metrics, confusion, previews = self.evaluate(self.cfg.tracking.log_overlays)
            score = metrics.get(SELECTION_METRIC, -math.inf)
            if score > self.best_metric:
                self.best_metric, self.best_step, is_best = score, self.step, True
            metrics["best_" + SELECTION_METRIC] = self.best_metric
            self._write_jsonl({"step": self.step, **metrics})
        ckpt = self.save_checkpoint(is_best) if do_ckpt and self.is_main else None
        comm.barrier()
        if do_eval or do_ckpt:
            report = EvalReport(self.step, metrics, confusion, ckpt, is_best, previews)
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
