"""Resource planning (concurrent trials from the cluster's shape; impossible searches refused), and
what `run_search` refuses before Ray starts. No Ray cluster is started here."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from lpcgma.config import ConfigError, load_config
from lpcgma.distributed.resources import (
    NodeShape,
    ResourceError,
    autoscaler_nodes,
    local_storage_warning,
    plan_resources,
)
from lpcgma.distributed.search import evaluations_per_trial, run_search
from lpcgma.distributed.search_types import SearchOutcome, SearchSettings, TrialSummary
from lpcgma.search_space import SearchSpaceError

TWO_CPUS = [NodeShape(2, 0, 2, "local")]


def test_local_storage_on_several_nodes_is_warned_about() -> None:
    two_nodes = [NodeShape(8, 1, 1, "head"), NodeShape(8, 1, 1, "gpu-worker (autoscaled)")]
    warning = local_storage_warning("/home/ray/runs/tune", two_nodes)
    assert warning is not None and "/home/ray/runs/tune" in warning and "2 nodes" in warning and "s3://" in warning
    assert local_storage_warning("file:///home/ray/runs/tune", two_nodes) is not None
    assert local_storage_warning("s3://bucket/tune", two_nodes) is None  # shared: every node reads it
    assert local_storage_warning("/home/ray/runs/tune", TWO_CPUS) is None  # one node: its disk is the storage


def test_single_worker_trials_run_inline_and_fill_the_cpus() -> None:
    plan = plan_resources(TWO_CPUS, workers_per_trial=1, cpus_per_worker=1)
    assert plan.inline and plan.max_concurrent == 2
    assert plan.trial_resources == {"cpu": 1, "gpu": 0}  # the trial itself holds the worker's CPU


def test_the_source_stage_gets_a_whole_cpu_node_or_one_gpu_worker() -> None:
    nodes = [NodeShape(2, 0, 0, "head"), NodeShape(8, 0, 0, "big"), NodeShape(8, 2, 0, "gpu")]
    assert plan_resources(nodes, 1, cpus_per_worker=1).source_stage_cpus == 8  # alone before the trials
    assert plan_resources(nodes, 1, cpus_per_worker=4, gpus_per_worker=1).source_stage_cpus == 4  # a worker
    assert "source stage gets 2 CPU" in plan_resources(TWO_CPUS, 1, 1).describe()


def test_multi_worker_trials_hold_a_driver_slot_not_a_cpu() -> None:
    plan = plan_resources(TWO_CPUS, workers_per_trial=2, cpus_per_worker=1)
    assert not plan.inline and plan.max_concurrent == 1
    assert plan.trial_resources == {"trial_driver": 1.0}


def test_workers_of_a_trial_may_spread_over_nodes() -> None:
    nodes = [NodeShape(1, 0, 4, "head"), NodeShape(1, 0, 0, "worker")]
    assert plan_resources(nodes, 2, 1).max_concurrent == 1
    assert plan_resources(nodes, 1, 1).max_concurrent == 2


def test_more_workers_than_the_cluster_has_fails_fast() -> None:
    with pytest.raises(ResourceError, match=r"3 worker\(s\) × \(1 CPU\) but only 2"):
        plan_resources(TWO_CPUS, 3, 1)


def test_gpus_beyond_any_node_fail_fast() -> None:
    with pytest.raises(ResourceError, match=r"asks for 1 GPU\(s\) but the largest node has 0"):
        plan_resources(TWO_CPUS, 1, 1, 1)
    nodes = [NodeShape(8, 1, 1, "a"), NodeShape(8, 1, 0, "b")]
    with pytest.raises(ResourceError, match="largest node has 1"):
        plan_resources(nodes, 1, 1, 2)
    assert plan_resources(nodes, 2, 1, 1).max_concurrent == 1  # one GPU on each of two nodes


def test_cpus_beyond_any_node_fail_fast() -> None:
    with pytest.raises(ResourceError, match=r"asks for 4 CPU\(s\) but the largest node has 2"):
        plan_resources(TWO_CPUS, 1, 4)


def test_fractional_gpus_only_for_single_worker_trials() -> None:
    node = [NodeShape(16, 1, 0, "gpu")]
    assert plan_resources(node, 1, 1, 0.25).max_concurrent == 4
    with pytest.raises(ResourceError, match="ray#48012"):
        plan_resources([NodeShape(16, 2, 4, "gpu")], 2, 1, 0.5)
    with pytest.raises(ResourceError, match="whole number"):
        plan_resources(node, 1, 1, 1.5)


def test_multi_worker_trials_need_a_driver_resource() -> None:
    with pytest.raises(ResourceError, match="trial_driver"):
        plan_resources([NodeShape(8, 0, 0, "n")], 2, 1)
    plan = plan_resources([NodeShape(16, 0, 1, "n")], 2, 1)
    assert plan.max_concurrent == 1 and "trial_driver" in plan.describe()


def test_max_concurrent_caps_and_is_never_raised_beyond_the_cluster() -> None:
    assert plan_resources(TWO_CPUS, 1, 1, max_concurrent=1).max_concurrent == 1
    plan = plan_resources(TWO_CPUS, 1, 1, max_concurrent=8)
    assert plan.max_concurrent == 2 and "lowered to 2" in plan.describe()


@pytest.mark.parametrize(("w", "c", "g"), [(0, 1, 0), (1, 0, 0), (1, 1, -1)])
def test_nonsense_shapes_are_refused(w: int, c: float, g: float) -> None:
    with pytest.raises(ResourceError):
        plan_resources(TWO_CPUS, w, c, g)


def test_autoscaler_nodes_absent_off_a_launcher_head(tmp_path: Path) -> None:
    assert autoscaler_nodes(tmp_path / "missing.yaml") == []


def test_evaluations_per_trial_counts_the_final_one() -> None:
    cfg = load_config(None, ["train.iters=10", "train.eval_every=4"])
    assert evaluations_per_trial(cfg) == 3  # steps 4, 8 and the final 10
    cfg = load_config(None, ["train.iters=8", "train.eval_every=4"])
    assert evaluations_per_trial(cfg) == 2


# ------------------------------------------------------------------ refused before Ray starts
def settings(tmp_path: Path, **kw: object) -> SearchSettings:
    base = dict(
        config="synthetic",
        search_space="smoke",
        smoke_test=True,
        storage=str(tmp_path / "store"),
        name="refused",
        overrides=["tracking.enabled=false"],
    )
    base.update(kw)
    return SearchSettings(**base)  # type: ignore[arg-type]


def _ray_not_started() -> None:
    import ray

    assert not ray.is_initialized()


def test_gpu_search_on_a_machine_without_gpus_fails_before_ray(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ResourceError, match="GPU"):
        run_search(settings(tmp_path, gpus_per_worker=1))
    _ray_not_started()


def test_bad_search_space_fails_before_ray(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim.lr: {type: uniform, low: 0.1, high: 0.01}\n")
    with pytest.raises(SearchSpaceError, match=r"bad.yaml', key 'optim.lr'"):
        run_search(settings(tmp_path, search_space=str(bad)))
    _ray_not_started()


def test_key_of_another_method_fails_before_ray(tmp_path: Path) -> None:
    with pytest.raises(SearchSpaceError, match="unknown config key for method 'self_training'"):
        run_search(settings(tmp_path, search_space="synthetic", overrides=["method.name=self_training"]))
    _ray_not_started()


def test_bad_override_and_resume_without_name_fail_before_ray(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no_such_key"):
        run_search(settings(tmp_path, overrides=["train.no_such_key=1"]))
    with pytest.raises(ConfigError, match="--resume needs --name"):
        run_search(settings(tmp_path, resume=True, name=""))
    with pytest.raises(ConfigError, match="no search 'nothing'"):
        run_search(settings(tmp_path, resume=True, name="nothing"))
    _ray_not_started()


def test_resume_keeps_the_saved_search_and_takes_this_invocations_runtime_settings() -> None:
    saved = asdict(SearchSettings(num_samples=12, seed=7, name="s", address="old:6379", top_k=9, verbose=3))
    now = SearchSettings(num_samples=1, resume=True, name="s", address="auto", num_cpus=2, parent_run_id="p")
    resumed = now.resumed({**saved, "a_setting_of_another_version": 1})
    assert (resumed.num_samples, resumed.seed, resumed.name) == (12, 7, "s")  # the search's own
    assert (resumed.resume, resumed.address, resumed.num_cpus, resumed.parent_run_id) == (True, "auto", 2, "p")
    assert (resumed.top_k, resumed.verbose) == (3, 1)  # this invocation's (its defaults), not the saved ones
    runtime = {f.name for f in fields(SearchSettings) if f.metadata.get("runtime")}
    assert runtime == {"resume", "address", "num_cpus", "num_gpus", "ray_temp_dir", "verbose", "top_k", "parent_run_id"}


def test_cli_reports_a_bad_search_space_with_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method.gaussians_per_class: {type: int, low: 0, high: 4}\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lpcgma.cli",
            "tune",
            "--search-space",
            str(bad),
            "--storage",
            str(tmp_path),
            "method.name=lpcgma",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "method.gaussians_per_class" in r.stderr and ">= 1" in r.stderr


# ------------------------------------------------------------------ the summary
def test_summary_shows_best_vs_defaults_and_counts() -> None:
    trials = [
        TrialSummary("a", "stopped early", 0.30, 1, {"optim.lr": 0.001}, "/c/a", None, True),
        TrialSummary("b", "finished", 0.45, 4, {"optim.lr": 0.002}, "/c/b", "/runs/b", False),
        TrialSummary("c", "error", None, 0, {"optim.lr": 0.003}, None, None, False),
    ]
    out = SearchOutcome("/store/x", "target_miou", "max", trials)
    assert out.best is trials[1] and out.defaults is trials[0] and out.stopped_early == 1
    text = out.format()
    assert "3 trials: 1 finished, 1 stopped early by ASHA, 1 failed" in text
    assert "0.4500 vs literature defaults (trial a, stopped early): 0.3000 (+0.1500)" in text
    assert "best checkpoint: /c/b" in text
    low = SearchOutcome("/store/x", "loss", "min", trials)
    assert low.best is trials[0]
    assert "retried" not in text


def test_summary_counts_and_names_retried_trials() -> None:
    trials = [
        TrialSummary("a", "finished", 0.30, 4, {"optim.lr": 0.001}, "/c/a", None, True),
        TrialSummary("b", "finished", 0.45, 4, {"optim.lr": 0.002}, "/c/b", "/runs/b", False, None, 1),
    ]
    text = SearchOutcome("/store/x", "target_miou", "max", trials).format()
    assert "2 trials: 2 finished, 0 stopped early by ASHA, 0 failed, 1 retried after a failure" in text
    assert "| 1 | b | 0.4500 | 4 | finished, retried 1× |" in text
    assert "trial b was retried 1× after a failure (see /runs/b)" in text


class _FakeTrial:
    def __init__(self, num_failures: int) -> None:
        self.num_failures = num_failures


class _FakeResult:
    def __init__(self, error: BaseException | None) -> None:
        self.config = {"optim.lr": 0.001}
        self.metrics_dataframe = None
        self.best_checkpoints: list = []
        self.checkpoint = None
        self.error = error
        self.path = "/nowhere/trial"
        self.metrics: dict = {}


class _FakeGrid(list):
    def __init__(self, results: list, failures: list[int]) -> None:
        super().__init__(results)
        self._experiment_analysis = type("EA", (), {"trials": [_FakeTrial(n) for n in failures]})()


def test_summarize_reads_ray_s_failure_counts() -> None:
    from lpcgma.distributed.search_summary import summarize

    grid = _FakeGrid([_FakeResult(None), _FakeResult(RuntimeError("boom")), _FakeResult(None)], [1, 3, 0])
    out = summarize(grid, "target_miou", "max", {"optim.lr": 0.001}, "/store/x", max_t=4)
    # a trial that ended in an error: its last failure was not retried
    assert [t.retries for t in out.trials] == [1, 2, 0]
    assert [t.status for t in out.trials] == ["stopped early", "error", "stopped early"]


# ------------------------------------------------------------------ the scheduler
class _Trial:
    def __init__(self, trial_id: str, config: dict) -> None:
        self.trial_id, self.config = trial_id, config


def test_asha_never_stops_the_defaults_trial_early() -> None:
    from ray.tune.schedulers import TrialScheduler

    from lpcgma.distributed.asha import DefaultsProtectedASHA

    defaults = {"optim.lr": 0.001}
    asha = DefaultsProtectedASHA(
        protected=defaults,
        time_attr="training_iteration",
        metric="m",
        mode="max",
        max_t=4,
        grace_period=1,
        reduction_factor=2,
    )
    good, dflt, bad = (
        _Trial("good", {"optim.lr": 0.003}),
        _Trial("dflt", dict(defaults)),
        _Trial("bad", {"optim.lr": 0.01}),
    )
    for t in (good, dflt, bad):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good, {"training_iteration": 1, "m": 0.5}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, dflt, {"training_iteration": 1, "m": 0.1}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, bad, {"training_iteration": 1, "m": 0.1}) == TrialScheduler.STOP
    assert asha.on_trial_result(None, dflt, {"training_iteration": 4, "m": 0.2}) == TrialScheduler.STOP  # its end
