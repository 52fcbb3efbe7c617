"""Cloud credentials kept out of Ray's runtime environments, and so out of Ray's logs.

Ray Tune copies ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` and
``AWS_SECURITY_TOKEN`` from the driver's environment into every trial's ``runtime_env`` when it
registers the trainable, and Ray's runtime-env agent writes that environment to
``runtime_env_agent.log`` in plain text. `credentials_out_of_env` moves them, for the duration of
``Tuner.fit``, into a private AWS shared-credentials file (mode 0600, in its own temporary folder,
deleted afterwards) named by ``AWS_SHARED_CREDENTIALS_FILE`` and ``AWS_PROFILE`` — a path and a
profile name, not secrets — which the AWS SDKs (pyarrow's S3 filesystem, boto3 for MLflow) read on
this machine. Local workers inherit their environment from the Ray node started before the search;
on a cluster the nodes use their own credentials (an instance profile, clusters/README.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
PROFILE = "lpcgma-search"
_FILE_KEYS = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
}


@contextlib.contextmanager
def credentials_out_of_env() -> Iterator[Path | None]:
    """While open, the AWS credential variables are out of ``os.environ`` and in a private
    credentials file (yielded; None when the environment holds no key pair: nothing to move).
    The environment is restored on exit, whatever happens inside."""
    found = {k: os.environ[k] for k in SECRET_ENV_VARS if os.environ.get(k)}
    if not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= found.keys():
        yield None
        return
    touched = (*SECRET_ENV_VARS, "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE")
    saved = {k: os.environ.get(k) for k in touched}
    folder = Path(tempfile.mkdtemp(prefix="lpcgma-aws-"))  # 0700
    path = folder / "credentials"
    token = found.get("AWS_SESSION_TOKEN") or found.get("AWS_SECURITY_TOKEN")
    lines = [f"[{PROFILE}]"] + [f"{_FILE_KEYS[k]} = {found[k]}" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    if token:
        lines.append(f"aws_session_token = {token}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        for k in SECRET_ENV_VARS:
            os.environ.pop(k, None)
        os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(path)
        os.environ["AWS_PROFILE"] = PROFILE
        yield path
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(folder, ignore_errors=True)
