"""The monitoring flow: drift of a new batch against the training reference, and retraining on alarm.

The stage (report, summary, Evidently workspace, MLflow run, retraining trigger) is
``tasks.stages.monitor.monitor_batch``; the tasks below take paths, run ids and the monitor section
of params.yaml (parsed once per flow run), like ``tasks.prefect_tasks``.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks import paths
from tasks.params import MonitorParams, load_params
from tasks.prefect_tasks import finish_tracking
from tasks.tracking import ending_status

# The Prefect workspace's model and reference (the retraining deployment's), its reports beside them.
DEFAULT_REFERENCE = str(paths.PREFECT_MODELS_DIR / "reference_profile.parquet")  # tasks.drift_profile.REFERENCE_FILE
DEFAULT_MODEL = str(paths.PREFECT_MODELS_DIR / "model.keras")
DEFAULT_OUT_DIR = str(paths.PREFECT_REPORTS_DIR / "monitoring")
DEFAULT_WORKSPACE = str(paths.REPORTS_DIR / "evidently")  # every run's snapshot: the drift history


@task(name="start-monitoring-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def start_monitoring_run(batch: str, reference: str, params: MonitorParams) -> str:
    from tasks.stages.monitor import start_monitoring_run as start

    return start(batch, reference, params)


@task(name="monitor-batch", cache_policy=NO_CACHE)
def monitor_batch(
    batch: str,
    reference: str,
    model: str,
    out_dir: str,
    params: MonitorParams,
    run_id: str,
    images_dir: str | None,
    retrain: bool,
    workspace: str | None,
) -> str:
    from flows.retraining import trigger_retraining
    from tasks.stages.monitor import monitor_batch as run_monitor

    result = run_monitor(
        Path(reference),
        model,
        Path(batch),
        Path(out_dir),
        params,
        images_dir=Path(images_dir) if images_dir else None,
        run_id=run_id,
        retrain=trigger_retraining if retrain else None,
        workspace=Path(workspace) if workspace else None,
    )
    print(("ALARM: " if result.alarm else "no alarm: ") + result.reason)
    print(f"retraining: {result.retraining.message}")
    if result.evidently:
        print(f"Evidently snapshot {result.evidently['snapshot_id']}: evidently ui --workspace {workspace}")
    return result.summary_path


@task(name="publish-drift-summary", cache_policy=NO_CACHE)
def publish_drift_summary(summary_path: str) -> dict:
    from tasks.stages.monitor import format_drift_summary, read_summary, summary_rows

    summary = read_summary(Path(summary_path))
    create_markdown_artifact(
        key="skinrisk-drift",
        markdown=format_drift_summary(summary),
        description="Drift of the latest monitored batch against the training reference",
    )
    create_table_artifact(
        key="skinrisk-drift-columns",
        table=summary_rows(summary),
        description="Per-column drift test of the latest monitored batch",
    )
    return summary


@flow(name="skinrisk-monitoring", log_prints=True)
def monitoring_flow(
    batch: str,
    reference: str = DEFAULT_REFERENCE,
    model: str = DEFAULT_MODEL,
    out_dir: str = DEFAULT_OUT_DIR,
    params_file: str = str(paths.PARAMS_FILE),
    overrides: list[str] | None = None,
    images_dir: str | None = None,
    retrain: bool = True,
    workspace: str | None = DEFAULT_WORKSPACE,
) -> dict:
    """Monitor one batch; returns the headline of ``drift_summary.json``.

    ``model`` is the model the reference was built with: a ``.keras`` path or an MLflow model URI
    (e.g. ``models:/skinrisk@champion``). The clinical encoder and image size come from the
    reference profile, so no processed data folder is needed. ``images_dir`` is for a cases CSV
    whose image paths are relative to another folder than the CSV's. ``workspace`` is the local
    Evidently workspace each run is added to (``None``: not recorded there).
    """
    params = load_params(params_file, list(overrides or [])).monitor  # once per flow run
    run_id = start_monitoring_run(batch, reference, params)
    try:
        summary_path = monitor_batch(batch, reference, model, out_dir, params, run_id, images_dir, retrain, workspace)
    except BaseException as exc:
        finish_tracking(run_id, ending_status(exc))  # KILLED on Ctrl-C or termination
        raise
    finish_tracking(run_id, "FINISHED")
    summary = publish_drift_summary(summary_path)
    headline = ("alarm", "drifted_share", "drifted_columns", "retraining", "evidently")
    return {"run_id": run_id, "summary_path": summary_path, **{key: summary[key] for key in headline}}
