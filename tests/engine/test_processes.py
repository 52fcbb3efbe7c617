"""map_in_processes: N calls at a time in spawned processes, each with its share of the threads."""

from __future__ import annotations

import os

import pytest
import torch

from lpcgma.engine.processes import map_in_processes


def test_one_job_runs_here_lazily_and_in_order() -> None:
    seen: list[str] = []

    def fn(x: str) -> int:
        seen.append(x)
        return int(x)

    results = map_in_processes(fn, [("3",), ("1",), ("2",)], jobs=1)
    assert seen == []  # nothing runs before the first result is asked for
    assert list(results) == [3, 1, 2] and seen == ["3", "1", "2"]


def test_jobs_run_in_other_processes_with_their_share_of_threads() -> None:
    pids = list(map_in_processes(os.getpid, [()] * 3, jobs=2))
    assert len(pids) == 3 and os.getpid() not in pids
    threads = list(map_in_processes(torch.get_num_threads, [()] * 2, jobs=2))
    assert threads == [max(1, (os.cpu_count() or 1) // 2)] * 2
    assert list(map_in_processes(int, [("7",), ("8",), ("9",)], jobs=2)) == [7, 8, 9]  # submission order


def test_a_failed_call_raises_and_jobs_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid literal"):
        list(map_in_processes(int, [("1",), ("x",)], jobs=2))
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        list(map_in_processes(int, [("1",)], jobs=0))
