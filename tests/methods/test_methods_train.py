"""Every method trains end to end on the synthetic benchmark (tiny sizes) through the real trainer."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_config import tiny_overrides

from lpcgma.config import METHOD_CONFIGS, load_config
from lpcgma.data.build import build_datasets
from lpcgma.data.classes import IGNORE_INDEX
from lpcgma.engine.checkpoint import is_model_only, read_checkpoint
from lpcgma.engine.trainer import Callback, EvalReport, NonFiniteLossError, Trainer
from lpcgma.methods import build_method

TINY = tiny_overrides("tracking.enabled=false", iters=6, every=3, log_every=2)
CONFIG = Path(__file__).resolve().parents[2] / "lpcgma" / "configs" / "synthetic.yaml"


def tiny_config(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(CONFIG, [*TINY, f"train.out_dir={tmp_path / 'run'}", *extra])


METHOD_EXTRAS = {
    "lpcgma": [
        "method.gmm_warmup_iters=2",
        "method.gmm_refit_every=2",
        "method.gaussians_per_class=2",
        "method.gmm_memory_per_class=64",
        "method.pix_pixels=64",
    ],
    "sdca": ["method.sdca_init_batches=1"],
}


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_method_trains_end_to_end(method: str, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, f"method.name={method}", *METHOD_EXTRAS.get(method, []))
    result = Trainer(cfg).fit()
    assert result.step == 6
    assert 0.0 <= result.final_metrics["target_miou"] <= 1.0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/total"] for r in lines if "loss/total" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert result.best_checkpoint is not None and (result.best_checkpoint / "state.pt").is_file()
    best, last = read_checkpoint(result.best_checkpoint), read_checkpoint(result.last_checkpoint)
    assert is_model_only(best["method"]) and "optimizer" not in best  # best/ is the model; step_*/ resume
    assert "optimizer" in last and "rng" in last


BIDA_PAPER = [  # the paper's description where the released code (the default) differs
    "method.bida_detach_prototypes=true",
    "method.bida_absent_prototypes=zero",
    "method.bida_hybrid_rule=agree",
    "method.bida_calibration=true",
    "method.bida_entropy=target",
]


def test_bida_defaults_follow_the_released_code_and_the_paper_variant_trains(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "method.name=bida")
    assert Trainer(cfg).fit().step == 6
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    entropy = [r["loss/entropy"] for r in lines if "loss/entropy" in r]
    c = len(build_datasets(cfg.data).classes.names)
    # H_s + 0.3·H_t of log_softmax(softmax): each H lies in [log(1 + (C − 1)/e), log C]
    low, high = 1.3 * math.log(1 + (c - 1) / math.e), 1.3 * math.log(c)
    assert entropy and all(low - 1e-6 <= v <= high + 1e-6 for v in entropy)
    assert all(r["pseudo/hybrid_frac"] == 1.0 for r in lines if "pseudo/hybrid_frac" in r)  # static: every pixel
    paper = tiny_config(tmp_path / "paper", "method.name=bida", *BIDA_PAPER)
    assert Trainer(paper).fit().step == 6
    rows = [json.loads(x) for x in (tmp_path / "paper" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["loss/entropy"] <= 1.0 for r in rows if "loss/entropy" in r)  # normalised target entropy


@pytest.mark.parametrize("method", ["self_training", "lpcgma", "sdca", "bida"])
def test_uda_methods_report_pseudo_label_diagnostics(method: str, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, f"method.name={method}", *METHOD_EXTRAS.get(method, []))
    result = Trainer(cfg).fit()
    m = result.final_metrics
    names = build_datasets(cfg.data).classes.names
    shares = [m[f"pseudo/label_share/{c}"] for c in names]
    assert sum(shares) == pytest.approx(1.0) and sum(m[f"pseudo/true_share/{c}"] for c in names) == pytest.approx(1.0)
    assert 0.0 <= m["pseudo/accuracy"] <= 1.0 and 0.0 <= m["pseudo/confident_frac"] <= 1.0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("pseudo/miou" in r for r in records) == 2  # one report per evaluation
    # pseudo_confusion.jsonl: the counts behind each report (same step, same accuracy and shares)
    matrices = [json.loads(x) for x in (tmp_path / "run" / "pseudo_confusion.jsonl").read_text().splitlines()]
    reports = [r for r in records if "pseudo/miou" in r]
    assert [x["step"] for x in matrices] == [r["step"] for r in reports] and matrices[0]["classes"] == list(names)
    for counts, report in zip(matrices, reports, strict=True):
        every, confident = np.array(counts["every"]), np.array(counts["confident"])
        assert every.shape == (len(names), len(names)) and (confident <= every).all()
        assert np.trace(every) / every.sum() == pytest.approx(report["pseudo/accuracy"])
        assert confident.sum() / every.sum() == pytest.approx(report["pseudo/confident_frac"])
        assert every.sum(0)[0] / every.sum() == pytest.approx(report[f"pseudo/label_share/{names[0]}"])
    unlabelled = tiny_config(
        tmp_path / "u",
        f"method.name={method}",
        "data.target_labels=false",
        "train.select_by=source_miou",
        *METHOD_EXTRAS.get(method, []),
    )
    assert not any(k.startswith("pseudo/label_share") for k in Trainer(unlabelled).fit().final_metrics)
    assert not (tmp_path / "u" / "run" / "pseudo_confusion.jsonl").exists()


def test_lpcgma_logs_every_term_and_diagnostics(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "method.name=lpcgma", *METHOD_EXTRAS["lpcgma"])
    result = Trainer(cfg).fit()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*records)
    assert {"loss/pmc", "loss/pix", "loss/gmm_fwd"} <= keys
    assert any(k.startswith("diag/keep_rate/") for k in result.final_metrics)
    assert {"diag/gmm_src_loglik", "diag/gmm_tgt_loglik", "diag/gmm_tgt_intra_var"} <= set(result.final_metrics)


def test_ablation_switches_remove_terms(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "method.name=lpcgma",
        "method.use_pmc=false",
        "method.use_pix=false",
        "method.use_gmm_forward=false",
        "method.use_gmm_reverse=false",
    )
    Trainer(cfg).fit()
    keys = set().union(*[json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()])
    assert not {"loss/pmc", "loss/pix", "loss/gmm_fwd"} & keys


@pytest.mark.parametrize(
    ("extra", "warned"),
    [
        ([], True),  # the default warm-up (1000) is longer than the run (6 steps)
        (["method.gmm_warmup_iters=2"], False),
        (["method.use_gmm_forward=false", "method.use_gmm_reverse=false"], False),
    ],
)
def test_lpcgma_warns_when_its_gaussian_terms_would_never_run(
    extra: list[str], warned: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(tmp_path, "method.name=lpcgma", *extra)
    with caplog.at_level("WARNING", logger="lpcgma.methods.lpcgma"):
        build_method(cfg, ["a", "b", "c"])
    assert any("method.gmm_warmup_iters=1000 >= train.iters=6" in r.getMessage() for r in caplog.records) == warned


@pytest.mark.parametrize(
    ("pix_strong_grad", "memory", "student_grad_passes", "teacher_passes"),
    [("true", "teacher", 3, 1), ("false", "student", 2, 1)],
)
def test_lpcgma_cost_options_drop_a_backward_and_the_teacher_source_pass(
    pix_strong_grad: str, memory: str, student_grad_passes: int, teacher_passes: int, tmp_path: Path
) -> None:
    cfg = tiny_config(
        tmp_path,
        "method.name=lpcgma",
        *METHOD_EXTRAS["lpcgma"],
        f"method.pix_strong_grad={pix_strong_grad}",
        f"method.gmm_memory_features={memory}",
    )
    trainer = Trainer(cfg)
    method = trainer.method
    assert method.teacher is not None
    student_calls: list[bool] = []
    teacher_calls: list[bool] = []  # (the teacher's parameters never require gradients)
    method.student.register_forward_pre_hook(lambda *_: student_calls.append(torch.is_grad_enabled()))
    method.teacher.register_forward_pre_hook(lambda *_: teacher_calls.append(torch.is_grad_enabled()))
    src_it, tgt_it = trainer.streams()
    pushed = []
    for _ in range(3):
        student_calls.clear()
        teacher_calls.clear()
        logs = trainer.run_step(next(src_it), next(tgt_it))
        trainer.step += 1
        assert math.isfinite(float(logs["loss/pix"]))
        # source, (mixed) target, strong view: all three with gradient, or the strong view without
        assert student_calls.count(True) == student_grad_passes and len(student_calls) == 3
        # one teacher pass: the clean target's pseudo-labels, with (teacher memory) the source batch in it
        assert len(teacher_calls) == teacher_passes
        pushed.append(int(method.prototypes.count.sum()))
    assert pushed[0] > 0 and pushed == sorted(pushed)  # the memory fills either way
    assert bool(method.prototypes.fitted)


class _CrashAfter(Callback):
    """Raises after the evaluation/checkpoint of `step`, as a killed process would stop."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_eval(self, report: EvalReport) -> None:
        if report.step == self.step:
            raise KeyboardInterrupt


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    full = Trainer(tiny_config(tmp_path / "a", "method.name=self_training")).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(tmp_path / "b", "method.name=self_training"), [_CrashAfter(3)]).fit()
    resumed = Trainer(tiny_config(tmp_path / "b", "method.name=self_training")).fit()
    assert resumed.final_metrics["target_miou"] == pytest.approx(full.final_metrics["target_miou"], abs=1e-6)
    assert full.last_checkpoint is not None and resumed.last_checkpoint is not None
    sa = torch.load(full.last_checkpoint / "state.pt", weights_only=True)["method"]
    sb = torch.load(resumed.last_checkpoint / "state.pt", weights_only=True)["method"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "method.name=source_only", "optim.lr=1e30", "optim.warmup_iters=0")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step"):
        Trainer(cfg).fit()


class _WithoutClass(torch.utils.data.Dataset):
    """A labelled dataset whose masks never show class `absent` (its pixels become ignore)."""

    def __init__(self, dataset: torch.utils.data.Dataset, absent: int) -> None:
        self.dataset, self.absent = dataset, absent

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        mask = sample["mask"].clone()
        mask[mask == self.absent] = IGNORE_INDEX
        sample["mask"] = mask
        return sample


def test_a_class_absent_from_the_source_keeps_every_loss_and_prototype_finite(tmp_path: Path) -> None:
    """LoveDA-like data where the source never shows a class the target has: the Gaussian prototypes
    keep no component for it, the contrast and alignment terms skip it, nothing becomes NaN."""
    cfg = tiny_config(tmp_path, "method.name=lpcgma", *METHOD_EXTRAS["lpcgma"])
    data = build_datasets(cfg.data)
    absent = data.classes.names.index("water")
    data = dataclasses.replace(
        data,
        source_train=_WithoutClass(data.source_train, absent),
        source_eval=_WithoutClass(data.source_eval, absent),
    )
    assert not any(bool((data.source_train[i]["mask"] == absent).any()) for i in range(len(data.source_train)))
    assert any(bool((data.target_eval[i]["mask"] == absent).any()) for i in range(len(data.target_eval)))
    result = Trainer(cfg, data=data).fit()  # a non-finite loss would raise NonFiniteLossError
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {k: v for r in records for k, v in r.items() if k.startswith("loss/")}
    assert {"loss/total", "loss/pmc", "loss/pix", "loss/gmm_fwd"} <= set(losses)
    assert all(math.isfinite(r[k]) for r in records for k in r if k.startswith("loss/"))
    assert result.last_checkpoint is not None
    state = torch.load(result.last_checkpoint / "state.pt", weights_only=True)["method"]
    nan = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and bool(v.isnan().any())]
    assert not nan, nan
    proto = {k.split("prototypes.")[-1]: v for k, v in state.items() if "prototypes." in k}
    assert bool(proto["fitted"]) and int(proto["count"][absent]) == 0 and not bool(proto["active"][absent].any())
    present = proto["active"]
    assert present.any() and bool(proto["means"][present].isfinite().all())
    assert bool(proto["variances"][present].isfinite().all()) and bool((proto["variances"][present] > 0).all())


@pytest.mark.parametrize("method", ["bida", "lpcgma", "sdca"])  # the methods with their own loss math
def test_method_steps_under_bf16_autocast(method: str, tmp_path: Path) -> None:
    """`train.amp` on a GPU runs the step in bf16 autocast; CPU autocast reproduces its dtypes here
    (BiDA's masked logits overflowed bf16 on an H200 before the losses ran in float32). Steps only:
    bf16 convolutions are ≈ 100× slower than float32 on this CPU."""
    trainer = Trainer(tiny_config(tmp_path, f"method.name={method}", *METHOD_EXTRAS.get(method, [])))
    trainer.evaluator.use_amp, trainer.evaluator.amp_dtype = True, torch.bfloat16  # what a CUDA device would set
    trainer.maybe_resume(None)  # the method's preparation pass (SDCA's statistics)
    source, target = trainer.streams()
    for _ in range(3):  # LPCGMA's Gaussian terms start at step 2
        logs = trainer.run_step(next(source), next(target))
        trainer.step += 1
        assert all(torch.isfinite(v).all() for k, v in logs.items() if k.startswith("loss/")), logs
    if method == "lpcgma":
        assert "loss/gmm_fwd" in logs


def test_best_checkpoint_is_saved_even_off_the_checkpoint_schedule(tmp_path: Path) -> None:
    """eval_every=2, checkpoint_every=3: a best evaluation at step 2 or 4 still writes checkpoints/best."""
    cfg = tiny_config(tmp_path, "method.name=source_only", "train.eval_every=2", "train.checkpoint_every=3",
                      "train.select_by=source_miou")  # fmt: skip

    class Bests(Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_eval(self, report: EvalReport) -> None:
            if report.is_best:
                assert report.best_checkpoint is not None and (report.best_checkpoint / "state.pt").is_file()
                assert int(read_checkpoint(report.best_checkpoint)["step"]) == report.step
                self.steps.append(report.step)

    bests = Bests()
    result = Trainer(cfg, [bests]).fit()
    assert bests.steps and bests.steps[0] == 2  # the first evaluation is always a best, at a non-checkpoint step
    assert result.best_checkpoint is not None
    assert int(read_checkpoint(result.best_checkpoint)["step"]) == result.best_step == bests.steps[-1]


@pytest.mark.parametrize("method", ["self_training", "lpcgma"])
def test_em_prior_pseudo_labels_train_report_and_are_checkpointed(method: str, tmp_path: Path) -> None:
    extras = ["method.pseudo_prior=em", "method.prior_momentum=0.5", *METHOD_EXTRAS.get(method, [])]
    cfg = tiny_config(tmp_path, f"method.name={method}", *extras)
    result = Trainer(cfg).fit()
    names = build_datasets(cfg.data).classes.names
    estimate = [result.final_metrics[f"prior/target/{c}"] for c in names]
    assert sum(estimate) == pytest.approx(1.0, abs=1e-4) and min(estimate) >= 0.0
    assert result.last_checkpoint is not None
    state = torch.load(result.last_checkpoint / "state.pt", weights_only=True)["method"]
    assert int(state["prior_steps"]) == 6 and state["source_prior"].sum() == pytest.approx(1.0, abs=1e-4)
    plain = Trainer(tiny_config(tmp_path / "plain", f"method.name={method}", *METHOD_EXTRAS.get(method, []))).fit()
    assert not any(k.startswith("prior/") for k in plain.final_metrics)  # the default keeps the source prior
    assert plain.last_checkpoint is not None
    assert "target_prior" not in torch.load(plain.last_checkpoint / "state.pt", weights_only=True)["method"]


@pytest.mark.parametrize("method", ["self_training", "lpcgma"])
def test_class_thresholds_train_report_and_are_checkpointed(method: str, tmp_path: Path) -> None:
    extras = ["method.class_thresholds=true", "method.class_threshold_momentum=0.5", *METHOD_EXTRAS.get(method, [])]
    extras.append("method.pseudo_weighting=threshold")
    cfg = tiny_config(tmp_path, f"method.name={method}", *extras)
    result = Trainer(cfg).fit()
    names = build_datasets(cfg.data).classes.names
    reported = [result.final_metrics[f"threshold/{c}"] for c in names]
    assert all(0.0 <= t <= cfg.method.pseudo_threshold + 1e-6 for t in reported)  # type: ignore[attr-defined]
    assert min(reported) < cfg.method.pseudo_threshold  # type: ignore[attr-defined]  # some class moved below δ
    assert result.last_checkpoint is not None
    state = torch.load(result.last_checkpoint / "state.pt", weights_only=True)["method"]
    assert state["class_threshold"].tolist() == pytest.approx(reported)


@pytest.mark.parametrize("method", ["self_training", "lpcgma"])
def test_multiscale_teacher_averages_class_probabilities_over_resized_crops(method: str, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, f"method.name={method}", "method.teacher_scales=[0.5,1.0,1.5]")
    names = build_datasets(cfg.data).classes.names
    st = build_method(cfg, names).eval()
    assert st.teacher is not None
    torch.manual_seed(0)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        logits = st.teacher(images)["logits"]
        size = logits.shape[-2:]
        by_scale = [logits.softmax(1)]
        for scale in (0.5, 1.5):
            resized = torch.nn.functional.interpolate(images, scale_factor=scale, mode="bilinear", antialias=scale < 1)
            out = torch.nn.functional.interpolate(st.teacher(resized)["logits"], size=size, mode="bilinear")
            by_scale.append(out.softmax(1))
        expected = sum(by_scale) / 3
    got = st.multiscale_teacher_logits(images, logits)
    assert got.shape == logits.shape
    assert torch.allclose(got.softmax(1), expected, atol=1e-5)  # log of the mean: softmax gives it back
    assert not torch.allclose(expected, by_scale[0], atol=1e-3)  # the other scales changed something
    one = build_method(tiny_config(tmp_path / "one", f"method.name={method}"), names)
    assert one.multiscale_teacher_logits(images, logits) is logits  # the default: one pass, untouched
    Trainer(cfg).fit()  # and it trains end to end
