"""The workspace lock: a second run on the same output folders is refused with a message naming the
holder; other folders are free; a killed holder leaves no stale lock."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tasks.workspace_lock import WorkspaceBusy, lock_file, workspace_lock
from tests.support import PROJECT_ROOT


@pytest.fixture(autouse=True)
def _private_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SKINRISK_LOCK_DIR", str(tmp_path / "locks"))


def test_a_second_run_on_the_same_folders_is_refused_and_names_the_holder(tmp_path):
    models, reports = tmp_path / "models", tmp_path / "reports"
    with workspace_lock([models, reports], owner="run A"):
        with pytest.raises(WorkspaceBusy) as caught, workspace_lock([tmp_path / "other", models], owner="run B"):
            pass
        message = str(caught.value)
        assert str(models) in message and "run A" in message and f"pid {os.getpid()}" in message
        with workspace_lock([tmp_path / "other"], owner="run C"):  # disjoint folders run side by side
            pass
    with workspace_lock([models, reports], owner="run B"):  # released when the block ends
        pass


def test_the_lock_of_a_killed_run_is_released_by_the_kernel(tmp_path):
    folder = tmp_path / "models"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from tasks.workspace_lock import workspace_lock\n"
            f"with workspace_lock([{str(folder)!r}], owner='doomed run'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n",
        ],
        cwd=PROJECT_ROOT,
        env={**os.environ},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusy, match="doomed run"), workspace_lock([folder]):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:
        try:
            with workspace_lock([folder]):
                break
        except WorkspaceBusy:
            assert time.monotonic() < deadline, "the lock outlived its process"
            time.sleep(0.1)
    assert lock_file(folder).exists()


def test_a_dvc_stage_is_refused_while_a_flow_writes_the_same_folders(tmp_path, monkeypatch, capsys):
    """`dvc repro` runs the stages through the CLI: each takes the lock the Prefect flow holds."""
    from tasks.cli import main

    monkeypatch.setenv("SKINRISK_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    models = tmp_path / "models"
    with workspace_lock([tmp_path / "data" / "processed", models, tmp_path / "reports"], owner="the Prefect flow"):
        assert main(["train", "--no-tracking"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "the Prefect flow" in err and "wait for it to finish" in err
    assert not models.exists(), "the refused stage wrote nothing"
