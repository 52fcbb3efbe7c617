"""The overrides that shrink the `synthetic` config to a run of a few seconds on a CPU (shared by the
tests that train)."""

from __future__ import annotations


def tiny_overrides(
    *more: str,
    tiles: int = 4,
    tile_size: int = 64,
    crop: int = 48,
    batch: int = 2,
    iters: int = 2,
    every: int = 2,
    log_every: int = 1,
    window: int = 64,
) -> list[str]:
    """`synthetic` config overrides for a tiny CPU run: `tiles` tiles of `tile_size`² per domain and
    split, `crop`² crops, `batch` + `batch` per step, `iters` steps with an evaluation and a
    checkpoint every `every`, `window`² evaluation windows without overlap, a small projection head;
    then `more` (later overrides win)."""
    return [
        f"data.synthetic_tiles={tiles}",
        f"data.synthetic_tile_size={tile_size}",
        f"data.crop_size={crop}",
        f"data.batch_size={batch}",
        "data.num_workers=0",
        "model.proj_dim=8",
        f"train.iters={iters}",
        f"train.eval_every={every}",
        f"train.checkpoint_every={every}",
        f"train.log_every={log_every}",
        f"train.eval_window={window}",
        f"train.eval_stride={window}",
        "train.device=cpu",
        *more,
    ]
