#!/usr/bin/env python
"""Which label-free criterion would have picked good hyperparameters? A study over a search's trials.

    python experiments/selection_study.py --experiment runs/tune/NAME --out results/selection  # a finished search
    python experiments/selection_study.py --run --num-samples 24 --out results/selection        # search, then analyse
    python experiments/selection_study.py --run --smoke-test --out /tmp/selection                # a tiny check
    python experiments/selection_study.py --run --runner local --jobs 8 --config loveda_sample --out results/x  # no Ray

For each criterion of `lpcgma.engine.label_free.CRITERIA` (target mIoU excepted: it is the truth),
over the trials of a Tune search: Spearman's ρ and Kendall's τ between the criterion at each
trial's last evaluation, sign-adjusted by its mode (so that higher is better and ρ = 1 ranks the
trials exactly as target mIoU does), and that trial's target mIoU at the same evaluation; and the
target mIoU of the trial the criterion would pick against the best trial's (the regret). Writes
``selection_study.md`` (the table) and ``selection_study.png`` (criterion vs target mIoU, one panel
per criterion) into ``--out``.

``--experiment`` reads the trials' ``result.json`` files of a local Tune experiment folder
(``<storage>/<name>``); the search must have target labels and report the criteria (any
``lpcgma tune`` search with the default ``train.label_free_tiles`` does). ``--run`` first runs the
synthetic LPCGMA search of ``experiments/tune_synthetic.py`` (same trial sizes and search space)
with objective target_miou, random sampling (or TPE: ``--sampler tpe``) and no early stopping, so
that every trial is compared at its last step. Positional ``key=value`` overrides go to its base
config (e.g. ``train.iters=400``). ``--runner local`` runs the same study without Ray
(`lpcgma.engine.sweep`: random points, the defaults first, ``--jobs`` trainings at a time, an
optional ``--budget-s`` deadline; e.g. on a GPU machine with torch only), and ``--config`` /
``--search-space`` pick another task (the synthetic demo's trial sizes apply to ``synthetic`` only).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lpcgma.distributed.trial_results import read_trial_rows
from lpcgma.engine.label_free import CRITERIA, Criterion

TRUTH = "target_miou"


@dataclass(frozen=True)
class TrialPoint:
    """One trial at its last evaluation."""

    trial_id: str
    step: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class CriterionResult:
    """How well one criterion ranks and picks trials, judged by target mIoU."""

    name: str
    metric: str
    mode: str
    trials: int  # trials that report both the criterion and the truth
    spearman: float  # of the sign-adjusted criterion with the truth (NaN below 2 trials or for constant values)
    kendall: float
    picked: str | None  # the trial the criterion picks
    picked_truth: float  # its target mIoU
    best_truth: float  # the best trial's target mIoU (of all trials)

    @property
    def regret(self) -> float:
        return self.best_truth - self.picked_truth


# ---------------------------------------------------------------------------------------- reading
def read_trials(experiment: str | Path, step: int | None = None) -> list[TrialPoint]:
    """Every trial of a local Tune experiment folder (``*/result.json``) at its last reported row, or
    at its row of evaluation step `step` (trials that did not reach it are left out)."""
    points = []
    for trial_id, rows in read_trial_rows(experiment).items():
        row = rows[-1] if step is None else next((r for r in rows if r.get("step") == step), None)
        if row is not None:
            points.append(TrialPoint(trial_id, int(row.get("step", -1)), row))
    return points


# ---------------------------------------------------------------------------------------- analysis
def _finite(metrics: Mapping[str, float], key: str) -> bool:
    return key in metrics and math.isfinite(metrics[key])


def _rank_correlations(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(Spearman ρ, Kendall τ); NaN when fewer than 2 points or either side is constant."""
    from scipy.stats import kendalltau, spearmanr

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, math.nan
    return float(spearmanr(x, y).statistic), float(kendalltau(x, y).statistic)


def analyse(
    points: Sequence[TrialPoint], criteria: Mapping[str, Criterion] = CRITERIA, truth: str = TRUTH
) -> list[CriterionResult]:
    """Rank correlation with `truth` and the pick of every criterion (but `truth` itself) over `points`."""
    best_truth = max((p.metrics[truth] for p in points if _finite(p.metrics, truth)), default=math.nan)
    out = []
    for name, (metric, mode) in criteria.items():
        if metric == truth:
            continue
        sign = 1.0 if mode == "max" else -1.0
        scored = [p for p in points if _finite(p.metrics, metric) and _finite(p.metrics, truth)]
        x = [sign * p.metrics[metric] for p in scored]
        y = [p.metrics[truth] for p in scored]
        rho, tau = _rank_correlations(x, y)
        picked = max(zip(x, scored, strict=True), key=lambda pair: pair[0])[1] if scored else None
        out.append(
            CriterionResult(
                name,
                metric,
                mode,
                len(scored),
                rho,
                tau,
                picked.trial_id if picked else None,
                picked.metrics[truth] if picked else math.nan,
                best_truth,
            )
        )
    return out


# ---------------------------------------------------------------------------------------- output
def _num(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.3f}"


def markdown(results: Sequence[CriterionResult], points: Sequence[TrialPoint], source: str, truth: str = TRUTH) -> str:
    """The study's table, best-correlated criterion first."""
    steps = sorted({p.step for p in points})
    best = max((p for p in points if _finite(p.metrics, truth)), key=lambda p: p.metrics[truth], default=None)
    lines = [
        f"# Label-free model selection: {source}",
        "",
        f"{len(points)} trials, each at its last evaluation (step {', '.join(map(str, steps))}); "
        f"truth: {truth}" + (f" (best: trial {best.trial_id}, {best.metrics[truth]:.4f})." if best else "."),
        "ρ, τ: Spearman and Kendall rank correlation of the criterion, sign-adjusted by its mode (higher = better),",
        f"with {truth} over the trials (1: ranks them as {truth} does). Picked: the trial the criterion",
        f"selects; regret: best − picked {truth}.",
        "",
        f"| criterion | metric | mode | trials | Spearman ρ | Kendall τ | picked trial | its {truth} | regret |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ranked = sorted(results, key=lambda r: math.inf if math.isnan(r.spearman) else -r.spearman)
    for r in ranked:
        lines.append(
            f"| {r.name} | {r.metric} | {r.mode} | {r.trials} | {_num(r.spearman)} | {_num(r.kendall)} | "
            f"{r.picked or '–'} | {_num(r.picked_truth)} | {_num(r.regret)} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: Sequence[CriterionResult], points: Sequence[TrialPoint], path: Path, truth: str = TRUTH) -> Path:
    """One scatter per criterion (its value vs `truth`), the picked trial ringed, the best starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = max(1, math.ceil(len(results) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    best = max((p for p in points if _finite(p.metrics, truth)), key=lambda p: p.metrics[truth], default=None)
    for ax, r in zip(axes.flat, results, strict=False):
        scored = [p for p in points if _finite(p.metrics, r.metric) and _finite(p.metrics, truth)]
        ax.scatter([p.metrics[r.metric] for p in scored], [p.metrics[truth] for p in scored], s=18, color="tab:blue")
        for p in scored:
            if p.trial_id == r.picked:
                ax.scatter(p.metrics[r.metric], p.metrics[truth], s=120, facecolors="none", edgecolors="tab:red")
            if best is not None and p.trial_id == best.trial_id:
                ax.scatter(p.metrics[r.metric], p.metrics[truth], s=90, marker="*", color="gold", edgecolors="k")
        ax.set_title(f"{r.name}: ρ={_num(r.spearman)}, τ={_num(r.kendall)}", fontsize=10)
        ax.set_xlabel(f"{r.metric} ({'higher' if r.mode == 'max' else 'lower'} is better)", fontsize=8)
        ax.set_ylabel(truth, fontsize=8)
    for ax in list(axes.flat)[len(results) :]:
        ax.axis("off")
    fig.suptitle("criterion vs target mIoU per trial (red ring: picked; star: best)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def common_steps(experiment: str | Path) -> list[int]:
    """The evaluation steps every trial of `experiment` reported, in order."""
    rows = read_trial_rows(experiment).values()
    steps = [{int(r["step"]) for r in trial if "step" in r} for trial in rows]
    return sorted(set.intersection(*steps)) if steps else []


def stability(experiment: str | Path, truth: str = TRUTH) -> str:
    """Markdown: each criterion's Spearman ρ at every evaluation all trials reached (is its ranking
    stable along training?), with the best and worst trial's `truth` at each step."""
    steps = common_steps(experiment)
    per_step = {step: read_trials(experiment, step) for step in steps}
    results = {step: {r.name: r for r in analyse(points, truth=truth)} for step, points in per_step.items()}
    names = list(results[steps[0]]) if steps else []
    lines = [
        f"Spearman ρ with {truth} at each evaluation every trial reached (sign-adjusted; + = ranks like the truth):",
        "",
        "| criterion | " + " | ".join(f"step {s}" for s in steps) + " | positive at |",
        "|---|" + "---|" * (len(steps) + 1),
    ]
    for name in names:
        rhos = [results[s][name].spearman for s in steps]
        positive = sum(1 for r in rhos if r > 0)
        lines.append(f"| {name} | " + " | ".join(_num(r) for r in rhos) + f" | {positive} of {len(steps)} |")
    for label, pick in (("best", max), ("worst", min)):
        values = [pick(p.metrics[truth] for p in per_step[s] if _finite(p.metrics, truth)) for s in steps]
        lines.append(f"| *{label} trial's {truth}* | " + " | ".join(_num(v) for v in values) + " | |")
    return "\n".join(lines) + "\n"


def write_study(experiment: str | Path, out: str | Path, step: int | None = None) -> tuple[Path, Path]:
    """Analyse the search at `experiment` (at evaluation `step`, default each trial's last); write the
    markdown table (with the criteria's ρ at every common evaluation when there are several) and the
    plot into `out`."""
    points = read_trials(experiment, step)
    if not points:
        raise SystemExit(f"no trial of '{experiment}' reported evaluation step {step}")
    results = analyse(points)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "selection_study.md"
    text = markdown(results, points, str(experiment))
    if len(common_steps(experiment)) > 1:
        text += "\n" + stability(experiment)
    table.write_text(text)
    return table, plot(results, points, out / "selection_study.png")


# ---------------------------------------------------------------------------------------- the search
def run_synthetic_search(args: argparse.Namespace) -> Path:
    """The synthetic LPCGMA search of experiments/tune_synthetic.py, objective target_miou, no early stopping."""
    from lpcgma.distributed.search import evaluations_per_trial, resolve_base, run_search
    from lpcgma.distributed.search_mlflow import mlflow_hooks
    from lpcgma.distributed.search_types import SearchSettings

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo's trial sizes live beside this script
    from tune_synthetic import DEMO_OVERRIDES

    settings = SearchSettings(
        config="synthetic",
        search_space="synthetic",
        overrides=["method.name=lpcgma", *(() if args.smoke_test else DEMO_OVERRIDES), *args.overrides],
        num_samples=args.num_samples,
        objective=TRUTH,
        mode="max",
        storage=args.storage,
        name=args.name or f"selection_study_{time.strftime('%Y%m%d-%H%M%S')}",
        seed=args.seed,
        n_startup_trials=args.num_samples if args.sampler == "random" else None,  # TPE's start-up = random
        smoke_test=args.smoke_test,
        num_cpus=args.num_cpus,
    )
    settings.grace_period = evaluations_per_trial(resolve_base(settings))  # ASHA then stops no trial early
    outcome = run_search(settings, *mlflow_hooks())
    if not outcome.complete:
        raise SystemExit(f"the search was interrupted; analyse what it has with --experiment {outcome.experiment_path}")
    return Path(outcome.experiment_path)


def run_local_sweep(args: argparse.Namespace) -> Path:
    """The same study without Ray: random points (the defaults first), every trial trained to the end."""
    from lpcgma.engine.sweep import run_sweep

    demo: Sequence[str] = ()
    if args.config == "synthetic" and not args.smoke_test:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from tune_synthetic import DEMO_OVERRIDES

        demo = DEMO_OVERRIDES
    smoke = (
        ("train.iters=4", "train.eval_every=2", "train.checkpoint_every=2", "data.crop_size=32")
        if args.smoke_test
        else ()
    )
    experiment = Path(args.storage) / (args.name or f"selection_study_{time.strftime('%Y%m%d-%H%M%S')}")
    run_sweep(
        args.config,
        ["method.name=lpcgma", *demo, *smoke, *args.overrides],
        args.search_space,
        args.num_samples,
        experiment,
        seed=args.seed,
        jobs=args.jobs,
        budget_s=args.budget_s,
    )
    return experiment


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--experiment", help="a finished local Tune experiment folder (<storage>/<name>)")
    source.add_argument("--run", action="store_true", help="run the synthetic search first, then analyse it")
    p.add_argument("--out", default="selection_study", help="output folder (default: selection_study)")
    p.add_argument("--num-samples", type=int, default=24, help="--run: trials (default: 24)")
    p.add_argument("--sampler", choices=["random", "tpe"], default="random", help="--run: how configs are drawn")
    p.add_argument("--storage", default="runs/tune", help="--run: Tune storage folder (default: runs/tune)")
    p.add_argument("--name", default="", help="--run: search name (default: selection_study_<time>)")
    p.add_argument("--seed", type=int, default=0, help="--run: sampler seed")
    p.add_argument("--num-cpus", type=int, default=None, help="--run: CPUs for Ray (default: all)")
    p.add_argument("--smoke-test", action="store_true", help="--run: a few tiny trials")
    p.add_argument("--step", type=int, default=None, help="compare trials at this evaluation step (default: last)")
    p.add_argument("--no-analysis", action="store_true", help="--run: train only (analyse later with --experiment)")
    p.add_argument("--runner", choices=["ray", "local"], default="ray", help="--run: Ray Tune or the Ray-free sweep")
    p.add_argument("--config", default="synthetic", help="--run --runner local: base config (default: synthetic)")
    p.add_argument(
        "--search-space", default="synthetic", help="--run --runner local: search space (default: synthetic)"
    )
    p.add_argument("--jobs", type=int, default=1, help="--run --runner local: trainings at a time")
    p.add_argument("--budget-s", type=float, default=None, help="--run --runner local: stop after this many seconds")
    p.add_argument("overrides", nargs="*", help="--run: base-config overrides, e.g. train.iters=400")
    args = p.parse_args(argv)
    if not args.run:
        experiment = Path(args.experiment)
    elif args.runner == "local":
        experiment = run_local_sweep(args)
    else:
        experiment = run_synthetic_search(args)
    if args.no_analysis:
        print(f"trained; analyse with --experiment {experiment}")
        return 0
    table, figure = write_study(experiment, args.out, args.step)
    print(table.read_text())
    print(f"wrote {table} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
