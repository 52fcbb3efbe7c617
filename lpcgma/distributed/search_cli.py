"""The command-line faces of a search: the options `lpcgma tune` and the ``experiments/tune_*.py`` scripts
share (`add_search_arguments` → `settings_from_args`), and `experiment_main`, the body of those scripts."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lpcgma.config import ConfigError
from lpcgma.distributed.search import resolve_objective, run_search
from lpcgma.distributed.search_mlflow import mlflow_hooks, promote_best
from lpcgma.distributed.search_types import PARENT_RUN_ENV, SMOKE_MAX_SAMPLES, SearchSettings

STORAGE_ENV = "LPCGMA_STORAGE"  # default --storage (clusters/lpcgma.env sets it on the cluster)


def add_search_arguments(
    parser: argparse.ArgumentParser,
    config: str = "synthetic",
    search_space: str = "smoke",
    num_samples: int = 8,
) -> None:
    """The options `lpcgma tune` and the experiments/ scripts share."""
    p = parser
    p.add_argument("--config", default=config, help=f"base config: YAML file or packaged name (default: {config})")
    p.add_argument(
        "--search-space",
        default=search_space,
        help=f"search space: YAML file or packaged name in lpcgma/search_spaces (default: {search_space})",
    )
    p.add_argument("--num-samples", type=int, default=num_samples, help="number of trials")
    p.add_argument(
        "--workers-per-trial",
        type=int,
        default=1,
        help="Ray Train workers per trial (1: the trainer runs inline in the trial, no worker group)",
    )
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument(
        "--objective",
        default="target_miou",
        help="what to optimise: a model-selection criterion (target_miou, source_miou, snd, snd_embed, entropy, "
        "im, agreement, flip_agreement: lpcgma.engine.label_free.CRITERIA, which sets the mode) or any reported "
        "metric key (default: target_miou)",
    )
    p.add_argument(
        "--mode", choices=["max", "min"], default=None, help="override the objective's mode (default: its own)"
    )
    p.add_argument(
        "--storage",
        default=os.environ.get(STORAGE_ENV, "runs/tune"),
        help=f"local folder or s3://bucket/prefix (default: ${STORAGE_ENV}, else runs/tune)",
    )
    p.add_argument("--name", default="", help="experiment name (default: <method>_<dataset>_<time>)")
    p.add_argument("--resume", action="store_true", help="resume the search --name under --storage")
    p.add_argument(
        "--address",
        default=None,
        help="existing Ray cluster ('auto' or HOST:PORT); default: start Ray on this machine",
    )
    p.add_argument("--max-concurrent", type=int, default=None, help="cap on concurrent trials")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: evaluations before a trial may be stopped")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA halving rate")
    p.add_argument("--max-failures", type=int, default=1, help="restarts of a failed trial from its last checkpoint")
    p.add_argument("--n-startup-trials", type=int, default=None, help="TPE random start-up trials")
    p.add_argument("--parent-run-id", default=None, help=f"MLflow parent run of the trials (or ${PARENT_RUN_ENV})")
    p.add_argument("--num-cpus", type=int, default=None, help="local cluster: CPUs for Ray (default: all)")
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"tiny trials (a few steps, small model), at most {SMOKE_MAX_SAMPLES}",
    )
    p.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override of the base config (repeatable), e.g. --set method.name=lpcgma",
    )


def settings_from_args(args: argparse.Namespace, extra_overrides: Sequence[str] = ()) -> SearchSettings:
    """SearchSettings from `add_search_arguments` options (+ positional overrides, if any)."""
    overrides = [*extra_overrides, *args.set_overrides, *getattr(args, "overrides", [])]
    objective, mode = resolve_objective(args.objective, args.mode)  # e.g. snd → target_snd, max
    return SearchSettings(
        config=args.config,
        search_space=args.search_space,
        overrides=overrides,
        num_samples=args.num_samples,
        workers_per_trial=args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        objective=objective,
        mode=mode,
        storage=args.storage,
        name=args.name,
        resume=args.resume,
        address=args.address,
        max_concurrent=args.max_concurrent,
        seed=args.seed,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        max_failures=args.max_failures,
        n_startup_trials=args.n_startup_trials,
        parent_run_id=args.parent_run_id,
        num_cpus=args.num_cpus,
        smoke_test=args.smoke_test,
    )


def is_shards_root(root: str) -> bool:
    """Whether `root` holds `lpcgma data pack` shards: any s3:// URI, or a folder with their manifest."""
    from lpcgma.data.shards import MANIFEST_FILE

    return root.startswith("s3://") or (Path(root) / MANIFEST_FILE).is_file()


def experiment_main(
    argv: Sequence[str] | None,
    description: str | None,
    config: str,
    search_space: str,
    num_samples: int,
    data_root_env: str | None = None,
    data_root_help: str = "",
    extra_overrides: Sequence[str] = (),
    full_run_overrides: Sequence[str] = (),
) -> int:
    """The body of every `experiments/tune_*.py` script: parse → search → optionally promote.

    `data_root_env` adds ``--data-root`` (default: that environment variable) → ``data.root``;
    `full_run_overrides` apply only without ``--smoke-test`` (e.g. the demo's trial sizes).
    Exit code 0 when the search completed with a best trial.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(parser, config=config, search_space=search_space, num_samples=num_samples)
    if data_root_env:
        parser.add_argument(
            "--data-root", default=os.environ.get(data_root_env), help=f"{data_root_help} (default: ${data_root_env})"
        )
    parser.add_argument("--promote", action="store_true", help="register the best trial as the champion model")
    parser.add_argument("overrides", nargs="*", help="dotted base-config overrides, e.g. train.iters=20000")
    args = parser.parse_args(argv)
    extra = [*extra_overrides, *(() if args.smoke_test else full_run_overrides)]
    if getattr(args, "data_root", None):
        extra.append(f"data.root={args.data_root}")
        if is_shards_root(args.data_root):  # packed by `lpcgma data pack`: stream the shards
            extra.append("data.dataset=shards")
    try:
        settings = settings_from_args(args, extra_overrides=extra)
        outcome = run_search(settings, *mlflow_hooks())
    except (ConfigError, ValueError, FileNotFoundError) as e:  # SearchSpaceError, ResourceError, DataError
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    if args.promote and outcome.complete:
        promote_best(settings.name, settings.objective, settings.mode)
    return 0 if outcome.complete and outcome.best is not None else 1
