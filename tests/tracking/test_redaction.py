"""Secrets never become MLflow params, tags or artifacts."""

from __future__ import annotations

import pytest
import yaml

from lpcgma.tracking.redaction import (
    REDACTED,
    is_secret_key,
    redact_mapping,
    redact_value,
    redact_yaml_text,
)

PLANTED = "planted-AKIA-secret-value-0123456789"


@pytest.mark.parametrize(
    "key",
    [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SESSION_TOKEN",
        "api_token",
        "apiKey",
        "method.api_key",
        "MLFLOW_TRACKING_PASSWORD",
        "db.passwd",
        "client-secret",
        "private_key",
        "GITHUB_TOKEN",
        "Authorization",
    ],
)
def test_secret_looking_names_are_recognised(key: str) -> None:
    assert is_secret_key(key)


def test_every_real_config_key_is_kept() -> None:
    from lpcgma.config import METHOD_CONFIGS, valid_keys

    keys = {k for method in METHOD_CONFIGS for k in valid_keys(method)}
    assert not [k for k in keys if is_secret_key(k)]
    for k in ("ray.trial_id", "search", "mlflow.parentRunId", "monkey", "keyboard", "author"):
        assert not is_secret_key(k)


def test_mapping_drops_secret_keys_and_masks_secret_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED)
    params = {
        "api_token": "tok-123",
        "method.tau_pmc": "0.1",
        "tracking.tracking_uri": "http://alice:hunter2@mlflow.internal:5000",
        "data.root": f"/data/{PLANTED}/loveda",
    }
    kept, dropped = redact_mapping(params)
    assert dropped == ["api_token"]
    assert kept["method.tau_pmc"] == "0.1"
    assert kept["tracking.tracking_uri"] == f"http://alice:{REDACTED}@mlflow.internal:5000"
    assert PLANTED not in kept["data.root"] and REDACTED in kept["data.root"]
    assert all("hunter2" not in v and PLANTED not in v for v in kept.values())


def test_yaml_config_values_of_secret_keys_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED)
    text = yaml.safe_dump({"tracking": {"api_token": "tok-123", "experiment": "x"}, "data": {"root": PLANTED}})
    out = yaml.safe_load(redact_yaml_text(text))
    assert out["tracking"] == {"api_token": REDACTED, "experiment": "x"}
    assert out["data"]["root"] == REDACTED


def test_short_or_unrelated_env_values_are_not_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_TOKEN", "abc")  # too short to be masked everywhere
    monkeypatch.setenv("HOME_DIR_NAME", "lpcgma-synthetic")  # not a secret name
    assert redact_value("abc lpcgma-synthetic") == "abc lpcgma-synthetic"


def test_working_directory_paths_are_not_mistaken_for_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """PWD/OLDPWD hold the shell's folders: a run's out_dir under them must stay readable."""
    monkeypatch.setenv("PWD", "/home/user/project")
    monkeypatch.setenv("OLDPWD", "/home/user")
    monkeypatch.setenv("DB_PWD", "hunter2-secret")
    assert redact_value("/home/user/project/runs/tune/x") == "/home/user/project/runs/tune/x"
    assert redact_value("postgres with hunter2-secret") == f"postgres with {REDACTED}"
