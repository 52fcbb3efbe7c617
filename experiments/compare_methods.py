"""Compare methods (or ablation variants) at the same budget over several seeds; write a markdown table.

    python experiments/compare_methods.py --config synthetic --seeds 0 1 2 --out results/synthetic.md
    python experiments/compare_methods.py --config synthetic --ablation --seeds 0 1 2 --out results/ablation.md \
        --paired-with self-training     # + each term's gain over self-training, seed by seed
    python experiments/compare_methods.py --config loveda_sample --seeds 0 1 2 --out results/cross_sensor.md
    python experiments/compare_methods.py --config synthetic --shifts 0 0.25 0.5 0.75 1 --seeds 0 \
        --only source-only self-training LPCGMA "oracle (target labels)" --plot results/shift.png \
        source_stage.enabled=true     # the shift-strength curve (one table per strength)

`method.X=…` overrides reach only the methods that have option X; `--jobs N` trains N runs at a time
(each in its own process, e.g. on a GPU machine with many cores).

Every run is a real `lpcgma.engine.trainer.Trainer` run (MLflow tracking off unless --track); the
table holds mean ± std over seeds of the final target mIoU and per-class IoU (×100), and of the mean
of each run's evaluations (a steadier estimate where single evaluations swing by points).
`--paired-with ROW` adds every row minus ROW, paired by seed: a difference counts where it is larger
than its spread over seeds. With
``source_stage.enabled=true`` (the two-stage protocol) every method of seed s starts from the source
model of seed s (trained once, cached in ``<runs-dir>/source_models`` unless ``source_stage.store`` is
set), and the table's first row is that source model itself. A run's folder
is named by a hash of its overrides and seed, so identical runs are shared between tables (the
ablation's self-training and full-LPCGMA runs are the methods table's); runs whose folder already
holds a finished `result.json` are not trained again (resumable).
Works from any folder: it imports the installed `lpcgma` package only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

from lpcgma.cli import load_cli_config
from lpcgma.config import METHOD_CONFIGS, ExperimentConfig, replace, valid_keys
from lpcgma.engine.checkpoint import drop_step_checkpoints
from lpcgma.engine.processes import map_in_processes
from lpcgma.engine.source_stage import ensure_source_model, evaluate_source_model
from lpcgma.engine.trainer import Trainer

SOURCE_MODEL_ROW = "source model (stage 1)"
EVAL_MEAN = "target_miou_eval_mean"  # a fixed model (the source model row) scores its mIoU at every evaluation

METHODS: dict[str, list[str]] = {
    "source-only": ["method.name=source_only"],
    "self-training": ["method.name=self_training"],
    "SDCA": ["method.name=sdca"],
    "BiDA": ["method.name=bida"],
    "BiDA (paper's description)": [  # where the paper and the released code (the default) differ: docs/METHODS.md
        "method.name=bida",
        "method.bida_hybrid_rule=agree",
        "method.bida_detach_prototypes=true",
        "method.bida_absent_prototypes=zero",
        "method.bida_calibration=true",
        "method.bida_entropy=target",
    ],
    "LPCGMA": ["method.name=lpcgma"],
    # the best label-free recipe on the texture-robust task (RESULTS.md, session 19): CBST's class thresholds
    # with LPCGMA's forward Gaussian alignment alone, which keeps the lowered thresholds from drifting
    "self-training + CBST + GMM forward": [
        "method.name=lpcgma",
        "method.use_pmc=false",
        "method.use_pix=false",
        "method.use_gmm_reverse=false",
        "method.pseudo_weighting=threshold",
        "method.class_thresholds=true",
    ],
    # the teacher's pseudo-labels averaged over the target crop at 0.75× and 1.5× (RESULTS.md, session 20)
    "self-training, multi-scale teacher": ["method.name=self_training", "method.teacher_scales=[0.75,1.5]"],
    "LPCGMA, multi-scale teacher": ["method.name=lpcgma", "method.teacher_scales=[0.75,1.5]"],  # session 21
    # ...with CBST's class thresholds, which let the teacher's barren labels train (RESULTS.md, session 27)
    "self-training + CBST, multi-scale teacher": [
        "method.name=self_training",
        "method.teacher_scales=[0.75,1.5]",
        "method.pseudo_weighting=threshold",
        "method.class_thresholds=true",
    ],
    "LPCGMA + CBST, multi-scale teacher": [
        "method.name=lpcgma",
        "method.teacher_scales=[0.75,1.5]",
        "method.pseudo_weighting=threshold",
        "method.class_thresholds=true",
    ],
    # the ablation's one term that helps with that teacher, alone (RESULTS.md, session 23)
    "self-training + GMM forward, multi-scale teacher": [
        "method.name=lpcgma",
        "method.use_pmc=false",
        "method.use_pix=false",
        "method.use_gmm_reverse=false",
        "method.teacher_scales=[0.75,1.5]",
    ],
    # ...with PMC on labelled anchors only (threshold 1: the source batch and ClassMix's pasted source
    # pixels), the labelled anchor the forward term needs to stop losing (RESULTS.md, session 25)
    "self-training + source-anchor PMC + GMM forward, multi-scale teacher": [
        "method.name=lpcgma",
        "method.use_pix=false",
        "method.use_gmm_reverse=false",
        "method.pmc_target_threshold=1.0",
        "method.teacher_scales=[0.75,1.5]",
    ],
    "oracle (target labels)": ["method.name=oracle"],
}
_OFF = ["method.use_pmc=false", "method.use_pix=false", "method.use_gmm_forward=false", "method.use_gmm_reverse=false"]
ABLATION: dict[str, list[str]] = {
    "self-training": ["method.name=self_training"],
    "+ PMC": ["method.name=lpcgma", *_OFF[1:]],
    "+ PMC + PIX": ["method.name=lpcgma", *_OFF[2:]],
    "+ PMC + PIX + GMM forward": ["method.name=lpcgma", _OFF[3]],
    "+ reverse (full LPCGMA)": ["method.name=lpcgma"],
}


def run_dir(base: Path, overrides: list[str], seed: int) -> Path:
    """The run folder of one (overrides, seed): the same runs share a folder whatever the table."""
    key = hashlib.sha1(json.dumps(sorted(overrides)).encode()).hexdigest()[:12]
    return base / f"{key}-s{seed}"


def applicable(common: list[str], variant: list[str]) -> tuple[list[str], list[str]]:
    """Split the common overrides into those the variant's method has and the `method.*` ones it lacks.

    A `method.X=…` override applies to the methods that have option X (e.g. `method.gmm_warmup_iters`
    only to LPCGMA), so one command can set a method's options without breaking the others' runs.
    """
    name = next((o.split("=", 1)[1] for o in variant if o.startswith("method.name=")), None)
    if name is None or name not in METHOD_CONFIGS:
        return common, []
    known = set(valid_keys(name))
    kept = [o for o in common if not o.startswith("method.") or o.split("=", 1)[0] in known]
    return kept, [o for o in common if o not in kept]


def run_variant(config: str, overrides: list[str], seed: int, out_dir: Path, track: bool) -> dict[str, float]:
    """Train one (variant, seed) to the end, or read its stored result."""
    done = out_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())  # type: ignore[no-any-return]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "variant.json").write_text(json.dumps({"config": config, "overrides": overrides, "seed": seed}))
    cfg = load_cli_config(
        config,
        [
            *overrides,
            f"train.seed={seed}",
            f"train.out_dir={out_dir}",
            f"tracking.enabled={str(track).lower()}",
            "train.progress=false",
        ],
    )
    callbacks = []
    if track:
        from lpcgma.tracking.runs import MLflowCallback

        callbacks.append(MLflowCallback(cfg))
    t0 = time.perf_counter()
    result = Trainer(cfg, callbacks).fit()
    metrics = {k: v for k, v in result.final_metrics.items() if k.startswith("target_")}
    metrics["wall_s"] = time.perf_counter() - t0
    done.write_text(json.dumps(metrics))
    drop_step_checkpoints(out_dir / "checkpoints")  # finished: its result is read back, best/ is kept
    return metrics


def source_model_rows(cfg: ExperimentConfig, seeds: list[int]) -> list[dict[str, float]]:
    """The target metrics of each seed's shared source model (trained first when missing)."""
    rows = []
    for seed in seeds:
        seeded = replace(cfg, {"train.seed": seed})
        model = ensure_source_model(seeded)
        metrics = {k: v for k, v in evaluate_source_model(seeded, model).items() if k.startswith("target_")}
        print(f"{SOURCE_MODEL_ROW:32s} seed {seed}: target mIoU {100 * metrics['target_miou']:.1f} ({model.key})")
        wall_s = float(model.manifest.get("train_seconds", 0.0))
        rows.append({**metrics, EVAL_MEAN: metrics["target_miou"], "wall_s": wall_s})
    return rows


def evaluation_mean(out_dir: Path) -> float:
    """The mean target mIoU over a run's evaluations (metrics.jsonl; a step evaluated again after a resume
    counts once, its last record): less noisy than the last evaluation alone."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r["target_miou"] for r in records if "target_miou" in r}
    if not by_step:
        raise ValueError(f"{out_dir / 'metrics.jsonl'}: no evaluation (target_miou) recorded")
    return statistics.mean(by_step.values())


def _cell(values: list[float], signed: bool = False) -> str:
    """mean ± std (×100) of a list of fractions (with its sign: a difference)."""
    vals = [100 * v for v in values]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):{'+' if signed else ''}.1f} ± {sd:.1f}"


def table(results: dict[str, list[dict[str, float]]], class_names: list[str]) -> str:
    """Markdown: one row per variant, mIoU (last and mean of evaluations) and per-class IoU, mean ± std (×100)."""
    head = ["method", "mIoU", "mIoU, mean of evaluations", *class_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        row = [name, _cell([r["target_miou"] for r in runs]), _cell([r[EVAL_MEAN] for r in runs])]
        row += [_cell([r.get(f"target_iou/{c}", 0.0) for r in runs]) for c in class_names]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def paired_table(results: dict[str, list[dict[str, float]]], seeds: list[int], baseline: str) -> str:
    """Markdown: each row minus `baseline`, paired by seed (mean ± std, and on how many seeds it is > 0)."""

    def diff(name: str, key: str) -> str:
        deltas = [r[key] - b[key] for r, b in zip(results[name], results[baseline], strict=True)]
        per_seed = ", ".join(f"{100 * d:+.1f}" for d in deltas)
        return f"{_cell(deltas, signed=True)} ({per_seed}; > 0 on {sum(d > 0 for d in deltas)} of {len(deltas)})"

    lines = [f"Paired by seed ({', '.join(map(str, seeds))}) against **{baseline}**:", "",
             "| method | Δ mIoU | Δ mIoU, mean of evaluations |", "|---|---|---|"]  # fmt: skip
    others = [name for name in results if name != baseline]
    lines += [f"| {name} | {diff(name, 'target_miou')} | {diff(name, EVAL_MEAN)} |" for name in others]
    return "\n".join(lines)


def section(
    shift: float | None, rows: dict[str, list[dict[str, float]]], names: list[str], seeds: list[int], paired: str | None
) -> str:
    """One table (of one shift strength, if any), with its paired differences when `paired` names a row."""
    text = table(rows, names) + (f"\n\n{paired_table(rows, seeds, paired)}" if paired else "")
    return f"### data.synthetic_shift = {shift:g}\n\n{text}" if shift is not None else text


def curve_table(curve: dict[float, dict[str, list[dict[str, float]]]]) -> str:
    """Markdown: one row per shift strength, one column per variant, target mIoU mean ± std (×100)."""
    names = list(next(iter(curve.values())))
    lines = ["| shift | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for shift, results in curve.items():
        cells = []
        for name in names:
            vals = [100 * r["target_miou"] for r in results.get(name, [])]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}" if vals else "-")
        lines.append(f"| {shift:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_figure(curve: dict[float, dict[str, list[dict[str, float]]]], path: Path) -> None:
    """Target mIoU against shift strength, one line per variant (mean, error bars = std over seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shifts = list(curve)
    for name in next(iter(curve.values())):
        runs = [[100 * r["target_miou"] for r in curve[s].get(name, [])] for s in shifts]
        means = [statistics.mean(v) if v else float("nan") for v in runs]
        sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in runs]
        ax.errorbar(shifts, means, yerr=sds, marker="o", capsize=3, label=name)
    ax.set_xlabel("data.synthetic_shift (0 = the source's look and layouts, 1 = full shift)")
    ax.set_ylabel("target mIoU (%)")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def arg_parser() -> argparse.ArgumentParser:
    """The command line (checked in `main` before anything trains)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="synthetic", help="config file or packaged config name")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ablation", action="store_true", help="the LPCGMA ablation instead of the methods")
    p.add_argument("--only", nargs="*", help="run only these variants (names as in the table)")
    p.add_argument("--shifts", type=float, nargs="*", help="one table per data.synthetic_shift + the curve")
    p.add_argument("--plot", help="with --shifts: write the curve (PNG) here")
    p.add_argument("--runs-dir", default="runs/compare", help="where each run's folder goes")
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--track", action="store_true", help="also log every run to MLflow")
    p.add_argument("--paired-with", help="also tabulate every row minus this one, paired by seed (a row's name)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at a time, each in its own process")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run (same budget for all)")
    return p


def main() -> None:
    p = arg_parser()
    args = p.parse_args()
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.shifts and not all(0 <= s <= 1 for s in args.shifts):
        p.error(f"--shifts must lie in [0, 1], got {args.shifts}")

    variants = ABLATION if args.ablation else METHODS
    if args.only:
        unknown = set(args.only) - set(variants)
        if unknown:
            p.error(f"unknown variants {sorted(unknown)}; choose from {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.only}
    if args.paired_with and args.paired_with not in [*variants, SOURCE_MODEL_ROW]:
        p.error(f"--paired-with {args.paired_with!r} is not a compared row; choose from {list(variants)}")
    unused = set(args.overrides).intersection(*(applicable(args.overrides, v)[1] for v in variants.values()))
    if unused:
        p.error(f"no compared method has the option(s) {sorted(unused)}")
    cmd = "python experiments/compare_methods.py " + " ".join(
        [f"--config {args.config}", "--seeds " + " ".join(map(str, args.seeds))]
        + (["--ablation"] if args.ablation else [])
        + (["--shifts " + " ".join(f"{s:g}" for s in args.shifts)] if args.shifts else [])
        + ([f"--paired-with {args.paired_with!r}"] if args.paired_with else [])
        + args.overrides
    )
    base = Path(args.runs_dir) / Path(args.config).stem
    common_cfg = load_cli_config(args.config, [o for o in args.overrides if not o.startswith("method.")])
    if args.paired_with == SOURCE_MODEL_ROW and not common_cfg.source_stage.enabled:
        p.error(f"--paired-with {SOURCE_MODEL_ROW!r} needs source_stage.enabled=true (the row exists only then)")
    overrides = list(args.overrides)
    if common_cfg.source_stage.enabled and not common_cfg.source_stage.store:
        store = f"source_stage.store={(Path(args.runs_dir) / 'source_models').resolve()}"
        overrides.append(store)
        common_cfg = replace(common_cfg, dict([store.split("=", 1)]))
    shifts: list[float | None] = list(args.shifts) if args.shifts else [None]
    per_shift = {s: [f"data.synthetic_shift={s}"] if s is not None else [] for s in shifts}
    runs: list[tuple[float | None, str, int, list[str]]] = []
    for name, variant in variants.items():
        common, dropped = applicable(overrides, variant)
        if dropped:
            print(f"{name}: not applied (its method has no such option): {' '.join(dropped)}", flush=True)
        runs += [(s, name, seed, [*common, *per_shift[s], *variant]) for s in shifts for seed in args.seeds]

    results: dict[float | None, dict[str, list[dict[str, float]]]] = {s: {} for s in shifts}
    if common_cfg.source_stage.enabled:  # before the runs, so that parallel jobs find them in the store
        for s in shifts:
            shifted = replace(common_cfg, {"data.synthetic_shift": s}) if s is not None else common_cfg
            results[s][SOURCE_MODEL_ROW] = source_model_rows(shifted, args.seeds)
    calls = [(args.config, ovr, seed, run_dir(base, ovr, seed), args.track) for _, _, seed, ovr in runs]
    trained = map_in_processes(run_variant, calls, args.jobs)
    for call, (s, name, seed, _), metrics in zip(calls, runs, trained, strict=True):
        metrics = {**metrics, EVAL_MEAN: evaluation_mean(call[3])}
        results[s].setdefault(name, []).append(metrics)
        at = f" at shift {s:g}" if s is not None else ""
        miou = 100 * metrics["target_miou"]
        print(f"{name:32s} seed {seed}{at}: target mIoU {miou:.1f} ({metrics['wall_s']:.0f} s)", flush=True)
    from lpcgma.data.build import build_datasets

    names = list(build_datasets(common_cfg.data).classes.names)
    parts = [section(s, r, names, args.seeds, args.paired_with) for s, r in results.items()]
    if args.shifts:
        curve = {s: r for s, r in results.items() if s is not None}
        parts.insert(0, "### Target mIoU against shift strength\n\n" + curve_table(curve))
        if args.plot:
            curve_figure(curve, Path(args.plot))
    text = "\n\n".join(parts) + f"\n\nCommand: `{cmd}`\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
