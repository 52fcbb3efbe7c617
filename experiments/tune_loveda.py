#!/usr/bin/env python
"""Search LPCGMA on LoveDA Rural → Urban (DeepLabv2-R101; GPUs).

    ray submit clusters/aws.yaml experiments/tune_loveda.py --data-root s3://BUCKET/LoveDA-shards \\
        --num-samples 32 --gpus-per-worker 1
    python experiments/tune_loveda.py --smoke-test --data-root data/LoveDA    # tiny trials, CPU

The base config is the packaged `loveda` config and the search space the packaged `loveda` one
(temperatures, minority-class sampling, Gaussians per class, loss weights); the dataset root is a
local folder or an s3:// URI ($LPCGMA_LOVEDA_ROOT by default). Everything comes from the installed
`lpcgma` package, so `ray submit` can copy this script alone to the head node.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lpcgma.distributed.tune import add_search_arguments, mlflow_hooks, promote_best, run_search, settings_from_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(parser, config="loveda", search_space="loveda", num_samples=32)
    parser.add_argument(
        "--data-root",
        default=os.environ.get("LPCGMA_LOVEDA_ROOT"),
        help="LoveDA folder (official layout) or s3:// shards (default: $LPCGMA_LOVEDA_ROOT)",
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
