"""What a person sees comparing runs in the MLflow UI, on a real SQLite store: runs told apart by
name, test figures apart from the training curves, the splits as datasets, descriptions, and the
compared figures at the artifact root."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from tasks import tracking
from tasks.params import Params
from tasks.runs import run_name, start_pipeline_run

DATA_VERSION = "dvc:3f2a9c1b0d4e5f60718293a4b5c6d7e8"
CASES = pd.DataFrame(
    {
        "lesion_id": [f"HAM_{i:07d}" for i in range(10)],
        "image_id": [f"ISIC_{i:07d}" for i in range(10)],
        "dx": ["nv", "mel", "bcc", "nv", "bkl", "mel", "nv", "akiec", "df", "vasc"],
        "dx_type": ["histo"] * 10,
        "age": [45.0, 60.0, None, 30.0, 55.0, 70.0, 25.0, 80.0, 40.0, 35.0],
        "sex": ["male", "female", "unknown", "male", "female", "male", "female", "male", "female", "male"],
        "localization": ["back", "face", "trunk", "back", "scalp", "ear", "neck", "hand", "foot", "chest"],
        "split": ["train"] * 5 + ["val"] * 2 + ["test"] * 3,
        "risk_level": ["low", "high", "moderate", "low", "low", "high", "low", "moderate", "low", "low"],
    }
)


@pytest.fixture
def cases_file(tmp_path) -> Path:
    path = tmp_path / "processed" / "cases.csv"
    path.parent.mkdir()
    CASES.to_csv(path, index=False)
    return path


@pytest.fixture
def run_id(mlflow_store) -> str:
    return tracking.start_run("run", {}, {tracking.DATA_VERSION_TAG: DATA_VERSION})


def _datasets(run_id: str) -> dict[str, object]:
    """The run's dataset inputs by context."""
    inputs = tracking.client().get_run(run_id).inputs.dataset_inputs
    return {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}


# --- 1. test figures under test_, calibration under val_ ------------------------------------------


def test_test_figures_do_not_overwrite_the_training_curves(run_id, cases_file, tmp_path):
    from tasks.stages.evaluate import log_to_run

    for epoch, (loss, accuracy) in enumerate([(1.0, 0.4), (0.6, 0.7)], 1):  # what the epoch logger sends
        tracking.log_metrics(run_id, {"loss": loss, "accuracy": accuracy, "val_loss": loss + 0.1}, step=epoch)
    metrics = {
        "accuracy": 0.55,
        "loss": 0.8,
        "high_risk_roc_auc": 0.86,
        "triage": {"high_risk_recall": 0.9},
        "confusion_matrix": [[1, 0], [0, 1]],
    }
    log_to_run(run_id, metrics, cases_file.parent, tmp_path / "reports")

    store = tracking.client()
    logged = store.get_run(run_id).data.metrics
    assert [(m.step, m.value) for m in store.get_metric_history(run_id, "accuracy")] == [(1, 0.4), (2, 0.7)]
    assert [(m.step, m.value) for m in store.get_metric_history(run_id, "loss")] == [(1, 1.0), (2, 0.6)]
    assert logged["accuracy"] == 0.7, "the run table's accuracy is the last epoch's"
    description = store.get_run(run_id).data.tags[tracking.NOTE_TAG]  # the run page's "Description"
    assert "high-risk (melanoma) ROC-AUC" in description and "0.860" in description
    assert logged["test_accuracy"] == 0.55 and logged["test_loss"] == 0.8
    assert logged["test_high_risk_roc_auc"] == 0.86 and logged["test_triage.high_risk_recall"] == 0.9
    assert not any("confusion_matrix" in key for key in logged)


def test_calibration_figures_are_validation_figures(run_id, cases_file):
    from tasks.stages.train import _log_to_run

    calibration = {"temperature": 1.7, "val_log_loss_before": 0.9, "val_log_loss_after": 0.8, "val_ece_before": 0.1}
    _log_to_run(run_id, calibration, cases_file.parent)
    logged = tracking.client().get_run(run_id).data.metrics
    assert logged == {
        "val_temperature": 1.7,
        "val_log_loss_before": 0.9,
        "val_log_loss_after": 0.8,
        "val_ece_before": 0.1,
    }


# --- 2. run names ---------------------------------------------------------------------------------


def test_runs_are_named_by_orchestrator_data_version_and_time():
    when = datetime(2026, 12, 3, 18, 42, 51, tzinfo=UTC)
    assert run_name("dvc", DATA_VERSION, when) == "dvc-3f2a9c1b-20261203-1842"
    assert run_name("prefect", "sha256:0123456789abcdef", when) == "prefect-01234567-20261203-1842"


def _raw_dir(tmp_path: Path) -> Path:
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (tmp_path / "data" / "raw.dvc").write_text(f"outs:\n- md5: {DATA_VERSION[4:]}\n  path: raw\n")
    return raw


def test_a_pipeline_run_is_named_for_its_orchestrator_data_and_start(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    raw = _raw_dir(tmp_path)
    names = set()
    for orchestrator in ("dvc", "prefect"):
        run_id = start_pipeline_run(Params(), raw, tmp_path / "reports", orchestrator=orchestrator, source="synthetic")
        run = tracking.client().get_run(run_id)
        assert run.data.tags["data_version"] == DATA_VERSION
        assert re.fullmatch(rf"{orchestrator}-3f2a9c1b-\d{{8}}-\d{{4}}", run.info.run_name), run.info.run_name
        names.add(run.info.run_name)
    assert len(names) == 2


def test_a_dvc_experiment_keeps_its_name(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "sweet-lamb")
    run_id = start_pipeline_run(Params(), _raw_dir(tmp_path), tmp_path / "reports", orchestrator="dvc", source="x")
    run = tracking.client().get_run(run_id)
    assert run.info.run_name == "sweet-lamb" and run.data.tags["dvc_experiment"] == "sweet-lamb"


# --- 3. datasets ----------------------------------------------------------------------------------


def test_train_and_evaluate_log_their_splits_as_datasets_once(run_id, cases_file, tmp_path):
    from tasks.stages.evaluate import log_to_run
    from tasks.stages.train import _log_to_run

    _log_to_run(run_id, {"temperature": 1.0}, cases_file.parent)
    _log_to_run(run_id, {"temperature": 1.0}, cases_file.parent)  # a retried train stage
    log_to_run(run_id, {"accuracy": 0.5}, cases_file.parent, tmp_path / "reports")

    datasets = _datasets(run_id)
    assert sorted(datasets) == ["test", "training", "validation"]
    assert len(tracking.client().get_run(run_id).inputs.dataset_inputs) == 3, "each split logged once"
    for context, split, rows in (("training", "train", 5), ("validation", "val", 2), ("test", "test", 3)):
        dataset = datasets[context]
        assert dataset.name == f"skinrisk-{split}"
        assert dataset.digest.startswith("3f2a9c1b-"), "the digest names the data version"
        assert json.loads(dataset.source) == {"uri": str(cases_file.resolve())}
        assert json.loads(dataset.profile)["num_rows"] == rows
        columns = [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]]
        assert columns == list(tracking.DATASET_COLUMNS), "the case table, not the pixels"


def test_other_rows_under_the_same_data_version_are_another_dataset(run_id, cases_file, mlflow_store):
    first = tracking.split_dataset(cases_file, "test", DATA_VERSION)
    CASES.assign(split=["train"] * 4 + ["val"] * 2 + ["test"] * 4).to_csv(cases_file, index=False)  # new seed
    second = tracking.split_dataset(cases_file, "test", DATA_VERSION)
    assert first.digest != second.digest and first.digest[:9] == second.digest[:9] == "3f2a9c1b-"


# --- 4. descriptions and rounded figures ----------------------------------------------------------


def test_the_experiment_has_a_description_and_an_edited_one_is_kept(mlflow_store):
    tracking.start_run("first", {}, {})
    store = tracking.client()
    experiment = store.get_experiment_by_name(tracking.EXPERIMENT)
    assert experiment.tags[tracking.NOTE_TAG] == tracking.EXPERIMENT_DESCRIPTION
    store.set_experiment_tag(experiment.experiment_id, tracking.NOTE_TAG, "our own words")
    tracking.start_run("second", {}, {})
    assert store.get_experiment(experiment.experiment_id).tags[tracking.NOTE_TAG] == "our own words"


def test_an_experiment_created_before_gets_a_description(mlflow_store):
    tracking.client().create_experiment(tracking.EXPERIMENT)
    tracking.start_run("run", {}, {})
    experiment = tracking.client().get_experiment_by_name(tracking.EXPERIMENT)
    assert experiment.tags[tracking.NOTE_TAG] == tracking.EXPERIMENT_DESCRIPTION


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.8642187654321234, "0.8642"), (0.9, "0.9000"), (1, "1"), (float("nan"), "nan"), (0.00004, "0.0000")],
)
def test_figures_in_tags_are_rounded_to_four_decimals(value, text):
    assert tracking.figure_text(value) == text


# --- 5. the compared figures at the artifact root ---------------------------------------------------


def test_the_figures_people_compare_sit_at_the_artifact_root(run_id, cases_file, tmp_path):
    from tasks.stages.evaluate import COMPARED_ARTIFACTS, DETAIL_ARTIFACTS, log_to_run

    reports = tmp_path / "reports"
    reports.mkdir()
    for name in COMPARED_ARTIFACTS + DETAIL_ARTIFACTS:
        (reports / name).write_text(name)
    log_to_run(run_id, {"accuracy": 0.5}, cases_file.parent, reports)

    store = tracking.client()
    root = {a.path for a in store.list_artifacts(run_id) if not a.is_dir}
    assert root == {"metrics.json", "confusion_matrix.png", "reliability.png", "training_curves.png", "subgroups.png"}
    detail = {a.path for a in store.list_artifacts(run_id, "reports")}
    assert detail == {
        "reports/classification_report.txt",
        "reports/predictions.csv",
        "reports/training_history.csv",
        "reports/subgroups.md",
    }
