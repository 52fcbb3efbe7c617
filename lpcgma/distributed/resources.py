"""Resource planning for a search: the cluster's nodes (alive and autoscalable) and how many trials of a
given worker shape fit at once; a search that cannot fit one trial is refused with a `ResourceError`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from lpcgma.storage import is_local

DRIVER_RESOURCE = "trial_driver"  # custom resource a multi-worker trial's driver holds instead of a CPU
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # present on the head of a `ray up` cluster


class ResourceError(ValueError):
    """The search asks for more than the cluster has; the message says what and how much."""


@dataclass(frozen=True)
class NodeShape:
    """What one Ray node offers (logical resources)."""

    cpus: float
    gpus: float = 0.0
    trial_drivers: float = 0.0
    name: str = "node"


@dataclass(frozen=True)
class ResourcePlan:
    """How trials are placed and how many run at once."""

    max_concurrent: int  # trials running at the same time
    inline: bool  # single-worker trials run the Trainer in the trial process
    trial_resources: dict[str, float]  # what the Tune trial itself requests
    worker_slots: int  # workers of the requested shape that fit the cluster
    notes: tuple[str, ...] = ()
    source_stage_cpus: float = 1.0  # CPUs of the task that trains the shared source model: one worker's
    # on GPU clusters (its GPU does the work), the largest node's on CPU-only ones (as `lpcgma train` there)

    def describe(self) -> str:
        kind = "inline (no worker group)" if self.inline else "TorchTrainer worker group"
        lines = [
            f"trials: {kind}; trial requests {self.trial_resources}; "
            f"{self.worker_slots} worker slot(s) → max {self.max_concurrent} concurrent trial(s); "
            f"a source stage gets {_fmt(self.source_stage_cpus)} CPU(s)"
        ]
        return "\n".join(lines + list(self.notes))


def _fmt(x: float) -> str:
    return f"{x:g}"


def plan_resources(
    nodes: Sequence[NodeShape],
    workers_per_trial: int,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    max_concurrent: int | None = None,
) -> ResourcePlan:
    """Trials that fit `nodes` at once, or ResourceError when not even one does.

    A worker needs `cpus_per_worker` CPUs and `gpus_per_worker` GPUs on one node; workers of a
    trial may spread over nodes. Multi-worker trials also need one ``trial_driver`` each.
    """
    w, c, g = workers_per_trial, cpus_per_worker, gpus_per_worker
    if w < 1:
        raise ResourceError(f"workers per trial must be >= 1, got {w}")
    if not c > 0:
        raise ResourceError(f"CPUs per worker must be > 0, got {c}")
    if g < 0:
        raise ResourceError(f"GPUs per worker must be >= 0, got {g}")
    if g > 1 and not float(g).is_integer():
        raise ResourceError(f"GPUs per worker above 1 must be a whole number, got {g}")
    if w > 1 and 0 < g < 1:
        raise ResourceError(
            f"fractional GPUs per worker ({_fmt(g)}) with {w} workers per trial: NCCL refuses two ranks on "
            "one GPU (ray#48012); share GPUs only between single-worker trials"
        )
    if max_concurrent is not None and max_concurrent < 1:
        raise ResourceError(f"max concurrent trials must be >= 1, got {max_concurrent}")
    if not nodes:
        raise ResourceError("the Ray cluster has no alive nodes")
    shape = f"{_fmt(c)} CPU" + (f" + {_fmt(g)} GPU" if g else "")
    biggest_cpu = max(n.cpus for n in nodes)
    biggest_gpu = max(n.gpus for n in nodes)
    if g > biggest_gpu:
        raise ResourceError(
            f"each worker asks for {_fmt(g)} GPU(s) but the largest node has {_fmt(biggest_gpu)} "
            f"(nodes: {_nodes_text(nodes)})"
        )
    if c > biggest_cpu:
        raise ResourceError(
            f"each worker asks for {_fmt(c)} CPU(s) but the largest node has {_fmt(biggest_cpu)} "
            f"(nodes: {_nodes_text(nodes)})"
        )

    def slots(n: NodeShape) -> int:
        s = math.floor(n.cpus / c + 1e-9)
        if g > 0:
            s = min(s, math.floor(n.gpus / g + 1e-9))
        return max(0, s)

    worker_slots = sum(slots(n) for n in nodes)
    fits = worker_slots // w
    if fits < 1:
        raise ResourceError(
            f"a trial needs {w} worker(s) × ({shape}) but only {worker_slots} such worker(s) fit the cluster "
            f"(nodes: {_nodes_text(nodes)}); lower --workers-per-trial or the per-worker resources"
        )
    notes: list[str] = []
    inline = w == 1
    if inline:
        trial_resources = {"cpu": c, "gpu": g}
    else:
        drivers = math.floor(sum(n.trial_drivers for n in nodes) + 1e-9)
        if drivers < 1:
            raise ResourceError(
                f"multi-worker trials need the custom resource '{DRIVER_RESOURCE}' for their driver and no "
                f"node declares it: start the head with --resources='{{\"{DRIVER_RESOURCE}\": 8}}' "
                "(clusters/aws.yaml does)"
            )
        if drivers < fits:
            notes.append(f"limited by {drivers} '{DRIVER_RESOURCE}' slot(s)")
        fits = min(fits, drivers)
        trial_resources = {DRIVER_RESOURCE: 1.0}
    if max_concurrent is not None:
        if max_concurrent > fits:
            notes.append(f"--max-concurrent {max_concurrent} lowered to {fits}: more would only wait for resources")
        fits = min(fits, max_concurrent)
    source_cpus = c if g > 0 else max(c, biggest_cpu)  # it runs alone, before any trial: a whole CPU node
    return ResourcePlan(fits, inline, trial_resources, worker_slots, tuple(notes), source_cpus)


def _nodes_text(nodes: Sequence[NodeShape]) -> str:
    return ", ".join(f"{n.name}: {_fmt(n.cpus)} CPU/{_fmt(n.gpus)} GPU" for n in nodes[:8]) + (
        f", … ({len(nodes)} nodes)" if len(nodes) > 8 else ""
    )


def cluster_nodes() -> list[NodeShape]:
    """The alive nodes of the connected Ray cluster."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive", False):
            continue
        r = n.get("Resources", {})
        out.append(
            NodeShape(
                cpus=float(r.get("CPU", 0.0)),
                gpus=float(r.get("GPU", 0.0)),
                trial_drivers=float(r.get(DRIVER_RESOURCE, 0.0)),
                name=str(n.get("NodeManagerAddress", "node")),
            )
        )
    return out


def local_storage_warning(storage: str, nodes: Sequence[NodeShape]) -> str | None:
    """A warning when trials may run on several nodes but `storage` is a local folder: each node
    then writes its trials' results and checkpoints to its own disk, where the driver and a resumed
    search cannot read them. None when the search is single-node or its storage is shared (s3://…)."""
    if len(nodes) <= 1 or not is_local(storage):
        return None
    return (
        f"warning: {len(nodes)} nodes but --storage '{storage}' is a local folder: trials on other nodes "
        "write results and checkpoints to their own disks; use shared storage (e.g. --storage s3://bucket/prefix)"
    )


def autoscaler_nodes(path: str | Path = BOOTSTRAP_CONFIG) -> list[NodeShape]:
    """Worker nodes the autoscaler may still add (declared node types × max_workers).

    Present only on the head of a cluster started by ``ray up``; types without declared CPU/GPU
    resources are skipped. Counts every declared worker even if some are already up, so the plan may
    over-estimate (extra trials then wait for resources; nothing deadlocks, since trial drivers use
    the ``trial_driver`` resource).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        return []
    try:
        cfg = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    head = cfg.get("head_node_type")
    out: list[NodeShape] = []
    for name, spec in (cfg.get("available_node_types") or {}).items():
        if name == head or not isinstance(spec, Mapping):
            continue
        r = spec.get("resources") or {}
        if "CPU" not in r:
            continue
        n = min(int(spec.get("max_workers", 0) or 0), 64)
        shape = NodeShape(
            float(r["CPU"]), float(r.get("GPU", 0)), float(r.get(DRIVER_RESOURCE, 0)), f"{name} (autoscaled)"
        )
        out += [shape] * n
    return out


def planning_nodes(local: bool) -> list[NodeShape]:
    """Alive nodes, plus the nodes the autoscaler may add when this is a launcher-started head."""
    nodes = cluster_nodes()
    return nodes if local else nodes + autoscaler_nodes()
