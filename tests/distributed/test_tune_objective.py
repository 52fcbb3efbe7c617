"""`--objective` takes criterion names (mode from the registry) or metric keys; checked before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from lpcgma.cli import build_parser
from lpcgma.config import ConfigError
from lpcgma.distributed.search import resolve_base, run_search
from lpcgma.distributed.search_cli import settings_from_args
from lpcgma.distributed.search_types import SearchOutcome, SearchSettings, TrialSummary
from lpcgma.engine.label_free import CRITERIA


def tune_settings(*argv: str) -> SearchSettings:
    return settings_from_args(build_parser().parse_args(["tune", *argv]))


@pytest.mark.parametrize(
    ("argv", "objective", "mode"),
    [
        ((), "target_miou", "max"),
        (("--objective", "snd"), "target_snd", "max"),
        (("--objective", "entropy"), "target_entropy", "min"),
        (("--objective", "im"), "target_im", "min"),
        (("--objective", "source_miou"), "source_miou", "max"),
        (("--objective", "target_entropy"), "target_entropy", "min"),
        (("--objective", "entropy", "--mode", "max"), "target_entropy", "max"),  # an explicit --mode wins
        (("--objective", "diag/gmm_src_loglik"), "diag/gmm_src_loglik", "max"),
    ],
)
def test_objective_resolves_to_metric_and_mode(argv: tuple[str, ...], objective: str, mode: str) -> None:
    s = tune_settings(*argv)
    assert (s.objective, s.mode) == (objective, mode)


def test_objective_help_names_every_criterion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in CRITERIA)


def _settings(tmp_path: Path, *overrides: str, **kw: object) -> SearchSettings:
    base: dict[str, object] = dict(
        config="synthetic",
        search_space="smoke",
        smoke_test=True,
        storage=str(tmp_path / "store"),
        name="objective",
        overrides=["tracking.enabled=false", *overrides],
    )
    base.update(kw)
    return SearchSettings(**base)  # type: ignore[arg-type]


def test_trials_select_their_best_checkpoint_by_a_criterion_objective(tmp_path: Path) -> None:
    assert resolve_base(_settings(tmp_path, objective="snd")).train.select_by == "target_snd"
    assert resolve_base(_settings(tmp_path)).train.select_by == "target_miou"
    assert resolve_base(_settings(tmp_path, objective="loss/total", mode="min")).train.select_by == "target_miou"


def test_the_driver_resolves_the_tracking_uri_once_for_every_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trials must not resolve the default store themselves: on a worker that imports lpcgma from
    another checkout, the default would be another store (issue 22: the parent run in one, the trials in another)."""
    import lpcgma.tracking.store as store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(store, "default_store_dir", lambda: tmp_path / "driver_checkout" / "mlflow")
    on = _settings(tmp_path, "tracking.enabled=true")
    driver_db = tmp_path / "driver_checkout" / "mlflow" / "mlflow.db"
    assert resolve_base(on).tracking.tracking_uri == f"sqlite:///{driver_db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_base(on).tracking.tracking_uri == "http://127.0.0.1:5999"
    explicit = _settings(tmp_path, "tracking.enabled=true", "tracking.tracking_uri=sqlite:////x/y.db")
    assert resolve_base(explicit).tracking.tracking_uri == "sqlite:////x/y.db"  # the config's own wins
    assert resolve_base(_settings(tmp_path)).tracking.tracking_uri == ""  # tracking off: nothing resolved


def test_unreported_objective_is_refused_before_ray(tmp_path: Path) -> None:
    import ray

    with pytest.raises(ConfigError, match="--objective = 'target_miou' is never reported: data.target_labels=false"):
        run_search(_settings(tmp_path, "data.target_labels=false"))
    with pytest.raises(ConfigError, match="--objective = 'target_agreement' is never reported"):
        run_search(_settings(tmp_path, "method.name=source_only", objective="agreement"))
    with pytest.raises(ConfigError, match="--mode must be max or min"):
        run_search(_settings(tmp_path, objective="snd", mode="up"))
    assert not ray.is_initialized()


def test_summary_compares_best_and_defaults_in_the_objectives_direction() -> None:
    trials = [
        TrialSummary("d", "finished", 0.90, 2, {"optim.lr": 0.001}, None, None, True),
        TrialSummary("b", "finished", 0.60, 2, {"optim.lr": 0.002}, None, None, False),
    ]
    text = SearchOutcome("/store/x", "target_entropy", "min", trials).format()
    assert "best trial b: target_entropy = 0.6000 vs literature defaults" in text
    assert "0.9000 (-0.3000; lower is better)" in text
    assert "the literature defaults (trial d) are the best" in SearchOutcome("/s", "m", "max", trials).format()
