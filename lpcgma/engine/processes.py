"""Several trainings at a time on one machine: each in its own spawned process, with its share of
the CPU threads (so that N jobs do not each start cpu_count() threads)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def _limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def map_in_processes(fn: Callable[..., T], calls: Iterable[tuple[Any, ...]], jobs: int) -> Iterator[T]:
    """``fn(*args)`` for each ``args`` of `calls`, in order, `jobs` at a time.

    With ``jobs == 1`` each call runs here, lazily, with every thread; otherwise in `jobs` spawned
    processes of ``cpu_count() // jobs`` torch threads each (`fn` and its arguments must pickle), all
    submitted at once and yielded in submission order. A call's exception is raised where its result
    is yielded.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs == 1:
        for args in calls:
            yield fn(*args)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, context, initializer=_limit_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        for future in futures:
            yield future.result()
