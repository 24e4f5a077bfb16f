"""The whole pipeline on a tiny synthetic sample, through both orchestrators.

Prefect runs the flow under its test harness (a real temporary API server); ``dvc repro`` runs the
same stages through the CLI. Both log to a real SQLite MLflow store and register a challenger.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import paths
from tests.support import PROJECT_ROOT, tiny_params_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _assert_registered(uri: str, run_id: str | None = None) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("skinrisk", "challenger")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert "test_balanced_accuracy" in run.data.metrics and "test_triage.high_risk_recall" in run.data.metrics
    assert "val_temperature" in run.data.metrics
    orchestrator = run.data.tags["orchestrator"]
    short_version = run.data.tags["data_version"].split(":")[1][:8]
    assert re.fullmatch(rf"{orchestrator}-{short_version}-\d{{8}}-\d{{4}}", run.info.run_name), run.info.run_name
    contexts = {t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert contexts == {"training", "validation", "test"}
    root = {a.path for a in client.list_artifacts(run.info.run_id) if not a.is_dir}
    assert root >= {"metrics.json", "confusion_matrix.png", "reliability.png", "training_curves.png"}
    assert run.info.run_id in version.description and "Not a medical device" in (
        client.get_registered_model("skinrisk").description
    )
    assert run.data.params["train.alpha"] == "0.35"
    assert run.data.tags["data_version"].startswith(("dvc:", "sha256:"))
    assert "mlflow.source.git.commit" in run.data.tags or not (PROJECT_ROOT / ".git").exists()
    history = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
    assert [m.step for m in history] == [1, 2, 3], "one point per epoch"
    if run_id:
        assert version.run_id == run_id


def test_prefect_flow_runs_end_to_end_and_registers_a_challenger(tmp_path, monkeypatch, mlflow_store):
    from prefect.testing.utilities import prefect_test_harness

    from flows.training import training_pipeline

    params = tiny_params_file(tmp_path / "params.yaml")
    with prefect_test_harness(server_startup_timeout=120):
        result = training_pipeline(params_file=str(params))
    assert result["data"] == "synthetic"
    assert result["model_uri"].startswith("models:/skinrisk/")
    # a Prefect run works in its own folders: DVC's outputs (data/processed, models, reports) stay untouched
    workspace = tmp_path / paths.PREFECT_WORKSPACE
    metrics = json.loads((workspace / "reports" / "metrics.json").read_text())
    assert set(metrics) >= {"balanced_accuracy", "balanced_accuracy_ci95", "confusion_matrix", "ece", "triage"}
    assert (workspace / "reports" / "validation.md").exists()
    assert (workspace / "reports" / "explain" / "explanations.json").exists()
    assert (workspace / "models" / "reference_profile.parquet").exists()
    assert (workspace / "processed" / "preprocess.json").exists()
    assert not any((tmp_path / d).exists() for d in (paths.PROCESSED_DIR, paths.MODELS_DIR, paths.REPORTS_DIR))
    _assert_registered(mlflow_store, result["run_id"])


def test_dvc_repro_runs_the_same_stages_and_reruns_only_what_changed(tmp_path, monkeypatch, mlflow_store):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "tasks", "gx"):
        source = PROJECT_ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, project / name)
    params = tiny_params_file(project / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(PROJECT_ROOT)}

    def run(*command: str) -> str:
        done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("skinrisk", "data", "synth", "--params", str(params), "--out", "synthetic")
    run("skinrisk", "data", "import", "synthetic", "--params", str(params))
    assert (project / "data" / "raw.dvc").exists(), "the import is tracked by DVC"
    out = run("dvc", "repro")
    for stage in ("validate", "preprocess", "train", "evaluate", "explain", "reference", "register"):
        assert f"Running stage '{stage}'" in out
    _assert_registered(mlflow_store)

    params.write_text(params.read_text().replace("learning_rate: 0.003", "learning_rate: 0.002"))
    out = run("dvc", "repro")
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'preprocess'" not in out and "Running stage 'validate'" not in out

    # DVC's views: the metrics file holds only the headline figures, git tracks it (so
    # `dvc metrics diff` finds HEAD's), and the plots' data is DVC-cached (so `dvc plots diff` can
    # read other revisions)
    def shown(*command: str):
        done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
        return json.loads(done.stdout)

    metrics = shown("dvc", "metrics", "show", "--json")
    files = next(iter(metrics.values()))["data"]
    assert list(files) == ["reports/headline.json"], list(files)
    figures = files["reports/headline.json"]["data"]
    assert "high_risk_roc_auc" in figures and "per_class" not in figures and len(figures) <= 16, figures
    run("git", "add", "dvc.yaml", "dvc.lock", "params.yaml", "reports/headline.json")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "run 2")
    params.write_text(params.read_text().replace("learning_rate: 0.002", "learning_rate: 0.0025"))
    run("dvc", "repro")
    diff = shown("dvc", "metrics", "diff", "--all", "--json")
    assert "high_risk_roc_auc" in diff["reports/headline.json"], diff
    assert "train.learning_rate" in shown("dvc", "params", "diff", "--json")["params.yaml"]
