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

import sys

from lpcgma.distributed.search_cli import experiment_main

if __name__ == "__main__":
    sys.exit(
        experiment_main(
            None,
            __doc__,
            config="loveda",
            search_space="loveda",
            num_samples=32,
            data_root_env="LPCGMA_LOVEDA_ROOT",
            data_root_help="LoveDA folder (official layout) or s3:// shards",
        )
    )
