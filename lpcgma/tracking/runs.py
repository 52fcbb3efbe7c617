"""MLflow runs for training: one run per `lpcgma train`, one nested child run per Tune trial.

`MLflowCallback` plugs into the trainer (`lpcgma.engine.trainer.Callback`) and logs from rank 0
only (other ranks do nothing):

- start: a run in experiment ``tracking.experiment`` (or the run ``run_id`` continued; a resumed
  ``lpcgma train`` continues the run recorded in ``<out_dir>/mlflow_run.json``). Params: every
  resolved config key with its dotted name (``method.tau_pmc``), secrets dropped. Tags: method,
  dataset, source, target, ``domains`` (source → target), ``eval_split``, ``git_commit``, the
  caller's tags (``ray.trial_id``, ``search``) and ``mlflow.parentRunId`` for a trial. Artifact
  ``config.yaml`` (the resolved config, redacted), ``classes.json`` (class names, palette,
  normalisation: what a registered model needs) and ``plots/legend.png``.
- every log interval: the training logs as metrics with their step (``loss/total``, ``lr``, …).
- every evaluation: target mIoU, per-class IoU (``target_iou/<class>``) and the method's diagnostics
  (pseudo-label quality ``pseudo/…`` among them) as metrics with the step;
  ``plots/confusion_matrix/step_<N>.png``, ``plots/iou/step_<N>.png``,
  ``plots/pseudo_labels/step_<N>.png``, ``plots/pseudo_confusion/step_<N>.png`` (which true classes the
  confident pseudo-labels come from) and ``overlays/step_<N>/<tile>.png``; when the evaluation is
  the best so far, its model as ``checkpoints/best`` (``state.pt`` with the student's weights, step and
  classes — what promotion and prediction load, a quarter of a resumable checkpoint — + ``config.yaml``).
- end: the last checkpoint's model as ``checkpoints/final``, status FINISHED; on an exception FAILED with
  the reason in the tag ``error`` (KeyboardInterrupt / a stop request: KILLED).

All writes go through `RunLogger`: a down or slow server never stops training (see `offline`).
Only the best and final models are kept in MLflow; the resumable checkpoints (optimiser, teacher,
method state, RNG) stay in the run folder.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lpcgma.config import ExperimentConfig, dump_config, flatten
from lpcgma.engine.checkpoint import CONFIG_FILE, STATE_FILE, is_model, model_state, read_checkpoint, write_checkpoint
from lpcgma.engine.source_stage import source_key
from lpcgma.engine.trainer import Callback, EvalReport, TrainResult
from lpcgma.tracking import plots
from lpcgma.tracking.offline import OFFLINE_PREFIX, RunLogger, pending_records, synced_run_ids
from lpcgma.tracking.redaction import redact_mapping, redact_value, redact_yaml_text
from lpcgma.tracking.store import project_root, resolve_tracking_uri

if TYPE_CHECKING:
    from lpcgma.engine.trainer import Trainer

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"  # in the run folder: which MLflow run this folder logs to
CLASSES_FILE = "classes.json"  # artifact: class names, palette and normalisation of the run's data
PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "lpcgma.role"  # "train" (standalone), "trial" (a search's child), "search" (parent), "source_model"
SOURCE_MODEL_TAG = "lpcgma.source_model"  # the shared source model's key: on its own run and on the runs from it
TRIAL_TAG = "ray.trial_id"
SEARCH_TAG = "search"
EVAL_SPLIT_TAG = "eval_split"
ERROR_TAG = "error"
_MAX_TAG_LEN = 5000
_KILLED_NAMES = ("Stop", "Cancel", "Interrupt", "Preempt")


# ------------------------------------------------------------------------------------ run facts
@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the source checkout lpcgma runs from (or of the current directory), else "unknown"."""
    for where in (project_root(), Path.cwd()):
        if where is None:
            continue
        try:
            out = subprocess.run(
                ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return "unknown"


def eval_split_tag(cfg: ExperimentConfig) -> str:
    """An id of the data target metrics are computed on: runs are comparable only when it is equal."""
    d = cfg.data
    parts = [d.dataset, d.target_domain, d.target_eval_split]
    if d.eval_max_tiles:
        parts.append(f"max_tiles={d.eval_max_tiles}")
    if d.dataset == "synthetic":
        parts += [
            f"tiles={d.synthetic_tiles}",
            f"size={d.synthetic_tile_size}",
            f"seed={d.synthetic_seed}",
            f"sensor={d.synthetic_target_sensor}",
        ]
        if d.synthetic_shift != 1.0:
            parts.append(f"shift={d.synthetic_shift}")
        if d.synthetic_target_palette != "own":
            parts.append(f"palette={d.synthetic_target_palette}")
        if d.synthetic_target_layouts != "shifted":
            parts.append(f"layouts={d.synthetic_target_layouts}")
        if d.synthetic_target_textures != "own":
            parts.append(f"textures={d.synthetic_target_textures}")
    elif d.dataset == "isprs":
        parts += [f"modality={d.isprs_modality}", f"ignore_clutter={d.isprs_ignore_clutter}"]
    return ":".join(str(p) for p in parts)


def run_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """The descriptive tags of a training run."""
    d = cfg.data
    commit = git_commit()
    tags = {
        "method": cfg.method.name,
        "dataset": d.dataset,
        "source": d.source_domain,
        "target": d.target_domain,
        "domains": f"{d.source_domain} → {d.target_domain}",
        EVAL_SPLIT_TAG: eval_split_tag(cfg),
        "git_commit": commit,
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    if cfg.source_stage.enabled:
        tags[SOURCE_MODEL_TAG] = source_key(cfg)
    return tags


def tracking_callbacks(
    cfg: ExperimentConfig, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> list[MLflowCallback]:
    """The one MLflow callback of a training run when ``tracking.enabled`` (none otherwise): `lpcgma
    train` and every Ray Train worker build it here (it logs from rank 0 only)."""
    if not cfg.tracking.enabled:
        return []
    return [MLflowCallback(cfg, parent_run_id=parent_run_id, tags=dict(tags or {}))]


def source_stage_callbacks(stage: ExperimentConfig) -> list[MLflowCallback]:
    """The MLflow run of a source stage (`lpcgma.engine.source_stage`): a run of its own, role
    ``source_model``, tagged with the model's key like every run that starts from it."""
    if not stage.tracking.enabled:
        return []
    return [MLflowCallback(stage, tags={ROLE_TAG: "source_model", SOURCE_MODEL_TAG: source_key(stage)})]


def default_run_name(cfg: ExperimentConfig, trial_id: str | None = None) -> str:
    d = cfg.data
    name = cfg.tracking.run_name or f"{cfg.method.name}-{d.dataset}-{d.source_domain}2{d.target_domain}"
    return f"{name}-{trial_id}" if trial_id and not cfg.tracking.run_name else name


def run_params(cfg: ExperimentConfig) -> tuple[dict[str, str], list[str]]:
    """Every resolved config key as a param (dotted names), secrets dropped; (params, dropped keys)."""
    flat = {k: (str(list(v)) if isinstance(v, tuple) else str(v)) for k, v in flatten(cfg).items()}
    return redact_mapping(flat)


def exception_status(error: BaseException) -> str:
    """KILLED for interrupts and stop requests (Ctrl-C, Ray stopping a trial), FAILED otherwise."""
    if isinstance(error, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        return "KILLED"
    names = [t.__name__ for t in type(error).__mro__]
    return "KILLED" if any(k in n for n in names for k in _KILLED_NAMES) else "FAILED"


def read_run_file(out_dir: str | Path) -> dict[str, Any] | None:
    p = Path(out_dir) / RUN_FILE
    try:
        data: dict[str, Any] = json.loads(p.read_text())
        return data
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------- callback
class MLflowCallback(Callback):
    """Logs a training run to MLflow from rank 0.

    Args:
        cfg: the resolved experiment config (every key becomes a param, dotted names).
        parent_run_id: the search's parent run (child runs get the tag ``mlflow.parentRunId``).
        tags: extra tags (e.g. ``ray.trial_id``, ``search``).
        run_id: an existing run to continue (a resumed trial), instead of starting a new one.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.run_id = run_id
        self.logger: RunLogger | None = None
        self.tracking_uri: str | None = None
        self.class_names: list[str] = []
        self.palette: list[tuple[int, int, int]] = []
        self.out_dir: Path | None = None
        self._ended = False
        # the highest step whose training logs / evaluation metrics reached the logger (in the run file)
        self._logged: dict[str, int] = {"log": -1, "eval": -1}
        self._skip_through: dict[str, int] = {"log": -1, "eval": -1}  # a continued run: already in MLflow

    # --------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.is_main or not self.cfg.tracking.enabled:
            return
        cfg = self.cfg
        self.out_dir = Path(trainer.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        classes = trainer.data.classes
        self.class_names = list(classes.names)
        self.palette = [tuple(int(c) for c in rgb) for rgb in classes.palette]  # type: ignore[misc]
        self.tracking_uri = resolve_tracking_uri(cfg.tracking)
        self.logger = RunLogger(self.tracking_uri, self.out_dir)
        if pending_records(self.out_dir):  # an earlier session's offline records go first, in order
            self.logger.offline = True
            self.logger.flush()

        continue_id = self.run_id
        previous = read_run_file(self.out_dir)
        if (
            continue_id is None
            and (trainer.step > 0 or self.parent_run_id is not None)  # a trial's folder is that trial's
            and previous is not None
            and previous.get("tracking_uri") == self.tracking_uri
            and previous.get("parent_run_id") == self.parent_run_id
        ):
            continue_id = previous.get("run_id")
        tags: dict[str, str] = {**run_tags(cfg), ROLE_TAG: "trial" if self.parent_run_id else "train"}
        tags.update(self.tags)
        if self.parent_run_id:
            tags[PARENT_TAG] = self.parent_run_id
        tags, dropped_tags = redact_mapping(tags)
        params, dropped = run_params(cfg)
        if dropped or dropped_tags:
            tags["redacted_keys"] = ", ".join(dropped + dropped_tags)
        name = str(redact_value(default_run_name(cfg, self.tags.get(TRIAL_TAG))))
        if continue_id and continue_id.startswith(OFFLINE_PREFIX):  # started offline in an earlier session
            continue_id = synced_run_ids(self.out_dir).get(continue_id, continue_id)
        if continue_id and continue_id.startswith(OFFLINE_PREFIX):
            # that run exists only in the pending offline record (the logger is offline): append to it
            self.logger.attach(continue_id)
            self.run_id = continue_id
        else:
            self.run_id = self.logger.start_run(cfg.tracking.experiment, name, tags, run_id=continue_id)
        if continue_id:
            self.logger.set_tags(tags)
            if previous is not None and previous.get("run_id") == continue_id:
                # steps between the checkpoint and the crash were logged before: log each step once
                logged = previous.get("logged_steps") or {}
                self._skip_through = {k: int(logged.get(k, -1)) for k in self._skip_through}
                self._logged = dict(self._skip_through)
        self.logger.log_params(params)
        self.logger.log_text(redact_yaml_text(dump_config(cfg)), "config.yaml")
        classes_info = {
            "names": self.class_names,
            "palette": [list(rgb) for rgb in self.palette],
            "mean": [float(v) for v in getattr(trainer.data, "mean", (0.0, 0.0, 0.0))],
            "std": [float(v) for v in getattr(trainer.data, "std", (1.0, 1.0, 1.0))],
        }
        self.logger.log_text(json.dumps(classes_info, indent=1), CLASSES_FILE)
        with tempfile.TemporaryDirectory(prefix="lpcgma-mlflow-") as tmp:
            legend = plots.save_figure(plots.legend_figure(self.class_names, self.palette), Path(tmp) / "legend.png")
            self.logger.log_artifact(legend, "plots")
        self._write_run_file(status="RUNNING")
        log.info("MLflow run %s in experiment %r at %s", self.run_id, cfg.tracking.experiment, self.tracking_uri)

    def on_log(self, step: int, logs: dict[str, float]) -> None:
        if self.logger is None or self._ended:
            return
        self._log_step_metrics("log", logs, step)

    def on_eval(self, report: EvalReport) -> None:
        if self.logger is None or self._ended:
            return
        lg = self.logger
        if report.metrics:
            self._log_step_metrics("eval", report.metrics, report.step)
        try:
            self._log_figures(report)
        except Exception as e:  # a figure is never worth a training run
            log.warning("evaluation figures of step %d not logged: %s: %s", report.step, type(e).__name__, e)
        best = report.best_checkpoint or report.checkpoint
        if report.is_best and best is not None:
            self._log_checkpoint(best, "checkpoints/best")
            lg.set_tags({"best_step": report.step})

    def on_train_end(self, result: TrainResult) -> None:
        if self.logger is None or self._ended:
            return
        if result.last_checkpoint is not None and Path(result.last_checkpoint).is_dir():
            self._log_checkpoint(Path(result.last_checkpoint), "checkpoints/final")
        summary = {"final_step": float(result.step)}
        if result.best_step >= 0:
            summary[f"best_{result.selection_metric}"] = float(result.best_metric)
        self.logger.log_metrics(summary, result.step)
        self._end("FINISHED")

    def on_exception(self, error: BaseException) -> None:
        if self.logger is None or self._ended:
            return
        status = exception_status(error)
        reason = str(redact_value(f"{type(error).__name__}: {error}"))[:_MAX_TAG_LEN]
        try:
            self.logger.set_tags({ERROR_TAG: reason})
        finally:
            self._end(status)

    # ------------------------------------------------------------------------------- helpers
    def _log_step_metrics(self, kind: str, metrics: dict[str, float], step: int) -> None:
        """Log `metrics` (`kind` "log" or "eval") at `step` unless a continued run logged them before its crash.

        A resumed run replays the steps between its checkpoint and the crash (exact resume: the same
        values); MLflow cannot delete points, so those steps are skipped rather than logged twice.
        """
        assert self.logger is not None
        if step <= self._skip_through[kind]:
            return
        self.logger.log_metrics(metrics, step)
        if step > self._logged[kind]:
            self._logged[kind] = step
            self._write_run_file(status="RUNNING")

    def _log_figures(self, report: EvalReport) -> None:
        """Confusion matrix, per-class IoU bars, pseudo-label diagnostics and prediction overlays of one evaluation."""
        assert self.logger is not None
        lg = self.logger
        tag = f"step_{report.step:08d}"
        with tempfile.TemporaryDirectory(prefix="lpcgma-mlflow-") as tmp:
            t = Path(tmp)
            if report.confusion is not None:
                fig = plots.confusion_matrix_figure(
                    report.confusion, self.class_names, f"confusion matrix, step {report.step}"
                )
                lg.log_artifact(plots.save_figure(fig, t / "cm" / f"{tag}.png"), "plots/confusion_matrix")
            ious = plots.class_ious(report.metrics)
            if ious:
                fig = plots.iou_bar_figure(ious, self.class_names, self.palette, f"per-class IoU, step {report.step}")
                lg.log_artifact(plots.save_figure(fig, t / "iou" / f"{tag}.png"), "plots/iou")
            if report.pseudo_confusion is not None:
                fig = plots.confusion_matrix_figure(
                    report.pseudo_confusion[1], self.class_names,
                    f"confident pseudo-labels against the truth, step {report.step}", predicted="pseudo-label",
                )  # fmt: skip
                lg.log_artifact(plots.save_figure(fig, t / "pcm" / f"{tag}.png"), "plots/pseudo_confusion")
            pseudo = plots.pseudo_label_figure(report.metrics, self.class_names, f"pseudo-labels, step {report.step}")
            if pseudo is not None:
                lg.log_artifact(plots.save_figure(pseudo, t / "pseudo" / f"{tag}.png"), "plots/pseudo_labels")
            if report.previews:
                folder = t / "overlays" / tag
                for i, p in enumerate(report.previews):
                    strip = plots.overlay_strip(p["image"], p["mask"], p["pred"], self.palette)
                    plots.save_png(strip, folder / f"{i:02d}_{plots.safe_name(p.get('name', 'tile'))}.png")
                lg.log_artifact(folder, f"overlays/{tag}")

    def _log_checkpoint(self, folder: Path, artifact_path: str) -> None:
        """Log the model of checkpoint `folder` (`model_state`: what promotion and prediction load, a
        quarter of a resumable checkpoint) and its config."""
        assert self.logger is not None and self.out_dir is not None
        if not (folder / STATE_FILE).is_file():
            log.warning("no %s in %s: checkpoint not logged", STATE_FILE, folder)
            return
        state = read_checkpoint(folder)
        if is_model(state):  # `best`: already the model, and kept in place (a later best replaces it)
            self.logger.log_artifact(folder / STATE_FILE, artifact_path)
        else:  # a step checkpoint, which a trial deletes once Ray has it: its model is kept in the run
            # folder, where an offline record uploads it from later
            kept = self.out_dir / "mlflow_models" / artifact_path.replace("/", "_")
            self.logger.log_artifact(write_checkpoint(kept, model_state(state), "") / STATE_FILE, artifact_path)
        config = folder / CONFIG_FILE
        if config.is_file():
            self.logger.log_text(redact_yaml_text(config.read_text()), f"{artifact_path}/{CONFIG_FILE}")

    def _end(self, status: str) -> None:
        assert self.logger is not None
        self._ended = True
        self.logger.end_run(status)
        self.logger.flush()
        self._write_run_file(status=status)

    def _write_run_file(self, status: str) -> None:
        if self.out_dir is None or self.logger is None:
            return
        self.run_id = self.logger.current_run_id
        record = {
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "experiment": self.cfg.tracking.experiment,
            "parent_run_id": self.parent_run_id,
            "status": status,
            "offline": self.logger.offline,
            "logged_steps": self._logged,
        }
        tmp = self.out_dir / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.out_dir / RUN_FILE)


__all__ = [
    "ERROR_TAG",
    "EVAL_SPLIT_TAG",
    "MLflowCallback",
    "PARENT_TAG",
    "ROLE_TAG",
    "RUN_FILE",
    "SEARCH_TAG",
    "SOURCE_MODEL_TAG",
    "TRIAL_TAG",
    "default_run_name",
    "eval_split_tag",
    "exception_status",
    "git_commit",
    "read_run_file",
    "run_params",
    "run_tags",
    "source_stage_callbacks",
]
