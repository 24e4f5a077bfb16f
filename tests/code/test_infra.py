"""infra/: the team's docker-compose file and work-pool templates are well formed (there is no Docker
engine here to run them), and infra/servers.py derives its URLs and commands from one config."""

import json
import re

import pytest
import yaml

from infra import servers
from tests.support import PROJECT_ROOT

INFRA = PROJECT_ROOT / "infra"
LONG_RUNNING = {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def _env_example() -> dict[str, str]:
    lines = (INFRA / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def _text(value) -> str:
    return json.dumps(value)


def test_compose_has_the_team_services_with_healthchecks_and_ordered_start(compose):
    services = compose["services"]
    assert set(services) == LONG_RUNNING | {"minio-init"}
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck", {})
        assert check.get("test") and check.get("interval") and check.get("retries"), name
    assert services["minio-init"]["restart"] == "no" and "mc mb --ignore-existing" in _text(services["minio-init"])
    expected = {
        "minio-init": {"minio": "service_healthy"},
        "mlflow": {"postgres": "service_healthy", "minio-init": "service_completed_successfully"},
        "prefect-server": {"postgres": "service_healthy"},
        "prefect-worker": {"prefect-server": "service_healthy", "mlflow": "service_healthy"},
    }
    for name, needs in expected.items():
        assert {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()} == needs, name


def test_every_published_port_is_bound_to_loopback(compose):
    published = [(name, port) for name, spec in compose["services"].items() for port in spec.get("ports", [])]
    assert {name for name, _ in published} == {"postgres", "minio", "mlflow", "prefect-server"}
    for name, port in published:
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)


def test_mlflow_and_prefect_run_on_postgres_and_mlflow_proxies_s3_artifacts(compose):
    mlflow = compose["services"]["mlflow"]
    command = mlflow["command"]
    backend = command[command.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql://") and "@postgres:5432/" in backend
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    assert "--serve-artifacts" in command and command[command.index("--host") + 1] == "0.0.0.0"
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    prefect = compose["services"]["prefect-server"]["environment"]
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    worker = compose["services"]["prefect-worker"]
    assert "prefect --no-prompt deploy --all" in _text(worker["command"])
    assert "prefect worker start --pool skinrisk-process" in _text(worker["command"])
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_compose_files_and_variables_exist(compose):
    for spec in compose["services"].values():
        build = spec.get("build")
        if build:
            context = (INFRA / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), build
        for volume in spec.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (INFRA / source).exists(), volume
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", (INFRA / "docker-compose.yml").read_text()))
    documented = set(_env_example())
    assert used <= documented, f"variables missing from infra/.env.example: {sorted(used - documented)}"
    assert (INFRA / "postgres" / "init-databases.sh").read_text().count("CREATE DATABASE") == 1


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_work_pool_templates_use_only_declared_variables(kind):
    template = json.loads((INFRA / "work-pools" / f"{kind}.json").read_text())
    assert set(template) == {"job_configuration", "variables"}
    declared = set(template["variables"]["properties"])
    placeholders = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= declared, placeholders - declared
    assert template["variables"]["properties"]["image"]["default"].rsplit("/", 1)[-1] == "skinrisk-worker:latest"
    assert "MLFLOW_TRACKING_URI" in template["variables"]["properties"]["env"]["default"]


def test_server_config_derives_urls_and_commands(tmp_path):
    config = servers.ServerConfig.from_env(
        {"SKINRISK_PG_URL": "postgresql://me@db.example:5433/", "SKINRISK_MLFLOW_PORT": "5055"}
    )
    assert config.mlflow_backend_uri == "postgresql://me@db.example:5433/skinrisk_mlflow"
    assert config.prefect_database_url == "postgresql+asyncpg://me@db.example:5433/skinrisk_prefect"
    assert config.mlflow_uri == "http://127.0.0.1:5055"
    assert servers.env_exports(config).splitlines() == [
        "export MLFLOW_TRACKING_URI=http://127.0.0.1:5055",
        "export PREFECT_API_URL=http://127.0.0.1:4200/api",
    ]
    command = servers._command("mlflow", config)
    assert command[command.index("--artifacts-destination") + 1] == str(config.artifacts_dir)
    env = servers._environment("prefect", config)
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == config.prefect_database_url
    assert "PREFECT_API_URL" not in env


def test_status_of_servers_that_are_not_running(tmp_path, capsys):
    code = servers.main(["status", "--state-dir", str(tmp_path), "--mlflow-port", "1", "--prefect-port", "1"])
    assert code == 3
    out = capsys.readouterr().out
    assert "mlflow" in out and "not answering" in out
