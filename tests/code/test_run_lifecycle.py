"""MLflow runs end FAILED or KILLED when the process working on them fails or dies."""

import os
import signal
import subprocess
import sys
import time

import pytest
from prefect.exceptions import TerminationSignal

from tasks import tracking
from tests.support import PROJECT_ROOT

OPEN_A_RUN_AND_WAIT = """
import sys, time
from tasks import tracking
print(tracking.start_run("doomed", {}, {}), flush=True)
time.sleep(300)
"""


def _status(run_id: str) -> str:
    return tracking.client().get_run(run_id).info.status  # client(): this test's store, not the last one set


def test_a_run_whose_process_was_killed_is_ended_killed_by_the_next_run(mlflow_store):
    child = subprocess.Popen(
        [sys.executable, "-c", OPEN_A_RUN_AND_WAIT],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")},
        cwd=os.getcwd(),
    )
    orphan = child.stdout.readline().strip()
    assert _status(orphan) == "RUNNING"
    child.send_signal(signal.SIGKILL)  # no handler runs: only the next run can tell
    child.wait(timeout=30)

    alive = tracking.start_run("the next run", {}, {})
    assert _status(orphan) == "KILLED"
    assert "died mid-stage" in tracking.client().get_run(orphan).data.tags[tracking.END_REASON_TAG]
    assert _status(alive) == "RUNNING", "the run of a live process is left alone"
    assert tracking.end_orphaned_runs() == []


def test_a_run_between_stages_is_idle_not_orphaned(mlflow_store):
    run_id = tracking.start_run("dvc", {}, {})
    with tracking.working_on(run_id):
        pass
    assert tracking.client().get_run(run_id).data.tags[tracking.PID_TAG] == ""
    assert tracking.end_orphaned_runs() == [] and _status(run_id) == "RUNNING"


@pytest.mark.parametrize(("error", "status"), [(ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_stage_that_fails_or_is_interrupted_ends_its_run(mlflow_store, error, status):
    run_id = tracking.start_run("stage", {}, {})
    with pytest.raises(error), tracking.working_on(run_id):
        raise error()
    assert _status(run_id) == status


@pytest.mark.parametrize(
    ("error", "status"),
    [(None, "FINISHED"), (ValueError, "FAILED"), (KeyboardInterrupt, "KILLED"), (TerminationSignal, "KILLED")],
)
def test_an_owned_run_ends_finished_failed_or_killed(mlflow_store, error, status):
    """The monitoring runs and the Prefect flows end their runs by the same rule as the CLI stages."""
    run_id = tracking.start_run("owned", {}, {})
    if error is None:
        with tracking.owned_run(run_id):
            pass
    else:
        instance = error(signal.SIGTERM) if error is TerminationSignal else error()
        with pytest.raises(error), tracking.owned_run(run_id):
            raise instance
    assert _status(run_id) == status


def test_the_flows_end_their_runs_by_the_shared_rule():
    """flows/training.py and flows/monitoring.py once ended every run FAILED, Ctrl-C included."""
    import inspect

    from flows import monitoring, training

    for flow in (training.training_pipeline, monitoring.monitoring_flow):
        source = inspect.getsource(flow.fn)
        assert "ending_status(exc)" in source and '"FAILED"' not in source, flow.name


def test_sigterm_ends_a_stage_s_run_killed(mlflow_store, tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    # `skinrisk validate` as dvc.yaml runs it, its stage function swapped for one that works on a run
    script = (
        "import sys, time\n"
        "from tasks import cli, tracking\n"
        "from tasks.stages import validate\n"
        "def stage(*args):\n"
        "    run_id = tracking.start_run('stopped', {}, {})\n"
        "    print(run_id, flush=True)\n"
        "    with tracking.working_on(run_id):\n"
        "        time.sleep(300)\n"
        "validate.validate_raw = stage\n"
        "sys.exit(cli.main(['validate']))\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},  # this checkout's tasks, not an installed one
    )
    run_id = child.stdout.readline().strip()
    time.sleep(0.5)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 128 + signal.SIGTERM
    assert _status(run_id) == "KILLED"
