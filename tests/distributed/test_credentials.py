"""AWS credentials move out of the environment (where Ray Tune would copy them into each trial's
runtime_env and Ray's logs) into a private credentials file the AWS SDKs read, and back."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lpcgma.distributed.credentials import PROFILE, SECRET_ENV_VARS, credentials_out_of_env

KEY, SECRET, TOKEN = "AKIAPLANTEDKEY000001", "planted-secret-lpcgma-3f9d", "planted-token-lpcgma-77aa"


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE", raising=False)
    monkeypatch.setenv("AWS_PROFILE", "users-own-profile")


def test_inside_the_environment_holds_no_secret_and_boto3_still_authenticates(planted: None) -> None:
    import boto3

    with credentials_out_of_env() as path:
        assert path is not None and not any(k in os.environ for k in SECRET_ENV_VARS)
        assert not any(SECRET in v or TOKEN in v for v in os.environ.values())
        assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] == str(path) and os.environ["AWS_PROFILE"] == PROFILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        creds = boto3.Session().get_credentials().get_frozen_credentials()
        assert (creds.access_key, creds.secret_key, creds.token) == (KEY, SECRET, TOKEN)
    assert not path.exists() and not path.parent.exists()
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == (KEY, SECRET)
    assert os.environ["AWS_SESSION_TOKEN"] == TOKEN and os.environ["AWS_PROFILE"] == "users-own-profile"
    assert "AWS_SHARED_CREDENTIALS_FILE" not in os.environ


def test_the_environment_is_restored_when_the_search_fails(planted: None) -> None:
    folder: Path | None = None
    with pytest.raises(RuntimeError, match="trial crashed"), credentials_out_of_env() as path:
        assert path is not None
        folder = path.parent
        raise RuntimeError("trial crashed")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET and folder is not None and not folder.exists()


def test_without_a_key_pair_nothing_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in SECRET_ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)  # a key id alone is not a credential
    before = dict(os.environ)
    with credentials_out_of_env() as path:
        assert path is None and dict(os.environ) == before
    assert dict(os.environ) == before
