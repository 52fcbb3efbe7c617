"""experiments/probe_teacher_scales.py: pseudo-label quality per teacher scale set, its math, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from script_helpers import REPO, load_script
from tiny_config import tiny_overrides

from lpcgma.config import load_config
from lpcgma.engine.trainer import Trainer

tool = load_script(REPO / "experiments" / "probe_teacher_scales.py", "probe_teacher_scales")
TINY = tiny_overrides(
    "train.precise_bn_batches=0", "tracking.enabled=false", "method.name=source_only", tiles=2
)


def test_rows_count_accuracy_confidence_iou_and_the_largest_confusion() -> None:
    # rows: true class, columns: pseudo-label; the most pixels wrong: 2 of field's 10 as soil (soil →
    # field is a larger share of its class, 1 of 3, but fewer pixels)
    every = torch.tensor([[8.0, 2.0], [1.0, 2.0]])
    confident = torch.tensor([[4.0, 1.0], [0.0, 5.0]])
    row = tool.confusion_row(every, confident, ["field", "soil"])
    assert row["accuracy"] == pytest.approx(10 / 13)
    assert row["confident share"] == pytest.approx(10 / 13)
    assert row["confident accuracy"] == pytest.approx(9 / 10)
    assert row["mIoU"] == pytest.approx((8 / 11 + 2 / 5) / 2)
    assert row["largest confusion"] == "field → soil 20 %"


def test_probe_prints_one_row_per_crop_scale_and_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(REPO / "lpcgma" / "configs" / "synthetic.yaml", [*TINY, f"train.out_dir={tmp_path / 'run'}"])
    result = Trainer(cfg).fit()
    assert result.last_checkpoint is not None
    argv = [str(result.last_checkpoint), "--sets", "1", "0.5,1", "--crop-scales", "1", "1.5", "--tiles", "1"]
    assert tool.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| crop scale | teacher scales | accuracy | confident share |")
    rows = [line.strip("|").split("|") for line in lines[2:]]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("1", "1"), ("1", "0.5,1"), ("1.5", "1"), ("1.5", "0.5,1")]
    for r in rows:
        assert all(0.0 <= float(v) <= 100.0 for v in r[2:6]) and "→" in r[6]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--sets", "0.5,x"], "--sets: '0.5,x' is not comma-separated numbers"),
        (["--sets", "0"], "--sets: '0': expected factors in \\(0, 4\\]"),
        (["--crop-scales", "9"], "--crop-scales: expected factors in \\(0, 4\\]"),
        (["--threshold", "2"], "--threshold: expected a value in \\[0, 1\\]"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv: list[str], match: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "state.pt").write_bytes(b"")
    (tmp_path / "config.yaml").write_text("")
    assert tool.main([str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err)


def test_a_folder_without_a_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tool.main([str(tmp_path / "missing")]) == 2
    assert "expected a checkpoint folder with state.pt and config.yaml" in capsys.readouterr().err
