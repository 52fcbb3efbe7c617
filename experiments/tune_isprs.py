#!/usr/bin/env python
"""Search LPCGMA on ISPRS Potsdam → Vaihingen (DeepLabv2-R101; GPUs).

    ray submit clusters/aws.yaml experiments/tune_isprs.py --data-root s3://BUCKET/isprs-shards \\
        --num-samples 32 --gpus-per-worker 1
    python experiments/tune_isprs.py --smoke-test --data-root data/isprs_prepared   # tiny trials, CPU

The base config is the packaged `isprs` config (patches from `lpcgma data prepare-isprs`) and the
search space the packaged `isprs` one (temperatures, minority-class sampling, Gaussians per class,
loss weights); the dataset root is a local folder or an s3:// URI ($LPCGMA_ISPRS_ROOT by default).
Everything comes from the installed `lpcgma` package, so `ray submit` can copy this script alone to
the head node.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lpcgma.distributed.tune import add_search_arguments, mlflow_hooks, promote_best, run_search, settings_from_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(parser, config="isprs", search_space="isprs", num_samples=32)
    parser.add_argument(
        "--data-root",
        default=os.environ.get("LPCGMA_ISPRS_ROOT"),
        help="prepared ISPRS patches folder or s3:// shards (default: $LPCGMA_ISPRS_ROOT)",
    )
    parser.add_argument("--promote", action="store_true", help="register the best trial as the champion model")
    parser.add_argument("overrides", nargs="*", help="dotted base-config overrides, e.g. train.iters=20000")
    args = parser.parse_args(argv)
    extra = [f"data.root={args.data_root}"] if args.data_root else []
    settings = settings_from_args(args, extra_overrides=extra)
    outcome = run_search(settings, *mlflow_hooks())
    if args.promote and outcome.complete:
        promote_best(settings.name, settings.objective, settings.mode)
    return 0 if outcome.complete and outcome.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
