"""`benchmarks/platform_overhead.py` at its tiniest size (slow: starts Ray twice): every row is
measured and the phases of the standalone, 2-rank and TorchTrainer runs add up to their wall time."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def cells(out: str, first: str) -> list[float]:
    (line,) = [x for x in out.splitlines() if x.startswith(f"| {first} |")]
    return [float(c) for c in re.findall(r"\| (-?\d+\.\d+)", line)]


def test_platform_overhead_measures_every_row_and_splits_the_time(
    ray_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # mp.spawn's ranks import it by its module name
    sys.modules.pop("platform_overhead", None)
    import platform_overhead

    assert platform_overhead.main(["--iters", "2", "--trials", "1"]) == 0
    out = capsys.readouterr().out
    table, split = out.split("### Where the time goes (s)")
    walls = {
        name: cells(table, name)[0]
        for name in (
            "standalone, 1 process",
            "Tune, 1 worker inline (1 trials in sequence; per trial)",
            "standalone, 2 ranks (torch.distributed gloo, mp.spawn)",
            "Tune + TorchTrainer, 2 workers (1 trial)",
        )
    }
    assert all(t > 0 for t in walls.values()), walls
    for name, wall in (
        ("standalone, 1 process", walls["standalone, 1 process"]),
        ("standalone, 2 ranks", walls["standalone, 2 ranks (torch.distributed gloo, mp.spawn)"]),
        ("Tune + TorchTrainer, 2 workers", walls["Tune + TorchTrainer, 2 workers (1 trial)"]),
    ):
        phases = cells(split, name)
        assert len(phases) == 3 and all(p >= 0 for p in phases), (name, phases)
        assert sum(phases) == pytest.approx(wall, abs=0.2), (name, phases, wall)  # rounded to 0.1 s each
    assert "fixed overhead of a 2-worker trial" in out
