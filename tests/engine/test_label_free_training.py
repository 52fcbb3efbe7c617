"""The trainer reports the model-selection criteria, selects checkpoints by them, and can run without
reading a single target mask."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from tiny_config import tiny_overrides

from lpcgma.config import ConfigError, load_config
from lpcgma.data.errors import DatasetNotFoundError
from lpcgma.data.synthetic import write_synthetic_loveda
from lpcgma.distributed.train import RayReportCallback
from lpcgma.engine.label_free import CRITERIA, TARGET_LABEL_FREE
from lpcgma.engine.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[2] / "lpcgma" / "configs" / "synthetic.yaml"
TINY = tiny_overrides(
    "model.backbone=resnet18",
    "model.pretrained=false",
    "train.label_free_tiles=3",
    "train.snd_pixels=100",
    "train.source_eval_tiles=2",
    "tracking.enabled=false",
    iters=4, log_every=2,
)  # fmt: skip
LABEL_FREE_KEYS = {CRITERIA[n].metric for n in TARGET_LABEL_FREE}


def tiny(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(CONFIG, [*TINY, f"train.out_dir={tmp_path / 'run'}", *extra])


def evaluations(tmp_path: Path) -> list[dict[str, float]]:
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "target_entropy" in r]


def test_trainer_reports_every_criterion_and_selects_by_a_min_criterion(tmp_path: Path) -> None:
    reports: list[dict[str, float]] = []
    cfg = tiny(tmp_path, "method.name=self_training", "train.select_by=entropy")
    report_to_ray = RayReportCallback(cfg, lambda metrics, ckpt: reports.append(metrics))
    result = Trainer(cfg, [report_to_ray]).fit()
    c = 7
    m = result.final_metrics
    assert LABEL_FREE_KEYS | {"target_miou", "source_miou", "best_target_entropy"} <= set(m)
    assert 0 <= m["target_entropy"] <= math.log(c) + 1e-6
    assert -math.log(c) - 1e-6 <= m["target_im"] <= 1e-6
    assert 0 <= m["target_snd"] <= math.log(100 - 1) + 1e-6
    assert 0 <= m["target_agreement"] <= 1 and 0 <= m["target_flip_agreement"] <= 1
    assert 0 <= m["source_miou"] <= 1
    # what Ray Tune receives at each evaluation (MLflow logs the same EvalReport.metrics)
    assert [r["step"] for r in reports] == [2, 4] and all(set(r) >= LABEL_FREE_KEYS for r in reports)
    # checkpoints/best is the evaluation with the lowest entropy
    evals = evaluations(tmp_path)
    best = min(evals, key=lambda r: r["target_entropy"])
    assert result.selection_metric == "target_entropy" and result.best_step == best["step"]
    assert result.best_metric == pytest.approx(best["target_entropy"])


def test_switches_turn_the_criteria_and_source_evaluation_off(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, "method.name=source_only", "train.label_free_tiles=0", "train.source_eval_tiles=0")
    metrics, cm, _ = Trainer(cfg).evaluator.evaluate()
    assert "target_miou" in metrics and cm is not None
    assert not LABEL_FREE_KEYS & set(metrics) and not any(k.startswith("source_") for k in metrics)
    cfg = tiny(tmp_path, "method.name=source_only")  # no EMA teacher: no agreement
    metrics, _, _ = Trainer(cfg).evaluator.evaluate()
    assert "target_agreement" not in metrics and LABEL_FREE_KEYS - {"target_agreement"} <= set(metrics)


@pytest.fixture
def loveda_without_target_masks(tmp_path: Path) -> Path:
    """The synthetic benchmark in the LoveDA layout, the target domain's masks_png folders deleted."""
    root = write_synthetic_loveda(tmp_path / "loveda", num_tiles=4, tile_size=64)
    for split in ("Train", "Val"):
        shutil.rmtree(root / split / "Urban" / "masks_png")
    return root


def test_label_free_run_reads_no_target_mask(loveda_without_target_masks: Path, tmp_path: Path) -> None:
    data = ["data.dataset=loveda", f"data.root={loveda_without_target_masks}", "data.source_domain=rural"]
    with pytest.raises(DatasetNotFoundError, match="masks_png"):  # with labels, the deleted masks are missed
        Trainer(tiny(tmp_path, *data, "method.name=self_training"))
    cfg = tiny(tmp_path, *data, "method.name=self_training", "data.target_labels=false", "train.select_by=snd")
    result = Trainer(cfg).fit()
    assert result.step == 4 and result.selection_metric == "target_snd"
    assert result.best_checkpoint is not None and (result.best_checkpoint / "state.pt").is_file()
    for record in evaluations(tmp_path):
        assert LABEL_FREE_KEYS | {"source_miou", "best_target_snd"} <= set(record)
        assert not any(k.startswith(("target_miou", "target_oa", "target_mf1", "target_iou/")) for k in record)
    metrics, cm, previews = Trainer(cfg).evaluator.evaluate(num_previews=2)  # `lpcgma evaluate`: no target confusion
    assert cm is None and previews == [] and "target_snd" in metrics


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["data.target_labels=false"], r"'train.select_by' = 'target_miou' is never reported: data.target_labels"),
        (["train.select_by=nope"], r"'train.select_by' = 'nope' is invalid: expected one of \['target_miou'"),
        (["train.select_by=agreement"], "method.name=source_only has no EMA teacher"),
        (["train.select_by=snd", "train.label_free_tiles=0"], r"label-free criteria are off"),
        (["train.select_by=source_miou", "train.source_eval_tiles=0"], r"source evaluation is off"),
    ],
)
def test_selection_that_is_never_reported_is_refused(tmp_path: Path, extra: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Trainer(tiny(tmp_path, "method.name=source_only", *extra))


def test_config_refuses_the_oracle_without_target_labels_and_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'method.name' = 'oracle' is invalid: expected a method that reads no"):
        tiny(tmp_path, "method.name=oracle", "data.target_labels=false")
    with pytest.raises(ConfigError, match="'train.snd_pixels' = 1 is invalid: expected >= 2"):
        tiny(tmp_path, "train.snd_pixels=1")
    with pytest.raises(ConfigError, match="'train.label_free_tiles' = -1 is invalid"):
        tiny(tmp_path, "train.label_free_tiles=-1")
