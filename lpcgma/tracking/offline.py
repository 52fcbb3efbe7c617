"""Logging that survives a down or slow tracking server: retry briefly, then record locally, sync later.

`RunLogger` performs every MLflow write of one run (start, params, tags, metrics, artifacts, end) as
a small record. Online, a record is applied at once; a failure is retried a few times with a short
backoff (``0.5 s, 1 s``). When the server still does not answer, the logger goes offline: this
record and every later one are appended to ``mlflow_offline.jsonl`` in the run folder (artifacts are
first copied into ``mlflow_offline_files/`` so pruned checkpoints are not lost) and training goes on.
While offline, the logger tries at most once per ``probe_every_s`` to replay the pending records;
once the server answers, it catches up and continues online. Whatever is still pending when the
process ends is uploaded by ``lpcgma mlflow sync --run-dir DIR`` (`sync_run_dir`).

A run started while the server was down gets a placeholder id (``offline-…``); replaying its
``start`` record creates the real run and maps the placeholder onto it. Replay keeps the original
metric timestamps and steps and the original end time. Progress is kept in
``mlflow_offline.state.json`` (records done, placeholder → run id), so a sync can be repeated and
never uploads a record twice. Errors that retrying cannot fix (HTTP 4xx, e.g. changing a logged
param) are reported and skipped, never recorded.

HTTP requests use short timeouts unless set by the user: ``MLFLOW_HTTP_REQUEST_TIMEOUT=30``,
``MLFLOW_HTTP_REQUEST_MAX_RETRIES=1`` (MLflow's defaults, 120 s and 7 retries with exponential
backoff, would stall training for minutes per call).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

RECORD_FILE = "mlflow_offline.jsonl"
STATE_FILE = "mlflow_offline.state.json"
LOCK_FILE = "mlflow_offline.lock"
FILES_DIR = "mlflow_offline_files"
OFFLINE_PREFIX = "offline-"

_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.2",
}
_BATCH_PARAMS = 100
_BATCH_METRICS = 1000


class PermanentTrackingError(RuntimeError):
    """MLflow refused a record for a reason retrying cannot fix (HTTP 4xx)."""


def apply_http_defaults() -> None:
    """Short MLflow HTTP timeouts and retries, unless the user set them."""
    for k, v in _HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)


def is_permanent(error: BaseException) -> bool:
    """True for MLflow errors a retry cannot fix (bad request, conflict, not found)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, PermanentTrackingError):
        return True
    if isinstance(error, MlflowException):
        return 400 <= int(error.get_http_status_code()) < 500
    return False


def now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------- replay
@dataclass
class SyncResult:
    """What one replay did: records applied, skipped (permanent errors), still pending."""

    applied: int = 0
    skipped: int = 0
    pending: int = 0
    run_ids: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.pending == 0


@contextmanager
def _locked(record_dir: Path) -> Iterator[None]:
    record_dir.mkdir(parents=True, exist_ok=True)
    with open(record_dir / LOCK_FILE, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_state(record_dir: Path) -> dict[str, Any]:
    p = record_dir / STATE_FILE
    if p.is_file():
        state: dict[str, Any] = json.loads(p.read_text())
        return state
    return {"done": 0, "ids": {}}


def _write_state(record_dir: Path, state: Mapping[str, Any]) -> None:
    tmp = record_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(record_dir / STATE_FILE)


def _read_records(record_dir: Path) -> list[dict[str, Any]]:
    p = record_dir / RECORD_FILE
    if not p.is_file():
        return []
    records = []
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write: nothing after it is valid
                log.warning("skipping a truncated line in %s", p)
    return records


def pending_records(record_dir: str | Path) -> int:
    """How many records of `record_dir` have not reached MLflow yet."""
    d = Path(record_dir)
    return max(0, len(_read_records(d)) - int(_read_state(d)["done"]))


def synced_run_ids(record_dir: str | Path) -> dict[str, str]:
    """Placeholder → real run ids of the runs `record_dir`'s offline records created so far."""
    return dict(_read_state(Path(record_dir)).get("ids", {}))


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def apply_record(client: Any, uri: str, record: Mapping[str, Any], ids: dict[str, str], record_dir: Path) -> None:
    """Apply one record to MLflow (`ids` maps placeholder run ids to real ones and is updated)."""
    from mlflow.entities import Metric, Param, RunTag

    from lpcgma.tracking.store import get_or_create_experiment

    op = record["op"]
    if op == "start":
        if record.get("run_id"):
            client.update_run(record["run_id"], status="RUNNING")
            ids[record["id"]] = record["run_id"]
            return
        exp_id = get_or_create_experiment(client, uri, record["experiment"])
        run = client.create_run(
            exp_id,
            start_time=record.get("time"),
            tags=record.get("tags") or {},
            run_name=record.get("run_name"),
        )
        ids[record["id"]] = run.info.run_id
        return
    run_id = ids.get(record["id"], record["id"])
    if run_id.startswith(OFFLINE_PREFIX):
        raise PermanentTrackingError(f"run {run_id} was never started")
    if op == "params":
        params = [Param(k, str(v)) for k, v in record["params"].items()]
        for chunk in _chunks(params, _BATCH_PARAMS):
            client.log_batch(run_id, params=chunk)
    elif op == "tags":
        tags = [RunTag(k, str(v)) for k, v in record["tags"].items()]
        for chunk in _chunks(tags, _BATCH_PARAMS):
            client.log_batch(run_id, tags=chunk)
    elif op == "metrics":
        ts, step = int(record["timestamp"]), int(record["step"])
        metrics = [Metric(k, float(v), ts, step) for k, v in record["metrics"].items()]
        for chunk in _chunks(metrics, _BATCH_METRICS):
            client.log_batch(run_id, metrics=chunk)
    elif op == "artifact":
        path = Path(record["path"])
        path = path if path.is_absolute() else record_dir / path
        if not path.exists():
            raise PermanentTrackingError(f"artifact file {path} is gone")
        if path.is_dir():
            client.log_artifacts(run_id, str(path), record.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), record.get("artifact_path"))
    elif op == "text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif op == "end":
        client.set_terminated(run_id, status=record["status"], end_time=record.get("end_time"))
    else:
        raise PermanentTrackingError(f"unknown record op {op!r}")


def replay(record_dir: str | Path, tracking_uri: str | None = None, attempts: int = 1) -> SyncResult:
    """Upload the pending records of `record_dir` in order; stop at the first transient failure."""
    from mlflow.tracking import MlflowClient

    d = Path(record_dir)
    result = SyncResult()
    with _locked(d):
        records = _read_records(d)
        state = _read_state(d)
        done = int(state["done"])
        ids: dict[str, str] = dict(state.get("ids", {}))
        uri = (
            tracking_uri
            or state.get("tracking_uri")
            or next((r["tracking_uri"] for r in records if r.get("tracking_uri")), None)
        )
        if uri is None and done < len(records):
            raise ValueError(f"no tracking URI recorded in {d / RECORD_FILE}; pass --tracking-uri")
        if uri and uri.startswith("http"):
            apply_http_defaults()
        client = MlflowClient(uri) if done < len(records) else None
        try:
            for record in records[done:]:
                try:
                    retry(apply_record, client, uri or "", record, ids, d, attempts=attempts)
                    result.applied += 1
                except Exception as e:
                    if not is_permanent(e):
                        raise
                    result.skipped += 1
                    result.errors.append(f"{record.get('op')}: {e}")
                    log.warning("MLflow refused an offline %s record, skipped: %s", record.get("op"), e)
                done += 1
        except Exception as e:
            result.errors.append(f"{type(e).__name__}: {e}")
        finally:
            _write_state(d, {"done": done, "ids": ids, "tracking_uri": uri})
        result.pending = len(records) - done
        result.run_ids = ids
    return result


def sync_run_dir(run_dir: str | Path, tracking_uri: str | None = None, attempts: int = 3) -> SyncResult:
    """Upload every pending offline record found in `run_dir` (and its sub-folders, e.g. trials)."""
    root = Path(run_dir)
    if not root.exists():
        raise FileNotFoundError(f"run folder '{root}' does not exist")
    total = SyncResult()
    for record_file in sorted(root.rglob(RECORD_FILE)):
        r = replay(record_file.parent, tracking_uri, attempts)
        total.applied += r.applied
        total.skipped += r.skipped
        total.pending += r.pending
        total.run_ids.update(r.run_ids)
        total.errors.extend(r.errors)
    return total


def retry(fn: Callable[..., T], *args: Any, attempts: int = 3, backoff_s: float = 0.5, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`; on a transient error wait `backoff_s`, 2·`backoff_s`, … and try again."""
    for i in range(max(1, attempts)):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if is_permanent(e) or i >= attempts - 1:
                raise
            time.sleep(backoff_s * (2**i))
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------ the logger
class RunLogger:
    """All MLflow writes of one run: online with retries, else appended to the run folder's record."""

    def __init__(
        self,
        tracking_uri: str,
        record_dir: str | Path,
        attempts: int = 3,
        backoff_s: float = 0.5,
        probe_every_s: float = 60.0,
    ) -> None:
        from mlflow.tracking import MlflowClient

        if tracking_uri.startswith("http"):
            apply_http_defaults()
        self.tracking_uri = tracking_uri
        self.record_dir = Path(record_dir)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.probe_every_s = probe_every_s
        self.client = MlflowClient(tracking_uri)
        self.run_id: str | None = None  # real id, or an offline placeholder until synced
        self.offline = False
        self._ids: dict[str, str] = {}
        self._last_probe = 0.0

    # ------------------------------------------------------------------------------ public ops
    def start_run(
        self, experiment: str, run_name: str | None, tags: Mapping[str, str], run_id: str | None = None
    ) -> str:
        """Start a new run (or continue `run_id`); returns its id (a placeholder while offline)."""
        local_id = run_id or f"{OFFLINE_PREFIX}{uuid.uuid4().hex}"
        self.run_id = local_id
        self._submit(
            {
                "op": "start",
                "id": local_id,
                "run_id": run_id,
                "experiment": experiment,
                "run_name": run_name,
                "tags": dict(tags),
                "time": now_ms(),
                "tracking_uri": self.tracking_uri,
            }
        )
        return self.current_run_id

    def attach(self, run_id: str) -> None:
        """Log into an existing run without changing its status (e.g. a search's parent run)."""
        self.run_id = run_id

    @property
    def current_run_id(self) -> str:
        assert self.run_id is not None, "start_run first"
        return self._ids.get(self.run_id, self.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if params:
            self._submit({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags:
            self._submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp: int | None = None) -> None:
        if metrics:
            values = {k: float(v) for k, v in metrics.items()}
            self._submit({"op": "metrics", "metrics": values, "step": int(step), "timestamp": timestamp or now_ms()})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under `artifact_path`."""
        self._submit({"op": "artifact", "path": str(Path(local_path).resolve()), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit({"op": "text", "text": text, "artifact_file": artifact_file})

    def end_run(self, status: str = "FINISHED", end_time: int | None = None) -> None:
        self._submit({"op": "end", "status": status, "end_time": end_time or now_ms()})

    def flush(self) -> bool:
        """Try to upload pending records now; True when nothing is pending."""
        if not self.offline:
            return True
        self._last_probe = 0.0
        return self._probe()

    # ------------------------------------------------------------------------------- internals
    def _submit(self, record: dict[str, Any]) -> None:
        record.setdefault("id", self.run_id)
        if self.offline and not self._probe():
            self._append(record)
            return
        try:
            retry(
                apply_record,
                self.client,
                self.tracking_uri,
                record,
                self._ids,
                self.record_dir,
                attempts=self.attempts,
                backoff_s=self.backoff_s,
            )
        except Exception as e:
            if is_permanent(e):
                log.warning("MLflow refused %s (not retried, not recorded): %s", record["op"], e)
                return
            log.warning(
                "MLflow at %s is unreachable (%s: %s); recording to %s until it is back "
                "(upload later with `lpcgma mlflow sync --run-dir %s`)",
                self.tracking_uri,
                type(e).__name__,
                str(e)[:200],
                self.record_dir / RECORD_FILE,
                self.record_dir,
            )
            self.offline = True
            self._last_probe = time.monotonic()
            self._append(record)

    def _probe(self) -> bool:
        """While offline: at most once per probe interval, replay the pending records."""
        if time.monotonic() - self._last_probe < self.probe_every_s:
            return False
        self._last_probe = time.monotonic()
        result = replay(self.record_dir, self.tracking_uri, attempts=1)
        self._ids.update(result.run_ids)
        if result.complete:
            log.warning("MLflow at %s is back: %d offline records uploaded", self.tracking_uri, result.applied)
            self.offline = False
            return True
        return False

    def _append(self, record: dict[str, Any]) -> None:
        with _locked(self.record_dir):
            if record["op"] == "artifact":
                record = dict(record, path=self._snapshot(Path(record["path"]), record.get("artifact_path")))
            record.setdefault("tracking_uri", self.tracking_uri)
            state = _read_state(self.record_dir)
            if any(state["ids"].get(k) != v for k, v in self._ids.items()):  # ids known only in memory
                state["ids"] = {**state["ids"], **self._ids}
                state.setdefault("tracking_uri", self.tracking_uri)
                _write_state(self.record_dir, state)
            with open(self.record_dir / RECORD_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def _snapshot(self, path: Path, artifact_path: str | None) -> str:
        """Copy an artifact into the record folder, keyed by its destination (the newest copy wins)."""
        dest = self.record_dir / FILES_DIR / (artifact_path or "_root") / path.name
        if dest.resolve() == path.resolve():
            return str(dest.relative_to(self.record_dir))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        if path.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp)
            shutil.rmtree(dest, ignore_errors=True)
        else:
            shutil.copy2(path, tmp)
        tmp.replace(dest)
        return str(dest.relative_to(self.record_dir))


__all__ = [
    "FILES_DIR",
    "OFFLINE_PREFIX",
    "RECORD_FILE",
    "STATE_FILE",
    "PermanentTrackingError",
    "RunLogger",
    "SyncResult",
    "apply_http_defaults",
    "pending_records",
    "replay",
    "retry",
    "sync_run_dir",
    "synced_run_ids",
]
