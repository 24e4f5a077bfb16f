"""One MLflow run per pipeline run, shared by both orchestrators (Prefect and ``dvc repro``).

The run is opened before training (params, tags and the data reports), every later stage logs to
it by id (train and evaluate also log the splits they read as the run's datasets), and the
register stage logs the model and closes it.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from tasks.errors import SkinriskError
from tasks.params import Params
from tasks.tracking import DATA_VERSION_TAG, short_data_version


def run_name(orchestrator: str, data_version: str, when: datetime | None = None) -> str:
    """``<orchestrator>-<short data version>-<UTC yyyymmdd-hhmm>``, e.g. ``dvc-3f2a9c1b-20261203-1842``:
    runs told apart in the MLflow UI by who ran them, on which data, and when."""
    stamp = (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d-%H%M")
    return f"{orchestrator}-{short_data_version(data_version)}-{stamp}"


def start_pipeline_run(params: Params, raw_dir: Path, reports_dir: Path, *, orchestrator: str, source: str) -> str:
    """Open the run: flattened params, git/DVC/data tags, validation and split reports."""
    from tasks.tracking import log_artifacts, start_run
    from tasks.versioning import data_version

    tags = {
        DATA_VERSION_TAG: data_version(Path(raw_dir)),
        "data_source": source,
        "orchestrator": orchestrator,
        "target": params.train.target,
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    name = os.environ.get("DVC_EXP_NAME") or run_name(orchestrator, tags[DATA_VERSION_TAG])
    run_id = start_run(name, params.flat(), tags)
    reports_dir = Path(reports_dir)
    log_artifacts(
        run_id,
        [
            reports_dir / "validation.json",
            reports_dir / "validation.md",
            reports_dir / "preprocess.json",
        ],
        artifact_path="data",
    )
    return run_id


def run_id_of(model_dir: Path) -> str:
    """The run id the train stage recorded in ``model_dir/train.json``."""
    from tasks.train import TRAIN_INFO_FILE

    path = Path(model_dir) / TRAIN_INFO_FILE
    if not path.exists():
        raise SkinriskError(f"{path} not found: run `skinrisk train` first")
    run_id = json.loads(path.read_text(encoding="utf-8")).get("run_id")
    if not run_id:
        raise SkinriskError(f"{path} names no MLflow run (the model was trained with --no-tracking)")
    return run_id


def register_pipeline_model(model_path: Path, processed_dir: Path, model_dir: Path, reports_dir: Path, run_id: str):
    """Log the pyfunc to the run, register it as ``challenger`` and close the run."""
    from tasks.metrics import headline_figures
    from tasks.paths import METRICS_FILE
    from tasks.register import register_model
    from tasks.scored_model import OPERATING_POINT_FILE
    from tasks.tracking import end_run

    metrics_path = Path(reports_dir) / METRICS_FILE
    if not metrics_path.exists():
        raise SkinriskError(f"{metrics_path} not found: run `skinrisk evaluate` first")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    registration = register_model(
        Path(model_path),
        Path(processed_dir),
        Path(model_dir) / OPERATING_POINT_FILE,
        run_id,
        alias="challenger",
        # the triage figures first (high-risk AUC, the operating point), tagged on the version
        metrics={k: v for k, v in headline_figures(metrics).items() if isinstance(v, int | float)},
        out_file=Path(model_dir) / "registered.json",
    )
    end_run(run_id)
    return registration
