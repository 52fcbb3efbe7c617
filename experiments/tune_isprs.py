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

import sys

from lpcgma.distributed.search_cli import experiment_main

if __name__ == "__main__":
    sys.exit(
        experiment_main(
            None,
            __doc__,
            config="isprs",
            search_space="isprs",
            num_samples=32,
            data_root_env="LPCGMA_ISPRS_ROOT",
            data_root_help="prepared ISPRS patches folder or s3:// shards",
        )
    )
