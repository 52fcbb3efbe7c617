#!/usr/bin/env python
"""Data loading throughput: PNG folders vs Parquet shards on local disk vs Parquet shards via S3.

    OMP_NUM_THREADS=1 python benchmarks/data_loader.py [--root DIR] [--batches 20] [--workers 2]

Reads the real LoveDA tiles of ``shared/data/loveda_sample`` (16 Train/Rural tiles of 1024²; when
absent, a synthetic tree in the LoveDA layout written by `lpcgma data synth`), packs them into
Parquet shards in a temporary folder and into a moto S3 server on 127.0.0.1 (started and stopped by
PID here; loopback, so this measures the S3 client and moto, not a network), then for each source:

* raw reads/s: ``dataset[i]`` over every tile, in this process (PNG decode only);
* stream setup: the source `TrainStream`'s construction — with rare-class sampling (the `loveda`
  config) it needs the per-tile class histograms: the folders decode every mask, the shards read
  their index file;
* stream samples/s: the trainer's source stream (`Trainer.train_streams`: `TrainTransform` crop,
  rescale, flips, photometric jitter; batch size; loader worker processes), timed over `--batches`
  batches after one warm-up batch per worker (their time, worker start-up included, is reported
  on its own: batches the workers began together would otherwise inflate a short timed window).

Data settings come from the packaged `loveda` config (crop 512, batch 2, scale 0.5-2, RCS on), with
``data.num_workers`` = `--workers` and the sets the sample has (Train/Rural, as `loveda_sample.yaml`).
Prints a markdown table and the command that produced it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the one moto_server helper (tests/server_helpers.py)
SPLIT_KEYS = ("target_train_split", "target_eval_split", "source_eval_split")


def find_sample(root: str | None) -> Path | None:
    """--root, else shared/data/loveda_sample beside or inside the repo (as tests/conftest.py looks)."""
    if root:
        candidates = [Path(root)]
    else:
        env = os.environ.get("LPCGMA_SHARED_DIR")
        candidates = [Path(env) / "data" / "loveda_sample"] if env else []
        candidates += [REPO / "shared" / "data" / "loveda_sample", REPO.parent / "shared" / "data" / "loveda_sample"]
    return next((c for c in candidates if (c / "Train" / "Rural" / "images_png").is_dir()), None)


def measure(data_cfg: Any, batches: int, seed: int = 0) -> dict[str, float]:
    """Raw reads/s, stream set-up time, warm-up time and stream samples/s of one data source."""
    from lpcgma.data.build import build_datasets
    from lpcgma.data.stream import augmented_stream

    d = data_cfg
    data = build_datasets(d)
    tiles = data.source_train
    tiles[0]  # untimed: lazy imports, the PNG decoder, the first connection
    t0 = time.perf_counter()
    for i in range(len(tiles)):  # type: ignore[arg-type]
        tiles[i]
    raw = len(tiles) / (time.perf_counter() - t0)  # type: ignore[arg-type]

    t0 = time.perf_counter()  # as Trainer.train_streams builds the source stream
    rcs = d.rcs_temperature if d.rcs_enabled else None
    stream = augmented_stream(tiles, d, data.mean, data.std, seed * 2 + 1, rcs_temperature=rcs)  # type: ignore[arg-type]
    setup = time.perf_counter() - t0
    it = stream.batches(0)
    t0 = time.perf_counter()
    for _ in range(max(1, d.num_workers)):  # worker start-up, and the batches they began together
        next(it)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * d.batch_size / (time.perf_counter() - t0)
    del it  # stops the loader workers
    return {"raw": raw, "setup": setup, "warm": warm, "rate": rate}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="LoveDA-layout folder (default: shared/data/loveda_sample)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per source (after the first)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (data.num_workers)")
    p.add_argument("--synth-tiles", type=int, default=16, help="fallback tree: tiles per split and domain")
    args = p.parse_args()

    import boto3
    from server_helpers import MotoServer

    from lpcgma.config import load_config, replace, resolve_config_path
    from lpcgma.data.pack import pack_dataset
    from lpcgma.data.synthetic import write_synthetic_loveda

    with tempfile.TemporaryDirectory(prefix="lpcgma-bench-") as tmp_name:
        tmp = Path(tmp_name)
        sample = find_sample(args.root)
        if sample is None and args.root:
            p.error(f"--root {args.root}: no LoveDA tiles in Train/Rural/images_png there")
        if sample is None:
            print(
                f"LoveDA sample not found: writing a synthetic LoveDA-layout tree ({args.synth_tiles} tiles of 1024²)"
            )
            sample = write_synthetic_loveda(tmp / "synth", args.synth_tiles, 1024)
        # the stream settings of the `loveda` config; the sets the sample has (Train/Rural), as loveda_sample.yaml
        sets = ["data.target_domain=rural_irrg"] + [f"data.{k}=train" for k in SPLIT_KEYS]
        cfg = load_config(
            resolve_config_path("loveda"), [f"data.root={sample}", f"data.num_workers={args.workers}", *sets]
        )
        folders = cfg.data
        pack_dataset(folders, tmp / "shards")

        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true")  # fmt: skip  # this process only: moto's test keys
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        server = MotoServer(tmp / "moto").start()
        try:
            os.environ["AWS_ENDPOINT_URL"] = server.url
            boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket="lpcgma-bench")
            manifest = pack_dataset(folders, "s3://lpcgma-bench/loveda")
            sources = {
                "PNG folders (LoveDA layout)": folders,
                "Parquet shards, local disk": replace(
                    cfg, {"data.dataset": "shards", "data.root": str(tmp / "shards")}
                ).data,
                "Parquet shards, S3 (moto, loopback)": replace(
                    cfg, {"data.dataset": "shards", "data.root": manifest.location.uri}
                ).data,
            }
            results = {name: measure(data_cfg, args.batches) for name, data_cfg in sources.items()}
        finally:
            server.stop()

    tiles = manifest.counts["rural"]["train"]
    mb = sum(s.bytes for s in manifest.shards) / 2**20
    d = folders
    print(
        f"\n## Data loading: {tiles} LoveDA Train/Rural tiles from {sample} ({mb:.1f} MB in {len(manifest.shards)} "
        f"shard(s)); source stream: crop {d.crop_size}, scale {list(d.scale_range)}, batch {d.batch_size}, "
        f"{d.num_workers} workers, RCS {'on' if d.rcs_enabled else 'off'}\n"
    )
    w = max(1, d.num_workers)
    print(f"| source | raw reads/s (1 process) | stream setup (s) | first {w} batches (s) | stream samples/s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['raw']:.1f} | {r['setup']:.2f} | {r['warm']:.2f} | {r['rate']:.1f} |")
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
    print(f"\ncommand: {env}python {shlex.join(['benchmarks/data_loader.py', *sys.argv[1:]])}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
