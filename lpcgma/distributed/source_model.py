"""A search's shared source model (`lpcgma.engine.source_stage`), obtained once by the Tune driver.

Before any trial starts, the driver asks a Ray task for the source model, with one trial worker's
resources on a GPU cluster (so it runs on a GPU worker, not the CPU-only head) and the largest node's
CPUs on a CPU-only one (it runs alone, so it trains as `lpcgma train` would on that machine): trained into the
store when missing, read otherwise, then evaluated on the search's own target. The task links it to
the search's MLflow parent run; every trial then finds it in the store (a cache hit) and starts
from it. Unless ``source_stage.store`` is set, the store is ``<storage>/source_models`` — beside the
search, in the storage every worker reads (a local folder or S3), shared by the searches there.
"""

from __future__ import annotations

from typing import Any

from lpcgma.config import ExperimentConfig, replace


def with_search_store(base: ExperimentConfig, storage: str) -> ExperimentConfig:
    """`base` with ``source_stage.store`` defaulting to ``<storage>/source_models``."""
    if not base.source_stage.enabled or base.source_stage.store:
        return base
    return replace(base, {"source_stage.store": storage.rstrip("/") + "/source_models"})


def _obtain(payload: dict[str, Any], parent_run_id: str | None) -> dict[str, Any]:
    """In the Ray task: the source model of the config `payload` and its metrics on that config's target."""
    from lpcgma.distributed.train import config_from_payload
    from lpcgma.engine.source_stage import ensure_source_model, evaluate_source_model

    cfg = config_from_payload(payload)
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:  # one torch thread per CPU the task holds (Ray's worker default may be fewer)
        torch.set_num_threads(max(1, int(cpus)))
    callbacks = None
    if cfg.tracking.enabled:
        from lpcgma.tracking.runs import source_stage_callbacks

        callbacks = source_stage_callbacks
    model = ensure_source_model(cfg, callbacks)  # type: ignore[arg-type]
    report = {
        "key": model.key,
        "uri": model.uri,
        "trained": model.trained,
        "metrics": evaluate_source_model(cfg, model),
    }
    if cfg.tracking.enabled and parent_run_id:
        from lpcgma.tracking.search import link_source_model

        link_source_model(cfg, parent_run_id, report)
    return report


def obtain_source_model(
    base: ExperimentConfig, cpus: float, gpus: float, parent_run_id: str | None = None
) -> dict[str, Any] | None:
    """Run `_obtain` as a Ray task with `cpus` / `gpus` (`ResourcePlan.source_stage_cpus`, one worker's
    GPUs); None when the source stage is off. Returns {key, uri, trained, metrics}."""
    if not base.source_stage.enabled:
        return None
    import ray

    from lpcgma.distributed.train import config_to_payload

    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_obtain)
    print(f"source stage: obtaining the shared source model in {base.source_stage.store} ...", flush=True)
    report: dict[str, Any] = ray.get(task.remote(config_to_payload(base), parent_run_id))
    how = "trained" if report["trained"] else "found in the store"
    miou = report["metrics"].get("target_miou")
    shown = f"; its target_miou here = {miou:.4f}" if miou is not None else ""
    print(f"source stage: source model {report['key']} {how} ({report['uri']}){shown}", flush=True)
    return report
