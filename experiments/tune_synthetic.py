#!/usr/bin/env python
"""Search LPCGMA's hyperparameters on the embedded synthetic benchmark (the README's main demo).

    python experiments/tune_synthetic.py                 # `make demo`: ~10 trials, < 10 min on 2 CPU cores
    python experiments/tune_synthetic.py --smoke-test    # a few tiny trials (what CI runs)
    ray submit clusters/aws.yaml experiments/tune_synthetic.py --address auto --gpus-per-worker 1

Optuna's TPE proposes configs from the `synthetic` search space (lpcgma/search_spaces/), the
literature defaults first; ASHA stops weak trials at each evaluation. The summary at the end shows
the best trial against the defaults trial on target mIoU. Everything comes from the installed
`lpcgma` package, so `ray submit` can copy this script alone to the head node.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lpcgma.distributed.tune import add_search_arguments, mlflow_hooks, promote_best, run_search, settings_from_args

# The demo's trials, sized for a 2-core CPU: LPCGMA with small crops and a short schedule (4
# evaluations), its Gaussian-prototype terms switched on early enough to matter.
DEMO_OVERRIDES = (
    "method.name=lpcgma",
    "data.crop_size=64",
    "train.iters=96",
    "train.eval_every=24",
    "train.checkpoint_every=24",
    "train.log_every=24",
    "method.gmm_warmup_iters=24",
    "method.gmm_refit_every=24",
    "tracking.log_overlays=0",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(parser, config="synthetic", search_space="synthetic", num_samples=10)
    parser.add_argument("--promote", action="store_true", help="register the best trial as the champion model")
    parser.add_argument("overrides", nargs="*", help="dotted base-config overrides, e.g. train.iters=200")
    args = parser.parse_args(argv)
    demo = () if args.smoke_test else DEMO_OVERRIDES
    settings = settings_from_args(args, extra_overrides=("method.name=lpcgma", *demo))
    outcome = run_search(settings, *mlflow_hooks())
    if args.promote and outcome.complete:
        promote_best(settings.name, settings.objective, settings.mode)
    return 0 if outcome.complete and outcome.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
