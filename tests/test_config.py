"""The config tree: YAML loading, dotted overrides, typed method sections, validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lpcgma.config import (
    ConfigError,
    LPCGMAConfig,
    dump_config,
    flatten,
    load_config,
    parse_override,
    replace,
    valid_keys,
)

CONFIGS = Path(__file__).resolve().parents[1] / "lpcgma" / "configs"


def test_defaults_validate_and_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["method.name=lpcgma", "method.tau_pmc=0.07"])
    assert isinstance(cfg.method, LPCGMAConfig)
    assert cfg.method.tau_pmc == pytest.approx(0.07)
    f = tmp_path / "c.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(f) == cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_packaged_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.train.iters > 0


def test_every_packaged_key_is_commented() -> None:
    for path in CONFIGS.glob("*.yaml"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            body = line.split("#", 1)[0].rstrip()
            if body.strip().endswith(":") or not body.strip():
                continue  # section headers and blank/comment lines
            if body.startswith("  ") and ":" in body:
                assert "#" in line or path.name != "synthetic.yaml", f"{path.name}:{n} has no comment"


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'method.tau_pmcc'.*method.tau_pmc"):
        load_config(None, ["method.name=lpcgma", "method.tau_pmcc=0.1"])


def test_key_of_another_method_is_refused() -> None:
    with pytest.raises(ConfigError, match="method.tau_pmc"):
        load_config(None, ["method.name=self_training", "method.tau_pmc=0.1"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.iters=abc", "train.iters.*integer"),
        ("train.iters=0", "train.iters.*> 0"),
        ("method.name=nope", "method.name.*expected one of"),
        ("model.backbone=vgg", "model.backbone.*expected one of"),
        ("data.scale_range=[2.0, 1.0]", "data.scale_range"),
        ("data.eval_scale=0", "data.eval_scale"),
        ("data.source_blur_prob=1.5", "data.source_blur_prob.*probability in \\[0, 1\\]"),
        ("data.source_noise_prob=-0.1", "data.source_noise_prob.*probability"),
        ("data.source_noise_std=0", "data.source_noise_std.*> 0"),
        ("train.precise_bn_batches=-1", "train.precise_bn_batches.*>= 0"),
        ("model.pretrained=maybe", "model.pretrained.*true or false"),
    ],
)
def test_bad_values_name_the_key(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("method.class_threshold_momentum=1.5", "method.class_threshold_momentum.*in \\[0, 1\\]"),
        ("method.class_thresholds=maybe", "method.class_thresholds.*true or false"),
        ("method.teacher_scales=[]", "method.teacher_scales.*one or more factors in \\(0, 4\\]"),
        ("method.teacher_scales=[1.0,0]", "method.teacher_scales.*one or more factors"),
        ("method.teacher_scales=[5]", "method.teacher_scales.*one or more factors"),
    ],
)
def test_bad_self_training_values_name_the_key(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["method.name=self_training", override])


@pytest.mark.parametrize(
    ("method", "override", "match"),
    [
        ("lpcgma", "method.gmm_push_per_class=0", "method.gmm_push_per_class.*>= 1"),
        ("lpcgma", "method.tau_pmc=0", "method.tau_pmc.*a temperature"),
        ("lpcgma", "method.gaussians_per_class=0", "method.gaussians_per_class.*>= 1"),
        ("lpcgma", "method.base_rate=0", "method.base_rate.*in \\(0, 1\\]"),
        ("lpcgma", "method.gmm_var_floor=0", "method.gmm_var_floor.*> 0"),
        ("lpcgma", "method.teacher_scales=[0]", "method.teacher_scales.*one or more factors"),  # inherited rule
        ("lpcgma", "method.rev_momentum=1.5", "method.rev_momentum.*in \\[0, 1\\]"),
        ("sdca", "method.final_st_iters=400", "method.final_st_iters.*in \\[0, train.iters\\) = \\[0, 400\\)"),
        ("sdca", "method.final_st_source_weight=-1", "method.final_st_source_weight.*>= 0"),
        ("sdca", "method.sdca_tau=0", "method.sdca_tau.*a temperature"),
        ("bida", "method.lambda_contrast=-0.1", "method.lambda_contrast.*>= 0"),
        ("source_only", "method.tau_proj=0", "method.tau_proj.*a temperature"),
    ],
)
def test_each_method_checks_its_own_values(method: str, override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"method.name={method}", "train.iters=400", override])
    load_config(None, [f"method.name={method}", "train.iters=400"])  # its defaults pass


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.yaml' is empty"):
        load_config(empty)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {iters: [}")
    with pytest.raises(ConfigError, match="bad.yaml' is not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_flatten_uses_the_dotted_names() -> None:
    cfg = load_config(None, ["method.name=lpcgma"])
    flat = flatten(cfg)
    assert flat["method.tau_pmc"] == cfg.method.tau_pmc  # type: ignore[attr-defined]
    assert set(flat) == set(valid_keys("lpcgma"))
    assert replace(cfg, {"method.tau_pmc": 0.2}).method.tau_pmc == 0.2  # type: ignore[attr-defined]


def test_parse_override_reads_yaml_values() -> None:
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")


@settings(max_examples=200, deadline=None)
@given(
    key=st.sampled_from(valid_keys("lpcgma") + ["data.nope", "x", "method.zzz", "train"]),
    value=st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(), st.none()),
)
def test_fuzz_overrides_either_load_or_raise_config_error(key: str, value: object) -> None:
    try:
        cfg = load_config(None, {"method.name": "lpcgma", key: value})
    except ConfigError as e:
        assert str(e)
    else:
        yaml.safe_load(dump_config(cfg))  # anything accepted is a valid, dumpable config


def test_the_schedule_evaluates_and_checkpoints_on_its_intervals_and_at_the_last_step() -> None:
    t = load_config(None, ["train.iters=10", "train.eval_every=4", "train.checkpoint_every=3"]).train
    assert [s for s in range(1, 11) if t.is_eval_step(s)] == [4, 8, 10]
    assert [s for s in range(1, 11) if t.is_checkpoint_step(s)] == [3, 6, 9, 10]
    assert t.evaluations() == 3
    assert load_config(None, ["train.iters=12", "train.eval_every=4"]).train.evaluations() == 3
