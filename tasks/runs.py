"""One MLflow run per pipeline run, shared by both orchestrators (Prefect and ``dvc repro``).

The run is opened before training (params, tags, the data reports and the validation's Data Docs),
every later stage logs to it by id (train and evaluate also log the splits they read as the run's
datasets), and the register stage logs the model and closes it.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from tasks.errors import SkinriskError
from tasks.params import Params
from tasks.tracking import DATA_VERSION_TAG, short_data_version

VALIDATION_REPORT = "validation.json"  # the validate stage's report in reports_dir (tasks.stages.validate.REPORT_JSON)
VALIDATION_TAG = "data_validation"
DATA_DOCS_ARTIFACTS = "data_docs"  # the run's artifact folder holding the Data Docs site


def run_name(orchestrator: str, data_version: str, when: datetime | None = None) -> str:
    """``<orchestrator>-<short data version>-<UTC yyyymmdd-hhmm>``, e.g. ``dvc-3f2a9c1b-20261203-1842``:
    runs told apart in the MLflow UI by who ran them, on which data, and when."""
    stamp = (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d-%H%M")
    return f"{orchestrator}-{short_data_version(data_version)}-{stamp}"


def validation_tags(report: Path) -> dict[str, str]:
    """The validation a run's data passed, as tags a person can filter runs on: ``data_validation``
    (``passed``, ``passed with 1 warning(s)`` or ``failed``) and ``data_validation.expectations``
    (the counts). Empty without a readable report."""
    try:
        payload = json.loads(Path(report).read_text(encoding="utf-8"))
        counts = payload["counts"]
        verdict = "passed" if payload["success"] else "failed"
        if payload["success"] and counts.get("warnings"):
            verdict += f" with {counts['warnings']} warning(s)"
        expectations = (
            f"{counts['expectations_evaluated']} evaluated, {counts['expectations_failed']} failed, "
            f"{counts['skipped']} skipped"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {VALIDATION_TAG: verdict, f"{VALIDATION_TAG}.expectations": expectations}


def data_docs_site(report: Path) -> Path | None:
    """The Great Expectations Data Docs site of a validation (the folder of the index page that
    ``validation.json`` names), or None where there is none."""
    try:
        index = json.loads(Path(report).read_text(encoding="utf-8")).get("data_docs")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(index).parent if index and Path(index).is_file() else None


def start_pipeline_run(params: Params, raw_dir: Path, reports_dir: Path, *, orchestrator: str, source: str) -> str:
    """Open the run: flattened params, git/DVC/data tags, validation and split reports.

    Validation runs before the run exists (under both orchestrators it is the first stage), so the
    run that trains on the validated data records it: the verdict as tags (:func:`validation_tags`),
    ``validation.{json,md}`` under ``data/`` and the Data Docs site under ``data_docs/``
    (``data_docs/index.html``), so each run carries the validation of exactly the data it used.
    """
    from tasks.tracking import log_artifacts, start_run
    from tasks.versioning import data_version

    reports_dir = Path(reports_dir)
    report = reports_dir / VALIDATION_REPORT
    experiment = os.environ.get("DVC_EXP_NAME")  # set by `dvc exp run`: the run keeps its name
    tags = {
        DATA_VERSION_TAG: data_version(Path(raw_dir)),
        "data_source": source,
        "orchestrator": orchestrator,
        "target": params.train.target,
        **validation_tags(report),
        **({"dvc_experiment": experiment} if experiment else {}),
    }
    run_id = start_run(experiment or run_name(orchestrator, tags[DATA_VERSION_TAG]), params.flat(), tags)
    log_artifacts(run_id, [report, report.with_suffix(".md"), reports_dir / "preprocess.json"], artifact_path="data")
    site = data_docs_site(report)
    if site is not None:
        log_artifacts(run_id, [site], artifact_path=DATA_DOCS_ARTIFACTS)
    return run_id


def run_id_of(model_dir: Path) -> str:
    """The run id the train stage recorded in ``model_dir/train.json``."""
    from tasks.paths import TRAIN_INFO_FILE

    path = Path(model_dir) / TRAIN_INFO_FILE
    if not path.exists():
        raise SkinriskError(f"{path} not found: run `skinrisk train` first")
    run_id = json.loads(path.read_text(encoding="utf-8")).get("run_id")
    if not run_id:
        raise SkinriskError(f"{path} names no MLflow run (the model was trained with --no-tracking)")
    return run_id
