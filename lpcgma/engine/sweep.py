"""A Ray-free random search: sampled configs trained by the Trainer, N processes at a time.

For machines without Ray (a lent GPU box with torch only) and for studies that need every trial
trained to the end (no early stopping). The first trial is the literature defaults (the base
config's value of every searched key), the others are drawn from the search space with a seeded
generator. Each trial writes ``<out>/<trial_id>/params.json`` (its point) and
``<out>/<trial_id>/result.json`` — one JSON row per evaluation, as Ray Tune writes them — so
`lpcgma.distributed.trial_results.read_trial_rows` (and ``experiments/selection_study.py
--experiment``) read a sweep folder like a Tune experiment. Finished trials are not retrained
(a rerun resumes); a trial stopped by the deadline keeps the rows it wrote.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lpcgma.config import ExperimentConfig, load_config, replace, resolve_config_path
from lpcgma.engine.checkpoint import drop_step_checkpoints
from lpcgma.engine.processes import map_in_processes
from lpcgma.engine.source_stage import check_searchable, ensure_source_model, evaluate_source_model
from lpcgma.engine.trainer import Callback, EvalReport, Trainer

RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"


class SweepDeadline(Exception):
    """The sweep's deadline passed while this trial was training."""


@dataclass(frozen=True)
class TrialSpec:
    """One trial of a sweep: its id, its sampled point and the base config it applies to."""

    trial_id: str
    point: dict[str, Any]
    config: str  # config file or packaged name
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    status: str  # "done" | "resumed" (finished earlier) | "deadline" (stopped, partial rows) | "skipped"
    last: dict[str, float]  # the last evaluation's row (empty when none)


def sample_points(space: Any, base: ExperimentConfig, num: int, seed: int) -> list[dict[str, Any]]:
    """`num` points of `space` (a `SearchSpace`): the literature defaults first, then random draws."""
    from lpcgma.search_space import defaults_point

    if num < 1:
        raise ValueError(f"a sweep needs at least 1 trial, got num={num}")
    rng = np.random.default_rng(seed)
    return [defaults_point(space, base)] + [space.sample(rng) for _ in range(num - 1)]


class _ResultRows(Callback):
    """Appends each evaluation as a Tune-style row to ``result.json``; stops the trial at the deadline."""

    def __init__(self, path: Path, trial_id: str, deadline: float | None) -> None:
        self.path, self.trial_id, self.deadline, self.reports = path, trial_id, deadline, 0

    def on_log(self, step: int, logs: dict[str, float]) -> None:
        if self.deadline is not None and time.time() > self.deadline:
            raise SweepDeadline(f"trial {self.trial_id} stopped at step {step}: the sweep's deadline passed")

    def on_eval(self, report: EvalReport) -> None:
        if not report.metrics:
            return  # a checkpoint without an evaluation
        self.reports += 1
        row = {"trial_id": self.trial_id, "training_iteration": self.reports, "step": report.step, **report.metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def trial_config(spec: TrialSpec, trial_dir: Path) -> ExperimentConfig:
    """The base config with the trial's point applied; its run folder is the trial folder, no MLflow."""
    cfg = load_config(resolve_config_path(spec.config), list(spec.overrides))
    return replace(
        cfg,
        {
            **spec.point,
            "train.out_dir": str(trial_dir),
            "train.resume": False,
            "tracking.enabled": False,
            "train.progress": False,
        },
    )


def run_trial(spec: TrialSpec, out: Path, deadline: float | None = None) -> TrialOutcome:
    """Train one trial to its end (or the deadline), writing its rows; a finished trial is read back."""
    trial_dir = out / spec.trial_id
    result = trial_dir / RESULT_FILE
    cfg = trial_config(spec, trial_dir)
    rows = _rows(result)
    if rows and rows[-1].get("step") == cfg.train.iters:
        return TrialOutcome(spec.trial_id, "resumed", rows[-1])
    if deadline is not None and time.time() > deadline:
        return TrialOutcome(spec.trial_id, "skipped", {})
    trial_dir.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)  # a partial trial restarts from scratch
    (trial_dir / PARAMS_FILE).write_text(json.dumps(spec.point, indent=1))
    status = "done"
    try:
        Trainer(cfg, [_ResultRows(result, spec.trial_id, deadline)]).fit()
        drop_step_checkpoints(trial_dir / "checkpoints")  # finished: its rows are read back, best/ is kept
    except SweepDeadline:
        status = "deadline"
    rows = _rows(result)
    return TrialOutcome(spec.trial_id, status, rows[-1] if rows else {})


def run_sweep(
    config: str,
    overrides: Sequence[str],
    search_space: str,
    num_samples: int,
    out: str | Path,
    seed: int = 0,
    jobs: int = 1,
    budget_s: float | None = None,
    log: Callable[[str], None] = print,
) -> list[TrialOutcome]:
    """Sample `num_samples` points of `search_space` and train them, `jobs` processes at a time.

    `budget_s` (optional) is a deadline from now: trials not started by then are skipped, running
    ones stop at their next log interval (keeping their rows). Returns every trial's outcome.
    """
    from lpcgma.search_space import load_search_space

    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    base = load_config(resolve_config_path(config), list(overrides))
    space = load_search_space(search_space, base.method.name, base)
    check_searchable(base, space.keys)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source_model = None
    if base.source_stage.enabled:  # obtained here once; every trial then reads it from the store
        model = ensure_source_model(base, log=log)
        metrics = evaluate_source_model(base, model)
        source_model = {"key": model.key, "uri": model.uri, "trained": model.trained, "metrics": metrics}
        shown = ", ".join(f"{k}={metrics[k]:.4f}" for k in ("target_miou", "source_miou") if k in metrics)
        log(f"source model {model.key} ({'trained' if model.trained else 'from the store'}): {shown}")
    specs = [
        TrialSpec(f"trial_{i:03d}", point, config, tuple(overrides))
        for i, point in enumerate(sample_points(space, base, num_samples, seed))
    ]
    (out / "sweep.json").write_text(
        json.dumps(
            {
                "config": config,
                "overrides": list(overrides),
                "search_space": space.path,
                "seed": seed,
                "num_samples": num_samples,
                "points": {s.trial_id: s.point for s in specs},
                "source_model": source_model,
            },
            indent=1,
        )
    )
    deadline = time.time() + budget_s if budget_s else None
    outcomes: list[TrialOutcome] = []

    def report(o: TrialOutcome) -> None:
        outcomes.append(o)
        shown = ", ".join(f"{k}={o.last[k]:.4f}" for k in ("step", "target_miou") if k in o.last)
        log(f"{o.trial_id}: {o.status} {shown}")

    for outcome in map_in_processes(run_trial, [(spec, out, deadline) for spec in specs], jobs):
        report(outcome)
    return outcomes
