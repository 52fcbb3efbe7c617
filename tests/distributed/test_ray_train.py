"""The trainer as a Ray Train worker function (slow): 2 workers at half the per-worker batch train
like 1 worker at the full batch (same global batch), on CPU with gloo: close target mIoU and loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lpcgma.config import load_config
from lpcgma.distributed.train import fit_distributed
from lpcgma.engine.trainer import train

pytestmark = pytest.mark.slow

COMMON = [
    "method.name=oracle",  # supervised on the target: the learning signal is strong enough in 40 steps
    "optim.lr=0.003",
    "data.crop_size=64",
    "train.iters=40",
    "train.eval_every=40",
    "train.checkpoint_every=40",
    "train.log_every=10",
    "tracking.enabled=false",
    "tracking.log_overlays=0",
    "train.progress=false",
]


def losses(out_dir: Path) -> list[float]:
    logs = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [float(r["loss/total"]) for r in logs if "loss/total" in r]


def test_two_workers_match_one_worker_at_the_same_global_batch(ray_tmp: Path) -> None:
    import ray

    synthetic = Path(__file__).resolve().parents[2] / "lpcgma" / "configs" / "synthetic.yaml"
    one_cfg = load_config(synthetic, [*COMMON, "data.batch_size=4", f"train.out_dir={ray_tmp / 'one'}"])
    one = train(one_cfg)

    ray.init(num_cpus=2, _temp_dir=str(ray_tmp / "ray"), include_dashboard=False)
    two_cfg = load_config(synthetic, [*COMMON, "data.batch_size=2", f"train.out_dir={ray_tmp / 'two'}"])
    result = fit_distributed(two_cfg, num_workers=2, storage_path=str(ray_tmp / "train_runs"), name="two")
    assert result.error is None
    two = result.metrics
    assert two["step"] == 40 and result.checkpoint is not None
    assert (Path(result.checkpoint.path) / "state.pt").is_file()

    m1, m2 = one.final_metrics["target_miou"], two["target_miou"]
    curve1, curve2 = losses(ray_tmp / "one"), losses(ray_tmp / "two")
    print(f"1 worker × batch 4: mIoU {m1:.4f} losses {curve1} | 2 workers × batch 2: mIoU {m2:.4f} losses {curve2}")
    for curve in (curve1, curve2):  # both learned: the loss fell over the 40 steps
        assert curve[-1] < curve[0], curve
    # Same global batch → same optimisation. Each rank draws its own batches, so one 10-step window
    # is noise at this budget (measured 3.1 vs 4.4 in the last window); the mean over all 40 steps is not.
    l1, l2 = sum(curve1) / len(curve1), sum(curve2) / len(curve2)
    assert abs(l1 - l2) <= 0.1 * max(l1, l2), (l1, l2)
    assert abs(m1 - m2) <= 0.06, (m1, m2)  # modest: 40 steps, different data shards per rank
