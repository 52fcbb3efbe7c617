"""lpcgma.engine.sweep: the Ray-free random search (sampling, Tune-style rows, resume, deadline)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tiny_config import tiny_overrides

from lpcgma.config import load_config
from lpcgma.distributed.trial_results import read_trial_rows
from lpcgma.engine.sweep import TrialSpec, run_sweep, run_trial, sample_points
from lpcgma.search_space import load_search_space

TINY = tiny_overrides(
    "method.name=lpcgma", "train.label_free_tiles=2", "train.source_eval_tiles=2", crop=32, iters=4
)


def test_points_start_with_the_defaults_then_seeded_draws_inside_the_space() -> None:
    base = load_config(None, ["method.name=lpcgma"])
    space = load_search_space("synthetic", "lpcgma", base)
    points = sample_points(space, base, 12, seed=5)
    assert len(points) == 12 and points == sample_points(space, base, 12, seed=5)
    assert points[1:] != sample_points(space, base, 12, seed=6)[1:]
    assert points[0] == {p.key: getattr(getattr(base, p.key.split(".")[0]), p.key.split(".")[1]) for p in space.params}
    for point in points[1:]:
        assert set(point) == set(space.keys)
        assert all(p.contains(point[p.key]) for p in space.params), point
    lr = [p["optim.lr"] for p in points[1:]]  # loguniform: spread over the decades, not clustered at the top
    (lr_param,) = [p for p in space.params if p.key == "optim.lr"]
    assert min(lr) < math.sqrt(lr_param.low * lr_param.high) < max(lr)
    assert {type(p["method.gaussians_per_class"]) for p in points} == {int}
    with pytest.raises(ValueError, match="at least 1 trial"):
        sample_points(space, base, 0, seed=0)


def test_param_draws_follow_their_distribution() -> None:
    base = load_config(None, ["method.name=lpcgma"])
    space = load_search_space("synthetic", "lpcgma", base)
    rng = np.random.default_rng(0)
    boost = next(p for p in space.params if p.key == "method.minority_boost")  # uniform [0, 1]
    draws = [boost.sample(rng) for _ in range(2000)]
    assert 0.45 < float(np.mean(draws)) < 0.55 and min(draws) >= 0 and max(draws) <= 1
    lam = next(p for p in space.params if p.key == "method.lambda_pmc")  # loguniform [0.01, 1]
    logs = np.log10([lam.sample(rng) for _ in range(2000)])
    assert -1.1 < float(np.mean(logs)) < -0.9  # uniform in log space: mean exponent -1


def test_sweep_writes_tune_style_rows_resumes_and_respects_the_deadline(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    lines: list[str] = []
    outcomes = run_sweep("synthetic", TINY, "synthetic", 2, out, seed=1, jobs=2, log=lines.append)  # at once
    assert [o.status for o in outcomes] == ["done", "done"]
    rows = read_trial_rows(out)  # what experiments/selection_study.py --experiment reads
    assert sorted(rows) == ["trial_000", "trial_001"]
    for trial_rows in rows.values():
        assert [r["step"] for r in trial_rows] == [2.0, 4.0]
        assert [r["training_iteration"] for r in trial_rows] == [1.0, 2.0]
        assert {"target_miou", "source_miou", "target_im", "target_snd"} <= set(trial_rows[-1])
    sweep = json.loads((out / "sweep.json").read_text())
    params = json.loads((out / "trial_001" / "params.json").read_text())
    assert sweep["points"]["trial_001"] == params and params["optim.lr"] != sweep["points"]["trial_000"]["optim.lr"]
    config = (out / "trial_001" / "config.yaml").read_text()  # the trial trained its own point
    assert f"lr: {params['optim.lr']}" in config
    assert any("trial_001: done" in line and "target_miou=" in line for line in lines)
    ckpts = out / "trial_001" / "checkpoints"  # a finished trial keeps best/ only (disk)
    assert (ckpts / "best" / "state.pt").is_file() and not list(ckpts.glob("step_*"))

    before = (out / "trial_000" / "result.json").stat().st_mtime_ns
    again = run_sweep("synthetic", TINY, "synthetic", 3, out, seed=1, budget_s=1e-9, log=lines.append)
    assert [o.status for o in again] == [
        "resumed",
        "resumed",
        "skipped",
    ]  # finished: read back; past the deadline: not started
    assert (out / "trial_000" / "result.json").stat().st_mtime_ns == before
    assert not (out / "trial_002").exists()


def test_a_trial_reaching_the_deadline_stops_and_keeps_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lpcgma.engine.sweep as sweep

    calls = iter(range(1000))
    # time.time() calls: 1 = the start check, 2 and 3 = the logs of steps 1 and 2 (then step 2's
    # evaluation is written), 4 = the log of step 3: past the deadline from there on
    monkeypatch.setattr(sweep, "time", SimpleNamespace(time=lambda: 0.0 if next(calls) < 3 else 10.0))
    spec = TrialSpec("trial_000", {"optim.lr": 1e-3}, "synthetic", tuple(TINY))
    outcome = run_trial(spec, tmp_path, deadline=5.0)
    assert outcome.status == "deadline" and outcome.last["step"] == 2
    assert [r["step"] for r in read_trial_rows(tmp_path)["trial_000"]] == [2.0]
    late = run_trial(TrialSpec("trial_001", {}, "synthetic", tuple(TINY)), tmp_path, deadline=5.0)
    assert late.status == "skipped" and not (tmp_path / "trial_001").exists()


def test_sweep_trials_start_from_the_shared_source_model(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    store = tmp_path / "store"
    stage = ["source_stage.enabled=true", "source_stage.iters=2", f"source_stage.store={store}"]
    lines: list[str] = []
    outcomes = run_sweep("synthetic", [*TINY, *stage], "synthetic", 2, out, seed=1, jobs=2, log=lines.append)
    assert [o.status for o in outcomes] == ["done", "done"]
    sweep = json.loads((out / "sweep.json").read_text())
    model = sweep["source_model"]
    assert model["trained"] and 0.0 <= model["metrics"]["target_miou"] <= 1.0
    assert [p.name for p in store.iterdir() if p.is_dir()] == [model["key"]]  # one model, trained once
    assert sum("training source model" in line for line in lines) == 1
    again = run_sweep("synthetic", [*TINY, *stage], "synthetic", 1, tmp_path / "other", seed=2, log=lines.append)
    assert again[0].status == "done" and sum("training source model" in line for line in lines) == 1


def test_a_searched_key_that_changes_the_source_model_is_refused(tmp_path: Path) -> None:
    from lpcgma.config import ConfigError

    space = tmp_path / "space.yaml"
    space.write_text("data.crop_size:\n  type: choice\n  values: [32, 48]\n")
    with pytest.raises(ConfigError, match="shared source model"):
        run_sweep("synthetic", [*TINY, "source_stage.enabled=true"], str(space), 2, tmp_path / "s")
    assert not (tmp_path / "s" / "trial_000").exists()
