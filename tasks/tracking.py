"""MLflow tracking: the one place that talks to the tracking server, always by run id.

MLflow's active run is thread-local and Prefect runs tasks in worker threads, so nothing here
uses ``mlflow.start_run``'s global state: every call names its run.

A tracking server is checked before a run starts (a short request to its health endpoint: MLflow's
own client would retry a dead server for minutes), so a down server stops a pipeline before any
training. Once a run is open, a server that drops loses nothing: metrics and artifacts that cannot
be sent after a few quick retries are appended to the run's spool (``.mlflow-spool/<run_id>/``,
``SKINRISK_TRACKING_SPOOL`` moves it) and sent, in order, by the next successful call for that run
or at :func:`end_run`; :func:`flush_spool` sends them by hand.

What a person sees when comparing runs is the experiment's description, EXPERIMENT_DESCRIPTION below.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tasks.atomic import write_text
from tasks.errors import SkinriskError

EXPERIMENT = "skinrisk"
MODEL_NAME = "skinrisk"
DEFAULT_DB = Path("mlflow.db")
DEFAULT_ARTIFACTS = Path("mlartifacts")
DEFAULT_SPOOL = Path(".mlflow-spool")
SPOOL_FILE = "pending.jsonl"
CHECK_TIMEOUT_S = 5.0  # SKINRISK_TRACKING_CHECK_TIMEOUT overrides
RETRY_DELAYS_S = (1.0, 2.0)  # between the attempts of one logging call before it spools
REQUEST_TIMEOUT_S = 30  # per HTTP request while logging (MLflow's default is 120 s)
_DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
DATA_VERSION_TAG = "data_version"  # set when a pipeline run opens (tasks.runs)
# MLflow's dataset contexts of the processed splits, and what a split's dataset holds: its case
# table (the columns a person filters on), not the pixels
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
DATASET_COLUMNS = ("image_id", "lesion_id", "dx", "risk_level", "age", "sex", "localization")
NOTE_TAG = "mlflow.note.content"  # an experiment's, run's or model's description in the MLflow UI
EXPERIMENT_DESCRIPTION = (
    "Training runs of skinrisk: one run per pipeline run (`dvc repro` or the Prefect flow), named "
    "`<orchestrator>-<data version>-<UTC date-time>` (or the DVC experiment's name). Per-epoch training "
    "curves keep Keras' names (`loss`, `accuracy`...), validation figures start with `val_`, figures on "
    "the held-out test split with `test_` (the headline: `test_high_risk_roc_auc`, "
    "`test_triage.high_risk_recall`, `test_balanced_accuracy`, `test_ece`). Each run's datasets are its "
    "training, validation and test case tables; the figures to compare (confusion_matrix.png, "
    "reliability.png, training_curves.png, metrics.json) sit at the artifact root."
)

log = logging.getLogger(__name__)
_lock = threading.RLock()  # one logging call (and its spool) at a time in this process


class TrackingUnavailable(SkinriskError):
    """The tracking server cannot be reached: down, wrong address, or the network."""


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite database in the project (never a file store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB.resolve()}"


def client():
    """An ``MlflowClient`` on :func:`tracking_uri`, with MLflow's fluent API pointed there too."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _unreachable(uri: str, reason: str) -> TrackingUnavailable:
    return TrackingUnavailable(
        f"MLflow tracking at {uri} is unreachable ({reason}): start the server (`make servers`, see the "
        "README's Team deployment) or unset MLFLOW_TRACKING_URI to track in the local SQLite store"
    )


def check_reachable(uri: str | None = None, timeout: float | None = None) -> None:
    """Raise :class:`TrackingUnavailable` unless the tracking store answers within ``timeout`` seconds.

    An HTTP server must answer its ``/health`` endpoint (any answer but a 5xx from a proxy counts);
    a database URI must accept a TCP connection; local stores (SQLite, files) are not checked.
    """
    import requests

    uri = uri or tracking_uri()
    if timeout is None:
        timeout = float(os.environ.get("SKINRISK_TRACKING_CHECK_TIMEOUT", CHECK_TIMEOUT_S))
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if scheme in ("http", "https"):
        try:
            answer = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
        except requests.RequestException as exc:
            raise _unreachable(uri, f"{type(exc).__name__}, within {timeout:g} s") from exc
        if answer.status_code >= 500:
            raise _unreachable(uri, f"its health check answered HTTP {answer.status_code}")
    elif scheme in _DATABASE_PORTS and parts.hostname:
        try:
            socket.create_connection((parts.hostname, parts.port or _DATABASE_PORTS[scheme]), timeout=timeout).close()
        except OSError as exc:
            raise _unreachable(uri, f"{exc.strerror or exc}, within {timeout:g} s") from exc


def experiment_id(name: str = EXPERIMENT) -> str:
    """The experiment's id, creating it (artifacts under ``mlartifacts/`` for a local store)."""
    check_reachable()
    mlflow_client = client()
    try:
        existing = mlflow_client.get_experiment_by_name(name)
    except Exception as exc:  # connection errors come in many types
        raise SkinriskError(
            f"MLflow tracking at {tracking_uri()} is unreachable ({exc}); start the server or "
            "unset MLFLOW_TRACKING_URI to use the local SQLite store"
        ) from exc
    tags = {NOTE_TAG: EXPERIMENT_DESCRIPTION} if name == EXPERIMENT else {}
    if existing is not None:
        if tags and not existing.tags.get(NOTE_TAG):  # never overwrite one edited in the UI
            mlflow_client.set_experiment_tag(existing.experiment_id, NOTE_TAG, EXPERIMENT_DESCRIPTION)
        return existing.experiment_id
    location = DEFAULT_ARTIFACTS.resolve().as_uri() if tracking_uri().startswith("sqlite:") else None
    return mlflow_client.create_experiment(name, artifact_location=location, tags=tags)


def git_tags() -> dict[str, str]:
    """The source commit as MLflow's standard tags (empty outside a git checkout).

    Asked of the checkout holding this code, not of the working directory (runs often work elsewhere).
    """
    try:
        import git  # GitPython, an MLflow dependency (its import fails without a git executable)

        with git.Repo(Path(__file__).resolve().parents[1], search_parent_directories=True) as repo:
            return {"mlflow.source.git.commit": repo.head.commit.hexsha, "git_dirty": str(repo.is_dirty()).lower()}
    except Exception:  # no git, no checkout (an installed copy), or a checkout without a commit yet
        return {}


def start_run(run_name: str, params: Mapping[str, Any], tags: Mapping[str, str], experiment: str = EXPERIMENT) -> str:
    """Create a run with its flattened params and tags; returns the run id.

    Fails fast with :class:`TrackingUnavailable` when the tracking server cannot be reached.
    """
    from mlflow.entities import Param

    check_reachable()
    mlflow_client = client()
    end_orphaned_runs(experiment)
    run = mlflow_client.create_run(
        experiment_id(experiment), run_name=run_name, tags={**git_tags(), **tags, **_working_tags()}
    )
    # MLflow splits the batch into requests of its limit (100 params); values are capped at its 6000 characters
    mlflow_client.log_batch(run.info.run_id, params=[Param(key, str(value)[:6000]) for key, value in params.items()])
    return run.info.run_id


def numeric_metrics(payload: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten a nested metrics dict to MLflow metrics (numbers only, lists skipped)."""
    flat: dict[str, float] = {}
    for key, value in payload.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(numeric_metrics(value, prefix=f"{name}."))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int | float) and math.isfinite(value):
            flat[name.replace(" ", "_")] = float(value)
    return flat


def figure_text(value: float | int) -> str:
    """A figure as a tag or description shows it: floats to 4 decimals (``0.8642``), ``nan`` if undefined."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r} is {type(value).__name__}, not a number")
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4f}"


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
    """Log a (possibly nested) metrics dict to the run, each key after ``prefix`` (``test_``: the
    split the figures come from); spooled if the server cannot take it."""
    timestamp = int(time.time() * 1000)
    entries = [[k, v, timestamp, step or 0] for k, v in numeric_metrics(metrics, prefix=prefix).items()]
    _deliver(run_id, [{"kind": "metrics", "metrics": entries[s : s + 1000]} for s in range(0, len(entries), 1000)])


def log_artifacts(run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    """Upload files (or whole folders) that exist; missing ones are skipped. Spooled (copied) if the
    server cannot take them."""
    records = [
        {"kind": "artifact", "local": str(path.resolve()), "artifact_path": artifact_path}
        for path in map(Path, paths)
        if path.is_dir() or path.is_file()
    ]
    _deliver(run_id, records)


def short_data_version(version: str) -> str:
    """The first 8 characters of a data version's hash (``dvc:3f2a9c1b...`` -> ``3f2a9c1b``)."""
    return version.split(":", 1)[-1][:8]


def split_dataset(cases_file: Path, split: str, data_version: str):
    """One split's rows of the processed case table (``cases.csv``) as an MLflow dataset ``skinrisk-<split>``.

    Its digest names the data version and the rows (``3f2a9c1b-<MLflow's hash of the table>``): one
    data version gives other splits under other preprocess params, and MLflow keeps one dataset per
    name and digest in an experiment. Its source is the case table's file.
    """
    import mlflow.data
    import pandas as pd
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.digest_utils import compute_pandas_digest

    cases_file = Path(cases_file)
    if not cases_file.exists():
        raise SkinriskError(f"{cases_file} not found: run `skinrisk preprocess` first")
    cases = pd.read_csv(cases_file, dtype={"image_id": str, "lesion_id": str, "sex": str, "localization": str})
    table = cases.loc[cases["split"] == split, list(DATASET_COLUMNS)].reset_index(drop=True)
    # a local path has two equal readings in MLflow's source registry (and a warning): name the type
    source = get_dataset_source_from_json(json.dumps({"uri": str(cases_file.resolve())}), source_type="local")
    return mlflow.data.from_pandas(
        table,
        source=source,
        targets="risk_level",
        name=f"skinrisk-{split}",
        digest=f"{short_data_version(data_version)}-{compute_pandas_digest(table)}",
    )


def log_split_datasets(run_id: str, cases_file: Path, splits: list[str]) -> None:
    """Log the splits a stage read (rows of the processed ``cases_file``) as the run's datasets, in
    context ``training``, ``validation`` or ``test``, under the run's data version. Logging them again
    to the same run adds nothing (MLflow keeps one input per dataset)."""
    try:
        version = client().get_run(run_id).data.tags.get(DATA_VERSION_TAG, "unknown")
    except Exception:  # the server dropped: the datasets are spooled all the same, with their rows' hash
        log.warning("could not read the data version of MLflow run %s", run_id, exc_info=True)
        version = "unknown"
    log_datasets(run_id, {SPLIT_CONTEXTS[s]: split_dataset(cases_file, s, version) for s in splits})


def log_datasets(run_id: str, datasets: Mapping[str, Any]) -> None:
    """Log MLflow datasets (``mlflow.data.from_pandas``...) as the run's inputs, keyed by their context
    (``training``, ``validation``, ``test``): by run id, as the fluent ``mlflow.log_input`` needs an
    active run. Logging the same dataset again adds nothing; spooled if the server cannot take it."""
    # MLflow's own conversion (what mlflow.log_input sends), as a dict the spool can keep
    entries = [{"dataset": d._to_mlflow_entity().to_dictionary(), "context": c} for c, d in datasets.items()]
    _deliver(run_id, [{"kind": "datasets", "datasets": entries}] if entries else [])


# --- delivery with retries, and the spool -------------------------------------------------------


def spool_dir(run_id: str) -> Path:
    """The folder keeping what could not be sent to run ``run_id`` yet."""
    return Path(os.environ.get("SKINRISK_TRACKING_SPOOL") or DEFAULT_SPOOL).resolve() / run_id


def _spooled(run_id: str) -> list[dict]:
    """The run's spooled records, oldest first."""
    path = spool_dir(run_id) / SPOOL_FILE
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def pending(run_id: str) -> int:
    """How many spooled records of the run are waiting to be sent."""
    return len(_spooled(run_id))


@contextlib.contextmanager
def _http_limits() -> Iterator[None]:
    """Bound MLflow's own HTTP retries (7, with backoff: minutes) while we retry and spool ourselves.

    MLflow reads these variables at each request; the module lock keeps the change to our calls.
    """
    limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S)}
    saved = {key: os.environ.get(key) for key in limits}
    os.environ.update(limits)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _transient(exc: BaseException) -> bool:
    """Whether a failed call may succeed later (server down or overloaded), so it is worth keeping."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):  # connection errors and timeouts arrive as INTERNAL_ERROR
        retryable = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
        return exc.get_http_status_code() >= 500 or exc.error_code in retryable
    if isinstance(exc, requests.HTTPError):  # proxied artifact uploads
        return exc.response is None or exc.response.status_code >= 500
    return isinstance(exc, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError)


def _send(mlflow_client, run_id: str, record: dict, root: Path) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if record["kind"] == "metrics":
        mlflow_client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]])
    elif record["kind"] == "datasets":
        inputs = [
            DatasetInput(
                Dataset.from_dictionary(entry["dataset"]), [InputTag(MLFLOW_DATASET_CONTEXT, entry["context"])]
            )
            for entry in record["datasets"]
        ]
        mlflow_client.log_inputs(run_id, datasets=inputs)
    elif (local := root / record["local"]).is_dir():  # an absolute path stays as it is
        mlflow_client.log_artifacts(run_id, str(local), artifact_path=record["artifact_path"])
    elif local.is_file():
        mlflow_client.log_artifact(run_id, str(local), artifact_path=record["artifact_path"])


def _send_with_retries(mlflow_client, run_id: str, record: dict, root: Path, attempts: int) -> None:
    for attempt in range(attempts):
        try:
            with _http_limits():
                _send(mlflow_client, run_id, record, root)
            return
        except Exception as exc:
            if not _transient(exc) or attempt == attempts - 1:
                raise
            time.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)])


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def _spool(run_id: str, records: list[dict], reason: BaseException) -> None:
    """Append records to the run's spool; artifacts are copied, as the files may change before the flush."""
    root = spool_dir(run_id)
    (root / "files").mkdir(parents=True, exist_ok=True)
    kept = []
    for record in records:
        if record["kind"] == "artifact":
            source = Path(record["local"])
            copy = root / "files" / uuid.uuid4().hex[:12] / source.name
            copy.parent.mkdir(parents=True)
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, copy)
            record = {**record, "local": str(copy.relative_to(root))}
        kept.append(record)
    with open(root / SPOOL_FILE, "a", encoding="utf-8") as spool:
        spool.write(_jsonl(kept))
    log.warning(
        "MLflow tracking at %s did not take %d record(s) for run %s (%s); kept in %s, to be sent by the next "
        "successful call for this run",
        tracking_uri(),
        len(kept),
        run_id,
        reason,
        root,
    )


def _flush(mlflow_client, run_id: str, attempts: int) -> bool:
    """Send the run's spooled records in order; returns whether none is left."""
    records = _spooled(run_id)
    if not records:
        return True
    try:
        check_reachable(timeout=2.0)  # still down: spool at once instead of waiting on retries
    except TrackingUnavailable:
        return False
    root = spool_dir(run_id)
    for index, record in enumerate(records):
        try:
            _send_with_retries(mlflow_client, run_id, record, root, attempts)
        except Exception as exc:
            if not _transient(exc):
                raise
            write_text(root / SPOOL_FILE, _jsonl(records[index:]))
            return False
    shutil.rmtree(root)
    log.warning("sent %d spooled record(s) to run %s", len(records), run_id)
    return True


def _deliver(run_id: str, records: list[dict]) -> None:
    """Send records after whatever the run has spooled; keep them in the spool if the server is down."""
    if not records:
        return
    with _lock:
        mlflow_client = client()
        sent = 0
        try:
            if not _flush(mlflow_client, run_id, attempts=1):
                raise TrackingUnavailable(f"{pending(run_id)} earlier record(s) still spooled")
            for record in records:
                _send_with_retries(mlflow_client, run_id, record, Path("/"), attempts=len(RETRY_DELAYS_S) + 1)
                sent += 1
        except Exception as exc:
            if not isinstance(exc, TrackingUnavailable) and not _transient(exc):
                raise
            _spool(run_id, records[sent:], exc)


def flush_spool(run_id: str) -> int:
    """Send what an outage left in the run's spool; returns the records still pending (0: all sent)."""
    with _lock:
        _flush(client(), run_id, attempts=len(RETRY_DELAYS_S) + 1)
        return pending(run_id)


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    """Set the run's tags, in one request."""
    from mlflow.entities import RunTag

    client().log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


# The process working on a run (a pipeline run spans processes under DVC: train opens it, evaluate
# and explain log to it, register closes it). While a stage works on it, PID_TAG holds its pid;
# between stages it is empty. A RUNNING run whose working process is gone died mid-stage.
PID_TAG, HOST_TAG, END_REASON_TAG = "skinrisk.pid", "skinrisk.host", "skinrisk.end_reason"


def _working_tags() -> dict[str, str]:
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def end_orphaned_runs(experiment: str = EXPERIMENT) -> list[str]:
    """End as KILLED the RUNNING runs whose working process on this host is gone (killed, or the
    machine went down mid-stage); returns their ids. Runs from other hosts are left alone."""
    mlflow_client = client()
    existing = mlflow_client.get_experiment_by_name(experiment)
    if existing is None:
        return []
    host = socket.gethostname()
    runs = mlflow_client.search_runs(
        [existing.experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    ended = []
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and not _alive(int(pid)):
            mlflow_client.set_tag(run.info.run_id, END_REASON_TAG, f"process {pid} on {host} died mid-stage")
            mlflow_client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


@contextlib.contextmanager
def _ended_on_failure(run_id: str) -> Iterator[None]:
    """End the run with :func:`ending_status` if the block fails; a tracking error while ending it
    must not hide that failure."""
    try:
        yield
    except BaseException as exc:
        status = ending_status(exc)
        try:
            end_run(run_id, status)
        except Exception:  # the original error is the one to report
            log.warning("could not mark MLflow run %s %s", run_id, status, exc_info=True)
        raise


@contextlib.contextmanager
def working_on(run_id: str | None) -> Iterator[None]:
    """A stage working on ``run_id`` (nothing without one): the run records this process while
    it works; a failure ends the run FAILED, an interruption (Ctrl-C, SIGTERM) KILLED; on success
    the run is left open, idle, for the next stage."""
    if not run_id:
        yield
        return
    set_tags(run_id, _working_tags())
    with _ended_on_failure(run_id):
        yield
    try:
        set_tags(run_id, {PID_TAG: ""})
    except Exception:  # the stage's work is done and logged (or spooled): a lost tag must not fail it
        log.warning("could not mark MLflow run %s idle", run_id, exc_info=True)


def ending_status(exc: BaseException) -> str:
    """The status a run ends with when ``exc`` stops its work: KILLED for an interruption (Ctrl-C,
    SIGTERM as SystemExit, a Prefect termination or cancellation), FAILED for anything else.

    The one rule for every run: the CLI stages (:func:`working_on`), the Prefect flows and the
    monitoring runs."""
    interrupted: tuple[type[BaseException], ...] = (KeyboardInterrupt, SystemExit)
    with contextlib.suppress(ImportError):  # the served model's environment has no Prefect
        from prefect.exceptions import CancelledRun, TerminationSignal

        interrupted += (TerminationSignal, CancelledRun)
    return "KILLED" if isinstance(exc, interrupted) else "FAILED"


@contextlib.contextmanager
def owned_run(run_id: str | None) -> Iterator[None]:
    """Work inside a run this code opened and ends: FINISHED on success, else
    :func:`ending_status` (nothing without a run id)."""
    if not run_id:
        yield
        return
    with _ended_on_failure(run_id):
        yield
    end_run(run_id)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Send what the run has spooled, then close it; raises if the spool cannot be sent yet."""
    with _lock:
        mlflow_client = client()
        if not _flush(mlflow_client, run_id, attempts=len(RETRY_DELAYS_S) + 1):
            raise TrackingUnavailable(
                f"MLflow tracking at {tracking_uri()} cannot take the {pending(run_id)} record(s) spooled for run "
                f"{run_id} (kept in {spool_dir(run_id)}): bring the server back, then close the run with "
                f"`python -c \"from tasks.tracking import end_run; end_run('{run_id}', '{status}')\"`"
            )
        mlflow_client.set_terminated(run_id, status=status)


def epoch_logger(run_id: str):
    """A Keras callback logging each epoch's metrics to the run as it ends (live curves in the UI).

    Steps are Keras' global epoch numbers (1-based), continuous across training phases.

    Not ``mlflow.keras.MlflowCallback`` (MLflow 3.17): it logs through the fluent API, i.e. to the
    calling thread's active run (Prefect runs the train task in a worker thread, where there is
    none: the run is named by id here), bypasses the spool above, and logs the optimizer's config
    as params at every ``fit``, which MLflow refuses for the fine-tuning phase's other learning rate.
    """
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            log_metrics(run_id, dict(logs or {}), step=epoch + 1)

    return EpochLogger()
