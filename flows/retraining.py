"""Scheduled retraining: the training flow, then the promotion flow (see prefect.yaml)."""

from __future__ import annotations

from prefect import flow

from flows.promotion import promotion_flow
from flows.training import training_pipeline
from tasks import paths


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
    trained = training_pipeline(
        params_file=params_file,
        overrides=overrides,
        raw_dir=raw_dir,
        processed_dir=processed_dir,
        model_dir=model_dir,
        reports_dir=reports_dir,
        synthetic_dir=synthetic_dir,
    )
    decision = promotion_flow(
        params_file=params_file, overrides=overrides, processed_dir=processed_dir, raw_dir=raw_dir
    )
    return {"training": trained, "promotion": decision}
