"""Tracking faults without a server: an unreachable tracking store is refused at once, and what a
run logs while its server is away is spooled and sent later, in order (a stand-in MLflow client
here; tests/integration/test_faults.py stops and restarts a real server)."""

import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from tasks import tracking
from tasks.tracking import TrackingUnavailable
from tests.support import free_port


@pytest.mark.parametrize("scheme", ["http", "postgresql"])
def test_an_unreachable_tracking_store_is_refused_fast_and_clearly(monkeypatch, scheme):
    uri = f"{scheme}://127.0.0.1:{free_port()}" + ("/skinrisk_mlflow" if scheme == "postgresql" else "")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as caught:
        tracking.start_run("never", {"a": 1}, {})
    assert time.monotonic() - started < 10, "no minutes of MLflow's own retries"
    message = str(caught.value)
    assert uri in message and "unreachable" in message and "MLFLOW_TRACKING_URI" in message
    with pytest.raises(TrackingUnavailable):
        tracking.experiment_id()


def test_local_stores_are_not_checked(tmp_path):
    tracking.check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")  # no server to reach: no error


class FlakyClient:
    """Takes metrics and artifacts like MlflowClient, and fails like it while ``down``."""

    def __init__(self):
        self.down = False
        self.metrics: list[tuple[str, float, int]] = []
        self.artifacts: dict[str, str] = {}
        self.datasets: list[tuple[str, str, str]] = []  # (context, name, digest)
        self.terminated: str | None = None

    def _maybe_fail(self):
        if self.down:
            raise MlflowException("API request to http://tracking/api failed with exception ConnectionRefused")

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._maybe_fail()
        self.metrics += [(m.key, m.value, m.step) for m in metrics]

    def log_artifact(self, run_id, local_path, artifact_path=None):
        self._maybe_fail()
        self.artifacts[f"{artifact_path}/{Path(local_path).name}"] = Path(local_path).read_text()

    def log_artifacts(self, run_id, local_dir, artifact_path=None):
        for path in Path(local_dir).iterdir():
            self.log_artifact(run_id, path, artifact_path)

    def log_inputs(self, run_id, datasets=None, models=None):
        self._maybe_fail()
        self.datasets += [(i.tags[0].value, i.dataset.name, i.dataset.digest) for i in datasets or []]

    def set_terminated(self, run_id, status="FINISHED"):
        self._maybe_fail()
        self.terminated = status


@pytest.fixture
def flaky(monkeypatch, tmp_path):
    fake = FlakyClient()
    monkeypatch.setattr(tracking, "client", lambda: fake)
    monkeypatch.setattr(tracking, "RETRY_DELAYS_S", (0.0, 0.0))

    def reachable(uri=None, timeout=None):
        if fake.down:
            raise TrackingUnavailable("down")

    monkeypatch.setattr(tracking, "check_reachable", reachable)
    monkeypatch.setenv("SKINRISK_TRACKING_SPOOL", str(tmp_path / "spool"))
    return fake


def test_results_logged_while_the_server_is_down_are_spooled_and_sent_in_order(flaky, tmp_path):
    report = tmp_path / "report.txt"
    report.write_text("first version")
    tracking.log_metrics("run1", {"loss": 1.0}, step=1)

    flaky.down = True
    tracking.log_metrics("run1", {"loss": 0.5, "nested": {"auc": 0.7}}, step=2)
    tracking.log_artifacts("run1", [report, tmp_path / "missing.txt"], artifact_path="reports")
    report.write_text("changed after logging")  # the spool kept what was logged
    tracking.log_metrics("run1", {"loss": 0.25}, step=3)
    assert tracking.pending("run1") == 3
    assert (tmp_path / "spool" / "run1" / tracking.SPOOL_FILE).exists()
    with pytest.raises(TrackingUnavailable, match="spooled for run run1"):
        tracking.end_run("run1")
    assert flaky.terminated is None

    flaky.down = False
    tracking.log_metrics("run1", {"loss": 0.125}, step=4)
    assert [(k, s) for k, _, s in flaky.metrics] == [
        ("loss", 1),
        ("loss", 2),
        ("nested.auc", 2),
        ("loss", 3),
        ("loss", 4),
    ]
    assert flaky.artifacts == {"reports/report.txt": "first version"}
    assert tracking.pending("run1") == 0 and not (tmp_path / "spool" / "run1").exists()
    tracking.end_run("run1")
    assert flaky.terminated == "FINISHED"


def test_end_run_sends_the_spool_before_closing_the_run(flaky):
    flaky.down = True
    tracking.log_metrics("run2", {"loss": 0.5}, step=1)
    flaky.down = False
    assert tracking.flush_spool("run2") == 0
    tracking.end_run("run2", "FAILED")
    assert flaky.metrics == [("loss", 0.5, 1)] and flaky.terminated == "FAILED"


def test_a_rejected_request_is_an_error_not_an_outage(flaky, monkeypatch):
    def reject(*args, **kwargs):
        raise MlflowException("bad metric", error_code=INVALID_PARAMETER_VALUE)

    monkeypatch.setattr(flaky, "log_batch", reject)
    with pytest.raises(MlflowException, match="bad metric"):
        tracking.log_metrics("run3", {"loss": 1.0})
    assert tracking.pending("run3") == 0


def test_datasets_logged_while_the_server_is_down_are_spooled_and_sent(flaky, tmp_path):
    cases = tmp_path / "cases.csv"
    columns = ",".join(tracking.DATASET_COLUMNS)
    cases.write_text(
        f"{columns},split\nISIC_1,HAM_1,mel,high,50,male,back,train\nISIC_2,HAM_2,nv,low,,female,face,val\n"
    )
    datasets = {"training": tracking.split_dataset(cases, "train", "dvc:0123456789abcdef")}

    flaky.down = True
    tracking.log_datasets("run4", datasets)
    assert tracking.pending("run4") == 1 and flaky.datasets == []
    flaky.down = False
    assert tracking.flush_spool("run4") == 0
    assert [(context, name) for context, name, _ in flaky.datasets] == [("training", "skinrisk-train")]
    assert flaky.datasets[0][2] == datasets["training"].digest and datasets["training"].digest.startswith("01234567-")
