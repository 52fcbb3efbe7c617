"""Search-space files: the packaged ones load, bad ones are refused with file and key named, the
conversion to Ray Tune / Optuna keeps the bounds, and a fuzzed loader never raises anything else."""

from __future__ import annotations

import contextlib
import math
import zipfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lpcgma.config import flatten, load_config, valid_keys
from lpcgma.search_space import (
    SearchSpaceError,
    defaults_point,
    load_search_space,
    packaged_search_spaces,
    parse_search_space,
    resolve_search_space,
)

REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "lpcgma" / "search_spaces"


def write(tmp_path: Path, data: object, name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


# ------------------------------------------------------------------------------ packaged files
def test_packaged_search_spaces_are_the_top_level_ones() -> None:
    assert set(packaged_search_spaces()) >= {"smoke", "synthetic", "loveda", "isprs"}
    top = REPO / "search_spaces"
    assert top.is_symlink() and top.resolve() == PACKAGED.resolve()
    for name in ("smoke", "synthetic", "loveda", "isprs"):
        assert (top / f"{name}.yaml").read_text() == (PACKAGED / f"{name}.yaml").read_text()
        assert resolve_search_space(name).resolve() == (PACKAGED / f"{name}.yaml").resolve()


@pytest.mark.parametrize("name", ["smoke", "synthetic", "loveda", "isprs"])
def test_packaged_spaces_load_for_lpcgma_with_comments(name: str) -> None:
    space = load_search_space(name, method="lpcgma")
    assert len(space) >= 2
    assert all(p.comment for p in space.params)


def test_literature_search_spaces_cover_the_issue_keys() -> None:
    wanted = {
        "method.tau_pmc",
        "method.tau_pix",
        "method.tau_gmm",
        "method.minority_boost",
        "method.base_rate",
        "data.rcs_temperature",
        "method.gaussians_per_class",
        "method.lambda_pmc",
        "method.lambda_pix",
        "method.lambda_fwd",
    }
    for name in ("loveda", "isprs"):
        assert wanted <= set(load_search_space(name).keys)


@pytest.mark.parametrize(
    ("config", "space"),
    [("synthetic", "smoke"), ("loveda", "loveda"), ("isprs", "isprs"), ("synthetic", "synthetic")],
)
def test_packaged_spaces_fit_their_base_configs(config: str, space: str) -> None:
    cfg = load_config(REPO / "lpcgma" / "configs" / f"{config}.yaml", ["method.name=lpcgma"])
    s = load_search_space(space, base=cfg)
    point = defaults_point(s, cfg)
    assert point == {k: flatten(cfg)[k] for k in s.keys}


def test_smoke_space_works_for_every_method() -> None:
    for method in ("source_only", "oracle", "self_training", "lpcgma", "sdca", "bida"):
        space = load_search_space("smoke", method=method)
        assert space.keys, method


# ------------------------------------------------------------------------------ refusals
BAD = [
    ({"foo.bar": {"type": "uniform", "low": 0.1, "high": 1.0}}, "foo.bar", "unknown config key"),
    ({"method.tau_pmc": {"type": "normal", "low": 0.1, "high": 1.0}}, "method.tau_pmc", "not a distribution"),
    ({"method.tau_pmc": {"type": "uniform", "low": 0.5, "high": 0.1}}, "method.tau_pmc", "must be < high"),
    ({"method.tau_pmc": {"type": "uniform", "low": 0.1, "high": 0.1}}, "method.tau_pmc", "must be < high"),
    ({"method.tau_pmc": {"type": "uniform", "low": "a", "high": 1.0}}, "method.tau_pmc", "must be a number"),
    ({"method.tau_pmc": {"type": "uniform", "low": True, "high": 1.0}}, "method.tau_pmc", "must be a number"),
    ({"method.tau_pmc": {"type": "uniform", "low": 0.1}}, "method.tau_pmc", "needs 'high'"),
    ({"method.tau_pmc": {"type": "uniform", "low": 0.0, "high": 1.0}}, "method.tau_pmc", "temperature"),
    ({"method.tau_gmm": {"type": "uniform", "low": -1.0, "high": 1.0}}, "method.tau_gmm", "temperature"),
    ({"method.tau_pix": {"type": "choice", "values": [0.1, 0.0]}}, "method.tau_pix", "temperature"),
    ({"method.tau_pmc": {"type": "loguniform", "low": 0.0, "high": 1.0}}, "method.tau_pmc", "low > 0"),
    (
        {"method.gaussians_per_class": {"type": "int", "low": 0, "high": 4}},
        "method.gaussians_per_class",
        ">= 1",
    ),
    (
        {"method.gaussians_per_class": {"type": "choice", "values": [0, 2]}},
        "method.gaussians_per_class",
        ">= 1",
    ),
    (
        {"method.gaussians_per_class": {"type": "uniform", "low": 1, "high": 4}},
        "method.gaussians_per_class",
        "integer",
    ),
    (
        {"method.gaussians_per_class": {"type": "int", "low": 1.5, "high": 4}},
        "method.gaussians_per_class",
        "integer",
    ),
    ({"method.tau_pmc": {"type": "int", "low": 1, "high": 4}}, "method.tau_pmc", "float"),
    ({"method.use_pmc": {"type": "uniform", "low": 0, "high": 1}}, "method.use_pmc", "choice"),
    ({"optim.name": {"type": "choice", "values": ["sgd", "adam"]}}, "optim.name", "adam"),
    (
        {"method.pseudo_threshold": {"type": "uniform", "low": 0.5, "high": 1.5}},
        "method.pseudo_threshold",
        "[0, 1]",
    ),
    ({"method.tau_pmc": {"type": "choice", "values": []}}, "method.tau_pmc", "non-empty list"),
    ({"method.tau_pmc": {"type": "choice", "values": [[0.1], [0.2]]}}, "method.tau_pmc", "scalars"),
    ({"method.tau_pmc": {"type": "choice", "values": [0.1, 0.1]}}, "method.tau_pmc", "listed twice"),
    (
        {"method.gaussians_per_class": {"type": "choice", "values": [2, 2.0]}},
        "method.gaussians_per_class",
        "twice",
    ),
    ({"method.tau_pmc": {"type": "choice", "values": [0.1], "low": 0.1}}, "method.tau_pmc", "takes 'values'"),
    (
        {"method.tau_pmc": {"type": "uniform", "low": 0.1, "high": 1, "values": [1]}},
        "method.tau_pmc",
        "not 'values'",
    ),
    (
        {"method.tau_pmc": {"type": "uniform", "low": 0.1, "high": 1, "step": 1}},
        "method.tau_pmc",
        "unknown field",
    ),
    ({"method.tau_pmc": {"type": "uniform", "low": 0.1, "high": ".inf"}}, "method.tau_pmc", "finite"),
    (
        {"method.tau_pmc": {"type": "uniform", "low": 0.1, "high": 1, "comment": 3}},
        "method.tau_pmc",
        "comment",
    ),
    ({"method.tau_pmc": 0.1}, "method.tau_pmc", "expected a mapping"),
    (
        {"method.name": {"type": "choice", "values": ["lpcgma", "sdca"]}},
        "method.name",
        "one search per method",
    ),
]


@pytest.mark.parametrize(("data", "key", "words"), BAD, ids=[f"{b[1]}-{b[2]}" for b in BAD])
def test_bad_entries_are_refused_naming_file_and_key(tmp_path: Path, data: dict, key: str, words: str) -> None:
    text = yaml.safe_dump(data).replace("'.inf'", ".inf")
    path = write(tmp_path, text)
    with pytest.raises(SearchSpaceError) as e:
        load_search_space(path, method="lpcgma")
    msg = str(e.value)
    assert str(path) in msg and f"key '{key}'" in msg and words in msg, msg


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        ("{}\n", "empty"),
        ("# only a comment\n", "empty"),
        ("[1, 2]\n", "mapping"),
        ("a: [\n", "not valid YAML"),
        ("1: {type: choice, values: [1]}\n", "dotted config key"),
    ],
)
def test_bad_files_are_refused_naming_the_file(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SearchSpaceError, match=words) as e:
        load_search_space(path)
    assert str(path) in str(e.value)


def test_missing_file_lists_the_packaged_spaces() -> None:
    with pytest.raises(SearchSpaceError, match="packaged: .*smoke"):
        load_search_space("no_such_space")


def test_key_valid_for_one_method_is_refused_for_another(tmp_path: Path) -> None:
    path = write(tmp_path, {"method.tau_pmc": {"type": "uniform", "low": 0.05, "high": 0.5}})
    load_search_space(path, method="lpcgma")
    with pytest.raises(SearchSpaceError, match="unknown config key for method 'self_training'"):
        load_search_space(path, method="self_training")


def test_bounds_are_checked_against_the_base_config(tmp_path: Path) -> None:
    # eval_stride must stay <= eval_window of *this* base config (128 in synthetic.yaml)
    path = write(tmp_path, {"train.eval_stride": {"type": "int", "low": 64, "high": 256}})
    load_search_space(path, method="lpcgma")  # fine against the defaults (window 512)
    base = load_config(REPO / "lpcgma" / "configs" / "synthetic.yaml")
    with pytest.raises(SearchSpaceError, match="train.eval_stride"):
        load_search_space(path, base=base)


def test_numbers_written_without_a_dot_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, "optim.lr: {type: loguniform, low: 1e-4, high: 1e-2, comment: lr}\n")
    p = load_search_space(path).params[0]
    assert (p.low, p.high) == (1e-4, 1e-2)


def test_choice_values_take_the_field_type(tmp_path: Path) -> None:
    path = write(tmp_path, {"optim.head_lr_mult": {"type": "choice", "values": [5, 10]}})
    p = load_search_space(path).params[0]
    assert p.values == (5.0, 10.0) and all(type(v) is float for v in p.values)


def test_default_outside_a_choice_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, {"method.gaussians_per_class": {"type": "choice", "values": [2, 8]}})
    cfg = load_config(None, ["method.name=lpcgma"])  # K = 4
    space = load_search_space(path, base=cfg)
    with pytest.raises(SearchSpaceError, match="not among the choices"):
        defaults_point(space, cfg)


# ------------------------------------------------------------------------------ conversion
def test_conversion_to_tune_and_optuna_keeps_bounds(tmp_path: Path) -> None:
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical, Float, Integer

    path = write(
        tmp_path,
        {
            "method.tau_pmc": {"type": "loguniform", "low": 0.03, "high": 0.5},
            "method.minority_boost": {"type": "uniform", "low": 0.0, "high": 1.0},
            "method.gaussians_per_class": {"type": "int", "low": 1, "high": 4},
            "method.use_pix": {"type": "choice", "values": [True, False]},
        },
    )
    space = load_search_space(path)
    tune_space = space.to_tune()
    assert isinstance(tune_space["method.tau_pmc"], Float) and (
        tune_space["method.tau_pmc"].lower,
        tune_space["method.tau_pmc"].upper,
    ) == (0.03, 0.5)
    k = tune_space["method.gaussians_per_class"]
    assert isinstance(k, Integer)
    draws = {k.sample() for _ in range(400)}
    assert draws == {1, 2, 3, 4}  # int: inclusive high
    assert isinstance(tune_space["method.use_pix"], Categorical)
    dists = OptunaSearch.convert_search_space(tune_space)
    assert (dists["method.gaussians_per_class"].low, dists["method.gaussians_per_class"].high) == (1, 4)
    assert dists["method.tau_pmc"].log and dists["method.tau_pmc"].high == 0.5
    assert list(dists["method.use_pix"].choices) == [True, False]


# ------------------------------------------------------------------------------ fuzzing
KEYS = valid_keys("lpcgma")
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
entry = st.one_of(
    values,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["uniform", "loguniform", "int", "choice", "normal", 3])},
        optional={"low": values, "high": values, "values": values, "comment": values, "step": values},
    ),
)
spaces = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.integers()), entry, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(spaces, values))
def test_fuzz_parse_loads_or_raises_search_space_error(data: object) -> None:
    try:
        space = parse_search_space(data, "fuzz.yaml", method="lpcgma")
    except SearchSpaceError as e:
        assert "fuzz.yaml" in str(e)
        return
    for p in space.params:  # whatever loads converts and has sane bounds
        p.to_tune()
        if p.type != "choice":
            assert p.low < p.high and math.isfinite(p.low) and math.isfinite(p.high)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=100).map(lambda b: b.decode("latin-1"))))
def test_fuzz_load_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    with contextlib.suppress(SearchSpaceError):
        load_search_space(path)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(space=spaces)
def test_fuzz_yaml_round_trip(tmp_path: Path, space: dict) -> None:
    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump(space))
    except (yaml.YAMLError, ValueError):
        return
    with contextlib.suppress(SearchSpaceError):
        load_search_space(path)


# ------------------------------------------------------------------------------ installation
@pytest.mark.slow
def test_a_built_wheel_ships_the_search_spaces(tmp_path: Path) -> None:
    """A normal (non-editable) install finds the search spaces: they are package data."""
    import shutil
    import subprocess
    import sys

    src = tmp_path / "src"  # build from a copy: a build leaves build/ and *.egg-info beside its sources
    shutil.copytree(REPO / "lpcgma", src / "lpcgma", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    out = tmp_path / "wheel"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = out.glob("lpcgma-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("smoke", "synthetic", "loveda", "isprs"):
        assert f"lpcgma/search_spaces/{name}.yaml" in names
    assert "lpcgma/distributed/search.py" in names and "lpcgma/distributed/asha.py" in names
