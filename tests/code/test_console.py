"""The console shows the project's lines and actionable warnings; the log file keeps everything."""

import logging
from pathlib import Path

import pytest

from tasks import console
from tasks.cli import main

OURS = str(Path(console.__file__))
LIBRARY = "/site-packages/somelib/module.py"


def record(name: str, level: int, message: str, pathname: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, message, None, None)


@pytest.mark.parametrize(
    ("name", "level", "message", "pathname", "shown"),
    [
        ("prefect.task_runs", logging.INFO, "imported 800 images", OURS, True),  # a print in a Prefect task
        ("tasks.download", logging.INFO, "downloading part 2", OURS, True),
        ("great_expectations", logging.INFO, "Skipping registering function get_context", LIBRARY, False),
        ("great_expectations", logging.WARNING, "Multiple declarations of metric", LIBRARY, False),
        ("prefect.task_runs", logging.INFO, "Finished in state Completed()", LIBRARY, False),
        ("prefect.task_runs", logging.ERROR, "Task run failed with exception: DataError", LIBRARY, False),
        ("tensorflow", logging.WARNING, "5 out of the last 11 calls triggered tf.function retracing", LIBRARY, False),
        ("mlflow.store.db.utils", logging.INFO, "Creating initial MLflow database tables...", LIBRARY, False),
        ("urllib3.connectionpool", logging.WARNING, "Retrying after connection broken", LIBRARY, True),
        ("skinrisk.traceback", logging.ERROR, "error: bad input", OURS, False),
    ],
)
def test_the_console_filter_keeps_the_project_lines_and_actionable_warnings(name, level, message, pathname, shown):
    assert console.ConsoleFilter().filter(record(name, level, message, pathname)) is shown


def test_a_library_warning_names_its_logger():
    line = console.ConsoleFormatter().format(record("urllib3", logging.WARNING, "Retrying", LIBRARY))
    assert line == "warning: urllib3: Retrying"


def test_an_error_is_one_line_on_the_console_and_its_traceback_goes_to_the_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    assert main(["preprocess", "--raw-dir", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()]
    assert err.startswith("error: ")
    log = (tmp_path / "logs" / "skinrisk.log").read_text()
    assert "Traceback (most recent call last)" in log and "DataError" in log


def test_an_unexpected_exception_is_one_line_naming_the_log(tmp_path, monkeypatch, capsys):
    import tasks.stages.validate

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.setattr(tasks.stages.validate, "validate_raw", broken)
    assert main(["validate"]) == 1
    err = capsys.readouterr().err
    log_file = Path("logs") / "skinrisk.log"
    assert (
        err.strip() == f"error: unexpected RuntimeError: a bug (full log: {log_file}); please report it with that log"
    )
    assert "RuntimeError: a bug" in (tmp_path / "logs" / "skinrisk.log").read_text()


def test_tensorflow_native_import_notices_go_to_the_log(tmp_path):
    import subprocess
    import sys

    log = tmp_path / "native.log"
    code = (
        "from pathlib import Path; from tasks import console; "
        f"console.import_tensorflow(Path({str(log)!r})); print('imported')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.strip() == "imported"
