"""A search's settings and the plain data its parts exchange: what every trial shares (`TrialSetup`),
what the MLflow hooks get (`SearchInfo`) and what a search returns (`SearchOutcome` of `TrialSummary`s,
with its Markdown summary)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from lpcgma.config import ExperimentConfig
from lpcgma.search_space import SearchSpace

PARENT_RUN_ENV = "LPCGMA_PARENT_RUN_ID"
# What --smoke-test changes (user overrides still win): a few tiny steps on a small model.
SMOKE_OVERRIDES: tuple[str, ...] = (
    "train.iters=4",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.log_every=2",
    "data.eval_max_tiles=2",
    "data.num_workers=0",
    "data.crop_size=64",
    "data.batch_size=2",
    "model.backbone=resnet18",
    "model.pretrained=false",
    "tracking.log_overlays=0",
    "source_stage.iters=2",  # a tiny source stage when one is asked for
)
SMOKE_MAX_SAMPLES = 3
_RUNTIME = "runtime"


def runtime(default: Any) -> Any:
    """A `SearchSettings` field that belongs to this invocation, not to the search: ``--resume`` takes
    it from the command line, never from the saved search."""
    return field(default=default, metadata={_RUNTIME: True})


@dataclass
class SearchSettings:
    """Everything a search needs; the CLI and the experiment scripts fill it from arguments.

    Fields declared with `runtime` describe this invocation (where Ray runs, what is printed); the
    others describe the search, and a resumed search takes them from its saved settings (`resumed`).
    """

    config: str = "synthetic"  # base config: file or packaged name
    search_space: str = "smoke"  # search space: file or packaged name
    overrides: list[str] = field(default_factory=list)  # dotted key=value applied to the base config
    num_samples: int = 8  # trials
    workers_per_trial: int = 1  # Ray Train workers per trial (1 = inline, no worker group)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    objective: str = "target_miou"  # a criterion of lpcgma.engine.label_free.CRITERIA or a reported metric key
    mode: str = ""  # max | min; "" = the objective's mode in CRITERIA (max for other metric keys)
    storage: str = "runs/tune"  # local folder or s3://bucket/prefix
    name: str = ""  # experiment name ("" = <method>_<dataset>_<time>)
    resume: bool = runtime(False)  # restore the search `name` under `storage`
    address: str | None = runtime(None)  # an existing Ray cluster ("auto", "HOST:PORT"); None = start a local one
    max_concurrent: int | None = None  # cap on concurrent trials (default: what the cluster fits)
    seed: int = 0  # Optuna TPE seed
    n_startup_trials: int | None = None  # TPE random start-up trials (None: about a third of num_samples)
    grace_period: int = 1  # ASHA: evaluations before a trial can be stopped
    reduction_factor: float = 2.0  # ASHA halving rate
    max_failures: int = 1  # restarts of a failed trial (Tune) or worker group (Train), from the last checkpoint
    smoke_test: bool = False  # tiny trials (SMOKE_OVERRIDES) and at most SMOKE_MAX_SAMPLES of them
    parent_run_id: str | None = runtime(None)  # MLflow parent run (else on_search_start / $LPCGMA_PARENT_RUN_ID)
    num_cpus: int | None = runtime(None)  # local cluster only: CPUs to give Ray (default: all)
    num_gpus: int | None = runtime(None)  # local cluster only: GPUs to give Ray (default: detected)
    ray_temp_dir: str | None = runtime(None)  # local cluster only: Ray's temp folder (default: $RAY_TMPDIR or Ray's)
    top_k: int = runtime(3)  # trials shown in the final summary
    verbose: int = runtime(1)  # Ray Tune's console verbosity (0-3)

    def resumed(self, saved: Mapping[str, Any]) -> SearchSettings:
        """The settings a search was saved with (`saved`, unknown keys ignored), with this invocation's
        runtime settings (the fields declared with `runtime`)."""
        kept = {f.name: saved[f.name] for f in fields(self) if f.name in saved and not f.metadata.get(_RUNTIME)}
        now = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get(_RUNTIME)}
        return SearchSettings(**kept, **now)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares (sent to trial processes; plain data only)."""

    base: dict[str, Any]  # the resolved base config (flat dotted dict)
    searched: tuple[str, ...]  # dotted keys sampled per trial
    workers_per_trial: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    storage: str  # normalised storage root
    name: str  # experiment name
    parent_run_id: str | None = None


@dataclass
class SearchInfo:
    """Handed to the MLflow hooks."""

    name: str
    storage: str
    experiment_path: str  # storage/name
    base_config: ExperimentConfig
    space: SearchSpace
    defaults: dict[str, Any]
    settings: SearchSettings
    parent_run_id: str | None = None  # set once on_search_start has run


@dataclass
class TrialSummary:
    trial_id: str
    status: str  # finished | stopped early | error
    best: float | None  # best objective over the trial's evaluations
    evaluations: int
    params: dict[str, Any]
    checkpoint: str | None
    out_dir: str | None
    is_defaults: bool
    error: str | None = None  # why a failed trial failed (first line of its exception)
    retries: int = 0  # failures Ray retried (from the last checkpoint) before the trial's final attempt

    @property
    def status_text(self) -> str:
        """The status, and how often the trial was retried after a failure."""
        return f"{self.status}, retried {self.retries}×" if self.retries else self.status


@dataclass
class SearchOutcome:
    experiment_path: str
    objective: str
    mode: str
    trials: list[TrialSummary]
    results: Any = None  # ray.tune.ResultGrid
    complete: bool = True  # False when the search was interrupted before all trials ended
    source_model: dict[str, Any] | None = None  # the shared source model every trial started from

    def ranked(self) -> list[TrialSummary]:
        sign = -1.0 if self.mode == "max" else 1.0
        scored = [t for t in self.trials if t.best is not None]
        return sorted(scored, key=lambda t: sign * float(t.best))  # type: ignore[arg-type]

    @property
    def best(self) -> TrialSummary | None:
        r = self.ranked()
        return r[0] if r else None

    @property
    def defaults(self) -> TrialSummary | None:
        return next((t for t in self.trials if t.is_defaults), None)

    @property
    def stopped_early(self) -> int:
        return sum(t.status == "stopped early" for t in self.trials)

    def _against_source_model(self) -> list[str]:
        """The source-only model every trial started from, beside the defaults and the best trial."""
        if self.source_model is None:
            return []
        reference = self.source_model.get("metrics", {}).get(self.objective)
        if reference is None:
            return [f"source model {self.source_model['key']}: {self.objective} not reported"]
        lines = ["", f"| model | {self.objective} | vs source-only |", "|---|---|---|"]
        lines.append(f"| source-only (shared source model {self.source_model['key']}) | {reference:.4f} | |")
        for label, trial in (("literature defaults", self.defaults), ("best trial", self.best)):
            if trial is not None and trial.best is not None:
                delta = float(trial.best) - float(reference)
                lines.append(f"| {label} ({trial.trial_id}) | {trial.best:.4f} | {delta:+.4f} |")
        return lines

    def format(self, top_k: int = 3) -> str:
        finished = sum(t.status == "finished" for t in self.trials)
        failed = sum(t.status == "error" for t in self.trials)
        retried = sum(t.retries > 0 for t in self.trials)
        lines = [
            f"## Search summary: {self.experiment_path}",
            f"{len(self.trials)} trials: {finished} finished, {self.stopped_early} stopped early by ASHA, "
            f"{failed} failed" + (f", {retried} retried after a failure" if retried else "") + "; "
            f"objective {self.objective} ({self.mode})",
            "",
            f"| rank | trial | best {self.objective} | evals | status | params | checkpoint |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, t in enumerate(self.ranked()[:top_k], 1):
            params = ", ".join(f"{k}={_short(v)}" for k, v in t.params.items())
            tag = " (defaults)" if t.is_defaults else ""
            lines.append(
                f"| {i} | {t.trial_id}{tag} | {t.best:.4f} | {t.evaluations} | {t.status_text} | {params} | "
                f"{t.checkpoint or '-'} |"
            )
        best, dflt = self.best, self.defaults
        lines.append("")
        if best is not None and best is dflt:
            lines.append(f"the literature defaults (trial {best.trial_id}) are the best: {best.best:.4f}")
        elif best is not None and dflt is not None and dflt.best is not None:
            delta = float(best.best) - float(dflt.best)  # type: ignore[arg-type]
            lines.append(
                f"best trial {best.trial_id}: {self.objective} = {best.best:.4f} vs literature defaults "
                f"(trial {dflt.trial_id}, {dflt.status_text}): {dflt.best:.4f} ({delta:+.4f}"
                + ("; lower is better)" if self.mode == "min" else ")")
            )
        elif best is not None:
            lines.append(f"best trial {best.trial_id}: {self.objective} = {best.best:.4f}")
        lines += self._against_source_model()
        if best is not None:
            lines.append(f"best checkpoint: {best.checkpoint or '-'}")
            if best.out_dir:
                lines.append(f"best trial's run folder: {best.out_dir}")
        lines += [f"trial {t.trial_id} failed: {t.error}" for t in self.trials if t.status == "error"]
        lines += [
            f"trial {t.trial_id} was retried {t.retries}× after a failure (see {t.out_dir or 'its trial folder'})"
            for t in self.trials
            if t.retries and t.status != "error"
        ]
        return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
