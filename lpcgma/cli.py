"""The `lpcgma` command: train | evaluate | data (and tune | promote | predict | mlflow when built)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

from lpcgma.config import ConfigError, ExperimentConfig, load_config, resolve_config_path
from lpcgma.engine.errors import CheckpointError

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # add_subparsers()


def load_cli_config(config: str | None, overrides: Sequence[str]) -> ExperimentConfig:
    return load_config(resolve_config_path(config) if config else None, overrides)


def _source_stage_callbacks(stage: ExperimentConfig) -> list:  # type: ignore[type-arg]
    from lpcgma.tracking.runs import source_stage_callbacks

    return source_stage_callbacks(stage)  # type: ignore[return-value]


def cmd_train(args: argparse.Namespace) -> int:
    from lpcgma.engine.checkpoint import latest_checkpoint
    from lpcgma.engine.source_stage import ensure_source_model
    from lpcgma.engine.trainer import Trainer
    from lpcgma.tracking.runs import tracking_callbacks

    cfg = load_cli_config(args.config, args.overrides)
    resuming = args.resume_from or (cfg.train.resume and latest_checkpoint(Path(cfg.train.out_dir) / "checkpoints"))
    if cfg.source_stage.enabled and not resuming:  # here, so that the source stage has its MLflow run

        def say(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        model = ensure_source_model(cfg, _source_stage_callbacks, log=say)
        say(f"source model {model.key}: {'trained' if model.trained else 'from the cache'} at {model.uri}")
    result = Trainer(cfg, tracking_callbacks(cfg)).fit(args.resume_from)
    summary = {
        "step": result.step,
        f"best_{result.selection_metric}": result.best_metric,
        "best_step": result.best_step,
        "final": {k: v for k, v in result.final_metrics.items() if "/" not in k},
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "out_dir": str(result.out_dir),
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import yaml

    from lpcgma.engine.checkpoint import CONFIG_FILE, read_checkpoint
    from lpcgma.engine.evaluator import evaluate_checkpoint

    ckpt = Path(args.checkpoint)
    cfg_file = ckpt / CONFIG_FILE if ckpt.is_dir() else ckpt.parent / CONFIG_FILE
    if not cfg_file.is_file():
        raise ConfigError(f"checkpoint '{ckpt}' has no {CONFIG_FILE} beside it")
    cfg = load_config(cfg_file, args.overrides)
    state = read_checkpoint(ckpt)
    metrics, cm, _ = evaluate_checkpoint(cfg, state["method"])
    print(json.dumps({"step": state["step"], **metrics}, indent=2))
    if args.out:
        confusion = None if cm is None else cm.tolist()  # None: the target has no labels
        Path(args.out).write_text(yaml.safe_dump({"metrics": metrics, "confusion": confusion}))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from lpcgma.data.synthetic import write_synthetic_loveda

    if not 0 <= args.shift <= 1:
        raise ConfigError(f"--shift = {args.shift} is invalid: expected a strength in [0, 1]")
    write_synthetic_loveda(
        Path(args.root), args.tiles, args.tile_size, args.seed, args.sensor, args.shift, args.palette, args.layouts,
        args.textures,
    )  # fmt: skip
    print(f"wrote the synthetic benchmark in the LoveDA layout under {args.root}")
    return 0


def cmd_data_prepare_isprs(args: argparse.Namespace) -> int:
    from lpcgma.data.isprs import prepare_isprs

    prepare_isprs(
        Path(args.src),
        Path(args.out),
        dataset=args.dataset,
        modality=args.modality,
        patch_size=args.patch_size,
        stride=args.stride or args.patch_size,
        ignore_clutter=args.ignore_clutter,
    )
    print(f"prepared {args.dataset} patches under {args.out}")
    return 0


def cmd_data_import_isprs(args: argparse.Namespace) -> int:
    from lpcgma.data.isprs_mmseg import import_mmseg_isprs

    # validated here rather than by argparse `choices`: every bad input is one line (exit 2)
    for flag, value, allowed in (("--from", args.source_format, ["mmseg"]),
                                 ("--dataset", args.dataset, ["potsdam", "vaihingen"]),
                                 ("--modality", args.modality, [None, "rgb", "irrg"])):  # fmt: skip
        if value not in allowed:
            raise ConfigError(f"{flag} {value!r} is invalid: expected one of {[a for a in allowed if a]}")
    report = import_mmseg_isprs(Path(args.src), Path(args.out), args.dataset, args.modality)
    print(report.summary())
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    from lpcgma.config import parse_override
    from lpcgma.data.pack import pack_dataset

    values: dict[str, object] = {"data.dataset": args.dataset, "data.root": args.root or ""}
    for text in args.overrides:
        key, value = parse_override(text)
        if not key.startswith("data."):
            raise ConfigError(f"override {text!r} is invalid here: `lpcgma data pack` takes data.* keys only")
        values[key] = value
    try:
        m = pack_dataset(load_config(None, values).data, args.out, args.shard_mb, args.shard_rows, log=print)
    except OSError as e:  # storage errors (S3 bucket, permissions) as well as missing data
        print(f"lpcgma: error: {e}", file=sys.stderr)
        return 2
    mb = sum(s.bytes for s in m.shards) / 2**20
    print(f"{m.dataset}: {m.describe()} ({len(m.shards)} shard(s), {mb:.1f} MB)")
    print(f"train from them: lpcgma train --config CONFIG data.dataset=shards data.root={m.location.uri}")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from lpcgma.data.download import DownloadError, FetchOptions, download_isprs, download_loveda

    try:
        if args.dataset == "loveda":
            options = FetchOptions(progress=not args.quiet)
            done = download_loveda(args.root, args.splits, base_url=args.base_url, keep_archives=args.keep_archives,
                                   options=options)  # fmt: skip
            print(f"LoveDA under {args.root}: " + ", ".join(f"{s} {what}" for s, what in done.items()))
            print(f"check it with: lpcgma data check --dataset loveda --root {args.root}")
            return 0
        found = download_isprs(args.root, args.isprs_datasets, args.modality, args.password)
    except DownloadError as e:
        print(f"lpcgma: error: {e}", file=sys.stderr)
        return 2
    return 0 if all(tiles is not None for tiles in found.values()) else 1  # 1: archives still to request


def cmd_data_sample(args: argparse.Namespace) -> int:
    from lpcgma.data.loveda import sample_loveda

    ids = sample_loveda(args.root, args.out, args.tiles, args.split.lower(), args.domain.lower())
    print(f"copied {len(ids)} LoveDA {args.split}/{args.domain} tiles ({', '.join(ids)}) to {args.out}")
    print(f"train on them: lpcgma train --config loveda_sample data.root={args.out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from lpcgma.data.check import check_isprs, check_loveda

    if args.dataset == "loveda":
        report = check_loveda(args.root, args.splits, args.domains, expect_counts=args.expect_counts,
                              sample=args.sample, tile_size=args.tile_size)  # fmt: skip
    else:
        report = check_isprs(args.root, args.isprs_datasets, args.modality)
    print(report.table())
    return 0 if report.ok else 1


def cmd_promote(args: argparse.Namespace) -> int:
    from lpcgma.engine.label_free import resolve_objective
    from lpcgma.tracking.registry import PromotionError, PromotionRefused, promote

    metric, mode = resolve_objective(args.metric, args.mode)
    try:
        r = promote(
            args.search,
            experiment=args.experiment,
            metric=metric,
            mode=mode,
            model_name=args.model_name,
            force=args.force,
            tracking_uri=args.tracking_uri,
        )
    except PromotionRefused as e:
        print(f"lpcgma: {e}", file=sys.stderr)
        return 1
    except PromotionError as e:
        print(f"lpcgma: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**r.__dict__}, indent=2))
    print(f"predict with: lpcgma predict --model {r.model_uri} TILE_OR_FOLDER --out DIR")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from lpcgma.tracking.registry import predict_files

    written = predict_files(args.model, args.inputs, args.out, args.tracking_uri, args.stride)
    print(f"wrote {len(written)} prediction PNGs to {args.out}")
    return 0


def cmd_mlflow_sync(args: argparse.Namespace) -> int:
    from lpcgma.tracking.offline import sync_run_dir

    r = sync_run_dir(args.run_dir, args.tracking_uri)
    report = {"applied": r.applied, "skipped": r.skipped, "pending": r.pending, "errors": r.errors}
    print(json.dumps(report, indent=2))
    return 0 if r.complete else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from lpcgma.distributed.resources import ResourceError
    from lpcgma.distributed.search import run_search
    from lpcgma.distributed.search_cli import settings_from_args
    from lpcgma.distributed.search_mlflow import mlflow_hooks
    from lpcgma.search_space import SearchSpaceError

    try:
        outcome = run_search(settings_from_args(args), *mlflow_hooks())
    except (SearchSpaceError, ResourceError) as e:
        print(f"lpcgma tune: error: {e}", file=sys.stderr)
        return 2
    if not outcome.complete:
        return 130  # interrupted: resume with --resume
    return 0 if outcome.trials and all(t.status != "error" for t in outcome.trials) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lpcgma", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_training_commands(sub)
    _add_data_commands(sub)
    _add_model_commands(sub)
    return parser


def _add_training_commands(sub: Subcommands) -> None:
    """`lpcgma train`, `evaluate` and `tune`."""
    p = sub.add_parser("train", help="train one method (a single run, tracked in MLflow)")
    p.add_argument("--config", help="YAML file or packaged config name (synthetic, loveda, isprs, ...)")
    p.add_argument("--resume-from", help="checkpoint folder to resume from (default: newest in train.out_dir)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.name=lpcgma method.tau_pmc=0.07")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on the target evaluation split")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (holds state.pt and config.yaml)")
    p.add_argument("--out", help="write metrics and confusion matrix as YAML here")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/data/LoveDA")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "tune",
        help="hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over trials of the trainer",
        description="Search a YAML search space around a base config; the literature defaults run first.",
    )
    from lpcgma.distributed.search_cli import add_search_arguments

    add_search_arguments(p)
    p.add_argument("overrides", nargs="*", help="dotted base-config overrides, e.g. method.name=lpcgma")
    p.set_defaults(func=cmd_tune)


def _add_data_commands(sub: Subcommands) -> None:
    """`lpcgma data synth | prepare-isprs | import-isprs | pack | download | sample | check`."""
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the synthetic two-domain benchmark in the LoveDA layout")
    p.add_argument("--root", required=True)
    p.add_argument("--tiles", type=int, default=16)
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sensor", choices=["rgb", "irrg"], default="irrg")
    p.add_argument("--shift", type=float, default=1.0, help="Urban's shift from Rural: 0 = Rural's look, 1 = full")
    p.add_argument("--palette", choices=["own", "source"], default="own", help="Urban's materials: its own or Rural's")
    layouts_help = "Urban's layouts: shifted with --shift, or Rural's"
    p.add_argument("--layouts", choices=["shifted", "source"], default="shifted", help=layouts_help)
    textures_help = "Urban's textures: its own, or none that imitates another Rural class's"
    p.add_argument("--textures", choices=["own", "distinct"], default="own", help=textures_help)
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("prepare-isprs", help="cut official ISPRS Potsdam/Vaihingen tiles into patches")
    p.add_argument("--src", required=True, help="folder holding the official archives' extracted tiles")
    p.add_argument("--out", required=True)
    p.add_argument("--dataset", choices=["potsdam", "vaihingen"], required=True)
    p.add_argument("--modality", choices=["rgb", "irrg"], default="irrg")
    p.add_argument("--patch-size", type=int, default=512)
    p.add_argument("--stride", type=int, default=0, help="default: the patch size")
    p.add_argument("--ignore-clutter", action="store_true", help="clutter → ignore (5-class protocol)")
    p.set_defaults(func=cmd_data_prepare_isprs)
    p = data.add_parser(
        "import-isprs",
        help="import ISPRS patches prepared by another tool (mmsegmentation)",
        description="Import mmsegmentation's Potsdam/Vaihingen patches (SRC/img_dir, SRC/ann_dir; labels "
        "0 = boundary, 1..6 = classes) as prepared patches: labels remapped, manifest written.",
    )
    p.add_argument("--from", dest="source_format", required=True, metavar="mmseg", help="the tool that prepared SRC")
    p.add_argument("src", help="the converter's output folder (holds img_dir/ and ann_dir/)")
    p.add_argument("--out", required=True, help="prepared root (data.root): patches go to OUT/Potsdam or OUT/Vaihingen")
    p.add_argument("--dataset", required=True, metavar="potsdam|vaihingen")
    p.add_argument("--modality", metavar="rgb|irrg", help="bands of the images (Vaihingen: irrg; Potsdam: required)")
    p.set_defaults(func=cmd_data_import_isprs)
    p = data.add_parser("pack", help="pack a prepared dataset into Parquet shards (a folder or s3://) to train from")
    p.add_argument("--dataset", choices=["loveda", "isprs", "synthetic"], required=True)
    p.add_argument("--root", help="LoveDA: holds Train/ Val/ Test/; ISPRS: prepared patches; synthetic: unused")
    p.add_argument("--out", required=True, help="shards folder or s3://bucket/prefix (endpoint: $AWS_ENDPOINT_URL_S3)")
    p.add_argument("--shard-mb", type=float, default=256.0, help="close a shard before it passes this many MB")
    p.add_argument("--shard-rows", type=int, default=1024, help="... or this many tiles (0: no tile cap)")
    p.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.synthetic_tiles=16 (synthetic)")
    p.set_defaults(func=cmd_data_pack)
    download = data.add_parser("download", help="get LoveDA (Zenodo, verified, resumable) or set up ISPRS archives")
    download.add_argument("dataset", choices=["loveda", "isprs"])
    download.add_argument("--base-url", help="LoveDA mirror (default: $LPCGMA_LOVEDA_URL, else Zenodo 5706578)")
    download.add_argument("--keep-archives", action="store_true", help="keep LoveDA's zips after extraction")
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    download.add_argument("--password", help="password of encrypted ISPRS zips (given with the download)")
    download.set_defaults(func=cmd_data_download)
    p = data.add_parser("sample", help="copy N LoveDA tiles to a small folder (loveda_sample.yaml)")
    p.add_argument("--root", required=True, help="LoveDA folder with Train/ (`lpcgma data download loveda`)")
    p.add_argument("--out", required=True, help="destination (loveda_sample.yaml reads data/loveda_sample)")
    p.add_argument("--tiles", type=int, default=16, help="tiles to copy, evenly spread over the ids")
    p.add_argument("--split", type=str.capitalize, choices=["Train", "Val"], default="Train")
    p.add_argument("--domain", type=str.capitalize, choices=["Rural", "Urban"], default="Rural")
    p.set_defaults(func=cmd_data_sample)
    check = data.add_parser("check", help="check a dataset on disk: counts, sizes, masks, missing files")
    check.add_argument("--dataset", choices=["loveda", "isprs"], required=True)
    check.add_argument("--domains", nargs="+", type=str.capitalize, choices=["Rural", "Urban"],
                       default=["Rural", "Urban"], help="LoveDA domains")  # fmt: skip
    check.add_argument("--expect-counts", action=argparse.BooleanOptionalAction, default=True,
                       help="compare LoveDA image counts with the official ones (off: a subset on disk)")  # fmt: skip
    check.add_argument("--sample", type=int, help="read only N evenly spread images per LoveDA split/domain")
    check.add_argument("--tile-size", type=int, default=1024, help="expected LoveDA tile size (synthetic: 256)")
    check.set_defaults(func=cmd_data_check)
    for p in (download, check):
        p.add_argument("--root", required=True, help="LoveDA: holds Train/ Val/ Test/; ISPRS: Potsdam/ Vaihingen/")
        p.add_argument("--splits", nargs="+", type=str.capitalize, choices=["Train", "Val", "Test"],
                       default=["Train", "Val", "Test"], help="LoveDA splits")  # fmt: skip
        p.add_argument("--isprs-datasets", nargs="+", choices=["potsdam", "vaihingen"],
                       default=["potsdam", "vaihingen"], help="ISPRS datasets")  # fmt: skip
        p.add_argument("--modality", choices=["rgb", "irrg"], default="irrg", help="ISPRS Potsdam image tiles")


def _add_model_commands(sub: Subcommands) -> None:
    """`lpcgma promote`, `predict` and `mlflow sync`."""
    p = sub.add_parser("promote", help="register a search's best trial as the champion model")
    p.add_argument("--search", help="search name (its trial runs are the candidates)")
    p.add_argument("--experiment", help="or: every training run of this MLflow experiment")
    p.add_argument("--metric", default="target_miou",
                   help="selection metric (each run's best value): a metric key or a label-free criterion "
                        "name (entropy, im, snd, agreement, …)")  # fmt: skip
    p.add_argument("--mode", choices=["max", "min"], help="default: the criterion's own (entropy: min), else max")
    p.add_argument("--model-name", help="registered model (default: lpcgma-<dataset>-<source>-to-<target>)")
    p.add_argument("--force", action="store_true", help="promote even if not better than the champion")
    p.add_argument("--tracking-uri", help="default: tracking config / $MLFLOW_TRACKING_URI / ./mlflow store")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("predict", help="colour-coded predictions of a registered model on whole tiles")
    p.add_argument("--model", required=True, help="model URI, e.g. models:/NAME@champion")
    p.add_argument("inputs", nargs="+", help="image tiles or folders of tiles")
    p.add_argument("--out", required=True, help="folder for <tile>.png predictions")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: the model's)")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI / ./mlflow store")
    p.set_defaults(func=cmd_predict)

    ml = sub.add_parser("mlflow", help="MLflow tools").add_subparsers(dest="mlflow_command", required=True)
    p = ml.add_parser("sync", help="upload what was recorded offline while the tracking server was down")
    p.add_argument("--run-dir", required=True, help="run folder (searched recursively for offline records)")
    p.add_argument("--tracking-uri", help="default: the URI recorded with the offline records")
    p.set_defaults(func=cmd_mlflow_sync)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"lpcgma: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
