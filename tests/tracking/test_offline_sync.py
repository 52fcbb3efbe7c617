"""A tracking server that cannot be reached: records go to the run folder, `mlflow sync` uploads them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tracking_helpers import free_port

from lpcgma.cli import main
from lpcgma.tracking.offline import RECORD_FILE, RunLogger, pending_records, sync_run_dir


def _offline_session(run_dir: Path, tmp_path: Path) -> tuple[RunLogger, Path]:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    lg = RunLogger(dead, run_dir, attempts=2, backoff_s=0.05, probe_every_s=3600)
    lg.start_run("tests", "offline-run", {"method": "lpcgma"})
    lg.log_params({"method.tau_pmc": 0.1})
    lg.log_metrics({"loss/total": 1.0}, step=1)
    lg.log_metrics({"loss/total": 0.5, "target_miou": 0.3}, step=2)
    ckpt = tmp_path / "state.pt"
    ckpt.write_bytes(b"x" * 10)
    lg.log_artifact(ckpt, "checkpoints/best")
    ckpt.write_bytes(b"y" * 10)  # changed after logging: the record keeps its own copy
    lg.log_text("hello", "notes/a.txt")
    lg.end_run("FINISHED")
    return lg, ckpt


def test_unreachable_server_degrades_to_a_local_record_then_syncs(tmp_path: Path, file_store: str) -> None:
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    lg, _ = _offline_session(run_dir, tmp_path)
    assert time.monotonic() - t0 < 15, "degrading must not stall training"
    assert lg.offline and lg.current_run_id.startswith("offline-")
    assert (run_dir / RECORD_FILE).is_file() and pending_records(run_dir) == 7

    result = sync_run_dir(tmp_path, tracking_uri=file_store)
    assert result.complete and result.applied == 7 and not result.errors
    run_id = result.run_ids[lg.current_run_id]
    client = MlflowClient(file_store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "offline-run"
    assert run.data.params == {"method.tau_pmc": "0.1"} and run.data.tags["method"] == "lpcgma"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss/total")] == [
        (1, 1.0),
        (2, 0.5),
    ]
    local = Path(client.download_artifacts(run_id, "checkpoints/best/state.pt", str(tmp_path / "dl")))
    assert local.read_bytes() == b"x" * 10
    assert sync_run_dir(tmp_path, tracking_uri=file_store).applied == 0  # nothing twice


def test_the_sync_command(tmp_path: Path, file_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    _offline_session(tmp_path / "run", tmp_path)
    assert main(["mlflow", "sync", "--run-dir", str(tmp_path), "--tracking-uri", file_store]) == 0
    assert '"applied": 7' in capsys.readouterr().out
    assert pending_records(tmp_path / "run") == 0


class _Flaky:
    """An MlflowClient whose calls fail while `down` (a server that went away)."""

    def __init__(self, client: MlflowClient) -> None:
        self.client, self.down = client, False

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        attr = getattr(self.client, name)

        def call(*a, **k):  # type: ignore[no-untyped-def]
            if self.down:
                raise ConnectionError("connection refused")
            return attr(*a, **k)

        return call


def test_the_logger_catches_up_when_the_server_is_back(tmp_path: Path, file_store: str) -> None:
    lg = RunLogger(file_store, tmp_path / "run", attempts=1, probe_every_s=3600)
    flaky = _Flaky(lg.client)
    lg.client = flaky  # type: ignore[assignment]
    run_id = lg.start_run("tests", "r", {})
    lg.log_metrics({"loss/total": 1.0}, step=1)
    flaky.down = True
    lg.log_metrics({"loss/total": 0.9}, step=2)
    lg.log_metrics({"loss/total": 0.8}, step=3)
    assert lg.offline and pending_records(tmp_path / "run") == 2
    flaky.down = False
    lg.probe_every_s = 0.0  # the next write first replays what is pending
    lg.log_metrics({"loss/total": 0.7}, step=4)
    lg.end_run()
    assert not lg.offline and pending_records(tmp_path / "run") == 0
    client = MlflowClient(file_store)
    assert [m.step for m in client.get_metric_history(run_id, "loss/total")] == [1, 2, 3, 4]
    assert client.get_run(run_id).info.status == "FINISHED"
