"""prefect.yaml against a real Prefect server on loopback: the deployments register with their
schedules, and a triggered retraining run, picked up by a process worker, leaves a new model
version in the registry."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from tests.support import PROJECT_ROOT, free_port, server_process, tiny_params_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
def prefect_server(tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    env.pop("PREFECT_API_URL", None)
    api = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with server_process(command, env, f"{api}/health", tmp_path / "prefect-server.log", timeout_s=180):
        yield api, {**env, "PREFECT_API_URL": api}


def _run(command: list[str], env: dict, cwd: Path = PROJECT_ROOT, timeout: int = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_deployments_register_with_schedules_and_a_triggered_retraining_completes(
    prefect_server, tmp_path, mlflow_store
):
    from mlflow.tracking import MlflowClient

    api, env = prefect_server
    env = {**env, "MLFLOW_TRACKING_URI": mlflow_store}
    prefect = [sys.executable, "-m", "prefect"]
    _run([*prefect, "work-pool", "create", "skinrisk-process", "--type", "process"], env)
    _run([*prefect, "--no-prompt", "deploy", "--all"], env)

    deployments = {d["name"]: d for d in requests.post(f"{api}/deployments/filter", json={}, timeout=30).json()}
    declared = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())["deployments"]
    assert set(deployments) == {d["name"] for d in declared} == {"retrain-weekly", "monitor-daily"}
    for spec in declared:
        crons = [s["schedule"]["cron"] for s in deployments[spec["name"]]["schedules"]]
        assert crons == [spec["schedules"][0]["cron"]]
        assert deployments[spec["name"]]["work_pool_name"] == "skinrisk-process"

    params = tiny_params_file(tmp_path / "params.yaml")
    promote = yaml.safe_load(params.read_text())
    promote["promote"].update(min_high_risk_auc=0.0, min_balanced_accuracy=0.0, min_high_risk_recall=0.0, max_ece=1.0)
    params.write_text(yaml.safe_dump(promote, sort_keys=False))
    work = tmp_path / "work"
    parameters = {
        "params_file": str(params),
        "raw_dir": str(work / "data" / "raw"),
        "processed_dir": str(work / "data" / "processed"),
        "model_dir": str(work / "models"),
        "reports_dir": str(work / "reports"),
        "synthetic_dir": str(work / "data" / "synthetic"),
    }
    flow_run = requests.post(
        f"{api}/deployments/{deployments['retrain-weekly']['id']}/create_flow_run",
        json={"parameters": parameters},
        timeout=30,
    ).json()
    _run([*prefect, "worker", "start", "--pool", "skinrisk-process", "--run-once"], env, timeout=1200)

    state = requests.get(f"{api}/flow_runs/{flow_run['id']}", timeout=30).json()["state"]
    assert state["type"] == "COMPLETED", state
    registry = MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
    versions = registry.search_model_versions("name='skinrisk'")
    assert len(versions) == 1
    assert registry.get_model_version_by_alias("skinrisk", "champion").version == versions[0].version
