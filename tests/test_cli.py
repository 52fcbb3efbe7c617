"""The `lpcgma` command end to end: train (synthetic and the real LoveDA tiles), evaluate, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lpcgma.cli import main

TINY = [
    "train.iters=4",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.log_every=2",
    "tracking.enabled=false",
    "train.device=cpu",
]


def test_train_then_evaluate_on_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        "synthetic",
        *TINY,
        "data.synthetic_tiles=4",
        "data.synthetic_tile_size=64",
        "data.crop_size=48",
        "train.eval_window=64",
        "train.eval_stride=64",
        f"train.out_dir={out}",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 4 and 0.0 <= summary["best_target_miou"] <= 1.0
    assert main(["evaluate", "--checkpoint", summary["best_checkpoint"], "--out", str(tmp_path / "m.yaml")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["target_miou"] == pytest.approx(summary["best_target_miou"], abs=1e-6)


def test_train_from_the_shared_source_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "models"
    args = ["train", "--config", "synthetic", *TINY, "data.synthetic_tiles=2", "data.synthetic_tile_size=32",
            "data.crop_size=32", "train.eval_window=32", "train.eval_stride=32", "method.name=self_training",
            "source_stage.enabled=true", "source_stage.iters=2", f"source_stage.store={store}"]  # fmt: skip
    assert main([*args, f"train.out_dir={tmp_path / 'a'}"]) == 0
    first = capsys.readouterr()
    assert json.loads(first.out)["step"] == 4  # stdout stays the JSON summary
    key = next(p.name for p in store.iterdir() if p.is_dir())
    assert f"source model {key}: trained at {store / key}" in first.err
    assert main([*args, f"train.out_dir={tmp_path / 'b'}"]) == 0
    assert f"source model {key}: from the cache" in capsys.readouterr().err


def test_train_on_real_loveda_tiles(loveda_sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The cross-sensor task on real imagery: Rural RGB tiles → the same tiles through the IRRG model."""
    args = [
        "train",
        "--config",
        "loveda_sample",
        *TINY,
        f"data.root={loveda_sample}",
        "data.eval_max_tiles=1",
        f"train.out_dir={tmp_path / 'run'}",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 4
    assert (tmp_path / "run" / "checkpoints" / "best" / "state.pt").is_file()
    assert summary["final"]["target_oa"] > 0.0


def test_bad_override_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", "synthetic", "method.tau_pmc=0.1"]) == 2
    err = capsys.readouterr().err
    assert "method.tau_pmc" in err and "valid keys" in err


def test_missing_dataset_names_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train",
            "--config",
            "loveda",
            f"data.root={tmp_path / 'nowhere'}",
            "model.pretrained=false",
            "tracking.enabled=false",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "LoveDA" in err


def test_data_synth_writes_the_benchmark_with_the_target_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lpcgma data synth` writes the tiles `SyntheticAerial` renders for the same target settings."""
    from lpcgma.data.loveda import LoveDA
    from lpcgma.data.synthetic import SyntheticAerial

    args = ["data", "synth", "--root", str(tmp_path), "--tiles", "2", "--tile-size", "32", "--seed", "3",
            "--sensor", "rgb", "--shift", "0.8", "--palette", "source", "--layouts", "source",
            "--textures", "distinct"]  # fmt: skip
    assert main(args) == 0 and "LoveDA layout" in capsys.readouterr().out
    ref = SyntheticAerial("urban", "val", 2, 32, 3, "rgb", 0.8, "rural", "source", "source", textures="distinct")
    loaded = LoveDA(tmp_path, "val", "urban")
    assert all(bool((loaded[i]["image"] == ref[i]["image"]).all()) for i in range(2))
    with pytest.raises(SystemExit) as bad:
        main([*args[:-1], "velvet"])
    assert bad.value.code == 2 and "--textures" in capsys.readouterr().err
