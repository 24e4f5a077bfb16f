"""The team deployment without containers: infra/servers.py starts real MLflow and Prefect servers on
PostgreSQL (fresh databases for this run, dropped afterwards), the training flow and then the
promotion flow run against them, and their APIs show the run, the model version, its aliases and
the flow runs. The work-pool templates are accepted by the Prefect server."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from infra import servers
from tests.support import PROJECT_ROOT, free_port, tiny_params_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]

POSTGRES_URL = os.environ.get("SKINRISK_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432")

RUN_FLOWS = """
import json, sys, time
from flows.promotion import promotion_flow
from flows.training import training_pipeline

args = json.loads(sys.argv[1])
started = time.perf_counter()
trained = training_pipeline(**args["training"])
trained_at = time.perf_counter()
decision = promotion_flow(**args["promotion"])
print("RESULT " + json.dumps({
    "training": trained,
    "promotion": decision,
    "training_s": trained_at - started,
    "promotion_s": time.perf_counter() - trained_at,
}, default=str))
"""


def _postgres_or_skip() -> None:
    import psycopg

    try:
        psycopg.connect(f"{POSTGRES_URL}/postgres", connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL} ({str(exc).strip()}): team-server test skipped")


@pytest.fixture(scope="module")
def team_servers(tmp_path_factory):
    """Both servers on fresh PostgreSQL databases; yields (config, start seconds per server)."""
    _postgres_or_skip()
    suffix = uuid.uuid4().hex[:8]
    config = servers.ServerConfig(
        postgres_url=POSTGRES_URL,
        mlflow_db=f"skinrisk_mlflow_t{suffix}",
        prefect_db=f"skinrisk_prefect_t{suffix}",
        mlflow_port=free_port(),
        prefect_port=free_port(),
        state_dir=tmp_path_factory.mktemp("servers"),
        mlflow_workers=1,
        prefect_ui=False,
        startup_timeout=420,
    )
    try:
        seconds = servers.start(config, say=lambda line: None)
        yield config, seconds
    finally:
        for server in servers.SERVERS:
            servers.stop_server(server, config)
        for name in (config.mlflow_db, config.prefect_db):
            servers.drop_database(POSTGRES_URL, name)


def _count(database: str, table: str) -> int:
    import psycopg

    with psycopg.connect(f"{POSTGRES_URL}/{database}", connect_timeout=5) as connection:
        return connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_training_then_promotion_against_team_servers_on_postgres(team_servers, tmp_path):
    from mlflow.tracking import MlflowClient

    config, start_seconds = team_servers
    print(f"server start (s): {json.dumps({k: round(v, 1) for k, v in start_seconds.items()})}")
    assert all(seconds > 0 for seconds in start_seconds.values()), "fresh servers, not leftovers"

    params = tiny_params_file(tmp_path / "params.yaml")
    values = yaml.safe_load(params.read_text())
    values["promote"].update(min_high_risk_auc=0.0, min_balanced_accuracy=0.0, min_high_risk_recall=0.0, max_ece=1.0)
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    work = tmp_path / "work"
    work.mkdir()
    dirs = {
        "raw_dir": str(work / "data" / "raw"),
        "processed_dir": str(work / "data" / "processed"),
        "reports_dir": str(work / "reports"),
        "synthetic_dir": str(work / "data" / "synthetic"),
    }
    args = {
        "training": {"params_file": str(params), "model_dir": str(work / "models"), **dirs},
        "promotion": {"params_file": str(params), "processed_dir": dirs["processed_dir"], "raw_dir": dirs["raw_dir"]},
    }
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "MLFLOW_TRACKING_URI": config.mlflow_uri,
        "PREFECT_API_URL": config.prefect_api_url,  # read when prefect is imported: hence a subprocess
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        "SKINRISK_LOCK_DIR": str(tmp_path / "locks"),
    }
    done = subprocess.run(
        [sys.executable, "-c", RUN_FLOWS, json.dumps(args)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(f"flows against the servers (s): training {result['training_s']:.1f}, promotion {result['promotion_s']:.1f}")

    # MLflow, through its API: the run, the version and both aliases
    registry = MlflowClient(tracking_uri=config.mlflow_uri, registry_uri=config.mlflow_uri)
    run_id = result["training"]["run_id"]
    run = registry.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "test_balanced_accuracy" in run.data.metrics and run.data.params["train.alpha"] == "0.35"
    assert run.data.tags["orchestrator"] == "prefect"
    assert [m.step for m in registry.get_metric_history(run_id, "val_balanced_accuracy")] == [1, 2, 3]
    versions = registry.search_model_versions("name='skinrisk'")
    assert [v.run_id for v in versions] == [run_id]
    for alias in ("challenger", "champion"):
        assert registry.get_model_version_by_alias("skinrisk", alias).version == versions[0].version
    assert result["promotion"]["promoted"] is True
    # artifacts went through the server (proxied) into its artifacts destination
    assert {a.path for a in registry.list_artifacts(run_id, "data")} >= {"data/validation.json"}
    assert list(config.artifacts_dir.rglob("validation.json")), "artifacts stored by the server"
    # and everything sits in PostgreSQL
    assert _count(config.mlflow_db, "runs") == 1 and _count(config.mlflow_db, "model_versions") == 1

    # Prefect, through its REST API: both flow runs and their tasks completed
    api = config.prefect_api_url
    flows = {f["id"]: f["name"] for f in requests.post(f"{api}/flows/filter", json={}, timeout=30).json()}
    flow_runs = requests.post(f"{api}/flow_runs/filter", json={}, timeout=30).json()
    states = {flows[r["flow_id"]]: r["state_type"] for r in flow_runs}
    assert states == {"skinrisk-training": "COMPLETED", "skinrisk-promotion": "COMPLETED"}
    task_runs = requests.post(f"{api}/task_runs/filter", json={}, timeout=30).json()
    task_states = {r["task_key"].split("-")[0]: r["state_type"] for r in task_runs}
    assert set(task_states.values()) == {"COMPLETED"}
    assert {"check_tracking", "train", "register", "promote"} <= set(task_states), sorted(task_states)
    assert _count(config.prefect_db, "flow_run") == 2


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_work_pool_templates_are_accepted_by_the_prefect_server(team_servers, kind):
    config, _ = team_servers
    api = config.prefect_api_url
    template = json.loads((PROJECT_ROOT / "infra" / "work-pools" / f"{kind}.json").read_text())
    answer = requests.post(
        f"{api}/work_pools/",
        json={"name": f"skinrisk-{kind}", "type": kind, "base_job_template": template},
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    stored = requests.get(f"{api}/work_pools/skinrisk-{kind}", timeout=30).json()
    assert stored["base_job_template"] == template


def test_server_start_is_idempotent_and_status_reports_health(team_servers, capsys):
    config, _ = team_servers
    started = time.monotonic()
    assert servers.start_servers(config) == {"mlflow": 0.0, "prefect": 0.0}  # already running: left alone
    assert time.monotonic() - started < 30
    report = servers.status(config)
    assert all(info["healthy"] and info["pid"] for info in report.values()), report
    assert Path(report["mlflow"]["log"]).is_file()
