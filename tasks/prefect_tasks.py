"""The Prefect tasks: each wraps one stage function, taking paths and run ids, never DataFrames.

Kept apart from the stage modules so that the CLI stages DVC runs do not pay Prefect's import.
The flow parses params.yaml once and hands each task its own section (small pydantic models),
so every task of a run sees the same parameters even if the file changes meanwhile. Prefect's
result caching is off (``NO_CACHE``: no input is hashed): DVC is the cache.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.params import (
    DataParams,
    EvaluateParams,
    ExplainParams,
    MonitorParams,
    Params,
    PreprocessParams,
    TrainParams,
    ValidateParams,
)


def mlflow_link(run_id: str, model: tuple[str, str] | None = None) -> str:
    """Markdown naming the MLflow run (and a registered model version), as links into the MLflow
    UI when the tracking store is a server; with a local store, how to open the UI."""
    from tasks.tracking import client, tracking_uri

    uri = tracking_uri().rstrip("/")
    experiment = client().get_run(run_id).info.experiment_id
    served = uri.startswith(("http://", "https://"))
    ui = uri if served else "http://127.0.0.1:5000"
    run = f"[run {run_id[:8]}]({ui}/#/experiments/{experiment}/runs/{run_id})"
    version = f", [{model[0]} version {model[1]}]({ui}/#/models/{model[0]}/versions/{model[1]})" if model else ""
    where = "" if served else f" (local store {uri}: open it with `make mlflow-ui`)"
    return f"MLflow: {run}{version}{where}"


def rounded(value, digits: int = 4):
    """A figure as a person reads it in an artifact table (ints and text unchanged)."""
    return round(value, digits) if isinstance(value, float) else value


def retry_unless_unreachable(task, task_run, state) -> bool:
    """Retry a failed tracking task, except when the server is down: that fails the run at once."""
    from tasks.tracking import TrackingUnavailable

    return not isinstance(state.result(raise_on_failure=False), TrackingUnavailable)


@task(name="check-tracking", cache_policy=NO_CACHE)
def check_tracking() -> str:
    """Fail fast, before any data is touched, when the MLflow tracking server cannot be reached."""
    from tasks.tracking import check_reachable, tracking_uri

    check_reachable()
    return tracking_uri()


@task(name="ensure-data", cache_policy=NO_CACHE)
def ensure_data(raw_dir: str, synthetic_dir: str, params: DataParams) -> str:
    from tasks.ingest import ensure_imported

    return ensure_imported(Path(raw_dir), Path(synthetic_dir), params)


@task(name="validate", task_run_name="validate {raw_dir}", cache_policy=NO_CACHE)
def validate(raw_dir: str, reports_dir: str, params: ValidateParams) -> str:
    from tasks.stages.validate import validate_raw

    return str(validate_raw(Path(raw_dir), Path(reports_dir), params).report_json)


@task(name="preprocess", task_run_name="preprocess {raw_dir}", cache_policy=NO_CACHE)
def preprocess(raw_dir: str, processed_dir: str, reports_dir: str, params: PreprocessParams) -> str:
    from tasks.stages.preprocess import format_counts
    from tasks.stages.preprocess import preprocess as run_preprocess
    from tasks.stages.validate import REPORT_JSON, require_validated

    require_validated(Path(raw_dir), Path(reports_dir) / REPORT_JSON)
    summary = run_preprocess(Path(raw_dir), Path(processed_dir), params, reports_dir=Path(reports_dir))
    print(format_counts(summary))
    return processed_dir


@task(
    name="start-tracking",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_unreachable,
)
def start_tracking(raw_dir: str, reports_dir: str, params: Params, source: str) -> str:
    from tasks.runs import start_pipeline_run

    return start_pipeline_run(params, Path(raw_dir), Path(reports_dir), orchestrator="prefect", source=source)


# a retry resumes from the last checkpoint
@task(name="train", task_run_name="train run {run_id:.8}", cache_policy=NO_CACHE, retries=1)
def train(processed_dir: str, model_dir: str, reports_dir: str, params: TrainParams, run_id: str) -> str:
    from tasks.stages.train import train as run_train

    return run_train(Path(processed_dir), Path(model_dir), Path(reports_dir), params, run_id=run_id).model_path


@task(name="evaluate", task_run_name="evaluate run {run_id:.8}", cache_policy=NO_CACHE)
def evaluate(
    model_path: str, processed_dir: str, reports_dir: str, model_dir: str, params: EvaluateParams, run_id: str
) -> dict:
    from tasks.metrics import headline_figures
    from tasks.stages.evaluate import evaluate as run_evaluate

    metrics = run_evaluate(
        Path(model_path), Path(processed_dir), Path(reports_dir), Path(model_dir), params, run_id=run_id
    )
    headline = headline_figures(metrics)
    rows = [{"metric": name, "value": rounded(value)} for name, value in headline.items()]
    create_table_artifact(
        key="skinrisk-test-metrics", table=rows, description=f"Test-split figures of this run. {mlflow_link(run_id)}"
    )
    return headline


@task(name="explain", task_run_name="explain run {run_id:.8}", cache_policy=NO_CACHE)
def explain(model_path: str, processed_dir: str, reports_dir: str, params: ExplainParams, run_id: str) -> str:
    from tasks.stages.explain import explain_test_cases

    out = Path(reports_dir) / "explain"
    explain_test_cases(Path(model_path), Path(processed_dir), out, params, run_id=run_id)
    return str(out)


@task(name="reference", task_run_name="reference run {run_id:.8}", cache_policy=NO_CACHE)
def reference_profile(
    model_path: str, processed_dir: str, raw_dir: str, model_dir: str, params: MonitorParams, run_id: str
) -> str:
    from tasks.drift_profile import REFERENCE_FILE
    from tasks.stages.reference import build_reference_profile

    out = Path(model_dir) / REFERENCE_FILE
    build_reference_profile(Path(model_path), Path(processed_dir), out, params, raw_dir=Path(raw_dir), run_id=run_id)
    return str(out)


@task(
    name="register", task_run_name="register run {run_id:.8}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5
)
def register(model_path: str, processed_dir: str, model_dir: str, reports_dir: str, run_id: str) -> str:
    from tasks.stages.register import register as run_register

    registration = run_register(Path(model_path), Path(processed_dir), Path(model_dir), Path(reports_dir), run_id)
    create_markdown_artifact(
        key="skinrisk-registration",
        markdown=f"Registered **{registration.name}** version {registration.version} as "
        f"`@{registration.alias}` (`{registration.model_uri}`).\n\n"
        + mlflow_link(run_id, (registration.name, str(registration.version))),
    )
    return registration.model_uri


@task(
    name="finish-tracking",
    task_run_name="finish run {run_id:.8} {status}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
)
def finish_tracking(run_id: str, status: str) -> None:
    from tasks.tracking import end_run

    end_run(run_id, status)


@task(name="promote", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def promote(processed_dir: str, raw_dir: str, params: Params) -> dict:
    from tasks.stages.promote import decision_record
    from tasks.stages.promote import promote as run_promote

    decision = run_promote(
        Path(processed_dir), Path(raw_dir), params.promote, calibration_bins=params.evaluate.calibration_bins
    )
    print(decision.summary())
    create_markdown_artifact(
        key="skinrisk-promotion",
        markdown="### Promotion decision\n\n```\n" + decision.summary() + "\n```",
        description="Challenger vs champion gates",
    )
    return decision_record(decision)
