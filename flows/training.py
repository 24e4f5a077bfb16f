"""The training flow: validate -> preprocess -> train -> evaluate -> register, tracked in MLflow.

Runs in-process (Prefect's ephemeral API) by default, or against a server when
``PREFECT_API_URL`` is set. Stages exchange paths and the MLflow run id only.
"""

from __future__ import annotations

from prefect import flow

from tasks import paths
from tasks import prefect_tasks as t
from tasks.params import load_params
from tasks.tracking import ending_status
from tasks.workspace_lock import workspace_lock


@flow(name="skinrisk-training", log_prints=True)
def training_pipeline(
    params_file: str = str(paths.PARAMS_FILE),
    overrides: list[str] | None = None,
    raw_dir: str = str(paths.RAW_DIR),
    processed_dir: str = str(paths.PREFECT_PROCESSED_DIR),
    model_dir: str = str(paths.PREFECT_MODELS_DIR),
    reports_dir: str = str(paths.PREFECT_REPORTS_DIR),
    synthetic_dir: str = str(paths.SYNTHETIC_DIR),
) -> dict:
    """Train, evaluate, explain and register a challenger (with its drift reference profile); returns the headline test figures.

    A second run writing the same output folders at the same time is refused (tasks/workspace_lock.py),
    and an unreachable MLflow server stops the run before any data is touched.
    """
    params = load_params(params_file, list(overrides or []))  # once: every task sees the same parameters
    with workspace_lock([processed_dir, model_dir, reports_dir], owner="the Prefect flow skinrisk-training"):
        t.check_tracking()
        source = t.ensure_data(raw_dir, synthetic_dir, params.data)
        t.validate(raw_dir, reports_dir, params.validate_)
        t.preprocess(raw_dir, processed_dir, reports_dir, params.preprocess)
        run_id = t.start_tracking(raw_dir, reports_dir, params, source)
        try:
            model_path = t.train(processed_dir, model_dir, reports_dir, params.train, run_id)
            metrics = t.evaluate(model_path, processed_dir, reports_dir, model_dir, params.evaluate, run_id)
            t.explain(model_path, processed_dir, reports_dir, params.explain, run_id)
            t.reference_profile(model_path, processed_dir, raw_dir, model_dir, params.monitor, run_id)
            model_uri = t.register(model_path, processed_dir, model_dir, reports_dir, run_id)
        except BaseException as exc:
            t.finish_tracking(run_id, ending_status(exc))  # KILLED on Ctrl-C or termination
            raise
    return {"run_id": run_id, "model_uri": model_uri, "data": source, **metrics}
