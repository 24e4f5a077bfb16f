"""The register stage: log the serving pyfunc to the training run and register it under an alias.

The logged model carries everything scoring needs (the ``.keras`` model, the clinical encoder,
``preprocess.json`` and the validation-chosen operating point) plus the ``tasks`` package as
code, so ``mlflow models serve -m models:/skinrisk@challenger`` scores raw cases on its own.

Registry stages are deprecated in MLflow: versions are addressed by alias (``challenger`` for a
freshly registered candidate, ``champion`` for the one in service), never by stage.

The registered model and each version carry a description: the model's says what it predicts
from what; a version's is its model card (``tasks.model_card``: its headline test figures, run and
data version first), which is also logged to the run as ``model_card.md``. Figures in tags are
rounded to 4 decimals.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from tasks.atomic import write_json
from tasks.errors import SkinriskError
from tasks.model_card import CARD_FILE, RegistryFacts, card_sections, fit_description
from tasks.schema import ENCODER_FILE, PROCESSED_SUMMARY_FILE, read_preprocess_summary
from tasks.tracking import DATA_VERSION_TAG, MODEL_NAME, client, end_run, figure_text, log_artifacts, tracking_uri

LOGGED_MODEL_NAME = "model"
MODEL_DESCRIPTION = (
    "Skin-lesion risk triage. Predicts the risk level of a lesion (low, moderate or high: melanoma is "
    "high, basal cell carcinoma and actinic keratosis moderate, under the default risk map) from one "
    "dermatoscopic image with the patient's age and sex and the lesion's body site.\n\n"
    "Input: `image` (base64 JPEG or PNG), `age`, `sex`, `localization`. Output: `p_low`, `p_moderate`, "
    "`p_high`, `risk_level`, and `refer` (P(high) at or above the version's threshold, chosen on the "
    "validation split for a target high-risk recall). The training preprocessing is inside the model.\n\n"
    "**Not a medical device.** A research and decision-support aid trained on HAM10000-style data, not a "
    "diagnosis: every referral decision rests with a clinician.\n\n"
    "Versions are addressed by alias: `@challenger` (newly registered), `@champion` (in service), "
    "`@previous` (the champion before).\n\n"
    "Each version's description is its **model card** (intended use, training data, test figures with "
    "95% intervals, subgroups, operating point, known failure modes); the whole card is the version's run "
    "artifact `model_card.md`, and `skinrisk model-card --model models:/skinrisk@champion` prints it."
)
# MLflow's SQL stores keep a version's description in a VARCHAR(5000) (PostgreSQL enforces it)
DESCRIPTION_LIMIT = 5000
# What a version's description calls its headline figures (tasks.stages.evaluate.headline_figures' keys)
FIGURE_LABELS = {
    "high_risk_roc_auc": "high-risk (melanoma) ROC-AUC",
    "high_risk_pr_auc": "high-risk PR-AUC",
    "high_risk_recall": "sensitivity (high-risk recall) at the operating point",
    "specificity": "specificity at the operating point",
    "low_risk_spared": "low-risk lesions not referred",
    "threshold": "P(high) referral threshold (chosen on validation)",
    "balanced_accuracy": "3-level balanced accuracy",
    "ece": "expected calibration error",
    "macro_f1": "macro F1",
    "roc_auc_ovr": "macro one-vs-rest ROC-AUC",
}
# What the pyfunc imports when it is served: TensorFlow/Keras for the network, Pillow to decode,
# pandas/numpy for the table, pydantic and PyYAML (tasks.params), scikit-learn and matplotlib
# (tasks.metrics, which sums diagnosis probabilities per risk level), and MLflow itself.
SERVING_DISTRIBUTIONS: tuple[str, ...] = (
    "keras",
    "numpy",
    "pandas",
    "pillow",
    "pydantic",
    "pyyaml",
    "scikit-learn",
    "matplotlib",
    "mlflow",
)


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str
    model_uri: str  # models:/<name>/<version>: this exact version, wherever the alias moves later
    run_id: str


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_requirements() -> list[str]:
    """The served model's requirements, pinned to the versions installed here."""
    tensorflow = next((d for d in ("tensorflow-cpu", "tensorflow") if _installed(d)), None)
    if tensorflow is None:
        raise SkinriskError("TensorFlow is not installed: install the project (pip install -e .)")
    for distribution in SERVING_DISTRIBUTIONS:
        if _installed(distribution) is None:
            raise SkinriskError(
                f"{distribution} is not installed, and the served model needs it: "
                "install the project (pip install -e .)"
            )
    return [f"{d}=={_installed(d)}" for d in (tensorflow, *SERVING_DISTRIBUTIONS)]


def _metric_tags(metrics: Mapping[str, object] | None) -> dict[str, str]:
    tags: dict[str, str] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SkinriskError(
                f"metric {key!r} is {type(value).__name__}, not a number: pass the headline "
                "figures only, e.g. {'balanced_accuracy': 0.71, 'high_risk_recall': 0.9}"
            )
        tags[key] = figure_text(value)
    return tags


def version_description(figures: Mapping[str, str], run_id: str, run_name: str, data_version: str | None) -> str:
    """A version's description: its headline test figures (as tagged: rounded), its run and data version."""
    lines = [f"- {FIGURE_LABELS.get(key, key.replace('_', ' '))}: {value}" for key, value in figures.items()]
    text = "Headline figures on the held-out test split:\n\n" + "\n".join(lines) if lines else "No test figures given."
    return (
        f"{text}\n\nTrained in MLflow run `{run_name}` ({run_id}) on data version "
        f"`{data_version or 'unknown'}`. Served at the threshold above; see the registered model's description."
    )


@contextlib.contextmanager
def _logging_to(run_id: str) -> Iterator[None]:
    """Make ``run_id`` the active run of this thread for the block, then restore its status.

    ``mlflow.pyfunc.log_model`` only logs to the active run, which is thread-local; resuming the
    run by id here (and ending it again) keeps the calling thread's state as it was, and leaves a
    run that was still RUNNING running.
    """
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    status = client().get_run(run_id).info.status
    mlflow.start_run(run_id=run_id, nested=active is not None)
    try:
        yield
    finally:
        mlflow.end_run(status=status)


def _check_inputs(model_path: Path, processed_dir: Path, operating_point_path: Path) -> None:
    needed = {
        model_path: "`skinrisk train`",
        processed_dir / ENCODER_FILE: "`skinrisk preprocess`",
        processed_dir / PROCESSED_SUMMARY_FILE: "`skinrisk preprocess`",
        operating_point_path: "`skinrisk evaluate`",
    }
    missing = [f"{path} (made by {stage})" for path, stage in needed.items() if not path.is_file()]
    if missing:
        raise SkinriskError("cannot register the model; missing: " + ", ".join(missing))


def register_model(
    model_path: Path,
    processed_dir: Path,
    operating_point_path: Path,
    run_id: str,
    *,
    name: str = MODEL_NAME,
    alias: str = "challenger",
    metrics: dict | None = None,
    evaluation: Mapping | None = None,
    training: Mapping | None = None,
    out_file: Path | None = None,
) -> Registration:
    """Log the serving pyfunc to run ``run_id``, register a new version of ``name``, alias it.

    The version is tagged with the run id, the run's data version (when the run has one) and the
    headline ``metrics`` (flat numbers, tagged as strings). Its model card, from ``evaluation``
    (the whole ``metrics.json``), ``training`` (``train.json``), the run's train params and the
    preprocess summary, is logged to the run as ``model_card.md`` and becomes the version's
    description. ``out_file`` (e.g. ``models/registered.json``) receives the :class:`Registration`,
    atomically.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks.serving import (
        ENCODER_ARTIFACT,
        MODEL_ARTIFACT,
        OPERATING_POINT_ARTIFACT,
        PREPROCESS_ARTIFACT,
        RiskModel,
        example_input,
        read_operating_point,
        risk_signature,
    )

    model_path, processed_dir = Path(model_path), Path(processed_dir)
    operating_point_path = Path(operating_point_path)
    _check_inputs(model_path, processed_dir, operating_point_path)
    summary = read_preprocess_summary(processed_dir)
    operating_point = read_operating_point(operating_point_path)
    figures = _metric_tags(metrics)

    mlflow_client = client()  # also points mlflow's fluent API at tracking_uri()
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException as exc:
        raise SkinriskError(
            f"run {run_id!r} is not in the MLflow store at {tracking_uri()}: register from the "
            "run that trained the model (see models/train.json) or check MLFLOW_TRACKING_URI"
        ) from exc
    threshold = figure_text(float(operating_point["threshold"]))
    tags = {"run_id": run_id, **figures, "target": operating_point["target"], "threshold": threshold}
    if (data_version := run.data.tags.get(DATA_VERSION_TAG)) is not None:
        tags[DATA_VERSION_TAG] = data_version

    with _logging_to(run_id):
        logged = mlflow.pyfunc.log_model(
            name=LOGGED_MODEL_NAME,
            python_model=RiskModel(),
            artifacts={
                MODEL_ARTIFACT: str(model_path),
                ENCODER_ARTIFACT: str(processed_dir / ENCODER_FILE),
                PREPROCESS_ARTIFACT: str(processed_dir / PROCESSED_SUMMARY_FILE),
                OPERATING_POINT_ARTIFACT: str(operating_point_path),
            },
            # The served model imports tasks.serving (and what it uses) from this copy.
            code_paths=[str(Path(__file__).resolve().parents[1])],  # the tasks package
            signature=risk_signature(),
            input_example=example_input(summary.image_size),
            pip_requirements=pip_requirements(),
        )
    version = mlflow.register_model(logged.model_uri, name, tags=tags)
    number = str(version.version)
    if not mlflow_client.get_registered_model(name).description:  # never overwrite one edited in the UI
        mlflow_client.update_registered_model(name, description=MODEL_DESCRIPTION)
    headline = version_description({**figures, "threshold": threshold}, run_id, run.info.run_name, data_version)
    sections = card_sections(
        evaluation or {},
        summary,
        {key.removeprefix("train."): value for key, value in run.data.params.items() if key.startswith("train.")},
        training or {},
        RegistryFacts(
            name=name,
            version=number,
            run_id=run_id,
            run_name=run.info.run_name,
            data_version=data_version,
            data_source=run.data.tags.get("data_source"),
            date=datetime.fromtimestamp(version.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d"),
        ),
        lead=headline,
    )
    _log_card(run_id, "\n\n".join(sections) + "\n")
    full_card = f"the artifact `{CARD_FILE}` of run {run_id}, or `skinrisk model-card --model models:/{name}/{number}`"
    mlflow_client.update_model_version(
        name, number, description=fit_description(sections, DESCRIPTION_LIMIT, full_card)
    )
    mlflow_client.set_registered_model_alias(name, alias, number)

    registration = Registration(
        name=name, version=number, alias=alias, model_uri=f"models:/{name}/{number}", run_id=run_id
    )
    if out_file is not None:
        write_json(Path(out_file), asdict(registration))
    return registration


def register(model_path: Path, processed_dir: Path, model_dir: Path, reports_dir: Path, run_id: str) -> Registration:
    """The register stage: log the pyfunc to the pipeline's run, register it as ``challenger`` (its
    model card from the evaluate and train stages' outputs) and close the run. Both orchestrators
    (``skinrisk register`` under DVC, the Prefect task ``register``) call this."""
    from tasks.metrics import headline_figures
    from tasks.paths import METRICS_FILE, TRAIN_INFO_FILE
    from tasks.scored_model import OPERATING_POINT_FILE

    metrics_path = Path(reports_dir) / METRICS_FILE
    if not metrics_path.exists():
        raise SkinriskError(f"{metrics_path} not found: run `skinrisk evaluate` first")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    train_info = Path(model_dir) / TRAIN_INFO_FILE
    training = json.loads(train_info.read_text(encoding="utf-8")) if train_info.exists() else None
    registration = register_model(
        Path(model_path),
        Path(processed_dir),
        Path(model_dir) / OPERATING_POINT_FILE,
        run_id,
        alias="challenger",
        # the triage figures first (high-risk AUC, the operating point), tagged on the version
        metrics={k: v for k, v in headline_figures(metrics).items() if isinstance(v, int | float)},
        evaluation=metrics,
        training=training,
        out_file=Path(model_dir) / "registered.json",
    )
    end_run(run_id)
    return registration


def _log_card(run_id: str, card: str) -> None:
    """The card as ``model_card.md`` at the run's artifact root (spooled if the server cannot take it)."""
    with tempfile.TemporaryDirectory(prefix="skinrisk-card-") as scratch:
        path = Path(scratch) / CARD_FILE
        path.write_text(card, encoding="utf-8")
        log_artifacts(run_id, [path])


def registered_version(uri: str):
    """The registry's ``ModelVersion`` at ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    reference, at, alias = uri.removeprefix("models:/").partition("@")
    name, _, number = reference.partition("/")
    names_one = not number if at else number.isdigit()  # an alias, or a version number
    if not uri.startswith("models:/") or not name or not names_one:
        raise SkinriskError(f"{uri!r} names no model version. {_registry_hint(uri)}")
    with _no_model_is_an_error(uri):
        if at:
            return client().get_model_version_by_alias(name, alias)
        return client().get_model_version(name, number)


def registered_card(uri: str) -> str:
    """The model card of the version at ``uri``: the run's whole ``model_card.md`` when it is this
    version's (a run registered twice keeps the later card), else the version's description."""
    import mlflow

    version = registered_version(uri)
    title = f"# Model card: {version.name} version {version.version}\n"
    if version.run_id:
        with tempfile.TemporaryDirectory(prefix="skinrisk-card-") as scratch:
            try:
                path = mlflow.artifacts.download_artifacts(
                    run_id=version.run_id, artifact_path=CARD_FILE, dst_path=scratch
                )
                card = Path(path).read_text(encoding="utf-8")
            except Exception:  # no such artifact, or the artifact store out of reach: the description has it
                card = ""
        if card.startswith(title):
            return card
    description = version.description or ""
    if not description.startswith(title):
        raise SkinriskError(
            f"{uri} (version {version.version} of {version.name}) was registered without a model card; "
            "register the model again, or render one for the local model: "
            "`skinrisk model-card --model models/model.keras`"
        )
    return description


def load_registered(uri: str):
    """The served pyfunc at ``uri`` (``models:/skinrisk@champion``, ``models:/skinrisk/3``...)."""
    import mlflow

    client()  # point mlflow at tracking_uri() before it resolves models:/ URIs
    with _no_model_is_an_error(uri):
        return mlflow.pyfunc.load_model(uri)


@contextlib.contextmanager
def _no_model_is_an_error(uri: str):
    """MLflow's "no such model or version" as one SkinriskError line that says what the registry holds."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise SkinriskError(
            f"no model at {uri} in the MLflow store at {tracking_uri()} ({exc.message}). {_registry_hint(uri)}"
        ) from exc


def _registry_hint(uri: str) -> str:
    """What the registry does hold under the URI's model name, for the error message."""
    if not uri.startswith("models:/"):
        return "Give a models:/<name>@<alias> or models:/<name>/<version> URI."
    name = uri.removeprefix("models:/").split("@")[0].split("/")[0]
    try:
        model = client().get_registered_model(name)
    except Exception:
        return f"No registered model is named {name!r}: run `skinrisk register` first."
    aliases = ", ".join(f"{a} -> version {v}" for a, v in sorted(model.aliases.items()))
    versions = sorted(int(v.version) for v in client().search_model_versions(f"name='{name}'"))
    return (
        f"Model {name!r} has version(s) {versions} and alias(es) {aliases or 'none'}; "
        "register it again or use one of these."
    )
