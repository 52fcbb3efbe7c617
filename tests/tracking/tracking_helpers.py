"""Helpers for the tracking tests: a real `mlflow server` process on 127.0.0.1 (started and stopped by
PID; `moto_server` and the process helpers come from tests/server_helpers.py) and a stand-in trainer
for callback unit tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from server_helpers import (
    BIN,
    MotoServer,  # noqa: F401 - re-exported for the tracking tests
    free_port,
    stop_process,
    wait_http,
)

REPO = Path(__file__).resolve().parents[2]


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1 (one worker, no job runner)."""

    def __init__(self, root: Path, artifact_args: list[str] | None = None, env: dict[str, str] | None = None):
        self.root = root
        self.port = free_port()
        self.db = root / "server.db"
        self.artifact_args = artifact_args or ["--default-artifact-root", str(root / "server-artifacts")]
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            **self.env,
        }
        cmd = [
            str(BIN / "mlflow"),
            "server",
            "--workers",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.db}",
            *self.artifact_args,
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_http(f"{self.uri}/health", timeout, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"mlflow server did not start; log:\n{self.log.read_text()[-3000:]}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


# ------------------------------------------------------------------------------- fake trainer
def synthetic_cfg(out_dir: Path, uri: str, *extra: str) -> Any:
    from lpcgma.config import load_config

    return load_config(
        REPO / "lpcgma/configs/synthetic.yaml",
        [f"train.out_dir={out_dir}", f"tracking.tracking_uri={uri}", "tracking.experiment=tests", *extra],
    )


def fake_trainer(cfg: Any, step: int = 0) -> Any:
    """What MLflowCallback reads from a Trainer: rank, out_dir, step and the data's classes."""
    from lpcgma.data.classes import LOVEDA_CLASSES

    data = SimpleNamespace(classes=LOVEDA_CLASSES, mean=(123.0, 116.0, 103.0), std=(58.0, 57.0, 57.0))
    return SimpleNamespace(is_main=True, rank=0, out_dir=Path(cfg.train.out_dir), step=step, data=data)


def fake_report(step: int, ckpt: Path | None, is_best: bool, num_classes: int = 7) -> Any:
    from lpcgma.data.classes import LOVEDA_CLASSES
    from lpcgma.engine.trainer import EvalReport

    g = torch.Generator().manual_seed(step)
    names = LOVEDA_CLASSES.names
    metrics = {"target_miou": 0.1 * step, "target_oa": 0.5, "best_target_miou": 0.1 * step}
    metrics |= {f"target_iou/{n}": 0.05 * i for i, n in enumerate(names)}
    metrics["pmc/anchors"] = 12.0
    pseudo_confusion = None
    if step == 4:  # a self-training method's pseudo-label diagnostics at one evaluation
        from lpcgma.losses.pseudo_quality import pseudo_label_counts, pseudo_label_report

        truth = torch.randint(0, len(names), (1, 8, 8), generator=g)
        counts = pseudo_label_counts(truth.roll(1, -1), torch.rand(1, 8, 8, generator=g), truth, 0.5, len(names))
        metrics |= pseudo_label_report(counts, names)
        pseudo_confusion = counts
    previews = [
        {
            "name": f"tile_{i}.png",
            "image": torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g),
            "mask": torch.randint(0, num_classes, (32, 32), generator=g),
            "pred": torch.randint(0, num_classes, (32, 32), generator=g),
        }
        for i in range(2)
    ]
    cm = torch.randint(0, 50, (num_classes, num_classes), generator=g)
    return EvalReport(step, metrics, cm, ckpt, is_best, previews, pseudo_confusion=pseudo_confusion)


def write_fake_checkpoint(root: Path, step: int, cfg: Any) -> Path:
    from lpcgma.config import dump_config
    from lpcgma.engine.checkpoint import step_dir, write_checkpoint

    state = {"step": step, "method": {"student.w": torch.ones(4) * step, "teacher.net.w": torch.ones(4)},
             "optimizer": {"state": {}}, "method_name": "self_training", "class_names": ["a", "b"]}  # fmt: skip
    return write_checkpoint(step_dir(root, step), state, dump_config(cfg))


def all_artifacts(client: Any, run_id: str, path: str = "") -> list[str]:
    out: list[str] = []
    for a in client.list_artifacts(run_id, path or None):
        out += all_artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out
