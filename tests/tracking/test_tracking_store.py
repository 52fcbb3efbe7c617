"""Tracking URI resolution and the project's local store."""

from __future__ import annotations

from pathlib import Path

import pytest

from lpcgma.config import ConfigError, TrackingConfig
from lpcgma.tracking import store


def test_config_uri_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert store.resolve_tracking_uri(TrackingConfig(tracking_uri="http://127.0.0.1:2")) == "http://127.0.0.1:2"
    assert store.resolve_tracking_uri(TrackingConfig()) == "http://127.0.0.1:1"
    assert store.resolve_tracking_uri(TrackingConfig(), explicit="sqlite:///x/mlflow.db") == "sqlite:///x/mlflow.db"


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "./mlruns", "mlruns"])
def test_a_file_store_is_refused_naming_where_it_came_from(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///ok/mlflow.db")
    with pytest.raises(ConfigError, match=r"tracking\.tracking_uri = .*file store.*sqlite:///"):
        store.resolve_tracking_uri(TrackingConfig(tracking_uri=uri))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ConfigError, match=r"\$MLFLOW_TRACKING_URI"):
        store.resolve_tracking_uri(TrackingConfig())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-in is respected
    assert store.resolve_tracking_uri(TrackingConfig()) == uri


@pytest.mark.parametrize("uri", ["sqlite:///x/mlflow.db", "http://127.0.0.1:5000", "databricks", "postgresql://h/db"])
def test_database_server_and_hosted_uris_pass(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert store.resolve_tracking_uri(TrackingConfig(tracking_uri=uri)) == uri


def test_default_is_the_checkout_mlflow_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "project_root", lambda: tmp_path / "repo")
    uri = store.resolve_tracking_uri(TrackingConfig())
    assert uri == f"sqlite:///{tmp_path}/repo/mlflow/mlflow.db"
    assert (tmp_path / "repo/mlflow/artifacts").is_dir()
    assert not (tmp_path / "repo/mlflow/__init__.py").exists()
    assert store.is_local_store(uri)


def test_installed_package_falls_back_to_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "project_root", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert store.resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"


def test_this_checkout_is_detected() -> None:
    root = store.project_root()
    assert root is not None and (root / "pyproject.toml").is_file()
    assert not (root / "mlflow" / "__init__.py").exists(), "mlflow/ must never become a package"


def test_local_store_experiments_keep_artifacts_beside_the_database(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    location = store.artifact_location_for(uri, "my exp/1")
    assert location == (tmp_path / "artifacts" / "my_exp_1").as_uri()
    assert store.artifact_location_for("http://127.0.0.1:5000", "x") is None


def test_ui_command_and_run_url() -> None:
    uri = "sqlite:////repo/mlflow/mlflow.db"
    assert store.ui_command(uri) == f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    assert store.run_url(uri, "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert store.run_url("http://10.0.0.5:5000/", "3", "abc") == "http://10.0.0.5:5000/#/experiments/3/runs/abc"
