"""experiments/plot_pseudo_confusion.py: reads a run's pseudo_confusion.jsonl, names the errors, plots,
rejects bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_helpers import load_script

REPO = Path(__file__).resolve().parents[1]
tool = load_script(REPO / "experiments" / "plot_pseudo_confusion.py", "plot_pseudo_confusion")

NAMES = ["field", "soil", "road"]


def _write(run: Path, records: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "pseudo_confusion.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _record(step: int, confident: list[list[int]]) -> dict:
    every = [[v * 2 for v in row] for row in confident]
    return {"step": step, "classes": NAMES, "every": every, "confident": confident}


def test_summary_names_each_class_s_most_common_confident_error_and_plots(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    # step 100: field mostly right; step 200: 3 of 4 confident field pixels labelled soil
    _write(run, [_record(100, [[9, 1, 0], [0, 5, 0], [0, 0, 0]]), _record(200, [[1, 3, 0], [0, 4, 0], [2, 0, 2]])])
    out = tmp_path / "figs" / "pcm.png"
    assert tool.main([str(run), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 100: confident 50.0%; most common confident error per class: field→soil 10%"
    errors = "field→soil 75%, road→field 50%"
    assert lines[1] == f"step 200: confident 50.0%; most common confident error per class: {errors}"
    assert out.is_file() and out.stat().st_size > 10_000 and lines[-1] == f"wrote {out}"
    assert tool.main([str(run), "--out", str(out), "--steps", "200", "--all-pixels"]) == 0


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (None, [], "pseudo_confusion.jsonl: no such file"),
        ("", [], "empty"),
        ('{"step": 1, "classes": ["a", "b"], "every": [[1]], "confident": [[1]]}\n', [], "line 1: expected"),
        ("not json\n", [], "line 1: expected"),
        (json.dumps(_record(100, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])) + "\n", ["--steps", "300"], "--steps [300]"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, args, message) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "pseudo_confusion.jsonl").write_text(content)
    assert tool.main([str(run), "--out", str(tmp_path / "x.png"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not (tmp_path / "x.png").exists()
