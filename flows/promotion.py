"""The promotion flow: gate ``@challenger`` against ``@champion`` and move the aliases."""

from __future__ import annotations

from prefect import flow

from tasks import paths
from tasks import prefect_tasks as t
from tasks.params import load_params


@flow(name="skinrisk-promotion", log_prints=True)
def promotion_flow(
    params_file: str = str(paths.PARAMS_FILE),
    overrides: list[str] | None = None,
    processed_dir: str = str(paths.PREFECT_PROCESSED_DIR),
    raw_dir: str = str(paths.RAW_DIR),
) -> dict:
    """Compare the challenger with the champion on the current test split; returns the decision."""
    return t.promote(processed_dir, raw_dir, load_params(params_file, list(overrides or [])))
