"""The Tune trial: one config of a search trained inline (a single worker, in the trial process) or by a
`TorchTrainer` worker group (`lpcgma.distributed.train.fit_distributed`), and the trainable Tune runs.

A trial whose loss became non-finite leaves ``non_finite_loss.txt`` in its run folder; its retries
fail at once (from the last checkpoint it would diverge again)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lpcgma.config import ExperimentConfig, replace
from lpcgma.distributed.resources import ResourcePlan
from lpcgma.distributed.search_types import TrialSetup
from lpcgma.storage import is_local, join_uri
from lpcgma.tracking.search import trial_tags

DIVERGED_FILE = "non_finite_loss.txt"  # in a trial's run folder: why it diverged (its retries fail at once)


def _trial_out_dir(setup: TrialSetup) -> Path:
    """The Trainer's run folder inside the trial's own folder.

    Local storage: ``<storage>/<name>/<trial folder>/run`` (beside Tune's result.json, persists).
    Remote storage: the trial's local working folder (Ray's session folder on its node).
    """
    import ray.tune

    trial_dir = Path(ray.tune.get_context().get_trial_dir())
    if is_local(setup.storage):
        root = setup.storage.removeprefix("file://")
        return Path(root) / setup.name / trial_dir.name / "run"
    return Path.cwd() / "run"


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One Tune trial: the base config + this trial's sampled values, trained inline or by TorchTrainer."""
    import ray.tune

    from lpcgma.distributed.train import config_from_payload
    from lpcgma.engine.trainer import NonFiniteLossError

    ctx = ray.tune.get_context()
    trial_id = ctx.get_trial_id()
    sampled = {k: config[k] for k in setup.searched if k in config}
    out_dir = _trial_out_dir(setup)
    cfg = replace(
        config_from_payload(setup.base),
        {**sampled, "train.out_dir": str(out_dir), "train.resume": False, "train.progress": False},
    )
    parent = config.get("tracking_parent_run_id") or setup.parent_run_id  # a config entry wins
    tags = trial_tags(setup.name, trial_id)
    diverged = out_dir / DIVERGED_FILE
    if diverged.is_file():  # deterministic: a retry from the last checkpoint would diverge again
        raise NonFiniteLossError(f"{diverged.read_text().strip()} (an earlier attempt of this trial; not retried)")
    try:
        _train_trial(cfg, setup, parent, tags, trial_id)
    except Exception as e:  # a Train worker group reports its worker's error wrapped in its own
        text = f"{type(e).__name__}: {e}"
        if not isinstance(e, NonFiniteLossError) and "NonFiniteLossError" not in text:
            raise
        out_dir.mkdir(parents=True, exist_ok=True)
        line = next((x for x in text.splitlines() if "non-finite loss" in x), text)
        diverged.write_text(line.split("NonFiniteLossError: ")[-1][:500])
        raise


def _train_trial(
    cfg: ExperimentConfig, setup: TrialSetup, parent: str | None, tags: dict[str, str], trial_id: str
) -> None:
    """Train one trial's config: inline (single worker) or on a TorchTrainer worker group."""
    import ray.tune

    from lpcgma.distributed.train import fit_distributed, report_to_tune, run_inline
    from lpcgma.tracking.runs import tracking_callbacks

    if setup.workers_per_trial == 1:
        callbacks = tracking_callbacks(cfg, parent, tags)
        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is None:
            run_inline(cfg, report_to_tune, callbacks=callbacks)
        else:
            with checkpoint.as_directory() as folder:
                run_inline(cfg, report_to_tune, resume_from=folder, callbacks=callbacks)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    fit_distributed(
        cfg,
        num_workers=setup.workers_per_trial,
        cpus_per_worker=setup.cpus_per_worker,
        gpus_per_worker=setup.gpus_per_worker,
        storage_path=join_uri(setup.storage, setup.name, "train_runs"),
        name=f"train-{trial_id}",  # stable across trial restarts: Train V2 resumes the run by name
        max_failures=setup.max_failures,
        run_callbacks=[TuneReportCallback()],
        tracking_parent_run_id=parent,
        tracking_tags=tags,
    )


def make_trainable(setup: TrialSetup, plan: ResourcePlan) -> Any:
    """The Tune trainable: `run_trial` bound to `setup`, with the trial's resource request."""
    from ray import tune

    def lpcgma_trial(config: dict[str, Any]) -> None:
        run_trial(config, setup)

    return tune.with_resources(lpcgma_trial, plan.trial_resources)
