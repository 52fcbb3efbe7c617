"""Where MLflow runs go: tracking-URI resolution and the project's default local store.

Resolution order (first that is set wins):

1. ``tracking.tracking_uri`` in the experiment config (``tracking.tracking_uri=http://127.0.0.1:5000``);
2. the environment variable ``MLFLOW_TRACKING_URI`` (a team server, e.g. from a cluster config);
3. the project's local store: ``sqlite:///<store>/mlflow.db`` with artifacts in ``<store>/artifacts``,
   created on first use. ``<store>`` is the ``mlflow/`` folder of the source checkout when lpcgma is
   installed from one (``pip install -e .``: the folder beside ``pyproject.toml``), and
   ``./mlflow/`` in the current directory when lpcgma is installed as a plain package (a wheel in
   site-packages has no project folder to write into).

The local store is sqlite, not MLflow's ``./mlruns`` file store: MLflow 3 refuses file stores by
default and the model registry needs a database. The ``mlflow/`` folder must never get an
``__init__.py``: it would shadow the ``mlflow`` package for scripts run from the repository root.
Artifact roots on S3 (``s3://bucket/prefix`` with ``MLFLOW_S3_ENDPOINT_URL`` and the usual AWS
variables) work unchanged: they come from the server or from the experiment's artifact location.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lpcgma.config import ConfigError, TrackingConfig

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

STORE_DIR_NAME = "mlflow"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"


def project_root() -> Path | None:
    """The source checkout lpcgma runs from (editable install), or None for an installed package."""
    import lpcgma

    root = Path(lpcgma.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    try:
        if pyproject.is_file() and 'name = "lpcgma"' in pyproject.read_text():
            return root
    except OSError:
        return None
    return None


def default_store_dir() -> Path:
    """``<checkout>/mlflow`` for a source checkout, else ``./mlflow`` in the current directory."""
    root = project_root()
    return (root if root is not None else Path.cwd().resolve()) / STORE_DIR_NAME


def local_store_uri(store_dir: str | Path | None = None, create: bool = True) -> str:
    """``sqlite:///<store_dir>/mlflow.db``; creates the folder and its artifact folder when asked."""
    store = Path(store_dir) if store_dir is not None else default_store_dir()
    store = store.resolve()
    if create:
        (store / ARTIFACTS_DIR).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / DB_FILE}"


def _is_file_store(uri: str) -> bool:
    """A URI MLflow would open as its file store (``file:…`` or a plain path, e.g. ``./mlruns``)."""
    if uri.startswith("file:"):
        return True
    return "://" not in uri and uri.split(":", 1)[0] not in ("databricks", "databricks-uc", "uc")


def resolve_tracking_uri(cfg: TrackingConfig | None = None, explicit: str | None = None) -> str:
    """The tracking URI to use: `explicit`, else the config's, else $MLFLOW_TRACKING_URI, else local.

    A file-store URI (``file:///…/mlruns`` or a plain path) is refused with a ConfigError naming
    where it came from, before any run starts: MLflow 3 only opens file stores with
    ``MLFLOW_ALLOW_FILE_STORE=true``, and its model registry needs a database.
    """
    sources = (
        ("the --tracking-uri argument", explicit),
        ("tracking.tracking_uri", cfg.tracking_uri if cfg is not None else None),
        ("$MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI")),
    )
    for source, candidate in sources:
        if candidate:
            allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true")
            if _is_file_store(candidate) and not allowed:
                raise ConfigError(
                    f"{source} = {candidate!r} is an MLflow file store, which MLflow 3 refuses (and whose "
                    "registry cannot promote models): use a database, e.g. 'sqlite:///path/to/mlflow.db', "
                    "or a server 'http://127.0.0.1:5000' (set MLFLOW_ALLOW_FILE_STORE=true to insist)"
                )
            return candidate
    return local_store_uri()


def is_local_store(uri: str) -> bool:
    """True for the project's default sqlite store layout (``.../mlflow.db``)."""
    return uri.startswith("sqlite:///") and uri.endswith("/" + DB_FILE)


def artifact_location_for(uri: str, experiment: str) -> str | None:
    """Artifact location for a new experiment: beside a local sqlite store, else the server's choice.

    A sqlite store has no artifact root of its own (MLflow would fall back to ``./mlruns`` in the
    current directory), so experiments created in a local store keep their artifacts in
    ``<store>/artifacts/<experiment>``. Remote servers decide themselves (``--default-artifact-root``
    or ``--artifacts-destination``).
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in experiment) or "default"
    location = db.parent / ARTIFACTS_DIR / safe
    location.mkdir(parents=True, exist_ok=True)
    return location.as_uri()


def get_or_create_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment `name`, created (with a local artifact location if needed) when missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location_for(uri, name)))
    except MlflowException:  # created concurrently by another trial
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def tracking_client(uri: str) -> MlflowClient:
    """An MLflow client of the store at `uri` (resolve it first: `resolve_tracking_uri`)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def all_runs(
    client: MlflowClient, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None
) -> list[Any]:
    """Every run matching `filter_string`, following MLflow's result pages."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string=filter_string, order_by=order_by, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def best_over_history(client: MlflowClient, run_id: str, metric: str, mode: str) -> tuple[float, int]:
    """The best value of `metric` over run `run_id`'s history and its step (NaN, -1 when never logged)."""
    from lpcgma.engine.label_free import best_of

    history = client.get_metric_history(run_id, metric)
    values = [(m.value, m.step) for m in history if m.value is not None and not math.isnan(m.value)]
    if not values:
        return math.nan, -1
    value, step = best_of(values, mode)
    return float(value), int(step)


def ui_command(uri: str, port: int = 5000) -> str:
    """How to look at the runs of `uri` in the MLflow UI (a command for a local store, else the URL)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port {port}"


def run_url(uri: str, experiment_id: str, run_id: str, port: int = 5000) -> str:
    """The UI address of a run (for a local store: where `ui_command` serves it)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{port}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


__all__ = [
    "ARTIFACTS_DIR",
    "all_runs",
    "best_over_history",
    "tracking_client",
    "DB_FILE",
    "STORE_DIR_NAME",
    "artifact_location_for",
    "default_store_dir",
    "get_or_create_experiment",
    "is_local_store",
    "local_store_uri",
    "project_root",
    "resolve_tracking_uri",
    "run_url",
    "ui_command",
]
