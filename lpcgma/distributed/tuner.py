"""Tuner construction: a new search's `ray.tune.Tuner` (OptunaSearch TPE, literature defaults first, and
`DefaultsProtectedASHA`), or the Tuner of a saved experiment restored for ``--resume``.

Ray and Optuna are imported when a Tuner is built, not with this module."""

from __future__ import annotations

from typing import Any

from lpcgma.config import ConfigError
from lpcgma.distributed.resources import ResourcePlan
from lpcgma.distributed.search_types import SearchSettings
from lpcgma.search_space import SearchSpace


def build_tuner(
    settings: SearchSettings,
    trainable: Any,
    space: SearchSpace,
    defaults: dict[str, Any],
    plan: ResourcePlan,
    max_t: int,
    storage: str,
) -> Any:
    """A new search's Tuner: TPE proposes configs (`defaults` first), ASHA stops poor trials at each
    evaluation (`max_t` evaluations for a full trial), `plan` caps the trials running at once."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from lpcgma.distributed.asha import DefaultsProtectedASHA

    n_startup = settings.n_startup_trials
    if n_startup is None:
        n_startup = min(10, max(3, settings.num_samples // 3))
    sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=n_startup, constant_liar=True)
    searcher = OptunaSearch(
        metric=settings.objective, mode=settings.mode, points_to_evaluate=[defaults], sampler=sampler
    )
    scheduler = DefaultsProtectedASHA(
        protected=defaults,
        time_attr="training_iteration",
        metric=settings.objective,
        mode=settings.mode,
        max_t=max_t,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=settings.num_samples,
            max_concurrent_trials=plan.max_concurrent,
            reuse_actors=plan.inline,
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=settings.objective,
                checkpoint_score_order=settings.mode,
            ),
            verbose=settings.verbose,
        ),
    )


def restore_tuner(experiment_path: str, trainable: Any) -> Any:
    """The Tuner of the experiment at `experiment_path`: finished trials and the searcher's history are
    kept, unfinished and errored trials run again. ConfigError when there is none to restore."""
    from ray import tune

    if not tune.Tuner.can_restore(experiment_path):
        raise ConfigError(f"no restorable Tune experiment at '{experiment_path}'")
    return tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
