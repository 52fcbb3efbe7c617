"""`run_search`'s orchestration without Ray: the cluster, the source model and the Tuner are stand-ins, so
what is checked is the wiring of a new search (saved, built, summarised, hooks) and of its resume."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import lpcgma.distributed.search as search
from lpcgma.distributed.resources import NodeShape
from lpcgma.distributed.search_types import SearchInfo, SearchOutcome, SearchSettings

DEFAULTS = {"optim.lr": 0.001, "optim.head_lr_mult": 10.0}


class _Results(list[Any]):
    num_terminated = 3
    num_errors = 0


class _Tuner:
    def fit(self) -> _Results:
        trial = types.SimpleNamespace(
            config=dict(DEFAULTS),
            metrics_dataframe=pd.DataFrame({"target_miou": [0.1, 0.2], "training_iteration": [1, 2]}),
            best_checkpoints=[],
            checkpoint=None,
            error=None,
            path="/nowhere/t0",
            metrics={"trial_id": "t0"},
        )
        return _Results([trial])


@pytest.fixture
def tuner_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []

    def build(
        settings: SearchSettings, trainable: Any, space: Any, defaults: Any, plan: Any, max_t: int, storage: str
    ) -> _Tuner:
        calls.append(("build", settings.name, settings.seed, defaults, max_t, trainable[1].parent_run_id))
        return _Tuner()

    def restore(path: str, trainable: Any) -> _Tuner:
        calls.append(("restore", path, trainable[1].name))
        return _Tuner()

    monkeypatch.setenv("TUNE_DISABLE_SIGINT_HANDLER", "1")  # no Tune handler to tell an interruption by
    monkeypatch.setattr(search, "init_ray", lambda settings: False)
    monkeypatch.setattr(search, "planning_nodes", lambda local: [NodeShape(2, 0, 2, "local")])
    monkeypatch.setattr(search, "obtain_source_model", lambda *args: None)
    monkeypatch.setattr(search, "make_trainable", lambda setup, plan: ("trainable", setup))
    monkeypatch.setattr(search, "build_tuner", build)
    monkeypatch.setattr(search, "restore_tuner", restore)
    return calls


def test_a_new_search_is_saved_built_and_summarised_then_resumed(
    tmp_path: Path, tuner_calls: list[tuple[Any, ...]]
) -> None:
    store = tmp_path / "store"
    ended: list[SearchOutcome] = []

    def start(info: SearchInfo) -> str:
        return "parent-1"

    def end(info: SearchInfo, outcome: SearchOutcome) -> None:
        assert info.parent_run_id == "parent-1"
        ended.append(outcome)

    settings = SearchSettings(
        smoke_test=True, storage=str(store), name="s", seed=5, overrides=["tracking.enabled=false"], verbose=0
    )
    outcome = search.run_search(settings, start, end)
    assert outcome.complete and ended == [outcome]
    assert outcome.best is not None and outcome.best is outcome.defaults
    assert tuner_calls == [("build", "s", 5, DEFAULTS, 2, "parent-1")]
    saved = json.loads((store / "s" / search.SEARCH_FILE).read_text())
    assert saved["settings"]["seed"] == 5 and saved["settings"]["num_samples"] == 3  # smoke: at most 3 trials
    assert saved["defaults"] == DEFAULTS and set(saved["space"]) == set(DEFAULTS)

    before = (store / "s" / search.SEARCH_FILE).read_text()
    resumed = search.run_search(SearchSettings(resume=True, storage=str(store), name="s", top_k=1))
    assert resumed.complete and tuner_calls[1:] == [("restore", str(store / "s"), "s")]
    assert (store / "s" / search.SEARCH_FILE).read_text() == before  # the saved search is left as it was
