"""experiments/selection_study.py: rank correlations and picks of the criteria over constructed trial results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from script_helpers import load_script

REPO = Path(__file__).resolve().parents[1]
study = load_script(REPO / "experiments" / "selection_study.py", "selection_study")


def _points() -> list:  # type: ignore[type-arg]
    miou = [0.10, 0.20, 0.30, 0.40, 0.50]
    rows = []
    for i, m in enumerate(miou):
        metrics = {
            "target_miou": m,
            "target_entropy": 1.0 - 2 * m,  # min mode, falls as mIoU rises: a perfect criterion
            "target_snd": 5.0 - 10 * m,  # max mode, falls as mIoU rises: perfectly wrong
            "target_agreement": 0.9,  # constant: no ranking
            "target_flip_agreement": [0.5, 0.7, 0.6, 0.9, 0.8][i],
        }
        if i != 4:
            metrics["source_miou"] = [0.3, 0.1, 0.2, 0.4, 0.0][i]  # the best trial does not report it
        rows.append(study.TrialPoint(f"t{i}", 96, metrics))
    return rows


def test_analysis_ranks_and_picks_by_each_criterions_mode() -> None:
    results = {r.name: r for r in study.analyse(_points())}
    assert "target_miou" not in results  # the truth is not a candidate
    entropy, snd = results["entropy"], results["snd"]
    assert (entropy.spearman, entropy.kendall) == pytest.approx((1.0, 1.0))
    assert entropy.picked == "t4" and entropy.regret == pytest.approx(0.0)
    assert (snd.spearman, snd.kendall) == pytest.approx((-1.0, -1.0))
    assert snd.picked == "t0" and snd.regret == pytest.approx(0.4)
    flip = results["flip_agreement"]
    assert flip.spearman == pytest.approx(0.8) and flip.kendall == pytest.approx(0.6)
    assert flip.picked == "t3" and flip.regret == pytest.approx(0.1)
    assert math.isnan(results["agreement"].spearman) and results["agreement"].trials == 5
    source = results["source_miou"]  # scored over the 4 trials that report it
    assert source.trials == 4 and source.picked == "t3" and source.regret == pytest.approx(0.1)  # vs the best of all
    assert source.spearman == pytest.approx(0.4)
    im = results["im"]  # reported by no trial
    assert im.trials == 0 and im.picked is None and math.isnan(im.spearman)


def test_study_reads_a_tune_experiment_and_writes_table_and_plot(tmp_path: Path) -> None:
    exp = tmp_path / "search"
    for p in _points():
        folder = exp / f"lpcgma_trial_{p.trial_id}"
        folder.mkdir(parents=True)
        first = {**p.metrics, "target_miou": 0.0, "step": 48, "training_iteration": 1, "trial_id": p.trial_id}
        last = {**p.metrics, "step": p.step, "training_iteration": 2, "trial_id": p.trial_id, "done": False}
        (folder / "result.json").write_text(json.dumps(first) + "\n" + json.dumps(last) + "\n")
    (exp / "searcher-state").mkdir()  # not a trial
    points = study.read_trials(exp)
    assert [p.trial_id for p in points] == [f"t{i}" for i in range(5)]
    assert all(p.step == 96 for p in points) and points[4].metrics["target_miou"] == 0.5
    earlier = study.read_trials(exp, step=48)  # every trial at the same, earlier evaluation
    assert [p.step for p in earlier] == [48] * 5 and {p.metrics["target_miou"] for p in earlier} == {0.0}
    assert study.read_trials(exp, step=7) == []
    assert study.common_steps(exp) == [48, 96]
    text = study.stability(exp)  # ρ per criterion at each common step
    assert "| criterion | step 48 | step 96 | positive at |" in text
    assert "| entropy | – | 1.000 | 1 of 2 |" in text  # step 48: every trial at 0 mIoU, no ranking
    assert "| snd | – | -1.000 | 0 of 2 |" in text
    assert "| *best trial's target_miou* | 0.000 | 0.500 | |" in text
    table, figure = study.write_study(exp, tmp_path / "out")
    text = table.read_text()
    assert "| criterion | metric | mode | trials | Spearman ρ |" in text
    assert text.index("| entropy |") < text.index("| snd |")  # best-correlated first
    assert "| entropy | target_entropy | min | 5 | 1.000 | 1.000 | t4 | 0.500 | 0.000 |" in text
    assert figure.stat().st_size > 1000
    assert study.stability(exp) in text  # the stability table follows the main one
    with pytest.raises(FileNotFoundError, match="no trial results"):
        study.read_trials(tmp_path / "empty")


@pytest.mark.slow
def test_the_ray_free_study_trains_a_sweep_and_analyses_it(tmp_path: Path) -> None:
    out = tmp_path / "study"
    code = study.main(
        ["--run", "--runner", "local", "--smoke-test", "--num-samples", "2", "--storage", str(tmp_path / "runs"),
         "--name", "tiny", "--out", str(out), "data.synthetic_tiles=4", "data.synthetic_tile_size=64",
         "train.eval_window=64", "train.eval_stride=64", "train.label_free_tiles=2", "train.source_eval_tiles=2"]
    )  # fmt: skip
    assert code == 0
    points = study.read_trials(tmp_path / "runs" / "tiny")
    assert sorted(p.trial_id for p in points) == ["trial_000", "trial_001"] and {p.step for p in points} == {4}
    text = (out / "selection_study.md").read_text()
    assert "2 trials, each at its last evaluation (step 4)" in text and "| im | target_im | min | 2 |" in text
    assert "| criterion | step 2 | step 4 | positive at |" in text
    assert (out / "selection_study.png").stat().st_size > 1000
