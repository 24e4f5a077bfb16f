"""MLflow tracking: the one place that talks to the tracking server, always by run id.

MLflow's active run is thread-local and Prefect runs tasks in worker threads, so nothing here
uses ``mlflow.start_run``'s global state: every call names its run.
"""

from __future__ import annotations

import math
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.errors import SkinriskError

EXPERIMENT = "skinrisk"
MODEL_NAME = "skinrisk"
DEFAULT_DB = Path("mlflow.db")
DEFAULT_ARTIFACTS = Path("mlartifacts")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite database in the project (never a file store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB.resolve()}"


def client():
    """An ``MlflowClient`` on :func:`tracking_uri`, with a clear error if the server is down."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(name: str = EXPERIMENT) -> str:
    """The experiment's id, creating it (artifacts under ``mlartifacts/`` for a local store)."""
    mlflow_client = client()
    try:
        existing = mlflow_client.get_experiment_by_name(name)
    except Exception as exc:  # connection errors come in many types
        raise SkinriskError(
            f"MLflow tracking at {tracking_uri()} is unreachable ({exc}); start the server or "
            "unset MLFLOW_TRACKING_URI to use the local SQLite store"
        ) from exc
    if existing is not None:
        return existing.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = DEFAULT_ARTIFACTS.resolve().as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


def git_tags() -> dict[str, str]:
    """The source commit as MLflow's standard tags (empty outside a git checkout)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git_dirty": str(bool(dirty)).lower()}


def start_run(run_name: str, params: Mapping[str, Any], tags: Mapping[str, str], experiment: str = EXPERIMENT) -> str:
    """Create a run with its flattened params and tags; returns the run id."""
    from mlflow.entities import Param

    mlflow_client = client()
    run = mlflow_client.create_run(experiment_id(experiment), run_name=run_name, tags={**git_tags(), **tags})
    entries = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(entries), 100):  # MLflow's batch limit
        mlflow_client.log_batch(run.info.run_id, params=entries[start : start + 100])
    return run.info.run_id


def numeric_metrics(payload: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten a nested metrics dict to MLflow metrics (numbers only, lists skipped)."""
    flat: dict[str, float] = {}
    for key, value in payload.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(numeric_metrics(value, prefix=f"{name}."))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int | float) and math.isfinite(value):
            flat[name.replace(" ", "_")] = float(value)
    return flat


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log a (possibly nested) metrics dict to the run."""
    import time

    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    entries = [Metric(k, v, timestamp, step or 0) for k, v in numeric_metrics(metrics).items()]
    mlflow_client = client()
    for start in range(0, len(entries), 1000):
        mlflow_client.log_batch(run_id, metrics=entries[start : start + 1000])


def log_artifacts(run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    """Upload files (or whole folders) that exist; missing ones are skipped."""
    mlflow_client = client()
    for path in map(Path, paths):
        if path.is_dir():
            mlflow_client.log_artifacts(run_id, str(path), artifact_path=artifact_path)
        elif path.is_file():
            mlflow_client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, value)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def epoch_logger(run_id: str):
    """A Keras callback logging each epoch's metrics to the run as it ends (live curves in the UI).

    Steps are Keras' global epoch numbers (1-based), continuous across training phases.
    """
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            log_metrics(run_id, dict(logs or {}), step=epoch + 1)

    return EpochLogger()
