"""experiments/compare_methods.py: which overrides reach which method, shared run folders, resumable tables."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from script_helpers import load_script
from tiny_config import tiny_overrides

from lpcgma.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "compare_methods.py"
compare = load_script(SCRIPT, "compare_methods")

TINY = tiny_overrides()


def test_method_options_reach_only_the_methods_that_have_them() -> None:
    common = ["train.iters=5", "method.gmm_warmup_iters=50", "method.pseudo_threshold=0.9"]
    kept, dropped = compare.applicable(common, ["method.name=self_training"])
    assert kept == ["train.iters=5", "method.pseudo_threshold=0.9"]
    assert dropped == ["method.gmm_warmup_iters=50"]
    kept, dropped = compare.applicable(common, ["method.name=lpcgma", "method.use_pix=false"])
    assert kept == common and dropped == []
    kept, dropped = compare.applicable(common, ["method.name=source_only"])
    assert kept == ["train.iters=5"]


def test_every_row_is_a_valid_config() -> None:
    for name, variant in {**compare.METHODS, **compare.ABLATION}.items():
        cfg = load_config(REPO / "lpcgma" / "configs" / "synthetic.yaml", variant)
        assert cfg.method.name == variant[0].split("=", 1)[1], name
    recipe = load_config(None, compare.METHODS["self-training + CBST + GMM forward"]).method
    assert recipe.class_thresholds and recipe.use_gmm_forward
    assert not (recipe.use_pmc or recipe.use_pix or recipe.use_gmm_reverse)
    for method in ("self-training", "LPCGMA"):  # CBST (session 28): the multi-scale row + class thresholds
        plain = load_config(None, compare.METHODS[f"{method}, multi-scale teacher"]).method
        cbst = load_config(None, compare.METHODS[f"{method} + CBST, multi-scale teacher"]).method
        assert cbst.class_thresholds and cbst.pseudo_weighting == "threshold" and cbst.teacher_scales == (0.75, 1.5)
        assert dataclasses.replace(cbst, class_thresholds=False, pseudo_weighting=plain.pseudo_weighting) == plain


def test_run_folder_depends_on_the_overrides_not_their_order(tmp_path: Path) -> None:
    a = compare.run_dir(tmp_path, ["train.iters=5", "method.name=lpcgma"], 0)
    assert a == compare.run_dir(tmp_path, ["method.name=lpcgma", "train.iters=5"], 0)
    assert a != compare.run_dir(tmp_path, ["method.name=lpcgma", "train.iters=5"], 1)
    assert a != compare.run_dir(tmp_path, ["method.name=lpcgma", "train.iters=6"], 0)


def test_evaluation_mean_averages_every_evaluation_of_a_run(tmp_path: Path) -> None:
    lines = [{"step": 10, "loss/total": 1.0}, {"step": 10, "target_miou": 0.2}, {"step": 20, "target_miou": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert compare.evaluation_mean(tmp_path) == 0.35
    resumed = [*lines, {"step": 20, "target_miou": 0.4}, {"step": 30, "target_miou": 0.6}]  # step 20 again
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in resumed) + "\n")
    assert abs(compare.evaluation_mean(tmp_path) - 0.4) < 1e-12  # (0.2 + 0.4 + 0.6) / 3
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss/total": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no evaluation"):
        compare.evaluation_mean(tmp_path)


def test_paired_table_subtracts_the_baseline_seed_by_seed() -> None:
    ev = compare.EVAL_MEAN
    results = {
        "base": [{"target_miou": 0.40, ev: 0.40}, {"target_miou": 0.50, ev: 0.44}],
        "method": [{"target_miou": 0.43, ev: 0.41}, {"target_miou": 0.49, ev: 0.46}],
    }
    text = compare.paired_table(results, [3, 4], "base")
    assert "Paired by seed (3, 4) against **base**" in text
    # final: +3.0 and -1.0 -> mean 1.0, sample std 2.83; evaluation means: +1.0, +2.0 -> 1.5 ± 0.7
    assert "| method | +1.0 ± 2.8 (+3.0, -1.0; > 0 on 1 of 2) | +1.5 ± 0.7 (+1.0, +2.0; > 0 on 2 of 2) |" in text
    assert "| base |" not in text


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), "--config", "synthetic", "--runs-dir", str(tmp_path / "runs"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)


def test_table_is_written_and_finished_runs_are_not_trained_again(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    args = ["--ablation", "--only", "self-training", "+ PMC", "--seeds", "0", "--out", str(out),
            "--paired-with", "self-training", *TINY]  # fmt: skip
    first = _run(tmp_path, "--jobs", "2", *args, "method.gmm_warmup_iters=1")  # both runs at once
    assert first.returncode == 0, first.stderr[-3000:]
    assert "self-training: not applied (its method has no such option): method.gmm_warmup_iters=1" in first.stdout
    text = out.read_text()
    assert "| self-training |" in text and "| + PMC |" in text
    assert "method.gmm_warmup_iters=1" in text  # the command line is in the table's file
    results = sorted((tmp_path / "runs" / "synthetic").glob("*/result.json"))
    assert len(results) == 2
    assert not list((tmp_path / "runs" / "synthetic").glob("*/checkpoints/step_*"))  # finished: best/ only
    # self-training's folder holds no LPCGMA option: the same run as without the option
    st = next(r for r in results if "self_training" in (r.parent / "variant.json").read_text())
    assert "gmm_warmup_iters" not in (st.parent / "variant.json").read_text()
    pmc = next(r for r in results if r != st)
    delta = 100 * (json.loads(pmc.read_text())["target_miou"] - json.loads(st.read_text())["target_miou"])
    assert "Paired by seed (0) against **self-training**" in text and f"| + PMC | {delta:+.1f} ± 0.0 (" in text
    assert "--paired-with 'self-training'" in text
    stamps = {r: r.stat().st_mtime_ns for r in results}
    seen = json.loads(st.read_text())["target_miou"]

    again = _run(tmp_path, *args, "method.gmm_warmup_iters=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {r: r.stat().st_mtime_ns for r in results} == stamps  # read back, not retrained
    assert f"target mIoU {100 * seen:.1f}" in again.stdout


def test_a_paired_row_that_is_not_compared_is_refused(tmp_path: Path) -> None:
    res = _run(tmp_path, "--only", "self-training", "--seeds", "0", "--paired-with", "LPCGMA")
    assert res.returncode == 2
    assert "--paired-with 'LPCGMA' is not a compared row" in res.stderr
    res = _run(tmp_path, "--only", "self-training", "--seeds", "0", "--paired-with", compare.SOURCE_MODEL_ROW)
    assert res.returncode == 2 and "needs source_stage.enabled=true" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_an_option_no_compared_method_has_is_refused(tmp_path: Path) -> None:
    res = _run(tmp_path, "--only", "self-training", "--seeds", "0", "--ablation", "method.gmm_warmup_iter=1")
    assert res.returncode != 0
    assert "method.gmm_warmup_iter=1" in res.stderr and "no compared method has" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_shift_curve_from_a_shared_source_model(tmp_path: Path) -> None:
    """--shifts: a table per strength and the curve; every seed's runs start from that seed's source model."""
    out, plot = tmp_path / "curve.md", tmp_path / "curve.png"
    args = ["--only", "source-only", "self-training", "--seeds", "0", "--shifts", "0", "1", "--jobs", "2",
            "--out", str(out), "--plot", str(plot), *TINY, "source_stage.enabled=true",
            "source_stage.iters=2"]  # fmt: skip
    res = _run(tmp_path, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    assert "### Target mIoU against shift strength" in text and "| shift | source model (stage 1) |" in text
    assert "### data.synthetic_shift = 0" in text and "### data.synthetic_shift = 1" in text
    assert plot.is_file() and plot.stat().st_size > 0
    models = [p for p in (tmp_path / "runs" / "source_models").iterdir() if p.is_dir()]
    assert len(models) == 1  # one seed, one source model for every strength and method
    assert len(list((tmp_path / "runs" / "synthetic").glob("*/result.json"))) == 4
    assert "--shifts 0 1" in text and "source_stage.store" not in text  # the command as typed
