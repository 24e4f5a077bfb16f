"""What the console shows: the project's own lines, library warnings a user can act on, and one
error line on failure. Everything (library INFO, Prefect's engine lines and tracebacks) goes to
the log file (``logs/skinrisk.log``, named by the error line of an unexpected failure), or to
the console too with ``skinrisk --verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tasks.paths import LOG_FILE

# Set before the libraries are imported: MLflow then leaves its loggers to this module (instead
# of a handler of its own that prints INFO lines), and draws no "Downloading artifacts" bars.
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_PROJECT_DIRS = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep for name in ("tasks", "flows"))

# Library warnings nobody can act on (logger prefix, text in the message); they stay in the log file.
QUIET_WARNINGS = (
    ("great_expectations", ""),  # "Multiple declarations of metric ..." on every import
    ("tensorflow", "triggered tf.function retracing"),  # predict on batches of another size
    ("mlflow.pyfunc", "python_model` causes it to be serialized using CloudPickle"),  # chosen: the wrapper is ours
)
# Prefect's engine lines ("Beginning flow run", "Finished in state Completed()") and the traceback
# it logs for every failed task: the CLI prints the one error line instead.
ENGINE_LOGGERS = ("prefect",)
# The traceback behind an error line: the log file only (and the console with --verbose).
TRACEBACKS = logging.getLogger("skinrisk.traceback")


def is_ours(record: logging.LogRecord) -> bool:
    """A record written by the project's own code (a ``print`` in a Prefect task included: its
    record carries the caller's file)."""
    return record.pathname.startswith(_PROJECT_DIRS)


class ConsoleFilter(logging.Filter):
    """Lets through the project's INFO lines and the library warnings that need action."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == TRACEBACKS.name:
            return False
        if is_ours(record):
            return record.levelno >= logging.INFO
        if record.levelno < logging.WARNING or record.name.startswith(ENGINE_LOGGERS):
            return False
        message = record.getMessage()
        return not any(record.name.startswith(name) and text in message for name, text in QUIET_WARNINGS)


class ConsoleFormatter(logging.Formatter):
    """The project's lines as written; a library's as ``warning: LOGGER: message``."""

    def format(self, record: logging.LogRecord) -> str:
        if is_ours(record) and record.levelno < logging.WARNING:
            return record.getMessage()
        return f"{record.levelname.lower()}: {record.name}: {record.getMessage()}"


def setup(verbose: bool = False, log_file: Path = LOG_FILE) -> Path | None:
    """Route every log record to the log file and the chosen few to the console (stderr).

    Returns the log file, or None where it cannot be written (a read-only folder): the console
    still works.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "skinrisk", False)]:  # a second main() in one process
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    if verbose:
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        console.addFilter(ConsoleFilter())
        console.setFormatter(ConsoleFormatter())
    console.skinrisk = True
    root.addHandler(console)
    for name in ("httpx", "shap"):  # one line per Prefect API call; KernelExplainer's arrays per case
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("", encoding="utf-8")  # one command's log
        # append mode (O_APPEND): the C++ lines that native_stderr_to adds to the same file land at
        # its end too, instead of being overwritten by this handler's next record
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    except OSError:
        return None
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.skinrisk = True
    root.addHandler(file_handler)
    return log_file


@contextlib.contextmanager
def native_stderr_to(path: Path | None) -> Iterator[None]:
    """Send what C++ code writes to stderr meanwhile to ``path`` (or nowhere).

    TensorFlow 2.21 prints two lines per import from C++ ("All log messages before
    absl::InitializeLog() ..." and oneDNN's notice) before absl reads TF_CPP_MIN_LOG_LEVEL, so
    no setting hides them; they are notices, not warnings.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(path if path else os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.dup2(target, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)


def import_tensorflow(log_file: Path | None) -> None:
    """Import TensorFlow once, with its C++ import notices sent to the log file."""
    if "tensorflow" in sys.modules:
        return
    with native_stderr_to(log_file):
        import tensorflow  # noqa: F401
