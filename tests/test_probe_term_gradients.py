"""experiments/probe_term_gradients.py: per-term encoder gradients, their math, bad input, clean-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from script_helpers import REPO, load_script
from tiny_config import tiny_overrides

import lpcgma.methods.lpcgma as lpcgma_module

tool = load_script(REPO / "experiments" / "probe_term_gradients.py", "probe_term_gradients")


def test_term_gradients_are_norms_and_cosines_of_each_terms_gradient() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    v = torch.tensor([3.0], requires_grad=True)
    base = 3 * w[0]  # gradient (3, 0 | 0)
    terms = {"a": 4 * w[1], "b": w[0] + 2 * v[0]}  # (0, 4 | 0) and (1, 0 | 2)
    row = tool.term_gradients(base, terms, [w, v])
    assert row["grad/base"] == pytest.approx(3.0)
    assert row["grad/a"] == pytest.approx(4.0)
    assert row["cos/a"] == pytest.approx(0.0)
    assert row["grad/b"] == pytest.approx(5**0.5)
    assert row["cos/b"] == pytest.approx(3 / (3 * 5**0.5))


def test_a_parameter_off_the_graph_counts_as_zero() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    unused = torch.ones(3, requires_grad=True)
    assert tool.flat_grad((w**2).sum(), [w, unused]).tolist() == [2.0, 4.0, 0.0, 0.0, 0.0]


def test_probe_writes_a_row_per_step_and_restores_the_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    step_before = lpcgma_module.LPCGMA.train_step
    fwd_before = lpcgma_module.forward_alignment_loss
    out = tmp_path / "grads.jsonl"
    overrides = tiny_overrides(
        "method.name=lpcgma",
        "method.gmm_warmup_iters=1",
        "method.gmm_refit_every=1",
        "train.precise_bn_batches=0",
        "tracking.enabled=false",
        f"train.out_dir={tmp_path / 'run'}",
        iters=3,
        every=3,
    )
    assert tool.main([str(out), "--config", "synthetic", *overrides]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert {"grad/base", "grad/pmc", "grad/pix"} <= set(rows[0])
    assert "grad/fwd" not in rows[0] and "grad/fwd" in rows[-1]  # the forward term starts after its warm-up
    assert all(r["grad/base"] > 0 and r["grad/pix"] > 0 for r in rows)  # pmc, fwd: 0 without confident pixels
    assert all(
        r[k] >= 0 and -1 <= r[k.replace("grad", "cos")] <= 1
        for r in rows
        for k in r
        if k.startswith("grad/") and k != "grad/base"
    )
    printed = capsys.readouterr().out
    assert "all steps" in printed and "steps 16-31" not in printed  # no step in [16, 32): no line
    assert lpcgma_module.LPCGMA.train_step is step_before
    assert lpcgma_module.forward_alignment_loss is fwd_before


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        ([], "usage"),
        (["--config", "synthetic"], "usage"),
        (["out.jsonl", "--config", "synthetic", "method.name=self_training"], "method.name is 'self_training'"),
        (["out.jsonl", "--config", "synthetic", "method.lambda_fwd=-1"], "method.lambda_fwd"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tool.main([str(tmp_path / a) if a.endswith(".jsonl") else a for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()
