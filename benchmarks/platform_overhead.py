#!/usr/bin/env python
"""Platform overhead: the same short trial standalone vs inside Ray Tune (+ Ray Train).

    OMP_NUM_THREADS=1 RAY_USAGE_STATS_ENABLED=0 python benchmarks/platform_overhead.py [--iters 20] [--trials 3]

Rows (each a wall time, on this machine, in one run so that the ratios share its noise):

* standalone, 1 process — `Trainer(cfg).fit()` in this process (imports already warm);
* Tune, 1 worker inline — `run_search` with single-worker trials (the Trainer runs in the trial
  process, no Train worker group), `--trials` trials one after another on an already started Ray;
* standalone, 2 ranks — two processes with torch.distributed (gloo) running the Trainer, started
  the plain way (`torch.multiprocessing.spawn`), no Ray;
* Tune + TorchTrainer, 2 workers — one 2-worker trial through `run_search` (Train V2 worker group).

Per-trial overhead = (trial's wall time inside Tune) − (standalone wall time); Ray's own start-up
(once per search) is reported on its own line. Prints a markdown table, then where the time of each
row goes, from the clock of the caller and the files the Trainer writes: start-up (call → the run's
``config.yaml``, written when `Trainer.fit` starts: processes, imports, process group, model and data),
training (→ the newest file of the run: the last metrics line or checkpoint) and teardown (→ return).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")


def trial_overrides(iters: int, out_dir: Path, batch: int, extra: Sequence[str] = ()) -> list[str]:
    """The benchmark trial: self-training, crops of 64², two evaluations; `extra` overrides last."""
    every = max(1, iters // 2)
    return [
        "method.name=self_training",
        "data.crop_size=64",
        f"data.batch_size={batch}",
        f"train.iters={iters}",
        f"train.eval_every={every}",
        f"train.checkpoint_every={every}",
        f"train.log_every={every}",
        "data.eval_max_tiles=8",
        "tracking.enabled=false",
        "tracking.log_overlays=0",
        "train.progress=false",
        "train.resume=false",
        f"train.out_dir={out_dir}",
        *extra,
    ]


Phases = tuple[float, float, float]  # (start-up, training, teardown) seconds


def phases(run_dir: Path, t_start: float, t_end: float) -> Phases:
    """(start-up, training, teardown) seconds of a run between wall-clock `t_start` and `t_end`."""
    started = (run_dir / "config.yaml").stat().st_mtime  # the first file the Trainer writes (fit start)
    newest = max(f.stat().st_mtime for f in run_dir.rglob("*") if f.is_file())
    return started - t_start, newest - started, t_end - newest


def standalone(iters: int, out_dir: Path, extra: Sequence[str] = ()) -> tuple[float, Phases]:
    from lpcgma.config import load_config, resolve_config_path
    from lpcgma.engine.trainer import train

    cfg = load_config(resolve_config_path("synthetic"), trial_overrides(iters, out_dir, 4, extra))
    t0 = time.time()
    train(cfg)
    t1 = time.time()
    return t1 - t0, phases(out_dir, t0, t1)


def _rank_main(rank: int, world: int, port: int, iters: int, out_dir: str, extra: Sequence[str]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from lpcgma.config import load_config, resolve_config_path
        from lpcgma.engine.trainer import train

        cfg = load_config(resolve_config_path("synthetic"), trial_overrides(iters, Path(out_dir), 4 // world, extra))
        train(cfg)
    finally:
        dist.destroy_process_group()


def standalone_two_ranks(iters: int, out_dir: Path, extra: Sequence[str] = ()) -> tuple[float, Phases]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    mp.spawn(_rank_main, args=(2, port, iters, str(out_dir), tuple(extra)), nprocs=2, join=True)
    t1 = time.time()
    return t1 - t0, phases(out_dir, t0, t1)


def in_tune(iters: int, trials: int, workers: int, store: Path, name: str) -> tuple[float, Phases | None]:
    """Wall time of a search of `trials` trials, one at a time; the phases when it had one trial."""
    from lpcgma.distributed.search import run_search
    from lpcgma.distributed.search_types import SearchSettings

    every = max(1, iters // 2)
    overrides = [
        o
        for o in trial_overrides(iters, store / "unused", batch=4 if workers == 1 else 2)
        if not o.startswith("train.out_dir")
    ]
    settings = SearchSettings(
        config="synthetic",
        search_space="smoke",
        overrides=overrides,
        num_samples=trials,
        workers_per_trial=workers,
        storage=str(store),
        name=name,
        max_concurrent=1,  # one trial at a time: each row is one trial's own cost
        grace_period=iters // every,  # no early stopping: every trial runs in full
        verbose=0,
    )
    t0 = time.time()
    outcome = run_search(settings)
    t1 = time.time()
    assert outcome.complete and all(t.status == "finished" for t in outcome.trials), outcome.format()
    runs = sorted((store / name).glob("*/run"))  # the Trainer's folder inside each trial's folder
    return t1 - t0, phases(runs[0], t0, t1) if trials == 1 and len(runs) == 1 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20, help="training steps of the trial (2 evaluations)")
    p.add_argument("--trials", type=int, default=3, help="single-worker trials run inside Tune")
    p.add_argument("--skip-two", action="store_true", help="skip the 2-worker rows")
    args = p.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="lpo"))  # under $TMPDIR: keep it short (Ray's socket paths)
    os.environ.setdefault("RAY_TMPDIR", str(root / "ray"))
    rows: list[tuple[str, str, float, str]] = []
    split: list[tuple[str, Phases]] = []
    try:
        import ray

        from lpcgma.engine.trainer import Trainer  # noqa: F401 - warm the imports for the standalone row

        solo = [standalone(args.iters, root / f"solo{i}") for i in range(2)]
        t_solo, solo_phases = min(solo)
        rows.append(("standalone, 1 process", "1", t_solo, "1.00"))
        split.append(("standalone, 1 process", solo_phases))

        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count() or 2, resources={"trial_driver": 2.0}, _temp_dir=str(root / "ray"))
        t_ray = time.perf_counter() - t0
        rows.append(("Ray start-up (ray.init, once per search)", "-", t_ray, "-"))

        wall, _ = in_tune(args.iters, args.trials, 1, root / "store", "inline")
        t_trial = wall / args.trials
        rows.append(
            (
                f"Tune, 1 worker inline ({args.trials} trials in sequence; per trial)",
                "1",
                t_trial,
                f"{t_trial / t_solo:.2f}",
            )
        )
        overhead_inline = t_trial - t_solo

        if not args.skip_two:
            ray.shutdown()  # the plain 2-rank run gets the whole machine
            t_two, two_phases = standalone_two_ranks(args.iters, root / "two")
            rows.append(("standalone, 2 ranks (torch.distributed gloo, mp.spawn)", "2", t_two, f"{t_two / t_solo:.2f}"))
            split.append(("standalone, 2 ranks", two_phases))
            ray.init(num_cpus=os.cpu_count() or 2, resources={"trial_driver": 2.0}, _temp_dir=str(root / "ray"))
            wall2, ddp_phases = in_tune(args.iters, 1, 2, root / "store", "ddp")
            rows.append(("Tune + TorchTrainer, 2 workers (1 trial)", "2", wall2, f"{wall2 / t_solo:.2f}"))
            if ddp_phases is not None:
                split.append(("Tune + TorchTrainer, 2 workers", ddp_phases))
            overhead_two = wall2 - t_two
    finally:
        import ray

        ray.shutdown()  # also after a failure: stop what this run started
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n## Platform overhead ({args.iters}-step trial, synthetic benchmark, self-training, crop 64)\n")
    print("| setup | workers | wall time (s) | ratio vs standalone 1 process |")
    print("|---|---|---|---|")
    for name, w, t, ratio in rows:
        print(f"| {name} | {w} | {t:.1f} | {ratio} |")
    print("\n### Where the time goes (s)\n")
    print("| setup | start-up (→ Trainer.fit) | training (→ last file written) | teardown (→ return) |")
    print("|---|---|---|---|")
    for name, (up, body, down) in split:
        print(f"| {name} | {up:.1f} | {body:.1f} | {down:.1f} |")
    print()
    print(f"- fixed overhead per single-worker trial inside Tune: {overhead_inline:+.1f} s (target ≤ 3 s)")
    if not args.skip_two:
        print(
            f"- fixed overhead of a 2-worker trial (TorchTrainer vs plain torch.distributed): {overhead_two:+.1f} s "
            f"= {100 * overhead_two / 300:.1f}% of a 5-minute trial (target ≤ 5%)"
        )
    print(
        f"- standalone runs: {', '.join(f'{t:.1f}' for t, _ in solo)} s; python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
