"""Scheduled retraining: the training flow, then the promotion flow (see prefect.yaml), and the
trigger that starts its deployment when the monitor raises a drift alarm."""

from __future__ import annotations

from prefect import flow
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings

from flows.promotion import promotion_flow
from flows.training import training_pipeline
from tasks import paths
from tasks.stages.monitor import RetrainingOutcome


@flow(name="skinrisk-retraining", log_prints=True)
def retraining_flow(
    params_file: str = str(paths.PARAMS_FILE),
    overrides: list[str] | None = None,
    raw_dir: str = str(paths.RAW_DIR),
    processed_dir: str = str(paths.PREFECT_PROCESSED_DIR),
    model_dir: str = str(paths.PREFECT_MODELS_DIR),
    reports_dir: str = str(paths.PREFECT_REPORTS_DIR),
    synthetic_dir: str = str(paths.SYNTHETIC_DIR),
) -> dict:
    """Train and register a challenger, then let the promotion gates decide on it."""
    trained = training_pipeline(params_file, overrides, raw_dir, processed_dir, model_dir, reports_dir, synthetic_dir)
    decision = promotion_flow(
        params_file=params_file, overrides=overrides, processed_dir=processed_dir, raw_dir=raw_dir
    )
    return {"training": trained, "promotion": decision}


def trigger_retraining(deployment: str, reason: str) -> RetrainingOutcome:
    """Start the Prefect deployment ``deployment`` ("flow/deployment", e.g. this module's retraining
    flow as prefect.yaml deploys it) without waiting for it: what the monitor calls on alarm.

    Never raises for a missing deployment or Prefect API: the outcome says what happened, so a
    monitoring run still completes and records the alarm.
    """

    def not_triggered(message: str) -> RetrainingOutcome:
        return RetrainingOutcome(requested=True, triggered=False, deployment=deployment, message=message)

    api_url = get_current_settings().api.url
    if not api_url:
        return not_triggered(
            f"no deployment: PREFECT_API_URL is not set, so no Prefect server holds deployment {deployment!r}; "
            "retraining was not triggered (start the server in infra/, deploy the training flow, or retrain by hand)"
        )
    if "/" not in deployment:
        return not_triggered(
            f"no deployment: monitor.retrain_deployment={deployment!r} is not of the form 'flow-name/deployment-name'"
        )
    try:
        flow_run = run_deployment(
            name=deployment, timeout=0, tags=["skinrisk-monitoring", "drift-alarm"], as_subflow=False
        )
    except ObjectNotFound:
        return not_triggered(
            f"no deployment named {deployment!r} is deployed on the Prefect API at {api_url}: retraining was not "
            "triggered (deploy the training flow under that name, or set monitor.retrain_deployment)"
        )
    except Exception as exc:  # an unreachable or failing API raises many types
        return not_triggered(
            f"no deployment could be triggered: the Prefect API at {api_url} failed ({type(exc).__name__}: {exc})"
        )
    return RetrainingOutcome(
        requested=True,
        triggered=True,
        deployment=deployment,
        message=f"triggered deployment {deployment!r}: flow run {flow_run.name} ({flow_run.id}) because {reason}",
        flow_run_id=str(flow_run.id),
    )
