"""The complete adaptation trainer as a Ray Train `TorchTrainer` worker function.

Ray Train starts one process per worker and initialises torch.distributed (gloo on CPU, NCCL on
GPU). Each worker builds the same `Trainer`: identical initial weights (same seed), its own shard of
the source and target streams (rank r of W draws tiles i % W == r), gradients averaged over ranks
after each backward (`comm.average_gradients`; no DDP wrapper, since a UDA step runs the student
several times before one backward). Everything that must agree across ranks stays consistent
without per-rank copies that drift: the EMA teacher follows identical student weights, and the
methods all-reduce their statistics (class frequencies, Gaussian prototypes) themselves. Rank 0
evaluates and writes checkpoints; every rank calls `ray.train.report` at each evaluation (rank 0
attaches the checkpoint). After a worker failure, `FailureConfig` restarts the group and
`ray.train.get_checkpoint()` resumes it from the last reported checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lpcgma.config import ExperimentConfig, flatten, load_config
from lpcgma.engine.trainer import Callback, EvalReport, Trainer, TrainResult
from lpcgma.tracking.runs import tracking_callbacks

ReportFn = Callable[[dict[str, Any], "Path | None"], None]  # (metrics, checkpoint folder or None)


def config_to_payload(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as a flat ``{dotted key: value}`` dict (what crosses process boundaries)."""
    return flatten(cfg)


def config_from_payload(payload: Mapping[str, Any]) -> ExperimentConfig:
    """Rebuild and validate a config sent by `config_to_payload`."""
    return load_config(None, dict(payload))


# Both reports hand the step folder to Ray, which copies it into the search's storage (what a retried
# trial or a restarted worker group resumes from; `CheckpointConfig.num_to_keep` bounds the copies),
# then delete the run folder's own copy: in a trial the resumable checkpoints are Ray's, and the run
# folder keeps its model (``checkpoints/best``). A trial's disk: one resumable state per kept report,
# not two (RESULTS.md, session 27).


def report_to_train(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
    """``ray.train.report`` from a Train worker (every rank; rank 0 passes the checkpoint folder)."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)


def report_to_tune(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
    """``ray.tune.report`` from a single-worker trial that runs the Trainer inline."""
    import ray.tune

    checkpoint = ray.tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    ray.tune.report(metrics, checkpoint=checkpoint)  # returns once Ray has copied the checkpoint
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


class RayReportCallback(Callback):
    """Reports every evaluation to Ray: metrics, and the checkpoint written at that step if any.

    `report_fn` is `report_to_train` (``ray.train.report``) inside Train workers — every rank calls
    it the same number of times; only rank 0 has metrics and a checkpoint — or `report_to_tune`
    (``ray.tune.report``) when a single-worker trial runs the Trainer inline in the Tune trial.
    Steps that only checkpoint (no evaluation) are not reported, so each report carries the
    objective and Tune's ``training_iteration`` counts evaluations.

    The last evaluation is reported from `on_train_end`, and this callback goes after the others:
    Tune may stop a trial inside its last report (ASHA at ``max_t``), and by then every other
    callback has finished the run (MLflow: last metrics, final checkpoint, status FINISHED).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        report_fn: ReportFn = report_to_train,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.report_fn = report_fn
        self.extra = dict(extra or {})
        self._final: tuple[dict[str, Any], Path | None] | None = None

    def on_eval(self, report: EvalReport) -> None:
        if not self.cfg.train.is_eval_step(report.step):
            return
        metrics: dict[str, Any] = {**self.extra, **report.metrics, "step": report.step}
        if report.step == self.cfg.train.iters:
            self._final = (metrics, report.checkpoint)
            return
        self.report_fn(metrics, report.checkpoint)

    def on_train_end(self, result: TrainResult) -> None:
        if self._final is not None:
            self.report_fn(*self._final)


def node_info() -> dict[str, str]:
    """Where this process runs (reported with the metrics): the Ray node id."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id()} if ray.is_initialized() else {}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: run the complete Trainer on this worker's rank.

    `config` holds ``experiment`` (the flat resolved config, `config_to_payload`) and optionally
    ``tracking_parent_run_id`` and ``tracking_tags`` (str → str).
    """
    import ray.train
    import torch

    cfg = config_from_payload(config["experiment"])
    device = None
    if torch.cuda.is_available() and cfg.train.device in ("auto", "cuda"):
        import ray.train.torch

        device = ray.train.torch.get_device()  # this worker's GPU among those visible on the node
        torch.cuda.set_device(device)
    callbacks: list[Callback] = [
        *tracking_callbacks(cfg, config.get("tracking_parent_run_id"), config.get("tracking_tags")),
        RayReportCallback(cfg, report_to_train, extra=node_info()),  # last: see its docstring
    ]
    trainer = Trainer(cfg, callbacks, device=device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.fit()
        return
    with checkpoint.as_directory() as folder:  # every rank loads the same state
        trainer.fit(resume_from=folder)


def fit_distributed(
    cfg: ExperimentConfig,
    num_workers: int,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    storage_path: str | None = None,
    name: str | None = None,
    max_failures: int = 1,
    run_callbacks: Sequence[Any] = (),
    tracking_parent_run_id: str | None = None,
    tracking_tags: Mapping[str, str] | None = None,
) -> Any:
    """Train `cfg` on `num_workers` Ray Train workers (TorchTrainer); returns the ``ray.train.Result``.

    The run resumes automatically when called again with the same (storage_path, name) — the Train
    V2 way a restarted Tune trial picks up its worker group's last checkpoint. `cfg.train.resume`
    is turned off so that only Ray's checkpoint (the same on every rank) decides where to resume.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from lpcgma.config import replace

    cfg = replace(cfg, {"train.resume": False})
    use_gpu = gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    loop_config: dict[str, Any] = {"experiment": config_to_payload(cfg)}
    if tracking_parent_run_id:
        loop_config["tracking_parent_run_id"] = tracking_parent_run_id
    if tracking_tags:
        loop_config["tracking_tags"] = dict(tracking_tags)
    run_config = ray.train.RunConfig(
        name=name,
        storage_path=storage_path,
        callbacks=list(run_callbacks),
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=run_config,
    )
    return trainer.fit()


def run_inline(
    cfg: ExperimentConfig,
    report_fn: ReportFn,
    resume_from: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
) -> Any:
    """Run the Trainer in this process, reporting each evaluation via `report_fn` (single-worker trials)."""
    trainer = Trainer(cfg, [*callbacks, RayReportCallback(cfg, report_fn, extra=node_info())])  # report last
    return trainer.fit(resume_from=resume_from)


__all__ = [
    "config_from_payload",
    "config_to_payload",
    "RayReportCallback",
    "fit_distributed",
    "node_info",
    "report_to_train",
    "report_to_tune",
    "run_inline",
    "train_loop_per_worker",
]
