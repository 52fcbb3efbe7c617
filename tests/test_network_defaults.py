"""What listens where by default, without starting a server: `mlflow/server.sh` binds 127.0.0.1 (and
refuses any other address without authentication), `lpcgma tune`'s local Ray keeps its dashboard on
127.0.0.1 and token authentication on. The real MLflow server's socket is checked by
tracking/test_mlflow_server.py (slow); the cluster configs by test_clusters.py."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "mlflow" / "server.sh"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _server_sh(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str] | None]:
    """Run server.sh with a stand-in `mlflow` that records its arguments; (result, the arguments or None)."""
    args_file = tmp_path / "args"
    fake = tmp_path / "fake-mlflow"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{args_file}"\n')
    fake.chmod(0o755)
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "MLFLOW_BIN": str(fake),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/store/mlflow.db",  # never the repo's store
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        **env,
    }
    r = subprocess.run([str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=60)
    return r, args_file.read_text().splitlines() if args_file.is_file() else None


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_server_sh_binds_loopback_by_default(tmp_path: Path) -> None:
    r, args = _server_sh(tmp_path)
    assert r.returncode == 0, r.stderr
    assert args is not None and args[0] == "server"
    assert _option(args, "--host") == "127.0.0.1" and _option(args, "--port") == "5000"
    assert "--app-name" not in args  # loopback needs no auth app


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5"])
def test_server_sh_refuses_any_other_address_without_auth(tmp_path: Path, host: str) -> None:
    r, args = _server_sh(tmp_path, MLFLOW_HOST=host)
    assert r.returncode == 2 and f"refusing to bind {host} without authentication" in r.stderr
    assert args is None  # mlflow was never started


def test_server_sh_exposed_only_with_basic_auth_and_never_prints_the_store_password(tmp_path: Path) -> None:
    secret = "planted-db-password-0123"
    r, args = _server_sh(
        tmp_path,
        MLFLOW_HOST="0.0.0.0",
        MLFLOW_AUTH="basic-auth",
        MLFLOW_ALLOWED_HOSTS="head.internal:5000",
        MLFLOW_BACKEND_STORE_URI=f"postgresql://mlflow:{secret}@db.internal:5432/mlflow",
    )
    assert r.returncode == 0, r.stderr
    assert args is not None and _option(args, "--host") == "0.0.0.0"
    assert _option(args, "--app-name") == "basic-auth" and _option(args, "--allowed-hosts") == "head.internal:5000"
    assert secret not in r.stdout + r.stderr and "mlflow:***@db.internal" in r.stderr


def test_local_ray_of_lpcgma_tune_keeps_the_dashboard_on_loopback_and_token_auth_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`run_search` without --address starts Ray with `init_ray`: no host or auth setting of ours
    overrides Ray's defaults, which are a 127.0.0.1 dashboard and token authentication for a new
    local cluster (RAY_AUTH_MODE unset → token; Ray 2.60)."""
    import ray
    import ray._private.worker as ray_worker
    from ray._private.authentication import authentication_token_setup as auth

    from lpcgma.distributed.search import init_ray
    from lpcgma.distributed.search_types import SearchSettings

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    assert init_ray(SearchSettings(num_cpus=1))
    (kwargs,) = calls
    assert "address" not in kwargs  # a new local cluster
    dashboard_default = inspect.signature(ray_worker.init).parameters["dashboard_host"].default
    assert kwargs.get("dashboard_host", dashboard_default) in LOOPBACK
    assert "auth" not in str(kwargs.get("_system_config", {})).lower()
    assert os.environ.get("RAY_AUTH_MODE") is None  # lpcgma sets no auth mode: Ray's default applies

    # Ray's default for a new local cluster: token auth, unless the user opted out explicitly
    assert "enable_token_auth_by_default()" in inspect.getsource(ray_worker.init)
    enabled: list[bool] = []
    monkeypatch.setattr(auth, "_enable_token_auth", lambda: enabled.append(True))
    monkeypatch.setattr(auth, "_warn_token_auth_enabled", lambda: None)
    assert auth.enable_token_auth_by_default() and enabled == [True]


def test_nothing_in_the_repository_turns_ray_token_auth_off() -> None:
    files = [*(REPO / "lpcgma").rglob("*.py"), *(REPO / "lpcgma").rglob("*.yaml")]
    files += [*(REPO / "experiments").rglob("*.py")]
    files += [p for p in (REPO / "clusters").iterdir() if p.is_file()] + [*(REPO / "mlflow").glob("*.*")]
    files += [REPO / "Makefile", REPO / ".ci" / "run"]
    assert len(files) > 20
    pattern = re.compile(r"RAY_AUTH_MODE\W{0,3}(disabled|none|off)", re.IGNORECASE)
    texts = {str(p.relative_to(REPO)): p.read_text(errors="ignore") for p in files if p.suffix != ".db"}
    assert not [name for name, text in texts.items() if pattern.search(text)]
    for cluster in ("aws.yaml", "local.yaml"):  # every `ray start` of the launcher configs has it on
        cfg = yaml.safe_load((REPO / "clusters" / cluster).read_text())
        commands = cfg["head_start_ray_commands"] + (cfg.get("worker_start_ray_commands") or [])
        starts = [c for c in commands if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), starts
