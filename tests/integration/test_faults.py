"""Faults, each with its behaviour pinned down:

(a) an unreachable MLflow server stops the training flow before any data is touched, at once;
(b) a tracking server that drops mid-run loses no logged results (a real server, stopped and
    restarted while a run logs);
(c) a transient task failure is retried by Prefect, with the task's own retry settings, and an
    unreachable server is not retried;
(d) a training process killed mid-epoch resumes: tests/model/test_train.py
    ::test_a_killed_training_run_resumes_from_its_last_checkpoint;
(e) two pipeline runs in one workspace: a second ``dvc repro`` fails on DVC's lock (its rwlock on
    the running stage's outputs, naming the first run's pid) and leaves the first run's outputs
    intact; a second Prefect training flow on the same folders is refused.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from infra import servers
from tasks import tracking
from tasks.tracking import TrackingUnavailable
from tasks.workspace_lock import WorkspaceBusy, workspace_lock
from tests.support import free_port, tiny_params_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _work_dirs(root: Path) -> dict[str, str]:
    return {
        "raw_dir": str(root / "data" / "raw"),
        "processed_dir": str(root / "data" / "processed"),
        "model_dir": str(root / "models"),
        "reports_dir": str(root / "reports"),
        "synthetic_dir": str(root / "data" / "synthetic"),
    }


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


# (a) -------------------------------------------------------------------------------------------


def test_an_unreachable_mlflow_server_stops_the_flow_before_any_work(prefect_api, tmp_path, monkeypatch):
    from flows.training import training_pipeline

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SKINRISK_LOCK_DIR", str(tmp_path / "locks"))
    params = tiny_params_file(tmp_path / "params.yaml")
    work = tmp_path / "work"
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as caught:
        training_pipeline(params_file=str(params), **_work_dirs(work))
    assert time.monotonic() - started < 60, "failed fast, not after MLflow's minutes of retries"
    assert uri in str(caught.value) and "unreachable" in str(caught.value)
    assert not work.exists(), "no data imported, preprocessed or trained"


def test_the_main_job_with_an_unreachable_server_prints_one_error_line(tmp_path):
    """As a user sees it: `skinrisk pipeline` in a fresh folder, the tracking server down."""
    uri = f"http://127.0.0.1:{free_port()}"
    tiny_params_file(tmp_path / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SKINRISK_LOCK_DIR": str(tmp_path / "locks")}
    env.pop("PREFECT_API_URL", None)  # the command's own temporary Prefect server
    done = subprocess.run(
        [str(Path(sys.executable).parent / "skinrisk"), "pipeline"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1
    err = done.stderr.strip()
    assert "Traceback" not in done.stdout + done.stderr
    assert err.startswith("error: ") and "\n" not in err and uri in err and "unreachable" in err, err
    assert not (tmp_path / "data").exists(), "nothing imported"
    assert "Traceback" in (tmp_path / "logs" / "skinrisk.log").read_text()


# (b) -------------------------------------------------------------------------------------------


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow server (SQLite backend, proxied artifacts) that the test may stop and restart."""
    config = servers.ServerConfig(
        mlflow_backend_store=f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}",
        mlflow_port=free_port(),
        state_dir=tmp_path / "server",
        mlflow_workers=1,
        startup_timeout=420,
    )
    (tmp_path / "server").mkdir()
    servers.start_servers(config, ("mlflow",))
    yield config
    servers.stop_server("mlflow", config)


def test_a_server_that_drops_mid_run_loses_no_logged_results(mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    config = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.mlflow_uri)
    monkeypatch.setenv("SKINRISK_TRACKING_SPOOL", str(tmp_path / "spool"))
    run_id = tracking.start_run("server-drops", {"train.learning_rate": 0.001}, {"test": "fault-b"})
    tracking.log_metrics(run_id, {"loss": 1.0}, step=1)
    report = tmp_path / "metrics.json"
    report.write_text(json.dumps({"balanced_accuracy": 0.5}))

    servers.stop_server("mlflow", config)
    started = time.monotonic()
    tracking.log_metrics(run_id, {"loss": 0.5, "val": {"auc": 0.75}}, step=2)
    tracking.log_artifacts(run_id, [report], artifact_path="reports")
    report.write_text(json.dumps({"balanced_accuracy": 0.0}))  # changed after logging: the spool kept a copy
    tracking.log_metrics(run_id, {"loss": 0.25}, step=3)
    assert time.monotonic() - started < 30, "a down server costs seconds, not MLflow's minutes of retries"
    assert tracking.pending(run_id) == 3
    with pytest.raises(TrackingUnavailable, match="spooled"):
        tracking.end_run(run_id)

    servers.start_servers(config, ("mlflow",))
    tracking.log_metrics(run_id, {"loss": 0.125}, step=4)  # sends the spool first, in order
    assert tracking.pending(run_id) == 0 and not (tmp_path / "spool" / run_id).exists()
    tracking.end_run(run_id)

    store = MlflowClient(tracking_uri=config.mlflow_uri)
    run = store.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in store.get_metric_history(run_id, "loss"))
    assert history == [(1, 1.0), (2, 0.5), (3, 0.25), (4, 0.125)]
    assert [(m.step, m.value) for m in store.get_metric_history(run_id, "val.auc")] == [(2, 0.75)]
    fetched = store.download_artifacts(run_id, "reports/metrics.json", str(tmp_path / "fetched"))
    assert json.loads(Path(fetched).read_text()) == {"balanced_accuracy": 0.5}


# (c) -------------------------------------------------------------------------------------------


def _probe_start_tracking(tmp_path: Path):
    from prefect import flow

    from tasks import prefect_tasks as t
    from tasks.params import load_params

    params = load_params(tiny_params_file(tmp_path / "params.yaml"), [])

    @flow(name="retry-probe")
    def probe() -> str:
        return t.start_tracking(str(tmp_path / "raw"), str(tmp_path / "reports"), params, "synthetic")

    return probe


def test_a_transient_task_failure_is_retried_with_the_tasks_settings(prefect_api, tmp_path, monkeypatch):
    import tasks.runs
    from tasks import prefect_tasks as t

    calls: list[float] = []

    def fails_once(*args, **kwargs) -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise ConnectionError("tracking server restarting")
        return "run-after-retry"

    monkeypatch.setattr(tasks.runs, "start_pipeline_run", fails_once)
    assert _probe_start_tracking(tmp_path)() == "run-after-retry"
    assert len(calls) == 2 and t.start_tracking.retries == 2
    assert calls[1] - calls[0] >= t.start_tracking.retry_delay_seconds - 0.5


def test_an_unreachable_server_is_not_retried(prefect_api, tmp_path, monkeypatch):
    import tasks.runs

    calls: list[float] = []

    def unreachable(*args, **kwargs) -> str:
        calls.append(time.monotonic())
        raise TrackingUnavailable("MLflow tracking at http://nowhere is unreachable")

    monkeypatch.setattr(tasks.runs, "start_pipeline_run", unreachable)
    with pytest.raises(TrackingUnavailable):
        _probe_start_tracking(tmp_path)()
    assert len(calls) == 1, "failed at once: retrying cannot bring a server back"


# (e) -------------------------------------------------------------------------------------------


def test_a_second_training_flow_on_the_same_folders_is_refused(prefect_api, tmp_path, monkeypatch):
    from flows.training import training_pipeline

    monkeypatch.setenv("SKINRISK_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = tiny_params_file(tmp_path / "params.yaml")
    work = _work_dirs(tmp_path / "work")
    with (
        workspace_lock([work["model_dir"]], owner="the first training run"),
        pytest.raises(WorkspaceBusy, match="the first training run") as caught,
    ):
        training_pipeline(params_file=str(params), **work)
    assert "model_dir" in str(caught.value)
    assert not (tmp_path / "work").exists(), "the refused run wrote nothing"


SLOW_STAGE = textwrap.dedent(
    """
    import pathlib, time
    pathlib.Path("started").touch()
    deadline = time.monotonic() + 300
    while not pathlib.Path("release").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    pathlib.Path("out.txt").write_text("written by the first run\\n")
    """
)


def test_a_second_dvc_repro_fails_on_dvcs_lock_and_the_first_finishes_intact(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "slow_stage.py").write_text(SLOW_STAGE)
    (project / "dvc.yaml").write_text(
        "stages:\n  slow:\n    cmd: python slow_stage.py\n    deps: [slow_stage.py]\n    outs: [out.txt]\n"
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}

    def dvc(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)

    assert dvc("init", "--no-scm", "-q").returncode == 0
    first = subprocess.Popen(
        ["dvc", "repro"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not (project / "started").exists():
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline, "the first repro never reached its stage"
            time.sleep(0.2)
        second = dvc("repro")
        message = second.stdout + second.stderr
        # DVC 3 holds a read/write lock on each running stage's deps and outs (.dvc/tmp/rwlock)
        assert second.returncode != 0
        assert "is busy, it is being blocked by" in message and f"PID {first.pid}" in message, message
    finally:
        (project / "release").touch()
        output = first.communicate(timeout=240)[0]
    assert first.returncode == 0, output
    assert (project / "out.txt").read_text() == "written by the first run\n"
    status = dvc("status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr


# (f) -------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
TRAIN_OUTPUTS = {
    "models/model.keras": "the last good model\n",
    "models/train.json": '{"epochs_run": 13}\n',
    "reports/training_history.csv": "epoch,loss\n1,0.9\n",
}


@pytest.mark.parametrize("fault", ["a bad param", "an unreachable tracking server"])
def test_a_stage_that_fails_under_dvc_keeps_the_last_good_outputs(fault, tmp_path):
    """DVC deletes a stage's outputs before running it unless they are ``persist: true``."""
    import yaml

    project = tmp_path / "project"
    project.mkdir()
    (project / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
    }
    if fault == "a bad param":
        params["train"]["batch_size"] = -1
    else:
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    train_deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    for dep in [d for d in train_deps if d != "data/processed"] + ["data/processed/train.npz"]:
        (project / dep).parent.mkdir(parents=True, exist_ok=True)
        (project / dep).write_text("a dependency\n")
    for path, text in TRAIN_OUTPUTS.items():
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text(text)

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=300)

    assert dvc("init", "--no-scm", "-q").returncode == 0
    done = dvc("repro", "--single-item", "train")
    assert done.returncode != 0, done.stdout
    message = done.stdout + done.stderr
    assert ("batch_size" in message) if fault == "a bad param" else ("127.0.0.1" in message), message
    for path, text in TRAIN_OUTPUTS.items():
        assert (project / path).read_text() == text, f"{path} was lost"
