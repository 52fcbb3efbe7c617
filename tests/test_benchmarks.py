"""Smoke tests of the benchmark scripts at their tiniest sizes: they run and print a row per method / size."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest
from script_helpers import load_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    return load_script(BENCHMARKS / f"{name}.py", f"benchmark_{name}")


def table_rows(out: str, first_cell: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"| {first_cell} |")]


def test_step_cost_prints_a_row_per_method_and_the_lpcgma_profile(capsys: pytest.CaptureFixture[str]) -> None:
    step_cost = load("step_cost")
    args = "--in-process --crop 32 --batch 1 --tiles 2 --warmup 0 --steps 1 --memory-steps 1 --profile-steps 1"
    results = step_cost.main(args.split())
    out = capsys.readouterr().out
    assert [r["method"] for r in results] == list(step_cost.METHODS)
    for method in step_cost.METHODS:
        assert len(table_rows(out, method)) == 1, out
    assert "| self_training | " in out and "| 1.00× |" in table_rows(out, "self_training")[0]
    assert "LPCGMA / self-training, refit amortised:" in out
    assert "### Where an LPCGMA step goes" in out and "| **whole step** |" in out
    assert "PIX (student on strong view + view contrast)" in out
    assert all(r["cpu_s"] > 0 and r["wall_s"] > 0 for r in results)
    # the profile's labels are gone from the package afterwards
    import lpcgma.losses.gmm
    import lpcgma.methods.lpcgma

    assert lpcgma.methods.lpcgma.forward_alignment_loss is lpcgma.losses.gmm.forward_alignment_loss


def test_step_cost_set_overrides_reach_every_method(tmp_path: Path) -> None:
    from lpcgma.config import ConfigError

    step_cost = load("step_cost")
    args = step_cost.parse_args(["--set", "train.channels_last=true", "--set", "train.amp_dtype=float16"])
    for method in ("self_training", "lpcgma lean"):
        cfg = step_cost.build_config(method, args, tmp_path)
        assert cfg.train.channels_last and cfg.train.amp_dtype == "float16"
    assert step_cost.build_config("lpcgma lean", args, tmp_path).method.gmm_memory_features == "student"
    with pytest.raises(ConfigError, match="train.chanels_last"):
        step_cost.build_config("lpcgma", step_cost.parse_args(["--set", "train.chanels_last=true"]), tmp_path)


def test_gmm_fit_prints_the_comparison_the_profile_and_the_gemm_probe(capsys: pytest.CaptureFixture[str]) -> None:
    gmm_fit = load("gmm_fit")
    args = "--classes 2 --samples 64 --dim 4 --k 2 --iters 2 --repeats 1 --profile"
    gmm_fit.main(args.split())
    out = capsys.readouterr().out
    assert len(table_rows(out, "2×64×4, 2, 2")) == 1, out
    assert "aten::" in out  # the profiler's operator table
    probe = [line for line in out.splitlines() if line.startswith(("| bmm [", "| mm ["))]
    assert len(probe) == 2 and all(line.endswith("GFLOP/s |") for line in probe), out


def test_contrast_scaling_prints_a_row_per_size_and_skips_the_naive_loss_over_budget(
    capsys: pytest.CaptureFixture[str],
) -> None:
    contrast = load("contrast_scaling")
    # budget 0.5 MiB: the naive losses run at 4² (≤ 0.25 MiB predicted) and are skipped at 8² (≥ 1 MiB predicted)
    argv = ["--in-process", "--sizes", "4", "8", "--repeats", "1", "--naive-budget-gb", str(0.5 / 1024)]
    results = contrast.main(argv)
    out = capsys.readouterr().out
    for loss, prefix in (("pmc", "2+2 × "), ("pix", "2 × ")):
        assert [r["size"] for r in results[loss]] == [4, 8]
        assert "skipped" not in results[loss][0]["naive"] and "skipped" in results[loss][1]["naive"]
        for size in (4, 8):
            assert len([x for x in out.splitlines() if x.startswith(f"| {prefix}{size}² (")]) == 1, out
    d_pmc, d_pix = contrast.check_naive(contrast.parse_args(["--sizes", "4"]))
    assert d_pmc < 1e-4 and d_pix < 1e-4


def _experiment(folder: Path, trials: dict[str, list[tuple[int, int, float]]]) -> Path:
    """A Tune-like experiment folder: per trial, rows of (timestamp, step, target_miou)."""
    import json

    for trial_id, rows in trials.items():
        (folder / trial_id).mkdir(parents=True)
        lines = [
            json.dumps({"trial_id": trial_id, "training_iteration": i + 1, "timestamp": t, "step": s, "target_miou": m})
            for i, (t, s, m) in enumerate(rows)
        ]
        (folder / trial_id / "result.json").write_text("\n".join(lines) + "\n")
    return folder


def test_search_efficiency_replays_evaluations_by_time_and_counts_every_trials_iterations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eff = load("search_efficiency")
    # early-stopping search: trial b is stopped after 100 iterations; its 0.30 comes at t=2
    asha = _experiment(tmp_path / "asha", {"a": [(1, 100, 0.10), (3, 200, 0.20)], "b": [(2, 100, 0.30)]})
    # no early stopping: both trials run 200 iterations; the best (0.40) comes last
    full = _experiment(
        tmp_path / "full", {"c": [(1, 100, 0.05), (2, 200, 0.15)], "d": [(3, 100, 0.10), (4, 200, 0.40)]}
    )
    curve = eff.best_so_far(eff.read_trial_rows(asha))
    assert curve == [(100, 0.10), (200, 0.30), (300, 0.30)]
    assert eff.best_within(curve, 150) == pytest.approx(0.10)
    assert eff.best_within(curve, 50) == float("-inf")
    png = tmp_path / "eff.png"
    assert eff.main(["--search", f"asha={asha}", "--search", f"full={full}", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    # common budget = 300 iterations (the smaller search): full has reached only 0.15 by then
    # (25 % = 75 iterations: nothing evaluated yet in either)
    assert table_rows(out, "asha") == ["| asha | 2 | 300 | – | 10.0 | 30.0 | 30.0 |"]
    assert table_rows(out, "full") == ["| full | 2 | 400 | – | 5.0 | 15.0 | 40.0 |"]
    assert png.stat().st_size > 0


def test_ddp_scaling_trains_each_setup_per_seed_and_compares_to_one_thread(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the 2 ranks import platform_overhead by name
    rows = load("ddp_scaling").main(["--iters", "2", "--seeds", "3"])
    out = capsys.readouterr().out
    setups = ["1 process, 1 thread", "1 process, 2 threads", "2 ranks × 1 thread (gloo)"]
    assert [r["setup"] for r in rows] == setups
    assert rows[0]["speedup"] == pytest.approx(1.0)
    for r in rows:
        assert r["seed"] == 3 and 0 < float(r["train_s"]) < float(r["wall_s"])
        assert 0.0 <= float(r["miou"]) <= 1.0 and math.isfinite(float(r["loss"]))
        assert len(table_rows(out, str(r["setup"]))) == 1, out
    assert "- 2 ranks × 1 thread (gloo): speed-up" in out


def test_ddp_scaling_without_the_single_thread_runs_compares_to_the_threaded_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    rows = load("ddp_scaling").main(["--iters", "1", "--seeds", "4", "--no-single-thread"])
    assert [r["setup"] for r in rows] == ["1 process, 2 threads", "2 ranks × 1 thread (gloo)"]
    assert rows[0]["speedup"] == pytest.approx(1.0) and float(rows[1]["speedup"]) > 0
    assert "speed-up of training vs 1 process, 2 threads" in capsys.readouterr().out
