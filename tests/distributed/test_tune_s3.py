"""A search whose storage is S3 (slow): a moto S3 server on loopback, started and stopped here."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from raytest_helpers import VENV_BIN, free_port, stop_pids

from lpcgma.distributed.search import run_search
from lpcgma.distributed.search_types import SearchSettings

pytestmark = pytest.mark.slow
PLANTED_SECRET = "planted-s3-secret-lpcgma-5c1e"


@pytest.fixture
def moto_s3(ray_tmp: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    import boto3
    import requests

    port = free_port()
    log = open(ray_tmp / "moto.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                requests.get(endpoint, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        for k, v in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET,  # moto accepts any key; this one is looked for below
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="lpcgma-test")
        yield s3
    finally:
        stop_pids([proc.pid])
        proc.wait(timeout=10)
        log.close()


def test_search_with_s3_storage(ray_tmp: Path, moto_s3) -> None:  # type: ignore[no-untyped-def]
    settings = SearchSettings(
        config="synthetic",
        search_space="smoke",
        smoke_test=True,
        num_samples=2,
        storage="s3://lpcgma-test/searches",
        name="s3smoke",
        overrides=["tracking.enabled=false"],
        verbose=0,
    )
    outcome = run_search(settings)
    assert outcome.complete and len(outcome.trials) == 2
    assert all(t.best is not None for t in outcome.trials)
    assert outcome.experiment_path == "s3://lpcgma-test/searches/s3smoke"
    keys = [
        o["Key"]
        for page in moto_s3.get_paginator("list_objects_v2").paginate(Bucket="lpcgma-test")
        for o in page.get("Contents", [])
    ]
    assert "searches/s3smoke/lpcgma_search.json" in keys
    assert any(k.startswith("searches/s3smoke/experiment_state") for k in keys)
    states = [k for k in keys if k.endswith("/state.pt") and "/checkpoint_" in k]
    assert len({k.split("/")[2] for k in states}) == 2, keys  # a trainer checkpoint from each trial
    for t in outcome.trials:
        assert t.checkpoint and t.checkpoint.startswith("s3://lpcgma-test/searches/s3smoke/"), t.checkpoint
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    # The trials wrote to S3 (above) without the secret travelling in their runtime_env: no file under
    # the Ray session folder, the trial folders or the S3 server's log holds it.
    leaks = [p for p in ray_tmp.rglob("*") if p.is_file() and PLANTED_SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert sum(1 for p in ray_tmp.rglob("*.log") if p.is_file()) > 3  # Ray's logs were there to search
