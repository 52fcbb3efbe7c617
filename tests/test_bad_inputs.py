"""Bad input through the `lpcgma` command: a clear message naming the file/key/value, a non-zero exit,
nothing half-written. Config files and overrides, search-space files and LoveDA trees are broken on
purpose; the unit-level refusals live beside each loader (test_config.py, test_search_space.py,
data/test_loveda.py, data/test_check.py) and RELIABILITY.md lists them all."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from data.fixtures import write_loveda_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lpcgma.cli import main
from lpcgma.config import METHOD_CONFIGS, ConfigError, dump_config, load_config, valid_keys

# a LoveDA run small enough for a CPU test (the packaged loveda.yaml has GPU sizes)
TINY_LOVEDA = [
    "model.pretrained=false",
    "model.backbone=resnet18",
    "model.proj_dim=8",
    "tracking.enabled=false",
    "data.num_workers=0",
    "data.crop_size=32",
    "data.batch_size=1",
    "train.iters=2",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.eval_window=64",
    "train.eval_stride=64",
    "train.device=cpu",
    "train.progress=false",
]


def _written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("train:\n  iterz: 3\n", ["unknown config key 'train.iterz'", "train.iters"]),  # unknown key, valid listed
        ("train:\n  iters: abc\n", ["'train.iters' = 'abc'", "expected an integer"]),  # wrong type
        ("data:\n  crop_size: 2.5\n", ["'data.crop_size' = 2.5", "expected an integer"]),
        ("method:\n  name: lpcgmaa\n", ["'method.name' = 'lpcgmaa'", "expected one of", "lpcgma"]),
    ],
    ids=["unknown-key", "wrong-type-str", "wrong-type-float", "unknown-method"],
)
def test_bad_config_file_exits_2_naming_file_key_value_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, words: list[str]
) -> None:
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(text)
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), f"train.out_dir={out}", "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and all(w in err for w in words), err
    assert not out.exists()  # validated before anything is written


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("method.name=nope", ["'method.name' = 'nope'", "expected one of"]),
        ("train.iters=many", ["'train.iters' = 'many'", "integer"]),
        ("train.iters=0", ["train.iters", "> 0"]),
        ("model.backbone=vgg", ["'model.backbone' = 'vgg'", "resnet"]),
        ("data.no_such_key=1", ["unknown config key 'data.no_such_key'", "data.root"]),
    ],
    ids=["unknown-method", "wrong-type", "out-of-range", "bad-choice", "unknown-key"],
)
def test_bad_override_exits_2_naming_key_and_value_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, words: list[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", "--config", "synthetic", f"train.out_dir={out}", override]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not out.exists()
    if "unknown config key" in err:  # the key came from the command line, not the packaged file
        assert "(from the command-line overrides)" in err and "synthetic.yaml" not in err


def test_missing_dataset_path_exits_2_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["train", "--config", "loveda", f"data.root={tmp_path / 'nowhere'}", f"train.out_dir={out}"]
    assert main([*argv, "model.pretrained=false"]) == 2  # tracking on (the default): no run is started either
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "Train" / "Rural" / "images_png") in err and "Zenodo" in err
    assert not out.exists()


# config loader fuzz: any YAML tree either loads (and dumps back) or is refused with ConfigError
_KEYS = sorted({k for method in METHOD_CONFIGS for k in valid_keys(method)})
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(),
    st.text(max_size=6),
    st.sampled_from(sorted(METHOD_CONFIGS)),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def _tree(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in pairs:
        *sections, leaf = key.split(".")
        node = tree
        for s in sections:
            if not isinstance(node.get(s), dict):
                node[s] = {}
            node = node[s]
        node[leaf] = value
    return tree


_trees = st.lists(st.tuples(st.one_of(st.sampled_from(_KEYS), st.text(max_size=8)), _values), max_size=5).map(_tree)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_trees)
def test_fuzz_config_files_load_or_raise_config_error(tmp_path: Path, tree: dict[str, Any]) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        cfg = load_config(path)
    except ConfigError as e:
        assert str(e)
    else:
        yaml.safe_load(dump_config(cfg))  # anything accepted is a valid, dumpable config


@pytest.mark.parametrize("text", ["train: {1: 2, a: 3}\n", "method: {name: [1]}\n"], ids=["mixed-keys", "list-name"])
def test_config_loader_type_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)


# ------------------------------------------------------------------------------ search space
@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("foo.bar: {type: uniform, low: 0.1, high: 1.0}\n", "foo.bar", "unknown config key"),
        ("optim.lr: {type: normal, low: 0.001, high: 0.01}\n", "optim.lr", "not a distribution"),
        ("optim.lr: {type: uniform, low: 0.01, high: 0.01}\n", "optim.lr", "must be < high"),
        ("method.gaussians_per_class: {type: int, low: 0, high: 4}\n", "method.gaussians_per_class", ">= 1"),
        ("method.tau_pmc: {type: uniform, low: 0.0, high: 0.5}\n", "method.tau_pmc", "temperature"),
        ("", None, "empty"),
    ],
    ids=["unknown-key", "bad-distribution", "low-ge-high", "K-lt-1", "temperature-le-0", "empty-file"],
)
def test_bad_search_space_exits_2_before_ray_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str | None, words: str
) -> None:
    import ray

    space = tmp_path / "space.yaml"
    space.write_text(text)
    store = tmp_path / "store"
    argv = ["tune", "--smoke-test", "--search-space", str(space), "--storage", str(store), "--name", "refused"]
    assert main([*argv, "method.name=lpcgma", "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert str(space) in err and words in err and (key is None or f"key '{key}'" in err), err
    assert not ray.is_initialized()  # refused before Ray starts ...
    assert not store.exists()  # ... and before the search's folder is created


# ----------------------------------------------------------------------------------- cluster
def test_more_gpus_per_trial_than_any_node_exits_2_before_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    store = tmp_path / "store"
    argv = ["tune", "--smoke-test", "--gpus-per-worker", "64", "--storage", str(store), "--name", "too_big"]
    assert main([*argv, "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert "asks for 64 GPU(s) but the largest node has" in err, err
    assert not ray.is_initialized() and not store.exists()


# ------------------------------------------------------------------------------------- data
def _damage_png(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])  # truncated


def _mask(value: int, shape: tuple[int, int] = (64, 64)) -> Callable[[Path], None]:
    return lambda path: Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)


# (what is broken, file under the tree, damage, expected words, eager: refused before the run folder exists)
DATA_CASES = [
    ("missing-folder", "Val/Urban/images_png", shutil.rmtree, ["images_png", "Zenodo"], True),
    ("image-without-mask", "Train/Rural/masks_png/1.png", Path.unlink, ["have no mask", "1.png"], True),
    ("empty-split", "Val/Urban/images_png", lambda p: [f.unlink() for f in p.iterdir()], ["empty split"], True),
    ("corrupt-source-png", "Train/Rural/images_png/1.png", _damage_png, ["cannot read PNG"], False),
    ("corrupt-target-png", "Val/Urban/images_png/1.png", _damage_png, ["cannot read PNG"], False),
    ("mask-value-out-of-range", "Train/Rural/masks_png/0.png", _mask(9), ["invalid values [9]"], False),
    ("image-mask-size-mismatch", "Train/Rural/masks_png/0.png", _mask(1, (32, 64)), ["64x32", "64x64"], False),
]


@pytest.fixture(scope="module")
def loveda_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_loveda_tree(tmp_path_factory.mktemp("loveda") / "LoveDA", ids=(0, 1), size=64)


@pytest.mark.parametrize(("what", "rel", "damage", "words", "eager"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_broken_dataset_exits_2_naming_the_file(
    loveda_tree: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    what: str,
    rel: str,
    damage: Callable[[Path], object],
    words: list[str],
    eager: bool,
) -> None:
    root = tmp_path / "LoveDA"
    shutil.copytree(loveda_tree, root)
    damage(root / rel)
    out = tmp_path / "run"
    assert main(["train", "--config", "loveda", f"data.root={root}", f"train.out_dir={out}", *TINY_LOVEDA]) == 2
    err = capsys.readouterr().err
    assert str(root / rel) in err and all(w in err for w in words), err
    # folder/pairing/empty checks run when the dataset is built, before the run folder exists; a tile
    # is decoded and checked when first read, which here is before the first step: only the resolved
    # config was written, no checkpoint and no metrics
    assert _written(out) == ([] if eager else ["config.yaml"])


def test_the_damages_above_are_real_on_an_intact_tree(loveda_tree: Path, tmp_path: Path) -> None:
    """The same command on the undamaged tree trains (so each refusal above is the damage's doing)."""
    out = tmp_path / "run"
    argv = ["train", "--config", "loveda", f"data.root={loveda_tree}", f"train.out_dir={out}", *TINY_LOVEDA]
    assert main(argv) == 0
    assert {"config.yaml", "metrics.jsonl", "checkpoints/best/state.pt"} <= set(_written(out))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--tiles", "5"], ["--tiles 5: expected 1 to 2"]),
        (["--split", "val", "--domain", "urban", "--tiles", "1"], []),  # intact: copies, exit 0
        (["--root", "no/such/LoveDA"], ["no/such/LoveDA", "Zenodo"]),
    ],
    ids=["too-many-tiles", "intact", "missing-root"],
)
def test_data_sample_answers_bad_input_in_one_line(
    loveda_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], words: list[str]
) -> None:
    out = tmp_path / "sample"
    code = main(["data", "sample", "--root", str(loveda_tree), "--out", str(out), *args])
    err = capsys.readouterr().err
    if not words:
        assert code == 0 and len(list((out / "Val" / "Urban" / "masks_png").glob("*.png"))) == 1
        return
    assert code == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not out.exists()


class _Crafted:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (shutil.rmtree, ("/nonexistent-lpcgma-test",))


@pytest.mark.parametrize("entry", ["evaluate", "init_checkpoint", "resume-from"])
def test_crafted_checkpoint_exits_2_with_one_line_and_no_unsafe_advice(
    entry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pickle

    ckpt = tmp_path / "crafted"
    ckpt.mkdir()
    with open(ckpt / "state.pt", "wb") as f:
        pickle.dump({"step": 1, "method": _Crafted()}, f)
    cfg = load_config(None, ["data.synthetic_tiles=2", "data.synthetic_tile_size=32", "data.crop_size=32",
                             "model.backbone=resnet18", "model.pretrained=false", *TINY_LOVEDA[2:]])  # fmt: skip
    (ckpt / "config.yaml").write_text(dump_config(cfg))
    train = ["train", *TINY_LOVEDA, "data.synthetic_tiles=2", "data.synthetic_tile_size=32", "data.crop_size=32",
             f"train.out_dir={tmp_path / 'run'}"]  # fmt: skip
    argv = {
        "evaluate": ["evaluate", "--checkpoint", str(ckpt)],
        "init_checkpoint": [*train, f"model.init_checkpoint={ckpt}"],
        "resume-from": [*train[:1], "--resume-from", str(ckpt), *train[1:]],
    }[entry]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(ckpt / "state.pt") in err
    assert "not a checkpoint this project can load safely" in err
    assert "weights_only` set to `False" not in err and "Re-running" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("script", "args", "words"),
    [
        ("tune_synthetic.py", ["--search-space", "nope"], ["search space 'nope'", "packaged"]),
        ("tune_synthetic.py", ["train.iterz=3"], ["train.iterz", "command-line overrides"]),
        ("tune_loveda.py", ["--data-root", "no/such/LoveDA"], ["no/such/LoveDA/Train/Rural/images_png", "Zenodo"]),
    ],
)
def test_experiment_scripts_refuse_bad_input_in_one_line_before_ray(
    script: str, args: list[str], words: list[str], tmp_path: Path
) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "experiments" / script), "--storage", str(tmp_path / "store"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**__import__("os").environ, "LPCGMA_LOVEDA_ROOT": ""})  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error:") and all(w in lines[0] for w in words)
    assert not (tmp_path / "store").exists()  # nothing started, nothing written
